//! Property-style tests of the timing policy and the refresher's next step.

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

fn slot(now: Instant) -> SlotFacts {
    SlotFacts {
        token: Some(HeldToken {
            generation: 3,
            expires_at: now + Duration::from_secs(100),
        }),
        rejected_generation: 0,
        refresh_at: Some(now + Duration::from_secs(50)),
        dormant: false,
        wanted: false,
    }
}

fn facts(now: Instant) -> Facts {
    Facts {
        now,
        slots: vec![slot(now)],
        backoff_until: None,
        cap_free_at: None,
        stagger_until: None,
        pace_until: None,
        rotation: None,
    }
}

fn with_slot(now: Instant, s: SlotFacts) -> Facts {
    Facts {
        slots: vec![s],
        ..facts(now)
    }
}

#[test]
fn a_healthy_token_sleeps_until_its_refresh() {
    let now = Instant::now();
    assert_eq!(
        next_step(&facts(now)),
        Step::Sleep(now + Duration::from_secs(50))
    );
    let due = with_slot(
        now,
        SlotFacts {
            refresh_at: Some(now),
            ..slot(now)
        },
    );
    assert_eq!(next_step(&due), Step::Mint(0, Reason::Proactive));
}

#[test]
fn why_a_mint_is_due_in_order() {
    let now = Instant::now();
    let none = with_slot(now, SlotFacts::default());
    assert_eq!(next_step(&none), Step::Mint(0, Reason::Initial));
    let rejected = with_slot(
        now,
        SlotFacts {
            rejected_generation: 3,
            ..slot(now)
        },
    );
    assert_eq!(next_step(&rejected), Step::Mint(0, Reason::Rejected));
    let older_rejection = with_slot(
        now,
        SlotFacts {
            rejected_generation: 2,
            ..slot(now)
        },
    );
    assert!(matches!(next_step(&older_rejection), Step::Sleep(_)));
    let expired = with_slot(
        now,
        SlotFacts {
            token: Some(HeldToken {
                generation: 3,
                expires_at: now,
            }),
            ..slot(now)
        },
    );
    assert_eq!(next_step(&expired), Step::Mint(0, Reason::Expired));
}

#[test]
fn backoff_cap_and_stagger_hold_a_due_mint_back() {
    let now = Instant::now();
    let later = now + Duration::from_secs(2);
    let empty = vec![SlotFacts::default()];
    let backing_off = Facts {
        slots: empty.clone(),
        backoff_until: Some(later),
        ..facts(now)
    };
    assert_eq!(next_step(&backing_off), Step::Sleep(later));
    // The cap holds back a slot's first mint while another slot serves.
    let capped = Facts {
        slots: vec![SlotFacts::default(), slot(now)],
        cap_free_at: Some(later),
        ..facts(now)
    };
    assert_eq!(next_step(&capped), Step::Sleep(later));
    let staggered = Facts {
        slots: empty.clone(),
        stagger_until: Some(later),
        ..facts(now)
    };
    assert_eq!(next_step(&staggered), Step::Sleep(later));
    let backoff_over = Facts {
        slots: empty,
        backoff_until: Some(now),
        ..facts(now)
    };
    assert_eq!(next_step(&backoff_over), Step::Mint(0, Reason::Initial));
}

#[test]
fn a_pool_serves_urgent_slots_before_proactive_ones_one_at_a_time() {
    let now = Instant::now();
    let proactive = SlotFacts {
        refresh_at: Some(now),
        ..slot(now)
    };
    let refused = SlotFacts {
        rejected_generation: 3,
        ..slot(now)
    };
    let f = Facts {
        slots: vec![proactive, slot(now), refused, SlotFacts::default()],
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Mint(2, Reason::Rejected));
    let f = Facts {
        slots: vec![proactive, slot(now)],
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Mint(0, Reason::Proactive));
    // The next slot's refresh is what a healthy pool sleeps until.
    let soon = SlotFacts {
        refresh_at: Some(now + Duration::from_secs(5)),
        ..slot(now)
    };
    let f = Facts {
        slots: vec![slot(now), soon],
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Sleep(now + Duration::from_secs(5)));
}

