//! `[oauth]`: the proxy in front of a generic OAuth2 issuer (the simulator in JWT mode, which
//! then acts as one): client authentication as configured, scope/audience/extra parameters
//! sent as written, JWKS found by discovery, and hostile tokens never served.

use genesys_auth_proxy::sim::jwt::{Hostile, AUDIENCE};
use genesys_auth_proxy::sim::{SimConfig, SimHandle, TokenFormat};
use serde_json::{json, Value};

use crate::support::*;

async fn issuer_sim(secret: &str) -> SimHandle {
    start_sim(SimConfig {
        token_format: TokenFormat::Jwt,
        clients: vec![(CLIENT_ID.into(), secret.into())],
        ..sim_config()
    })
    .await
}

/// A proxy config with `[oauth]` (plus `oauth_extra`) instead of `[genesys]`, and `token`
/// appended to `[token]`.
fn oauth_toml(
    sim: &SimHandle,
    secret: &str,
    oauth_extra: &str,
    token: &str,
    dir: &std::path::Path,
) -> String {
    let u = sim.url();
    let genesys = proxy_toml(&u, secret, "", token, dir);
    let oauth = genesys.replace(
        &format!("[genesys]\nlogin_url = \"{u}\"\n"),
        &format!("[oauth]\ntoken_url = \"{u}/oauth/token\"\n{oauth_extra}\n"),
    );
    assert_ne!(genesys, oauth, "the [genesys] block was found and replaced");
    oauth
}

async fn start_oauth(sim: &SimHandle, secret: &str, oauth_extra: &str, token: &str) -> Proxy {
    let dir = temp_dir("oauth");
    let toml = oauth_toml(sim, secret, oauth_extra, token, &dir);
    start_from_toml(&toml, dir).await
}

/// `[token]` keys verifying the simulator's JWTs, with the JWKS discovered from the issuer.
fn discovered(sim: &SimHandle) -> String {
    format!("issuer = \"{}\"\naudience = \"{AUDIENCE}\"", sim.url())
}

async fn last_token_request(sim: &SimHandle) -> Value {
    get_json(&format!("{}/__sim/last-token-request", sim.url())).await
}

#[tokio::test]
async fn client_secret_post_scope_audience_and_extra_params_reach_the_token_endpoint() {
    let sim = issuer_sim(SECRET).await;
    let oauth = "auth_method = \"client_secret_post\"\nscope = \"read:users write:users\"\naudience = \"https://api.example.com\"\nextra_params = { resource = \"urn:example:api\" }";
    let p = start_oauth(&sim, SECRET, oauth, &discovered(&sim)).await;
    p.ready().await;
    let r = get(&p.url("/api/v2/users/me")).await;
    assert_eq!(r.status(), 200);
    let last = last_token_request(&sim).await;
    assert_eq!(last["auth_method"], "client_secret_post", "{last}");
    assert_eq!(last["client_secret_in_form"], true, "{last}");
    assert_eq!(
        last["params"],
        json!({
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "scope": "read:users write:users",
            "audience": "https://api.example.com",
            "resource": "urn:example:api",
        }),
        "every parameter as written, nothing else"
    );
    // The JWKS was found through the discovery document.
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(
        status["jwks"]["url"],
        format!("{}/.well-known/jwks.json", sim.url()),
        "{status}"
    );
    // The secret went in the form body: it must not come back out anywhere.
    let metrics = metrics_text(&p).await;
    let audit = serde_json::to_string(&audit_events(&p).await).unwrap();
    for (what, text) in [
        ("status", status.to_string()),
        ("metrics", metrics),
        ("audit", audit),
    ] {
        assert!(!text.contains(SECRET), "{what} holds the client secret");
    }
}

