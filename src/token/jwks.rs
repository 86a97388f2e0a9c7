//! JWT access tokens validated against the issuer's JWKS (`[token] validation = "jwks"`), for
//! issuers whose tokens are JWTs. Genesys tokens are opaque and keep `tokens_me`; the
//! simulator's `--token-format jwt` serves a JWKS for this mode.
//!
//! A token is published only if: its algorithm is in `token.algorithms` (HMAC and `none` are
//! always refused: a public key must never be used as an HMAC secret), the key matching its
//! `kid` (or the only key, without a `kid`) is of that algorithm's family and verifies the
//! signature, `exp` is present and in the future, `nbf`/`iat` are not in the future (with
//! `leeway_seconds`), and `iss`/`aud` match when configured. The JWKS is cached for
//! `jwks_cache_seconds`; an unknown `kid` triggers one refetch (at most every 30 s); a failed
//! fetch keeps the cached keys. Without `jwks_url`, each fetch first reads
//! `{issuer}/.well-known/openid-configuration` (OpenID Connect Discovery 1.0), which must name
//! the configured issuer, and takes its `jwks_uri`.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use reqwest::Url;

use super::endpoint::read_capped;
pub use crate::config::model::{JwksSettings, KeySource};
use crate::metrics::{JwksFetch, Metrics};
use crate::sync::lock;

/// 9999-12-31T23:59:59Z: a later `exp` is read as this.
const LATEST_EXP: u64 = 253_402_300_799;

/// An unknown `kid` refetches the JWKS at most this often.
const REFETCH_EVERY: Duration = Duration::from_secs(30);

/// Why a token failed JWKS verification, or the keys could not be had. Never holds token
/// material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWT with a supported algorithm: {0}")]
    NotAJwt(String),
    #[error("{0:?} is refused: HMAC tokens cannot be verified with a public key")]
    Hmac(Algorithm),
    #[error("{0:?} is not in token.algorithms")]
    AlgorithmNotAllowed(Algorithm),
    #[error("no key {0:?} in the JWKS")]
    NoKey(Option<String>),
    #[error("unusable JWKS key: {0}")]
    UnusableKey(String),
    /// The signature or a claim (exp, nbf, iss, aud) did not check.
    #[error("refused: {0}")]
    Refused(String),
    #[error("no numeric exp")]
    NoExp,
    /// The JWKS or discovery document could not be fetched or read (what and why).
    #[error("{0}")]
    Keys(String),
}

struct Cached {
    keys: JwkSet,
    fetched_at: Instant,
}

/// The JWKS client and its cache.
pub struct Jwks {
    settings: JwksSettings,
    client: reqwest::Client,
    /// `token.max_response_bytes`.
    max_response: usize,
    metrics: std::sync::Arc<Metrics>,
    cached: Mutex<Option<Cached>>,
    /// The last refetch for an unknown `kid`.
    last_fetch: Mutex<Option<Instant>>,
    /// The JWKS URL last used (configured or discovered), for `/status`.
    url: Mutex<Option<Url>>,
}

impl Jwks {
    pub fn new(
        settings: JwksSettings,
        client: reqwest::Client,
        max_response: usize,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        Jwks {
            settings,
            client,
            max_response,
            metrics,
            cached: Mutex::new(None),
            last_fetch: Mutex::new(None),
            url: Mutex::new(None),
        }
    }

    /// Verifies `token`; returns its expiry (`exp`) or why it was refused (never token
    /// material).
    pub async fn verify(&self, token: &str) -> Result<SystemTime, JwksError> {
        self.verify_claims(token).await.map(|(exp, _)| exp)
    }

