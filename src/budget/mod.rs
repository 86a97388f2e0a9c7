//! Living within Genesys's per-token rate limit: every request takes one call from its token's
//! [`window::Window`] before it is sent. When the budget is spent, requests wait in a bounded
//! queue instead of being sent to collect a 429; when budget frees (the window resets), the
//! waiting applications are served fairly: the one that used least in the current period goes
//! first (weighted per application group), so a bursting application waits while steady ones
//! keep flowing. A request that cannot be served within `max_queue_wait_ms` gets the proxy's
//! own 429 with an honest `Retry-After`.

pub mod window;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, Notify};

use crate::config::{BudgetSettings, Live};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sync::lock;
use crate::token::store::Token;
use window::Window;

/// Who a request is accounted to for fair sharing: a configured application group, or the
/// client address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    App(usize),
    Address(IpAddr),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Sent at once, or after waiting in the queue (`queued`).
    Go { queued: bool },
    Refused {
        why: Refused,
        /// When budget is expected back: the honest `Retry-After`.
        retry_after: Duration,
    },
}

struct Waiter {
    id: u64,
    grant: oneshot::Sender<()>,
}

/// Waiting requests by client, and what each client used in the current fairness period.
#[derive(Default)]
struct Queue {
    waiting: BTreeMap<ClientKey, VecDeque<Waiter>>,
    len: usize,
    usage: HashMap<ClientKey, u64>,
    period_ends: Option<Instant>,
}

/// The budget of the proxy's token (one window; the token pool will hold one per slot).
pub struct Budget {
    window: Mutex<Window>,
    queue: Mutex<Queue>,
    /// Wakes the dispatcher: a waiter arrived, or the window changed.
    changed: Notify,
    live: Arc<ArcSwap<Live>>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

impl Budget {
    pub fn new(live: Arc<ArcSwap<Live>>, metrics: Arc<Metrics>) -> Self {
        let b = &live.load().budget;
        let window = Window::new(0, b.requests_per_window, b.window);
        Budget {
            window: Mutex::new(window),
            queue: Mutex::new(Queue::default()),
            changed: Notify::new(),
            live,
            metrics,
            next_id: AtomicU64::new(0),
        }
    }

    /// The window of `token`: a newer token starts a fresh one.
    fn window_for<'a>(&'a self, token: &Token) -> std::sync::MutexGuard<'a, Window> {
        let mut w = lock(&self.window);
        if w.generation != token.generation {
            let b = &self.live.load().budget;
            *w = Window::new(token.generation, b.requests_per_window, b.window);
        }
        w
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

    /// Takes one call of `token`'s budget for `client`, waiting (fairly) up to `wait` if it is
    /// spent.
    pub async fn admit(&self, client: ClientKey, token: &Token, wait: Duration) -> Admit {
        let settings = self.live.load().budget.clone();
        let now = Instant::now();
        let (id, rx) = {
            let mut q = lock(&self.queue);
            let mut w = self.window_for(token);
            if q.len == 0 && w.take(now) {
                *q.usage.entry(client).or_default() += 1;
                return Admit::Go { queued: false };
            }
            let retry_after = w
                .free_at(now)
                .saturating_duration_since(now)
                .max(Duration::from_secs(1));
            if q.len >= settings.max_queue_length {
                return Admit::Refused {
                    why: Refused::QueueFull,
                    retry_after,
                };
            }
            if w.free_at(now) > now + wait {
                return Admit::Refused {
                    why: Refused::QueueTimeout,
                    retry_after,
                };
            }
            let (tx, rx) = oneshot::channel();
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            q.waiting
                .entry(client.clone())
                .or_default()
                .push_back(Waiter { id, grant: tx });
            q.len += 1;
            self.metrics.budget_queue_depth.set(q.len as i64);
            (id, rx)
        };
        self.changed.notify_one();
        let started = Instant::now();
        let granted = tokio::time::timeout(wait, rx).await;
        self.metrics
            .budget_queue_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        if matches!(granted, Ok(Ok(()))) {
            return Admit::Go { queued: true };
        }
        // Timed out: leave the queue, unless a grant raced the timeout.
        let mut q = lock(&self.queue);
        let queue = q.waiting.get_mut(&client);
        let was_waiting = queue
            .map(|d| {
                let before = d.len();
                d.retain(|w| w.id != id);
                before != d.len()
            })
            .unwrap_or(false);
        if was_waiting {
            q.len -= 1;
            self.metrics.budget_queue_depth.set(q.len as i64);
            let now = Instant::now();
            let retry_after = lock(&self.window)
                .free_at(now)
                .saturating_duration_since(now)
                .max(Duration::from_secs(1));
            return Admit::Refused {
                why: Refused::QueueTimeout,
                retry_after,
            };
        }
        Admit::Go { queued: true }
    }

