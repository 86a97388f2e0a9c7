//! Egress through a real corporate forward proxy (`tinyproxy`, started by the test): the
//! token endpoint and the API path both go through its CONNECT tunnel, TLS to the simulator
//! inside it with certificate checks unchanged; a refusal is a clear 502; no secret or token
//! reaches the forward proxy's log.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const PROXY_USER: &str = "egress-user";
const PROXY_PASSWORD: &str = "egress-pw-7c1e55d0a4";

/// A proxy config in front of the HTTPS simulator `sim`, through `egress`, with the login host
/// spelled `login_host` (`127.0.0.1` or `localhost`, both in the simulator's certificate).
fn egress_toml(
    sim: &genesys_auth_proxy::sim::SimHandle,
    dir: &std::path::Path,
    egress: &str,
    login_host: &str,
) -> String {
    let ca = dir.join("sim-ca.pem");
    std::fs::write(&ca, sim.cert_pem.as_ref().unwrap()).unwrap();
    let pw = dir.join("egress-password");
    std::fs::write(&pw, format!("{PROXY_PASSWORD}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = sim.addr.port();
    proxy_toml(&sim.url(), SECRET, "", "", dir)
        .replace(
            &format!("login_url = \"{}\"", sim.url()),
            &format!("login_url = \"https://{login_host}:{port}\""),
        )
        .replace(
            "[token]",
            &format!(
                "ca_file = {ca:?}\negress_proxy = \"{egress}\"\negress_proxy_username = \"{PROXY_USER}\"\negress_proxy_password = {{ file = {pw:?} }}\n\n[token]"
            ),
        )
}

fn tls_sim() -> genesys_auth_proxy::sim::SimConfig {
    genesys_auth_proxy::sim::SimConfig {
        tls: true,
        ..sim_config()
    }
}

#[tokio::test]
async fn token_and_api_calls_go_through_the_forward_proxy_and_leak_nothing_to_it() {
    let tiny = TinyProxy::start(&format!("BasicAuth {PROXY_USER} {PROXY_PASSWORD}"));
    let sim = start_sim(tls_sim()).await;
    let dir = temp_dir("egress");
    let toml = egress_toml(&sim, &dir, &tiny.url(), "127.0.0.1");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let target = format!("127.0.0.1:{}", sim.addr.port());
    let c = client();
    for _ in 0..5 {
        let r = c
            .get(p.url("/api/v2/organizations/me"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .post(p.url("/api/v2/conversations/messages"))
        .body("hello")
        .send()
        .await
        .unwrap();
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(
        echoed["host"], target,
        "Host is the API host inside the tunnel"
    );
    // The mint (and its tokens/me check) and the API connection each opened a tunnel.
    eventually(
        Duration::from_secs(5),
        "tinyproxy logged the tunnels",
        || async { tiny.connects_to(&target) >= 2 },
    )
    .await;
    let log = tiny.log_text();
    assert!(
        !log.contains(SECRET),
        "the client secret reached the forward proxy's log"
    );
    assert!(!log.contains(PROXY_PASSWORD));
    for token in sim.state.recent_token_values() {
        assert!(
            !log.contains(&token),
            "a token reached the forward proxy's log"
        );
    }
    // Nothing bypassed it: without the forward proxy, nothing works.
    drop(tiny);
    sim.state.revoke_all(None);
    let r = client()
        .get(p.url("/api/v2/users"))
        .header("connection", "close")
        .send()
        .await
        .unwrap();
    assert!([502, 503].contains(&r.status().as_u16()), "{}", r.status());
}

#[tokio::test]
async fn a_forward_proxy_refusal_is_upstream_unreachable_with_the_reason_in_the_log() {
    // This forward proxy tunnels to port 443 only: the API tunnel is refused. NO_PROXY sends
    // the login host (spelled localhost) around it, so the proxy still holds a token.
    let tiny = TinyProxy::start(&format!(
        "BasicAuth {PROXY_USER} {PROXY_PASSWORD}\nConnectPort 443"
    ));
    let sim = start_sim(tls_sim()).await;
    let dir = temp_dir("egress-refused");
    // The tokens/me check goes to the API host, which this forward proxy refuses.
    let toml = egress_toml(&sim, &dir, &tiny.url(), "localhost")
        .replace("[token]\n", "[token]\nvalidation = \"none\"\n")
        .replace("format = \"text\"", "format = \"json\"")
        .replace("level = \"warn\"", "level = \"info\"");
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, &toml).unwrap();
    let proc = ProxyProcess::spawn_with_env(&conf, &[("NO_PROXY", "localhost")]);
    proc.wait_ready().await;
    let r = client()
        .get(format!("http://{}/api/v2/users", proc.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "proxy.upstream_unreachable");
    let (_, logs, stdout) = proc.stop();
    assert!(
        logs.contains("egress proxy") && logs.contains("refused"),
        "the reason is logged:\n{logs}"
    );
    for out in [&logs, &stdout, &tiny.log_text()] {
        assert!(!out.contains(SECRET));
        assert!(!out.contains(PROXY_PASSWORD));
    }
}

#[tokio::test]
async fn egress_settings_are_checked_and_name_the_key() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("egress-check");
    let base = proxy_toml(&sim.url(), SECRET, "", "", &dir);
    let with = |line: &str| base.replace("[token]", &format!("{line}\n\n[token]"));
    let cases = [
        ("egress_proxy = \"https://proxy:3128\"", "genesys.egress_proxy", "scheme"),
        ("egress_proxy = \"http://user:pw@proxy:3128\"", "genesys.egress_proxy", "credentials"),
        ("egress_proxy = \"http://proxy:3128/path\"", "genesys.egress_proxy", "no path"),
        ("egress_proxy_username = \"u\"", "genesys.egress_proxy", "required"),
        (
            "egress_proxy = \"http://proxy:3128\"\negress_proxy_password = { env = \"GAP_NO_SUCH_VAR\" }",
            "genesys.egress_proxy_password",
            "egress_proxy_username",
        ),
    ];
    for (line, key, words) in cases {
        let e = genesys_auth_proxy::config::parse(&with(line), std::path::Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(words), "{line}: {e}");
    }
    let ok = config_from(&with("egress_proxy = \"http://proxy.internal:3128\""));
    let egress = ok.top().restart.genesys.egress.as_ref().unwrap();
    assert_eq!(
        (egress.host.as_str(), egress.port),
        ("proxy.internal", 3128)
    );
}
