//! The [`Reporter`]: how the refresher's outcomes are recorded — metrics, audit events, the
//! `/status` view and the anomaly detector. The refresher decides and acts; it calls the
//! reporter, never the reverse.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::endpoint::MintError;
use super::schedule::Reason;
use super::store::{Token, TokenSource, TokenStore};
use crate::anomaly::{AnomalyMonitor, Kind};
use crate::audit::{AuditEvent, AuditLog};
use crate::metrics::Metrics;
use crate::sync::lock;

/// What `/status` shows about refreshing.
#[derive(Debug, Clone, Default)]
pub struct RefreshInfo {
    pub last_refresh: Option<SystemTime>,
    pub refresh_count: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// A rotation waiting for its (next) attempt.
    pub pending_rotation: Option<PendingRotationView>,
    pub last_rotation_error: Option<String>,
    /// Times the refresher's loop panicked and was resumed, and the last panic's message.
    pub refresher_panics: u32,
    pub last_refresher_panic: Option<String>,
}

/// A pending rotation, as `/status` shows it.
#[derive(Debug, Clone)]
pub struct PendingRotationView {
    /// The new secret's fingerprint.
    pub new_secret: String,
    pub next_attempt: SystemTime,
    pub retry_until: SystemTime,
}

/// Where the refresher's outcomes go.
pub struct Reporter {
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    pub anomaly: Arc<AnomalyMonitor>,
    pub info: Arc<Mutex<RefreshInfo>>,
}

/// A failed rotation attempt, as reported.
pub struct RotationFailure<'a> {
    pub new_secret: &'a str,
    pub error: &'a MintError,
    pub attempt: u32,
    pub retry_in: Duration,
    pub retry_until: SystemTime,
    pub held: Option<&'a Token>,
}

