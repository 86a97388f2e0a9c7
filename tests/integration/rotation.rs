//! Reload and secret rotation: validated swap, failure keeps serving, broken files change
//! nothing, previous-secret fallback, pre-rotation token replay, file watching.

use std::time::Duration;

use genesys_auth_proxy::fingerprint::fingerprint;
use serde_json::{json, Value};

use crate::support::*;

/// A proxy whose secret file is not watched, so each test picks its own trigger.
async fn unwatched_proxy(sim: &genesys_auth_proxy::sim::SimHandle, token_extra: &str) -> Proxy {
    let dir = temp_dir("rotation");
    let toml = proxy_toml(&sim.url(), SECRET, "", token_extra, &dir)
        .replace("client_id = ", "watch_secret_files = false\nclient_id = ");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    p
}

fn audit_count(p: &Proxy, event: &str) -> usize {
    std::fs::read_to_string(p.audit_path())
        .unwrap_or_default()
        .matches(&format!("\"event\":\"{event}\""))
        .count()
}

#[tokio::test]
async fn a_new_secret_is_validated_then_swapped_and_the_old_token_kept() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    let before = p.running.store.current().unwrap();
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "second-secret"}),
    )
    .await;
    write_atomic(&p.dir.join("client-secret"), "second-secret\n");
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "applied");
    assert_eq!(body["rotation"]["outcome"], "rotated");
    let after = p.running.store.current().unwrap();
    assert!(after.generation > before.generation);
    assert_eq!(
        p.running
            .store
            .fallback_valid(std::time::Instant::now())
            .unwrap()
            .generation,
        before.generation
    );
    assert_eq!(audit_count(&p, "SECRET_ROTATED"), 1);
    assert_eq!(audit_count(&p, "CONFIG_RELOADED"), 1);
    assert!(metrics_text(&p)
        .await
        .contains("genesys_proxy_secret_rotations_total{outcome=\"success\"} 1"));
    // The new secret minted the token in use: remove the old one at Genesys, all still works.
    sim_delete_secret(&sim, SECRET).await;
    let v: Value = get_json(&p.url("/api/v2/x")).await;
    assert_eq!(v["token_fingerprint"], after.fingerprint.as_str());
    let (status, body) = post_reload(&p).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("unchanged")));
}

#[tokio::test]
async fn a_wrong_secret_keeps_the_old_one_serving_and_is_retried() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    let before = p.running.store.current().unwrap();
    write_atomic(&p.dir.join("client-secret"), "not-yet-active\n");
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["outcome"], "rotation_failed");
    assert_eq!(
        body["rotation"]["new_secret"],
        fingerprint(b"not-yet-active")
    );
    assert_eq!(
        p.running.store.current().unwrap().generation,
        before.generation,
        "nothing swapped"
    );
    assert_eq!(get(&p.url("/api/v2/x")).await.status(), 200);
    let s: Value = get_json(&p.admin("/status")).await;
    assert_eq!(s["status"], "degraded");
    assert_eq!(
        s["rotation"]["pending_new_secret"],
        fingerprint(b"not-yet-active")
    );
    let m = metrics_text(&p).await;
    assert!(
        metric(
            &m,
            "genesys_proxy_secret_rotations_total{outcome=\"failed\"}"
        ) >= 1.0
    );
    assert!(audit_count(&p, "SECRET_ROTATION_FAILED") >= 1);
    // The secret becomes active at Genesys: the refresher's retries pick it up by themselves.
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "not-yet-active"}),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the pending rotation to succeed",
        || async { audit_count(&p, "SECRET_ROTATED") == 1 },
    )
    .await;
    let s: Value = get_json(&p.admin("/status")).await;
    assert_eq!(s["rotation"]["pending_new_secret"], Value::Null);
}

#[tokio::test]
async fn a_broken_config_is_rejected_and_changes_nothing() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    let path = p.dir.join("proxy.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    for broken in [
        good.replace("[proxy]", "[proxy\n"),
        good.replace("[admin]", "[admin]\nbogus_key = 1"),
        good.clone(),
    ] {
        std::fs::write(&path, &broken).unwrap();
        if broken == good {
            std::fs::write(p.dir.join("client-secret"), "").unwrap();
        }
        let (status, body) = post_reload(&p).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["outcome"], "rejected");
        assert!(
            body["reason"].as_str().unwrap().contains("proxy.toml"),
            "{body}"
        );
        assert_eq!(get(&p.url("/api/v2/x")).await.status(), 200);
    }
    assert_eq!(audit_count(&p, "CONFIG_RELOAD_REJECTED"), 3);
    assert!(metrics_text(&p)
        .await
        .contains("genesys_proxy_config_reloads_total{outcome=\"rejected\"} 3"));
}

