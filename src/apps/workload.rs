//! Workload tokens as app proofs (`[[app]] jwt`): a JWT such as a Kubernetes projected
//! ServiceAccount token, sent as `Authorization: Bearer <jwt>`. It is verified with the JWKS
//! code the proxy already has (RS256 or ES256 only; `exp`, `nbf`, `iss`, `aud` checked, the
//! keys from `jwks_url` or the issuer's OpenID discovery), its `sub` must be one of the app's
//! `subjects`, and it is never forwarded. A verified token is remembered (by digest) until its
//! `exp`, so a busy app pays one signature check per token, not per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use sha2::{Digest, Sha256};

use crate::config::apps::{AppSettings, JwtProof};
use crate::config::model::JwksSettings;
use crate::metrics::{AuthFailure, Metrics};
use crate::sync::lock;
use crate::token::jwks::Jwks;

/// Verified tokens remembered at most; past it the expired go, then all.
const CACHE_MAX: usize = 10_000;

/// One issuer's keys, and the apps that take its tokens.
struct Issuer {
    proof: JwtProof,
    jwks: Jwks,
    /// Indexes into the registry's apps.
    apps: Vec<usize>,
}

/// The workload-token issuers of the current apps, and the tokens already verified.
pub struct Workload {
    issuers: Vec<Issuer>,
    /// SHA-256 of a token → the app it proved, and its `exp` (Unix seconds).
    cache: Mutex<HashMap<[u8; 32], (usize, u64)>>,
}

impl Workload {
    pub fn new(apps: &[AppSettings]) -> Workload {
        let mut issuers: Vec<Issuer> = Vec::new();
        for (i, app) in apps.iter().enumerate() {
            let Some(proof) = &app.jwt else { continue };
            let same = |is: &&mut Issuer| {
                is.proof.issuer == proof.issuer
                    && is.proof.audience == proof.audience
                    && is.proof.keys == proof.keys
                    && is.proof.ca_certs == proof.ca_certs
            };
            match issuers.iter_mut().find(same) {
                Some(is) => is.apps.push(i),
                None => match jwks(proof) {
                    Ok(jwks) => issuers.push(Issuer {
                        proof: proof.clone(),
                        jwks,
                        apps: vec![i],
                    }),
                    Err(e) => {
                        tracing::error!(app = %app.name, error = %e, "app.jwt: no HTTP client for the JWKS; its tokens are refused")
                    }
                },
            }
        }
        Workload {
            issuers,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The app a token already verified proves, while it has not expired.
    pub fn cached(&self, token: &str, now: u64) -> Option<usize> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        match lock(&self.cache).get(&key) {
            Some(&(app, exp)) if exp > now => Some(app),
            _ => None,
        }
    }

    /// Verifies `token` against the issuer it names and the subjects of that issuer's apps.
    pub async fn verify(
        &self,
        token: &str,
        apps: &[AppSettings],
        now: u64,
    ) -> Result<usize, AuthFailure> {
        let issuer = unverified_issuer(token).ok_or(AuthFailure::Malformed)?;
        for is in self.issuers.iter().filter(|is| is.proof.issuer == issuer) {
            let (exp, claims) = match is.jwks.verify_claims(token).await {
                Ok(verified) => verified,
                Err(e) => {
                    tracing::debug!(error = %e, issuer = %issuer, "workload token refused");
                    continue;
                }
            };
            let sub = claims["sub"].as_str().unwrap_or_default();
            let Some(&app) = is.apps.iter().find(|&&i| {
                apps[i]
                    .jwt
                    .as_ref()
                    .is_some_and(|j| j.subjects.iter().any(|s| s == sub))
            }) else {
                continue;
            };
            let exp = exp.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            self.remember(token, app, exp, now);
            return Ok(app);
        }
        Err(AuthFailure::WorkloadToken)
    }

    fn remember(&self, token: &str, app: usize, exp: u64, now: u64) {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut cache = lock(&self.cache);
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, e)| *e > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (app, exp));
    }
}

/// Does this bearer look like a JWT (three base64url parts)?
pub fn looks_like_jwt(credential: &str) -> bool {
    let mut parts = credential.split('.');
    let shaped = |p: Option<&str>| {
        p.is_some_and(|p| {
            p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
    };
    let (h, p, s) = (parts.next(), parts.next(), parts.next());
    parts.next().is_none()
        && h.is_some_and(|h| !h.is_empty())
        && p.is_some_and(|p| !p.is_empty())
        && shaped(h)
        && shaped(p)
        && shaped(s)
}

/// The `iss` a token claims, read before verification only to pick its issuer's keys.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["iss"].as_str().map(str::to_string)
}

fn jwks(proof: &JwtProof) -> Result<Jwks, String> {
    let client = crate::token::endpoint::http_client(
        proof.ca_certs.as_deref(),
        Duration::from_secs(5),
        Duration::from_secs(10),
        // The workload issuer is inside the network (the cluster's API server, a mesh CA).
        None,
    )?;
    let settings = JwksSettings {
        keys: proof.keys.clone(),
        issuer: Some(proof.issuer.clone()),
        audience: Some(proof.audience.clone()),
        algorithms: vec![Algorithm::RS256, Algorithm::ES256],
        cache: Duration::from_secs(300),
        leeway: Duration::from_secs(30),
    };
    // Its fetch counters are its own: the credentials' jwks_* series stay theirs.
    Ok(Jwks::new(
        settings,
        client,
        1024 * 1024,
        Arc::new(Metrics::new()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_token_is_remembered_until_its_exp_and_the_memory_is_bounded() {
        let w = Workload::new(&[]);
        w.remember("t1", 3, 1_000, 900);
        assert_eq!(w.cached("t1", 999), Some(3));
        assert_eq!(w.cached("t1", 1_000), None, "expired");
        assert_eq!(w.cached("t2", 999), None);
        for i in 0..CACHE_MAX + 10 {
            w.remember(&format!("x{i}"), 0, 2_000, 1_500);
        }
        assert!(lock(&w.cache).len() <= CACHE_MAX);
    }

    #[test]
    fn jwt_shapes_are_told_from_api_keys() {
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."));
        assert!(!looks_like_jwt("ops-api-key-5b8e2d7c91f4a6"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt(".b.c"));
        assert!(!looks_like_jwt("a b.c.d"));
    }
}
