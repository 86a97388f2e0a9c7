//! The refresher: the only code that calls the token endpoint, so single-flight holds by
//! construction. It sleeps until the proactive refresh time or until a request reports a 401
//! for the current generation, mints (falling back to the previous secret on
//! `invalid_client`), validates, publishes, and backs off with jitter on failure without ever
//! giving up for good. While refreshes fail, the current token keeps serving until it expires.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::watch;

use super::endpoint::{MintError, Minted, TokenEndpoint};
use super::schedule::{backoff, refresh_delay, FailureClass};
use super::secret::Secret;
use super::store::{Token, TokenSource, TokenStore};
use crate::audit::AuditLog;
use crate::config::{TokenSettings, Validation};
use crate::metrics::Metrics;

/// What `/status` shows about refreshing.
#[derive(Debug, Clone, Default)]
pub struct RefreshInfo {
    pub last_refresh: Option<SystemTime>,
    pub refresh_count: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// Credentials the refresher mints with.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub client_id: String,
    pub secret: Secret,
    pub previous: Option<Secret>,
}

pub struct Refresher {
    pub store: Arc<TokenStore>,
    pub endpoint: TokenEndpoint,
    pub credentials: Credentials,
    pub settings: TokenSettings,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    pub info: Arc<Mutex<RefreshInfo>>,
}

/// Why the refresher is about to mint.
#[derive(Debug, Clone, Copy)]
enum Reason {
    Initial,
    Proactive,
    Rejected,
    Expired,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Proactive => "proactive",
            Reason::Rejected => "rejected_upstream",
            Reason::Expired => "expired",
        }
    }
}

impl Refresher {
    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        let mut recent: VecDeque<Instant> = VecDeque::new();
        let mut refresh_at: Option<(u64, Instant)> = None;
        let mut reported_rejection = 0u64;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now = Instant::now();
            let current = self.store.current();
            let reason = match &current {
                None => Some(Reason::Initial),
                Some(t) if self.store.rejected_generation() >= t.generation => {
                    if reported_rejection < t.generation {
                        reported_rejection = t.generation;
                        self.audit.record(
                            "TOKEN_REJECTED_UPSTREAM",
                            json!({"generation": t.generation, "age_seconds": now.duration_since(t.acquired_at).as_secs()}),
                            Some(&t.fingerprint),
                        );
                    }
                    Some(Reason::Rejected)
                }
                Some(t) if !t.is_valid_at(now) => Some(Reason::Expired),
                Some(t) => match refresh_at {
                    Some((g, at)) if g == t.generation && now < at => None,
                    Some((g, _)) if g == t.generation => Some(Reason::Proactive),
                    _ => {
                        let at = t.acquired_at
                            + refresh_delay(
                                t.lifetime,
                                self.settings.refresh_before_expiry,
                                rand::random(),
                            );
                        refresh_at = Some((t.generation, at));
                        continue;
                    }
                },
            };
            let Some(reason) = reason else {
                let (_, at) = refresh_at.unwrap_or((0, now));
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = self.store.woken() => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            };

            // Client-side cap on token requests per minute.
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
            {
                recent.pop_front();
            }
            if recent.len() >= self.settings.max_token_requests_per_minute as usize {
                let until = recent[0] + Duration::from_secs(60);
                tracing::warn!(
                    cap = self.settings.max_token_requests_per_minute,
                    "token request cap reached; waiting"
                );
                tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }

