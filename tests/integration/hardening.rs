//! Hostile clients: slow request heads, connection floods, clients outside the allowlist,
//! protocol upgrades, paths that could mean two things, unexpected methods, pipelining. Each
//! test reproduces an attack that worked before the fix.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Reads until the peer closes or `limit` passes; returns what was read and whether it closed.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

/// Sends raw bytes and returns everything the proxy answers before it closes (bounded).
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(5)).await.0
}

#[tokio::test]
async fn a_request_head_trickled_byte_by_byte_is_cut_at_the_deadline() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy_with(&sim, "request_header_timeout_ms = 400", "").await;
    p.ready().await;
    let mut tcp = TcpStream::connect(p.running.proxy_addr).await.unwrap();
    let started = Instant::now();
    tcp.write_all(b"GET /api/v2/users HTTP/1.1\r\n")
        .await
        .unwrap();
    // One header byte every 50 ms: each read is quick, the head never completes.
    let mut cut = false;
    for _ in 0..100 {
        if tcp.write_all(b"x").await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            _ => {}
        }
    }
    let held = started.elapsed();
    assert!(cut, "the connection was never cut");
    assert!(
        held < Duration::from_secs(3),
        "cut after {held:?}, deadline 400 ms"
    );
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_rejected_requests_total{reason=\"request_header_timeout\"}"
        ),
        1.0,
        "{m}"
    );
    // A normal client on a kept-alive connection is not affected by the deadline.
    let c = client();
    for _ in 0..3 {
        let r = c
            .get(p.url("/api/v2/organizations/me"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_connection_flood_is_capped_and_the_admin_listener_stays_reachable() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy_with(&sim, "max_connections = 8", "").await;
    p.ready().await;
    // Eight idle connections take every slot (they send nothing): seven from one address
    // (its most), one from another.
    let mut idle = Vec::new();
    for i in 0..8 {
        let from = if i < 7 { "127.0.0.1" } else { "127.0.0.2" };
        idle.push(connect_from(from, p.running.proxy_addr).await);
    }
    let admin = client();
    eventually(Duration::from_secs(5), "8 connections counted", || {
        let admin = admin.clone();
        let url = p.admin("/metrics");
        async move {
            let m = admin.get(url).send().await.unwrap().text().await.unwrap();
            metric(&m, "genesys_proxy_client_connections") == 8.0
        }
    })
    .await;
    // The ninth gets a complete answer in the Genesys shape, not a hang.
    let started = Instant::now();
    let answer = raw_exchange(
        p.running.proxy_addr,
        b"GET /api/v2/users HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("proxy.too_many_connections"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The admin listener answers meanwhile, and quickly.
    let started = Instant::now();
    let r = admin.get(p.admin("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    // Slots come back when connections close.
    idle.truncate(0);
    eventually(Duration::from_secs(5), "a slot is free again", || async {
        client()
            .get(p.url("/api/v2/organizations/me"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn a_client_outside_the_allowlist_is_refused_at_accept_and_cannot_hold_a_connection() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy_with(&sim, "allowed_client_cidrs = [\"10.0.0.0/8\"]", "").await;
    p.ready().await;
    // Sending nothing: closed within the refusal time, without being served.
    let mut tcp = TcpStream::connect(p.running.proxy_addr).await.unwrap();
    let (_, closed) = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "a refused client must not hold its connection");
    // Sending a request: the 403 in the Genesys shape.
    let answer = raw_exchange(
        p.running.proxy_addr,
        b"GET /api/v2/users HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("proxy.client_not_allowed"), "{answer}");
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(&m, "genesys_proxy_client_connections"),
        0.0,
        "never served"
    );
}

#[tokio::test]
async fn upgrade_requests_never_reach_genesys_as_upgrades() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    for upgrade in ["websocket", "h2c"] {
        let r = client()
            .get(p.url("/api/v2/anything"))
            .header("upgrade", upgrade)
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("http2-settings", "AAMAAABkAAQAAP__")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{upgrade}");
        let v: Value = r.json().await.unwrap();
        let names: Vec<&str> = v["header_names"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_str())
            .collect();
        assert!(!names.contains(&"upgrade"), "{upgrade}: {names:?}");
        assert!(!names.contains(&"http2-settings"), "{upgrade}: {names:?}");
    }
}

#[tokio::test]
async fn paths_that_could_mean_two_things_are_refused_before_genesys() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    for path in [
        "/api/v2/..;/__sim/stats",
        "/api/v2//users",
        "/api/v2/%252e%252e/x",
        "/api/v2/%c0%ae%c0%ae/x",
        "/api/v2/users;x=1",
    ] {
        // Raw, so no client library normalises the path first.
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(p.running.proxy_addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{path}: {answer}");
        assert!(
            answer.contains("proxy.path_not_allowed"),
            "{path}: {answer}"
        );
    }
    let before = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();
    // An escape that decodes to plain ASCII passes (non-ASCII is refused by default since
    // issue 21: proxy.allow_non_ascii_paths).
    let r = get(&p.url("/api/v2/users/search%20term")).await;
    assert_eq!(r.status(), 200, "a plain escaped ASCII path passes");
    let after = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();
    assert_eq!(after, before + 1);
}

#[tokio::test]
async fn only_the_methods_genesys_uses_are_forwarded() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    let before = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();
    for method in ["TRACE", "PROPFIND", "FOO"] {
        let r = client()
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                p.url("/api/v2/users"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
        let allow = r.headers()["allow"].to_str().unwrap().to_string();
        assert!(allow.contains("GET") && allow.contains("PATCH"), "{allow}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "proxy.method_not_allowed", "{method}");
    }
    let answer = raw_exchange(
        p.running.proxy_addr,
        b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.contains("proxy.method_not_allowed"), "{answer}");
    let after = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();
    assert_eq!(after, before, "nothing reached Genesys");
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let r = client()
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                p.url("/api/v2/anything"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    let mut tcp = TcpStream::connect(p.running.proxy_addr).await.unwrap();
    // Three requests in one write, the last asking to close.
    tcp.write_all(
        b"GET /api/v2/one HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /api/v2/two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /api/v2/three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let (answer, closed) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(closed, "closed after the last: {answer}");
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 3, "{answer}");
    let one = answer.find("/api/v2/one").unwrap();
    let two = answer.find("/api/v2/two").unwrap();
    let three = answer.find("/api/v2/three").unwrap();
    assert!(one < two && two < three, "in order: {answer}");
}

#[tokio::test]
async fn duplicate_content_lengths_are_never_forwarded_as_is() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    let before = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();
    // Identical repeated lengths and a list of identical values are collapsed into one
    // (RFC 9110 §8.6): the upstream sees exactly one length.
    for headers in [
        "Content-Length: 5\r\nContent-Length: 5",
        "Content-Length: 5, 5",
    ] {
        let request = format!(
            "POST /api/v2/cl HTTP/1.1\r\nHost: x\r\n{headers}\r\nConnection: close\r\n\r\nhello"
        );
        let answer = raw_exchange(p.running.proxy_addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{headers}: {answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["content_length"], serde_json::json!(["5"]), "{answer}");
        assert_eq!(v["body_len"], 5);
    }
    // Conflicting lengths are refused before anything is forwarded.
    for request in [
        &b"POST /api/v2/cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!"[..],
        &b"POST /api/v2/cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
    ] {
        let answer = raw_exchange(p.running.proxy_addr, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    let after = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();
    assert_eq!(
        after,
        before + 2,
        "only the unambiguous requests went upstream"
    );
}

// Regression (issue 21): Unicode lookalikes of "." and "/" reached the upstream, where a
// server normalising to NFKC would read them as ".." or "/".
#[tokio::test]
async fn unicode_lookalikes_in_the_path_are_refused_by_default() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    for path in [
        "/api/v2/%EF%BC%8E%EF%BC%8E/admin",
        "/api/v2/a%E2%80%A4%E2%80%A4/x",
        "/api/v2/a%EF%BC%8Fb",
        "/api/v2/a%E2%88%95b",
        "/api/v2/a%E2%80%8Bb",
    ] {
        let r = get(&p.url(path)).await;
        assert_eq!(r.status(), 403, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "proxy.path_not_allowed", "{path}");
    }
    // Non-ASCII in the query is not the path: forwarded.
    let r = get(&p.url("/api/v2/users?q=caf%C3%A9")).await;
    assert_eq!(r.status(), 200);
    let s = stats(&sim).await;
    let seen = s["api_requests"]["total"].as_u64().unwrap();
    assert_eq!(
        seen, 2,
        "only tokens/me and the query request reached the simulator: {s}"
    );
}

/// One HTTP/1.1 request with this `Host` on a fresh connection; the status code.
async fn status_with_host(addr: std::net::SocketAddr, method: &str, path: &str, host: &str) -> u16 {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_exchange(addr, request.as_bytes()).await;
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

// Regression (issue 21): /status and POST /reload answered `Host: evil.example`, so a page
// that rebinds its name to 127.0.0.1 could read status and trigger reloads.
#[tokio::test]
async fn the_admin_listener_answers_only_its_own_host_names() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy_with(&sim, "", "").await;
    p.ready().await;
    let admin = p.running.admin_addr;
    let own = admin.to_string();
    for path in ["/status", "/metrics"] {
        assert_eq!(
            status_with_host(admin, "GET", path, "evil.example").await,
            421,
            "{path}"
        );
        assert_eq!(
            status_with_host(admin, "GET", path, "evil.example:9090").await,
            421
        );
        assert_eq!(
            status_with_host(admin, "GET", path, &own).await,
            200,
            "{path}"
        );
        assert_eq!(status_with_host(admin, "GET", path, "localhost").await, 200);
    }
    assert_eq!(
        status_with_host(admin, "POST", "/reload", "evil.example").await,
        421
    );
    assert_eq!(status_with_host(admin, "POST", "/reload", &own).await, 200);
    // Probes and balancers send any name.
    assert_eq!(
        status_with_host(admin, "GET", "/healthz", "evil.example").await,
        200
    );
    assert_eq!(
        status_with_host(admin, "GET", "/readyz", "10.9.9.9:9090").await,
        200
    );
}

// Regression (issue 21): 2,100 idle connections to the admin listener took both listeners
// down (no cap, no idle timeout: "too many open files").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_admin_listener_are_capped_and_closed() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("admin-flood");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\nmax_connections = 8\nidle_timeout_ms = 500",
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let admin = p.running.admin_addr;
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // The proxy listener serves whatever the admin listener's load.
    assert_eq!(get(&p.url("/api/v2/users/me")).await.status(), 200);
    // Past the cap, connections are closed at once; within it, idle ones after the timeout.
    let started = Instant::now();
    let mut closed = 0;
    for tcp in idle.iter_mut() {
        let (_, was_closed) = read_until_closed(tcp, Duration::from_secs(5)).await;
        closed += usize::from(was_closed);
    }
    assert_eq!(closed, 40, "every idle connection is closed");
    assert!(started.elapsed() < Duration::from_secs(5));
    // And the admin listener answers again.
    assert_eq!(get(&p.admin("/healthz")).await.status(), 200);
    p.running.shutdown().await;
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

// Regression (issue 21): one client holding all max_connections (reconnecting as they timed
// out) got 133 of another client's 143 requests refused.
#[tokio::test]
async fn one_client_cannot_hold_every_connection() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy_with(&sim, "max_connections = 16", "").await;
    p.ready().await;
    let addr = p.running.proxy_addr;
    let mut hog = Vec::new();
    for _ in 0..14 {
        hog.push(connect_from("127.0.0.1", addr).await);
    }
    eventually(Duration::from_secs(5), "14 connections counted", || async {
        metric(&metrics_text(&p).await, "genesys_proxy_client_connections") == 14.0
    })
    .await;
    // Its fifteenth is refused: 14 is seven eighths of 16.
    let mut extra = connect_from("127.0.0.1", addr).await;
    extra
        .write_all(b"GET /api/v2/users HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut extra, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // Another client is served.
    for _ in 0..5 {
        let mut other = connect_from("127.0.0.2", addr).await;
        other
            .write_all(b"GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_until_closed(&mut other, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    drop(hog);
}