#[test]
fn rotation_retries_at_its_time_within_its_window() {
    let now = Instant::now();
    let s = Duration::from_secs(1);
    let window = |next_try, deadline| {
        Some(RetryWindow {
            next_try,
            deadline,
            failures: 0,
        })
    };
    let f = Facts {
        rotation: window(now, now + s),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::RetryRotation);
    let f = Facts {
        rotation: window(now + s, now + 5 * s),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Sleep(now + s));
    let f = Facts {
        rotation: window(now, now),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::AbandonRotation);
    // Due but capped: sleep until the cap frees, never spin on a past instant.
    let f = Facts {
        rotation: window(now, now + 5 * s),
        cap_free_at: Some(now + 2 * s),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Sleep(now + 2 * s));
}

fn refused(now: Instant) -> SlotFacts {
    SlotFacts {
        rejected_generation: 3,
        ..slot(now)
    }
}

fn pending(next_try: Instant, deadline: Instant, failures: u32) -> Option<RetryWindow> {
    Some(RetryWindow {
        next_try,
        deadline,
        failures,
    })
}

// Regression (issue 21): with the cap spent by legitimate mints, a revoke left the proxy
// without a token for the rest of the minute while requests timed out.
#[test]
fn without_a_usable_token_a_mint_goes_past_the_cap_at_a_bounded_pace() {
    let now = Instant::now();
    let s = Duration::from_secs(1);
    let capped = Facts {
        slots: vec![refused(now)],
        cap_free_at: Some(now + 40 * s),
        ..facts(now)
    };
    assert_eq!(next_step(&capped), Step::Mint(0, Reason::Rejected));
    // ... but no more than once per STARVING_PACE, and never inside a backoff.
    let paced = Facts {
        pace_until: Some(now + s / 2),
        ..capped.clone()
    };
    assert_eq!(next_step(&paced), Step::Sleep(now + s / 2));
    let backing_off = Facts {
        backoff_until: Some(now + 4 * s),
        ..capped.clone()
    };
    assert_eq!(next_step(&backing_off), Step::Sleep(now + 4 * s));
    // With another slot still usable, the refused one waits for the cap.
    let pool = Facts {
        slots: vec![refused(now), slot(now)],
        ..capped.clone()
    };
    assert_eq!(next_step(&pool), Step::Sleep(now + 40 * s));
    // A proactive refresh never goes past the cap.
    let proactive = Facts {
        slots: vec![SlotFacts {
            refresh_at: Some(now),
            ..slot(now)
        }],
        ..capped
    };
    assert_eq!(next_step(&proactive), Step::Sleep(now + 40 * s));
}

// Regression (issue 21): a pending wrong secret was tried while the working one minted
// nothing, and the proxy ran out of tokens.
#[test]
fn the_working_secret_mints_before_a_pending_rotation_is_tried() {
    let now = Instant::now();
    let s = Duration::from_secs(1);
    for failures in [0, 3] {
        let f = Facts {
            slots: vec![refused(now)],
            rotation: pending(now, now + 300 * s, failures),
            ..facts(now)
        };
        assert_eq!(next_step(&f), Step::Mint(0, Reason::Rejected), "{failures}");
    }
    // Urgent slot in its backoff (the working secret fails too): the rotation may go.
    let f = Facts {
        slots: vec![refused(now)],
        backoff_until: Some(now + 5 * s),
        rotation: pending(now, now + 300 * s, 1),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::RetryRotation);
    // Regression (chaos soak, seed 2): held back only by the pace, the urgent mint is not
    // overtaken by a due rotation attempt (each attempt pushed the pace forward again, and the
    // working secret minted nothing for 3.7 s after a revoke).
    let f = Facts {
        slots: vec![refused(now)],
        pace_until: Some(now + s / 2),
        stagger_until: Some(now - s),
        rotation: pending(now, now + 300 * s, 2),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Sleep(now + s / 2));
    let f = Facts {
        pace_until: Some(now - s / 2),
        ..f
    };
    assert_eq!(next_step(&f), Step::Mint(0, Reason::Rejected));
    // Starving and capped: the urgent mint goes, the rotation waits for the cap.
    let f = Facts {
        slots: vec![refused(now)],
        cap_free_at: Some(now + 30 * s),
        pace_until: Some(now + s),
        rotation: pending(now, now + 300 * s, 1),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Sleep(now + s));
    assert_eq!(rotation_next_attempt(&f), Some(now + 30 * s));
}

