//! The refresher: the only code that calls the token endpoint, so single-flight holds by
//! construction. It sleeps until the proactive refresh time, a request reporting a 401 for the
//! current generation, or a command (secret rotation); mints (falling back to the previous
//! secret on `invalid_client`), validates, publishes, and backs off with jitter on failure
//! without ever giving up for good. While refreshes fail, the current token keeps serving until
//! it expires.
//!
//! Rotation ([`Command::Rotate`]): mint and validate with the new secret *before* anything is
//! swapped. Success swaps credentials and token atomically and keeps the old token as fallback
//! until it expires; failure keeps everything as it was and retries with backoff for the
//! configured window (the new secret may not be active at Genesys yet).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::endpoint::{MintError, Minted, TokenEndpoint};
use super::schedule::{backoff, refresh_delay, FailureClass};
use super::secret::Secret;
use super::store::{Token, TokenSource, TokenStore};
use crate::anomaly::{AnomalyMonitor, Kind};
use crate::audit::AuditLog;
use crate::config::{TokenSettings, Validation};
use crate::metrics::Metrics;
use crate::sync::lock;

/// What `/status` shows about refreshing.
#[derive(Debug, Clone, Default)]
pub struct RefreshInfo {
    pub last_refresh: Option<SystemTime>,
    pub refresh_count: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// A rotation that failed and is being retried: (new secret fingerprint, retry until).
    pub pending_rotation: Option<(String, SystemTime)>,
    pub last_rotation_error: Option<String>,
}

/// Credentials the refresher mints with.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    pub client_id: String,
    pub secret: Secret,
    pub previous: Option<Secret>,
}

/// Requests to the refresher from the reload path.
pub enum Command {
    /// Switch to new credentials once a token minted with them validates.
    Rotate {
        credentials: Credentials,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Change only the previous (fallback) secret.
    SetPrevious(Option<Secret>),
}

pub struct Refresher {
    pub store: Arc<TokenStore>,
    pub endpoint: TokenEndpoint,
    pub credentials: Credentials,
    pub settings: Arc<ArcSwap<TokenSettings>>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    pub info: Arc<Mutex<RefreshInfo>>,
    pub commands: mpsc::Receiver<Command>,
    pub anomaly: Arc<AnomalyMonitor>,
}

/// Why the refresher is about to mint.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reason {
    Initial,
    Proactive,
    Rejected,
    Expired,
    Rotation,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Proactive => "proactive",
            Reason::Rejected => "rejected_upstream",
            Reason::Expired => "expired",
            Reason::Rotation => "rotation",
        }
    }
}

/// A rotation that failed and is retried until `deadline`.
pub(super) struct PendingRotation {
    pub(super) credentials: Credentials,
    pub(super) deadline: Instant,
    pub(super) next_try: Instant,
    pub(super) failures: u32,
}

/// The refresher's private, mutable state.
pub(super) struct Loop {
    pub(super) failures: u32,
    pub(super) recent: VecDeque<Instant>,
    pub(super) refresh_at: Option<(u64, Instant)>,
    pub(super) reported_rejection: u64,
    pub(super) pending: Option<PendingRotation>,
    /// When the normal path may mint again after a failure.
    pub(super) backoff_until: Option<Instant>,
}

pub(super) const MINUTE: Duration = Duration::from_secs(60);

