//! What dashboards, balancers and auditors see: `/status`, metric values, anomalies raised and
//! cleared, an unwritable audit log, `/readyz` during a drain.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

async fn status(p: &Proxy) -> Value {
    get_json(&p.admin("/status")).await
}

fn audit_has(p: &Proxy, event: &str) -> bool {
    std::fs::read_to_string(p.audit_path())
        .unwrap_or_default()
        .contains(&format!("\"event\":\"{event}\""))
}

#[tokio::test]
async fn status_has_every_documented_field() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    let s = status(&p).await;
    for key in [
        "status",
        "token",
        "last_refresh",
        "refresh_count",
        "anomaly",
        "config",
        "counters",
    ] {
        assert!(s.get(key).is_some(), "missing {key}: {s}");
    }
    for key in [
        "valid",
        "expires_at",
        "expires_in_seconds",
        "generation",
        "fingerprint",
        "source",
    ] {
        assert!(s["token"].get(key).is_some(), "missing token.{key}");
    }
    for key in ["state", "since", "reason"] {
        assert!(s["anomaly"].get(key).is_some(), "missing anomaly.{key}");
    }
    for key in ["loaded_at", "generation"] {
        assert!(s["config"].get(key).is_some(), "missing config.{key}");
    }
    assert_eq!(s["anomaly"]["state"], "clear");
    assert_eq!(s["refresh_count"], 1);
}

#[tokio::test]
async fn metric_values_move_as_requests_flow() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    for _ in 0..7 {
        assert_eq!(get(&p.url("/api/v2/m")).await.status(), 200);
    }
    assert_eq!(get(&p.url("/nope")).await.status(), 403);
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(&m, "genesys_proxy_requests_total{code=\"200\"}"),
        7.0
    );
    assert_eq!(
        metric(&m, "genesys_proxy_requests_total{code=\"403\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "genesys_proxy_request_duration_seconds_count"),
        8.0
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_rejected_requests_total{reason=\"path_not_allowed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_token_requests_total{outcome=\"success\"}"
        ),
        1.0
    );
    let expiry = metric(&m, "genesys_proxy_token_expiry_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expiry - (now + 86_400.0)).abs() < 60.0,
        "expiry {expiry} vs now {now}"
    );
    // The simulator's rate-limit headers feed the remaining-budget gauge: 300 allowed, 8 used
    // (7 requests + the validation call, which preserves idle time but counts).
    wait_for_metric(&p, "genesys_proxy_upstream_ratelimit_remaining", 292.0).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_audit_events_total{event=\"TOKEN_ACQUIRED\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn repeated_refresh_failures_raise_an_anomaly_that_clears_when_quiet() {
    let sim = start_sim(sim_config()).await;
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "status500", "count": 3}),
    )
    .await;
    let dir = temp_dir("anomaly");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        + "\n[anomaly]\nrefresh_failures = 2\nquiet_ms = 1500\n";
    let p = start_from_toml(&toml, dir).await;
    // The first mints fail (raising the anomaly), then a token arrives.
    p.ready().await;
    assert!(audit_has(&p, "ANOMALY_RAISED"));
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_anomaly_active{kind=\"refresh_failures\"}"
        ),
        1.0,
        "still raised: the quiet period has not passed"
    );
    eventually(
        Duration::from_secs(10),
        "the anomaly to clear after the quiet period",
        || async { audit_has(&p, "ANOMALY_CLEARED") },
    )
    .await;
    let s = status(&p).await;
    assert_eq!(s["anomaly"]["state"], "clear");
    assert_eq!(s["status"], "healthy");
    assert_eq!(
        metric(
            &metrics_text(&p).await,
            "genesys_proxy_anomaly_active{kind=\"refresh_failures\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn invalid_client_raises_an_anomaly_visible_in_status() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("anomaly-ic");
    let toml = proxy_toml(
        &sim.url(),
        "revoked-secret",
        "token_wait_timeout_ms = 100",
        "",
        &dir,
    );
    let p = start_from_toml(&toml, dir).await;
    eventually(
        Duration::from_secs(5),
        "the invalid_client anomaly",
        || async { audit_has(&p, "ANOMALY_RAISED") },
    )
    .await;
    let s = status(&p).await;
    assert_eq!(s["anomaly"]["state"], "raised");
    assert!(
        s["anomaly"]["reason"]
            .as_str()
            .unwrap()
            .contains("refused the client credentials"),
        "{s}"
    );
    assert!(s["anomaly"]["since"].is_string());
    assert_eq!(s["status"], "unhealthy", "no token at all");
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(&m, "genesys_proxy_anomaly_active{kind=\"invalid_client\"}"),
        1.0
    );
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_unwritable_audit_log_is_counted_and_serving_goes_on() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("audit-full");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir).replace(
        &format!("path = {:?}", dir.join("audit.jsonl").display().to_string()),
        "path = \"/dev/full\"",
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    assert_eq!(get(&p.url("/api/v2/x")).await.status(), 200);
    let s = status(&p).await;
    assert!(s["audit_write_failures"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["status"], "degraded");
    assert!(
        metric(
            &metrics_text(&p).await,
            "genesys_proxy_audit_write_failures_total"
        ) >= 2.0
    );
}

#[tokio::test]
async fn readyz_turns_503_as_soon_as_the_drain_starts() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    sim_put(&sim, "/__sim/latency", json!({"api_ms": 800})).await;
    let url = p.url("/api/v2/slow");
    let in_flight = tokio::spawn(async move { get(&url).await.status() });
    eventually(
        Duration::from_secs(5),
        "the request to reach the simulator",
        || async { stats(&sim).await["api_requests"]["in_flight"] == 1 },
    )
    .await;
    let readyz = p.admin("/readyz");
    let shutdown = tokio::spawn(p.running.shutdown());
    eventually(
        Duration::from_secs(5),
        "readyz 503 during the drain",
        || {
            let url = readyz.clone();
            async move {
                client()
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 503)
            }
        },
    )
    .await;
    assert_eq!(in_flight.await.unwrap(), 200);
    shutdown.await.unwrap();
}

