//! `[[credential]]`: several OAuth clients behind one proxy, each on its own listener with its
//! own token lifecycle. Two clients of one simulated org plus a second simulator standing for
//! a second org.

use std::time::Duration;

use genesys_auth_proxy::sim::SimHandle;
use serde_json::{json, Value};

use crate::support::*;

const REPORTING_ID: &str = "reporting-client";
const REPORTING_SECRET: &str = "reporting-secret-5e1b";
const PARTNER_ID: &str = "partner-client";
const PARTNER_SECRET: &str = "partner-secret-77aa";

/// Writes a 0600 secret file in `dir`.
fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    write_atomic(&path, &format!("{secret}\n"));
    path
}

/// A `[[credential]]` entry for a simulator client.
pub fn credential(
    dir: &std::path::Path,
    name: &str,
    sim: &SimHandle,
    id: &str,
    secret: &str,
    extra: &str,
) -> String {
    let file = secret_file(dir, &format!("{name}-secret"), secret);
    format!(
        "\n[[credential]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{extra}\n[credential.genesys]\nlogin_url = \"{u}\"\napi_url = \"{u}\"\nclient_id = \"{id}\"\nclient_secret = {{ file = {file:?} }}\n",
        u = sim.url()
    )
}

/// The org's simulator with the default and reporting clients, and a partner org's.
async fn two_orgs() -> (SimHandle, SimHandle) {
    let org = start_sim(genesys_auth_proxy::sim::SimConfig {
        clients: vec![
            (CLIENT_ID.into(), SECRET.into()),
            (REPORTING_ID.into(), REPORTING_SECRET.into()),
        ],
        ..sim_config()
    })
    .await;
    let partner = start_sim(genesys_auth_proxy::sim::SimConfig {
        clients: vec![(PARTNER_ID.into(), PARTNER_SECRET.into())],
        ..sim_config()
    })
    .await;
    (org, partner)
}

/// The default credential plus `reporting` (same org, `reporting_extra` in its entry) and
/// `partner` (the second org).
async fn start_three(org: &SimHandle, partner: &SimHandle, reporting_extra: &str) -> Proxy {
    let dir = temp_dir("credentials");
    let mut toml = proxy_toml(&org.url(), SECRET, "", "", &dir);
    toml += &credential(
        &dir,
        "reporting",
        org,
        REPORTING_ID,
        REPORTING_SECRET,
        reporting_extra,
    );
    toml += &credential(&dir, "partner", partner, PARTNER_ID, PARTNER_SECRET, "");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    for c in &p.running.credentials {
        c.store
            .wait_valid(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("credential {} acquired no token", c.name));
    }
    p
}

fn url_of(p: &Proxy, name: &str, path: &str) -> String {
    let c = p
        .running
        .credentials
        .iter()
        .find(|c| c.name == name)
        .unwrap();
    format!("http://{}{path}", c.proxy_addr)
}

async fn echo(url: &str) -> Value {
    let r = get(url).await;
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn each_listener_injects_its_own_credentials_token() {
    let (org, partner) = two_orgs().await;
    let p = start_three(&org, &partner, "").await;
    for _ in 0..20 {
        assert_eq!(echo(&p.url("/api/v2/x")).await["client_id"], CLIENT_ID);
        assert_eq!(
            echo(&url_of(&p, "reporting", "/api/v2/x")).await["client_id"],
            REPORTING_ID
        );
        assert_eq!(
            echo(&url_of(&p, "partner", "/api/v2/x")).await["client_id"],
            PARTNER_ID
        );
    }
    // A client's own Authorization never picks another identity.
    let r = client()
        .get(url_of(&p, "reporting", "/api/v2/x"))
        .bearer_auth(sim_token_of(&org, CLIENT_ID).await)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["client_id"], REPORTING_ID);
    assert_eq!(
        stats(&partner).await["api_requests"]["total"].as_u64(),
        Some(21),
        "the partner org saw only the partner's requests (20, and tokens/me validating its token)"
    );
}

