//! The promise: rotating the client secret drops no request. A real proxy process, a steady
//! stream of GETs and POSTs, and `ROTATIONS` (default 20) rotations alternating SIGHUP and
//! `POST /reload`, the simulator removing the old secret after each and, after every second
//! one, also revoking all of the client's tokens (the IdP side of a credential compromise
//! response); then a rotation to a wrong secret and a reload of a broken file under the same
//! load. `benches/rotation-soak.sh` runs it with 100 rotations.

use std::time::{Duration, Instant};

use genesys_auth_proxy::fingerprint::fingerprint;
use serde_json::{json, Value};

use crate::support::*;

async fn rotations_done(admin: &str) -> u64 {
    let text = get_text(&format!("http://{admin}/metrics")).await;
    text.lines()
        .find(|l| l.starts_with("genesys_proxy_secret_rotations_total{outcome=\"success\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn secret_rotations_under_load_drop_no_request() {
    let rotations: u64 = std::env::var("ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let pause = Duration::from_millis(
        std::env::var("ROTATION_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        api_rate_limit_per_minute: 1_000_000,
        token_rate_limit_per_minute: 10_000,
        ..sim_config()
    })
    .await;
    let dir = temp_dir("rotation-load");
    let toml = proxy_toml(
        &sim.url(),
        SECRET,
        "",
        "max_token_requests_per_minute = 600",
        &dir,
    )
    .replace("client_id = ", "watch_secret_files = false\nclient_id = ")
    .replace("format = \"text\"", "format = \"json\"")
    .replace("level = \"warn\"", "level = \"info\"");
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, &toml).unwrap();
    let secret_file = dir.join("client-secret");
    let proc = ProxyProcess::spawn(&conf);
    proc.wait_ready().await;
    let load = Load::start(format!("http://{}", proc.proxy), 4);
    let started = Instant::now();

    let c = client();
    let mut old = SECRET.to_string();
    let mut revokes = 0;
    for i in 1..=rotations {
        let new = format!(
            "rotated-secret-{i}-{}",
            genesys_auth_proxy::sim::random_token()
        );
        sim_post(
            &sim,
            &format!("/__sim/clients/{CLIENT_ID}/secrets"),
            json!({"secret": new}),
        )
        .await;
        write_atomic(&secret_file, &format!("{new}\n"));
        if i % 2 == 1 {
            proc.signal("HUP");
        } else {
            let r = c
                .post(format!("http://{}/reload", proc.admin))
                .header("content-type", "application/json")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            assert_eq!(status, 200, "rotation {i}: {body}");
        }
        let admin = proc.admin.clone();
        eventually(
            Duration::from_secs(15),
            &format!("rotation {i} applied"),
            || {
                let admin = admin.clone();
                async move { rotations_done(&admin).await == i }
            },
        )
        .await;
        let r = c
            .delete(format!(
                "{}/__sim/clients/{CLIENT_ID}/secrets/{old}",
                sim.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if i % 2 == 0 {
            // Rotation + revoke: the pre-rotation token dies with the new one.
            sim_post(&sim, "/__sim/revoke", json!({"client_id": CLIENT_ID})).await;
            revokes += 1;
        }
        old = new;
        tokio::time::sleep(pause).await; // soak pacing (0 in CI)
    }
    let rotation_time = started.elapsed();

    // A wrong secret under the same load: refused, old token keeps serving, visible everywhere.
    write_atomic(&secret_file, "wrong-secret\n");
    proc.signal("HUP");
    let status_url = format!("http://{}/status", proc.admin);
    eventually(
        Duration::from_secs(15),
        "the failed rotation in /status",
        || {
            let url = status_url.clone();
            async move {
                let s: Value = get_json(&url).await;
                s["rotation"]["pending_new_secret"] == fingerprint(b"wrong-secret")
                    && s["status"] == "degraded"
            }
        },
    )
    .await;
    let metrics = get_text(&format!("http://{}/metrics", proc.admin)).await;
    assert!(
        metric(
            &metrics,
            "genesys_proxy_secret_rotations_total{outcome=\"failed\"}"
        ) >= 1.0,
        "{metrics}"
    );

    // A broken config under the same load: rejected, nothing changes.
    std::fs::write(&conf, toml.replace("[proxy]", "[proxy\n")).unwrap();
    let r = c
        .post(format!("http://{}/reload", proc.admin))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    std::fs::write(&conf, &toml).unwrap();
    // Let the load run on a little after the last change.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (sent, failures) = load.finish().await;
    let (exit, logs, _stdout) = proc.stop();
    println!(
        "rotation load: requests sent {sent}, failed {}, rotations applied {rotations} ({revokes} followed by a revoke-all of the client) in {:.1} s",
        failures.len(),
        rotation_time.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(sent > rotations * 4, "the load kept flowing: {sent}");
    assert!(exit.success());
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert_eq!(
        audit.matches("\"event\":\"SECRET_ROTATED\"").count() as u64,
        rotations
    );
    assert!(audit.contains("\"event\":\"SECRET_ROTATION_FAILED\""));
    assert!(audit.contains("\"event\":\"CONFIG_RELOAD_REJECTED\""));
    assert!(
        !logs.contains("wrong-secret") && !audit.contains("wrong-secret"),
        "secrets never printed"
    );
    let verified = genesys_auth_proxy::audit::verify(&dir.join("audit.jsonl")).unwrap();
    assert!(verified.sealed, "{verified:?}");
}
