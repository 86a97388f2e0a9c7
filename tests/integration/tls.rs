//! TLS toward Genesys: certificates are verified for the token endpoint and the API host, with
//! SNI/host names as configured. The simulator serves HTTPS with a certificate generated at
//! start; `genesys.ca_file` makes the proxy trust exactly that certificate.

use genesys_auth_proxy::sim::{SimConfig, SimHandle};
use serde_json::Value;

use crate::support::*;

async fn tls_sim() -> SimHandle {
    start_sim(SimConfig {
        tls: true,
        ..sim_config()
    })
    .await
}

/// Proxy TOML with `ca_file` trusting `ca_pem`, login at `login`, API at `api`.
fn tls_toml(
    login: &str,
    api: &str,
    ca_pem: &str,
    dir: &std::path::Path,
    token_extra: &str,
) -> String {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    proxy_toml(
        login,
        SECRET,
        "token_wait_timeout_ms = 300",
        token_extra,
        dir,
    )
    .replace(
        &format!("api_url = \"{login}\""),
        &format!("api_url = \"{api}\""),
    )
    .replace(
        "client_id = ",
        &format!("ca_file = {:?}\nclient_id = ", ca.display().to_string()),
    )
}

#[tokio::test]
async fn proxies_over_verified_tls() {
    let sim = tls_sim().await;
    assert!(sim.url().starts_with("https://"));
    let dir = temp_dir("tls-ok");
    let toml = tls_toml(
        &sim.url(),
        &sim.url(),
        sim.cert_pem.as_deref().unwrap(),
        &dir,
        "",
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let v: Value = get_json(&p.url("/api/v2/over-tls")).await;
    assert_eq!(v["path"], "/api/v2/over-tls");
    assert_eq!(v["host"], sim.addr.to_string());
}

#[tokio::test]
async fn an_untrusted_token_endpoint_certificate_is_refused() {
    let sim = tls_sim().await;
    let other = tls_sim().await; // a different certificate
    let dir = temp_dir("tls-bad-login");
    let toml = tls_toml(
        &sim.url(),
        &sim.url(),
        other.cert_pem.as_deref().unwrap(),
        &dir,
        "",
    );
    let p = start_from_toml(&toml, dir).await;
    let r = get(&p.url("/api/v2/x")).await;
    assert_eq!(
        r.status(),
        503,
        "no token can be minted over an unverified connection"
    );
    let m = metrics_text(&p).await;
    assert!(
        metric(
            &m,
            "genesys_proxy_token_requests_total{outcome=\"network_error\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        stats(&sim).await["token_requests"]["total"],
        0,
        "the simulator saw no token request"
    );
}

#[tokio::test]
async fn an_untrusted_api_certificate_is_refused() {
    let login = tls_sim().await;
    let api = tls_sim().await; // presents a certificate the proxy does not trust
    let dir = temp_dir("tls-bad-api");
    let toml = tls_toml(
        &login.url(),
        &api.url(),
        login.cert_pem.as_deref().unwrap(),
        &dir,
        "validation = \"none\"",
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let r = get(&p.url("/api/v2/x")).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "proxy.upstream_unreachable");
    assert_eq!(
        stats(&api).await["api_requests"]["total"],
        0,
        "no request reached the untrusted host"
    );
}
