//! Failed proofs, per source address: a source past `apps.max_auth_failures_per_minute` is
//! refused without its proof being checked until its minute ends (guessing secrets or keys
//! costs the guesser, not the proxy), and `APP_AUTH_FAILED` is written at most once per source
//! per minute with the count since its last line.
//!
//! State is bounded: at most [`SOURCES_MAX`] addresses are tracked; when the table is full the
//! expired entries go, then the oldest. A request from an address with no failures takes no
//! lock while no address is throttled (one atomic read).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::AuthFailure;
use crate::sync::lock;

/// Addresses tracked at most.
pub const SOURCES_MAX: usize = 4096;

/// The window failures are counted in, and the shortest gap between two audit lines of one
/// source.
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    throttled: bool,
    /// When this source's last `APP_AUTH_FAILED` line was written.
    last_line: Option<Instant>,
    /// Failures since that line.
    unreported: u32,
    /// The proof of the latest failure.
    proof: AuthFailure,
}

/// An `APP_AUTH_FAILED` line that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureLine {
    pub source: IpAddr,
    /// Failures since the source's previous line (this one included).
    pub failures: u32,
    pub proof: AuthFailure,
    pub throttled: bool,
}

#[derive(Default)]
pub struct Guard {
    table: Mutex<HashMap<IpAddr, Entry>>,
    /// Entries marked throttled (some may have expired: they are cleared when met).
    throttled: AtomicUsize,
}