/// Regression: `/readyz` stayed 200 while the API refused the held token and minting a new one
/// failed (credentials revoked), so a balancer kept sending traffic that could only fail.
#[tokio::test]
async fn readyz_is_503_while_the_held_token_is_refused_and_none_can_be_minted() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy_with(&sim, "refresh_wait_timeout_ms = 300", "").await;
    p.ready().await;
    let readyz = || async { get(&p.admin("/readyz")).await };
    assert_eq!(readyz().await.status(), 200);

    // The IdP revokes the client's tokens and its secret: nothing can be minted.
    let deleted = sim_delete_secret(&sim, SECRET).await;
    assert!(deleted.status().is_success());
    sim_post(&sim, "/__sim/revoke", json!({"client_id": CLIENT_ID})).await;
    let r = get(&p.url("/api/v2/organizations/me")).await;
    assert_eq!(
        r.status(),
        401,
        "nothing can be minted: the 401 passes through"
    );

    let r = readyz().await;
    assert_eq!(r.status(), 503);
    let reason = r.text().await.unwrap();
    assert!(reason.contains("refused"), "{reason}");
    assert_eq!(reason.lines().count(), 1, "one-line reason: {reason}");
    let s = status(&p).await;
    assert_eq!(s["status"], "unhealthy", "{s}");
    assert_eq!(s["token"]["refused_by_api"], true, "{s}");

    // The secret is restored at the IdP: the refresher's retry mints, validates, and the
    // proxy is ready again without any action.
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": SECRET}),
    )
    .await;
    eventually(Duration::from_secs(10), "ready again", || async {
        readyz().await.status() == 200
    })
    .await;
    assert_eq!(get(&p.url("/api/v2/organizations/me")).await.status(), 200);
    assert_ne!(status(&p).await["status"], "unhealthy");
}