/// A token the simulator issued to `client_id`, minted directly.
async fn sim_token_of(sim: &SimHandle, client_id: &str) -> String {
    let secret = if client_id == CLIENT_ID {
        SECRET
    } else {
        REPORTING_SECRET
    };
    let r = mint(sim, client_id, secret).await;
    r.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn admin_reports_every_credential_and_readiness_per_credential() {
    let (org, partner) = two_orgs().await;
    let p = start_three(&org, &partner, "").await;
    let status = get_json(&p.admin("/status")).await;
    let creds = status["credentials"].as_object().unwrap();
    assert_eq!(
        creds.keys().collect::<Vec<_>>(),
        ["default", "partner", "reporting"]
    );
    for (name, c) in creds {
        assert_eq!(c["token"]["valid"], true, "{name}: {status}");
    }
    assert_ne!(
        creds["default"]["token"]["fingerprint"],
        creds["reporting"]["token"]["fingerprint"]
    );
    assert_eq!(
        status["token"], creds["default"]["token"],
        "top level = the default credential"
    );
    for q in [
        "",
        "?credential=default",
        "?credential=reporting",
        "?credential=partner",
    ] {
        assert_eq!(
            get(&p.admin(&format!("/readyz{q}"))).await.status(),
            200,
            "{q}"
        );
    }
    assert_eq!(get(&p.admin("/readyz?credential=nope")).await.status(), 404);
    // Metrics carry the credential label, for every credential.
    echo(&url_of(&p, "reporting", "/api/v2/m")).await;
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_requests_total{code=\"200\",credential=\"reporting\"}"
        ),
        1.0,
        "{m}"
    );
    for name in ["default", "reporting", "partner"] {
        assert_eq!(
            metric(&m, &format!("genesys_proxy_token_requests_total{{outcome=\"success\",credential=\"{name}\"}}")),
            1.0,
            "{name}: {m}"
        );
    }
    assert_eq!(
        m.matches("# TYPE genesys_proxy_requests_total ").count(),
        1,
        "one family"
    );
    // Audit lines name their credential.
    p.running.audit.flush().await;
    let audit = std::fs::read_to_string(p.audit_path()).unwrap();
    for name in ["default", "reporting", "partner"] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"event\":\"TOKEN_ACQUIRED\"")
                    && l.contains(&format!("\"credential\":\"{name}\""))),
            "{name}: {audit}"
        );
    }
    assert!(
        audit.contains(&format!("\"client_id\":\"{PARTNER_ID}\"")),
        "{audit}"
    );
    let verified = genesys_auth_proxy::audit::verify(&p.audit_path());
    assert!(verified.is_ok(), "{verified:?}");
}

#[tokio::test]
async fn revoking_one_clients_tokens_leaves_the_others_untouched() {
    let (org, partner) = two_orgs().await;
    let p = start_three(&org, &partner, "").await;
    let reporting = &p
        .running
        .credentials
        .iter()
        .find(|c| c.name == "reporting")
        .unwrap()
        .store;
    let (default_before, reporting_before) = (
        p.running.store.current().unwrap(),
        reporting.current().unwrap(),
    );
    let r = sim_post(&org, "/__sim/revoke", json!({"client_id": REPORTING_ID})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["revoked"], 1);
    // The reporting request meets a 401 and is replayed with a new reporting token.
    assert_eq!(
        echo(&url_of(&p, "reporting", "/api/v2/after")).await["client_id"],
        REPORTING_ID
    );
    assert_ne!(
        reporting.current().unwrap().fingerprint,
        reporting_before.fingerprint
    );
    // The default credential never noticed.
    assert_eq!(echo(&p.url("/api/v2/after")).await["client_id"], CLIENT_ID);
    assert_eq!(
        p.running.store.current().unwrap().fingerprint,
        default_before.fingerprint
    );
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(
        status["credentials"]["default"]["refresh_count"], 1,
        "{status}"
    );
    assert_eq!(
        status["credentials"]["default"]["counters"]["upstream_unauthorized_total"],
        0
    );
    assert_eq!(
        status["credentials"]["reporting"]["counters"]["upstream_unauthorized_total"],
        1
    );
}

#[tokio::test]
async fn a_failing_credential_does_not_stop_the_others() {
    let (org, partner) = two_orgs().await;
    let dir = temp_dir("credentials-broken");
    let mut toml = proxy_toml(&org.url(), SECRET, "", "", &dir);
    toml += &credential(&dir, "broken", &org, REPORTING_ID, "not-the-secret", "");
    drop(partner);
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    assert_eq!(echo(&p.url("/api/v2/fine")).await["client_id"], CLIENT_ID);
    let r = get(&url_of(&p, "broken", "/api/v2/x")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        get(&p.admin("/readyz?credential=default")).await.status(),
        200
    );
    let all = get(&p.admin("/readyz")).await;
    assert_eq!(all.status(), 503);
    assert!(all.text().await.unwrap().contains("credential broken"));
}

#[tokio::test]
async fn each_listener_keeps_its_own_path_allowlist() {
    let (org, partner) = two_orgs().await;
    let p = start_three(
        &org,
        &partner,
        "allowed_path_prefixes = [\"/api/v2/analytics/\"]",
    )
    .await;
    assert_eq!(
        get(&url_of(&p, "reporting", "/api/v2/users"))
            .await
            .status(),
        403
    );
    assert_eq!(
        echo(&url_of(&p, "reporting", "/api/v2/analytics/q")).await["client_id"],
        REPORTING_ID
    );
    assert_eq!(
        echo(&p.url("/api/v2/users/x")).await["client_id"],
        CLIENT_ID
    );
}

