//! The budget's lock-free parts, read and written by every request without the budget's lock:
//! each slot's [`Tickets`] (calls its window already counted, handed out by `fetch_update`),
//! what Genesys last [`Reported`] for the slot's token (applied to the window by the next
//! holder of the lock), and each client's decayed [`Meter`] of use for fair sharing.
//! Like pingora-limits' `rate.rs`: a counter per key, reset by compare-and-swap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Calls of one slot's window that may go out without the budget's lock. The slow path (under
/// the lock) moves the window's paced credit here, counting it as used at once; a request takes
/// one with a compare-and-swap. The epoch in the upper half changes whenever the slow path
/// voids or refills them, so a stale compare-and-swap never succeeds (no ABA).
///
/// Aligned to a cache line: two slots' tickets taken by two threads never share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct Tickets {
    /// `epoch << 32 | count`.
    state: AtomicU64,
    /// The token generation the tickets were issued for: a newer token has a fresh window.
    generation: AtomicU64,
    /// When the window that counted them resets (milliseconds on the budget's [`Clock`]): a
    /// ticket is good only within the window that counted it.
    until: AtomicU64,
    /// For `[cluster]`'s shared count, kept by the holder of the budget's lock only (the
    /// request path pays one compare-and-swap, nothing more): the last batch's size, how
    /// many of it were reported taken, and what voided batches had taken, not reported yet.
    issued: AtomicU64,
    shared: AtomicU64,
    pending: AtomicU64,
}

const COUNT: u64 = u32::MAX as u64;

impl Tickets {
    /// Tickets left now.
    pub fn count(&self) -> u64 {
        self.state.load(Ordering::Acquire) & COUNT
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Tickets of `generation` still good at `now_ms`.
    pub fn live(&self, generation: u64, now_ms: u64) -> u64 {
        if self.generation() != generation || now_ms >= self.until.load(Ordering::Acquire) {
            return 0;
        }
        self.count()
    }

    /// The window that counted them ends earlier than thought (Genesys said so).
    pub fn shorten(&self, until_ms: u64) {
        self.until.fetch_min(until_ms, Ordering::AcqRel);
    }

    /// Takes one good at `now_ms`; false when none is left.
    pub fn take(&self, now_ms: u64) -> bool {
        if now_ms >= self.until.load(Ordering::Acquire) {
            return false;
        }
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & COUNT > 0).then(|| s - 1)
            })
            .is_ok()
    }

    /// Tickets taken since the last call (under the budget's lock; `[cluster]` adds them to
    /// the shared count).
    pub fn take_taken(&self) -> u64 {
        let taken = self
            .issued
            .load(Ordering::Relaxed)
            .saturating_sub(self.count());
        let new = taken.saturating_sub(self.shared.swap(taken, Ordering::Relaxed));
        new + self.pending.swap(0, Ordering::Relaxed)
    }

    /// Voids what is left (under the budget's lock) and returns how many that was.
    pub fn void(&self) -> u64 {
        let mut left = 0;
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                left = s & COUNT;
                Some(next_epoch(s))
            });
        let taken = self.issued.swap(0, Ordering::Relaxed).saturating_sub(left);
        let unreported = taken.saturating_sub(self.shared.swap(0, Ordering::Relaxed));
        self.pending.fetch_add(unreported, Ordering::Relaxed);
        left
    }

    /// Replaces what is left by `n` tickets of `generation`, good until `until_ms` (under the
    /// budget's lock); returns the voided ones.
    pub fn refill(&self, generation: u64, n: u64, until_ms: u64) -> u64 {
        let voided = self.void();
        self.generation.store(generation, Ordering::Release);
        self.until.store(until_ms, Ordering::Release);
        let n = n.min(COUNT);
        self.issued.store(n, Ordering::Relaxed);
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some((s & !COUNT) | n)
            });
        voided
    }
}

fn next_epoch(s: u64) -> u64 {
    ((s >> 32).wrapping_add(1) << 32) & !COUNT
}

/// What Genesys's rate-limit headers said about one slot's token since the window last heard
/// of it, kept as [`super::window::Window::observe`] would read a sequence of them: within one
/// Genesys window the highest count and the earliest end; an end more than a second later is
/// a new window, whose report replaces the old one; a late answer from an older window is
/// dropped. Written by every answer without a lock (one compare-and-swap); taken by the
/// holder of the budget's lock.
///
/// Aligned to a cache line, like [`Tickets`].
#[derive(Debug)]
#[repr(align(64))]
pub(super) struct Reported {
    /// `ends_ms << 24 | count` (count saturating at 2^24 - 1); 0 when nothing is reported.
    /// `ends_ms` is milliseconds after the budget's start, [`NO_END`] when not said.
    last: AtomicU64,
    allowed: AtomicU64,
    dirty: AtomicBool,
}

const COUNT_BITS: u32 = 24;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
/// No `inin-ratelimit-reset` on the answer.
const NO_END: u64 = (1 << (64 - COUNT_BITS)) - 1;

impl Default for Reported {
    fn default() -> Self {
        Reported {
            last: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
        }
    }
}

/// One report, taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Report {
    pub count: u64,
    pub allowed: u64,
    pub ends_at: Option<Instant>,
}

fn merge(stored: u64, count: u64, ends: u64) -> u64 {
    let fresh = (ends << COUNT_BITS) | count.min(COUNT_MAX);
    if stored == 0 {
        return fresh;
    }
    let (old_count, old_ends) = (stored & COUNT_MAX, stored >> COUNT_BITS);
    match (old_ends == NO_END, ends == NO_END) {
        (true, _) | (_, true) => {
            let e = old_ends.min(ends);
            (e << COUNT_BITS) | old_count.max(count.min(COUNT_MAX))
        }
        // A window more than a second later: Genesys started a new one.
        _ if ends > old_ends + 1_000 => fresh,
        // An answer from a window before this one, arriving late.
        _ if old_ends > ends + 1_000 => stored,
        _ => (old_ends.min(ends) << COUNT_BITS) | old_count.max(count.min(COUNT_MAX)),
    }
}

