//! RS256 signing keys for `--token-format jwt`, and the JWKS document that publishes them.
//!
//! Real Genesys tokens are opaque; the JWT mode exists so the proxy's `jwks` validation (for
//! generic OAuth2 issuers) can be tested. A rotated-out key stays published for
//! [`ROTATION_GRACE`] so tokens signed just before a rotation still verify. The control API can
//! queue [`Hostile`] tokens: forged or wrong ones a validating client must refuse.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sync::lock;

/// How long a rotated-out signing key stays in the JWKS.
pub const ROTATION_GRACE: Duration = Duration::from_secs(3600);

struct Key {
    kid: String,
    encoding: EncodingKey,
    n: String,
    e: String,
    /// The public key as PEM: what an algorithm-confusion attacker uses as an HMAC secret.
    public_pem: String,
    retired_at: Option<Instant>,
}

/// A token a validating client must refuse, issued instead of a good one when queued with
/// `POST /__sim/hostile-tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hostile {
    /// `alg: none`, no signature.
    AlgNone,
    /// HS256 with the RSA public key (PEM) as the HMAC secret: algorithm confusion.
    Hs256PublicKey,
    /// Signed by a key the JWKS does not publish, under a `kid` it does not know.
    UnknownKid,
    /// Signed by an unpublished key under the published key's `kid`.
    BadSignature,
    /// `exp` an hour ago.
    Expired,
    /// `iss` of another issuer.
    WrongIssuer,
    /// `aud` of another API.
    WrongAudience,
    /// No `exp` claim at all.
    NoExp,
    /// No `iss` claim.
    NoIssuer,
    /// No `aud` claim.
    NoAudience,
    /// `exp` in the year 5138.
    FarExp,
    /// `exp` past the year 9999 (a millisecond timestamp read as seconds, times 1000).
    ExpPastYear9999,
}

/// The simulator's signing keys; empty unless the JWT mode is on.
pub struct SigningKeys {
    keys: Mutex<Vec<Key>>,
    issuer: OnceLock<String>,
    hostile: Mutex<VecDeque<(Hostile, u64)>>,
}

/// The issuer the simulator names until [`SigningKeys::set_issuer`] gives it its URL.
pub const DEFAULT_ISSUER: &str = "genesys-cloud-simulator";
/// The audience the simulator puts in its JWTs.
pub const AUDIENCE: &str = "genesys-cloud-api";

impl SigningKeys {
    pub fn new(enabled: bool) -> Self {
        let keys = if enabled {
            vec![generate()]
        } else {
            Vec::new()
        };
        SigningKeys {
            keys: Mutex::new(keys),
            issuer: OnceLock::new(),
            hostile: Mutex::new(VecDeque::new()),
        }
    }

    /// The simulator's base URL becomes its issuer (`iss`, and the discovery document's).
    pub fn set_issuer(&self, url: String) {
        let _ = self.issuer.set(url);
    }

    pub fn issuer(&self) -> &str {
        self.issuer.get().map_or(DEFAULT_ISSUER, String::as_str)
    }

    /// Queues `count` hostile tokens of `kind`, issued before any good one.
    pub fn push_hostile(&self, kind: Hostile, count: u64) {
        lock(&self.hostile).push_back((kind, count));
    }

    fn next_hostile(&self) -> Option<Hostile> {
        let mut queue = lock(&self.hostile);
        let (kind, left) = queue.front_mut()?;
        let kind = *kind;
        *left -= 1;
        if *left == 0 {
            queue.pop_front();
        }
        Some(kind)
    }

