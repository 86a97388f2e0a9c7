//! Issue 21: answers from the token endpoint are read under `token.max_response_bytes`
//! (a 3 GB body once grew the proxy until it was killed) and an issuer's lifetime is cut to
//! `token.max_lifetime_seconds`.

use serde_json::{json, Value};

use crate::support::*;

#[tokio::test]
async fn a_huge_token_answer_is_refused_at_the_cap_and_the_next_mint_serves() {
    let sim = start_sim(sim_config()).await;
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "huge_body", "count": 1}),
    )
    .await;
    let p = start_proxy_with(&sim, "", "max_response_bytes = 65536").await;
    p.ready().await;
    assert_eq!(get(&p.url("/api/v2/users/me")).await.status(), 200);
    let events = audit_events(&p).await;
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "TOKEN_REFRESH_FAILED")
        .collect();
    assert_eq!(failed.len(), 1, "{events:?}");
    let error = failed[0]["details"]["error"].as_str().unwrap();
    assert!(
        error.contains("token.max_response_bytes (65536 bytes)"),
        "{error}"
    );
    p.running.shutdown().await;
}

#[tokio::test]
async fn an_absurd_expires_in_is_cut_to_max_lifetime_and_shown() {
    let sim = start_sim(sim_config()).await;
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "far_expiry", "count": 1}),
    )
    .await;
    let p = start_proxy_with(&sim, "", "max_lifetime_seconds = 7200").await;
    p.ready().await;
    let s = get_json(&p.admin("/status")).await;
    assert_eq!(s["token"]["lifetime_seconds"], 7200, "{s}");
    assert!(
        s["token"]["lifetime_clamped_from_seconds"].as_u64() > Some(7200),
        "{s}"
    );
    assert!(
        s["token"]["expires_in_seconds"].as_u64() <= Some(7200),
        "{s}"
    );
    assert_eq!(get(&p.url("/api/v2/users/me")).await.status(), 200);
    p.running.shutdown().await;
}

#[test]
fn the_caps_are_checked_keys() {
    let dir = temp_dir("caps");
    for (key, bad) in [
        ("max_response_bytes", "10"),
        ("max_lifetime_seconds", "0"),
        ("max_lifetime_seconds", "99999999999"),
    ] {
        let toml = proxy_toml(
            "http://127.0.0.1:9",
            SECRET,
            "",
            &format!("{key} = {bad}"),
            &dir,
        );
        let e = genesys_auth_proxy::config::parse(&toml, std::path::Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("token.{key}")), "{e}");
    }
}
