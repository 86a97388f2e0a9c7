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
    let toml = proxy_toml(&sim.url(), SECRET, proxy_extra, token_extra, &dir);
    start_from_toml(&toml, dir).await
}

/// Writes `toml` to `dir/proxy.toml` (where reloads read it) and starts the proxy.
pub async fn start_from_toml(toml: &str, dir: PathBuf) -> Proxy {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let running = app::start(config_from(toml), path).await.unwrap();
    Proxy { running, dir }
}

/// Replaces a file atomically (write a temporary file, rename), as deploy tools do.
pub fn write_atomic(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::rename(&tmp, path).unwrap();
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

pub async fn get(url: &str) -> reqwest::Response {
    client().get(url).send().await.unwrap()
}

pub async fn get_text(url: &str) -> String {
    get(url).await.text().await.unwrap()
}

pub async fn get_json(url: &str) -> Value {
    get(url).await.json().await.unwrap()
}

/// A client for the simulator itself, trusting its certificate when it serves HTTPS.
pub fn sim_client(sim: &SimHandle) -> reqwest::Client {
    let Some(pem) = &sim.cert_pem else {
        return client();
    };
    app::install_crypto_provider();
    let cert = reqwest::Certificate::from_pem(pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([cert])
        .build()
        .unwrap()
}

pub async fn stats(sim: &SimHandle) -> Value {
    sim_client(sim)
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

/// Removes one of the test client's secrets at the simulator (tokens already issued stay valid).
pub async fn sim_delete_secret(sim: &SimHandle, secret: &str) -> reqwest::Response {
    client()
        .delete(format!(
            "{}/__sim/clients/{CLIENT_ID}/secrets/{secret}",
            sim.url()
        ))
        .send()
        .await
        .unwrap()
}

/// Starts a proxy with `pool_size` tokens and waits until all are minted.
pub async fn start_pool(sim: &SimHandle, pool_size: u64) -> Proxy {
    let dir = temp_dir("pool");
    let toml = proxy_toml(
        &sim.url(),
        SECRET,
        "",
        &format!("pool_size = {pool_size}"),
        &dir,
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    eventually(Duration::from_secs(10), "the pool is full", || async {
        token_successes(&stats(sim).await) == pool_size
    })
    .await;
    p
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

/// A steady, bounded stream of requests from several concurrent clients (GET and POST with
/// bodies) against `base`, until stopped. Counts every outcome.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub fn start(base: String, clients: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|i| {
                let stop = stop.clone();
                let base = base.clone();
                tokio::spawn(async move {
                    let c = client();
                    let mut sent = 0u64;
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let body = format!(
                            "client {i} request {sent} {}",
                            "x".repeat((sent % 4096) as usize)
                        );
                        let is_post = sent % 2 == 1;
                        let r = if is_post {
                            c.post(format!("{base}/api/v2/load/{i}"))
                                .body(body.clone())
                                .send()
                                .await
                        } else {
                            c.get(format!("{base}/api/v2/load/{i}")).send().await
                        };
                        sent += 1;
                        match r {
                            Ok(r) if r.status() == 200 => {
                                if is_post {
                                    let v: Value = r.json().await.unwrap_or(Value::Null);
                                    if v["body_sha256"]
                                        != genesys_auth_proxy::fingerprint::sha256_hex(
                                            body.as_bytes(),
                                        )
                                    {
                                        failures
                                            .push(format!("client {i}: body changed in transit"));
                                    }
                                }
                            }
                            Ok(r) => failures.push(format!(
                                "client {i}: HTTP {}: {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Err(e) => failures.push(format!("client {i}: {e}")),
                        }
                        // Pacing keeps the stream steady without saturating two cores.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (sent, failures)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients; returns (requests sent, failure descriptions).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        let mut failures = Vec::new();
        for t in self.tasks {
            let (n, f) = t.await.unwrap();
            sent += n;
            failures.extend(f);
        }
        (sent, failures)
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes (then panics with `what`).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (5 s at most) until the sample `name` reads `value`: gauges set by a periodic tick
/// (the budget's, every second) are not updated on every answer.
pub async fn wait_for_metric(p: &Proxy, name: &str, value: f64) {
    eventually(Duration::from_secs(5), name, || async {
        metric(&metrics_text(p).await, name) == value
    })
    .await;
}

pub async fn metrics_text(p: &Proxy) -> String {
    client()
        .get(p.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The proxy binary running as a child process (real signals), with stderr collected.
pub struct ProxyProcess {
    pub child: std::process::Child,
    /// The config file it runs with.
    pub conf: PathBuf,
    pub proxy: String,
    pub admin: String,
    logs: std::sync::mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub seen: String,
}

impl ProxyProcess {
    /// Starts `genesys-auth-proxy run -c conf` and waits for its "listening" log line (JSON
    /// logs required) to learn the port-0 addresses.
    pub fn spawn(conf: &std::path::Path) -> ProxyProcess {
        Self::spawn_with_env(conf, &[])
    }

    /// [`ProxyProcess::spawn`] with environment variables set.
    pub fn spawn_with_env(conf: &std::path::Path, env: &[(&str, &str)]) -> ProxyProcess {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_genesys-auth-proxy"));
        command.args(["run", "-c"]).arg(conf);
        command.env_remove("RUST_LOG");
        command.envs(env.iter().copied());
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (logs, reader) = lines_of(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let Ok(line) = logs.recv_timeout(Duration::from_secs(30)) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the proxy never logged its listening line:\n{seen}");
            };
            seen.push_str(&line);
            seen.push('\n');
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "genesys-auth-proxy listening" {
                    let proxy = v["proxy"].as_str().unwrap().to_string();
                    let admin = v["admin"].as_str().unwrap().to_string();
                    return ProxyProcess {
                        child,
                        conf: conf.to_path_buf(),
                        proxy,
                        admin,
                        logs,
                        reader: Some(reader),
                        seen,
                    };
                }
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        send_signal(&self.child, sig);
    }

    /// The proxy listener of the credential `name`, from its "listening" log line (bounded).
    pub fn listener_of(&mut self, name: &str) -> String {
        let of = |line: &str| {
            let v: Value = serde_json::from_str(line).ok()?;
            let ours = v["message"] == "genesys-auth-proxy listening" && v["credential"] == name;
            ours.then(|| v["proxy"].as_str().unwrap_or_default().to_string())
        };
        if let Some(addr) = self.seen.lines().find_map(of) {
            return addr;
        }
        loop {
            let line = self
                .logs
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no listening line for {name}:\n{}", self.seen));
            self.seen.push_str(&line);
            self.seen.push('\n');
            if let Some(addr) = of(&line) {
                return addr;
            }
        }
    }

    /// The process's threads whose names start with `prefix` (Linux `/proc`).
    pub fn threads_named(&self, prefix: &str) -> usize {
        let dir = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.starts_with(prefix))
            .count()
    }

    pub async fn wait_ready(&self) {
        let c = client();
        let url = format!("http://{}/readyz", self.admin);
        eventually(Duration::from_secs(10), "readiness", || {
            let c = c.clone();
            let url = url.clone();
            async move { c.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }

    /// SIGTERM, wait for exit, and return (exit status, all stderr, all stdout).
    pub fn stop(mut self) -> (std::process::ExitStatus, String, String) {
        use std::io::Read;
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let mut seen = std::mem::take(&mut self.seen);
        for l in self.logs.try_iter() {
            seen.push_str(&l);
            seen.push('\n');
        }
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        (status, seen, stdout)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample (`name` including labels) in Prometheus text, 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Sends `sig` (e.g. "HUP", "STOP") to a child process.
fn send_signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// Spawns our binary with stdout piped, `stderr` as given and no `RUST_LOG`.
fn spawn_quiet(
    command: &mut std::process::Command,
    stderr: std::process::Stdio,
) -> std::process::Child {
    command
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Reads `stream` line by line on a thread of its own (so the child never blocks on a full
/// pipe) and hands the lines over a channel.
fn lines_of(
    stream: impl std::io::Read + Send + 'static,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (rx, reader)
}

/// The simulator binary as a child process (so tests can SIGSTOP it), on a port-0 listener.
pub struct SimProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl SimProcess {
    /// Starts `genesys-auth-proxy sim` with `args` and reads its "listening on URL" line.
    pub fn spawn(args: &[&str]) -> SimProcess {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_genesys-auth-proxy"));
        command.args(["sim", "--listen", "127.0.0.1:0"]).args(args);
        let mut child = spawn_quiet(&mut command, std::process::Stdio::null());
        let rx = lines_of(child.stdout.take().unwrap()).0;
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the simulator printed no listening line");
        let url = line
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http"))
            .unwrap_or_else(|| panic!("unexpected simulator line: {line}"))
            .to_string();
        SimProcess { child, url }
    }

    pub fn signal(&self, sig: &str) {
        send_signal(&self.child, sig);
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process in KiB (Linux), 0 when unknown.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A real `redis-server` (the Debian package) on a free loopback port with its own temporary
/// directory, no persistence; killed on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer {
            child: None,
            port,
            dir: temp_dir(&format!("redis-{port}")),
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills the server outright (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Connected clients besides the one asking (`CLIENT LIST`).
    pub fn clients(&self) -> usize {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
        list.lines().count().saturating_sub(1)
    }

    /// Every key and its value (for checks that no token is stored in the clear).
    pub fn dump(&self) -> Vec<(String, String)> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
        keys.into_iter()
            .map(|k| {
                let v: Option<String> = redis::cmd("GET").arg(&k).query(&mut c).unwrap_or(None);
                (k, v.unwrap_or_default())
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Kubernetes secret volume: `dir/<name> -> ..data/<name>`, `..data -> ..<stamp>`.
pub fn k8s_volume(dir: &std::path::Path, name: &str, stamp: &str, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    let data = dir.join(format!("..{stamp}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(name), contents).unwrap();
    std::fs::set_permissions(data.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).unwrap();
    // The kubelet's AtomicWriter: rename the new symlink over `..data`, then drop the old dir.
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join(name);
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
    }
}

/// `POST /reload` as an operator sends it: its status and JSON answer.
pub async fn post_reload(p: &Proxy) -> (u16, Value) {
    let r = client()
        .post(p.admin("/reload"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Every audit line written so far, parsed.
pub async fn audit_events(p: &Proxy) -> Vec<Value> {
    p.running.audit.flush().await;
    std::fs::read_to_string(p.audit_path())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A real `tinyproxy` (the Debian package), an HTTP forward proxy with CONNECT, on a free
/// loopback port with its own log file; killed on drop.
pub struct TinyProxy {
    child: std::process::Child,
    pub port: u16,
    pub log: PathBuf,
}

impl TinyProxy {
    /// `extra` is appended to its configuration (e.g. `BasicAuth user pass`, `ConnectPort 443`).
    pub fn start(extra: &str) -> TinyProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = temp_dir(&format!("tinyproxy-{port}"));
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\nMaxClients 200\nAllow 127.0.0.1\nDisableViaHeader Yes\n{extra}\n",
                log.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (.ci/run installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tinyproxy did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TinyProxy { child, port, log }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CONNECT requests it logged for `target` (`host:port`).
    pub fn connects_to(&self, target: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("CONNECT") && l.contains(target))
            .count()
    }
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
