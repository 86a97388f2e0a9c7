//! The proxy's own access tokens, issued to apps at their login. A token is valid on every
//! replica that has the same `apps.token_key`, with no lookup: it carries the app's name, its
//! expiry and a binding to the app's current client id and secret, under an HMAC-SHA256 tag.
//! Changing the app's secret, removing the app or changing the key makes it worthless at once.
//!
//! Shape: `gap1.` + base64url(payload) + `.` + base64url(tag), where payload is
//! `version(1) expires_at(u64 BE, Unix seconds) binding(16) nonce(8) name(UTF-8)`. Clients
//! treat it as opaque, as they do Genesys tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

/// Every proxy-issued token starts with this.
pub const PREFIX: &str = "gap1.";

const VERSION: u8 = 1;
/// Domain separation: the key signs nothing else with this context.
const CONTEXT: &[u8] = b"genesys-auth-proxy app token v1\0";
const FIXED: usize = 1 + 8 + 16 + 8;
/// Longest token accepted for checking (a name is at most 32 bytes).
const MAX_LEN: usize = 160;

/// `apps.token_key`, ready to sign and verify.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    pub fn new(secret: &[u8]) -> Self {
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims<'a> {
    pub app: &'a str,
    pub expires_at: u64,
    pub binding: [u8; 16],
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the shape at all.
    Malformed,
    /// The tag does not verify: forged, altered, or made with another key.
    BadTag,
    Expired,
}

/// Issues a token for `claims`, unique by `nonce`.
pub fn issue(key: &TokenKey, claims: &Claims<'_>, nonce: [u8; 8]) -> String {
    let mut payload = Vec::with_capacity(FIXED + claims.app.len());
    payload.push(VERSION);
    payload.extend_from_slice(&claims.expires_at.to_be_bytes());
    payload.extend_from_slice(&claims.binding);
    payload.extend_from_slice(&nonce);
    payload.extend_from_slice(claims.app.as_bytes());
    let tag = sign(key, &payload);
    format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    )
}

/// Checks a token's tag and expiry at `now` (Unix seconds). The name is returned in
/// `buf`, which the claims borrow from.
pub fn open<'b>(
    key: &TokenKey,
    token: &str,
    now: u64,
    buf: &'b mut [u8; 64],
) -> Result<Claims<'b>, TokenError> {
    if token.len() > MAX_LEN {
        return Err(TokenError::Malformed);
    }
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (payload_b64, tag_b64) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let n = URL_SAFE_NO_PAD
        .decode_slice(payload_b64, buf)
        .map_err(|_| TokenError::Malformed)?;
    let mut tag = [0u8; 32];
    match URL_SAFE_NO_PAD.decode_slice(tag_b64, &mut tag) {
        Ok(32) => {}
        _ => return Err(TokenError::Malformed),
    }
    let payload = &buf[..n];
    if n <= FIXED || payload[0] != VERSION {
        return Err(TokenError::Malformed);
    }
    // Compared in constant time: the whole tag whatever differs.
    if !crate::fingerprint::constant_time_eq(sign(key, payload).as_ref(), &tag) {
        return Err(TokenError::BadTag);
    }
    let expires_at = u64::from_be_bytes(payload[1..9].try_into().unwrap_or_default());
    if expires_at <= now {
        return Err(TokenError::Expired);
    }
    let mut binding = [0u8; 16];
    binding.copy_from_slice(&payload[9..25]);
    let app = std::str::from_utf8(&buf[FIXED..n]).map_err(|_| TokenError::Malformed)?;
    Ok(Claims {
        app,
        expires_at,
        binding,
    })
}

fn sign(key: &TokenKey, payload: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(&key.0);
    ctx.update(CONTEXT);
    ctx.update(payload);
    ctx.sign()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(app: &str, expires_at: u64) -> Claims<'_> {
        Claims {
            app,
            expires_at,
            binding: [7; 16],
        }
    }

    #[test]
    fn a_token_opens_with_its_key_until_it_expires() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let t = issue(&key, &claims("billing", 1_000), [1; 8]);
        assert!(t.starts_with(PREFIX));
        let mut buf = [0; 64];
        assert_eq!(open(&key, &t, 999, &mut buf), Ok(claims("billing", 1_000)));
        let mut buf = [0; 64];
        assert_eq!(open(&key, &t, 1_000, &mut buf), Err(TokenError::Expired));
        // Two logins give two tokens.
        assert_ne!(t, issue(&key, &claims("billing", 1_000), [2; 8]));
    }

    #[test]
    fn another_key_an_altered_payload_or_garbage_is_refused() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let other = TokenKey::new(b"fedcba9876543210fedcba9876543210");
        let t = issue(&key, &claims("billing", 1_000), [1; 8]);
        let mut buf = [0; 64];
        assert_eq!(open(&other, &t, 1, &mut buf), Err(TokenError::BadTag));
        // The same tag over a payload naming another app.
        let forged_payload = {
            let (_, rest) = t.split_at(PREFIX.len());
            let (p, tag) = rest.split_once('.').unwrap();
            let mut bytes = URL_SAFE_NO_PAD.decode(p).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            format!("{PREFIX}{}.{tag}", URL_SAFE_NO_PAD.encode(bytes))
        };
        assert_eq!(
            open(&key, &forged_payload, 1, &mut buf),
            Err(TokenError::BadTag)
        );
        for garbage in [
            "",
            "gap1.",
            "gap1.x.y",
            "Bearer",
            &"gap1.".repeat(40),
            "gap1.AQ.AAAA",
        ] {
            assert_eq!(
                open(&key, garbage, 1, &mut buf),
                Err(TokenError::Malformed),
                "{garbage}"
            );
        }
    }
}
