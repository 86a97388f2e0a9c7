//! The deadline for a request head. pingora bounds each single read of a request head, not
//! the whole head, so a client sending one byte per second would hold its connection forever.
//! A [`HeadClock`] per connection bounds the time to receive each head
//! (`proxy.request_header_timeout_ms`): armed when the connection opens, stopped by the
//! proxy's first hook once a head is parsed ([`head_received`]), and re-armed with the
//! keep-alive idle time when a response is done ([`request_done`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long an idle keep-alive connection may wait for its next request (pingora's default).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

tokio::task_local! {
    /// The head clock of the connection this task serves.
    static HEAD_CLOCK: Arc<HeadClock>;
}

/// The deadline for the request head a connection is waiting for, if any.
///
/// Arming and disarming happen twice per request, so they are atomic stores only: the timer is
/// moved when it fires (to the deadline as it is then), or at once when a deadline is set
/// earlier than the timer. Re-registering a tokio timer per request would cost a task wake-up
/// and, whenever the timer wheel asks for it, a write to the runtime's own eventfd and an
/// extra `epoll_wait`.
pub struct HeadClock {
    base: Instant,
    /// Milliseconds after `base` (plus one; 0 = no deadline).
    deadline: AtomicU64,
    /// When the timer fires, in the same units ([`NO_TIMER`] while it waits for an arm).
    timer: AtomicU64,
    changed: Notify,
}

/// `HeadClock::timer` while no timer is set: any deadline is earlier.
const NO_TIMER: u64 = u64::MAX;

impl HeadClock {
    pub fn new(first_head: Duration) -> Arc<Self> {
        let clock = Arc::new(HeadClock {
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            timer: AtomicU64::new(NO_TIMER),
            changed: Notify::new(),
        });
        clock.arm(first_head);
        clock
    }

    fn arm(&self, within: Duration) {
        let at = (self.base.elapsed() + within).as_millis() as u64 + 1;
        // SeqCst here and in `expired`: each side stores one variable and loads the other.
        self.deadline.store(at, Ordering::SeqCst);
        if at < self.timer.load(Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }

    /// The timer finds the clock disarmed when it fires.
    fn disarm(&self) {
        self.deadline.store(0, Ordering::SeqCst);
    }

    fn instant(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms - 1)
    }

    /// Resolves when a deadline passes while still armed.
    pub async fn expired(&self) {
        loop {
            let at = self.deadline.load(Ordering::SeqCst);
            if at == 0 {
                self.timer.store(NO_TIMER, Ordering::SeqCst);
                // An arm between the load above and the store has notified (its deadline is
                // earlier than NO_TIMER) or is seen here.
                if self.deadline.load(Ordering::SeqCst) == 0 {
                    self.changed.notified().await;
                }
                continue;
            }
            let when = self.instant(at);
            if when <= Instant::now() {
                return;
            }
            self.timer.store(at, Ordering::SeqCst);
            tokio::select! {
                _ = tokio::time::sleep_until(when) => {}
                _ = self.changed.notified() => {}
            }
        }
    }

    /// Runs `serve` (one connection) with this clock reachable from the proxy hooks; returns
    /// false when the connection was cut because a head did not arrive in time.
    pub async fn run<F: std::future::Future<Output = ()>>(self: Arc<Self>, serve: F) -> bool {
        let clock = self.clone();
        HEAD_CLOCK
            .scope(self, async move {
                tokio::select! {
                    _ = serve => true,
                    _ = clock.expired() => false,
                }
            })
            .await
    }
}

/// Called by the proxy once a request head is parsed: the head arrived in time.
pub fn head_received() {
    let _ = HEAD_CLOCK.try_with(|c| c.disarm());
}

/// Called by the proxy when a request is done: the next head must come within the keep-alive
/// idle time.
pub fn request_done(header_timeout: Duration) {
    let _ = HEAD_CLOCK.try_with(|c| c.arm(KEEPALIVE_IDLE.max(header_timeout)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_clock_fires_only_while_armed() {
        let clock = HeadClock::new(Duration::from_secs(10));
        let c = clock.clone();
        let served = tokio::spawn(c.run(async {
            head_received();
            tokio::time::sleep(Duration::from_secs(30)).await;
            request_done(Duration::from_secs(10));
            std::future::pending::<()>().await
        }));
        // Disarmed while the request runs (30 s > 10 s), re-armed for the keep-alive idle time
        // after it: cut at 30 + 60 s, not before.
        tokio::time::sleep(Duration::from_secs(89)).await;
        assert!(!served.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!served.await.unwrap(), "cut for a missing head");
    }

    /// Counts wake-ups of the task polling the clock.
    #[derive(Default)]
    struct Wakes(AtomicU64);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rearming_later_leaves_the_timer_alone() {
        use std::future::Future;
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let clock = HeadClock::new(Duration::from_secs(10));
        let mut expired = Box::pin(clock.expired());
        assert!(
            expired.as_mut().poll(&mut cx).is_pending(),
            "timer set for 10 s"
        );
        // Per request: disarm, then arm later than the timer. Neither wakes the clock.
        for _ in 0..3 {
            clock.disarm();
            clock.arm(Duration::from_secs(60));
        }
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        // The 10 s timer fires, finds the deadline moved to 60 s, and waits for it.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(expired.as_mut().poll(&mut cx).is_pending());
        // An earlier deadline wakes it at once.
        clock.arm(Duration::from_secs(1));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert!(expired.as_mut().poll(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert!(expired.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_completes_is_cut_at_the_deadline() {
        let clock = HeadClock::new(Duration::from_secs(10));
        let served = tokio::spawn(clock.run(std::future::pending::<()>()));
        tokio::time::sleep(Duration::from_millis(9_900)).await;
        assert!(!served.is_finished());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!served.await.unwrap());
    }
}
