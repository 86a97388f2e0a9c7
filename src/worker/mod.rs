//! The proxy's worker threads: each runs a single-threaded runtime with its own accept loop on a
//! clone of the listener and its own pingora app (hence its own upstream connection pool), so a
//! connection and its pooled upstream connections live on one thread with no cross-thread
//! wake-ups (pingora's own model). We run pingora's `HttpProxy` under this loop rather than
//! under pingora's `Server` so tests can bind port 0 and drive shutdown in-process.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::ServerApp;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::admission::{self, Admit, Gate};
use crate::head_clock::HeadClock;
use crate::proxy::{GenesysProxy, Refusal};
use crate::shutdown::Shutdown;

mod stream;
pub use stream::Downstream;

/// Binds a listener; with `reuse_port` a second process can bind the same address, which is
/// how a restart hands over without refusing connections (see the README).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// One proxy worker: its own runtime, accept loop and connections.
pub struct Worker {
    pub app: Arc<pingora::proxy::HttpProxy<GenesysProxy>>,
    /// Tells pingora's connection loops to finish their current request and stop.
    pub pingora_shutdown: watch::Receiver<bool>,
    /// Stops accepting.
    pub shutdown: Shutdown,
    pub grace: Duration,
    /// Admission at accept (client address, connection cap), shared by every worker.
    pub gate: Arc<Gate>,
}

impl Worker {
    /// Accepts until shutdown, then waits up to the grace period for this worker's connections.
    pub async fn run(mut self, listener: std::net::TcpListener) {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "proxy worker cannot use the listener");
                return;
            }
        };
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => self.accepted(tcp, peer, &tracker),
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = self.shutdown.wait() => break,
            }
        }
        drop(listener);
        tracker.close();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_seconds = self.grace.as_secs(),
                "grace period over; dropping remaining connections"
            );
        }
    }
}

impl Worker {
    /// Admits (or refuses) a new connection and serves it under its head clock.
    fn accepted(&self, tcp: TcpStream, peer: SocketAddr, tracker: &TaskTracker) {
        let gate = self.gate.clone();
        let refused = |refusal: Refusal| {
            let m = &gate.metrics.rejected_requests_total;
            m.with_label_values(&[refusal.reason()]).inc();
        };
        let permit = match gate.admit(peer.ip()) {
            Admit::Serve(permit) => permit,
            Admit::Refuse(refusal, permit) => {
                refused(refusal);
                tracker.spawn(async move {
                    admission::refuse(tcp, refusal).await;
                    drop(permit);
                });
                return;
            }
            Admit::Drop(refusal) => return refused(refusal),
        };
        let _ = tcp.set_nodelay(true);
        let stream = to_pingora_stream(tcp, peer);
        let app = self.app.clone();
        let watch = self.pingora_shutdown.clone();
        let head_timeout = gate.live.load().proxy.request_header_timeout;
        gate.metrics.client_connections.inc();
        tracker.spawn(async move {
            let serve = async move {
                // pingora serves every keep-alive request of the connection in this call.
                let _ = app.process_new(stream, &watch).await;
            };
            if !HeadClock::new(head_timeout).run(serve).await {
                let m = &gate.metrics.rejected_requests_total;
                m.with_label_values(&["request_header_timeout"]).inc();
            }
            gate.metrics.client_connections.dec();
            drop(permit);
        });
    }
}

/// Wraps an accepted socket the way pingora's own listener does: `client_addr()` works and
/// writes are buffered (see [`Downstream`]).
fn to_pingora_stream(tcp: tokio::net::TcpStream, peer: SocketAddr) -> pingora::protocols::Stream {
    let mut stream = pingora::protocols::l4::stream::Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
    Box::new(Downstream::new(stream))
}