impl Reporter {
    fn info(&self) -> std::sync::MutexGuard<'_, RefreshInfo> {
        lock(&self.info)
    }

    /// A token is about to be published.
    pub fn acquired(&self, token: &Token, reason: Reason, started: Instant) {
        let (source, generation) = (token.source, token.generation);
        let m = &self.metrics;
        m.token_refresh_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        m.token_fallback_active
            .set(i64::from(source == TokenSource::Previous));
        {
            let mut info = self.info();
            info.last_refresh = Some(SystemTime::now());
            info.refresh_count += 1;
            info.consecutive_failures = 0;
            info.last_error = None;
        }
        if source == TokenSource::Previous {
            self.audit.record(
                AuditEvent::FallbackToPreviousSecret,
                json!({"generation": generation, "reason": "current secret refused (invalid_client)"}),
                Some(&token.fingerprint),
            );
        }
        let expires_in = token.lifetime.as_secs();
        self.audit.record(
            AuditEvent::TokenAcquired,
            json!({
                "generation": generation,
                "expires_in_seconds": expires_in,
                "source": source.as_str(),
                "reason": reason.as_str(),
            }),
            Some(&token.fingerprint),
        );
        tracing::info!(generation, fingerprint = %token.fingerprint, expires_in_seconds = expires_in, source = source.as_str(), reason = reason.as_str(), "token acquired");
    }

    /// After a publish: the expiry metric shows the pool's earliest expiry (the token that
    /// needs a refresh first).
    pub fn published(&self, store: &TokenStore) {
        let earliest = (0..store.slots())
            .filter_map(|slot| store.slot(slot))
            .map(|t| t.expires_at_wall)
            .min();
        if let Some(at) = earliest {
            let unix = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            self.metrics
                .token_expiry_timestamp_seconds
                .set(unix.as_secs_f64());
        }
    }

    /// A request reported the held token refused by the API, `age` after it was minted.
    pub fn rejected(&self, token: &Token, age: Duration) {
        self.anomaly.token_rejected(age);
        self.audit.record(
            AuditEvent::TokenRejectedUpstream,
            json!({"generation": token.generation, "age_seconds": age.as_secs()}),
            Some(&token.fingerprint),
        );
    }

    /// A normal refresh failed; the next try is in `delay`.
    pub fn refresh_failed(
        &self,
        e: &MintError,
        failures: u32,
        delay: Duration,
        held: Option<&Token>,
    ) {
        self.observe_failure(e);
        {
            let mut info = self.info();
            info.consecutive_failures = failures;
            info.last_error = Some(e.to_string());
        }
        let still_valid = held.is_some_and(|t| t.is_valid_at(Instant::now()));
        let event = match e {
            MintError::RateLimited => AuditEvent::TokenRateLimited,
            _ => AuditEvent::TokenRefreshFailed,
        };
        let retry_in_ms = delay.as_millis() as u64;
        self.audit.record(
            event,
            json!({
                "outcome": e.outcome(),
                "error": e.to_string(),
                "consecutive_failures": failures,
                "retry_in_ms": retry_in_ms,
                "current_token_still_valid": still_valid,
            }),
            held.map(|t| t.fingerprint.as_str()),
        );
        tracing::warn!(outcome = e.outcome(), error = %e, consecutive_failures = failures, retry_in_ms, current_token_still_valid = still_valid, "token refresh failed");
    }

    /// Feeds the anomaly detector with one failed token call.
    fn observe_failure(&self, e: &MintError) {
        self.anomaly.observe(Kind::RefreshFailures);
        match e {
            MintError::InvalidClient => self.anomaly.observe(Kind::InvalidClient),
            MintError::RateLimited => self.anomaly.observe(Kind::RateLimitStorm),
            _ => {}
        }
    }

    /// The new secret validated; `token` is its first token.
    pub fn rotated(&self, old_secret: &str, new_secret: &str, token: &Token) {
        self.metrics
            .secret_rotations_total
            .with_label_values(&["success"])
            .inc();
        self.audit.record(
            AuditEvent::SecretRotated,
            json!({"generation": token.generation, "old_secret": old_secret, "new_secret": new_secret}),
            Some(&token.fingerprint),
        );
        self.rotation_settled();
        tracing::info!(generation = token.generation, new_secret_fingerprint = %new_secret, "client secret rotated");
    }

    /// A rotation attempt failed and will be retried.
    pub fn rotation_failed(&self, f: RotationFailure) {
        self.metrics
            .secret_rotations_total
            .with_label_values(&["failed"])
            .inc();
        // A refused or throttled new secret is as telling as on a normal refresh.
        if matches!(f.error, MintError::InvalidClient | MintError::RateLimited) {
            self.observe_failure(f.error);
        }
        self.audit.record(
            AuditEvent::SecretRotationFailed,
            json!({
                "new_secret": f.new_secret,
                "outcome": f.error.outcome(),
                "error": f.error.to_string(),
                "attempt": f.attempt,
                "retry_in_ms": f.retry_in.as_millis() as u64,
                "retry_until": humantime::format_rfc3339_seconds(f.retry_until).to_string(),
            }),
            f.held.map(|t| t.fingerprint.as_str()),
        );
        {
            let mut info = self.info();
            info.pending_rotation = Some(PendingRotationView {
                new_secret: f.new_secret.to_string(),
                next_attempt: SystemTime::now() + f.retry_in,
                retry_until: f.retry_until,
            });
            info.last_rotation_error = Some(f.error.to_string());
        }
        let next_attempt = humantime::format_rfc3339_seconds(SystemTime::now() + f.retry_in);
        tracing::warn!(new_secret_fingerprint = %f.new_secret, error = %f.error, attempt = f.attempt, retry_in_ms = f.retry_in.as_millis() as u64, %next_attempt, "secret rotation failed; keeping the current secret and retrying");
    }

    /// A rotation waits for its attempt (the token-request cap, a working token first, or its
    /// backoff).
    pub fn rotation_pending(&self, new_secret: &str, next_attempt: SystemTime, until: SystemTime) {
        self.info().pending_rotation = Some(PendingRotationView {
            new_secret: new_secret.to_string(),
            next_attempt,
            retry_until: until,
        });
    }

    /// The retry window closed without the new secret validating.
    pub fn rotation_abandoned(&self, new_secret: &str) {
        self.audit.record(
            AuditEvent::SecretRotationFailed,
            json!({"final": true, "new_secret": new_secret, "reason": "retry window over; keeping the current secret"}),
            None,
        );
        self.info().pending_rotation = None;
    }

    /// The refresher's loop panicked; it resumes after a pause.
    pub fn refresher_panicked(&self, panics: u32, what: &str) {
        {
            let mut info = self.info();
            info.refresher_panics = panics;
            info.last_refresher_panic = Some(what.to_string());
        }
        self.audit.record(
            AuditEvent::TokenRefreshFailed,
            json!({"outcome": "refresher_panicked", "error": what, "panics": panics}),
            None,
        );
        tracing::error!(panics, error = %what, "the token refresher panicked (a bug); resuming it");
    }

    /// No rotation is pending any more.
    pub fn rotation_settled(&self) {
        let mut info = self.info();
        info.pending_rotation = None;
        info.last_rotation_error = None;
    }
}