#[tokio::test]
async fn in_place_settings_apply_and_listen_changes_need_a_restart() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    assert_eq!(get(&p.url("/api/v3/thing")).await.status(), 403);
    let path = p.dir.join("proxy.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "[proxy]\n",
            "[proxy]\nallowed_path_prefixes = [\"/api/v2/\", \"/api/v3/\"]\n",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"127.0.0.1:1\"",
        );
    std::fs::write(&path, text).unwrap();
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "partially_applied");
    assert_eq!(body["applied"], json!(["proxy.allowed_path_prefixes"]));
    assert_eq!(body["restart_required"], json!(["admin.listen"]));
    // The simulator (not the proxy's allowlist) now answers /api/v3 paths.
    let r = get(&p.url("/api/v3/thing")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        get(&p.admin("/healthz")).await.status(),
        200,
        "admin still on its old address"
    );
}

#[tokio::test]
async fn minting_falls_back_to_the_previous_secret_on_invalid_client() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("previous");
    let previous = dir.join("previous-secret");
    write_atomic(&previous, &format!("{SECRET}\n"));
    let toml = proxy_toml(&sim.url(), "rotated-but-not-active", "", "", &dir).replace(
        "client_id = ",
        &format!(
            "previous_client_secret = {{ file = {:?} }}\nclient_id = ",
            previous.display().to_string()
        ),
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let token = p.running.store.current().unwrap();
    assert_eq!(token.source.as_str(), "previous");
    assert_eq!(get(&p.url("/api/v2/x")).await.status(), 200);
    let s: Value = get_json(&p.admin("/status")).await;
    assert_eq!(s["token"]["source"], "previous");
    assert_eq!(s["status"], "degraded");
    assert!(metrics_text(&p)
        .await
        .contains("genesys_proxy_token_fallback_active 1"));
    assert_eq!(audit_count(&p, "FALLBACK_TO_PREVIOUS_SECRET"), 1);
}

#[tokio::test]
async fn a_401_on_the_new_token_is_replayed_with_the_pre_rotation_token() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    let old = p.running.store.current().unwrap();
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "s2"}),
    )
    .await;
    write_atomic(&p.dir.join("client-secret"), "s2\n");
    assert_eq!(post_reload(&p).await.0, 200);
    // Genesys kills the new token, and no newer one can be minted for a while.
    let new_token = sim.state.recent_token_values().last().unwrap().clone();
    assert_eq!(
        fingerprint(new_token.as_bytes()),
        p.running.store.current().unwrap().fingerprint
    );
    let r = client()
        .delete(format!("{}/api/v2/tokens/me", sim.url()))
        .bearer_auth(&new_token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "status500", "count": 1000}),
    )
    .await;
    let r = client()
        .post(p.url("/api/v2/after-rotation"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["token_fingerprint"],
        old.fingerprint.as_str(),
        "replayed with the pre-rotation token"
    );
    assert_eq!(v["body_len"], 7);
}

#[tokio::test]
async fn changing_a_watched_secret_file_rotates_without_a_signal() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    let before = p.running.store.generation();
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "watched-new"}),
    )
    .await;
    write_atomic(&p.dir.join("client-secret"), "watched-new\n");
    eventually(
        Duration::from_secs(10),
        "the file watch to rotate",
        || async { audit_count(&p, "SECRET_ROTATED") == 1 },
    )
    .await;
    assert!(p.running.store.generation() > before);
    let log = std::fs::read_to_string(p.audit_path()).unwrap();
    assert!(log.contains("\"trigger\":\"secret_file_changed\""), "{log}");
}

// Regression: the pre-rotation token used to be offered for its whole lifetime (hours), so a
// revoke-all long after a rotation replayed requests with a dead token instead of refreshing.
#[tokio::test]
async fn after_the_rotation_window_a_401_refreshes_instead_of_using_the_old_token() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "rotation_retry_window_seconds = 1").await;
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "s3"}),
    )
    .await;
    write_atomic(&p.dir.join("client-secret"), "s3\n");
    assert_eq!(post_reload(&p).await.0, 200);
    // The window has to pass: that is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    let r = client()
        .post(p.url("/api/v2/later"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "refreshed and replayed, not replayed with the dead old token"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["token_fingerprint"],
        p.running.store.current().unwrap().fingerprint.as_str()
    );
}