#[tokio::test]
async fn rotating_one_credentials_secret_under_load_on_both_loses_nothing() {
    let (org, partner) = two_orgs().await;
    let p = start_three(&org, &partner, "").await;
    let default_token = p.running.store.current().unwrap();
    let default_load = Load::start(p.url(""), 4);
    let reporting_load = Load::start(url_of(&p, "reporting", ""), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim_post(
        &org,
        &format!("/__sim/clients/{REPORTING_ID}/secrets"),
        json!({"secret": "reporting-next"}),
    )
    .await;
    write_atomic(&p.dir.join("reporting-secret"), "reporting-next\n");
    eventually(
        Duration::from_secs(10),
        "the reporting secret to rotate",
        || async {
            let status = get_json(&p.admin("/status")).await;
            status["credentials"]["reporting"]["refresh_count"].as_u64() == Some(2)
        },
    )
    .await;
    // The old reporting secret is gone at the org: only the new one can mint from now on.
    org.state.remove_secret(REPORTING_ID, REPORTING_SECRET);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent_a, failures_a) = default_load.finish().await;
    let (sent_b, failures_b) = reporting_load.finish().await;
    assert!(sent_a > 20 && sent_b > 20, "{sent_a} {sent_b}");
    assert!(
        failures_a.is_empty() && failures_b.is_empty(),
        "{failures_a:?} {failures_b:?}"
    );
    assert_eq!(
        p.running.store.current().unwrap().fingerprint,
        default_token.fingerprint,
        "the default credential was not touched"
    );
    p.running.audit.flush().await;
    let audit = std::fs::read_to_string(p.audit_path()).unwrap();
    let rotated: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"event\":\"SECRET_ROTATED\""))
        .collect();
    assert_eq!(rotated.len(), 1, "{audit}");
    assert!(
        rotated[0].contains("\"credential\":\"reporting\""),
        "{}",
        rotated[0]
    );
    for secret in [SECRET, REPORTING_SECRET, "reporting-next", PARTNER_SECRET] {
        assert!(!audit.contains(secret), "the audit log holds a secret");
    }
}

#[tokio::test]
async fn a_reload_applies_a_credentials_live_keys_and_reports_a_new_credential() {
    let (org, partner) = two_orgs().await;
    let p = start_three(
        &org,
        &partner,
        "allowed_path_prefixes = [\"/api/v2/analytics/\"]",
    )
    .await;
    assert_eq!(
        get(&url_of(&p, "reporting", "/api/v2/users"))
            .await
            .status(),
        403
    );
    let path = p.dir.join("proxy.toml");
    let mut toml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[\"/api/v2/analytics/\"]", "[\"/api/v2/usage/\"]");
    toml += &credential(&p.dir, "later", &org, REPORTING_ID, REPORTING_SECRET, "");
    write_atomic(&path, &toml);
    let r = client()
        .post(p.admin("/reload"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["outcome"], "partially_applied", "{body}");
    assert_eq!(
        body["applied"],
        json!(["credential.reporting.allowed_path_prefixes"]),
        "{body}"
    );
    assert_eq!(body["restart_required"], json!(["credential"]), "{body}");
    assert_eq!(
        echo(&url_of(&p, "reporting", "/api/v2/usage/q")).await["client_id"],
        REPORTING_ID
    );
    assert_eq!(
        get(&url_of(&p, "reporting", "/api/v2/analytics/q"))
            .await
            .status(),
        403
    );
    assert_eq!(
        p.running.credentials.len(),
        2,
        "a new credential waits for a restart"
    );
}

// Multi-threaded: the in-process simulators must keep serving while the test blocks on the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_live_mints_for_every_credential() {
    let (org, partner) = two_orgs().await;
    let dir = temp_dir("check-credentials");
    let mut toml = proxy_toml(&org.url(), SECRET, "", "", &dir);
    toml += &credential(&dir, "partner", &partner, PARTNER_ID, PARTNER_SECRET, "");
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, &toml).unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_genesys-auth-proxy"))
            .args(["check", "--live", "-c"])
            .arg(&conf)
            .output()
            .unwrap()
    };
    let ok = run();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    for name in ["default", "partner"] {
        assert!(
            stdout.contains(&format!("credential {name}: live: minted and validated")),
            "{stdout}"
        );
    }
    partner.state.remove_secret(PARTNER_ID, PARTNER_SECRET);
    let bad = run();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("credential partner: live check failed"),
        "{stderr}"
    );
    assert!(stderr.contains("invalid_client"), "{stderr}");
}

