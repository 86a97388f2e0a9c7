//! Living within Genesys's per-token rate limit: every request takes one call from a token's
//! [`window::Window`] before it is sent, choosing the pool's token with the most budget left.
//! When the budget is spent, requests wait in a bounded queue instead of being sent to collect
//! a 429; when budget frees (the window resets), the waiting applications are served fairly:
//! the one that used least recently goes first (weighted per application group), so a
//! bursting application waits while steady ones keep flowing. A request that cannot be served
//! within `max_queue_wait_ms` gets the proxy's own 429 with an honest `Retry-After`.
//!
//! The request path takes no lock while budget is plentiful and nobody waits: a call comes
//! from the slot's [`atomic::Tickets`] (paced credit the window already counted), the
//! client's use goes to its [`atomic::Meter`], and an answer's rate-limit headers to the
//! slot's [`atomic::Reported`]. The windows' lock is taken only to refill tickets, to queue,
//! by the dispatcher, and by the 1 s gauge tick, each time applying what was reported.
//!
//! A 429 that came while the token still had budget is an endpoint's or the org's limit, not
//! the token's: [`holds`] holds that route until `Retry-After` and leaves the tokens alone.

mod atomic;
mod book;
mod dispatch;
pub mod holds;
pub use dispatch::dispatch;
pub mod window;

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, Notify};

use crate::config::{BudgetSettings, Live};
use crate::metrics::Metrics;
use crate::sync::lock;
use crate::token::store::{Token, TokenStore};
use atomic::{Clock, Reported, Tickets};
use book::Book;
use window::Window;

/// Who a request is accounted to for fair sharing: an authenticated `[[app]]`, a configured
/// application group (`[[budget.app]]`, by address), or the client address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    Caller(crate::apps::CallerKey),
    App(usize),
    Address(IpAddr),
}

impl ClientKey {
    /// Its share relative to others when they contend.
    pub fn weight(&self, settings: &BudgetSettings) -> u64 {
        match self {
            ClientKey::Caller(c) => u64::from(c.weight.max(1)),
            ClientKey::App(i) => settings.apps.get(*i).map_or(1, |a| a.weight.max(1)),
            ClientKey::Address(_) => 1,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is at `max_queue_length`.
    QueueFull,
    /// Budget would not free within the request's wait.
    QueueTimeout,
}

/// The answer to [`Budget::admit`].
#[derive(Debug, Clone)]
pub enum Admit {
    /// Send with `token`, at once or after waiting in the queue (`queued`).
    Go { queued: bool, token: Arc<Token> },
    Refused {
        why: Refused,
        /// When budget is expected back: the honest `Retry-After`.
        retry_after: Duration,
    },
    /// No token became valid within the token wait (the proxy's 503 `proxy.no_token`).
    NoToken,
}

struct Waiter {
    id: u64,
    grant: oneshot::Sender<Arc<Token>>,
}

/// Waiting requests by client.
#[derive(Default)]
struct Queue {
    waiting: BTreeMap<ClientKey, VecDeque<Waiter>>,
    len: usize,
}

/// The fairness horizon for a budget window: a twentieth of it, within 1 to 10 s.
pub(crate) fn horizon(window: Duration) -> Duration {
    (window / 20).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Clients whose usage is remembered at most (memory stays bounded whatever number of
/// addresses is seen): past it, the faded ones are forgotten first, then all.
const USAGE_CLIENTS_MAX: usize = 4096;

impl Queue {
    /// The client holding the most queue places for its weight, and that weighted count.
    fn heaviest(&self, weight: impl Fn(&ClientKey) -> u64) -> Option<(ClientKey, u64, u64)> {
        self.waiting
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|(k, d)| (k.clone(), d.len() as u64, weight(k)))
            .max_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)))
    }
}

/// Tickets are issued only when at least this much paced credit is there: with plenty of
/// budget requests pass without a lock; near a spent budget (and at small limits) every call
/// is decided under the lock, where the fair queue sees it.
const TICKETS_MIN: u64 = 8;

