//! Pooled upstream connections without a watcher task: our pingora patch
//! (`PeerOptions::idle_watch = false`, vendor/README.md). A released connection costs no task;
//! it is checked when it is taken, and a stale or closed one is skipped for the next.

use std::io::Read as _;
use std::os::fd::RawFd;
use std::time::Duration;

use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

const IDLE: Option<Duration> = Some(Duration::from_secs(60));

struct Upstream {
    listener: TcpListener,
    peer: HttpPeer,
    connector: TransportConnector,
}

impl Upstream {
    async fn new() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = HttpPeer::new(listener.local_addr().unwrap(), false, String::new());
        Upstream {
            listener,
            peer,
            connector: TransportConnector::new(None),
        }
    }

    /// A new connection: our end (pingora's stream) and the server's end.
    async fn connect(&self) -> (Stream, TcpStream) {
        let (stream, reused) = self.connector.get_stream(&self.peer).await.unwrap();
        assert!(!reused);
        let (server, _) = self.listener.accept().await.unwrap();
        (stream, server)
    }

    fn release_unwatched(&self, stream: Stream) {
        self.connector
            .release_stream_unwatched(stream, self.peer.reuse_hash(), IDLE);
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Blocks (bounded) until the kernel reports `events` on our socket `fd` (the peer's FIN, or
/// bytes), then lets the runtime's reactor see it.
async fn wait_for(fd: RawFd, events: libc::c_short) {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a bounded timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5_000) };
    assert_eq!(ready, 1, "nothing arrived within 5 s");
    tokio::task::yield_now().await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_unwatched_connection_costs_no_task_and_is_reused() {
    let up = Upstream::new().await;
    let (stream, _server) = up.connect().await;
    let id = stream.id();
    let before = alive_tasks();
    up.release_unwatched(stream);
    assert_eq!(alive_tasks(), before, "an unwatched release spawns no task");

    let again = up.connector.reused_stream(&up.peer).await.expect("pooled");
    assert_eq!(again.id(), id, "the same connection comes back");

    // pingora's own release spawns a watcher per connection: the count does see tasks.
    up.connector
        .release_stream(again, up.peer.reuse_hash(), IDLE);
    assert_eq!(alive_tasks(), before + 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_idle_past_its_timeout_is_closed_when_taken() {
    let up = Upstream::new().await;
    let (stream, mut server) = up.connect().await;
    up.release_unwatched(stream);

    tokio::time::pause();
    tokio::time::advance(IDLE.unwrap() + Duration::from_secs(1)).await;
    assert!(
        up.connector.reused_stream(&up.peer).await.is_none(),
        "a connection idle past its timeout is not handed out"
    );
    tokio::time::resume();

    // Our end was closed: the server reads end-of-file.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
        .await
        .expect("our end closed within 5 s")
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_the_server_closed_is_skipped_for_the_next() {
    let up = Upstream::new().await;
    let (first, first_server) = up.connect().await;
    let (second, _second_server) = up.connect().await;
    let (first_id, second_id) = (first.id(), second.id());
    // The pool hands out the oldest first.
    up.release_unwatched(first);
    up.release_unwatched(second);

    drop(first_server);
    wait_for(first_id, libc::POLLIN | libc::POLLRDHUP).await;

    let taken = up.connector.reused_stream(&up.peer).await.expect("pooled");
    assert_eq!(
        taken.id(),
        second_id,
        "the closed one is dropped, the next taken"
    );
    assert!(
        up.connector.reused_stream(&up.peer).await.is_none(),
        "the closed one did not stay in the pool"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_with_unexpected_data_is_not_reused() {
    let up = Upstream::new().await;
    let (stream, mut server) = up.connect().await;
    let id = stream.id();
    up.release_unwatched(stream);
    server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
    wait_for(id, libc::POLLIN).await;

    assert!(up.connector.reused_stream(&up.peer).await.is_none());
    assert_eq!(up.connector.unexpected_data_connection_count(), 1);
}

/// Through the proxy: an upstream that closes every connection right after its answer,
/// without `Connection: close`, as a load balancer closing idle connections does. No request
/// may fail for it.
#[tokio::test]
async fn an_upstream_closing_idle_connections_loses_no_request() {
    let sim = start_sim(sim_config()).await;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = upstream.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut conn) = conn else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            if head.ends_with(b"\r\n\r\n") {
                use std::io::Write as _;
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            }
            // Dropped: closed without notice.
        }
    });
    let dir = temp_dir("closing-upstream");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir).replace(
        &format!("api_url = \"{}\"", sim.url()),
        &format!("api_url = \"http://{api}\""),
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let client = client();
    for i in 0..30 {
        let r = client
            .get(p.url(&format!("/api/v2/closing/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 30);
}