    /// [`Jwks::verify`], and the verified claims (for a workload token's `sub`).
    pub async fn verify_claims(
        &self,
        token: &str,
    ) -> Result<(SystemTime, serde_json::Value), JwksError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwksError::NotAJwt(e.to_string()))?;
        let alg = header.alg;
        if alg.family() == jsonwebtoken::AlgorithmFamily::Hmac {
            return Err(JwksError::Hmac(alg));
        }
        if !self.settings.algorithms.contains(&alg) {
            return Err(JwksError::AlgorithmNotAllowed(alg));
        }
        let jwk = match self.key(header.kid.as_deref(), false).await? {
            Some(jwk) => jwk,
            None => self
                .key(header.kid.as_deref(), true)
                .await?
                .ok_or_else(|| JwksError::NoKey(header.kid.clone()))?,
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| JwksError::UnusableKey(e.to_string()))?;
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &self.validation(alg))
            .map_err(|e| JwksError::Refused(e.to_string()))?
            .claims;
        let exp = claims["exp"].as_u64().ok_or(JwksError::NoExp)?;
        // Far-future values are taken as the latest time the clock can hold; the minter cuts
        // the lifetime to token.max_lifetime_seconds (an exp past year 9999 once panicked).
        let exp = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp.min(LATEST_EXP)))
            .unwrap_or(UNIX_EPOCH);
        Ok((exp, claims))
    }

    fn validation(&self, alg: Algorithm) -> jsonwebtoken::Validation {
        let s = &self.settings;
        let mut v = jsonwebtoken::Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = s.leeway.as_secs();
        v.validate_nbf = true;
        // A configured claim must be present, not only right when present.
        let mut required = vec!["exp"];
        if s.issuer.is_some() {
            required.push("iss");
        }
        if s.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        if let Some(iss) = &s.issuer {
            v.set_issuer(&[iss]);
        }
        match &s.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        v
    }

    /// The key for `kid` (or the only key), from the cache or a fetch. With `refetch`, fetch
    /// again unless that happened less than [`REFETCH_EVERY`] ago.
    async fn key(
        &self,
        kid: Option<&str>,
        refetch: bool,
    ) -> Result<Option<jsonwebtoken::jwk::Jwk>, JwksError> {
        let stale = lock(&self.cached)
            .as_ref()
            .is_none_or(|c| c.fetched_at.elapsed() >= self.settings.cache);
        // Only refetches for an unknown kid are rate-limited: the first after a rotation is
        // immediate however recently the cache was filled.
        let may_refetch = lock(&self.last_fetch).is_none_or(|t| t.elapsed() >= REFETCH_EVERY);
        if stale || (refetch && may_refetch) {
            if refetch {
                *lock(&self.last_fetch) = Some(Instant::now());
            }
            self.fetch().await.map_err(JwksError::Keys)?;
        }
        let cached = lock(&self.cached);
        let Some(c) = cached.as_ref() else {
            return Ok(None);
        };
        Ok(match kid {
            Some(kid) => c.keys.find(kid).cloned(),
            None if c.keys.keys.len() == 1 => c.keys.keys.first().cloned(),
            None => None,
        })
    }

    /// Fetches the JWKS; a failure keeps the cached keys (and is an error only without any).
    async fn fetch(&self) -> Result<(), String> {
        let fetched = async {
            let url = self.jwks_url().await?;
            *lock(&self.url) = Some(url.clone());
            let response = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| format!("cannot fetch the JWKS: {e}"))?;
            if !response.status().is_success() {
                return Err(format!(
                    "the JWKS answered HTTP {}",
                    response.status().as_u16()
                ));
            }
            let body = read_capped(response, self.max_response)
                .await
                .map_err(|e| format!("the JWKS: {e}"))?;
            serde_json::from_slice::<JwkSet>(&body)
                .map_err(|e| format!("the JWKS is not a JWK set: {e}"))
        }
        .await;
        let outcome = if fetched.is_ok() {
            JwksFetch::Success
        } else {
            JwksFetch::Failed
        };
        self.metrics.jwks_fetches_total.inc(outcome);
        match fetched {
            Ok(keys) => {
                self.metrics.jwks_keys.set(keys.keys.len() as i64);
                *lock(&self.cached) = Some(Cached {
                    keys,
                    fetched_at: Instant::now(),
                });
                Ok(())
            }
            Err(e) if lock(&self.cached).is_some() => {
                tracing::warn!(error = %e, "JWKS fetch failed; keeping the cached keys");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The JWKS URL: configured, or read from the issuer's discovery document.
    async fn jwks_url(&self) -> Result<Url, String> {
        let doc_url = match &self.settings.keys {
            KeySource::Url(url) => return Ok(url.clone()),
            KeySource::Discover(doc_url) => doc_url,
        };
        let response = self
            .client
            .get(doc_url.clone())
            .send()
            .await
            .map_err(|e| format!("cannot fetch {doc_url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!(
                "{doc_url} answered HTTP {}",
                response.status().as_u16()
            ));
        }
        let body = read_capped(response, self.max_response)
            .await
            .map_err(|e| format!("{doc_url}: {e}"))?;
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("{doc_url} is not a JSON document: {e}"))?;
        // OpenID Connect Discovery 1.0 §4.3: the document must name the issuer it was asked for.
        let named = doc["issuer"].as_str().unwrap_or_default();
        if let Some(issuer) = &self.settings.issuer {
            if named != issuer {
                return Err(format!(
                    "{doc_url} names issuer {named:?}, not token.issuer {issuer:?}"
                ));
            }
        }
        let jwks_uri = doc["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{doc_url} has no jwks_uri"))?;
        crate::config::value::parse_url(jwks_uri).map_err(|m| format!("{doc_url}: jwks_uri: {m}"))
    }

    /// Key ids, the cache's age and the JWKS URL, for `/status`.
    pub fn view(&self) -> (Vec<String>, Option<Duration>, Option<Url>) {
        let url = lock(&self.url).clone();
        let cached = lock(&self.cached);
        match cached.as_ref() {
            None => (Vec::new(), None, url),
            Some(c) => (
                c.keys
                    .keys
                    .iter()
                    .filter_map(|k| k.common.key_id.clone())
                    .collect(),
                Some(c.fetched_at.elapsed()),
                url,
            ),
        }
    }
}
