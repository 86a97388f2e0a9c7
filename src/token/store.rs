//! The current token: an immutable record in an `ArcSwap`, read lock-free once per request.
//!
//! The store is also the meeting point between requests and the refresher: a request that saw a
//! 401 asks one question, [`TokenStore::replacement_for`] the token it used, and the store
//! reports the rejection to the refresher and answers with the pre-rotation fallback or a newer
//! token; the refresher is the only writer ([`TokenStore::publish`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::{watch, Notify};

/// Which client secret minted a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Current,
    Previous,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Current => "current",
            TokenSource::Previous => "previous",
        }
    }
}

/// One access token, never changed after creation.
pub struct Token {
    /// `Bearer <token>`, marked sensitive so HTTP libraries never log it.
    pub header: HeaderValue,
    pub fingerprint: String,
    pub generation: u64,
    pub acquired_at: Instant,
    pub expires_at: Instant,
    /// Wall-clock expiry, for `/status` and the expiry metric.
    pub expires_at_wall: SystemTime,
    pub lifetime: Duration,
    pub source: TokenSource,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("fingerprint", &self.fingerprint)
            .field("generation", &self.generation)
            .field("expires_at_wall", &self.expires_at_wall)
            .field("source", &self.source)
            .finish()
    }
}

impl Token {
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

/// The pre-rotation token and the end of the window in which it is tried.
struct Fallback {
    token: Arc<Token>,
    until: Instant,
}

/// Shared holder of the current token.
pub struct TokenStore {
    current: ArcSwapOption<Token>,
    /// The token in use before the last secret rotation, for the rotation window: a request
    /// whose new token gets a 401 then is replayed with it first.
    fallback: ArcSwapOption<Fallback>,
    /// Generation of the newest published token; waiters watch it.
    generation_tx: watch::Sender<u64>,
    /// Highest generation a request reported as rejected by the API (401).
    rejected: AtomicU64,
    /// Wakes the refresher.
    wake: Notify,
}

impl Default for TokenStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenStore {
    pub fn new() -> Self {
        TokenStore {
            current: ArcSwapOption::empty(),
            fallback: ArcSwapOption::empty(),
            generation_tx: watch::channel(0).0,
            rejected: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    /// The current token if it has not expired. An expired token is never handed out.
    pub fn valid(&self, now: Instant) -> Option<Arc<Token>> {
        self.current.load_full().filter(|t| t.is_valid_at(now))
    }

    /// The current token whatever its expiry (for `/status`).
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// The refresher's write: makes `token` current and wakes every waiter.
    pub fn publish(&self, token: Token) {
        let generation = token.generation;
        self.current.store(Some(Arc::new(token)));
        self.generation_tx.send_replace(generation);
    }

    /// Publishes the first token minted with a rotated secret; the token it replaces becomes
    /// the fallback for `window` (or until it expires). After the window a 401 means what it
    /// always means (refresh), not "the new secret is not active everywhere yet".
    pub fn publish_rotated(&self, token: Token, window: Duration) {
        if let Some(old) = self.current.load_full() {
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

    /// A request's token `used` was refused by the API (401). Reports it (one refresh however
    /// many requests report the same generation) and stops offering it as a fallback.
    pub fn reject(&self, used: &Token) {
        self.report_rejected(used.generation);
        self.drop_fallback(used.generation);
    }

    /// The token to replay a request with after `used` was refused, waiting up to `timeout`
    /// for the refresher: during a secret rotation the still-valid pre-rotation token comes
    /// first; otherwise a token newer than every token known refused. `None` when none
    /// arrives in time.
    pub async fn replacement_for(&self, used: &Token, timeout: Duration) -> Option<Arc<Token>> {
        self.reject(used);
        if let Some(fallback) = self
            .fallback_valid(Instant::now())
            .filter(|f| f.generation < used.generation)
        {
            return Some(fallback);
        }
        let refused = used.generation.max(self.rejected_generation());
        self.wait_newer(refused, timeout).await
    }

    pub fn generation(&self) -> u64 {
        *self.generation_tx.borrow()
    }

    /// A request saw a 401 with `generation`: ask the refresher for a newer token. Many reports
    /// of the same generation cause one refresh.
    fn report_rejected(&self, generation: u64) {
        let previous = self.rejected.fetch_max(generation, Ordering::AcqRel);
        if previous < generation {
            self.wake.notify_one();
        }
    }

    /// True while the API has refused the current token (a request reported a 401 for it) and
    /// no newer token is published: every request would fail.
    pub fn current_refused(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|t| self.rejected_generation() >= t.generation)
    }

    /// The highest generation reported rejected.
    pub fn rejected_generation(&self) -> u64 {
        self.rejected.load(Ordering::Acquire)
    }

    /// Asks the refresher to look at the token now (no token, or a reload happened).
    pub fn wake_refresher(&self) {
        self.wake.notify_one();
    }

    /// Resolves when someone called [`Self::reject`] or [`Self::wake_refresher`].
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Waits up to `timeout` for a valid token with a generation above `after`.
    pub async fn wait_newer(&self, after: u64, timeout: Duration) -> Option<Arc<Token>> {
        let mut rx = self.generation_tx.subscribe();
        let found = tokio::time::timeout(timeout, rx.wait_for(|g| *g > after)).await;
        match found {
            Ok(Ok(_)) => self.valid(Instant::now()).filter(|t| t.generation > after),
            _ => None,
        }
    }

    /// Waits up to `timeout` for any valid token.
    pub async fn wait_valid(&self, timeout: Duration) -> Option<Arc<Token>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.generation_tx.subscribe();
        loop {
            if let Some(t) = self.valid(Instant::now()) {
                return Some(t);
            }
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

    fn token(generation: u64, life: Duration) -> Token {
        let now = Instant::now();
        let mut header = HeaderValue::from_static("Bearer x");
        header.set_sensitive(true);
        Token {
            header,
            fingerprint: "sha256:000000000000".into(),
            generation,
            acquired_at: now,
            expires_at: now + life,
            expires_at_wall: SystemTime::now() + life,
            lifetime: life,
            source: TokenSource::Current,
        }
    }

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
        s.publish(token(1, Duration::from_secs(60)));
        s.publish_rotated(token(2, Duration::from_secs(60)), Duration::from_secs(30));
        let new = s.current().unwrap();
        let got = s
            .replacement_for(&new, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.generation, 1, "the pre-rotation token first");
        assert_eq!(s.rejected_generation(), 2);
        let s2 = s.clone();
        let waiter =
            tokio::spawn(async move { s2.replacement_for(&got, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        s.publish(token(3, Duration::from_secs(60)));
        assert_eq!(waiter.await.unwrap().unwrap().generation, 3);
        assert!(
            s.fallback_valid(Instant::now()).is_none(),
            "refused fallback dropped"
        );
    }

    #[test]
    fn rejected_reports_coalesce() {
        let s = TokenStore::new();
        s.report_rejected(3);
        s.report_rejected(3);
        s.report_rejected(2);
        assert_eq!(s.rejected_generation(), 3);
    }

    #[test]
    fn rotation_keeps_the_old_token_as_fallback() {
        let s = TokenStore::new();
        s.publish(token(1, Duration::from_secs(60)));
        assert!(s.fallback_valid(Instant::now()).is_none());
        s.publish_rotated(token(2, Duration::from_secs(60)), Duration::from_secs(30));
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
        s.publish(token(1, Duration::from_secs(60)));
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.wait_newer(1, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        s.publish(token(2, Duration::from_secs(60)));
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.generation, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_newer_times_out() {
        let s = TokenStore::new();
        s.publish(token(1, Duration::from_secs(60)));
        assert!(s.wait_newer(1, Duration::from_secs(5)).await.is_none());
    }
}
