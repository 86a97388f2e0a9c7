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

/// A new secret the token endpoint refused (or throttled) is retried no sooner than the harsh
/// backoff, which grows up to this (whatever `backoff_max_ms` says): a new secret that is not
/// active yet gets a few quick tries, then one every few minutes, never a stream of refused
/// requests (the credential-stuffing pattern Genesys throttles).
pub const ROTATION_REFUSED_MAX: Duration = Duration::from_secs(300);

/// The wait before the next attempt of a rotation whose `attempt`-th try failed. With the
/// defaults (`backoff_initial_ms = 500`) a refused new secret is tried at most 5 times in its
/// first minute, twice in the second, then once per 2.5 to 5 minutes.
pub fn rotation_backoff(
    attempt: u32,
    class: FailureClass,
    initial: Duration,
    max: Duration,
    jitter: f64,
) -> Duration {
    let max = match class {
        FailureClass::Harsh => max.max(ROTATION_REFUSED_MAX),
        FailureClass::Transient => max,
    };
    backoff(attempt, class, initial, max, jitter)
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
    /// The slot's token is presumed dead of the org's idle timeout and requests want it.
    Idle,
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
            Reason::Idle => "idle_timeout",
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
    /// The token is presumed dead of the org's idle timeout (unused for nine tenths of it).
    pub dormant: bool,
    /// Requests want this slot (budget pressure, or no usable token at all).
    pub wanted: bool,
}