/// The budget of the pool's tokens: one window per slot.
pub struct Budget {
    store: Arc<TokenStore>,
    windows: Mutex<Vec<Window>>,
    /// Per slot: calls taken without the lock, and what Genesys reported since.
    tickets: Vec<Tickets>,
    reported: Vec<Reported>,
    clock: Clock,
    book: Book,
    queue: Mutex<Queue>,
    /// Wakes the dispatcher: a waiter arrived, or the window changed while some wait.
    changed: Notify,
    /// `Queue::len` as of its last change, read without the lock: a window change wakes the
    /// dispatcher only when requests wait (a wake-up per answer costs a cross-thread switch).
    queued: AtomicUsize,
    live: Arc<ArcSwap<Live>>,
    metrics: Arc<Metrics>,
    /// `token_pool_budget_remaining{slot}` per slot, looked up once.
    slot_gauges: Vec<prometheus::IntGauge>,
    next_id: AtomicU64,
    /// Routes held after an endpoint or org 429 (not the token's budget).
    pub holds: holds::RouteHolds,
}

impl Budget {
    pub fn new(store: Arc<TokenStore>, live: Arc<ArcSwap<Live>>, metrics: Arc<Metrics>) -> Self {
        let b = &live.load().budget;
        let windows = (0..store.slots())
            .map(|_| Window::new(0, b.requests_per_window, b.window))
            .collect();
        let slot_gauges = (0..store.slots())
            .map(|slot| {
                metrics
                    .token_pool_budget_remaining
                    .with_label_values(&[&slot.to_string()])
            })
            .collect();
        let clock = Clock::new();
        Budget {
            tickets: (0..store.slots()).map(|_| Tickets::default()).collect(),
            reported: (0..store.slots()).map(|_| Reported::default()).collect(),
            book: Book::new(clock, b.window),
            clock,
            store,
            slot_gauges,
            windows: Mutex::new(windows),
            queue: Mutex::new(Queue::default()),
            changed: Notify::new(),
            queued: AtomicUsize::new(0),
            live,
            metrics,
            next_id: AtomicU64::new(0),
            holds: holds::RouteHolds::default(),
        }
    }

