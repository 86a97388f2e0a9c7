//! Timing policy as pure functions: when to refresh a token, how long to back off after a
//! failure. No clocks and no randomness inside: callers pass the jitter in, so every rule here
//! is checked by exhaustive property-style tests.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

    const JITTERS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 0.999];

    #[test]
    fn refresh_is_before_expiry_and_not_too_early() {
        for life in [1u64, 5, 10, 60, 300, 3600, 86_400, 172_800] {
            for margin in [0u64, 1, 30, 60, 300, 600, 100_000] {
                for j in JITTERS {
                    let l = Duration::from_secs(life);
                    let d = refresh_delay(l, Duration::from_secs(margin), j);
                    assert!(d <= l, "life {life} margin {margin} j {j}: {d:?}");
                    assert!(
                        d.as_secs_f64() >= life as f64 * 0.4 - 1e-9,
                        "too early: life {life} margin {margin} {d:?}"
                    );
                    if margin > 0 {
                        assert!(
                            d < l,
                            "must refresh before expiry: life {life} margin {margin}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn default_margin_for_a_day_token() {
        let d = refresh_delay(Duration::from_secs(86_400), Duration::from_secs(300), 0.0);
        assert_eq!(d, Duration::from_secs(86_100));
        let d = refresh_delay(Duration::from_secs(86_400), Duration::from_secs(300), 0.999);
        assert!(d >= Duration::from_secs(86_040) && d < Duration::from_secs(86_100));
    }

    #[test]
    fn backoff_grows_is_capped_and_jitter_bounded() {
        let init = Duration::from_millis(500);
        let max = Duration::from_secs(60);
        let mut last_hi = Duration::ZERO;
        for attempt in 1..100 {
            let lo = backoff(attempt, FailureClass::Transient, init, max, 0.0);
            let hi = backoff(attempt, FailureClass::Transient, init, max, 0.999);
            assert!(lo <= hi && hi <= max, "attempt {attempt}");
            assert!(lo >= max.min(init) / 2);
            assert!(hi >= last_hi, "non-decreasing");
            last_hi = hi;
        }
        assert_eq!(backoff(1, FailureClass::Transient, init, max, 1.0), init);
        assert_eq!(
            backoff(2, FailureClass::Transient, init, max, 1.0),
            init * 2
        );
        assert_eq!(backoff(40, FailureClass::Transient, init, max, 1.0), max);
    }

    #[test]
    fn harsh_failures_back_off_harder() {
        let init = Duration::from_millis(500);
        let max = Duration::from_secs(60);
        for attempt in 1..10 {
            for j in JITTERS {
                assert!(
                    backoff(attempt, FailureClass::Harsh, init, max, j)
                        >= backoff(attempt, FailureClass::Transient, init, max, j)
                );
            }
        }
        assert_eq!(backoff(1, FailureClass::Harsh, init, max, 1.0), init * 8);
    }
}
