//! The official Genesys Cloud SDKs, unchanged, log in to the proxy through their documented
//! gateway setting with an app's own credentials and call the API (`tests/sdk/`). `.ci/sdks`
//! installs them into `target/sdk`; without them a test fails under CI
//! (`GAP_REQUIRE_SDKS=1`, set by `.ci/run`) and is skipped with a note elsewhere.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::apps::{apps_section, BILLING_SECRET};
use crate::support::*;

fn sdk_dir() -> PathBuf {
    std::env::var_os("GAP_SDK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sdk"))
}

/// The installed SDK at `rel`, or `None` (with a note) where it may be missing.
pub fn installed(rel: &str) -> Option<PathBuf> {
    let path = sdk_dir().join(rel);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("GAP_REQUIRE_SDKS").is_none(),
        "{} is missing: run `bash .ci/sdks`",
        path.display()
    );
    eprintln!(
        "skipped: {} is missing (run `bash .ci/sdks`)",
        path.display()
    );
    None
}

const LIFETIME: u64 = 2;

async fn sdk_proxy_with(proxy_extra: &str) -> (genesys_auth_proxy::sim::SimHandle, Proxy) {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("sdk");
    let toml = proxy_toml(&sim.url(), SECRET, proxy_extra, "", &dir)
        + &apps_section(&dir, "", LIFETIME)
            .replace("[apps]\n", "[apps]\nlogin_path_prefix = \"/login\"\n");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    (sim, p)
}

async fn sdk_proxy() -> (genesys_auth_proxy::sim::SimHandle, Proxy) {
    sdk_proxy_with("").await
}

/// Runs an SDK script against the proxy and returns what it printed.
async fn run(cmd: Command, p: &Proxy) -> Value {
    run_at(cmd, p, "127.0.0.1", &[]).await
}

/// Runs an SDK script against the proxy at `host` (its port), with `extra` arguments after
/// the usual ones, and returns what it printed.
async fn run_at(mut cmd: Command, p: &Proxy, host: &str, extra: &[String]) -> Value {
    cmd.args([
        host.to_string(),
        p.running.proxy_addr.port().to_string(),
        "login".to_string(),
        "billing-app".to_string(),
        BILLING_SECRET.to_string(),
        LIFETIME.to_string(),
    ])
    .args(extra);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "sdk failed: {stdout}\n{stderr}");
    assert!(
        !stdout.contains(BILLING_SECRET),
        "the script printed a secret"
    );
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn check(seen: &Value, sdk: &str) {
    assert_eq!(
        seen["wrong_secret_status"], 401,
        "{sdk}: a wrong secret fails the SDK's login: {seen}"
    );
    assert_eq!(
        seen["token_prefix"], "gap1.",
        "{sdk}: the SDK holds a proxy token: {seen}"
    );
    assert!(seen["users"].as_u64().unwrap() >= 1, "{sdk}: {seen}");
    assert_eq!(seen["org_id_set"], true, "{sdk}: {seen}");
    assert_eq!(
        seen["routing_status"], 403,
        "{sdk}: held to its paths: {seen}"
    );
    assert_eq!(
        seen["routing_code"], "proxy.app_not_allowed",
        "{sdk}: {seen}"
    );
    assert_eq!(
        seen["expired_status"], 401,
        "{sdk}: an expired proxy token: {seen}"
    );
    assert!(
        seen["relogin_users"].as_u64().unwrap() >= 1,
        "{sdk}: logged in again: {seen}"
    );
}

#[tokio::test]
async fn the_official_python_sdk_logs_in_through_its_gateway_setting() {
    let Some(python) = installed("python/PureCloudPlatformClientV2") else {
        return;
    };
    let (_sim, p) = sdk_proxy().await;
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/python_gateway.py"
    ))
    .env("PYTHONPATH", python.parent().unwrap());
    let seen = run(cmd, &p).await;
    check(&seen, "python");
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(&m, "genesys_proxy_app_auth_failures_total{proof=\"login\"}"),
        1.0
    );
    p.running.shutdown().await;
}

#[tokio::test]
async fn the_official_js_sdk_logs_in_through_its_gateway_setting() {
    let Some(js) = installed("node/node_modules/purecloud-platform-client-v2") else {
        return;
    };
    let (_sim, p) = sdk_proxy().await;
    let mut cmd = Command::new("node");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/js_gateway.js"
    ))
    .env("NODE_PATH", js.parent().unwrap());
    let seen = run(cmd, &p).await;
    check(&seen, "js");
    p.running.shutdown().await;
}

/// The Python SDK over HTTPS to a `[proxy.tls]` listener: its gateway setting with protocol
/// https and the test CA trusted (the SDK's `ssl_ca_cert`).
#[tokio::test]
async fn the_official_python_sdk_logs_in_over_https() {
    let Some(python) = installed("python/PureCloudPlatformClientV2") else {
        return;
    };
    let pki = crate::listener_tls::Pki::new("pki-sdk");
    let (_sim, p) = sdk_proxy_with(&pki.section(false)).await;
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/python_gateway.py"
    ))
    .env("PYTHONPATH", python.parent().unwrap());
    let seen = run_at(cmd, &p, "localhost", &[pki.path("ca.crt")]).await;
    check(&seen, "python over https");
    p.running.shutdown().await;
}
