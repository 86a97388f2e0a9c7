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
//! for the rotation window; failure keeps everything as it was and retries on the rotation's
//! own backoff for `token.rotation_retry_window_seconds` (the new secret may not be active at
//! Genesys yet). A rotation is a pending attempt the schedule places like any other mint:
//! after the mints that keep a working token, within the per-minute cap; asking again for the
//! secret already pending adds no attempt.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use tokio::sync::{mpsc, oneshot};

use super::endpoint::{MintError, TokenEndpoint};
use super::minter::Minter;
pub use super::report::RefreshInfo;
use super::report::{Reporter, RotationFailure};
use super::schedule::{
    self, backoff, refresh_delay, rotation_backoff, Facts, FailureClass, HeldToken, Reason,
    RetryWindow, SlotFacts, Step, STAGGER, STARVING_PACE,
};
use super::shared::{Peers, Plan};
use super::store::{Token, TokenSource, TokenStore};
use crate::cluster::SharedEvent;
use crate::config::Live;
use crate::secret::Secret;
use crate::telemetry;

/// Credentials the refresher mints with.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    pub client_id: String,
    pub secret: Secret,
    pub previous: Option<Secret>,
}

impl Credentials {
    /// Same client and secret (the fallback secret aside).
    fn same_secret(&self, other: &Credentials) -> bool {
        self.client_id == other.client_id && self.secret == other.secret
    }
}

/// Requests to the refresher from the reload path.
pub enum Command {
    /// Switch to new credentials once a token minted with them validates. Asking for the
    /// credentials in use, or for the ones already pending, sends no token request.
    Rotate {
        credentials: Credentials,
        reply: oneshot::Sender<RotationResult>,
    },
    /// Change only the previous (fallback) secret.
    SetPrevious(Option<Secret>),
}

/// How a rotation request stands when the refresher answers it.
#[derive(Debug, Clone, PartialEq)]
pub enum RotationResult {
    /// These credentials are the ones in use: nothing to do.
    Current,
    /// The new secret minted and validated a token, now in use.
    Rotated { generation: u64 },
    /// The attempt failed: the current secret keeps serving; the next attempt is scheduled.
    Failed {
        error: String,
        next_attempt: SystemTime,
        retry_until: SystemTime,
    },
    /// Not tried yet, for `why`; the attempt is scheduled.
    Pending {
        why: PendingWhy,
        next_attempt: SystemTime,
        retry_until: SystemTime,
    },
    /// The retry window closed before the new secret validated.
    Abandoned,
    /// A newer secret replaced this one before it was tried.
    Superseded,
}

/// Why a rotation attempt waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingWhy {
    /// This secret's retry is already scheduled: asking again adds no attempt.
    AlreadyScheduled,
    /// `max_token_requests_per_minute` is reached.
    TokenRequestCap,
    /// A slot without a usable token is minted with the working secret first.
    WorkingSecretFirst,
    /// Its backoff after a failed attempt.
    Backoff,
}

impl PendingWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            PendingWhy::AlreadyScheduled => "already_scheduled",
            PendingWhy::TokenRequestCap => "token_request_cap",
            PendingWhy::WorkingSecretFirst => "working_secret_first",
            PendingWhy::Backoff => "backoff",
        }
    }
}

/// What the refresher shares with the rest of the process.
pub struct Shared {
    /// The credential's name (in spans).
    pub name: crate::config::CredentialName,
    pub store: Arc<TokenStore>,
    pub live: Arc<ArcSwap<Live>>,
    pub report: Reporter,
}

/// A span's outcome for a mint: the new token's fingerprint, or the error's class.
fn token_outcome(result: &Result<Token, MintError>) -> Result<Vec<KeyValue>, String> {
    match result {
        Ok(token) => Ok(vec![KeyValue::new(
            "genesys.token.fingerprint",
            token.fingerprint.clone(),
        )]),
        Err(e) => Err(e.outcome().to_string()),
    }
}

/// A rotation waiting for its (next) attempt, until its window closes.
struct PendingRotation {
    credentials: Credentials,
    window: RetryWindow,
    /// The reload waiting for the first answer about this secret.
    reply: Option<oneshot::Sender<RotationResult>>,
}