#[tokio::test]
async fn client_secret_basic_form_encodes_id_and_secret_as_rfc_6749_says() {
    // '+' and '/' and '=' and ' ' change meaning when an issuer form-decodes raw values.
    let secret = "p+ss/w=rd~ with space";
    let sim = issuer_sim(secret).await;
    let p = start_oauth(&sim, secret, "scope = \"read\"", &discovered(&sim)).await;
    p.ready().await;
    assert_eq!(get(&p.url("/api/v2/x")).await.status(), 200);
    let last = last_token_request(&sim).await;
    assert_eq!(last["auth_method"], "client_secret_basic", "{last}");
    assert_eq!(last["client_secret_in_form"], false, "{last}");
    assert_eq!(
        last["params"],
        json!({"grant_type": "client_credentials", "scope": "read"}),
        "Basic auth: no credentials in the form"
    );
}

/// Every kind of bad token the simulator can issue, with the reason the audit log must give.
const HOSTILE: [(Hostile, &str); 10] = [
    (Hostile::AlgNone, "not a JWT with a supported algorithm"),
    (Hostile::Hs256PublicKey, "HS256 is refused"),
    (Hostile::UnknownKid, "no key"),
    (Hostile::BadSignature, "InvalidSignature"),
    (Hostile::Expired, "ExpiredSignature"),
    (Hostile::WrongIssuer, "InvalidIssuer"),
    (Hostile::WrongAudience, "InvalidAudience"),
    (Hostile::NoExp, "exp"),
    // Regression (issue 21): with token.issuer and token.audience set, a JWT without the
    // claim was published; only a wrong value was refused.
    (Hostile::NoIssuer, "Missing required claim: iss"),
    (Hostile::NoAudience, "Missing required claim: aud"),
];

