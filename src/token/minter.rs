//! The [`Minter`]: one validated token from one secret. Used by every refresh and every
//! rotation attempt alike, so minting, validation, the per-minute cap on token requests and the
//! mint metrics are written once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use serde_json::json;

use super::endpoint::{MintError, Minted, TokenEndpoint};
use super::store::{Token, TokenSource};
use crate::audit::{AuditEvent, AuditLog};
use crate::config::{Live, Validation};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::telemetry;

const MINUTE: Duration = Duration::from_secs(60);

/// Mints and validates tokens; counts every token request against the per-minute cap.
pub struct Minter {
    /// The credential's name (in spans).
    credential: String,
    endpoint: TokenEndpoint,
    /// With `validation = "jwks"`.
    jwks: Option<Arc<super::jwks::Jwks>>,
    live: Arc<ArcSwap<Live>>,
    metrics: Arc<Metrics>,
    audit: Arc<AuditLog>,
    /// When each token request of the last minute was sent.
    recent: VecDeque<Instant>,
}

impl Minter {
    pub fn new(
        credential: String,
        endpoint: TokenEndpoint,
        jwks: Option<Arc<super::jwks::Jwks>>,
        live: Arc<ArcSwap<Live>>,
        metrics: Arc<Metrics>,
        audit: Arc<AuditLog>,
    ) -> Self {
        Minter {
            credential,
            endpoint,
            jwks,
            live,
            metrics,
            audit,
            recent: VecDeque::new(),
        }
    }

    /// `None` while another token request fits under `token.max_token_requests_per_minute`;
    /// otherwise the instant the cap frees.
    pub fn cap_free_at(&self, now: Instant) -> Option<Instant> {
        let cap = self.live.load().token.max_token_requests_per_minute as usize;
        let in_window: Vec<Instant> = self
            .recent
            .iter()
            .copied()
            .filter(|t| now.duration_since(*t) < MINUTE)
            .collect();
        (in_window.len() >= cap).then(|| in_window[in_window.len() - cap] + MINUTE)
    }

    /// Runs the grant with `secret`, validates the token (per `token.validation`) and builds
    /// it as `generation` for pool `slot`. Every outcome is counted in `token_requests_total`.
    pub async fn mint(
        &mut self,
        client_id: &str,
        secret: &Secret,
        generation: u64,
        slot: usize,
        source: TokenSource,
    ) -> Result<Token, MintError> {
        let started = Instant::now();
        self.note_request(started);
        let jwt = self.live.load().token.validation == Validation::Jwks;
        let span = telemetry::start(
            "POST oauth/token",
            SpanKind::Client,
            vec![
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("url.full", self.endpoint.token_url().to_string()),
                KeyValue::new("genesys.credential", self.credential.clone()),
                KeyValue::new("genesys.token.slot", slot as i64),
                KeyValue::new("genesys.token.generation", generation as i64),
                KeyValue::new("genesys.secret.fingerprint", secret.fingerprint()),
            ],
        );
        let minted = telemetry::within(&span, self.endpoint.mint(client_id, secret)).await;
        let result = match minted {
            // Only a verified JWT's exp can stand in for a missing expires_in.
            Ok(m) if m.expires_in.is_none() && !jwt => Err(MintError::InvalidResponse(
                "no expires_in (and validation is not \"jwks\", so no exp to go by)".into(),
            )),
            other => other,
        };
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        self.metrics
            .token_requests_total
            .with_label_values(&[outcome])
            .inc();
        telemetry::end(
            span,
            match &result {
                Ok(m) => Ok(vec![KeyValue::new(
                    "genesys.token.fingerprint",
                    m.access_token.fingerprint(),
                )]),
                Err(_) => Err(outcome.to_string()),
            },
        );
        let minted = result?;
        let (exp, idles_after) = self.validate(&minted).await?;
        let max = self.live.load().token.max_lifetime;
        let issued = lifetime(&minted, exp, Duration::MAX)?;
        let mut token = Token::from_secret(
            &minted.access_token,
            issued.min(max),
            generation,
            slot,
            started,
            source,
        )?;
        token.idles_after = idles_after;
        if issued > max {
            token.clamped_from = Some(issued);
            tracing::warn!(
                issued_seconds = issued.as_secs(),
                max_seconds = max.as_secs(),
                fingerprint = %token.fingerprint,
                "the issuer's token lifetime is longer than token.max_lifetime_seconds; refreshing as if it were that"
            );
        }
        Ok(token)
    }

