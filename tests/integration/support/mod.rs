//! Starting the simulator and the proxy on port 0, and small HTTP helpers.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use genesys_auth_proxy::app::{self, Running};
use genesys_auth_proxy::config::{self, Config};
use genesys_auth_proxy::sim::{self, SimConfig, SimHandle};
use serde_json::Value;

pub const CLIENT_ID: &str = "test-client";
pub const SECRET: &str = "test-secret-2f9c8e1d7b6a";

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gap-it-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the simulator on 127.0.0.1:0 with the test client registered.
pub async fn start_sim(mut cfg: SimConfig) -> SimHandle {
    if cfg.clients.is_empty() {
        cfg.clients.push((CLIENT_ID.into(), SECRET.into()));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::start(cfg, listener).unwrap()
}

pub fn sim_config() -> SimConfig {
    SimConfig::default()
}

/// TOML for a proxy in front of `sim_url`, listeners on port 0, secret in a 0600 file.
/// `extra` is appended as further sections/keys (e.g. "[token]\nvalidation = \"none\"").
pub fn proxy_toml(
    sim_url: &str,
    secret: &str,
    proxy_extra: &str,
    token_extra: &str,
    dir: &std::path::Path,
) -> String {
    let secret_file = dir.join("client-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
shutdown_grace_seconds = 5
{proxy_extra}

[admin]
listen = "127.0.0.1:0"

[genesys]
login_url = "{sim_url}"
api_url = "{sim_url}"
client_id = "{CLIENT_ID}"
client_secret = {{ file = {secret_file:?} }}

[token]
backoff_initial_ms = 50
backoff_max_ms = 400
{token_extra}

[audit]
path = {audit:?}

[log]
format = "text"
level = "warn"
"#,
        audit = dir.join("audit.jsonl").display().to_string(),
    )
}

pub fn config_from(toml: &str) -> Config {
    config::parse(toml, std::path::Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// A started proxy plus what tests need to inspect it.
pub struct Proxy {
    pub running: Running,
    pub dir: PathBuf,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.proxy_addr)
    }
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.admin_addr)
    }
    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
    /// Waits (bounded) until the proxy holds a valid token.
    pub async fn ready(&self) {
        self.running
            .store
            .wait_valid(Duration::from_secs(10))
            .await
            .expect("proxy acquired no token within 10 s");
    }
}

pub async fn start_proxy_with(sim: &SimHandle, proxy_extra: &str, token_extra: &str) -> Proxy {
    let dir = temp_dir("proxy");
    let cfg = config_from(&proxy_toml(
        &sim.url(),
        SECRET,
        proxy_extra,
        token_extra,
        &dir,
    ));
    let running = app::start(cfg).await.unwrap();
    Proxy { running, dir }
}

pub async fn start_proxy(sim: &SimHandle) -> Proxy {
    let p = start_proxy_with(sim, "", "").await;
    p.ready().await;
    p
}

pub fn client() -> reqwest::Client {
    app::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(2000)
        .build()
        .unwrap()
}

pub async fn stats(sim: &SimHandle) -> Value {
    client()
        .get(format!("{}/__sim/stats", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn sim_post(sim: &SimHandle, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

pub async fn sim_put(sim: &SimHandle, path: &str, body: Value) -> reqwest::Response {
    client()
        .put(format!("{}{path}", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Runs the client-credentials grant against the simulator directly.
pub async fn mint(sim: &SimHandle, id: &str, secret: &str) -> reqwest::Response {
    client()
        .post(format!("{}/oauth/token", sim.url()))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
}

pub async fn mint_token(sim: &SimHandle) -> String {
    let v: Value = mint(sim, CLIENT_ID, SECRET).await.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

pub fn token_successes(stats: &Value) -> u64 {
    stats["token_requests"]["by_outcome"]["success"]
        .as_u64()
        .unwrap_or(0)
}
