//! The token pool: one immutable token record per slot in an `ArcSwap`, read lock-free.
//!
//! `[token] pool_size` slots (1 by default). Genesys limits API calls per token, so several
//! tokens from one client multiply the budget; each slot has its own token, its own proactive
//! refresh and its own 401 path. Generations are numbered across the whole pool, so "newer" is
//! well defined.
//!
//! The store is also the meeting point between requests and the refresher: a request that saw a
//! 401 asks one question, [`TokenStore::replacement_for`] the token it used, and the store
//! reports the rejection to the refresher and answers with the pre-rotation fallback or a token
//! minted after the request's first 401; the refresher is the only writer
//! ([`TokenStore::publish`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::{watch, Notify};

/// Which client secret minted a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Current,
    Previous,
    /// `[cluster]`: minted by another replica and read from Redis.
    Shared,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Current => "current",
            TokenSource::Previous => "previous",
            TokenSource::Shared => "shared",
        }
    }
}

/// One access token, never changed after creation.
pub struct Token {
    /// `Bearer <token>`, marked sensitive so HTTP libraries never log it.
    pub header: HeaderValue,
    pub fingerprint: String,
    pub generation: u64,
    /// The pool slot it serves (0 with `pool_size = 1`).
    pub slot: usize,
    pub acquired_at: Instant,
    pub expires_at: Instant,
    /// Wall-clock expiry, for `/status` and the expiry metric.
    pub expires_at_wall: SystemTime,
    pub lifetime: Duration,
    /// The lifetime the issuer gave, when it was longer than `token.max_lifetime_seconds`.
    pub clamped_from: Option<Duration>,
    pub source: TokenSource,
    /// `dateTokenIdles` at validation, as time left: the org's idle timeout.
    pub idles_after: Option<Duration>,
    /// When a request last took it, in ms of [`epoch_ms`] (the mint, until then).
    last_used_ms: AtomicU64,
}

/// Milliseconds since the first call in this process: cheap instants that fit an atomic.
pub fn epoch_ms(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // An hour back where the clock allows, so instants taken just before the first call
    // (a mint's start) still count from it; a store calls this when it is made.
    let epoch = *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    });
    t.saturating_duration_since(epoch).as_millis() as u64
}

/// A last-use time is rewritten only when it moved this much (fewer writes to a shared line).
const TOUCH_GRAIN_MS: u64 = 20;

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("fingerprint", &self.fingerprint)
            .field("generation", &self.generation)
            .field("slot", &self.slot)
            .field("expires_at_wall", &self.expires_at_wall)
            .field("source", &self.source)
            .finish()
    }
}

/// No token is held longer than this, whatever any input says.
const LONGEST: Duration = Duration::from_secs(366 * 86_400);

impl Token {
    /// A token from its value: the bearer header built once and marked sensitive.
    pub fn from_secret(
        access_token: &crate::secret::Secret,
        lifetime: std::time::Duration,
        generation: u64,
        slot: usize,
        acquired_at: Instant,
        source: TokenSource,
    ) -> Result<Token, super::endpoint::MintError> {
        let mut header = HeaderValue::from_str(&format!("Bearer {}", access_token.expose()))
            .map_err(|_| {
                super::endpoint::MintError::InvalidResponse(
                    "token is not a valid header value".into(),
                )
            })?;
        header.set_sensitive(true);
        // Whatever the caller computed, no instant past the clock's range (a far-future exp
        // once panicked the refresher); the minter clamps far lower.
        let lifetime = lifetime.min(LONGEST);
        Ok(Token {
            header,
            fingerprint: access_token.fingerprint(),
            generation,
            slot,
            acquired_at,
            expires_at: acquired_at + lifetime,
            expires_at_wall: std::time::SystemTime::now() + lifetime,
            lifetime,
            clamped_from: None,
            source,
            idles_after: None,
            last_used_ms: AtomicU64::new(epoch_ms(acquired_at)),
        })
    }

