//! Tokens at rest in Redis: AES-256-GCM with a key derived (HKDF-SHA256) from the client
//! secret and the credential's identity, so Redis never holds a usable token and a replica with
//! another secret can neither read nor forge a stored one. The key id (a second HKDF output,
//! not the key) names the Redis keys, so replicas on different secrets never share a slot.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::secret::Secret;

const SALT: &[u8] = b"genesys-auth-proxy cluster v1";

/// Why sealing failed (ring gives no detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("HKDF expansion failed")]
    Derive,
    #[error("no randomness for a nonce")]
    Random,
    #[error("sealing failed")]
    Seal,
}

/// The sealing key of one credential and secret.
pub struct Sealer {
    key: LessSafeKey,
    /// 32 hex digits naming the key (not derived from it: a separate HKDF output).
    pub kid: String,
}

/// A 16-byte HKDF output length.
struct Len16;

impl hkdf::KeyType for Len16 {
    fn len(&self) -> usize {
        16
    }
}

impl Sealer {
    /// The key for `secret` within `context` (token URL and client id).
    pub fn derive(secret: &Secret, context: &str) -> Result<Sealer, SealError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret.expose().as_bytes());
        let fail = |_| SealError::Derive;
        let key_info: [&[u8]; 2] = [b"token key", context.as_bytes()];
        let okm = prk.expand(&key_info, &AES_256_GCM).map_err(fail)?;
        let key = LessSafeKey::new(UnboundKey::from(okm));
        let id_info: [&[u8]; 2] = [b"key id", context.as_bytes()];
        let mut id = [0u8; 16];
        prk.expand(&id_info, Len16)
            .and_then(|okm| okm.fill(&mut id))
            .map_err(fail)?;
        Ok(Sealer {
            key,
            kid: hex::encode(id),
        })
    }

    /// `nonce ‖ ciphertext ‖ tag`, base64url; `aad` is bound to it (the Redis key and expiry).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out,
            )
            .map_err(|_| SealError::Seal)?;
        let mut sealed = nonce.to_vec();
        sealed.extend(out);
        Ok(URL_SAFE_NO_PAD.encode(sealed))
    }

    /// The plaintext, or `None` when the value was sealed with another key, for another
    /// `aad`, or altered.
    pub fn open(&self, aad: &[u8], sealed: &str) -> Option<Vec<u8>> {
        let bytes = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if bytes.len() < NONCE_LEN + aead::MAX_TAG_LEN {
            return None;
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut rest = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut rest)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(secret: &str, context: &str) -> Sealer {
        Sealer::derive(&Secret::new(secret), context).unwrap()
    }

    #[test]
    fn only_the_same_secret_and_context_open_a_sealed_token() {
        let a = sealer("secret-a", "https://login/oauth/token client");
        let sealed = a.seal(b"key|123", b"the-token").unwrap();
        assert!(!sealed.contains("the-token"));
        assert_eq!(a.open(b"key|123", &sealed).unwrap(), b"the-token");
        assert!(a.open(b"key|124", &sealed).is_none(), "aad is bound");
        let other_secret = sealer("secret-b", "https://login/oauth/token client");
        assert!(other_secret.open(b"key|123", &sealed).is_none());
        assert_ne!(a.kid, other_secret.kid);
        let other_client = sealer("secret-a", "https://login/oauth/token other");
        assert!(other_client.open(b"key|123", &sealed).is_none());
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(a
            .open(b"key|123", std::str::from_utf8(&tampered).unwrap())
            .is_none());
        assert_eq!(
            a.kid,
            sealer("secret-a", "https://login/oauth/token client").kid
        );
        assert_ne!(
            a.seal(b"k", b"t").unwrap(),
            a.seal(b"k", b"t").unwrap(),
            "fresh nonce"
        );
    }
}
