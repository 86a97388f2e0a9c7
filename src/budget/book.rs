//! Fair sharing's memory: what each client used recently, read and counted without a lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::atomic::{Clock, Meter};
use super::{horizon, ClientKey, USAGE_CLIENTS_MAX};
use crate::sync::lock;

/// What each client used recently, decaying ([`atomic::Meter`]): each call counts 1 and fades
/// with time constant `horizon`, so fairness weighs what a client used in the last few
/// seconds, whatever happened before and whether or not anyone waited. A steady client with a
/// long uncontended history keeps its share when a burster arrives: its usage is its rate
/// times the horizon, not its history since the last contention. Read and counted without a
/// lock; a client seen for the first time is added by copying the map (rare), and faded ones
/// are pruned once per horizon.
pub(super) struct Book {
    meters: ArcSwap<HashMap<ClientKey, Arc<Meter>>>,
    /// Serialises inserts and prunes; holds when the map is next pruned.
    write: Mutex<Option<Instant>>,
    horizon_ms: AtomicU64,
    clock: Clock,
}

impl Book {
    pub(super) fn new(clock: Clock, window: Duration) -> Self {
        Book {
            meters: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(None),
            horizon_ms: AtomicU64::new(horizon(window).as_millis() as u64),
            clock,
        }
    }

    pub(super) fn horizon(&self) -> Duration {
        Duration::from_millis(self.horizon_ms.load(Ordering::Relaxed))
    }

    /// Keeps the horizon in step with the window and forgets clients whose use has faded
    /// (once per horizon), whether or not requests wait.
    pub(super) fn roll(&self, now: Instant, window: Duration) {
        let h = horizon(window);
        self.horizon_ms
            .store(h.as_millis() as u64, Ordering::Relaxed);
        let mut next = lock(&self.write);
        if next.is_some_and(|t| now < t) {
            return;
        }
        *next = Some(now + h);
        let ms = self.clock.ms(now);
        let map = self.meters.load();
        if map.values().all(|m| m.at(ms, h) >= 0.01) {
            return;
        }
        let kept: HashMap<_, _> = map
            .iter()
            .filter(|(_, m)| m.at(ms, h) >= 0.01)
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        self.meters.store(Arc::new(kept));
    }

    /// Counts one call for `client` at `now`.
    pub(super) fn used(&self, client: &ClientKey, now: Instant) {
        let (h, ms) = (self.horizon(), self.clock.ms(now));
        if let Some(m) = self.meters.load().get(client) {
            return m.add(ms, h);
        }
        let _write = lock(&self.write);
        let map = self.meters.load();
        if let Some(m) = map.get(client) {
            return m.add(ms, h);
        }
        let mut grown: HashMap<_, _> = if map.len() >= USAGE_CLIENTS_MAX {
            // Full of clients that have not faded yet: start again (bounded memory).
            HashMap::new()
        } else {
            HashMap::clone(&map)
        };
        let meter = Arc::new(Meter::default());
        meter.add(ms, h);
        grown.insert(client.clone(), meter);
        self.meters.store(Arc::new(grown));
    }

    /// `client`'s usage now.
    pub(crate) fn usage_of(&self, client: &ClientKey, now: Instant) -> f64 {
        self.meters
            .load()
            .get(client)
            .map_or(0.0, |m| m.at(self.clock.ms(now), self.horizon()))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.meters.load().len()
    }
}