impl Refresher {
    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut st = Loop {
            failures: 0,
            recent: VecDeque::new(),
            refresh_at: None,
            reported_rejection: 0,
            pending: None,
            backoff_until: None,
        };
        loop {
            if *shutdown.borrow() {
                return;
            }
            while let Ok(cmd) = self.commands.try_recv() {
                self.handle(cmd, &mut st).await;
            }
            let now = Instant::now();
            if let Some((deadline, next_try, creds)) = st
                .pending
                .as_ref()
                .map(|p| (p.deadline, p.next_try, p.credentials.clone()))
            {
                if now >= deadline {
                    let fp = creds.secret.fingerprint();
                    self.audit.record("SECRET_ROTATION_FAILED", json!({"final": true, "new_secret": fp, "reason": "retry window over; keeping the current secret"}), None);
                    self.info().pending_rotation = None;
                    st.pending = None;
                } else if now >= next_try && self.under_cap(&mut st, now) {
                    let _ = self.try_rotate(creds, &mut st).await;
                    continue;
                }
            }
            let settings = self.settings.load_full();
            let reason = self.due(&mut st, now, &settings);
            let wake = match reason {
                Some(_) if st.backoff_until.is_some_and(|t| now < t) => st.backoff_until,
                Some(_) if !self.under_cap(&mut st, now) => st.recent.front().map(|t| *t + MINUTE),
                Some(reason) => {
                    self.refresh(reason, &mut st, &settings).await;
                    continue;
                }
                None => st.refresh_at.map(|(_, at)| at),
            };
            let wake = [
                wake,
                st.pending.as_ref().map(|p| p.next_try.min(p.deadline)),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = self.store.woken() => {}
                cmd = self.commands.recv() => if let Some(cmd) = cmd { self.handle(cmd, &mut st).await },
                _ = shutdown.changed() => return,
            }
        }
    }

    pub(super) fn info(&self) -> std::sync::MutexGuard<'_, RefreshInfo> {
        lock(&self.info)
    }

    /// Is a mint due now, and why?
    fn due(&self, st: &mut Loop, now: Instant, settings: &TokenSettings) -> Option<Reason> {
        let current = self.store.current();
        match &current {
            None => Some(Reason::Initial),
            Some(t) if self.store.rejected_generation() >= t.generation => {
                if st.reported_rejection < t.generation {
                    st.reported_rejection = t.generation;
                    // A 401 for a fresh token is news; it also clears any backoff: the token
                    // we hold is dead, waiting helps nobody.
                    st.backoff_until = None;
                    self.anomaly
                        .token_rejected(now.duration_since(t.acquired_at));
                    self.audit.record(
                        "TOKEN_REJECTED_UPSTREAM",
                        json!({"generation": t.generation, "age_seconds": now.duration_since(t.acquired_at).as_secs()}),
                        Some(&t.fingerprint),
                    );
                }
                Some(Reason::Rejected)
            }
            Some(t) if !t.is_valid_at(now) => Some(Reason::Expired),
            Some(t) => match st.refresh_at {
                Some((g, at)) if g == t.generation && now < at => None,
                Some((g, _)) if g == t.generation => Some(Reason::Proactive),
                _ => {
                    let at = t.acquired_at
                        + refresh_delay(t.lifetime, settings.refresh_before_expiry, rand::random());
                    st.refresh_at = Some((t.generation, at));
                    (now >= at).then_some(Reason::Proactive)
                }
            },
        }
    }

    /// The client-side cap on token requests per minute.
    pub(super) fn under_cap(&self, st: &mut Loop, now: Instant) -> bool {
        while st
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            st.recent.pop_front();
        }
        let cap = self.settings.load().max_token_requests_per_minute as usize;
        if st.recent.len() >= cap {
            tracing::warn!(cap, "token request cap reached; waiting");
            return false;
        }
        true
    }

    /// A normal refresh: current secret, then previous on `invalid_client`.
    async fn refresh(&mut self, reason: Reason, st: &mut Loop, settings: &TokenSettings) {
        let started = Instant::now();
        let generation = self.store.generation() + 1;
        let current = self.store.current();
        st.recent.push_back(started);
        let client_id = self.credentials.client_id.clone();
        let mut result = self
            .mint_counted(&client_id, &self.credentials.secret)
            .await
            .map(|m| (m, TokenSource::Current));
        if let (Err(MintError::InvalidClient), Some(previous)) =
            (&result, self.credentials.previous.clone())
        {
            st.recent.push_back(Instant::now());
            result = self
                .mint_counted(&client_id, &previous)
                .await
                .map(|m| (m, TokenSource::Previous));
        }
        let result = match result {
            Ok((minted, source)) => match self.validate(&minted, settings).await {
                Ok(()) => build_token(&minted, generation, started, source).map(|t| (minted, t)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok((minted, token)) => {
                st.failures = 0;
                st.backoff_until = None;
                self.metrics
                    .token_refresh_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                if token.source == TokenSource::Previous {
                    self.audit.record(
                        "FALLBACK_TO_PREVIOUS_SECRET",
                        json!({"generation": generation, "reason": "current secret refused (invalid_client)"}),
                        Some(&token.fingerprint),
                    );
                }
                self.accept(token, &minted, reason);
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let delay = backoff(
                    st.failures,
                    failure_class(&e),
                    settings.backoff_initial,
                    settings.backoff_max,
                    rand::random(),
                );
                st.backoff_until = Some(Instant::now() + delay);
                self.note_failure(&e, st.failures, delay, current.as_deref());
            }
        }
    }

    pub(super) async fn validate(
        &self,
        minted: &Minted,
        settings: &TokenSettings,
    ) -> Result<(), MintError> {
        if settings.validation != Validation::TokensMe {
            return Ok(());
        }
        let result = self.endpoint.validate(&minted.access_token).await;
        if let Err(e) = &result {
            self.metrics
                .token_requests_total
                .with_label_values(&["validation_failed"])
                .inc();
            self.audit.record(
                "TOKEN_VALIDATION_FAILED",
                json!({"error": e.to_string()}),
                Some(&minted.access_token.fingerprint()),
            );
        }
        result
    }

    /// Publishes a validated token and records it everywhere.
    pub(super) fn accept(&self, token: Token, minted: &Minted, reason: Reason) {
        let source = token.source;
        let generation = token.generation;
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
            let mut info = self.info();
            info.last_refresh = Some(SystemTime::now());
            info.refresh_count += 1;
            info.consecutive_failures = 0;
            info.last_error = None;
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
        if matches!(reason, Reason::Rotation) {
            let window = self.settings.load().rotation_retry_window;
            self.store.publish_rotated(token, window);
        } else {
            self.store.publish(token);
        }
    }

    pub(super) async fn mint_counted(
        &self,
        client_id: &str,
        secret: &Secret,
    ) -> Result<Minted, MintError> {
        let result = self.endpoint.mint(client_id, secret).await;
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
        self.observe_failure(e);
        {
            let mut info = self.info();
            info.consecutive_failures = failures;
            info.last_error = Some(e.to_string());
        }
        let still_valid = current.is_some_and(|t| t.is_valid_at(Instant::now()));
        let event = match e {
            MintError::RateLimited => "TOKEN_RATE_LIMITED",
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

impl Refresher {
    /// Feeds the anomaly detector with one failed token call.
    pub(super) fn observe_failure(&self, e: &MintError) {
        self.anomaly.observe(Kind::RefreshFailures);
        match e {
            MintError::InvalidClient => self.anomaly.observe(Kind::InvalidClient),
            MintError::RateLimited => self.anomaly.observe(Kind::RateLimitStorm),
            _ => {}
        }
    }
}

pub(super) fn failure_class(e: &MintError) -> FailureClass {
    match e {
        MintError::InvalidClient | MintError::RateLimited => FailureClass::Harsh,
        _ => FailureClass::Transient,
    }
}

pub(super) fn build_token(
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