/// A rotation to a new secret, waiting for its (next) attempt.
#[derive(Debug, Clone, Copy)]
pub struct RetryWindow {
    pub next_try: Instant,
    pub deadline: Instant,
    /// Attempts with this secret that failed so far (0: not tried yet).
    pub failures: u32,
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
    /// The last token request plus [`STAGGER`].
    pub stagger_until: Option<Instant>,
    /// The last token request plus [`STARVING_PACE`].
    pub pace_until: Option<Instant>,
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

/// While no usable token is held, mints may go past `max_token_requests_per_minute`, but no
/// more often than this (and still after any backoff): the cap exists to keep bursts from
/// tripping Genesys's throttle, not to leave the proxy without a token.
pub const STARVING_PACE: Duration = Duration::from_secs(1);

/// Decides the refresher's next step, in this order:
///
/// 1. a slot with no usable token (none yet, refused by the API, expired), with the secret in
///    use: the proxy must keep a working token before it tries anything new. Nothing goes
///    before it unless it waits for its own backoff (the secret in use is failing: then a
///    pending rotation may be the secret that works);
/// 2. a pending rotation's attempt, at its own time (its schedule alone decides; re-reading an
///    unchanged file never adds an attempt), before a proactive refresh when it was never
///    tried (its token replaces the one due), after it once it has failed;
/// 3. a proactive refresh.
///
/// Every mint waits for its backoff and [`STAGGER`] after the previous token request. Every
/// token request, rotation attempts included, counts against the per-minute cap, and rotation
/// attempts and proactive refreshes wait for it; only while *no* slot holds a usable token may
/// an urgent mint go past the cap, at most once per [`STARVING_PACE`].
pub fn next_step(f: &Facts) -> Step {
    let rotation = f.rotation;
    if rotation.is_some_and(|r| f.now >= r.deadline) {
        return Step::AbandonRotation;
    }
    let starving = !f.slots.iter().any(|s| usable(s, f.now));
    let due = due_slot(f);
    // Waking a resting slot is ahead of need (the tokens in use still serve), unless no token
    // can serve at all.
    let ahead = |r: &Reason| matches!(r, Reason::Proactive) || (*r == Reason::Idle && !starving);
    let urgent = due.filter(|(_, r)| !ahead(r));
    let proactive = due.filter(|(_, r)| ahead(r));
    let future = |t: Option<Instant>| t.filter(|t| f.now < *t);
    let backoff = future(f.backoff_until);
    let stagger = future(f.stagger_until);
    // The instant each kind of step may go (None: now).
    let urgent_gate = if starving {
        [backoff, stagger, future(f.pace_until)]
    } else {
        [backoff, stagger, f.cap_free_at]
    };
    let normal_gate = [backoff, stagger, f.cap_free_at];
    // While starving, a rotation attempt keeps the pace too: it must never push the urgent
    // mint's pace forward and overtake it again and again.
    let pace = future(f.pace_until).filter(|_| starving);
    let rotation_gate = [stagger, f.cap_free_at, pace];
    let gate = |g: [Option<Instant>; 3]| g.into_iter().flatten().max();

    let mut candidates: Vec<(Step, Option<Instant>)> = Vec::with_capacity(3);
    if let Some((slot, reason)) = urgent {
        let held = gate(urgent_gate);
        if held.is_some() && backoff.is_none() {
            // Held only by the pace, the stagger or the cap: nothing else goes before it.
            return Step::Sleep(held.unwrap_or(f.now));
        }
        candidates.push((Step::Mint(slot, reason), held));
    }
    let retry = rotation.filter(|r| f.now >= r.next_try);
    let retry = retry.map(|_| (Step::RetryRotation, gate(rotation_gate)));
    let refresh = proactive.map(|(slot, r)| (Step::Mint(slot, r), gate(normal_gate)));
    if rotation.is_some_and(|r| r.failures == 0) {
        candidates.extend(retry.into_iter().chain(refresh));
    } else {
        candidates.extend(refresh.into_iter().chain(retry));
    }
    let mut wake: Vec<Instant> = Vec::new();
    for (step, held_until) in candidates {
        match held_until {
            None => return step,
            Some(t) => wake.push(t),
        }
    }
    // Nothing may go now: sleep until the earliest thing that could change that.
    wake.extend(f.slots.iter().filter_map(|s| s.refresh_at));
    wake.extend(f.slots.iter().filter_map(|s| s.token.map(|t| t.expires_at)));
    if let Some(r) = rotation {
        wake.push(r.deadline);
        if f.now < r.next_try {
            wake.push(r.next_try);
        }
    }
    Step::Sleep(
        wake.into_iter()
            .filter(|t| *t > f.now)
            .min()
            .unwrap_or(f.now + IDLE),
    )
}

/// When a pending rotation's next attempt can go: its own time, held back by the cap and
/// the stagger (for `/status` and the reload's answer).
pub fn rotation_next_attempt(f: &Facts) -> Option<Instant> {
    let r = f.rotation?;
    let stagger = f.stagger_until.filter(|t| f.now < *t);
    [Some(r.next_try.max(f.now)), stagger, f.cap_free_at]
        .into_iter()
        .flatten()
        .max()
        .map(|t| t.min(r.deadline))
}

/// A token requests may be sent with: present, not refused, not expired, not idle-dead.
fn usable(s: &SlotFacts, now: Instant) -> bool {
    !s.dormant
        && s.token
            .is_some_and(|t| s.rejected_generation < t.generation && now < t.expires_at)
}

/// The slot most in need of a token: urgent reasons (none, refused, expired) before a
/// proactive refresh or a wanted resting slot, lower slots first.
fn due_slot(f: &Facts) -> Option<(usize, Reason)> {
    let mut first = None;
    for (i, s) in f.slots.iter().enumerate() {
        match mint_reason(i, s, f.now) {
            Some(r @ (Reason::Proactive | Reason::Idle)) => {
                first.get_or_insert((i, r));
            }
            Some(r) => return Some((i, r)),
            None => {}
        }
    }
    first
}

/// Why `slot` needs a mint now, if it does. A slot no request wants rests instead of being
/// minted when its token is presumed idle-dead, or (past the first slot) expired: an idle
/// pool costs no token requests; the first slot is still kept from expiring.
fn mint_reason(slot: usize, s: &SlotFacts, now: Instant) -> Option<Reason> {
    let expired = s.token.is_some_and(|t| now >= t.expires_at);
    let resting = !s.wanted && (s.dormant || (slot > 0 && expired));
    match s.token {
        None => Some(Reason::Initial),
        Some(t) if s.rejected_generation >= t.generation => Some(Reason::Rejected),
        Some(_) if resting => None,
        Some(_) if expired => Some(Reason::Expired),
        Some(_) if s.dormant => Some(Reason::Idle),
        Some(_) => s
            .refresh_at
            .filter(|at| now >= *at)
            .map(|_| Reason::Proactive),
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