    /// Signs a token for `client_id` valid for `lifetime` seconds with the newest key, or a
    /// queued hostile one (named in the answer).
    pub fn sign(&self, client_id: &str, lifetime: u64) -> Option<(String, Option<Hostile>)> {
        let hostile = self.next_hostile();
        let keys = lock(&self.keys);
        let key = keys.last()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut claims = json!({
            "iss": self.issuer(), "sub": client_id, "aud": AUDIENCE,
            "iat": now, "exp": now + lifetime, "jti": super::random_token(),
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        let token = match hostile {
            None => jsonwebtoken::encode(&header, &claims, &key.encoding).ok()?,
            Some(kind) => hostile_token(kind, header, &mut claims, key, now)?,
        };
        Some((token, hostile))
    }

    /// Adds a new signing key; the previous ones stay published for the grace period, or are
    /// withdrawn at once with `retire_old`. Returns the new key id, or `None` when the JWT mode
    /// is off.
    pub fn rotate(&self, retire_old: bool) -> Option<String> {
        let mut keys = lock(&self.keys);
        if keys.is_empty() {
            return None;
        }
        let now = Instant::now();
        for k in keys.iter_mut() {
            k.retired_at.get_or_insert(now);
        }
        keys.retain(|k| {
            !retire_old
                && k.retired_at
                    .is_none_or(|t| now.duration_since(t) < ROTATION_GRACE)
        });
        let key = generate();
        let kid = key.kid.clone();
        keys.push(key);
        Some(kid)
    }

    /// The JWKS document: every key still within its grace period.
    pub fn jwks(&self) -> serde_json::Value {
        let keys = lock(&self.keys);
        let now = Instant::now();
        let published: Vec<_> = keys
            .iter()
            .filter(|k| {
                k.retired_at
                    .is_none_or(|t| now.duration_since(t) < ROTATION_GRACE)
            })
            .map(|k| {
                serde_json::json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256",
                    "kid": k.kid, "n": k.n, "e": k.e,
                })
            })
            .collect();
        serde_json::json!({ "keys": published })
    }
}

/// A token of `kind`, from a good header and claims.
fn hostile_token(
    kind: Hostile,
    mut header: Header,
    claims: &mut Value,
    key: &Key,
    now: u64,
) -> Option<String> {
    let encode = |header: &Header, claims: &Value, with: &EncodingKey| {
        jsonwebtoken::encode(header, claims, with).ok()
    };
    match kind {
        Hostile::AlgNone => {
            let header = json!({"alg": "none", "typ": "JWT", "kid": key.kid});
            let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
            Some(format!("{}.{}.", part(&header), part(claims)))
        }
        Hostile::Hs256PublicKey => {
            header.alg = Algorithm::HS256;
            let secret = EncodingKey::from_secret(key.public_pem.as_bytes());
            encode(&header, claims, &secret)
        }
        Hostile::UnknownKid | Hostile::BadSignature => {
            let forger = generate();
            if kind == Hostile::UnknownKid {
                header.kid = Some(forger.kid.clone());
            }
            encode(&header, claims, &forger.encoding)
        }
        _ => {
            let fields = claims.as_object_mut()?;
            match kind {
                Hostile::Expired => {
                    fields.insert("iat".into(), json!(now - 7200));
                    fields.insert("exp".into(), json!(now - 3600));
                }
                Hostile::WrongIssuer => {
                    fields.insert("iss".into(), json!("https://attacker.example"));
                }
                Hostile::WrongAudience => {
                    fields.insert("aud".into(), json!("https://another-api.example"));
                }
                Hostile::NoExp => {
                    fields.remove("exp");
                }
                Hostile::NoIssuer => {
                    fields.remove("iss");
                }
                Hostile::NoAudience => {
                    fields.remove("aud");
                }
                Hostile::FarExp => {
                    fields.insert("exp".into(), json!(99_999_999_999u64));
                }
                _ => {
                    fields.insert("exp".into(), json!(now.saturating_mul(1_000_000)));
                }
            }
            encode(&header, claims, &key.encoding)
        }
    }
}

fn generate() -> Key {
    let mut rng = rand08::rngs::OsRng;
    // 2048 bits is what real issuers use; the dev profile optimises the `rsa` crate so this
    // takes well under a second even in tests.
    let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key generation"); // ok: only fails on a broken RNG
    let der = private.to_pkcs1_der().expect("PKCS#1 encoding"); // ok: infallible for a valid key
    let encoding = EncodingKey::from_rsa_der(der.as_bytes());
    let n = URL_SAFE_NO_PAD.encode(private.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(private.e().to_bytes_be());
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .expect("SPKI encoding"); // ok: infallible for a valid key
    let kid = super::random_token()[..16].to_string();
    Key {
        kid,
        encoding,
        n,
        e,
        public_pem,
        retired_at: None,
    }
}