/// One process, not one per credential: three credentials on `proxy.threads = 2` run two
/// worker threads (each accepting on all three listeners), and `proxy.max_connections` is one
/// cap over every listener, so the credentials' caps cannot add up past the open-file limit.
/// Before, each credential had its own 2 threads (6 in all) and its own cap of 6.
#[tokio::test]
async fn credentials_share_the_process_worker_threads_and_connection_cap() {
    let (org, partner) = two_orgs().await;
    let dir = temp_dir("one-process");
    let mut toml = proxy_toml(
        &org.url(),
        SECRET,
        "threads = 2\nmax_connections = 6",
        "",
        &dir,
    )
    .replace(
        "format = \"text\"\nlevel = \"warn\"",
        "format = \"json\"\nlevel = \"info\"",
    );
    toml += &credential(&dir, "reporting", &org, REPORTING_ID, REPORTING_SECRET, "");
    toml += &credential(&dir, "partner", &partner, PARTNER_ID, PARTNER_SECRET, "");
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, toml).unwrap();
    let mut proc = ProxyProcess::spawn(&conf);
    proc.wait_ready().await;
    let reporting = proc.listener_of("reporting");
    let partner_addr = proc.listener_of("partner");
    assert_eq!(
        proc.threads_named("proxy-"),
        2,
        "worker threads for three credentials"
    );

    // Six idle connections on the default listener fill the process's cap ...
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut tcp = tokio::net::TcpStream::connect(&proc.proxy).await.unwrap();
        use tokio::io::AsyncWriteExt;
        tcp.write_all(b"GET /api/v2/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        held.push(tcp);
    }
    // ... once each is served (it then idles on keep-alive).
    for tcp in &mut held {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 12];
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            &buf, b"HTTP/1.1 200",
            "a connection under the cap is served"
        );
    }
    // So another credential's listener has no room left either.
    for addr in [&reporting, &partner_addr] {
        let r = client()
            .get(format!("http://{addr}/api/v2/echo"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{addr}: the cap is the process's");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "proxy.too_many_connections", "{body}");
    }
    drop(held);
    eventually(Duration::from_secs(5), "room again", || async {
        client()
            .get(format!("http://{reporting}/api/v2/echo"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let (status, _, _) = proc.stop();
    assert!(status.success(), "{status}");
}

/// A rotation stuck at one credential's issuer holds only the reload that asked for it: the
/// config lock is released before the refreshers' answers are awaited, so the next reload
/// (a secret-file event here) is not queued behind it. Decided by order, not by time: the
/// second reload must finish while the first is still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_stuck_at_one_issuer_does_not_hold_the_next_reload() {
    use genesys_auth_proxy::reload::{ReloadOutcome, Trigger};
    let (org, partner) = two_orgs().await;
    let dir = temp_dir("stuck-rotation");
    let mut toml = proxy_toml(&org.url(), SECRET, "", "", &dir);
    let slow = "[credential.token]\nrequest_timeout_ms = 3000";
    toml += &credential(&dir, "partner", &partner, PARTNER_ID, PARTNER_SECRET, slow);
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    p.running.credentials[0]
        .store
        .wait_valid(Duration::from_secs(10))
        .await
        .expect("the partner credential's token");
    // The partner's next token request never answers (until its 3 s request timeout).
    let new = "partner-secret-rotated-31c2";
    let secrets = format!("/__sim/clients/{PARTNER_ID}/secrets");
    sim_post(&partner, &secrets, json!({"secret": new})).await;
    sim_post(
        &partner,
        "/__sim/faults",
        json!({"kind": "timeout", "count": 1}),
    )
    .await;
    write_atomic(&p.dir.join("partner-secret"), &format!("{new}\n"));
    let reloader = p.running.reloader.clone();
    let first = tokio::spawn(async move { reloader.reload(Trigger::AdminApi).await });
    eventually(
        Duration::from_secs(5),
        "the stuck token request",
        || async { stats(&partner).await["token_requests"]["by_outcome"]["timeout"] == 1 },
    )
    .await;
    // The first reload now waits for the partner's refresher; a second one (nothing changed
    // since) gets the config at once.
    let second = p.running.reloader.reload(Trigger::SecretFileChanged).await;
    assert_eq!(second.outcome, ReloadOutcome::Unchanged, "{}", second.body);
    assert!(
        !first.is_finished(),
        "the second reload waited for the first's rotation"
    );
    let first = first.await.unwrap();
    // The stuck attempt timed out: the current secret keeps serving, the new one is retried.
    assert!(
        matches!(
            first.outcome,
            ReloadOutcome::RotationFailed | ReloadOutcome::RotationPending
        ),
        "{}",
        first.body
    );
    assert_eq!(
        echo(&url_of(&p, "partner", "/api/v2/x")).await["client_id"],
        PARTNER_ID
    );
}
