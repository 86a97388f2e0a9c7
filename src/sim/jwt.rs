//! RS256 signing keys for `--token-format jwt`, and the JWKS document that publishes them.
//!
//! Real Genesys tokens are opaque; the JWT mode exists so the proxy's `jwks` validation (for
//! generic OAuth2 issuers) can be tested. A rotated-out key stays published for
//! [`ROTATION_GRACE`] so tokens signed just before a rotation still verify.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde::Serialize;

use crate::sync::lock;

/// How long a rotated-out signing key stays in the JWKS.
pub const ROTATION_GRACE: Duration = Duration::from_secs(3600);

struct Key {
    kid: String,
    encoding: EncodingKey,
    n: String,
    e: String,
    retired_at: Option<Instant>,
}

/// The simulator's signing keys; empty unless the JWT mode is on.
pub struct SigningKeys {
    keys: Mutex<Vec<Key>>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
}

/// Issuer and audience the simulator puts in its JWTs.
pub const ISSUER: &str = "genesys-cloud-simulator";
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
        }
    }

    /// Signs a token for `client_id` valid for `lifetime` seconds with the newest key.
    pub fn sign(&self, client_id: &str, lifetime: u64) -> Option<String> {
        let keys = lock(&self.keys);
        let key = keys.last()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        let claims = Claims {
            iss: ISSUER,
            sub: client_id,
            aud: AUDIENCE,
            iat: now,
            exp: now + lifetime,
            jti: super::random_token(),
        };
        jsonwebtoken::encode(&header, &claims, &key.encoding).ok()
    }

    /// Adds a new signing key; the previous ones stay published for the grace period.
    /// Returns the new key id, or `None` when the JWT mode is off.
    pub fn rotate(&self) -> Option<String> {
        let mut keys = lock(&self.keys);
        if keys.is_empty() {
            return None;
        }
        let now = Instant::now();
        for k in keys.iter_mut() {
            k.retired_at.get_or_insert(now);
        }
        keys.retain(|k| {
            k.retired_at
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

fn generate() -> Key {
    let mut rng = rand08::rngs::OsRng;
    // 2048 bits is what real issuers use; the dev profile optimises the `rsa` crate so this
    // takes well under a second even in tests.
    let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key generation"); // ok: only fails on a broken RNG
    let der = private.to_pkcs1_der().expect("PKCS#1 encoding"); // ok: infallible for a valid key
    let encoding = EncodingKey::from_rsa_der(der.as_bytes());
    let n = URL_SAFE_NO_PAD.encode(private.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(private.e().to_bytes_be());
    let kid = super::random_token()[..16].to_string();
    Key {
        kid,
        encoding,
        n,
        e,
        retired_at: None,
    }
}
