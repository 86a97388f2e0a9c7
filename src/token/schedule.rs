//! Timing policy as pure functions: when to refresh a token, how long to back off after a
//! failure, and what the refresher does next ([`next_step`]). No clocks and no randomness
//! inside: callers pass the time and the jitter in, so every rule here is checked by
//! exhaustive property-style tests.

use std::time::{Duration, Instant};

/// Never refresh earlier than this fraction of the lifetime, whatever the margin says: a
/// 300-second token with a 300-second margin is refreshed at about half-life, not at once.
const MIN_REFRESH_FRACTION: f64 = 0.5;
/// Jitter spreads replicas over the last part of the margin.
const JITTER_SPREAD: f64 = 0.2;

/// How long after acquisition to refresh a token that lives `lifetime`.
///
/// The margin is clamped to half the lifetime; `jitter` in `[0, 1)` moves the refresh earlier
/// by up to a fifth of the margin so replicas started together do not refresh together.
pub fn refresh_delay(lifetime: Duration, margin: Duration, jitter: f64) -> Duration {
    let life = lifetime.as_secs_f64();
    let margin = margin
        .as_secs_f64()
        .min(life * (1.0 - MIN_REFRESH_FRACTION));
    let jitter = jitter.clamp(0.0, 1.0);
    let delay = life - margin - margin * JITTER_SPREAD * jitter;
    Duration::from_secs_f64(
        delay
            .max(life * MIN_REFRESH_FRACTION * (1.0 - JITTER_SPREAD))
            .max(0.0),
    )
}

/// What kind of failure the backoff follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Network errors, 5xx, bad responses, failed validation: retry soon.
    Transient,
    /// Throttled by Genesys or the credentials were refused: hammering makes it worse, so the
    /// backoff starts eight times higher. It never stops for good: a secret may be fixed.
    Harsh,
}

/// Exponential backoff with "equal jitter": the `attempt`-th consecutive failure (from 1)
/// waits between half and all of `initial * 2^(attempt-1)`, capped at `max`.
pub fn backoff(
    attempt: u32,
    class: FailureClass,
    initial: Duration,
    max: Duration,
    jitter: f64,
) -> Duration {
    let extra = match class {
        FailureClass::Transient => 0,
        FailureClass::Harsh => 3,
    };
    let exp = attempt.saturating_sub(1).saturating_add(extra).min(30);
    let base = initial.as_secs_f64() * f64::from(1u32 << exp);
    let capped = base.min(max.as_secs_f64());
    let jitter = jitter.clamp(0.0, 1.0);
    Duration::from_secs_f64(capped * (0.5 + 0.5 * jitter))
}

/// How long the refresher sleeps when nothing at all is due.
const IDLE: Duration = Duration::from_secs(3600);

/// Why the refresher mints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Initial,
    Proactive,
    Rejected,
    Expired,
    Rotation,
    /// `[cluster]`: another replica published a new token.
    Shared,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Proactive => "proactive",
            Reason::Rejected => "rejected_upstream",
            Reason::Expired => "expired",
            Reason::Rotation => "rotation",
            Reason::Shared => "published_by_replica",
        }
    }
}

/// Two mints for different pool slots are at least this far apart: Genesys answers bursts of
/// token requests with 400 "rate limit exceeded".
pub const STAGGER: Duration = Duration::from_millis(100);

/// A slot's token, as far as scheduling cares.
#[derive(Debug, Clone, Copy)]
pub struct HeldToken {
    pub generation: u64,
    pub expires_at: Instant,
}

/// One pool slot.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotFacts {
    pub token: Option<HeldToken>,
    /// The highest generation of this slot a request reported refused by the API.
    pub rejected_generation: u64,
    /// When the slot's token is due for its proactive refresh.
    pub refresh_at: Option<Instant>,
}

/// A rotation to a new secret that failed and is being retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryWindow {
    pub next_try: Instant,
    pub deadline: Instant,
}

/// Everything the refresher's next step depends on, read at one instant.
#[derive(Debug, Clone)]
pub struct Facts {
    pub now: Instant,
    pub slots: Vec<SlotFacts>,
    /// After a failed mint, not before this.
    pub backoff_until: Option<Instant>,
    /// `Some` while the per-minute cap on token requests is reached: when it frees.
    pub cap_free_at: Option<Instant>,
    /// The last mint plus [`STAGGER`].
    pub stagger_until: Option<Instant>,
    pub rotation: Option<RetryWindow>,
}

/// What the refresher does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Mint for this pool slot.
    Mint(usize, Reason),
    RetryRotation,
    /// The rotation's retry window is over: keep the current secret.
    AbandonRotation,
    /// Nothing to do until this instant (or until woken).
    Sleep(Instant),
}

/// Decides the refresher's next step. A slot gets a token when it has none, when a request
/// reported its token refused, when it expired, or when its proactive refresh is due (the
/// urgent reasons first); never during a backoff, past the per-minute cap, or sooner than
/// [`STAGGER`] after the previous mint. A pending rotation is retried at its time.
pub fn next_step(f: &Facts) -> Step {
    if let Some(r) = f.rotation {
        if f.now >= r.deadline {
            return Step::AbandonRotation;
        }
        if f.now >= r.next_try && f.cap_free_at.is_none() {
            return Step::RetryRotation;
        }
    }
    let held_back = [
        f.backoff_until.filter(|t| f.now < *t),
        f.cap_free_at,
        f.stagger_until.filter(|t| f.now < *t),
    ]
    .into_iter()
    .flatten()
    .max();
    let wake = match due_slot(f) {
        Some((slot, reason)) => match held_back {
            Some(until) => Some(until),
            None => return Step::Mint(slot, reason),
        },
        None => f.slots.iter().filter_map(|s| s.refresh_at).min(),
    };
    let rotation_wake = f.rotation.map(|r| {
        // A due retry held back by the cap waits for the cap, not for its (past) time.
        let next = match f.cap_free_at {
            Some(free) if f.now >= r.next_try => free,
            _ => r.next_try,
        };
        next.min(r.deadline)
    });
    Step::Sleep(
        [wake, rotation_wake]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(f.now + IDLE),
    )
}

/// The slot most in need of a token: urgent reasons (none, refused, expired) before a
/// proactive refresh, lower slots first.
fn due_slot(f: &Facts) -> Option<(usize, Reason)> {
    let due: Vec<(usize, Reason)> = f
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| mint_reason(s, f.now).map(|r| (i, r)))
        .collect();
    due.iter()
        .find(|(_, r)| *r != Reason::Proactive)
        .or(due.first())
        .copied()
}

fn mint_reason(s: &SlotFacts, now: Instant) -> Option<Reason> {
    match s.token {
        None => Some(Reason::Initial),
        Some(t) if s.rejected_generation >= t.generation => Some(Reason::Rejected),
        Some(t) if now >= t.expires_at => Some(Reason::Expired),
        Some(_) => s
            .refresh_at
            .filter(|at| now >= *at)
            .map(|_| Reason::Proactive),
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
