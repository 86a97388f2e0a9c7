//! The proxy's worker threads: `proxy.threads` of them for the whole process, each running a
//! single-threaded runtime with an accept loop on a clone of every credential's listener and
//! its own pingora app per credential (hence its own upstream connection pools), so a
//! connection and its pooled upstream connections live on one thread with no cross-thread
//! wake-ups (pingora's own model). We run pingora's `HttpProxy` under this loop rather than
//! under pingora's `Server` so tests can bind port 0 and drive shutdown in-process.
//! [`tls`]: `[proxy.tls]`, the TLS handshake and client certificates at accept.

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
pub mod tls;
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

/// One listener as a worker thread sees it: its socket (a clone per thread), and the app and
/// admission of the credential it serves.
pub struct Listener {
    pub socket: std::net::TcpListener,
    pub app: Arc<pingora::proxy::HttpProxy<GenesysProxy>>,
    /// Admission at accept (client address, the process's connection cap).
    pub gate: Arc<Gate>,
    /// `[proxy.tls]`: the listener speaks TLS.
    pub tls: Option<Arc<tls::ServerTls>>,
    /// Caller identity: where a verified client certificate's names are kept for the
    /// request hooks.
    pub apps: Arc<crate::apps::Gatekeeper>,
}

/// One proxy worker: its own runtime, an accept loop on every listener, and its connections.
pub struct Worker {
    pub listeners: Vec<Listener>,
    /// Tells pingora's connection loops to finish their current request and stop.
    pub pingora_shutdown: watch::Receiver<bool>,
    /// Stops accepting.
    pub shutdown: Shutdown,
    pub grace: Duration,
}

impl Worker {
    /// Accepts on every listener until shutdown, then waits up to the grace period for this
    /// worker's connections.
    pub async fn run(self) {
        let tracker = TaskTracker::new();
        let loops = self.listeners.into_iter().map(|l| {
            accept_loop(
                l,
                self.pingora_shutdown.clone(),
                self.shutdown.clone(),
                tracker.clone(),
            )
        });
        futures_util::future::join_all(loops).await;
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

async fn accept_loop(
    l: Listener,
    pingora_shutdown: watch::Receiver<bool>,
    mut shutdown: Shutdown,
    tracker: TaskTracker,
) {
    let Listener {
        socket,
        app,
        gate,
        tls,
        apps,
    } = l;
    let serving = Serving {
        app,
        gate,
        tls,
        apps,
    };
    let listener = match TcpListener::from_std(socket) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "proxy worker cannot use the listener");
            return;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => accepted_one(&serving, &pingora_shutdown, tcp, peer, &tracker),
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait() => break,
        }
    }
}

/// Admits (or refuses) a new connection and serves it under its head clock.
/// What serving a connection of one listener takes.
struct Serving {
    app: Arc<pingora::proxy::HttpProxy<GenesysProxy>>,
    gate: Arc<Gate>,
    tls: Option<Arc<tls::ServerTls>>,
    apps: Arc<crate::apps::Gatekeeper>,
}

fn accepted_one(
    l: &Serving,
    pingora_shutdown: &watch::Receiver<bool>,
    tcp: TcpStream,
    peer: SocketAddr,
    tracker: &TaskTracker,
) {
    let gate = l.gate.clone();
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
    let app = l.app.clone();
    let watch = pingora_shutdown.clone();
    let head_timeout = gate.live.load().proxy.request_header_timeout;
    let (tls, apps) = (l.tls.clone(), l.apps.clone());
    gate.metrics.client_connections.inc();
    tracker.spawn(async move {
        let metrics = gate.metrics.clone();
        let identified = apps.clone();
        let serve = async move {
            let stream = match tls {
                None => Box::new(downstream(tcp, peer)),
                // The handshake runs under the head clock: a client stalling it is dropped
                // like one trickling its request head.
                Some(tls) => match handshake(&tls, tcp, peer, &identified).await {
                    Ok(stream) => stream,
                    Err(reason) => {
                        let m = &metrics.rejected_requests_total;
                        return m.with_label_values(&[reason]).inc();
                    }
                },
            };
            // pingora serves every keep-alive request of the connection in this call.
            let _ = app.process_new(stream, &watch).await;
        };
        if !HeadClock::new(head_timeout).run(serve).await {
            let m = &gate.metrics.rejected_requests_total;
            m.with_label_values(&["request_header_timeout"]).inc();
        }
        apps.peers.remove(&peer);
        gate.metrics.client_connections.dec();
        drop(permit);
    });
}

/// The TLS handshake of a new connection (after checking it starts like one), keeping the
/// verified client certificate's names for the request hooks. `Err`: the refusal's label.
async fn handshake(
    tls: &tls::ServerTls,
    mut tcp: TcpStream,
    peer: SocketAddr,
    gate: &crate::apps::Gatekeeper,
) -> Result<pingora::protocols::Stream, &'static str> {
    if !tls::starts_with_tls(&mut tcp).await {
        return Err("tls_required");
    }
    let acceptor = tls.current();
    let stream = acceptor
        .tls_handshake(downstream(tcp, peer))
        .await
        .map_err(|_| "tls_handshake_failed")?;
    if let Some(der) =
        pingora::protocols::Ssl::get_ssl(&stream).and_then(|r| r.peer_certificate_der())
    {
        gate.peers.insert(peer, tls::peer_names(der).into());
    }
    Ok(Box::new(stream))
}

/// Wraps an accepted socket the way pingora's own listener does: `client_addr()` works and
/// writes are buffered (see [`Downstream`]).
fn downstream(tcp: tokio::net::TcpStream, peer: SocketAddr) -> Downstream {
    let mut stream = pingora::protocols::l4::stream::Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
    Downstream::new(stream)
}
