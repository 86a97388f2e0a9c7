//! `validation = "jwks"`: JWT access tokens verified against the issuer's JWKS before they are
//! published, with the simulator issuing RS256 JWTs (`--token-format jwt`).

use std::time::Duration;

use genesys_auth_proxy::sim::jwt::AUDIENCE;
use genesys_auth_proxy::sim::{SimConfig, TokenFormat};
use serde_json::{json, Value};

use crate::support::*;

async fn jwt_sim() -> genesys_auth_proxy::sim::SimHandle {
    start_sim(SimConfig {
        token_format: TokenFormat::Jwt,
        ..sim_config()
    })
    .await
}

fn jwks_token_section(
    sim: &genesys_auth_proxy::sim::SimHandle,
    issuer: &str,
    extra: &str,
) -> String {
    format!(
        "validation = \"jwks\"\njwks_url = \"{}/.well-known/jwks.json\"\nissuer = \"{issuer}\"\naudience = \"{AUDIENCE}\"\n{extra}",
        sim.url()
    )
}

#[tokio::test]
async fn a_jwt_verified_against_the_jwks_is_published_and_used() {
    let sim = jwt_sim().await;
    let p = start_proxy_with(&sim, "", &jwks_token_section(&sim, &sim.url(), "")).await;
    p.ready().await;
    assert_eq!(get(&p.url("/api/v2/organizations/me")).await.status(), 200);
    let s = stats(&sim).await;
    assert_eq!(
        s["api_requests"]["total"].as_u64(),
        Some(1),
        "no tokens/me call: the JWKS validated it: {s}"
    );
    let status: Value = get_json(&p.admin("/status")).await;
    let key_ids = status["jwks"]["key_ids"].as_array().unwrap();
    assert_eq!(key_ids.len(), 1, "{status}");
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(&m, "genesys_proxy_jwks_fetches_total{outcome=\"success\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "genesys_proxy_jwks_keys"), 1.0, "{m}");
}

#[tokio::test]
async fn a_jwt_failing_a_check_is_never_served() {
    let sim = jwt_sim().await;
    for (name, token_section) in [
        (
            "wrong issuer",
            jwks_token_section(&sim, "https://someone-else.example", ""),
        ),
        (
            "wrong audience",
            jwks_token_section(&sim, &sim.url(), "")
                .replace(AUDIENCE, "https://another-api.example"),
        ),
        (
            "algorithm not allowed",
            jwks_token_section(&sim, &sim.url(), "algorithms = [\"ES256\"]"),
        ),
    ] {
        let p = start_proxy_with(&sim, "token_wait_timeout_ms = 300", &token_section).await;
        let r = get(&p.url("/api/v2/organizations/me")).await;
        assert_eq!(
            r.status(),
            503,
            "{name}: never served with an unverified token"
        );
        assert_eq!(get(&p.admin("/readyz")).await.status(), 503, "{name}");
        p.running.audit.flush().await;
        let audit = std::fs::read_to_string(p.audit_path()).unwrap();
        assert!(audit.contains("TOKEN_VALIDATION_FAILED"), "{name}: {audit}");
        for t in sim.state.recent_token_values() {
            assert!(
                !audit.contains(&t),
                "{name}: the audit log holds token material"
            );
        }
    }
}

#[tokio::test]
async fn a_signing_key_rotation_is_followed_through_the_jwks() {
    let sim = jwt_sim().await;
    // A short cache so the rotated JWKS is read again quickly.
    let token = jwks_token_section(&sim, &sim.url(), "jwks_cache_seconds = 1");
    let p = start_proxy_with(&sim, "", &token).await;
    p.ready().await;
    let r = sim_post(&sim, "/__sim/rotate-signing-key", json!({})).await;
    assert!(r.status().is_success());
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The 401 is replayed with a token signed by the new key, verified with the new JWKS.
    let r = get(&p.url("/api/v2/after/rotation")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["path"], "/api/v2/after/rotation");
}

#[tokio::test]
async fn a_signing_key_withdrawn_at_once_is_followed_without_waiting() {
    let sim = jwt_sim().await;
    // The default day-long cache: only the unknown kid can make the proxy read the JWKS again.
    let p = start_proxy_with(&sim, "", &jwks_token_section(&sim, &sim.url(), "")).await;
    p.ready().await;
    let old_kid = get_json(&p.admin("/status")).await["jwks"]["key_ids"][0].clone();
    let r = sim_post(
        &sim,
        "/__sim/rotate-signing-key",
        json!({"retire_old": true}),
    )
    .await;
    let new_kid: Value = r.json::<Value>().await.unwrap()["kid"].clone();
    let jwks: Value = get_json(&format!("{}/.well-known/jwks.json", sim.url())).await;
    assert_eq!(
        jwks["keys"].as_array().unwrap().len(),
        1,
        "old key withdrawn"
    );
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    // The 401 makes the proxy mint; the new token's kid is unknown, so the JWKS is fetched
    // again at once (the startup fetch moments ago does not count against the refetch limit).
    let r = get(&p.url("/api/v2/after/rotation")).await;
    assert_eq!(r.status(), 200);
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(status["jwks"]["key_ids"], json!([new_kid]), "{status}");
    assert_ne!(old_kid, new_kid);
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(&m, "genesys_proxy_jwks_fetches_total{outcome=\"success\"}"),
        2.0,
        "{m}"
    );
}

// Multi-threaded: the in-process simulator must keep serving while the test blocks on the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_live_verifies_the_jwt_against_the_jwks() {
    let sim = jwt_sim().await;
    let check = |issuer: &str| {
        let dir = temp_dir("check-jwks");
        let conf = dir.join("proxy.toml");
        let toml = proxy_toml(
            &sim.url(),
            SECRET,
            "",
            &jwks_token_section(&sim, issuer, ""),
            &dir,
        );
        std::fs::write(&conf, toml).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_genesys-auth-proxy"))
            .args(["check", "--live", "-c"])
            .arg(&conf)
            .output()
            .unwrap()
    };
    let ok = check(&sim.url());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = check("https://someone-else.example");
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("InvalidIssuer"), "{stderr}");
    assert_eq!(
        stats(&sim).await["api_requests"]["total"].as_u64(),
        Some(0),
        "verified with the JWKS, not with tokens/me"
    );
}
