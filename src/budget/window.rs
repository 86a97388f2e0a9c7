//! One token's rate-limit window, as far as the proxy can tell: Genesys limits API calls per
//! token per window (300 a minute by default) and says where a token stands on every answer
//! (`inin-ratelimit-count`, `-allowed`, `-reset`). Between answers the proxy counts what it
//! sent itself.
//!
//! Calls are also *paced*: credit holds at most a tenth of the window (at least 2) and refills
//! at what is left of the window spread over the time left in it. Without pacing one bursting application would spend a
//! whole window in its first second and every other application would wait for the reset (up
//! to a minute); paced, a steady application waits at most one refill step (0.2 s at 300 a
//! minute) and goes before the burster, which the fair queue serves last. Pure: callers pass the
//! time.

use std::time::{Duration, Instant};

/// A token's window: how many calls it allows, how many are used, when it resets.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The token (generation) this window belongs to: a new token starts a fresh window.
    pub generation: u64,
    pub allowed: u64,
    pub used: u64,
    /// When `used` goes back to 0; `None` until the first call opens the window.
    pub resets_at: Option<Instant>,
    /// Length of a window when Genesys has not said otherwise.
    pub length: Duration,
    /// Paced credit and when it was last refilled.
    credit: f64,
    credit_at: Option<Instant>,
    /// `[cluster]`: calls taken since they were last added to the shared count in Redis.
    unshared: u64,
}

/// The share of a window that may go out at once.
const BURST_FRACTION: f64 = 0.1;

impl Window {
    pub fn new(generation: u64, allowed: u64, length: Duration) -> Self {
        let mut w = Window {
            generation,
            allowed,
            used: 0,
            resets_at: None,
            length,
            credit: 0.0,
            credit_at: None,
            unshared: 0,
        };
        w.credit = w.burst();
        w
    }

    fn burst(&self) -> f64 {
        (self.allowed as f64 * BURST_FRACTION).max(2.0)
    }

