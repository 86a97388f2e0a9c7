//! The dispatcher: grants budget to waiting requests whenever it frees, least-used client
//! first (weighted per application group).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Book, Budget, ClientKey, Queue};
use crate::config::BudgetSettings;
use crate::shutdown::Shutdown;
use crate::sync::lock;

/// Serves waiting requests whenever budget frees; runs until shutdown.
/// Every second it also sets the budget gauges (not on every answer).
pub async fn dispatch(budget: Arc<Budget>, mut shutdown: Shutdown) {
    let mut gauges = tokio::time::interval(Duration::from_secs(1));
    gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = grant_waiters(&budget, Instant::now());
        tokio::select! {
            _ = sleep_until(next) => {}
            _ = budget.changed.notified() => {}
            _ = gauges.tick() => budget.tick(Instant::now()),
            _ = shutdown.wait() => return,
        }
    }
}

/// Grants budget to waiters, least-used client first; returns when to look again.
fn grant_waiters(b: &Budget, now: Instant) -> Option<Instant> {
    let settings = b.live.load().budget.clone();
    let mut q = lock(&b.queue);
    if q.len == 0 {
        return None;
    }
    let tokens = b.store.usable(now);
    let mut windows = b.sync(&tokens);
    while q.len > 0 {
        let Some(client) = next_client(&q, &b.book, &settings, now) else {
            break;
        };
        let Some(token) = Budget::take_best(&mut windows, &tokens, now) else {
            break;
        };
        let waiter = q.waiting.get_mut(&client).and_then(VecDeque::pop_front);
        if q.waiting.get(&client).is_some_and(VecDeque::is_empty) {
            q.waiting.remove(&client);
        }
        let Some(waiter) = waiter else { continue };
        q.len -= 1;
        let slot = token.slot;
        if waiter.grant.send(token).is_ok() {
            b.book.used(&client, now);
        } else if let Some(w) = windows.get_mut(slot) {
            w.give_back();
        }
    }
    b.set_depth(&q);
    let retry = if tokens.is_empty() {
        // No usable token: look again soon (the refresher is minting one).
        now + Duration::from_millis(50)
    } else {
        Budget::free_at(&windows, &tokens, now)
    };
    (q.len > 0).then(|| retry.max(now + Duration::from_millis(1)))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The waiting client that used least recently (decayed usage), weighted by its application
/// group.
pub(super) fn next_client(
    q: &Queue,
    book: &Book,
    settings: &BudgetSettings,
    now: Instant,
) -> Option<ClientKey> {
    let weight = |k: &ClientKey| k.weight(settings);
    q.waiting
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(k, _)| k)
        .min_by(|a, b| {
            let ua = book.usage_of(a, now) * weight(b) as f64;
            let ub = book.usage_of(b, now) * weight(a) as f64;
            ua.total_cmp(&ub)
        })
        .cloned()
}