/// Regression (a rotation followed by the IdP revoking the client's tokens): the one replay
/// was spent on the pre-rotation token, which was dead too, and the request got a 401. A
/// refused fallback now leads to a replay with a token minted after the first 401.
#[tokio::test]
async fn a_revoke_right_after_a_rotation_never_reaches_the_client() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    for round in 0..3 {
        let new_secret = format!("rotated-secret-{round}");
        sim_post(
            &sim,
            &format!("/__sim/clients/{CLIENT_ID}/secrets"),
            json!({ "secret": new_secret }),
        )
        .await;
        write_atomic(&p.dir.join("client-secret"), &format!("{new_secret}\n"));
        let (status, body) = post_reload(&p).await;
        assert_eq!(body["rotation"]["outcome"], "rotated", "{status} {body}");
        // The IdP side: the old secret goes, and every token of the client is revoked.
        let old = if round == 0 {
            SECRET.to_string()
        } else {
            format!("rotated-secret-{}", round - 1)
        };
        let deleted = sim_delete_secret(&sim, &old).await;
        assert!(deleted.status().is_success());
        sim_post(&sim, "/__sim/revoke", json!({ "client_id": CLIENT_ID })).await;

        let body = format!("round {round} body");
        let r = client()
            .post(p.url("/api/v2/after/rotation/and/revoke"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "round {round}: {}",
            r.text().await.unwrap()
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["body_sha256"],
            genesys_auth_proxy::fingerprint::sha256_hex(body.as_bytes())
        );
        let r = get(&p.url("/api/v2/organizations/me")).await;
        assert_eq!(r.status(), 200, "round {round}");
    }
    let m = metrics_text(&p).await;
    assert!(
        metric(&m, "genesys_proxy_replays_total{outcome=\"success\"}") >= 3.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_replays_total{outcome=\"rejected_again\"}"
        ),
        0.0
    );
}

/// Regression: a reload whose secret pointed at `/dev/zero` read until the kernel killed the
/// proxy, a huge file was sent as credentials, and a FIFO with no writer froze the admin
/// listener. Each is now refused at once, naming the key, and nothing changes.
#[tokio::test]
async fn secrets_that_are_devices_fifos_or_huge_are_refused_at_once() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    let conf = p.dir.join("proxy.toml");
    let original = std::fs::read_to_string(&conf).unwrap();
    let secret_file = p.dir.join("client-secret").display().to_string();
    let fifo = p.dir.join("secret-fifo");
    let fifo_made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let huge = p.dir.join("huge-secret");
    std::fs::write(&huge, vec![b'a'; 100_000]).unwrap();
    let mut cases = vec![
        ("/dev/zero".to_string(), "a device"),
        (huge.display().to_string(), "larger than 4096 bytes"),
        (p.dir.display().to_string(), "directory"),
    ];
    if fifo_made {
        cases.push((fifo.display().to_string(), "FIFO"));
    }
    for (target, why) in cases {
        std::fs::write(&conf, original.replace(&secret_file, &target)).unwrap();
        let started = std::time::Instant::now();
        let (status, body) = post_reload(&p).await;
        assert_eq!(status, 400, "{target}: {body}");
        let reason = body["reason"].as_str().unwrap();
        assert!(
            reason.contains("genesys.client_secret") && reason.contains(why),
            "{target}: {reason}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{target}");
    }
    std::fs::write(&conf, &original).unwrap();
    let r = get(&p.url("/api/v2/organizations/me")).await;
    assert_eq!(r.status(), 200, "the proxy kept serving with its secret");
}

/// Regression: any local process, including a web page in a browser on the host, could trigger
/// a reload with a simple cross-origin POST.
#[tokio::test]
async fn reload_refuses_requests_a_web_page_could_send() {
    let sim = start_sim(sim_config()).await;
    let p = unwatched_proxy(&sim, "").await;
    let c = client();
    // A form post or text/plain: what a page can send without a CORS preflight.
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = c.post(p.admin("/reload"));
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 415, "{ct:?}");
    }
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = c
            .post(p.admin("/reload"))
            .header("content-type", "application/json")
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}");
    }
    assert_eq!(
        post_reload(&p).await.0,
        200,
        "a deliberate caller still can"
    );
}

#[tokio::test]
async fn reload_requires_the_admin_token_when_one_is_set() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("reload-token");
    std::fs::write(dir.join("admin-token"), "admin-token-7f3a\n").unwrap();
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir).replace(
        "[admin]\n",
        &format!(
            "[admin]\nreload_token = {{ file = {:?} }}\n",
            dir.join("admin-token").display().to_string()
        ),
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let c = client();
    let send = |auth: Option<&'static str>| {
        let mut req = c
            .post(p.admin("/reload"))
            .header("content-type", "application/json");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    assert_eq!(send(None).await.unwrap().status(), 401);
    assert_eq!(send(Some("Bearer wrong")).await.unwrap().status(), 401);
    assert_eq!(
        send(Some("Bearer admin-token-7f3a"))
            .await
            .unwrap()
            .status(),
        200
    );
}
