//! The org's inactivity timeout, as the proxy learns it. With the timeout on (5 minutes to 8
//! hours at Genesys), a token unused that long dies and its next call gets a 401. The proxy
//! learns the timeout two ways:
//!
//! - exactly, from `dateTokenIdles` in the `GET /api/v2/tokens/me?preserveIdleTTL=true`
//!   answer that validates each new token (Genesys fills it when the timeout is on);
//! - from the kills: a 401 on a token that had been idle a while. Two kills whose idle times
//!   agree within a quarter, and no token seen alive after as long an idle, make an estimate
//!   (a revocation or a disabled client would not repeat at the same idle time).
//!
//! A token idle for [`IdleModel::dormant_after`] (nine tenths of the timeout) is presumed
//! dead: no request is sent with it, and the pool rests it instead of re-minting it until
//! it is needed again. Timeouts under a second are never learned (Genesys's shortest is five
//! minutes; sub-second ones only exist in tests of the replay path).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::sync::lock;

/// Idle times shorter than this teach nothing.
pub const SHORTEST: Duration = Duration::from_secs(1);
/// Kills remembered.
const KILLS_KEPT: usize = 8;

#[derive(Default)]
pub struct IdleModel {
    /// From `dateTokenIdles`, in ms (0: not reported).
    reported_ms: AtomicU64,
    /// Idle times before a 401, in ms, newest last.
    kills: Mutex<Vec<u64>>,
    /// The longest idle time after which a token still answered, in ms.
    survived_ms: AtomicU64,
    /// What the estimate is now, in ms (0: unknown). Read on the request path.
    timeout_ms: AtomicU64,
}

impl IdleModel {
    /// The timeout, when known.
    pub fn timeout(&self) -> Option<Duration> {
        match self.timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Nine tenths of the timeout: a token idle this long is presumed dead.
    pub fn dormant_after(&self) -> Option<Duration> {
        self.timeout().map(|t| t.mul_f64(0.9))
    }

    /// How the timeout was learned, for `/status`.
    pub fn source(&self) -> Option<&'static str> {
        self.timeout()?;
        Some(if self.reported_ms.load(Ordering::Relaxed) > 0 {
            "date_token_idles"
        } else {
            "kills"
        })
    }

    /// `dateTokenIdles` said a fresh token idles after `left`.
    pub fn reported(&self, left: Duration) {
        if left < SHORTEST {
            return;
        }
        // Whole seconds: the date has second precision at Genesys, and the token was minted
        // a moment before it was checked.
        let ms = (left.as_millis() as u64).div_ceil(1000) * 1000;
        self.reported_ms.store(ms, Ordering::Relaxed);
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// A token idle for `idle` got a 401.
    pub fn killed(&self, idle: Duration) {
        if idle < SHORTEST {
            return;
        }
        let mut kills = lock(&self.kills);
        kills.push(idle.as_millis() as u64);
        if kills.len() > KILLS_KEPT {
            kills.remove(0);
        }
        self.estimate(&kills);
    }

    /// A token idle for `idle` was accepted.
    pub fn survived(&self, idle: Duration) {
        if idle < SHORTEST {
            return;
        }
        let ms = idle.as_millis() as u64;
        if self.survived_ms.fetch_max(ms, Ordering::Relaxed) < ms {
            self.estimate(&lock(&self.kills));
        }
    }

    fn estimate(&self, kills: &[u64]) {
        if self.reported_ms.load(Ordering::Relaxed) > 0 {
            return;
        }
        let survived = self.survived_ms.load(Ordering::Relaxed);
        // Kills at idle times a token was seen to survive were not the idle timeout.
        let mut plausible: Vec<u64> = kills.iter().copied().filter(|k| *k > survived).collect();
        plausible.sort_unstable();
        let estimate = match plausible.as_slice() {
            [a, b, ..] if *b <= a + a / 4 => *a,
            _ => 0,
        };
        self.timeout_ms.store(estimate, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_reported_idle_date_is_taken_as_is() {
        let m = IdleModel::default();
        assert_eq!(m.timeout(), None);
        m.reported(Duration::from_millis(299_400));
        assert_eq!(m.timeout(), Some(300 * S));
        assert_eq!(m.dormant_after(), Some(270 * S));
        assert_eq!(m.source(), Some("date_token_idles"));
        // Kills do not override what Genesys said.
        m.killed(100 * S);
        m.killed(100 * S);
        assert_eq!(m.timeout(), Some(300 * S));
    }

    #[test]
    fn two_kills_at_about_the_same_idle_time_teach_it() {
        let m = IdleModel::default();
        m.killed(3200 * Duration::from_millis(1));
        assert_eq!(m.timeout(), None, "one kill is not a pattern");
        m.killed(3600 * Duration::from_millis(1));
        assert_eq!(m.timeout(), Some(Duration::from_millis(3200)));
        assert_eq!(m.source(), Some("kills"));
    }

    #[test]
    fn kills_that_disagree_or_that_tokens_survive_teach_nothing() {
        let m = IdleModel::default();
        m.killed(2 * S);
        m.killed(10 * S);
        assert_eq!(m.timeout(), None);
        // A revocation seen at light traffic: tokens idle 2 s answer, so a 2 s kill was not
        // the idle timeout.
        let m = IdleModel::default();
        m.survived(2 * S);
        m.killed(2 * S);
        m.killed(2 * S);
        assert_eq!(m.timeout(), None);
        // Learned, then a token survives longer: the estimate is dropped.
        let m = IdleModel::default();
        m.killed(4 * S);
        m.killed(4 * S);
        assert_eq!(m.timeout(), Some(4 * S));
        m.survived(5 * S);
        assert_eq!(m.timeout(), None);
        // Sub-second idle times are ignored.
        let m = IdleModel::default();
        m.killed(Duration::from_millis(300));
        m.killed(Duration::from_millis(300));
        m.reported(Duration::from_millis(300));
        assert_eq!(m.timeout(), None);
    }
}