pub struct Refresher {
    pub(super) shared: Shared,
    /// The other holders of the credential's tokens: none, or the replicas of `[cluster]`.
    peers: Box<dyn Peers>,
    minter: Minter,
    credentials: Credentials,
    commands: mpsc::Receiver<Command>,
    failures: u32,
    backoff_until: Option<Instant>,
    /// Per pool slot: when its token is due for its proactive refresh (set when published).
    refresh_at: Vec<Option<Instant>>,
    /// Per pool slot: the highest rejected generation already audited.
    noticed_rejection: Vec<u64>,
    /// When the last token request was sent (mints for the pool are staggered).
    last_mint: Option<Instant>,
    pending: Option<PendingRotation>,
}

impl Refresher {
    pub fn new(
        shared: Shared,
        endpoint: TokenEndpoint,
        credentials: Credentials,
        commands: mpsc::Receiver<Command>,
        jwks: Option<Arc<super::jwks::Jwks>>,
        peers: Box<dyn Peers>,
    ) -> Self {
        let slots = shared.store.slots();
        let minter = Minter::new(
            shared.name.to_string(),
            endpoint,
            jwks,
            shared.live.clone(),
            shared.report.metrics.clone(),
            shared.report.audit.clone(),
        );
        Refresher {
            shared,
            peers,
            minter,
            credentials,
            commands,
            failures: 0,
            backoff_until: None,
            refresh_at: vec![None; slots],
            noticed_rejection: vec![0; slots],
            last_mint: None,
            pending: None,
        }
    }

