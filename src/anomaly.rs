//! Anomaly detection: a sliding-window detector fed by the token and proxy paths.
//!
//! [`Detector`] is pure (callers pass the time) and unit-tested; [`AnomalyMonitor`] wraps it
//! with the audit log (`ANOMALY_RAISED`, `ANOMALY_CLEARED`), the `anomaly_active{kind}` gauge
//! and what `/status` shows. A kind is raised when its events in the window reach the
//! threshold, and cleared after a quiet period with no event of that kind.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{AnomalyThresholds as Thresholds, Live};
use crate::metrics::Metrics;
use crate::sync::lock;

/// What can go wrong, as the `kind` label and in `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Token refreshes keep failing.
    RefreshFailures,
    /// The token endpoint refused the credentials: revoked, disabled or compromised client.
    InvalidClient,
    /// A token was rejected by the API soon after it was minted.
    EarlyRejection,
    /// Many upstream 401s.
    UnauthorizedSpike,
    /// Throttling by the token endpoint or the API (429s).
    RateLimitStorm,
}

pub const KINDS: [Kind; 5] = [
    Kind::RefreshFailures,
    Kind::InvalidClient,
    Kind::EarlyRejection,
    Kind::UnauthorizedSpike,
    Kind::RateLimitStorm,
];

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RefreshFailures => "refresh_failures",
            Kind::InvalidClient => "invalid_client",
            Kind::EarlyRejection => "early_rejection",
            Kind::UnauthorizedSpike => "unauthorized_spike",
            Kind::RateLimitStorm => "rate_limit_storm",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The event count that raises `kind`.
fn threshold(t: &Thresholds, kind: Kind) -> u32 {
    match kind {
        Kind::RefreshFailures => t.refresh_failures,
        Kind::InvalidClient => t.invalid_client,
        Kind::EarlyRejection => t.early_rejection,
        Kind::UnauthorizedSpike => t.unauthorized,
        Kind::RateLimitStorm => t.rate_limited,
    }
    .max(1)
}

/// A change of state to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Raised { kind: Kind, count: usize },
    Cleared { kind: Kind },
}

#[derive(Debug, Default, Clone)]
struct KindState {
    events: VecDeque<Instant>,
    raised_at: Option<Instant>,
    last_event: Option<Instant>,
}

/// The pure sliding-window detector. Thresholds are passed in on each call: they come from the
/// live config snapshot, so a reload changes them without telling the detector.
#[derive(Debug, Clone, Default)]
pub struct Detector {
    kinds: [KindState; 5],
}

impl Detector {
    pub fn new() -> Self {
        Detector::default()
    }

    /// Records one event; returns `Raised` when this event crosses the threshold.
    pub fn observe(&mut self, kind: Kind, now: Instant, t: &Thresholds) -> Option<Transition> {
        let window = t.window;
        let threshold = threshold(t, kind) as usize;
        let st = &mut self.kinds[kind.index()];
        st.last_event = Some(now);
        st.events.push_back(now);
        while st
            .events
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            st.events.pop_front();
        }
        // Bound memory under a storm: only the newest `threshold` events matter.
        while st.events.len() > threshold {
            st.events.pop_front();
        }
        if st.raised_at.is_none() && st.events.len() >= threshold {
            st.raised_at = Some(now);
            return Some(Transition::Raised {
                kind,
                count: st.events.len(),
            });
        }
        None
    }

    /// Clears every raised kind that has been quiet for the quiet period.
    pub fn tick(&mut self, now: Instant, t: &Thresholds) -> Vec<Transition> {
        let quiet = t.quiet;
        let mut out = Vec::new();
        for kind in KINDS {
            let st = &mut self.kinds[kind.index()];
            if st.raised_at.is_some()
                && st
                    .last_event
                    .is_some_and(|t| now.duration_since(t) >= quiet)
            {
                st.raised_at = None;
                st.events.clear();
                out.push(Transition::Cleared { kind });
            }
        }
        out
    }

    /// Raised kinds with the instant each was raised, oldest first.
    pub fn active(&self) -> Vec<(Kind, Instant)> {
        let mut v: Vec<_> = KINDS
            .iter()
            .filter_map(|k| self.kinds[k.index()].raised_at.map(|t| (*k, t)))
            .collect();
        v.sort_by_key(|(_, t)| *t);
        v
    }
}

/// The detector wired to the audit log, metrics and `/status`.
pub struct AnomalyMonitor {
    detector: Mutex<Detector>,
    live: Arc<ArcSwap<Live>>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    /// Wall-clock time each kind was raised (for `/status`).
    since: Mutex<[Option<SystemTime>; 5]>,
}

/// What `/status` shows.
#[derive(Debug, Clone)]
pub struct AnomalyView {
    pub active: Vec<&'static str>,
    pub since: Option<SystemTime>,
    pub reason: Option<String>,
}

