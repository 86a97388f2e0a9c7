//! The 401 path: single-flight refresh, replay with the body intact, pass-through when a replay
//! is impossible.

use std::time::Duration;

use genesys_auth_proxy::fingerprint::sha256_hex;
use genesys_auth_proxy::sim::SimConfig;
use serde_json::{json, Value};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_then_1000_concurrent_requests_cause_exactly_one_token_request() {
    let sim = start_sim(SimConfig {
        api_rate_limit_per_minute: 100_000,
        ..sim_config()
    })
    .await;
    let proxy = start_proxy(&sim).await;
    let before = token_successes(&stats(&sim).await);
    sim_post(&sim, "/__sim/revoke", json!({})).await;

    let c = client();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let c = c.clone();
            let url = proxy.url(&format!("/api/v2/storm/{i}"));
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
        ok += 1;
    }
    assert_eq!(ok, 1000);
    let s = stats(&sim).await;
    assert_eq!(
        token_successes(&s) - before,
        1,
        "exactly one new token request: {s}"
    );
    assert_eq!(s["token_requests"]["total"].as_u64().unwrap(), before + 1);
    let audit = std::fs::read_to_string(proxy.audit_path()).unwrap();
    assert_eq!(audit.matches("TOKEN_REJECTED_UPSTREAM").count(), 1);
}

#[tokio::test]
async fn a_10_kib_post_is_replayed_intact_after_a_401() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy(&sim).await;
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    let body: Vec<u8> = (0..10 * 1024).map(|i| (i % 251) as u8).collect();
    let r = client()
        .post(proxy.url("/api/v2/analytics/query"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["body_len"], body.len());
    assert_eq!(v["body_sha256"], sha256_hex(&body));
    let s = stats(&sim).await;
    assert_eq!(
        s["api_requests"]["by_status"]["401"], 1,
        "the first attempt was refused"
    );
    let m = get_text(&proxy.admin("/metrics")).await;
    assert!(
        m.contains("genesys_proxy_replays_total{outcome=\"success\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("genesys_proxy_upstream_unauthorized_total 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_100_kib_post_gets_its_401_passed_through() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy(&sim).await;
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    let body = vec![b'x'; 100 * 1024];
    let r = client()
        .post(proxy.url("/api/v2/big"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["code"], "bad.credentials",
        "the upstream body is passed through unchanged"
    );
    // The token was still reported dead: the next request works with a new one.
    let r = get(&proxy.url("/api/v2/after")).await;
    assert_eq!(r.status(), 200);
    let m = get_text(&proxy.admin("/metrics")).await;
    assert!(
        m.contains("genesys_proxy_replays_total{outcome=\"body_too_large\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_401_passes_through_when_no_newer_token_comes() {
    let sim = start_sim(sim_config()).await;
    let proxy = start_proxy_with(&sim, "refresh_wait_timeout_ms = 300", "").await;
    proxy.ready().await;
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "status500", "count": 1000}),
    )
    .await;
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    let r = get(&proxy.url("/api/v2/x")).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("inin-correlation-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "bad.credentials");
}

#[tokio::test]
async fn a_second_401_after_the_replay_passes_through() {
    // The simulator revokes every token the moment it is used: the replay is refused too.
    let sim = start_sim(SimConfig {
        idle_timeout: Some(Duration::from_nanos(1)),
        ..sim_config()
    })
    .await;
    let proxy = start_proxy_with(&sim, "", "validation = \"none\"").await;
    proxy.ready().await;
    let r = get(&proxy.url("/api/v2/x")).await;
    assert_eq!(r.status(), 401);
    let s = stats(&sim).await;
    assert_eq!(
        s["api_requests"]["by_status"]["401"], 2,
        "one try and exactly one replay"
    );
    let m = get_text(&proxy.admin("/metrics")).await;
    assert!(
        m.contains("genesys_proxy_replays_total{outcome=\"rejected_again\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn idle_timeout_org_is_survived_by_refresh_and_replay() {
    let sim = start_sim(SimConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..sim_config()
    })
    .await;
    let proxy = start_proxy(&sim).await;
    let c = client();
    assert_eq!(get(&proxy.url("/api/v2/a")).await.status(), 200);
    // Let the org's inactivity timeout kill the token: the behaviour under test needs time.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = c
        .post(proxy.url("/api/v2/b"))
        .body("after idle")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["body_sha256"], sha256_hex(b"after idle"));
}