    /// Runs until `shutdown` turns true. A panic (a bug: no input should cause one) does not
    /// end the refresher for good, leaving the proxy without tokens until a restart: it is
    /// logged, audited and shown in `/status`, and the loop resumes after a backoff (its
    /// state is plain data, valid between steps).
    pub async fn run(mut self, mut shutdown: crate::shutdown::Shutdown) {
        use futures_util::FutureExt;
        let mut panics = 0u32;
        loop {
            let served = std::panic::AssertUnwindSafe(self.serve(&mut shutdown))
                .catch_unwind()
                .await;
            let Err(panic) = served else { return };
            panics = panics.saturating_add(1);
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            let what: String = what.chars().take(200).collect();
            self.shared.report.refresher_panicked(panics, &what);
            let pause = Duration::from_secs(1u64 << panics.min(6));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    async fn serve(&mut self, shutdown: &mut crate::shutdown::Shutdown) {
        while !shutdown.is_set() {
            while let Ok(cmd) = self.commands.try_recv() {
                self.handle(cmd);
            }
            let now = Instant::now();
            if self.notice_rejection(now) {
                self.check_siblings().await;
            }
            let facts = self.facts(now);
            let step = schedule::next_step(&facts);
            if let Step::Sleep(_) = step {
                self.answer_waiting(&facts);
            }
            match step {
                Step::Mint(slot, reason) => self.refresh(slot, reason).await,
                Step::RetryRotation => self.retry_rotation().await,
                Step::AbandonRotation => self.abandon_rotation(),
                Step::Sleep(until) => tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {}
                    _ = self.shared.store.woken() => {}
                    cmd = self.commands.recv() => if let Some(cmd) = cmd { self.handle(cmd) },
                    event = self.peers.next_event() => self.on_shared(event).await,
                    _ = shutdown.wait() => return,
                },
            }
        }
    }

    fn facts(&self, now: Instant) -> Facts {
        let store = &self.shared.store;
        let slots = (0..store.slots())
            .map(|i| SlotFacts {
                token: store.slot(i).map(|t| HeldToken {
                    generation: t.generation,
                    expires_at: t.expires_at,
                }),
                rejected_generation: store.rejected_generation(i),
                refresh_at: self.refresh_at[i],
                dormant: store.slot(i).is_some_and(|t| store.is_dormant(&t, now)),
                wanted: store.is_wanted(i),
            })
            .collect();
        Facts {
            now,
            slots,
            backoff_until: self.backoff_until,
            cap_free_at: self.minter.cap_free_at(now),
            stagger_until: self.last_mint.map(|t| t + STAGGER),
            pace_until: self.last_mint.map(|t| t + STARVING_PACE),
            rotation: self.pending.as_ref().map(|p| p.window),
        }
    }

    /// A 401 reported for a token not yet audited as rejected: audit it, feed the anomaly
    /// detector, and drop any backoff (the held token is dead; waiting helps nobody). True
    /// when there was news.
    fn notice_rejection(&mut self, now: Instant) -> bool {
        let store = &self.shared.store;
        let mut news = false;
        for slot in 0..store.slots() {
            let Some(t) = store.slot(slot) else {
                continue;
            };
            if store.rejected_generation(slot) < t.generation
                || self.noticed_rejection[slot] >= t.generation
            {
                continue;
            }
            self.noticed_rejection[slot] = t.generation;
            self.backoff_until = None;
            news = true;
            self.shared
                .report
                .rejected(&t, now.duration_since(t.acquired_at));
        }
        news
    }

    /// One pool token was refused: a revoke-all or a disabled client kills the others too,
    /// but requests would only find out one by one (they prefer the freshest token). Ask
    /// Genesys about each other pool token now (`GET /api/v2/tokens/me`, not a token request)
    /// and mark the refused ones, so a revoke-all costs exactly one token request per slot.
    async fn check_siblings(&mut self) {
        let store = self.shared.store.clone();
        if store.slots() < 2 {
            return;
        }
        for slot in 0..store.slots() {
            let Some(t) = store.slot(slot) else { continue };
            let now = Instant::now();
            // A resting token (presumed idle-dead) is re-minted when wanted, not now.
            if store.is_refused(&t) || !t.is_valid_at(now) || store.is_dormant(&t, now) {
                continue;
            }
            if !self.minter.still_accepted(&t).await {
                store.reject(&t);
            }
        }
        self.notice_rejection(Instant::now());
    }

    /// A normal refresh of one pool slot: current secret, then previous on `invalid_client`.
    async fn refresh(&mut self, slot: usize, reason: Reason) {
        let started = Instant::now();
        let store = self.shared.store.clone();
        let leased = match self.peers.plan(&store, slot).await {
            Plan::Adopted(token) => return self.accept(token, reason, started),
            Plan::MintShared { leased } => Some(leased),
            Plan::MintAlone => None,
        };
        self.last_mint = Some(started);
        let generation = self.shared.store.generation() + 1;
        let held = self.shared.store.slot(slot);
        let Credentials {
            client_id,
            secret,
            previous,
        } = self.credentials.clone();
        let span = telemetry::start(
            "token refresh",
            SpanKind::Internal,
            vec![
                KeyValue::new("genesys.credential", self.shared.name.to_string()),
                KeyValue::new("genesys.token.slot", slot as i64),
                KeyValue::new("genesys.refresh.reason", reason.as_str()),
            ],
        );
        let minter = &mut self.minter;
        let result = telemetry::within(&span, async {
            let result = minter
                .mint(&client_id, &secret, generation, slot, TokenSource::Current)
                .await;
            match (result, previous) {
                (Err(MintError::InvalidClient), Some(previous)) => {
                    let source = TokenSource::Previous;
                    minter
                        .mint(&client_id, &previous, generation, slot, source)
                        .await
                }
                (result, _) => result,
            }
        })
        .await;
        telemetry::end(span, token_outcome(&result));
        match result {
            Ok(token) => {
                match leased {
                    Some(leased) => self.peers.share(&token, leased).await,
                    None => self.peers.minted_alone(),
                }
                self.accept(token, reason, started);
            }
            Err(e) => {
                if leased == Some(true) {
                    self.peers.release(slot).await;
                }
                self.failures = self.failures.saturating_add(1);
                let delay = self.backoff_after(self.failures, &e);
                self.backoff_until = Some(Instant::now() + delay);
                let report = &self.shared.report;
                report.refresh_failed(&e, self.failures, delay, held.as_deref());
            }
        }
    }

    /// A message from the other replicas: adopt what one published for this credential; on
    /// a sync (Redis answers again), take what is stored, or store ours if nothing is (after
    /// an outage the first replica to do so wins, the others adopt its token).
    async fn on_shared(&mut self, event: SharedEvent) {
        let now = Instant::now();
        let store = self.shared.store.clone();
        let (slots, sync) = match event {
            SharedEvent::Published { kid, slot } if self.peers.ours(&kid) => {
                (slot..slot + 1, false)
            }
            SharedEvent::Published { .. } => return,
            SharedEvent::Sync => (0..store.slots(), true),
        };
        for slot in slots.filter(|s| *s < store.slots()) {
            match self.peers.adopt(&store, slot).await {
                Some(token) => self.accept(token, Reason::Shared, now),
                None if sync => self.peers.offer(&store, slot).await,
                None => {}
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

    /// Publishes a validated token, records it, and schedules its proactive refresh.
    pub(super) fn accept(&mut self, token: Token, reason: Reason, started: Instant) {
        self.failures = 0;
        self.backoff_until = None;
        self.shared.report.acquired(&token, reason, started);
        let live = self.shared.live.load();
        let delay = refresh_delay(
            token.lifetime,
            live.token.refresh_before_expiry,
            rand::random(),
        );
        self.refresh_at[token.slot] = Some(token.acquired_at + delay);
        if reason == Reason::Rotation {
            let window = live.token.rotation_retry_window;
            self.shared.store.publish_rotated(token, window);
        } else {
            self.shared.store.publish(token);
        }
        self.shared.report.published(&self.shared.store);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetPrevious(previous) => self.credentials.previous = previous,
            Command::Rotate { credentials, reply } => self.request_rotation(credentials, reply),
        }
    }

    /// Takes a rotation request. The credentials in use: any pending rotation is dropped (the
    /// operator went back). The ones already pending: no new attempt, the answer says when the
    /// scheduled one is. Others: a new pending rotation, tried when the schedule allows; its
    /// answer comes from [`Refresher::run`] (tried, or why it waits).
    fn request_rotation(
        &mut self,
        credentials: Credentials,
        reply: oneshot::Sender<RotationResult>,
    ) {
        let now = Instant::now();
        if credentials.same_secret(&self.credentials) {
            self.credentials.previous = credentials.previous;
            if let Some(p) = self.pending.take() {
                if let Some(reply) = p.reply {
                    let _ = reply.send(RotationResult::Superseded);
                }
                self.shared.report.rotation_settled();
            }
            let _ = reply.send(RotationResult::Current);
            return;
        }
        if let Some(p) = self
            .pending
            .as_mut()
            .filter(|p| p.credentials.same_secret(&credentials))
        {
            p.credentials.previous = credentials.previous;
            let window = p.window;
            let next = schedule::rotation_next_attempt(&self.facts(now)).unwrap_or(now);
            let _ = reply.send(RotationResult::Pending {
                why: PendingWhy::AlreadyScheduled,
                next_attempt: wall(next, now),
                retry_until: wall(window.deadline, now),
            });
            return;
        }
        if let Some(old) = self.pending.take() {
            if let Some(reply) = old.reply {
                let _ = reply.send(RotationResult::Superseded);
            }
        }
        let deadline = now + self.shared.live.load().token.rotation_retry_window;
        self.pending = Some(PendingRotation {
            credentials,
            window: RetryWindow {
                next_try: now,
                deadline,
                failures: 0,
            },
            reply: Some(reply),
        });
    }

    /// A rotation request still unanswered whose attempt cannot go soon: say why and when.
    /// An attempt due within [`ANSWER_AFTER`] (the stagger after another mint) is waited for.
    fn answer_waiting(&mut self, facts: &Facts) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        let next = schedule::rotation_next_attempt(facts).unwrap_or(facts.now);
        if p.reply.is_some() && next <= facts.now + ANSWER_AFTER {
            return;
        }
        let (now, deadline, failures) = (facts.now, p.window.deadline, p.window.failures);
        let new_secret = p.credentials.secret.fingerprint();
        let why = if facts.cap_free_at.is_some() {
            PendingWhy::TokenRequestCap
        } else if failures > 0 {
            PendingWhy::Backoff
        } else {
            PendingWhy::WorkingSecretFirst
        };
        self.shared
            .report
            .rotation_pending(&new_secret, wall(next, now), wall(deadline, now));
        if let Some(reply) = p.reply.take() {
            let _ = reply.send(RotationResult::Pending {
                why,
                next_attempt: wall(next, now),
                retry_until: wall(deadline, now),
            });
        }
    }

    async fn retry_rotation(&mut self) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        let reply = p.reply.take();
        let credentials = p.credentials.clone();
        let result = self.rotate(credentials).await;
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    /// One rotation attempt: mint and validate with the new credentials, then swap. The new
    /// token goes to the first pool slot; the other slots move to the new secret at their next
    /// refresh (their tokens stay valid at Genesys when the old secret is removed).
    async fn rotate(&mut self, new: Credentials) -> RotationResult {
        let started = Instant::now();
        // [cluster]: a replica that rotated first already stored a token for the new secret.
        let store = self.shared.store.clone();
        if let Some(token) = self.peers.adopt_rotated(&store, &new.secret).await {
            let generation = token.generation;
            self.peers.rekey(&new.secret);
            self.rotated(new, token, started);
            return RotationResult::Rotated { generation };
        }
        self.last_mint = Some(started);
        let generation = self.shared.store.generation() + 1;
        let (id, secret) = (&new.client_id, &new.secret);
        let span = telemetry::start(
            "secret rotation",
            SpanKind::Internal,
            vec![
                KeyValue::new("genesys.credential", self.shared.name.to_string()),
                KeyValue::new("genesys.secret.fingerprint", secret.fingerprint()),
                KeyValue::new(
                    "genesys.secret.previous_fingerprint",
                    self.credentials.secret.fingerprint(),
                ),
            ],
        );
        let mint = self
            .minter
            .mint(id, secret, generation, 0, TokenSource::Current);
        let result = telemetry::within(&span, mint).await;
        telemetry::end(span, token_outcome(&result));
        match result {
            Ok(token) => {
                self.peers.rekey(&new.secret);
                self.peers.share(&token, false).await;
                self.rotated(new, token, started);
                RotationResult::Rotated { generation }
            }
            Err(e) => self.rotation_failed(new, &e),
        }
    }

    /// Swaps credentials and token together; the old secret becomes the previous one unless
    /// the new config names another.
    fn rotated(&mut self, new: Credentials, token: Token, started: Instant) {
        let old_secret = self.credentials.secret.fingerprint();
        let new_secret = new.secret.fingerprint();
        let previous = new
            .previous
            .clone()
            .or_else(|| Some(self.credentials.secret.clone()));
        self.credentials = Credentials { previous, ..new };
        self.pending = None;
        self.shared.report.rotated(&old_secret, &new_secret, &token);
        self.accept(token, Reason::Rotation, started);
    }

    /// Keeps everything as it is and schedules the next attempt on the rotation's own backoff
    /// (minutes for a refused secret), within its window.
    fn rotation_failed(&mut self, new: Credentials, e: &MintError) -> RotationResult {
        let now = Instant::now();
        let live = self.shared.live.load();
        let (deadline, attempt) = match &self.pending {
            Some(p) if p.credentials.same_secret(&new) => {
                (p.window.deadline, p.window.failures + 1)
            }
            _ => (now + live.token.rotation_retry_window, 1),
        };
        let delay = rotation_backoff(
            attempt,
            failure_class(e),
            live.token.backoff_initial,
            live.token.backoff_max,
            rand::random(),
        );
        let held = self.shared.store.current();
        let next_attempt = SystemTime::now() + delay;
        let retry_until = wall(deadline, now);
        self.shared.report.rotation_failed(RotationFailure {
            new_secret: &new.secret.fingerprint(),
            error: e,
            attempt,
            retry_in: delay,
            retry_until,
            held: held.as_deref(),
        });
        self.pending = Some(PendingRotation {
            credentials: new,
            window: RetryWindow {
                next_try: now + delay,
                deadline,
                failures: attempt,
            },
            reply: None,
        });
        RotationResult::Failed {
            error: e.to_string(),
            next_attempt,
            retry_until,
        }
    }

    fn abandon_rotation(&mut self) {
        if let Some(p) = self.pending.take() {
            let new_secret = p.credentials.secret.fingerprint();
            self.shared.report.rotation_abandoned(&new_secret);
            if let Some(reply) = p.reply {
                let _ = reply.send(RotationResult::Abandoned);
            }
        }
    }
}

/// A reload waits for a rotation attempt due this soon instead of being told it is pending.
const ANSWER_AFTER: Duration = Duration::from_secs(1);

/// The wall-clock time of `at`, read at `now`.
fn wall(at: Instant, now: Instant) -> SystemTime {
    SystemTime::now() + at.saturating_duration_since(now)
}

fn failure_class(e: &MintError) -> FailureClass {
    match e {
        MintError::InvalidClient | MintError::RateLimited => FailureClass::Harsh,
        _ => FailureClass::Transient,
    }
}