    /// The windows, each matched to its slot's `token` first (a newer token starts a fresh
    /// window, and its slot's tickets are void), with what Genesys reported since applied.
    fn sync<'a>(&'a self, tokens: &[Arc<Token>]) -> std::sync::MutexGuard<'a, Vec<Window>> {
        let mut windows = lock(&self.windows);
        for t in tokens {
            if let Some(w) = windows.get_mut(t.slot) {
                if w.generation != t.generation {
                    let b = &self.live.load().budget;
                    *w = Window::new(t.generation, b.requests_per_window, b.window);
                    self.tickets[t.slot].void();
                }
            }
        }
        self.apply_reports(&mut windows);
        windows
    }

    /// Applies what answers reported (lock held). A report whose window ended already
    /// belongs to a window that is over: it says nothing of the current one. Tickets not taken
    /// yet are counted as used in the window but not by Genesys, so they are added to its
    /// count; when Genesys leaves less room than they promise, they are given back.
    fn apply_reports(&self, windows: &mut [Window]) {
        let now = Instant::now();
        for (slot, w) in windows.iter_mut().enumerate() {
            let Some(r) = self.reported[slot].take(&self.clock) else {
                continue;
            };
            if r.ends_at.is_some_and(|t| t <= now) {
                continue;
            }
            let tickets = &self.tickets[slot];
            let unspent = tickets.live(w.generation, self.clock.ms(now));
            // Rounded up, as Genesys rounds `inin-ratelimit-reset`: a window thought to end
            // early would let calls out that Genesys still counts in the old one.
            let reset = r.ends_at.map(|t| {
                let ms = t.saturating_duration_since(now).as_millis() as u64;
                ms.div_ceil(1000)
            });
            w.observe(r.count + unspent, r.allowed, reset, now);
            if unspent > 0 && r.allowed.saturating_sub(r.count) < unspent {
                w.give_back_many(tickets.void());
            } else if let Some(end) = w.resets_at {
                tickets.shorten(self.clock.ms(end));
            }
        }
    }

    /// The lock-free path: a ticket from the slot with the most left, if nobody waits and
    /// that slot's token is still the one the tickets were issued for and usable.
    fn take_ticket(&self, now: Instant) -> Option<Arc<Token>> {
        if self.queued.load(Ordering::Acquire) > 0 {
            return None;
        }
        let slot = self.ticket_slot()?;
        let tickets = &self.tickets[slot];
        if !tickets.take(self.clock.ms(now)) {
            return None;
        }
        let token = self.store.slot(slot)?;
        let fresh = token.generation == tickets.generation() && self.store.serves(&token, now);
        fresh.then_some(token)
    }

    /// The slot a request takes a ticket from: the first, from this thread's own starting
    /// slot, with at least half of the most any slot holds. Requests still spread over the
    /// pool by budget left (within a factor of two), and two workers keep to different slots
    /// while the tickets are balanced, so they rarely contend for one.
    fn ticket_slot(&self) -> Option<usize> {
        thread_local! {
            static START: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            };
        }
        let n = self.tickets.len();
        let most = self.tickets.iter().map(Tickets::count).max()?;
        if most == 0 {
            return None;
        }
        let start = START.with(|s| *s) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&slot| self.tickets[slot].count() * 2 >= most)
    }

    /// Moves each slot's paced credit into its tickets (lock held, nobody waiting), so the
    /// next requests need no lock. The window counts them as used at once.
    fn refill_tickets(&self, windows: &mut [Window], tokens: &[Arc<Token>], now: Instant) {
        for t in tokens {
            let (Some(w), Some(tickets)) = (windows.get_mut(t.slot), self.tickets.get(t.slot))
            else {
                continue;
            };
            let now_ms = self.clock.ms(now);
            if tickets.live(t.generation, now_ms) > 0 {
                continue;
            }
            // Nothing good is left: what remains belongs to another token or to a window
            // that is over, and is not given back.
            let n = w.take_many(now, TICKETS_MIN);
            let until = w.resets_at.map_or(0, |end| self.clock.ms(end));
            tickets.refill(t.generation, n, until);
        }
    }

    /// Gives every slot's tickets back to its window (lock held): requests are about to
    /// wait, and the fair queue, not the first to come, decides who gets the budget.
    fn void_tickets(&self, windows: &mut [Window]) {
        let now_ms = self.clock.ms(Instant::now());
        for (slot, w) in windows.iter_mut().enumerate() {
            let t = &self.tickets[slot];
            let good = t.live(w.generation, now_ms) > 0;
            let voided = t.void();
            if good {
                w.give_back_many(voided);
            }
        }
    }

    /// Takes a call from the first usable token (in slot order) with at least half its
    /// window left, else from the one with the most left. Light traffic so stays on as few
    /// tokens as it needs and the others rest (an org's idle timeout would kill tokens that
    /// each get a trickle); heavier traffic spills over to the next slot as the first drains,
    /// and once every token is below half the pool is spread by budget left as before.
    fn take_best(
        windows: &mut [Window],
        tokens: &[Arc<Token>],
        now: Instant,
    ) -> Option<Arc<Token>> {
        let plenty = |windows: &[Window], t: &Arc<Token>| {
            windows
                .get(t.slot)
                .is_some_and(|w| w.remaining(now) * 2 >= w.allowed.max(1))
        };
        if let Some(first) = tokens.iter().find(|t| plenty(windows, t)) {
            if windows.get_mut(first.slot).is_some_and(|w| w.take(now)) {
                return Some(first.clone());
            }
        }
        let most_left = |windows: &[Window], t: &Arc<Token>| {
            std::cmp::Reverse(windows.get(t.slot).map_or(0, |w| w.remaining(now)))
        };
        let mut order: Vec<&Arc<Token>> = tokens.iter().collect();
        order.sort_by_key(|t| most_left(windows, t));
        order
            .into_iter()
            .find(|t| windows.get_mut(t.slot).is_some_and(|w| w.take(now)))
            .cloned()
    }

    /// No usable token has half its window left, or requests are about to wait (`queueing`:
    /// the paced budget cannot serve them now): ask for the next resting slot, so it is
    /// minted while the tokens in use still serve (ahead of need, not after a 429).
    fn want_more_if_pressed(
        &self,
        windows: &[Window],
        tokens: &[Arc<Token>],
        now: Instant,
        queueing: bool,
    ) {
        let pressed = tokens.len() < self.store.slots()
            && (queueing
                || tokens.iter().all(|t| {
                    windows
                        .get(t.slot)
                        .is_none_or(|w| w.remaining(now) * 2 < w.allowed.max(1))
                }));
        if pressed {
            self.store.want_more(now);
        }
    }

    /// When any of `tokens` can take a call again.
    fn free_at(windows: &[Window], tokens: &[Arc<Token>], now: Instant) -> Instant {
        tokens
            .iter()
            .filter_map(|t| windows.get(t.slot))
            .map(|w| w.free_at(now))
            .min()
            .unwrap_or(now)
    }

    /// The usable tokens, or `fallback` when none is (it is about to be replaced).
    fn candidates(&self, fallback: &Arc<Token>, now: Instant) -> Vec<Arc<Token>> {
        let tokens = self.store.usable(now);
        if tokens.is_empty() {
            vec![fallback.clone()]
        } else {
            tokens
        }
    }

    /// Which client a request from `ip` counts for.
    pub fn client_key(settings: &BudgetSettings, ip: IpAddr) -> ClientKey {
        let ip = ip.to_canonical();
        settings
            .apps
            .iter()
            .position(|app| app.cidrs.iter().any(|net| net.contains(&ip)))
            .map_or(ClientKey::Address(ip), ClientKey::App)
    }

    /// A call taken from a ticket, without a lock, counted for `client`.
    fn ticketed(&self, client: &ClientKey, now: Instant) -> Option<Admit> {
        let token = self.take_ticket(now)?;
        self.book.used(client, now);
        Some(Admit::Go {
            queued: false,
            token,
        })
    }

    /// The one place a request gets its token: a ticket (no lock) if there is one, else the
    /// locked path of [`Budget::admit`], after waiting up to `token_wait` for a valid token
    /// when the pool holds none yet (start-up, or every token refused).
    pub async fn checkout(
        &self,
        settings: &BudgetSettings,
        client: ClientKey,
        wait: Duration,
        token_wait: Duration,
    ) -> Admit {
        let now = Instant::now();
        if let Some(go) = self.ticketed(&client, now) {
            return go;
        }
        let fallback = match self.store.valid(now) {
            Some(t) => t,
            None => match self.store.wait_valid(token_wait).await {
                Some(t) => t,
                None => return Admit::NoToken,
            },
        };
        self.admit_locked(settings, client, &fallback, wait).await
    }

    /// Takes one call for `client` from the pool's token with the most budget left, waiting
    /// (fairly) up to `wait` if every token's budget is spent. `fallback` is used when no token
    /// is usable at this instant.
    ///
    /// `settings` is the request's snapshot of the live settings.
    pub async fn admit(
        &self,
        settings: &BudgetSettings,
        client: ClientKey,
        fallback: &Arc<Token>,
        wait: Duration,
    ) -> Admit {
        match self.ticketed(&client, Instant::now()) {
            Some(go) => go,
            None => self.admit_locked(settings, client, fallback, wait).await,
        }
    }

    /// [`Budget::admit`] past the tickets: the locked path, and the wait in the queue.
    async fn admit_locked(
        &self,
        settings: &BudgetSettings,
        client: ClientKey,
        fallback: &Arc<Token>,
        wait: Duration,
    ) -> Admit {
        let now = Instant::now();
        let (id, rx) = match self.take_or_enqueue(settings, &client, fallback, wait, now) {
            Ok(place) => place,
            Err(admit) => {
                if matches!(admit, Admit::Go { .. }) {
                    self.book.used(&client, now);
                }
                return admit;
            }
        };
        self.changed.notify_one();
        let started = Instant::now();
        // Dropped before its answer (the request ended: its client left), the waiter leaves
        // the queue and gives back a grant that raced the drop.
        let mut place = Place {
            budget: self,
            client: Some(client),
            id,
            rx: Some(rx),
        };
        let granted = match place.rx.as_mut() {
            Some(rx) => tokio::time::timeout(wait, rx).await,
            None => return self.closed_admit(),
        };
        self.metrics
            .budget_queue_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        let Some((client, rx)) = place.disarm() else {
            return self.closed_admit();
        };
        match granted {
            Ok(Ok(token)) => Admit::Go {
                queued: true,
                token,
            },
            // Its place was given to a client below its share (see `make_room`).
            Ok(Err(_)) => Admit::Refused {
                why: Refused::QueueFull,
                retry_after: self.retry_after(fallback),
            },
            Err(_) => self.timed_out(client, id, rx, fallback),
        }
    }

    /// The locked path: a call from the window (refilling the tickets) when nobody waits, or
    /// a place in the queue (`Ok`), or the refusal. Tickets are voided before anyone queues:
    /// nobody takes budget past the queue.
    fn take_or_enqueue(
        &self,
        settings: &BudgetSettings,
        client: &ClientKey,
        fallback: &Arc<Token>,
        wait: Duration,
        now: Instant,
    ) -> Result<(u64, oneshot::Receiver<Arc<Token>>), Admit> {
        let go = |token| Admit::Go {
            queued: false,
            token,
        };
        let mut q = lock(&self.queue);
        let tokens = self.candidates(fallback, now);
        let mut windows = self.sync(&tokens);
        if q.len == 0 {
            if let Some(token) = Self::take_best(&mut windows, &tokens, now) {
                // Tickets for the slot served from only: the lock-free path stays on it.
                self.refill_tickets(&mut windows, std::slice::from_ref(&token), now);
                self.want_more_if_pressed(&windows, &tokens, now, false);
                return Err(go(token));
            }
            // Tickets given back may be just what is missing.
            self.void_tickets(&mut windows);
            if let Some(token) = Self::take_best(&mut windows, &tokens, now) {
                self.want_more_if_pressed(&windows, &tokens, now, false);
                return Err(go(token));
            }
        }
        // About to queue or refuse: the tokens in use cannot serve now.
        self.want_more_if_pressed(&windows, &tokens, now, true);
        let free_at = Self::free_at(&windows, &tokens, now);
        let retry_after = free_at
            .saturating_duration_since(now)
            .max(Duration::from_secs(1));
        if q.len >= settings.max_queue_length && !Self::make_room(&mut q, settings, client) {
            return Err(Admit::Refused {
                why: Refused::QueueFull,
                retry_after,
            });
        }
        if free_at > now + wait {
            return Err(Admit::Refused {
                why: Refused::QueueTimeout,
                retry_after,
            });
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        q.waiting
            .entry(client.clone())
            .or_default()
            .push_back(Waiter { id, grant: tx });
        q.len += 1;
        self.set_depth(&q);
        Ok((id, rx))
    }

    /// When budget frees next, at least a second from now (a 429's `Retry-After`).
    fn retry_after(&self, fallback: &Arc<Token>) -> Duration {
        let now = Instant::now();
        let tokens = self.candidates(fallback, now);
        Self::free_at(&self.sync(&tokens), &tokens, now)
            .saturating_duration_since(now)
            .max(Duration::from_secs(1))
    }

    /// The queue is full: a client holding fewer places for its weight than the heaviest
    /// holder takes the place of that holder's newest waiter (which is answered 429
    /// `queue_full`), so one client's burst cannot hold every place while a steady client is
    /// refused at the door. False when `client` is the heaviest itself (it gets the 429).
    fn make_room(q: &mut Queue, settings: &BudgetSettings, client: &ClientKey) -> bool {
        let weight = |k: &ClientKey| k.weight(settings);
        let Some((heavy, held, heavy_weight)) = q.heaviest(weight) else {
            return false;
        };
        let mine = q.waiting.get(client).map_or(0, |d| d.len() as u64) + 1;
        // Weighted: mine / my_weight < held / heavy_weight, after taking the place.
        if heavy == *client || mine * heavy_weight >= held * weight(client) {
            return false;
        }
        let evicted = q.waiting.get_mut(&heavy).and_then(VecDeque::pop_back);
        if q.waiting.get(&heavy).is_some_and(VecDeque::is_empty) {
            q.waiting.remove(&heavy);
        }
        // Dropping its sender answers the evicted waiter: it is refused `queue_full`.
        match evicted {
            Some(_) => {
                q.len -= 1;
                true
            }
            None => false,
        }
    }

    /// Not reached: a place holds its client and receiver until it is disarmed, once.
    fn closed_admit(&self) -> Admit {
        Admit::Refused {
            why: Refused::QueueTimeout,
            retry_after: Duration::from_secs(1),
        }
    }

    /// A waiter that left (its request future was dropped): out of the queue, and a grant
    /// that raced it given back to its window.
    fn left(&self, client: ClientKey, id: u64, mut rx: oneshot::Receiver<Arc<Token>>) {
        let mut q = lock(&self.queue);
        let was_waiting = q.waiting.get_mut(&client).is_some_and(|d| {
            let before = d.len();
            d.retain(|w| w.id != id);
            before != d.len()
        });
        if q.waiting.get(&client).is_some_and(VecDeque::is_empty) {
            q.waiting.remove(&client);
        }
        self.metrics.budget_queue_abandoned_total.inc();
        if was_waiting {
            q.len -= 1;
            self.set_depth(&q);
            return;
        }
        drop(q);
        if let Ok(token) = rx.try_recv() {
            if let Some(w) = lock(&self.windows).get_mut(token.slot) {
                w.give_back();
            }
        }
    }

    /// A waiter's wait is over without a grant: it leaves the queue, unless a grant raced the
    /// timeout (then it is in the channel).
    fn timed_out(
        &self,
        client: ClientKey,
        id: u64,
        mut rx: oneshot::Receiver<Arc<Token>>,
        fallback: &Arc<Token>,
    ) -> Admit {
        let mut q = lock(&self.queue);
        let was_waiting = q.waiting.get_mut(&client).is_some_and(|d| {
            let before = d.len();
            d.retain(|w| w.id != id);
            before != d.len()
        });
        if was_waiting {
            q.len -= 1;
            self.set_depth(&q);
        } else {
            drop(q);
            if let Ok(token) = rx.try_recv() {
                return Admit::Go {
                    queued: true,
                    token,
                };
            }
        }
        let now = Instant::now();
        let tokens = self.candidates(fallback, now);
        let retry_after = Self::free_at(&self.sync(&tokens), &tokens, now)
            .saturating_duration_since(now)
            .max(Duration::from_secs(1));
        Admit::Refused {
            why: Refused::QueueTimeout,
            retry_after,
        }
    }

    /// The `app` label of a client: its group's name, or `other`.
    pub fn app_label<'a>(settings: &'a BudgetSettings, key: &'a ClientKey) -> &'a str {
        match key {
            ClientKey::Caller(c) => &c.name,
            ClientKey::App(i) => settings.apps.get(*i).map_or("other", |a| a.name.as_str()),
            ClientKey::Address(_) => "other",
        }
    }

    /// What Genesys said about `token`'s window on an answer.
    /// Recorded without a lock; the window hears of it from the next holder of its lock.
    pub fn observe(
        &self,
        token: &Arc<Token>,
        count: u64,
        allowed: u64,
        reset_seconds: Option<u64>,
    ) {
        let Some(reported) = self.reported.get(token.slot) else {
            return;
        };
        // An answer for a token its slot no longer holds says nothing of the slot's window.
        if self
            .store
            .slot(token.slot)
            .is_none_or(|t| t.generation != token.generation)
        {
            return;
        }
        let now = Instant::now();
        let ends = reset_seconds.map(|r| now + Duration::from_secs(r));
        reported.record(&self.clock, count, allowed, ends);
        // Less room at Genesys than the tickets out promise: correct the window now, before
        // they send requests to collect a 429 (rare: another user of the client, or a lower
        // limit than configured).
        let unspent = self.tickets[token.slot].live(token.generation, self.clock.ms(now));
        if allowed.saturating_sub(count) < unspent {
            drop(self.sync(std::slice::from_ref(token)));
        }
        self.window_changed();
    }

    /// Sets the budget gauges and prunes faded clients; the dispatcher calls it every second
    /// (not on every answer).
    pub(crate) fn tick(&self, now: Instant) {
        self.book.roll(now, self.live.load().budget.window);
        let mut windows = lock(&self.windows);
        self.apply_reports(&mut windows);
        self.publish_remaining(&windows, now);
    }

    /// `[cluster]`: each held token with the calls taken with it since the last time (they
    /// go to the shared count in Redis).
    pub fn take_unshared(&self) -> Vec<(Arc<Token>, u64)> {
        let tokens: Vec<Arc<Token>> = (0..self.store.slots())
            .filter_map(|slot| self.store.slot(slot))
            .collect();
        let mut windows = self.sync(&tokens);
        tokens
            .into_iter()
            .map(|t| {
                let n = windows.get_mut(t.slot).map_or(0, Window::take_unshared);
                let tickets = self.tickets.get(t.slot).map_or(0, Tickets::take_taken);
                (t, n + tickets)
            })
            .collect()
    }

    /// `[cluster]`: `total` calls were made with `token` by all replicas together, in a window
    /// ending in `reset`: counted like Genesys's own `inin-ratelimit-count`. A count outside
    /// `[0, allowed]` cannot be true (a broken or hostile writer to Redis: one far above the
    /// limit once made every replica refuse every request) and is ignored: false.
    pub fn observe_shared(&self, token: &Arc<Token>, total: i64, reset: Duration) -> bool {
        let allowed = lock(&self.windows)
            .get(token.slot)
            .map_or(self.live.load().budget.requests_per_window, |w| w.allowed);
        let Ok(total) = u64::try_from(total) else {
            return false;
        };
        if total > allowed {
            return false;
        }
        let reset_seconds = reset.as_millis().div_ceil(1000) as u64;
        self.observe(token, total, allowed, Some(reset_seconds));
        true
    }

    /// Genesys answered 429 for `token`: nothing left until `retry_after`.
    pub fn exhausted(&self, token: &Arc<Token>, retry_after: Duration) {
        let now = Instant::now();
        let mut windows = self.sync(std::slice::from_ref(token));
        if let Some(w) = windows.get_mut(token.slot) {
            if w.generation == token.generation {
                w.exhaust(retry_after, now);
                self.tickets[token.slot].void();
            }
        }
        self.publish_remaining(&windows, now);
        drop(windows);
        self.window_changed();
    }

    /// What the budget knows `token` has left in its window (from the answers before), if
    /// its slot still holds it.
    pub fn left_of(&self, token: &Arc<Token>) -> Option<u64> {
        let current = self
            .store
            .slot(token.slot)
            .is_some_and(|t| t.generation == token.generation);
        current
            .then(|| self.remaining().get(token.slot).copied())
            .flatten()
    }

    /// The calls per window Genesys allows a token, as last reported (the configured
    /// `requests_per_window` until it reports): the proxy's own 429 says it like Genesys.
    pub fn allowed(&self) -> u64 {
        lock(&self.windows)
            .iter()
            .map(|w| w.allowed)
            .max()
            .unwrap_or(self.live.load().budget.requests_per_window)
    }

    /// Budget left per pool slot, for `/status`.
    /// Tickets handed out but not taken yet count as left.
    pub fn remaining(&self) -> Vec<u64> {
        let now = Instant::now();
        let mut windows = lock(&self.windows);
        self.apply_reports(&mut windows);
        self.left_per_slot(&windows, now)
    }

    fn left_per_slot(&self, windows: &[Window], now: Instant) -> Vec<u64> {
        windows
            .iter()
            .zip(&self.tickets)
            .map(|(w, t)| {
                let unspent = t.live(w.generation, self.clock.ms(now));
                (w.remaining(now) + unspent).min(w.allowed)
            })
            .collect()
    }

    fn set_depth(&self, q: &Queue) {
        self.queued.store(q.len, Ordering::SeqCst);
        self.metrics.budget_queue_depth.set(q.len as i64);
    }

    /// A window changed: budget may have freed for waiting requests. A request that starts
    /// waiting after the load wakes the dispatcher itself, and it reads the changed window.
    fn window_changed(&self) {
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.changed.notify_one();
        }
    }

    fn publish_remaining(&self, windows: &[Window], now: Instant) {
        let mut total = 0;
        for (left, gauge) in self
            .left_per_slot(windows, now)
            .into_iter()
            .zip(&self.slot_gauges)
        {
            total += left;
            gauge.set(left as i64);
        }
        self.metrics.upstream_ratelimit_remaining.set(total as i64);
    }
}

#[cfg(test)]
use dispatch::next_client;

#[cfg(test)]
mod tests;

/// A request's place in the queue while it waits; see [`Budget::admit`].
struct Place<'a> {
    budget: &'a Budget,
    client: Option<ClientKey>,
    id: u64,
    rx: Option<oneshot::Receiver<Arc<Token>>>,
}

impl Place<'_> {
    /// The wait ended normally: the caller settles the place itself.
    fn disarm(&mut self) -> Option<(ClientKey, oneshot::Receiver<Arc<Token>>)> {
        Some((self.client.take()?, self.rx.take()?))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let (Some(client), Some(rx)) = (self.client.take(), self.rx.take()) {
            self.budget.left(client, self.id, rx);
        }
    }
}
