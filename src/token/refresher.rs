//! The refresher: the only code that calls the token endpoint, so single-flight holds by
//! construction. Its loop is only a loop (observe → decide → act → sleep); when to mint is the
//! pure [`schedule::next_step`], how to mint is the [`Minter`].
//!
//! A normal refresh mints with the current secret, falling back to the previous secret on
//! `invalid_client`, and backs off with jitter on failure without ever giving up for good;
//! while refreshes fail, the current token keeps serving until it expires.
//!
//! Rotation ([`Command::Rotate`]): mint and validate with the new secret *before* anything is
//! swapped. Success swaps credentials and token atomically and keeps the old token as fallback
//! for the rotation window; failure keeps everything as it was and retries with backoff for
//! `token.rotation_retry_window_seconds` (the new secret may not be active at Genesys yet).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::endpoint::{MintError, TokenEndpoint};
use super::minter::Minter;
use super::schedule::{
    self, backoff, refresh_delay, Facts, FailureClass, HeldToken, Reason, RetryWindow, Step,
};
use super::secret::Secret;
use super::store::{Token, TokenSource, TokenStore};
use crate::anomaly::{AnomalyMonitor, Kind};
use crate::audit::{AuditEvent, AuditLog};
use crate::config::Live;
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

/// What the refresher shares with the rest of the process.
pub struct Shared {
    pub store: Arc<TokenStore>,
    pub live: Arc<ArcSwap<Live>>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    pub anomaly: Arc<AnomalyMonitor>,
    pub info: Arc<Mutex<RefreshInfo>>,
}

/// A rotation that failed and is retried until its window closes.
struct PendingRotation {
    credentials: Credentials,
    window: RetryWindow,
    failures: u32,
}

pub struct Refresher {
    shared: Shared,
    minter: Minter,
    credentials: Credentials,
    commands: mpsc::Receiver<Command>,
    failures: u32,
    backoff_until: Option<Instant>,
    /// When the held token is due for its proactive refresh (set when it is published).
    refresh_at: Option<Instant>,
    /// The highest rejected generation already audited.
    noticed_rejection: u64,
    pending: Option<PendingRotation>,
}

impl Refresher {
    pub fn new(
        shared: Shared,
        endpoint: TokenEndpoint,
        credentials: Credentials,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        let minter = Minter::new(
            endpoint,
            shared.live.clone(),
            shared.metrics.clone(),
            shared.audit.clone(),
        );
        Refresher {
            shared,
            minter,
            credentials,
            commands,
            failures: 0,
            backoff_until: None,
            refresh_at: None,
            noticed_rejection: 0,
            pending: None,
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: crate::shutdown::Shutdown) {
        while !shutdown.is_set() {
            while let Ok(cmd) = self.commands.try_recv() {
                self.handle(cmd).await;
            }
            let now = Instant::now();
            self.notice_rejection(now);
            match schedule::next_step(&self.facts(now)) {
                Step::Mint(reason) => self.refresh(reason).await,
                Step::RetryRotation => self.retry_rotation().await,
                Step::AbandonRotation => self.abandon_rotation(),
                Step::Sleep(until) => tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {}
                    _ = self.shared.store.woken() => {}
                    cmd = self.commands.recv() => if let Some(cmd) = cmd { self.handle(cmd).await },
                    _ = shutdown.wait() => return,
                },
            }
        }
    }

    fn facts(&self, now: Instant) -> Facts {
        let store = &self.shared.store;
        Facts {
            now,
            token: store.current().map(|t| HeldToken {
                generation: t.generation,
                expires_at: t.expires_at,
            }),
            rejected_generation: store.rejected_generation(),
            refresh_at: self.refresh_at,
            backoff_until: self.backoff_until,
            cap_free_at: self.minter.cap_free_at(now),
            rotation: self.pending.as_ref().map(|p| p.window),
        }
    }

    /// A 401 reported for a token not yet audited as rejected: audit it, feed the anomaly
    /// detector, and drop any backoff (the held token is dead; waiting helps nobody).
    fn notice_rejection(&mut self, now: Instant) {
        let Some(t) = self.shared.store.current() else {
            return;
        };
        if self.shared.store.rejected_generation() < t.generation
            || self.noticed_rejection >= t.generation
        {
            return;
        }
        self.noticed_rejection = t.generation;
        self.backoff_until = None;
        let age = now.duration_since(t.acquired_at);
        self.shared.anomaly.token_rejected(age);
        self.shared.audit.record(
            AuditEvent::TokenRejectedUpstream,
            json!({"generation": t.generation, "age_seconds": age.as_secs()}),
            Some(&t.fingerprint),
        );
    }