#[tokio::test]
async fn hostile_tokens_are_refused_and_the_next_good_one_is_served() {
    let sim = issuer_sim(SECRET).await;
    let token = format!(
        "jwks_url = \"{}/.well-known/jwks.json\"\n{}",
        sim.url(),
        discovered(&sim)
    );
    for (kind, reason) in HOSTILE {
        let r = sim_post(
            &sim,
            "/__sim/hostile-tokens",
            json!({"kind": kind, "count": 1}),
        )
        .await;
        assert!(r.status().is_success(), "{kind:?}");
        let p = start_oauth(&sim, SECRET, "", &token).await;
        // The first token is hostile: refused; the retry (after backoff) gets a good one.
        p.ready().await;
        let r = get(&p.url("/api/v2/users/me")).await;
        assert_eq!(r.status(), 200, "{kind:?}");
        let echo: Value = r.json().await.unwrap();
        let events = audit_events(&p).await;
        let failed: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "TOKEN_VALIDATION_FAILED")
            .collect();
        assert_eq!(failed.len(), 1, "{kind:?}: {events:?}");
        let error = failed[0]["details"]["error"].as_str().unwrap();
        assert!(error.contains(reason), "{kind:?}: {error}");
        let hostile_fp = failed[0]["token"].as_str().unwrap();
        assert_ne!(
            echo["token_fingerprint"], hostile_fp,
            "{kind:?}: the hostile token reached the API"
        );
        let s = stats(&sim).await;
        assert!(
            s["api_requests"]["by_token"].get(hostile_fp).is_none(),
            "{kind:?}: the hostile token was used: {s}"
        );
        let m = metrics_text(&p).await;
        assert!(
            metric(
                &m,
                "genesys_proxy_token_requests_total{outcome=\"validation_failed\"}"
            ) >= 1.0,
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn unknown_key_ids_cannot_make_the_proxy_hammer_the_jwks() {
    let sim = issuer_sim(SECRET).await;
    let r = sim_post(
        &sim,
        "/__sim/hostile-tokens",
        json!({"kind": "unknown_kid", "count": 3}),
    )
    .await;
    assert!(r.status().is_success());
    let p = start_oauth(&sim, SECRET, "", &discovered(&sim)).await;
    p.ready().await;
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_token_requests_total{outcome=\"validation_failed\"}"
        ),
        3.0,
        "{m}"
    );
    // The first fill, one refetch for the first unknown kid; the next two wait 30 s.
    assert_eq!(
        metric(&m, "genesys_proxy_jwks_fetches_total{outcome=\"success\"}"),
        2.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_is_not_trusted() {
    let sim = issuer_sim(SECRET).await;
    // The document at {issuer}/.well-known/openid-configuration names the issuer without the
    // trailing slash: OpenID Discovery says the two must be identical.
    let token = format!("issuer = \"{}/\"", sim.url());
    let p = start_oauth(&sim, SECRET, "", &token).await;
    eventually(
        std::time::Duration::from_secs(10),
        "a validation failure",
        || async {
            audit_events(&p)
                .await
                .iter()
                .any(|e| e["event"] == "TOKEN_VALIDATION_FAILED")
        },
    )
    .await;
    assert_eq!(get(&p.admin("/readyz")).await.status(), 503);
    let events = audit_events(&p).await;
    let failed = events
        .iter()
        .find(|e| e["event"] == "TOKEN_VALIDATION_FAILED")
        .unwrap();
    let error = failed["details"]["error"].as_str().unwrap();
    assert!(error.contains("names issuer"), "{error}");
}

// Multi-threaded: the in-process simulator must keep serving while the test blocks on the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_live_mints_and_verifies_with_oauth() {
    let sim = issuer_sim(SECRET).await;
    let dir = temp_dir("check-oauth");
    let conf = dir.join("proxy.toml");
    let toml = oauth_toml(
        &sim,
        SECRET,
        "auth_method = \"client_secret_post\"",
        &discovered(&sim),
        &dir,
    );
    std::fs::write(&conf, toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_genesys-auth-proxy"))
        .args(["check", "--live", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("minted and validated"), "{stdout}");
    assert_eq!(
        last_token_request(&sim).await["auth_method"],
        "client_secret_post"
    );
}

// Regression (issue 21): an exp in the year 5138 (no expires_in) was taken as is, so the
// token was never refreshed; one past the year 9999 made every /status call panic, and
// larger ones panicked the refresher.
#[tokio::test]
async fn far_future_exp_is_cut_to_max_lifetime_and_panics_nothing() {
    for kind in [Hostile::FarExp, Hostile::ExpPastYear9999] {
        let sim = issuer_sim(SECRET).await;
        let r = sim_post(
            &sim,
            "/__sim/hostile-tokens",
            json!({"kind": kind, "count": 1}),
        )
        .await;
        assert!(r.status().is_success());
        let p = start_oauth(&sim, SECRET, "", &discovered(&sim)).await;
        p.ready().await;
        let s = get_json(&p.admin("/status")).await;
        assert_eq!(s["token"]["lifetime_seconds"], 172_800, "{kind:?}: {s}");
        assert!(
            s["token"]["lifetime_clamped_from_seconds"].as_u64() > Some(172_800),
            "{kind:?}: {s}"
        );
        assert_eq!(s["refresher_panics"], 0, "{kind:?}");
        assert_eq!(get(&p.url("/api/v2/users/me")).await.status(), 200);
        p.running.shutdown().await;
    }
}

// Regression (issue 21): a 1,500 MiB JWKS grew the proxy to 3.2 GB. The key set is read
// under token.max_response_bytes like every issuer answer; a larger one fails validation
// naming the key, and no token is served.
#[tokio::test]
async fn a_huge_jwks_is_refused_at_the_cap() {
    let sim = issuer_sim(SECRET).await;
    let token = format!(
        "jwks_url = \"{}/__sim/huge?mib=8\"\n{}\nmax_response_bytes = 65536",
        sim.url(),
        discovered(&sim)
    );
    let p = start_oauth(&sim, SECRET, "", &token).await;
    eventually(
        std::time::Duration::from_secs(10),
        "a refused validation",
        || async {
            audit_events(&p)
                .await
                .iter()
                .any(|e| e["event"] == "TOKEN_VALIDATION_FAILED")
        },
    )
    .await;
    let events = audit_events(&p).await;
    let failed = events
        .iter()
        .find(|e| e["event"] == "TOKEN_VALIDATION_FAILED")
        .unwrap();
    let error = failed["details"]["error"].as_str().unwrap();
    assert!(
        error.contains("token.max_response_bytes (65536 bytes)"),
        "{error}"
    );
    assert!(
        p.running.store.current().is_none(),
        "no token was published"
    );
    p.running.shutdown().await;
}