    /// The `app` label of a client: its group's name, or `other`.
    pub fn app_label<'a>(settings: &'a BudgetSettings, key: &ClientKey) -> &'a str {
        match key {
            ClientKey::App(i) => settings.apps.get(*i).map_or("other", |a| a.name.as_str()),
            ClientKey::Address(_) => "other",
        }
    }

    /// What Genesys said about `token`'s window on an answer.
    pub fn observe(&self, token: &Token, count: u64, allowed: u64, reset_seconds: Option<u64>) {
        let now = Instant::now();
        let remaining = {
            let mut w = self.window_for(token);
            w.observe(count, allowed, reset_seconds, now);
            w.remaining(now)
        };
        self.metrics
            .upstream_ratelimit_remaining
            .set(remaining as i64);
        self.changed.notify_one();
    }

    /// Genesys answered 429 for `token`: nothing left until `retry_after`.
    pub fn exhausted(&self, token: &Token, retry_after: Duration) {
        self.window_for(token).exhaust(retry_after, Instant::now());
        self.metrics.upstream_ratelimit_remaining.set(0);
        self.changed.notify_one();
    }

    /// Serves waiting requests whenever budget frees; runs until shutdown.
    pub async fn dispatch(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            let next = self.grant_waiters(Instant::now());
            tokio::select! {
                _ = sleep_until(next) => {}
                _ = self.changed.notified() => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// Grants budget to waiters, least-used client first; returns when to look again.
    fn grant_waiters(&self, now: Instant) -> Option<Instant> {
        let settings = self.live.load().budget.clone();
        let mut q = lock(&self.queue);
        if q.period_ends.is_some_and(|t| now >= t) {
            q.usage.clear();
            q.period_ends = None;
        }
        q.period_ends.get_or_insert(now + settings.window);
        let mut w = lock(&self.window);
        while q.len > 0 {
            let Some(client) = next_client(&q, &settings) else {
                break;
            };
            if !w.take(now) {
                break;
            }
            let waiter = q.waiting.get_mut(&client).and_then(VecDeque::pop_front);
            if q.waiting.get(&client).is_some_and(VecDeque::is_empty) {
                q.waiting.remove(&client);
            }
            let Some(waiter) = waiter else { continue };
            q.len -= 1;
            if waiter.grant.send(()).is_ok() {
                *q.usage.entry(client).or_default() += 1;
            } else {
                w.give_back();
            }
        }
        self.metrics.budget_queue_depth.set(q.len as i64);
        (q.len > 0).then(|| w.free_at(now).max(now + Duration::from_millis(1)))
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The waiting client that used least in this period, weighted by its application group.
fn next_client(q: &Queue, settings: &BudgetSettings) -> Option<ClientKey> {
    let weight = |k: &ClientKey| match k {
        ClientKey::App(i) => settings.apps.get(*i).map_or(1, |a| a.weight.max(1)),
        ClientKey::Address(_) => 1,
    };
    q.waiting
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(k, _)| k)
        .min_by(|a, b| {
            let ua = q.usage.get(*a).copied().unwrap_or(0) * weight(b);
            let ub = q.usage.get(*b).copied().unwrap_or(0) * weight(a);
            ua.cmp(&ub)
        })
        .cloned()
}
