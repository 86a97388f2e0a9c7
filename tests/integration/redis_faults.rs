//! Issue 21: the cluster link survives whatever breaks it. A TCP relay between the proxy and a
//! real `redis-server` black-holes connections (bytes accepted, never answered) or streams a
//! reply too large to read in time; once the fault is gone the replica rejoins. And shared
//! budget counts that cannot be true are ignored.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

const PASS: u8 = 0;
const BLACK_HOLE: u8 = 1;
const HUGE_REPLY: u8 = 2;

/// A relay to `redis`: each connection takes the mode in force when its client first sends,
/// and keeps a fault once it met one (a stalled socket stays stalled).
struct Relay {
    addr: std::net::SocketAddr,
    mode: Arc<AtomicU8>,
}

impl Relay {
    async fn start(redis_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, redis_port, m.clone()));
            }
        });
        Relay { addr, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }
}

async fn relay(mut client: TcpStream, redis_port: u16, mode: Arc<AtomicU8>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
        return;
    };
    let mut faulted = PASS;
    let (mut cbuf, mut sbuf) = (vec![0u8; 16384], vec![0u8; 16384]);
    // Bounded: the test ends the runtime; a connection lives at most a minute.
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => return,
            n = client.read(&mut cbuf) => {
                let Ok(n) = n else { return };
                if n == 0 { return }
                if faulted == PASS {
                    faulted = mode.load(Ordering::SeqCst);
                }
                match faulted {
                    PASS => if server.write_all(&cbuf[..n]).await.is_err() { return },
                    BLACK_HOLE => {}
                    _ => {
                        // A bulk reply announced at 512 MiB, trickled: never read in time.
                        let _ = client.write_all(b"$536870912\r\n").await;
                        for _ in 0..600 {
                            if client.write_all(&[b'x'; 4096]).await.is_err() { return }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        return;
                    }
                }
            }
            n = server.read(&mut sbuf), if faulted == PASS => {
                let Ok(n) = n else { return };
                if n == 0 { return }
                if client.write_all(&sbuf[..n]).await.is_err() { return }
            }
        }
    }
}

async fn cluster_state(p: &Proxy) -> String {
    let s: Value = get_json(&p.admin("/status")).await;
    s["cluster"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn proxy_on(redis_url: &str, extra: &str) -> (genesys_auth_proxy::sim::SimHandle, Proxy) {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("redis-faults");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        + &format!("\n[cluster]\nredis_url = \"{redis_url}\"\ntimeout_ms = 200\nlease_ms = 2000\n")
        + extra;
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    (sim, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_link_rejoins_after_a_black_hole_and_a_huge_reply() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let (_sim, p) = proxy_on(&relay.url(), "").await;
    eventually(Duration::from_secs(10), "shared at start", || async {
        cluster_state(&p).await == "shared"
    })
    .await;
    for (fault, name) in [(BLACK_HOLE, "a black hole"), (HUGE_REPLY, "a huge reply")] {
        relay.set(fault);
        eventually(
            Duration::from_secs(10),
            &format!("standalone during {name}"),
            || async { cluster_state(&p).await == "standalone" },
        )
        .await;
        // Requests keep flowing meanwhile (the request path never touches Redis).
        assert_eq!(get(&p.url("/api/v2/users/me")).await.status(), 200);
        relay.set(PASS);
        // Before the fix: still standalone 45 s later, the stalled connection kept forever.
        let started = std::time::Instant::now();
        eventually(
            Duration::from_secs(10),
            &format!("rejoined after {name}"),
            || async { cluster_state(&p).await == "shared" },
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    p.running.shutdown().await;
}

// Regression (issue 21): a per-token count in Redis set far above the window's limit, or
// negative, made every replica answer the proxy's 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_shared_budget_counts_are_ignored() {
    let redis = RedisServer::start();
    let (_sim, p) = proxy_on(
        &redis.url(),
        "\n[budget]\nrequests_per_window = 50\nwindow_seconds = 60\n",
    )
    .await;
    eventually(Duration::from_secs(10), "shared", || async {
        cluster_state(&p).await == "shared"
    })
    .await;
    assert_eq!(get(&p.url("/api/v2/users/me")).await.status(), 200);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let fp = p.running.store.current().unwrap().fingerprint.clone();
    for bad in [1_000_000i64, -1_000_000] {
        // The key the replicas count in, as a hostile writer would set it.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*:budget:*")
            .query_async(&mut c)
            .await
            .unwrap();
        let key = keys
            .into_iter()
            .find(|k| k.ends_with(&fp))
            .unwrap_or_else(|| format!("genesys-auth-proxy:budget:{fp}"));
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(bad)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut c)
            .await
            .unwrap();
        for _ in 0..20 {
            let r = get(&p.url("/api/v2/users/me")).await;
            assert_eq!(r.status(), 200, "count {bad}: {}", r.text().await.unwrap());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let s: Value = get_json(&p.admin("/status")).await;
        assert!(
            s["cluster"]["implausible_budget_counts"].as_u64() >= Some(1),
            "count {bad}: {s}"
        );
        assert_eq!(s["cluster"]["state"], "shared", "{s}");
    }
    p.running.shutdown().await;
}