#[test]
fn a_fresh_rotation_replaces_a_due_refresh_and_a_failed_one_waits_behind_it() {
    let now = Instant::now();
    let due = SlotFacts {
        refresh_at: Some(now),
        ..slot(now)
    };
    let fresh = Facts {
        slots: vec![due],
        rotation: pending(now, now + Duration::from_secs(300), 0),
        ..facts(now)
    };
    assert_eq!(next_step(&fresh), Step::RetryRotation);
    let failed = Facts {
        rotation: pending(now, now + Duration::from_secs(300), 2),
        ..fresh
    };
    assert_eq!(next_step(&failed), Step::Mint(0, Reason::Proactive));
}

// The bound stated in the README: with the default backoff_initial_ms, a refused new secret
// is sent at most 5 times in any minute, and at most twice a minute after its first two
// minutes.
#[test]
fn a_refused_new_secret_is_tried_a_handful_of_times_a_minute_at_most() {
    let init = Duration::from_millis(500);
    let max = Duration::from_secs(60);
    for j in JITTERS {
        let mut at = vec![0.0f64];
        for attempt in 1..40 {
            let d = rotation_backoff(attempt, FailureClass::Harsh, init, max, j);
            assert!(d <= ROTATION_REFUSED_MAX, "{d:?}");
            at.push(at.last().unwrap() + d.as_secs_f64());
        }
        for (i, start) in at.iter().enumerate() {
            let in_minute = at[i..].iter().take_while(|t| **t < start + 60.0).count();
            assert!(
                in_minute <= 5,
                "jitter {j}: {in_minute} attempts from {start}s"
            );
            if *start >= 120.0 {
                assert!(in_minute <= 2, "jitter {j}: {in_minute} from {start}s");
            }
        }
        assert!(*at.last().unwrap() > 3600.0, "backs off to minutes");
    }
    // A transient failure (network, 5xx) of a new secret keeps the normal backoff.
    assert_eq!(
        rotation_backoff(40, FailureClass::Transient, init, max, 1.0),
        max
    );
}

#[test]
fn idle_dead_slots_rest_until_requests_want_them() {
    let now = Instant::now();
    let dormant = SlotFacts {
        dormant: true,
        ..slot(now)
    };
    // Slot 0 serves; slot 1 is presumed idle-dead and nobody wants it: nothing to mint.
    let f = Facts {
        slots: vec![slot(now), dormant],
        ..facts(now)
    };
    assert!(matches!(next_step(&f), Step::Sleep(_)));
    // Budget pressure wants it: minted ahead of need, within the cap like a refresh.
    let wanted = SlotFacts {
        wanted: true,
        ..dormant
    };
    let f = Facts {
        slots: vec![slot(now), wanted],
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Mint(1, Reason::Idle));
    let capped = Facts {
        cap_free_at: Some(now + Duration::from_secs(5)),
        ..f.clone()
    };
    assert!(matches!(next_step(&capped), Step::Sleep(_)));
    // Every token idle-dead and a request waiting (it wants slot 0): urgent, past the cap.
    let f = Facts {
        slots: vec![
            SlotFacts {
                wanted: true,
                ..dormant
            },
            dormant,
        ],
        cap_free_at: Some(now + Duration::from_secs(5)),
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Mint(0, Reason::Idle));
    // An expired slot past the first rests too; the first is kept from expiring.
    let expired = SlotFacts {
        token: Some(HeldToken {
            generation: 3,
            expires_at: now - Duration::from_secs(1),
        }),
        ..slot(now)
    };
    let f = Facts {
        slots: vec![slot(now), expired],
        ..facts(now)
    };
    assert!(matches!(next_step(&f), Step::Sleep(_)));
    let f = Facts {
        slots: vec![expired, slot(now)],
        ..facts(now)
    };
    assert_eq!(next_step(&f), Step::Mint(0, Reason::Expired));
}
