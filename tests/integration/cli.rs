//! The binary itself: `check`, `audit-verify`, `sim --help`, and `run` as a real process with a
//! known secret, grepping every output for the secret and the tokens.

use std::process::Command;

use serde_json::{json, Value};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_genesys-auth-proxy");

#[test]
fn check_accepts_the_shipped_configs_and_names_the_bad_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(BIN)
        .current_dir(root)
        .args([
            "check",
            "-c",
            "conf/genesys-auth-proxy.toml",
            "-c",
            "conf/demo.toml",
        ])
        .env("GENESYS_CLIENT_SECRET", "x")
        .env("GENESYS_DEMO_CLIENT_SECRET", "y")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = temp_dir("check");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[genesys]\nclient_id = \"a\"\nclient_secret = { env = \"X\" }\n[token]\nvalidation = \"sometimes\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&bad)
        .env("X", "s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("token.validation"),
        "{err}"
    );
}

/// `check --keys`: every key with its class and default, from the code, reading no file.
#[test]
fn check_keys_lists_every_key_with_its_class_and_default() {
    let out = std::process::Command::new(BIN)
        .args(["check", "--keys"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let row = |key: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("{key} missing:\n{text}"));
        line.split_whitespace().map(String::from).collect()
    };
    assert_eq!(row("proxy.listen")[1..], ["restart", "127.0.0.1:8080"]);
    assert_eq!(row("proxy.max_connections")[1..], ["restart", "4096"]);
    assert_eq!(row("budget.max_queue_wait_ms")[1..], ["live", "5s"]);
    assert_eq!(row("genesys.client_secret")[1..], ["secret", "-"]);
    assert!(!text.contains("placeholder"), "no secret value is printed");
}

#[test]
fn audit_verify_exit_codes() {
    let dir = temp_dir("verify");
    let log = dir.join("a.jsonl");
    {
        let metrics = std::sync::Arc::new(genesys_auth_proxy::metrics::Metrics::new());
        let a = genesys_auth_proxy::audit::AuditLog::open(
            &genesys_auth_proxy::config::AuditTarget::File(log.clone()),
            "c",
            metrics,
        )
        .unwrap();
        a.record(
            genesys_auth_proxy::audit::AuditEvent::ProxyStarted,
            json!({}),
            None,
        );
        a.record(
            genesys_auth_proxy::audit::AuditEvent::ProxyStopped,
            json!({}),
            None,
        );
    }
    let out = Command::new(BIN)
        .arg("audit-verify")
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success());
    let sealed = std::fs::read_to_string(&log).unwrap();
    let verify = |extra: &[&str]| {
        Command::new(BIN)
            .arg("audit-verify")
            .args(extra)
            .arg(&log)
            .output()
            .unwrap()
    };
    // Cut at the end (the seal gone): refused, unless the log is declared a live one.
    std::fs::write(&log, sealed.lines().next().unwrap().to_string() + "\n").unwrap();
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT SEALED"));
    assert!(verify(&["--open"]).status.success());
    // Empty, and not a regular file: refused.
    std::fs::write(&log, "").unwrap();
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    let out = Command::new(BIN)
        .args(["audit-verify", "/dev/zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = sealed.replace("PROXY_STOPPED", "PROXY_STARTED");
    std::fs::write(&log, text).unwrap();
    let out = Command::new(BIN)
        .arg("audit-verify")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

#[test]
fn sim_help_documents_every_flag() {
    let out = Command::new(BIN).args(["sim", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--client",
        "--token-lifetime-seconds",
        "--token-rate-limit-per-minute",
        "--api-rate-limit-per-minute",
        "--api-rate-limit-window-seconds",
        "--idle-timeout-seconds",
        "--token-format",
    ] {
        assert!(help.contains(flag), "sim --help lacks {flag}:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_never_prints_the_secret_or_a_token() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("leak");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        .replace("format = \"text\"", "format = \"json\"")
        .replace("level = \"warn\"", "level = \"debug\"\naccess_log = true");
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, toml).unwrap();
    let proc = ProxyProcess::spawn(&conf);
    let (proxy, admin) = (proc.proxy.clone(), proc.admin.clone());
    proc.wait_ready().await;

    // Injection, a 401 replay, and a refresh failure followed by a replay.
    assert_eq!(
        get(&format!("http://{proxy}/api/v2/users?pageSize=3"))
            .await
            .status(),
        200
    );
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    let r = client()
        .post(format!("http://{proxy}/api/v2/x"))
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "garbage", "count": 1}),
    )
    .await;
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    assert_eq!(get(&format!("http://{proxy}/api/v2/y")).await.status(), 200);
    let status = get_text(&format!("http://{admin}/status")).await;
    let metrics = get_text(&format!("http://{admin}/metrics")).await;

    // SIGTERM: graceful stop.
    let (exit, seen, stdout) = proc.stop();
    assert!(exit.success(), "exit status {exit:?}");
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains("PROXY_STOPPED"), "{audit}");
    assert!(seen.contains("token acquired"), "logs are captured: {seen}");
    // The access log: one line per request, path without the query string, no header values.
    let access: Vec<Value> = seen
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert!(access.len() >= 3, "{seen}");
    let users = access
        .iter()
        .find(|v| v["path"] == "/api/v2/users")
        .expect("access line for /api/v2/users");
    assert_eq!(users["status"], 200);
    assert_eq!(users["method"], "GET");
    assert!(
        users["correlation_id"]
            .as_str()
            .is_some_and(|c| c.len() == 36),
        "{users}"
    );
    // Neither the access log nor anything else prints the query string (pingora's debug
    // records, which would, are capped at info unless asked for by name).
    let leaked: Vec<&str> = seen.lines().filter(|l| l.contains("pageSize")).collect();
    assert!(leaked.is_empty(), "no query strings in logs: {leaked:?}");
    assert!(
        access.iter().any(|v| v["replayed"] == true),
        "the replayed request is marked"
    );

    let tokens = sim.state.recent_token_values();
    assert!(tokens.len() >= 3, "the run minted several tokens");
    for (name, text) in [
        ("logs", &seen),
        ("stdout", &stdout),
        ("audit", &audit),
        ("status", &status),
        ("metrics", &metrics),
    ] {
        assert!(!text.contains(SECRET), "{name} contains the client secret");
        for t in &tokens {
            assert!(!text.contains(t.as_str()), "{name} contains a token");
        }
    }
    let verify = Command::new(BIN)
        .arg("audit-verify")
        .arg(dir.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

// Multi-threaded: the in-process simulator must keep serving while the test blocks on the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_live_mints_and_validates_one_token() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("check-live");
    let good = dir.join("good.toml");
    std::fs::write(&good, proxy_toml(&sim.url(), SECRET, "", "", &dir)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--live", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("live: minted and validated token sha256:"),
        "{stdout}"
    );
    assert!(!stdout.contains(SECRET));
    let s = stats(&sim).await;
    assert_eq!(s["token_requests"]["by_outcome"]["success"], 1);

    let bad_dir = temp_dir("check-live-bad");
    let bad = bad_dir.join("bad.toml");
    std::fs::write(
        &bad,
        proxy_toml(&sim.url(), "wrong-secret", "", "", &bad_dir),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--live", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid_client"), "{stderr}");
    assert!(!stderr.contains("wrong-secret"));
}

