//! The proxy core: injection, stripping, host pinning, allowlists, refresh, faults, drain.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test]
async fn injects_the_bearer_and_strips_client_credentials() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy(&sim).await;
    let token = proxy.running.store.current().unwrap();
    let v: Value = client()
        .post(proxy.url("/api/v2/conversations?a=b"))
        .header("authorization", "Bearer client-supplied-token")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .body("payload")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["token_fingerprint"],
        token.fingerprint.as_str(),
        "the proxy's token went upstream, not the client's"
    );
    assert_eq!(v["client_id"], CLIENT_ID);
    assert_eq!(v["query"], "a=b");
    assert_eq!(v["body_len"], 7);
    let s = stats(&sim).await;
    assert_eq!(
        s["api_requests"]["by_status"].get("401"),
        None,
        "no request reached Genesys with the client's token"
    );
}

#[tokio::test]
async fn host_header_and_absolute_uri_cannot_redirect_the_request() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy(&sim).await;
    let v: Value = client()
        .get(proxy.url("/api/v2/echo"))
        .header("host", "evil.example.com")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["host"], sim.addr.to_string());

    // An absolute-form request line naming another host still goes to the configured API.
    let mut tcp = tokio::net::TcpStream::connect(proxy.running.proxy_addr)
        .await
        .unwrap();
    tcp.write_all(b"GET http://evil.example.com/api/v2/abs?q=1 HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"path\":\"/api/v2/abs\""), "{out}");
    assert!(out.contains(&format!("\"host\":\"{}\"", sim.addr)), "{out}");
}

#[tokio::test]
async fn paths_and_clients_outside_the_allowlists_get_403_json() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy(&sim).await;
    for path in [
        "/__sim/stats",
        "/api/v1/users",
        "/api/v2/../__sim/stats",
        "/api/v2/%2e%2e/__sim/stats",
    ] {
        let r = get(&proxy.url(path)).await;
        assert_eq!(r.status(), 403, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "proxy.path_not_allowed", "{path}");
    }

    let blocked = start_proxy_with(&sim, "allowed_client_cidrs = [\"10.0.0.0/8\"]", "").await;
    blocked.ready().await;
    let r = get(&blocked.url("/api/v2/users")).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"message": "This client address is not allowed to use the proxy.", "code": "proxy.client_not_allowed", "status": 403})
    );
    let metrics = metrics_text(&blocked).await;
    assert!(
        metrics.contains("genesys_proxy_rejected_requests_total{reason=\"client_not_allowed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn proactive_refresh_with_short_lifetimes() {
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        token_lifetime_seconds: 2,
        ..sim_config()
    })
    .await;
    let proxy = start_proxy(&sim).await;
    let first = proxy.running.store.current().unwrap();
    // A 2 s token with the default 300 s margin is refreshed at about half-life.
    let second = proxy
        .running
        .store
        .wait_newer(first.generation, Duration::from_secs(5))
        .await
        .expect("refreshed before expiry");
    assert!(second.generation > first.generation);
    assert!(
        std::time::Instant::now() < first.expires_at,
        "the refresh came before the old token expired"
    );
    let r = get(&proxy.url("/api/v2/x")).await;
    assert_eq!(r.status(), 200);
    let s = stats(&sim).await;
    assert_eq!(s["api_requests"]["by_status"].get("401"), None);
}

#[tokio::test]
async fn no_valid_token_answers_503_no_token_and_not_ready() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("notoken");
    let toml = proxy_toml(
        &sim.url(),
        "not-the-secret",
        "token_wait_timeout_ms = 300",
        "",
        &dir,
    );
    let running = start_from_toml(&toml, dir).await.running;
    let r = get(&format!("http://{}/api/v2/users", running.proxy_addr)).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "proxy.no_token");
    assert_eq!(v["status"], 503);
    let r = get(&format!("http://{}/readyz", running.admin_addr)).await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("no token"));
    let s: Value = get_json(&format!("http://{}/status", running.admin_addr)).await;
    assert_eq!(s["status"], "unhealthy");
    assert_eq!(s["token"]["valid"], false);
}