impl Guard {
    /// When `source` is throttled: how long until it may try again.
    pub fn throttled(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        if self.throttled.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut table = lock(&self.table);
        let entry = table.get_mut(&source.to_canonical())?;
        if !entry.throttled {
            return None;
        }
        let end = entry.window_start + WINDOW;
        if now >= end {
            entry.throttled = false;
            self.throttled.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(end - now)
    }

    /// Counts a failed proof; returns the audit line when one is due.
    pub fn failed(
        &self,
        source: IpAddr,
        proof: AuthFailure,
        now: Instant,
        max_per_minute: u32,
    ) -> Option<FailureLine> {
        let source = source.to_canonical();
        let mut table = lock(&self.table);
        if table.len() >= SOURCES_MAX && !table.contains_key(&source) {
            self.make_room(&mut table, now);
        }
        let entry = table.entry(source).or_insert(Entry {
            window_start: now,
            failures: 0,
            throttled: false,
            last_line: None,
            unreported: 0,
            proof,
        });
        if now.duration_since(entry.window_start) >= WINDOW {
            entry.window_start = now;
            entry.failures = 0;
            if entry.throttled {
                entry.throttled = false;
                self.throttled.fetch_sub(1, Ordering::Relaxed);
            }
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.unreported = entry.unreported.saturating_add(1);
        entry.proof = proof;
        if entry.failures >= max_per_minute && !entry.throttled {
            entry.throttled = true;
            self.throttled.fetch_add(1, Ordering::Relaxed);
        }
        let due = entry
            .last_line
            .is_none_or(|t| now.duration_since(t) >= WINDOW);
        if !due {
            return None;
        }
        entry.last_line = Some(now);
        let failures = std::mem::take(&mut entry.unreported);
        Some(FailureLine {
            source,
            failures,
            proof,
            throttled: entry.throttled,
        })
    }

    /// Removes expired entries, else the one whose window started first.
    fn make_room(&self, table: &mut HashMap<IpAddr, Entry>, now: Instant) {
        let before = table.len();
        let mut freed_throttled = 0;
        table.retain(|_, e| {
            let keep = now.duration_since(e.window_start) < WINDOW
                || e.last_line.is_some_and(|t| now.duration_since(t) < WINDOW);
            if !keep && e.throttled {
                freed_throttled += 1;
            }
            keep
        });
        if table.len() == before {
            if let Some((&oldest, _)) = table.iter().min_by_key(|(_, e)| e.window_start) {
                if table.remove(&oldest).is_some_and(|e| e.throttled) {
                    freed_throttled += 1;
                }
            }
        }
        self.throttled.fetch_sub(freed_throttled, Ordering::Relaxed);
    }

    /// The lines due for sources whose failures since their last line are not reported yet:
    /// those whose last line is a minute old, or every one with `all` (at shutdown). Entries
    /// with nothing left to report and their minute over are dropped.
    pub fn sweep(&self, now: Instant, all: bool) -> Vec<FailureLine> {
        let mut table = lock(&self.table);
        let mut lines = Vec::new();
        let mut freed_throttled = 0;
        table.retain(|source, e| {
            let line_due = e.last_line.is_none_or(|t| now.duration_since(t) >= WINDOW);
            if e.unreported > 0 && (all || line_due) {
                lines.push(FailureLine {
                    source: *source,
                    failures: std::mem::take(&mut e.unreported),
                    proof: e.proof,
                    throttled: e.throttled,
                });
                e.last_line = Some(now);
                return true;
            }
            let idle = now.duration_since(e.window_start) >= WINDOW && line_due;
            if idle && e.throttled {
                freed_throttled += 1;
            }
            !idle
        });
        self.throttled.fetch_sub(freed_throttled, Ordering::Relaxed);
        lines
    }

    /// Addresses tracked now.
    pub fn sources(&self) -> usize {
        lock(&self.table).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn a_source_is_throttled_after_its_limit_until_its_minute_ends() {
        let g = Guard::default();
        let t0 = Instant::now();
        assert_eq!(g.throttled(ip(1), t0), None);
        for i in 0..3 {
            g.failed(ip(1), AuthFailure::ApiKey, t0 + Duration::from_secs(i), 3);
        }
        let left = g.throttled(ip(1), t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(left, Duration::from_secs(50));
        assert_eq!(g.throttled(ip(2), t0), None, "others are not");
        assert_eq!(g.throttled(ip(1), t0 + WINDOW), None);
        assert_eq!(g.throttled.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn one_audit_line_per_source_per_minute_carrying_the_count() {
        let g = Guard::default();
        let t0 = Instant::now();
        let first = g.failed(ip(1), AuthFailure::Login, t0, 100).unwrap();
        assert_eq!(first.failures, 1);
        for i in 1..30 {
            let at = t0 + Duration::from_secs(i);
            assert_eq!(g.failed(ip(1), AuthFailure::Login, at, 100), None);
        }
        // Another source has its own line.
        assert!(g.failed(ip(2), AuthFailure::Login, t0, 100).is_some());
        let next = g
            .failed(ip(1), AuthFailure::AppToken, t0 + WINDOW, 100)
            .unwrap();
        assert_eq!((next.failures, next.proof), (30, AuthFailure::AppToken));
    }

    #[test]
    fn failures_after_a_sources_last_line_are_reported_by_the_sweep() {
        let g = Guard::default();
        let t0 = Instant::now();
        assert!(g.failed(ip(1), AuthFailure::ApiKey, t0, 100).is_some());
        for _ in 0..4 {
            assert!(g.failed(ip(1), AuthFailure::ApiKey, t0, 100).is_none());
        }
        // Not due yet within the minute, unless everything is flushed.
        assert!(g.sweep(t0 + Duration::from_secs(30), false).is_empty());
        let lines = g.sweep(t0 + WINDOW, false);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].failures, 4);
        assert!(g
            .failed(ip(1), AuthFailure::Login, t0 + WINDOW, 100)
            .is_none());
        let last = g.sweep(t0 + WINDOW, true);
        assert_eq!((last[0].failures, last[0].proof), (1, AuthFailure::Login));
        // Nothing left to report and the minute over: the entry goes.
        assert!(g.sweep(t0 + WINDOW * 3, false).is_empty());
        assert_eq!(g.sources(), 0);
    }

    #[test]
    fn the_table_stays_bounded_under_a_spray_of_addresses() {
        let g = Guard::default();
        let t0 = Instant::now();
        for n in 0..(SOURCES_MAX as u32 + 500) {
            g.failed(ip(n), AuthFailure::ApiKey, t0, 1);
        }
        assert_eq!(g.sources(), SOURCES_MAX);
        // Every tracked source is throttled and counted once.
        assert_eq!(g.throttled.load(Ordering::Relaxed), SOURCES_MAX);
        // Once their minute is over, a new source frees the expired ones.
        g.failed(ip(1_000_000), AuthFailure::ApiKey, t0 + WINDOW * 2, 5);
        assert_eq!(g.sources(), 1);
        assert_eq!(g.throttled.load(Ordering::Relaxed), 0);
    }
}