            let started = Instant::now();
            let generation = self.store.generation() + 1;
            match self.refresh_once(&mut recent, generation, reason).await {
                Ok(token) => {
                    failures = 0;
                    self.metrics
                        .token_refresh_duration_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.store.publish(token);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let class = match e {
                        MintError::InvalidClient | MintError::RateLimited => FailureClass::Harsh,
                        _ => FailureClass::Transient,
                    };
                    let delay = backoff(
                        failures,
                        class,
                        self.settings.backoff_initial,
                        self.settings.backoff_max,
                        rand::random(),
                    );
                    self.note_failure(&e, failures, delay, current.as_deref());
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Mints (current secret, then previous on `invalid_client`), validates, and builds the
    /// record to publish.
    async fn refresh_once(
        &self,
        recent: &mut VecDeque<Instant>,
        generation: u64,
        reason: Reason,
    ) -> Result<Token, MintError> {
        let creds = &self.credentials;
        // Expiry counts from before the request: Genesys starts the clock when it issues.
        let requested_at = Instant::now();
        recent.push_back(requested_at);
        let mut result = self
            .mint_counted(&creds.secret)
            .await
            .map(|m| (m, TokenSource::Current));
        if let (Err(MintError::InvalidClient), Some(previous)) = (&result, &creds.previous) {
            recent.push_back(Instant::now());
            result = self
                .mint_counted(previous)
                .await
                .map(|m| (m, TokenSource::Previous));
        }
        let (minted, source) = result?;
        let acquired_at = requested_at;
        if self.settings.validation == Validation::TokensMe {
            if let Err(e) = self.endpoint.validate(&minted.access_token).await {
                self.metrics
                    .token_requests_total
                    .with_label_values(&["validation_failed"])
                    .inc();
                self.audit.record(
                    "TOKEN_VALIDATION_FAILED",
                    json!({"error": e.to_string()}),
                    Some(&minted.access_token.fingerprint()),
                );
                return Err(e);
            }
        }
        let token = build_token(&minted, generation, acquired_at, source)?;
        self.metrics.token_expiry_timestamp_seconds.set(
            token
                .expires_at_wall
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.metrics
            .token_fallback_active
            .set(i64::from(source == TokenSource::Previous));
        {
            let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
            info.last_refresh = Some(SystemTime::now());
            info.refresh_count += 1;
            info.consecutive_failures = 0;
            info.last_error = None;
        }
        if source == TokenSource::Previous {
            self.audit.record(
                "FALLBACK_TO_PREVIOUS_SECRET",
                json!({"generation": generation, "reason": "current secret refused (invalid_client)"}),
                Some(&token.fingerprint),
            );
        }
        self.audit.record(
            "TOKEN_ACQUIRED",
            json!({
                "generation": generation,
                "expires_in_seconds": minted.expires_in.as_secs(),
                "source": source.as_str(),
                "reason": reason.as_str(),
            }),
            Some(&token.fingerprint),
        );
        tracing::info!(generation, fingerprint = %token.fingerprint, expires_in_seconds = minted.expires_in.as_secs(), source = source.as_str(), reason = reason.as_str(), "token acquired");
        Ok(token)
    }

    async fn mint_counted(&self, secret: &Secret) -> Result<Minted, MintError> {
        let result = self
            .endpoint
            .mint(&self.credentials.client_id, secret)
            .await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        self.metrics
            .token_requests_total
            .with_label_values(&[outcome])
            .inc();
        result
    }

    fn note_failure(&self, e: &MintError, failures: u32, delay: Duration, current: Option<&Token>) {
        {
            let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
            info.consecutive_failures = failures;
            info.last_error = Some(e.to_string());
        }
        let still_valid = current.is_some_and(|t| t.is_valid_at(Instant::now()));
        let event = match e {
            MintError::RateLimited => "TOKEN_RATE_LIMITED",
            MintError::ValidationFailed(_) => "TOKEN_REFRESH_FAILED",
            _ => "TOKEN_REFRESH_FAILED",
        };
        self.audit.record(
            event,
            json!({
                "outcome": e.outcome(),
                "error": e.to_string(),
                "consecutive_failures": failures,
                "retry_in_ms": delay.as_millis() as u64,
                "current_token_still_valid": still_valid,
            }),
            current.map(|t| t.fingerprint.as_str()),
        );
        tracing::warn!(outcome = e.outcome(), error = %e, consecutive_failures = failures, retry_in_ms = delay.as_millis() as u64, current_token_still_valid = still_valid, "token refresh failed");
    }
}

fn build_token(
    minted: &Minted,
    generation: u64,
    acquired_at: Instant,
    source: TokenSource,
) -> Result<Token, MintError> {
    let mut header =
        http::HeaderValue::from_str(&format!("Bearer {}", minted.access_token.expose()))
            .map_err(|_| MintError::InvalidResponse("token is not a valid header value".into()))?;
    header.set_sensitive(true);
    Ok(Token {
        header,
        fingerprint: minted.access_token.fingerprint(),
        generation,
        acquired_at,
        expires_at: acquired_at + minted.expires_in,
        expires_at_wall: SystemTime::now() + minted.expires_in,
        lifetime: minted.expires_in,
        source,
    })
}