impl Reported {
    pub fn record(&self, clock: &Clock, count: u64, allowed: u64, ends_at: Option<Instant>) {
        let ends = ends_at.map_or(NO_END, |t| clock.ms(t).min(NO_END - 1));
        let _ = self
            .last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(merge(s, count, ends))
            });
        self.allowed.store(allowed, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }

    /// The report since the last take, if any.
    pub fn take(&self, clock: &Clock) -> Option<Report> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        let last = self.last.swap(0, Ordering::AcqRel);
        if last == 0 {
            return None;
        }
        let ends = last >> COUNT_BITS;
        Some(Report {
            count: last & COUNT_MAX,
            allowed: self.allowed.load(Ordering::Acquire),
            ends_at: (ends != NO_END).then(|| clock.at(ends)),
        })
    }
}

/// Instants as milliseconds since the budget was made, so they fit in an atomic.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    pub fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_millis() as u64
    }

    pub fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }
}

/// A client's use, decaying: each call counts 1 and fades with the fairness horizon's time
/// constant. `f32 value bits << 32 | ms` (milliseconds since the budget's start, wrapping
/// every 49 days: ages are taken with a wrapping subtraction, and a client idle that long has
/// been forgotten long before).
#[derive(Debug, Default)]
pub(super) struct Meter(AtomicU64);

impl Meter {
    /// Counts one call at `now_ms`.
    pub fn add(&self, now_ms: u64, horizon: Duration) {
        let now = now_ms as u32;
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                let value = decayed(s, now, horizon) + 1.0;
                Some(pack(value, now))
            });
    }

    /// The use at `now_ms`.
    pub fn at(&self, now_ms: u64, horizon: Duration) -> f64 {
        decayed(self.0.load(Ordering::Acquire), now_ms as u32, horizon) as f64
    }
}

fn pack(value: f32, ms: u32) -> u64 {
    (u64::from(value.to_bits()) << 32) | u64::from(ms)
}

fn decayed(s: u64, now: u32, horizon: Duration) -> f32 {
    let value = f32::from_bits((s >> 32) as u32);
    if value == 0.0 {
        return 0.0;
    }
    let age = now.wrapping_sub(s as u32) as f32 / 1000.0;
    value * (-age / horizon.as_secs_f32().max(1e-3)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_taken_once_each_and_a_void_defeats_a_stale_swap() {
        let t = Tickets::default();
        assert!(!t.take(0));
        t.refill(7, 2, 1_000);
        assert_eq!((t.count(), t.generation()), (2, 7));
        assert_eq!((t.live(7, 10), t.live(6, 10), t.live(7, 1_000)), (2, 0, 0));
        let stale = t.state.load(Ordering::Acquire);
        assert!(t.take(10) && t.take(10) && !t.take(10));
        t.refill(8, 2, 1_000);
        assert!(!t.take(1_000), "not past the window that counted it");
        // [cluster] hears of the two taken from the first batch, once.
        assert_eq!(t.take_taken(), 2);
        assert_eq!(t.take_taken(), 0);
        // A compare-and-swap from before the refill finds another epoch: it fails even though
        // the count is the same again.
        assert!(t
            .state
            .compare_exchange(stale, stale - 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err());
        assert_eq!(t.void(), 2);
        assert!(!t.take(0));
    }

    #[test]
    fn two_threads_never_take_more_tickets_than_issued() {
        let t = std::sync::Arc::new(Tickets::default());
        t.refill(1, 10_000, u64::MAX);
        let taken: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let t = t.clone();
                    s.spawn(move || (0..8_000).filter(|_| t.take(0)).count() as u64)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 10_000);
    }

    #[test]
    fn reports_keep_the_highest_count_and_the_earliest_end() {
        let clock = Clock::new();
        let r = Reported::default();
        assert_eq!(r.take(&clock), None);
        let now = Instant::now();
        r.record(&clock, 5, 300, Some(now + Duration::from_secs(40)));
        r.record(&clock, 3, 300, Some(now + Duration::from_secs(41)));
        let got = r.take(&clock).unwrap();
        assert_eq!((got.count, got.allowed), (5, 300));
        let end = got.ends_at.unwrap();
        assert!(end <= now + Duration::from_secs(40) + Duration::from_millis(1));
        assert_eq!(r.take(&clock), None, "taken once");
        // A window that ends more than a second later is a new one: its report replaces the
        // old window's, and a late answer from the old window does not bring it back.
        r.record(&clock, 290, 300, Some(now + Duration::from_secs(1)));
        r.record(&clock, 2, 300, Some(now + Duration::from_secs(60)));
        r.record(&clock, 295, 300, Some(now + Duration::from_secs(1)));
        let got = r.take(&clock).unwrap();
        assert_eq!(got.count, 2);
        assert!(got.ends_at.unwrap() >= now + Duration::from_secs(59));
    }

    #[test]
    fn a_meter_counts_and_fades() {
        let m = Meter::default();
        let h = Duration::from_secs(3);
        for _ in 0..10 {
            m.add(1_000, h);
        }
        assert!((m.at(1_000, h) - 10.0).abs() < 1e-3);
        let later = m.at(4_000, h);
        assert!((later - 10.0 * (-1.0f64).exp()).abs() < 1e-3, "{later}");
        assert!(m.at(100_000, h) < 0.01);
    }
}
