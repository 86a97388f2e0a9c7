//! The binary itself: `check`, `audit-verify`, `sim --help`, and `run` as a real process with a
//! known secret, grepping every output for the secret and the tokens.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

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
        a.record("PROXY_STARTED", json!({}), None);
        a.record("PROXY_STOPPED", json!({}), None);
    }
    let out = Command::new(BIN)
        .arg("audit-verify")
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&log)
        .unwrap()
        .replace("PROXY_STOPPED", "PROXY_STARTED");
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
        "--idle-timeout-seconds",
        "--token-format",
    ] {
        assert!(help.contains(flag), "sim --help lacks {flag}:\n{help}");
    }
}

/// Reads stderr JSON lines until the "listening" line and returns (proxy, admin) addresses.
fn listening_addrs(
    lines: &mut impl Iterator<Item = String>,
    seen: &mut String,
) -> (String, String) {
    for line in lines {
        seen.push_str(&line);
        seen.push('\n');
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["message"] == "genesys-auth-proxy listening" {
                return (
                    v["proxy"].as_str().unwrap().to_string(),
                    v["admin"].as_str().unwrap().to_string(),
                );
            }
        }
    }
    panic!("the proxy never logged its listening line:\n{seen}");
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
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&conf)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let (proxy, admin) = {
        let mut it = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(20)).ok());
        listening_addrs(&mut it, &mut seen)
    };

    let c = client();
    // Wait (bounded) for readiness, then exercise injection, a 401 replay and a refresh failure.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(std::time::Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.get(format!("http://{proxy}/api/v2/users?pageSize=3"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    assert_eq!(
        c.post(format!("http://{proxy}/api/v2/x"))
            .body("b")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "garbage", "count": 1}),
    )
    .await;
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    assert_eq!(
        c.get(format!("http://{proxy}/api/v2/y"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let status = c
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = c
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // SIGTERM: graceful stop.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    reader.join().unwrap();
    seen.extend(rx.try_iter().map(|l| l + "\n"));
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
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