    fn info(&self) -> std::sync::MutexGuard<'_, RefreshInfo> {
        lock(&self.shared.info)
    }

    /// A normal refresh: current secret, then previous on `invalid_client`.
    async fn refresh(&mut self, reason: Reason) {
        let started = Instant::now();
        let generation = self.shared.store.generation() + 1;
        let held = self.shared.store.current();
        let Credentials {
            client_id,
            secret,
            previous,
        } = self.credentials.clone();
        let mut result = self
            .minter
            .mint(&client_id, &secret, generation, TokenSource::Current)
            .await;
        if let (Err(MintError::InvalidClient), Some(previous)) = (&result, previous) {
            result = self
                .minter
                .mint(&client_id, &previous, generation, TokenSource::Previous)
                .await;
        }
        match result {
            Ok(token) => {
                self.shared
                    .metrics
                    .token_refresh_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                if token.source == TokenSource::Previous {
                    self.shared.audit.record(
                        AuditEvent::FallbackToPreviousSecret,
                        json!({"generation": generation, "reason": "current secret refused (invalid_client)"}),
                        Some(&token.fingerprint),
                    );
                }
                self.accept(token, reason);
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                let delay = self.backoff_after(self.failures, &e);
                self.backoff_until = Some(Instant::now() + delay);
                self.note_failure(&e, delay, held.as_deref());
            }
        }
    }

    fn backoff_after(&self, failures: u32, e: &MintError) -> Duration {
        let live = self.shared.live.load();
        backoff(
            failures,
            failure_class(e),
            live.token.backoff_initial,
            live.token.backoff_max,
            rand::random(),
        )
    }

    /// Publishes a validated token and records it everywhere.
    fn accept(&mut self, token: Token, reason: Reason) {
        self.failures = 0;
        self.backoff_until = None;
        let live = self.shared.live.load();
        let (m, source, generation) = (&self.shared.metrics, token.source, token.generation);
        m.token_expiry_timestamp_seconds.set(
            token
                .expires_at_wall
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        m.token_fallback_active
            .set(i64::from(source == TokenSource::Previous));
        {
            let mut info = self.info();
            info.last_refresh = Some(SystemTime::now());
            info.refresh_count += 1;
            info.consecutive_failures = 0;
            info.last_error = None;
        }
        let expires_in = token.lifetime.as_secs();
        self.shared.audit.record(
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
        self.refresh_at = Some(
            token.acquired_at
                + refresh_delay(
                    token.lifetime,
                    live.token.refresh_before_expiry,
                    rand::random(),
                ),
        );
        if reason == Reason::Rotation {
            self.shared
                .store
                .publish_rotated(token, live.token.rotation_retry_window);
        } else {
            self.shared.store.publish(token);
        }
    }

    fn note_failure(&self, e: &MintError, delay: Duration, held: Option<&Token>) {
        self.observe_failure(e);
        let failures = self.failures;
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
        self.shared.audit.record(
            event,
            json!({
                "outcome": e.outcome(),
                "error": e.to_string(),
                "consecutive_failures": failures,
                "retry_in_ms": delay.as_millis() as u64,
                "current_token_still_valid": still_valid,
            }),
            held.map(|t| t.fingerprint.as_str()),
        );
        tracing::warn!(outcome = e.outcome(), error = %e, consecutive_failures = failures, retry_in_ms = delay.as_millis() as u64, current_token_still_valid = still_valid, "token refresh failed");
    }

    /// Feeds the anomaly detector with one failed token call.
    fn observe_failure(&self, e: &MintError) {
        let anomaly = &self.shared.anomaly;
        anomaly.observe(Kind::RefreshFailures);
        match e {
            MintError::InvalidClient => anomaly.observe(Kind::InvalidClient),
            MintError::RateLimited => anomaly.observe(Kind::RateLimitStorm),
            _ => {}
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetPrevious(previous) => self.credentials.previous = previous,
            Command::Rotate { credentials, reply } => {
                let result = if credentials == self.credentials {
                    self.pending = None;
                    self.info().pending_rotation = None;
                    Ok(self.shared.store.generation())
                } else {
                    self.rotate(credentials).await
                };
                let _ = reply.send(result);
            }
        }
    }

    async fn retry_rotation(&mut self) {
        if let Some(credentials) = self.pending.as_ref().map(|p| p.credentials.clone()) {
            let _ = self.rotate(credentials).await;
        }
    }

    /// One rotation attempt: mint and validate with the new credentials, then swap.
    async fn rotate(&mut self, new: Credentials) -> Result<u64, String> {
        let generation = self.shared.store.generation() + 1;
        let result = self
            .minter
            .mint(
                &new.client_id,
                &new.secret,
                generation,
                TokenSource::Current,
            )
            .await;
        match result {
            Ok(token) => {
                self.rotated(new, token);
                Ok(generation)
            }
            Err(e) => {
                self.rotation_failed(new, &e);
                Err(e.to_string())
            }
        }
    }

    fn rotated(&mut self, new: Credentials, token: Token) {
        let (old_fp, new_fp) = (
            self.credentials.secret.fingerprint(),
            new.secret.fingerprint(),
        );
        let previous = new
            .previous
            .clone()
            .or_else(|| Some(self.credentials.secret.clone()));
        self.credentials = Credentials { previous, ..new };
        self.pending = None;
        self.shared
            .metrics
            .secret_rotations_total
            .with_label_values(&["success"])
            .inc();
        let generation = token.generation;
        self.shared.audit.record(
            AuditEvent::SecretRotated,
            json!({"generation": generation, "old_secret": old_fp, "new_secret": new_fp}),
            Some(&token.fingerprint),
        );
        {
            let mut info = self.info();
            info.pending_rotation = None;
            info.last_rotation_error = None;
        }
        self.accept(token, Reason::Rotation);
        tracing::info!(generation, new_secret_fingerprint = %new_fp, "client secret rotated");
    }

    fn rotation_failed(&mut self, new: Credentials, e: &MintError) {
        self.shared
            .metrics
            .secret_rotations_total
            .with_label_values(&["failed"])
            .inc();
        // A refused or throttled new secret is as telling as on a normal refresh.
        if matches!(e, MintError::InvalidClient | MintError::RateLimited) {
            self.observe_failure(e);
        }
        let now = Instant::now();
        let (deadline, failures) = match &self.pending {
            Some(p) if p.credentials.secret == new.secret => (p.window.deadline, p.failures + 1),
            _ => (now + self.shared.live.load().token.rotation_retry_window, 1),
        };
        let delay = self.backoff_after(failures, e);
        let retry_until = SystemTime::now() + deadline.saturating_duration_since(now);
        let new_fp = new.secret.fingerprint();
        self.shared.audit.record(
            AuditEvent::SecretRotationFailed,
            json!({
                "new_secret": new_fp,
                "outcome": e.outcome(),
                "error": e.to_string(),
                "attempt": failures,
                "retry_in_ms": delay.as_millis() as u64,
                "retry_until": humantime::format_rfc3339_seconds(retry_until).to_string(),
            }),
            self.shared
                .store
                .current()
                .map(|t| t.fingerprint.clone())
                .as_deref(),
        );
        {
            let mut info = self.info();
            info.pending_rotation = Some((new_fp.clone(), retry_until));
            info.last_rotation_error = Some(e.to_string());
        }
        tracing::warn!(new_secret_fingerprint = %new_fp, error = %e, attempt = failures, "secret rotation failed; keeping the current secret and retrying");
        self.pending = Some(PendingRotation {
            credentials: new,
            window: RetryWindow {
                next_try: now + delay,
                deadline,
            },
            failures,
        });
    }

    fn abandon_rotation(&mut self) {
        if let Some(p) = self.pending.take() {
            self.shared.audit.record(
                AuditEvent::SecretRotationFailed,
                json!({"final": true, "new_secret": p.credentials.secret.fingerprint(), "reason": "retry window over; keeping the current secret"}),
                None,
            );
        }
        self.info().pending_rotation = None;
    }
}

fn failure_class(e: &MintError) -> FailureClass {
    match e {
        MintError::InvalidClient | MintError::RateLimited => FailureClass::Harsh,
        _ => FailureClass::Transient,
    }
}
