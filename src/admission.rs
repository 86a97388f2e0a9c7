//! Who gets a connection: at accept, before a byte is read, the client address is checked
//! against `proxy.allowed_client_cidrs` and the number of open client connections against
//! `proxy.max_connections`. A refused connection gets a complete JSON answer (403
//! `proxy.client_not_allowed` or 503 `proxy.too_many_connections`) and is closed. The cap is
//! kept under the open-file limit so the admin listener always has descriptors left.
//!
//! No single client address may hold more than [`share_of`] the cap (seven eighths): one
//! client opening and holding every connection (reconnecting as they time out) would
//! otherwise lock every other client out. The rest is always left for the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Live;
use crate::metrics::Metrics;
use crate::proxy::{client_allowed, Refusal};

/// File descriptors kept free for the admin listener, the token client, logs and the audit
/// log, whatever the connection count.
const RESERVED_FDS: u64 = 128;

/// Admission at accept on one credential's listener, shared by every worker thread: its
/// allowlist and metrics, and the process's one [`Capacity`].
pub struct Gate {
    pub live: Arc<ArcSwap<Live>>,
    pub metrics: Arc<Metrics>,
    capacity: Arc<Capacity>,
}

/// The process's connection cap, over every listener: one budget of file descriptors, so the
/// caps of several credentials cannot add up past the open-file limit.
pub struct Capacity {
    connections: Arc<Semaphore>,
    limit: usize,
    /// Open connections per client address (only addresses holding one).
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Refused connections being answered; past this many, refusals are closed unanswered.
    refusals: Arc<Semaphore>,
}

/// The most connections one client address may hold: seven eighths of the cap (all of a cap
/// under 8), so other clients always find room.
pub fn share_of(limit: usize) -> usize {
    (limit - limit / 8).max(1)
}

/// A served connection's place: its slot under the cap and its count for its address, both
/// given back when it is dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = crate::sync::lock(&self.per_source);
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// Refused connections answered at once, at most (each is held for [`REFUSAL_TIME`] at most).
const MAX_REFUSALS: usize = 256;

/// What happens to an accepted connection.
pub enum Admit {
    /// Serve it; the slot is held for the connection's life.
    Serve(Slot),
    /// Answer it with this refusal, holding the permit while answering.
    Refuse(Refusal, OwnedSemaphorePermit),
    /// Close it at once: too many refusals are being answered already.
    Drop(Refusal),
}

impl Capacity {
    /// At most `limit` open client connections (see [`connection_limit`]).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Capacity {
            connections: Arc::new(Semaphore::new(limit)),
            limit,
            per_source: Arc::new(Mutex::new(HashMap::new())),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
        })
    }

    /// Open client connections now, over every listener.
    pub fn open(&self) -> usize {
        self.limit - self.connections.available_permits()
    }
}

impl Gate {
    pub fn new(live: Arc<ArcSwap<Live>>, metrics: Arc<Metrics>, capacity: Arc<Capacity>) -> Self {
        Gate {
            live,
            metrics,
            capacity,
        }
    }

    /// Decides on a connection from `peer` before anything is read from it.
    pub fn admit(&self, peer: IpAddr) -> Admit {
        let cap = &*self.capacity;
        let refusal = if !client_allowed(peer, &self.live.load().proxy.allowed_client_cidrs) {
            Refusal::ClientNotAllowed
        } else {
            match cap.connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    let mut counts = crate::sync::lock(&cap.per_source);
                    let held = counts.entry(peer).or_insert(0);
                    if *held < share_of(cap.limit) {
                        *held += 1;
                        return Admit::Serve(Slot {
                            _permit: permit,
                            source: peer,
                            per_source: cap.per_source.clone(),
                        });
                    }
                    Refusal::TooManyConnections
                }
                Err(_) => Refusal::TooManyConnections,
            }
        };
        match cap.refusals.clone().try_acquire_owned() {
            Ok(permit) => Admit::Refuse(refusal, permit),
            Err(_) => Admit::Drop(refusal),
        }
    }
}

/// How long a refused connection is kept, at most, to answer it.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// Answers a refused connection with a complete response and closes it, within
/// `REFUSAL_TIME` whatever the client does. The answer is written once the client has sent
/// something (HTTP clients treat an answer before their request as a broken connection); what
/// it sent is drained so the close is a FIN, not a reset that could discard the answer.
pub async fn refuse(mut tcp: TcpStream, refusal: Refusal) {
    let answer = refusal_bytes(refusal);
    let exchange = async {
        let mut buf = [0u8; 4096];
        if matches!(tcp.read(&mut buf).await, Ok(0) | Err(_)) {
            return;
        }
        if tcp.write_all(&answer).await.is_err() {
            return;
        }
        let _ = tcp.shutdown().await;
        let mut drained = 0;
        while drained < 65_536 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_TIME, exchange).await;
}

/// A whole HTTP/1.1 response for `refusal`, closing the connection.
fn refusal_bytes(refusal: Refusal) -> Vec<u8> {
    let body = refusal.body();
    let reason = http::StatusCode::from_u16(refusal.status())
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        refusal.status(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Raises the soft limit on open files to the hard limit (as Go and nginx do) and returns the
/// connection cap that leaves room for everything else: each client connection may hold one
/// upstream connection too.
pub fn connection_limit(configured: usize) -> (usize, Option<String>) {
    let nofile = raise_nofile_limit();
    let fits = (nofile.saturating_sub(RESERVED_FDS) / 2) as usize;
    if configured <= fits {
        return (configured, None);
    }
    let limit = fits.max(1);
    let warning = format!(
        "proxy.max_connections = {configured} needs about {} open files but the limit is {nofile}; serving at most {limit} connections (raise LimitNOFILE or ulimit -n)",
        configured * 2 + RESERVED_FDS as usize
    );
    (limit, Some(warning))
}

fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}