    /// Credit per second: what is left of the window spread over the time left in it, so the
    /// whole window is used and never filled before it resets (a fresh window: the window's
    /// calls over its length).
    fn rate(&self, now: Instant) -> f64 {
        let left = self.allowed.saturating_sub(self.used) as f64 - self.credit.max(0.0);
        let time = self
            .resets_at
            .map_or(self.length, |t| t.saturating_duration_since(now))
            .as_secs_f64()
            .max(0.001);
        match self.resets_at {
            None => self.allowed as f64 / time,
            Some(_) => left.max(0.0) / time,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.credit_at {
            let gained = now.saturating_duration_since(at).as_secs_f64() * self.rate(now);
            self.credit = (self.credit + gained).min(self.burst());
        }
        self.credit_at = Some(now);
    }

    /// Forgets calls of a window that is over.
    pub fn roll(&mut self, now: Instant) {
        if self.resets_at.is_some_and(|t| now >= t) {
            self.used = 0;
            self.resets_at = None;
        }
    }

    pub fn remaining(&self, now: Instant) -> u64 {
        if self.resets_at.is_some_and(|t| now >= t) {
            return self.allowed;
        }
        self.allowed.saturating_sub(self.used)
    }

    /// Counts one call if the window has room and the pace allows it.
    pub fn take(&mut self, now: Instant) -> bool {
        self.roll(now);
        self.refill(now);
        if self.used >= self.allowed || self.credit < 1.0 {
            return false;
        }
        self.used += 1;
        self.unshared += 1;
        self.credit -= 1.0;
        self.resets_at.get_or_insert(now + self.length);
        true
    }

    /// Counts every call the window has room and paced credit for, at once, if that is at
    /// least `min`: what the budget hands out as tickets.
    pub fn take_many(&mut self, now: Instant, min: u64) -> u64 {
        self.roll(now);
        self.refill(now);
        let n = (self.credit.max(0.0).floor() as u64).min(self.allowed.saturating_sub(self.used));
        if n == 0 || n < min {
            return 0;
        }
        // Not `unshared`: a ticket is shared when it is taken (see `Tickets::take_taken`).
        self.used += n;
        self.credit -= n as f64;
        self.resets_at.get_or_insert(now + self.length);
        n
    }

    /// Gives back `n` calls counted but never sent (tickets voided).
    pub fn give_back_many(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.used = self.used.saturating_sub(n);
        self.credit = (self.credit + n as f64).min(self.burst());
    }

    /// Gives back a call that was counted but never sent.
    pub fn give_back(&mut self) {
        self.used = self.used.saturating_sub(1);
        self.unshared = self.unshared.saturating_sub(1);
        self.credit = (self.credit + 1.0).min(self.burst());
    }

    /// What Genesys said on an answer: `count` calls used of `allowed`, resetting in
    /// `reset_seconds`. Genesys's count wins over the local one when it is higher (another
    /// user of the token, or calls the proxy did not see answered yet).
    ///
    /// `reset_seconds` is rounded up to whole seconds, so within one window the earliest end
    /// reported is the best estimate: the reset only ever moves earlier. A reported end more
    /// than a second past the estimate means Genesys already started a new window: its count
    /// is then the truth.
    pub fn observe(&mut self, count: u64, allowed: u64, reset_seconds: Option<u64>, now: Instant) {
        self.roll(now);
        self.allowed = allowed;
        let reported = reset_seconds.map(|r| now + Duration::from_secs(r));
        match (self.resets_at, reported) {
            (Some(ours), Some(theirs)) if theirs > ours + Duration::from_secs(1) => {
                self.used = count;
                self.resets_at = Some(theirs);
            }
            (Some(ours), Some(theirs)) => {
                self.used = self.used.max(count);
                self.resets_at = Some(ours.min(theirs));
            }
            (ours, theirs) => {
                self.used = self.used.max(count);
                self.resets_at = ours.or(theirs);
            }
        }
    }

    /// Calls taken since the last time this was asked (`[cluster]` adds them to Redis).
    pub fn take_unshared(&mut self) -> u64 {
        std::mem::take(&mut self.unshared)
    }

    /// A 429: nothing left until `retry_after` has passed.
    pub fn exhaust(&mut self, retry_after: Duration, now: Instant) {
        self.used = self.allowed;
        self.resets_at = Some(now + retry_after);
    }

    /// When the next call is possible (now if there is room and credit).
    pub fn free_at(&self, now: Instant) -> Instant {
        if self.remaining(now) == 0 {
            return self.resets_at.unwrap_or(now);
        }
        let elapsed = self
            .credit_at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        let rate = self.rate(now);
        let credit = (self.credit + elapsed * rate).min(self.burst());
        if credit >= 1.0 {
            now
        } else if rate <= 0.0 {
            self.resets_at.unwrap_or(now)
        } else {
            now + Duration::from_secs_f64((1.0 - credit) / rate).min(
                self.resets_at
                    .map_or(self.length, |t| t.saturating_duration_since(now)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn calls_are_paced_a_burst_then_the_rest_spread_over_the_window() {
        let t0 = Instant::now();
        let mut w = Window::new(1, 300, 60 * S);
        let burst = (0..100).take_while(|_| w.take(t0)).count();
        assert_eq!(burst, 30, "a tenth of the window at once");
        // The 270 left are spread over the 60 s left: 4.5 a second.
        let next = w.free_at(t0);
        let step = Duration::from_secs_f64(60.0 / 270.0);
        assert!(
            next > t0 + step - Duration::from_millis(2)
                && next <= t0 + step + Duration::from_millis(2),
            "{:?}",
            next - t0
        );
        assert!(!w.take(t0 + step / 2));
        // Under sustained demand the whole window is used, and never filled before its end.
        let granted: Vec<u64> = (1..60_000u64)
            .filter(|ms| w.take(t0 + Duration::from_millis(*ms)))
            .collect();
        let sent = granted.len();
        assert!(sent + 30 <= 300, "{sent}");
        assert!(sent + 30 >= 295, "the window is used: {}", sent + 30);
        assert!(
            granted.last().is_some_and(|ms| *ms > 55_000),
            "spread to the end"
        );
    }

    #[test]
    fn calls_are_counted_until_the_window_resets() {
        let t0 = Instant::now();
        let mut w = Window::new(1, 2, 10 * S);
        assert!(w.take(t0) && w.take(t0 + S));
        assert!(!w.take(t0 + 2 * S), "full");
        assert_eq!(
            w.free_at(t0 + 2 * S),
            t0 + 10 * S,
            "the window opened at the first call"
        );
        assert!(w.take(t0 + 10 * S), "reset");
        assert_eq!(w.remaining(t0 + 10 * S), 1);
    }

    #[test]
    fn genesys_headers_correct_the_local_count() {
        let t0 = Instant::now();
        let mut w = Window::new(1, 300, 60 * S);
        w.take(t0);
        w.observe(250, 180, Some(7), t0);
        assert_eq!(
            w.remaining(t0),
            0,
            "allowed comes from the header, count wins when higher"
        );
        assert_eq!(w.free_at(t0), t0 + 7 * S);
        w.observe(3, 180, Some(7), t0 + 8 * S);
        assert_eq!(w.used, 3, "after the reset the header count is the truth");
    }

    #[test]
    fn a_429_exhausts_until_retry_after() {
        let t0 = Instant::now();
        let mut w = Window::new(1, 300, 60 * S);
        w.exhaust(5 * S, t0);
        assert!(!w.take(t0 + 4 * S));
        assert!(w.take(t0 + 5 * S));
    }

    #[test]
    fn a_call_given_back_frees_its_place() {
        let t0 = Instant::now();
        let mut w = Window::new(1, 1, 60 * S);
        assert!(w.take(t0));
        w.give_back();
        assert!(w.take(t0));
    }
}