    /// A request takes it now: how long it had been idle before.
    pub fn touch(&self, now: Instant) -> Duration {
        let now_ms = epoch_ms(now);
        let last = self.last_used_ms.load(Ordering::Relaxed);
        if now_ms >= last + TOUCH_GRAIN_MS {
            self.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
        Duration::from_millis(now_ms.saturating_sub(last))
    }

    /// How long no request has taken it.
    pub fn idle_for(&self, now: Instant) -> Duration {
        let last = self.last_used_ms.load(Ordering::Relaxed);
        Duration::from_millis(epoch_ms(now).saturating_sub(last))
    }

    /// The token's value (for `[cluster]`, which stores it sealed).
    pub fn access_token(&self) -> Option<crate::secret::Secret> {
        let value = self.header.to_str().ok()?.strip_prefix("Bearer ")?;
        Some(crate::secret::Secret::new(value))
    }

    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

/// The pre-rotation token and the end of the window in which it is tried.
struct Fallback {
    token: Arc<Token>,
    until: Instant,
}

struct Slot {
    current: ArcSwapOption<Token>,
    /// Highest generation of this slot a request reported refused by the API (401).
    rejected: AtomicU64,
    /// The newest generation published when `rejected` was first reported: tokens newer than
    /// it were minted after the refusal.
    newest_at_rejection: AtomicU64,
    /// Requests need this resting slot again (budget pressure): mint it even though it rests.
    wanted: AtomicBool,
}

/// Shared holder of the pool's tokens.
pub struct TokenStore {
    slots: Vec<Slot>,
    /// The token in use before the last secret rotation, for the rotation window: a request
    /// whose new token gets a 401 then is replayed with it first.
    fallback: ArcSwapOption<Fallback>,
    /// Generation of the newest published token; waiters watch it.
    generation_tx: watch::Sender<u64>,
    /// Wakes the refresher.
    wake: Notify,
    /// The org's idle timeout, as learned.
    pub idle: crate::token::idle::IdleModel,
}

impl Default for TokenStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenStore {
    /// A store of one slot.
    pub fn new() -> Self {
        Self::with_slots(1)
    }

    pub fn with_slots(n: usize) -> Self {
        epoch_ms(Instant::now());
        TokenStore {
            slots: (0..n.max(1))
                .map(|_| Slot {
                    current: ArcSwapOption::empty(),
                    rejected: AtomicU64::new(0),
                    newest_at_rejection: AtomicU64::new(0),
                    wanted: AtomicBool::new(false),
                })
                .collect(),
            fallback: ArcSwapOption::empty(),
            generation_tx: watch::channel(0).0,
            wake: Notify::new(),
            idle: Default::default(),
        }
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The token of `slot`, whatever its state.
    pub fn slot(&self, slot: usize) -> Option<Arc<Token>> {
        self.slots.get(slot)?.current.load_full()
    }

    /// Has the API refused `token` (a request reported a 401 for it)?
    pub fn is_refused(&self, token: &Token) -> bool {
        self.slots
            .get(token.slot)
            .is_some_and(|s| s.rejected.load(Ordering::Acquire) >= token.generation)
    }

    /// Every token a request may use now: not expired, not known refused.
    pub fn usable(&self, now: Instant) -> Vec<Arc<Token>> {
        self.usable_iter(now).collect()
    }

    fn usable_iter(&self, now: Instant) -> impl Iterator<Item = Arc<Token>> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.current.load_full())
            .filter(move |t| self.serves(t, now))
    }

    /// May a request be sent with `token` now: not expired, not refused by the API, not
    /// presumed idle-dead.
    pub fn serves(&self, token: &Token, now: Instant) -> bool {
        token.is_valid_at(now) && !self.is_refused(token) && !self.is_dormant(token, now)
    }

    /// Is `token` presumed dead of the org's idle timeout (idle for nine tenths of it)?
    pub fn is_dormant(&self, token: &Token, now: Instant) -> bool {
        self.idle
            .dormant_after()
            .is_some_and(|d| token.idle_for(now) >= d)
    }

    /// Requests need more budget than the tokens in use have: the lowest slot that holds no
    /// usable token (resting, expired, never minted) is wanted, and the refresher woken.
    pub fn want_more(&self, now: Instant) {
        let usable = |s: &Slot| {
            s.current
                .load()
                .as_ref()
                .is_some_and(|t| self.serves(t, now))
        };
        if let Some(slot) = self.slots.iter().find(|s| !usable(s)) {
            if !slot.wanted.swap(true, Ordering::AcqRel) {
                self.wake.notify_one();
            }
        }
    }

    /// Has [`Self::want_more`] asked for `slot`?
    pub fn is_wanted(&self, slot: usize) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| s.wanted.load(Ordering::Acquire))
    }

    /// A token is held that is neither expired nor refused (one presumed idle-dead counts:
    /// it is re-minted as soon as a request comes). What readiness means.
    pub fn holds_valid(&self, now: Instant) -> bool {
        self.slots
            .iter()
            .filter_map(|s| s.current.load_full())
            .any(|t| t.is_valid_at(now) && !self.is_refused(&t))
    }

    /// The newest usable token. An expired token is never handed out.
    pub fn valid(&self, now: Instant) -> Option<Arc<Token>> {
        self.usable_iter(now).max_by_key(|t| t.generation)
    }

    /// The first slot's token whatever its expiry (for `/status` and tests).
    pub fn current(&self) -> Option<Arc<Token>> {
        self.slot(0)
    }

    /// The refresher's write: makes `token` its slot's token and wakes every waiter.
    pub fn publish(&self, token: Token) {
        let generation = token.generation;
        if let Some(left) = token.idles_after {
            self.idle.reported(left);
        }
        if let Some(slot) = self.slots.get(token.slot) {
            slot.wanted.store(false, Ordering::Release);
            slot.current.store(Some(Arc::new(token)));
        }
        self.generation_tx.send_if_modified(|g| {
            let newer = generation > *g;
            *g = (*g).max(generation);
            newer
        });
    }

    /// Publishes the first token minted with a rotated secret; the token it replaces becomes
    /// the fallback for `window` (or until it expires). After the window a 401 means what it
    /// always means (refresh), not "the new secret is not active everywhere yet".
    pub fn publish_rotated(&self, token: Token, window: Duration) {
        if let Some(old) = self.slot(token.slot) {
            let until = Instant::now() + window;
            self.fallback
                .store(Some(Arc::new(Fallback { token: old, until })));
        }
        self.publish(token);
    }

    /// The pre-rotation token, while the rotation window lasts and the token is valid.
    pub fn fallback_valid(&self, now: Instant) -> Option<Arc<Token>> {
        let fallback = self.fallback.load_full()?;
        (now < fallback.until && fallback.token.is_valid_at(now)).then(|| fallback.token.clone())
    }

    /// The fallback token was refused too: stop offering it.
    fn drop_fallback(&self, generation: u64) {
        let current = self.fallback.load();
        if current
            .as_ref()
            .is_some_and(|f| f.token.generation == generation)
        {
            self.fallback.store(None);
        }
    }

    /// A request's token `used` was refused by the API (401). Reports it to the refresher
    /// (one refresh of its slot however many requests report it) and stops offering it as a
    /// fallback.
    pub fn reject(&self, used: &Token) {
        if let Some(slot) = self.slots.get(used.slot) {
            let previous = slot.rejected.fetch_max(used.generation, Ordering::AcqRel);
            if previous < used.generation {
                slot.newest_at_rejection
                    .store(self.generation(), Ordering::Release);
                self.wake.notify_one();
            }
        }
        self.drop_fallback(used.generation);
    }

    /// The token to replay a request with after `used` was refused, waiting up to `timeout`
    /// for the refresher: during a secret rotation the still-valid pre-rotation token comes
    /// first; otherwise a usable token newer than `after` (the newest generation when the
    /// request saw its first 401), i.e. one minted since. `None` when none arrives in time.
    pub async fn replacement_for(
        &self,
        used: &Token,
        after: u64,
        timeout: Duration,
    ) -> Option<Arc<Token>> {
        self.reject(used);
        if let Some(fallback) = self
            .fallback_valid(Instant::now())
            .filter(|f| f.generation < used.generation)
        {
            return Some(fallback);
        }
        self.wait_newer(after.max(used.generation), timeout).await
    }

    /// The newest generation published when `used` was first reported refused (now, when it
    /// has not been): a token newer than that was minted after the refusal. A request that
    /// meets its 401 after another request's 401 already brought a replacement is replayed with
    /// that replacement instead of waiting for yet another token.
    pub fn newest_when_refused(&self, used: &Token) -> u64 {
        match self.slots.get(used.slot) {
            Some(s) if s.rejected.load(Ordering::Acquire) == used.generation => {
                s.newest_at_rejection.load(Ordering::Acquire)
            }
            _ => self.generation(),
        }
    }

    /// The generation of the newest published token.
    pub fn generation(&self) -> u64 {
        *self.generation_tx.borrow()
    }

    /// The highest generation of `slot` reported rejected.
    pub fn rejected_generation(&self, slot: usize) -> u64 {
        self.slots
            .get(slot)
            .map_or(0, |s| s.rejected.load(Ordering::Acquire))
    }

    /// True while no token can serve a request although tokens are held: every one is expired
    /// or was refused by the API.
    pub fn all_refused(&self) -> bool {
        let held: Vec<Arc<Token>> = self
            .slots
            .iter()
            .filter_map(|s| s.current.load_full())
            .collect();
        !held.is_empty() && held.iter().all(|t| self.is_refused(t))
    }

    /// Asks the refresher to look at the pool now (no token, or a reload happened).
    pub fn wake_refresher(&self) {
        self.wake.notify_one();
    }

    /// Resolves when someone called [`Self::reject`] or [`Self::wake_refresher`].
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Waits up to `timeout` for a usable token with a generation above `after`.
    pub async fn wait_newer(&self, after: u64, timeout: Duration) -> Option<Arc<Token>> {
        let newer = || {
            self.usable(Instant::now())
                .into_iter()
                .filter(|t| t.generation > after)
                .max_by_key(|t| t.generation)
        };
        let mut rx = self.generation_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(t) = newer() {
                return Some(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return newer(),
            }
        }
    }

    /// Waits up to `timeout` for any usable token.
    pub async fn wait_valid(&self, timeout: Duration) -> Option<Arc<Token>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.generation_tx.subscribe();
        loop {
            if let Some(t) = self.valid(Instant::now()) {
                return Some(t);
            }
            // Every token rests (idle-dead) or is gone: the lowest slot is wanted now.
            self.want_more(Instant::now());
            self.wake_refresher();
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.valid(Instant::now()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_in(slot: usize, generation: u64, life: Duration) -> Token {
        let now = Instant::now();
        let mut header = HeaderValue::from_static("Bearer x");
        header.set_sensitive(true);
        Token {
            header,
            fingerprint: "sha256:000000000000".into(),
            generation,
            slot,
            acquired_at: now,
            expires_at: now + life,
            expires_at_wall: SystemTime::now() + life,
            lifetime: life,
            clamped_from: None,
            source: TokenSource::Current,
            idles_after: None,
            last_used_ms: AtomicU64::new(epoch_ms(now)),
        }
    }

    fn token(generation: u64, life: Duration) -> Token {
        token_in(0, generation, life)
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn expired_token_is_never_handed_out() {
        let s = TokenStore::new();
        s.publish(token(1, Duration::ZERO));
        assert!(s.valid(Instant::now()).is_none());
        assert!(s.current().is_some());
    }

    #[tokio::test]
    async fn a_refused_token_is_replaced_by_the_fallback_then_by_a_newer_one() {
        let s = Arc::new(TokenStore::new());
        s.publish(token(1, MINUTE));
        s.publish_rotated(token(2, MINUTE), Duration::from_secs(30));
        let new = s.current().unwrap();
        let got = s
            .replacement_for(&new, 2, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.generation, 1, "the pre-rotation token first");
        assert_eq!(s.rejected_generation(0), 2);
        assert!(s.all_refused());
        let s2 = s.clone();
        let waiter =
            tokio::spawn(async move { s2.replacement_for(&got, 2, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        s.publish(token(3, MINUTE));
        assert_eq!(waiter.await.unwrap().unwrap().generation, 3);
        assert!(
            s.fallback_valid(Instant::now()).is_none(),
            "refused fallback dropped"
        );
        assert!(!s.all_refused());
    }

    #[test]
    fn rejected_reports_coalesce_per_slot() {
        let s = TokenStore::with_slots(2);
        s.publish(token_in(0, 3, MINUTE));
        s.publish(token_in(1, 4, MINUTE));
        let t = s.slot(0).unwrap();
        s.reject(&t);
        s.reject(&t);
        assert_eq!(s.rejected_generation(0), 3);
        assert_eq!(s.rejected_generation(1), 0, "the other slot is untouched");
        let usable: Vec<u64> = s
            .usable(Instant::now())
            .iter()
            .map(|t| t.generation)
            .collect();
        assert_eq!(usable, vec![4]);
        assert!(!s.all_refused());
    }

    #[tokio::test]
    async fn a_401_waits_for_a_token_minted_after_it_not_another_old_slot() {
        let s = Arc::new(TokenStore::with_slots(2));
        s.publish(token_in(0, 1, MINUTE));
        s.publish(token_in(1, 2, MINUTE));
        // A revoke-all: slot 0's token is refused at generation 2 (the newest then). Slot 1's
        // token is usable as far as the store knows, but it is older than the 401.
        let used = s.slot(0).unwrap();
        let s2 = s.clone();
        let waiter =
            tokio::spawn(
                async move { s2.replacement_for(&used, 2, Duration::from_secs(10)).await },
            );
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.publish(token_in(0, 3, MINUTE));
        assert_eq!(waiter.await.unwrap().unwrap().generation, 3);
    }

    #[test]
    fn rotation_keeps_the_old_token_as_fallback() {
        let s = TokenStore::new();
        s.publish(token(1, MINUTE));
        assert!(s.fallback_valid(Instant::now()).is_none());
        s.publish_rotated(token(2, MINUTE), Duration::from_secs(30));
        assert_eq!(s.fallback_valid(Instant::now()).unwrap().generation, 1);
        assert!(
            s.fallback_valid(Instant::now() + Duration::from_secs(31))
                .is_none(),
            "only during the rotation window"
        );
        s.reject(&s.fallback_valid(Instant::now()).unwrap());
        assert!(
            s.fallback_valid(Instant::now()).is_none(),
            "a refused fallback is dropped"
        );
        assert_eq!(s.valid(Instant::now()).unwrap().generation, 2);
    }

    #[tokio::test]
    async fn waiters_see_newer_generation() {
        let s = Arc::new(TokenStore::new());
        s.publish(token(1, MINUTE));
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.wait_newer(1, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        s.publish(token(2, MINUTE));
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.generation, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_401_takes_the_replacement_another_request_already_brought() {
        let s = TokenStore::new();
        let old = Arc::new(token(1, MINUTE));
        s.publish(token(1, MINUTE));
        assert_eq!(
            s.newest_when_refused(&old),
            1,
            "not refused yet: the newest now"
        );
        s.reject(&old);
        s.publish(token(2, MINUTE));
        // A second request that used the same token meets its 401 only now.
        let after = s.newest_when_refused(&old);
        assert_eq!(after, 1);
        let replacement = s.replacement_for(&old, after, Duration::ZERO).await;
        assert_eq!(replacement.map(|t| t.generation), Some(2));
    }

    #[tokio::test]
    async fn wait_newer_times_out() {
        let s = TokenStore::new();
        s.publish(token(1, MINUTE));
        assert!(s.wait_newer(1, Duration::from_secs(5)).await.is_none());
    }
}
