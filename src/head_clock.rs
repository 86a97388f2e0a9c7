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
pub struct HeadClock {
    base: Instant,
    /// Milliseconds after `base` (plus one; 0 = no deadline).
    deadline: AtomicU64,
    changed: Notify,
}

impl HeadClock {
    pub fn new(first_head: Duration) -> Arc<Self> {
        let clock = Arc::new(HeadClock {
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            changed: Notify::new(),
        });
        clock.arm(first_head);
        clock
    }

    fn arm(&self, within: Duration) {
        let at = (self.base.elapsed() + within).as_millis() as u64 + 1;
        self.deadline.store(at, Ordering::Release);
        self.changed.notify_one();
    }

    fn disarm(&self) {
        self.deadline.store(0, Ordering::Release);
        self.changed.notify_one();
    }

    fn deadline(&self) -> Option<Instant> {
        match self.deadline.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.base + Duration::from_millis(ms - 1)),
        }
    }

    /// Resolves when a deadline passes while still armed.
    pub async fn expired(&self) {
        loop {
            match self.deadline() {
                None => self.changed.notified().await,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {
                            if self.deadline() == Some(at) {
                                return;
                            }
                        }
                        _ = self.changed.notified() => {}
                    }
                }
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