#[tokio::test]
async fn startup_with_genesys_unreachable_serves_503_until_a_token_arrives() {
    // Reserve a port, then free it: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = temp_dir("unreachable");
    let toml = proxy_toml(
        &format!("http://{closed}"),
        SECRET,
        "token_wait_timeout_ms = 200",
        "",
        &dir,
    );
    let running = start_from_toml(&toml, dir).await.running;
    let r = get(&format!("http://{}/api/v2/users", running.proxy_addr)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        get(&format!("http://{}/healthz", running.admin_addr))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&format!("http://{}/readyz", running.admin_addr))
            .await
            .status(),
        503
    );
    running.shutdown().await;
}

#[tokio::test]
async fn token_endpoint_faults_while_a_token_is_valid_fail_no_request() {
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        token_lifetime_seconds: 3,
        ..sim_config()
    })
    .await;
    let proxy = start_proxy_with(&sim, "", "request_timeout_ms = 300").await;
    proxy.ready().await;
    for kind in [
        "status500",
        "timeout",
        "garbage",
        "empty",
        "rate_limit",
        "status500",
    ] {
        sim_post(&sim, "/__sim/faults", json!({"kind": kind, "count": 1})).await;
    }
    let first = proxy.running.store.current().unwrap();
    let mut sent = 0;
    // Keep requests flowing until the refresher has worked through every fault and minted a
    // new token; bounded by the deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while proxy.running.store.generation() == first.generation {
        assert!(
            std::time::Instant::now() < deadline,
            "no refresh within 20 s"
        );
        let r = get(&proxy.url("/api/v2/x")).await;
        assert_eq!(
            r.status(),
            200,
            "request {sent} failed during token endpoint faults"
        );
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await; // pacing, not synchronisation
    }
    assert!(sent > 0);
    let s = stats(&sim).await;
    let total = s["token_requests"]["total"].as_u64().unwrap();
    assert!(total <= 10, "bounded token calls: {total}");
    let metrics = metrics_text(&proxy).await;
    for outcome in [
        "server_error",
        "network_error",
        "invalid_response",
        "rate_limited",
    ] {
        let name = format!("genesys_proxy_token_requests_total{{outcome=\"{outcome}\"}}");
        assert!(metric(&metrics, &name) >= 1.0, "{outcome}: {metrics}");
    }
    let audit = std::fs::read_to_string(proxy.audit_path()).unwrap();
    assert!(audit.contains("TOKEN_REFRESH_FAILED") && audit.contains("TOKEN_RATE_LIMITED"));
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy(&sim).await;
    sim_put(&sim, "/__sim/latency", json!({"api_ms": 500})).await;
    let url = proxy.url("/api/v2/slow");
    let in_flight = tokio::spawn(async move { get(&url).await.status() });
    // Wait (bounded) until the request is inside the simulator.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stats(&sim).await["api_requests"]["in_flight"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "request never reached the simulator"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let addr = proxy.running.proxy_addr;
    let audit = proxy.audit_path();
    proxy.running.shutdown().await;
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request finished during the drain"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    let log = std::fs::read_to_string(audit).unwrap();
    assert!(log.contains("PROXY_STOPPED"));
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy(&sim).await;
    assert_eq!(get(&proxy.admin("/healthz")).await.status(), 200);
    assert_eq!(get(&proxy.admin("/readyz")).await.status(), 200);
    assert_eq!(get(&proxy.admin("/nope")).await.status(), 404);
    let s: Value = get_json(&proxy.admin("/status")).await;
    assert_eq!(s["status"], "healthy");
    assert_eq!(s["token"]["valid"], true);
    assert_eq!(s["token"]["source"], "current");
    assert!(s["token"]["fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(s["token"]["expires_in_seconds"].as_u64().unwrap() > 80_000);
    let m = metrics_text(&proxy).await;
    assert!(
        m.contains("genesys_proxy_token_requests_total{outcome=\"success\"} 1"),
        "{m}"
    );
    assert!(m.contains("genesys_proxy_token_expiry_timestamp_seconds"));
}