impl AnomalyMonitor {
    pub fn new(live: Arc<ArcSwap<Live>>, audit: Arc<AuditLog>, metrics: Arc<Metrics>) -> Self {
        for k in KINDS {
            metrics
                .anomaly_active
                .with_label_values(&[k.as_str()])
                .set(0);
        }
        AnomalyMonitor {
            detector: Mutex::new(Detector::new()),
            live,
            audit,
            metrics,
            since: Mutex::new([None; 5]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Detector> {
        lock(&self.detector)
    }

    /// A token was rejected upstream at `age`: an anomaly if it was young.
    pub fn token_rejected(&self, age: Duration) {
        let young = age < self.live.load().anomaly.early_rejection_age;
        if young {
            self.observe(Kind::EarlyRejection);
        }
    }

    pub fn observe(&self, kind: Kind) {
        let live = self.live.load();
        let transition = self.lock().observe(kind, Instant::now(), &live.anomaly);
        if let Some(t) = transition {
            self.apply(t);
        }
    }

    /// Clears quiet kinds; called every 250 ms by a background task.
    pub fn tick(&self) {
        let live = self.live.load();
        let transitions = self.lock().tick(Instant::now(), &live.anomaly);
        for t in transitions {
            self.apply(t);
        }
    }

    fn apply(&self, t: Transition) {
        let mut since = lock(&self.since);
        match t {
            Transition::Raised { kind, count } => {
                since[kind.index()] = Some(SystemTime::now());
                self.metrics
                    .anomaly_active
                    .with_label_values(&[kind.as_str()])
                    .set(1);
                let reason = describe(kind);
                self.audit.record(AuditEvent::AnomalyRaised, serde_json::json!({"kind": kind.as_str(), "events_in_window": count, "reason": reason}), None);
                tracing::warn!(
                    kind = kind.as_str(),
                    events_in_window = count,
                    reason,
                    "anomaly raised"
                );
            }
            Transition::Cleared { kind } => {
                since[kind.index()] = None;
                self.metrics
                    .anomaly_active
                    .with_label_values(&[kind.as_str()])
                    .set(0);
                self.audit.record(
                    AuditEvent::AnomalyCleared,
                    serde_json::json!({"kind": kind.as_str()}),
                    None,
                );
                tracing::info!(kind = kind.as_str(), "anomaly cleared");
            }
        }
    }

    pub fn view(&self) -> AnomalyView {
        let active = self.lock().active();
        let since = lock(&self.since);
        AnomalyView {
            active: active.iter().map(|(k, _)| k.as_str()).collect(),
            since: active.first().and_then(|(k, _)| since[k.index()]),
            reason: active.first().map(|(k, _)| describe(*k).to_string()),
        }
    }
}

fn describe(kind: Kind) -> &'static str {
    match kind {
        Kind::RefreshFailures => "token refreshes keep failing",
        Kind::InvalidClient => {
            "the token endpoint refused the client credentials (revoked, disabled or compromised?)"
        }
        Kind::EarlyRejection => "a freshly minted token was rejected by the API",
        Kind::UnauthorizedSpike => "many upstream 401 answers",
        Kind::RateLimitStorm => "Genesys is throttling (token endpoint or API)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds {
            window: Duration::from_secs(10),
            quiet: Duration::from_secs(30),
            refresh_failures: 3,
            ..Thresholds::default()
        }
    }

    #[test]
    fn raises_at_threshold_within_window_once() {
        let mut d = Detector::new();
        let th = thresholds();
        let t0 = Instant::now();
        assert_eq!(d.observe(Kind::RefreshFailures, t0, &th), None);
        assert_eq!(
            d.observe(Kind::RefreshFailures, t0 + Duration::from_secs(1), &th),
            None
        );
        assert_eq!(
            d.observe(Kind::RefreshFailures, t0 + Duration::from_secs(2), &th),
            Some(Transition::Raised {
                kind: Kind::RefreshFailures,
                count: 3
            })
        );
        assert_eq!(
            d.observe(Kind::RefreshFailures, t0 + Duration::from_secs(3), &th),
            None,
            "raised once"
        );
        assert_eq!(d.active().len(), 1);
    }

    #[test]
    fn events_outside_the_window_do_not_count() {
        let mut d = Detector::new();
        let th = thresholds();
        let t0 = Instant::now();
        d.observe(Kind::RefreshFailures, t0, &th);
        d.observe(Kind::RefreshFailures, t0 + Duration::from_secs(5), &th);
        assert_eq!(
            d.observe(Kind::RefreshFailures, t0 + Duration::from_secs(16), &th),
            None
        );
        assert!(d.active().is_empty());
    }

    #[test]
    fn clears_after_quiet_period_only() {
        let mut d = Detector::new();
        let th = thresholds();
        let t0 = Instant::now();
        assert!(
            d.observe(Kind::InvalidClient, t0, &th).is_some(),
            "threshold 1 raises at once"
        );
        assert!(d.tick(t0 + Duration::from_secs(29), &th).is_empty());
        d.observe(Kind::InvalidClient, t0 + Duration::from_secs(29), &th);
        assert!(
            d.tick(t0 + Duration::from_secs(58), &th).is_empty(),
            "a new event restarts the quiet period"
        );
        assert_eq!(
            d.tick(t0 + Duration::from_secs(59), &th),
            vec![Transition::Cleared {
                kind: Kind::InvalidClient
            }]
        );
        assert!(d.active().is_empty());
        assert!(
            d.observe(Kind::InvalidClient, t0 + Duration::from_secs(60), &th)
                .is_some(),
            "can be raised again"
        );
    }

    #[test]
    fn kinds_are_independent_and_memory_is_bounded() {
        let mut d = Detector::new();
        let th = thresholds();
        let t0 = Instant::now();
        for i in 0..10_000 {
            d.observe(Kind::UnauthorizedSpike, t0 + Duration::from_micros(i), &th);
        }
        assert!(d.kinds[Kind::UnauthorizedSpike.index()].events.len() <= 20);
        assert_eq!(
            d.active().iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            vec![Kind::UnauthorizedSpike]
        );
    }
}