    /// Asks Genesys whether a held token is still accepted (one API call, no token request).
    pub async fn still_accepted(&self, token: &Token) -> bool {
        self.endpoint.still_accepted(&token.header).await
    }

    fn note_request(&mut self, at: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|t| at.duration_since(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
    }

    /// Checks a new token per `token.validation`; a JWT's `exp` comes back with it, and
    /// `tokens/me`'s `dateTokenIdles` as the time until the fresh token idles out.
    async fn validate(&self, minted: &Minted) -> Result<Validated, MintError> {
        let validation = self.live.load().token.validation;
        let span = match validation {
            Validation::None => None,
            Validation::TokensMe => telemetry::start(
                "GET /api/v2/tokens/me",
                SpanKind::Client,
                vec![
                    KeyValue::new("http.request.method", "GET"),
                    KeyValue::new("genesys.credential", self.credential.clone()),
                    KeyValue::new(
                        "genesys.token.fingerprint",
                        minted.access_token.fingerprint(),
                    ),
                ],
            ),
            Validation::Jwks => telemetry::start(
                "token jwks verification",
                SpanKind::Internal,
                vec![
                    KeyValue::new("genesys.credential", self.credential.clone()),
                    KeyValue::new(
                        "genesys.token.fingerprint",
                        minted.access_token.fingerprint(),
                    ),
                ],
            ),
        };
        let result = telemetry::within(&span, self.check(validation, minted)).await;
        telemetry::end(
            span,
            match &result {
                Ok(_) => Ok(Vec::new()),
                Err(e) => Err(e.outcome().to_string()),
            },
        );
        if let Err(e) = &result {
            self.metrics
                .token_requests_total
                .with_label_values(&["validation_failed"])
                .inc();
            self.audit.record(
                AuditEvent::TokenValidationFailed,
                json!({"error": e.to_string()}),
                Some(&minted.access_token.fingerprint()),
            );
        }
        result
    }

    async fn check(&self, validation: Validation, minted: &Minted) -> Result<Validated, MintError> {
        match (validation, &self.jwks) {
            (Validation::None, _) => Ok((None, None)),
            (Validation::TokensMe, _) => self
                .endpoint
                .validate(&minted.access_token)
                .await
                .map(|idles| (None, idles)),
            (Validation::Jwks, Some(jwks)) => jwks
                .verify(minted.access_token.expose())
                .await
                .map(|exp| (Some(exp), None))
                .map_err(|e| MintError::ValidationFailed(e.to_string())),
            (Validation::Jwks, None) => Err(MintError::ValidationFailed(
                "validation = \"jwks\" needs token.jwks_url, which only applies after a restart"
                    .into(),
            )),
        }
    }
}

/// What a validation learned: a verified JWT's `exp`, and when a fresh token idles out.
type Validated = (Option<SystemTime>, Option<Duration>);

/// How long a token lives: the earlier of `expires_in` and a verified JWT's `exp`, at most
/// `max` (`token.max_lifetime_seconds`: an issuer's `expires_in = 1e300` or an `exp` in the
/// year 5138 would otherwise never be refreshed proactively).
pub fn lifetime(
    minted: &Minted,
    exp: Option<SystemTime>,
    max: Duration,
) -> Result<Duration, MintError> {
    let left = exp.map(|exp| exp.duration_since(SystemTime::now()).unwrap_or_default());
    let life = match (minted.expires_in, left) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a
            .or(b)
            .ok_or_else(|| MintError::InvalidResponse("no expires_in and no exp".into()))?,
    };
    Ok(life.min(max))
}