#[tokio::test]
async fn the_sim_command_serves_with_its_flags() {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args([
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--client",
            "cli-client:cli-secret",
            "--token-lifetime-seconds",
            "600",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let r = client()
        .post(format!("{url}/oauth/token"))
        .basic_auth("cli-client", Some("cli-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expires_in"], 600);
    let _ = child.kill();
    let _ = child.wait();

    let out = Command::new(BIN)
        .args(["sim", "--client", "no-colon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ID:SECRET"));
}

// Regression (issue 21): `RUST_LOG=trace` wrote pingora's raw request heads, with the
// injected `authorization: Bearer <token>` and the client's own credential, to stderr.
#[tokio::test]
async fn rust_log_trace_prints_no_bearer_token() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("trace-leak");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        .replace("format = \"text\"", "format = \"json\"");
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, toml).unwrap();
    // RUST_LOG overrides log.level = "warn": the listening line (info) shows it took effect.
    let proc = ProxyProcess::spawn_with_env(&conf, &[("RUST_LOG", "trace")]);
    proc.wait_ready().await;
    let r = client()
        .get(format!("http://{}/api/v2/users/me", proc.proxy))
        .header("authorization", "Bearer client-own-credential-4711")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, seen, stdout) = proc.stop();
    assert!(seen.lines().count() > 20, "trace logging is on: {seen}");
    for text in [&seen, &stdout] {
        assert!(!text.contains("client-own-credential-4711"), "{text}");
        assert!(!text.contains(SECRET));
        for (i, _) in text.match_indices("Bearer ") {
            let after: String = text[i + 7..].chars().take(20).collect();
            assert!(
                !after
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "a bearer token in the logs: Bearer {after}…"
            );
        }
    }
}
