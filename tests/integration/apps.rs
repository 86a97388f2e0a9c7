//! `[[app]]`: callers prove who they are (their own client-credentials login against the
//! proxy, or an API key), are held to their methods and paths, are routed to their credential,
//! share the budget by weight, and a reload changes them in place. Independent clients (the
//! official Python and JS SDKs) are in `sdk.rs`.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

pub const TOKEN_KEY: &str = "app-token-key-0123456789abcdef-0123456789abcdef";
pub const BILLING_SECRET: &str = "billing-secret-7f3a9c2e41d8";
pub const OPS_KEY: &str = "ops-api-key-5b8e2d7c91f4a6";
pub const OPS_KEY_2: &str = "ops-api-key-second-3c7d9e1a";

pub fn sha_hex(s: &str) -> String {
    genesys_auth_proxy::fingerprint::sha256_hex(s.as_bytes())
}

/// Writes a 0600 file in `dir`.
pub fn secret_file(dir: &std::path::Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    write_atomic(&path, &format!("{contents}\n"));
    path
}

/// `[apps]` with the token key, and two apps: `billing` logs in (analytics and users, GET and
/// POST) and `ops` uses API keys (everything under /api/v2/).
pub fn apps_section(dir: &std::path::Path, extra_apps: &str, lifetime: u64) -> String {
    let key = secret_file(dir, "app-token-key", TOKEN_KEY);
    let billing = secret_file(dir, "billing-secret", BILLING_SECRET);
    format!(
        r#"
[apps]
token_key = {{ file = {key:?} }}
token_lifetime_seconds = {lifetime}
max_auth_failures_per_minute = 20

[[app]]
name = "billing"
client_id = "billing-app"
client_secret = {{ file = {billing:?} }}
allowed_methods = ["GET", "POST"]
allowed_path_prefixes = ["/api/v2/analytics/", "/api/v2/users", "/api/v2/organizations/"]
weight = 2

[[app]]
name = "ops"
api_key_sha256 = ["{ops}", "{ops2}"]
{extra_apps}
"#,
        ops = sha_hex(OPS_KEY),
        ops2 = sha_hex(OPS_KEY_2),
    )
}

async fn apps_proxy(sim: &genesys_auth_proxy::sim::SimHandle, extra: &str) -> Proxy {
    let dir = temp_dir("apps");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir) + &apps_section(&dir, extra, 3600);
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    p
}

/// The SDKs' login: Basic auth and the form, at the proxy.
pub async fn login(base: &str, id: &str, secret: &str) -> reqwest::Response {
    client()
        .post(format!("{base}/oauth/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
}

async fn call(
    p: &Proxy,
    method: reqwest::Method,
    path: &str,
    bearer: Option<&str>,
) -> reqwest::Response {
    let mut r = client().request(method, p.url(path));
    if let Some(b) = bearer {
        r = r.bearer_auth(b);
    }
    r.send().await.unwrap()
}

async fn code_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["code"].as_str().unwrap_or("").to_string())
}

/// The status of a GET with `bearer`.
async fn status_of(p: &Proxy, path: &str, bearer: &str) -> u16 {
    call(p, reqwest::Method::GET, path, Some(bearer))
        .await
        .status()
        .as_u16()
}

/// Logs in and returns the proxy token.
pub async fn token_of(base: &str, id: &str, secret: &str) -> String {
    let v: Value = login(base, id, secret).await.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

fn api_total(s: &Value) -> u64 {
    s["api_requests"]["total"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn an_app_logs_in_at_the_proxy_and_is_held_to_its_methods_and_paths() {
    let sim = start_sim(sim_config()).await;
    let p = apps_proxy(&sim, "").await;
    let before = api_total(&stats(&sim).await);

    // Without a proof: 401, and Genesys sees nothing.
    let r = call(&p, reqwest::Method::GET, "/api/v2/users", None).await;
    assert_eq!(
        r.headers()["www-authenticate"].to_str().unwrap(),
        "Bearer realm=\"genesys-auth-proxy\""
    );
    assert_eq!(code_of(r).await, (401, "proxy.unauthenticated".into()));

    // A wrong secret gets Genesys's invalid_client.
    let r = login(
        &format!("http://{}", p.running.proxy_addr),
        "billing-app",
        "wrong",
    )
    .await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_client");

    // The right one: a proxy token in Genesys's shape.
    let r = login(
        &format!("http://{}", p.running.proxy_addr),
        "billing-app",
        BILLING_SECRET,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["expires_in"], 3600);
    let token = v["access_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("gap1."), "{token}");
    assert_eq!(
        api_total(&stats(&sim).await),
        before,
        "no login reaches Genesys"
    );

    // Within its paths: forwarded with the Genesys token, never with the app's.
    let r = call(
        &p,
        reqwest::Method::GET,
        "/api/v2/analytics/reports",
        Some(&token),
    )
    .await;
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(
        echo["client_id"], CLIENT_ID,
        "the Genesys token was injected"
    );
    let s = stats(&sim).await;
    let by_token = s["api_requests"]["by_token"].as_object().unwrap();
    let app_fp = genesys_auth_proxy::fingerprint::fingerprint(token.as_bytes());
    assert!(
        !by_token.contains_key(&app_fp),
        "the proxy token reached Genesys"
    );

    // Outside them: 403, not forwarded.
    let before = api_total(&stats(&sim).await);
    for (method, path) in [
        (reqwest::Method::GET, "/api/v2/routing/queues"),
        (reqwest::Method::DELETE, "/api/v2/analytics/reports"),
    ] {
        let r = call(&p, method, path, Some(&token)).await;
        assert_eq!(code_of(r).await, (403, "proxy.app_not_allowed".into()));
    }
    assert_eq!(api_total(&stats(&sim).await), before);

    // An API-key app: both keys work, a guessed key and malformed headers do not.
    for key in [OPS_KEY, OPS_KEY_2] {
        let r = call(
            &p,
            reqwest::Method::GET,
            "/api/v2/routing/queues",
            Some(key),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    for bad in [
        "Bearer not-a-key",
        "Bearer",
        "Token abc",
        "Bearer a b",
        "Basic b3BzOng=",
    ] {
        let r = client()
            .get(p.url("/api/v2/routing/queues"))
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(
            code_of(r).await,
            (401, "proxy.unauthenticated".into()),
            "{bad}"
        );
    }

    let m = metrics_text(&p).await;
    assert!(
        metric(
            &m,
            "genesys_proxy_app_requests_total{app=\"billing\",outcome=\"allowed\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_app_requests_total{app=\"billing\",outcome=\"not_allowed\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_app_requests_total{app=\"ops\",outcome=\"allowed\"}"
        ),
        2.0
    );
    assert!(
        metric(
            &m,
            "genesys_proxy_app_requests_total{app=\"unknown\",outcome=\"unauthenticated\"}"
        ) >= 6.0
    );
    assert_eq!(
        metric(&m, "genesys_proxy_app_auth_failures_total{proof=\"login\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_app_auth_failures_total{proof=\"missing\"}"
        ),
        1.0
    );

    let status = get_json(&p.admin("/status")).await;
    let apps = &status["apps"]["apps"];
    assert_eq!(apps[0]["name"], "billing");
    assert_eq!(apps[0]["proofs"][0], "client_credentials");
    assert_eq!(apps[1]["api_keys"], 2);

    // The audit log has the login (fingerprint only) and the failures, aggregated.
    let events = audit_events(&p).await;
    let issued: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "APP_TOKEN_ISSUED")
        .collect();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0]["token"], app_fp.as_str());
    assert_eq!(issued[0]["details"]["app"], "billing");
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "APP_AUTH_FAILED")
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "one line per source per minute: {failed:?}"
    );
    assert_eq!(failed[0]["details"]["source"], "127.0.0.1");

    // Nothing an app proves itself with appears anywhere the proxy writes.
    let audit = std::fs::read_to_string(p.audit_path()).unwrap();
    let status = get_text(&p.admin("/status")).await;
    for (what, text) in [("audit", &audit), ("metrics", &m), ("status", &status)] {
        for secret in [
            BILLING_SECRET,
            OPS_KEY,
            OPS_KEY_2,
            TOKEN_KEY,
            token.as_str(),
        ] {
            assert!(!text.contains(secret), "{what} contains a secret");
        }
    }
    p.running.shutdown().await;
}

#[tokio::test]
async fn failed_proofs_from_one_address_are_throttled_and_cost_nothing_upstream() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("apps-throttle");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        + &apps_section(&dir, "", 3600)
            .replace("failures_per_minute = 20", "failures_per_minute = 5");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let before = api_total(&stats(&sim).await);
    for i in 0..5 {
        let r = call(
            &p,
            reqwest::Method::GET,
            "/api/v2/x",
            Some(&format!("guess-{i}")),
        )
        .await;
        assert_eq!(r.status(), 401);
    }
    // The limit (5 a minute) is reached: even a valid key is refused unchecked, and so is a
    // login.
    let r = call(&p, reqwest::Method::GET, "/api/v2/x", Some(OPS_KEY)).await;
    assert_eq!(r.headers()["retry-after"], "60");
    assert_eq!(code_of(r).await, (429, "proxy.auth_throttled".into()));
    let r = login(
        &format!("http://{}", p.running.proxy_addr),
        "billing-app",
        BILLING_SECRET,
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("rate limit exceeded"),
        "{v}"
    );
    assert_eq!(api_total(&stats(&sim).await), before);
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_app_auth_failures_total{proof=\"api_key\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_app_auth_failures_total{proof=\"throttled\"}"
        ),
        2.0
    );
    let events = audit_events(&p).await;
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "APP_AUTH_FAILED")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    // The failures after that line are written at shutdown, not lost.
    let audit = p.audit_path();
    p.running.shutdown().await;
    let lines: Vec<Value> = std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["event"] == "APP_AUTH_FAILED")
        .collect();
    let total: u64 = lines
        .iter()
        .map(|e| e["details"]["failures"].as_u64().unwrap())
        .sum();
    assert_eq!((lines.len(), total), (2, 5), "{lines:?}");
    assert_eq!(lines[1]["details"]["throttled"], true);
}

#[tokio::test]
async fn an_app_is_routed_to_its_credential_from_any_listener() {
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        clients: vec![
            (CLIENT_ID.into(), SECRET.into()),
            ("partner-client".into(), "partner-secret".into()),
        ],
        ..sim_config()
    })
    .await;
    let dir = temp_dir("apps-route");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        + &crate::credentials::credential(
            &dir,
            "partner",
            &sim,
            "partner-client",
            "partner-secret",
            "",
        )
        + &apps_section(
            &dir,
            &format!(
                "\n[[app]]\nname = \"partner-app\"\ncredential = \"partner\"\napi_key_sha256 = [\"{}\"]\n",
                sha_hex("partner-key")
            ),
            3600,
        );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    p.running.credentials[0]
        .store
        .wait_valid(Duration::from_secs(10))
        .await
        .unwrap();
    let partner_listener = format!("http://{}", p.running.credentials[0].proxy_addr);
    for base in [
        format!("http://{}", p.running.proxy_addr),
        partner_listener.clone(),
    ] {
        for (key, client_id) in [("partner-key", "partner-client"), (OPS_KEY, CLIENT_ID)] {
            let r = client()
                .get(format!("{base}/api/v2/echo"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let echo: Value = r.json().await.unwrap();
            assert_eq!(echo["client_id"], client_id, "{key} through {base}");
        }
    }
    // The partner listener asks for a proof too.
    let r = get(&format!("{partner_listener}/api/v2/echo")).await;
    assert_eq!(r.status(), 401);
    p.running.shutdown().await;
}

#[tokio::test]
async fn a_reload_adds_removes_and_rotates_apps_in_place() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("apps-reload");
    let base_toml = proxy_toml(&sim.url(), SECRET, "", "", &dir);
    let toml = base_toml.clone() + &apps_section(&dir, "", 3600);
    let p = start_from_toml(&toml, dir.clone()).await;
    p.ready().await;
    let proxy = format!("http://{}", p.running.proxy_addr);
    let token = token_of(&proxy, "billing-app", BILLING_SECRET).await;
    assert_eq!(status_of(&p, "/api/v2/users", &token).await, 200);

    // The secret file is rotated: the watcher reloads, the old token is revoked at once, the
    // new secret logs in.
    write_atomic(&dir.join("billing-secret"), "billing-secret-rotated\n");
    eventually(
        Duration::from_secs(10),
        "the old token is refused",
        || async { status_of(&p, "/api/v2/users", &token).await == 401 },
    )
    .await;
    assert_eq!(
        login(&proxy, "billing-app", BILLING_SECRET).await.status(),
        401
    );
    let token2 = token_of(&proxy, "billing-app", "billing-secret-rotated").await;
    assert_eq!(status_of(&p, "/api/v2/users", &token2).await, 200);

    // `ops` loses its first key and a new app appears.
    let new_app = format!(
        "\n[[app]]\nname = \"reports\"\napi_key_sha256 = [\"{}\"]\nallowed_methods = [\"GET\"]\n",
        sha_hex("reports-key")
    );
    let section = apps_section(&dir, &new_app, 3600)
        .replace("billing-secret-7f3a9c2e41d8", "unused")
        .replace(&format!("\"{}\", ", sha_hex(OPS_KEY)), "");
    write_atomic(&dir.join("billing-secret"), "billing-secret-rotated\n");
    write_atomic(&dir.join("proxy.toml"), &(base_toml.clone() + &section));
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == "app"),
        "{body}"
    );
    assert_eq!(status_of(&p, "/api/v2/x", OPS_KEY).await, 401);
    assert_eq!(status_of(&p, "/api/v2/x", OPS_KEY_2).await, 200);
    assert_eq!(status_of(&p, "/api/v2/x", "reports-key").await, 200);
    assert_eq!(status_of(&p, "/api/v2/users", &token2).await, 200);

    // Removing billing refuses its live token on the next request.
    let only_ops = section
        .split("[[app]]\nname = \"billing\"")
        .next()
        .unwrap()
        .to_string()
        + "[[app]]"
        + section.split("[[app]]").nth(2).unwrap();
    write_atomic(&dir.join("proxy.toml"), &(base_toml + &only_ops));
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(status_of(&p, "/api/v2/users", &token2).await, 401);
    assert_eq!(status_of(&p, "/api/v2/x", OPS_KEY_2).await, 200);
    let m = metrics_text(&p).await;
    assert!(
        !m.contains("app_requests_total{app=\"billing\""),
        "a removed app's series go"
    );
    p.running.shutdown().await;
}

/// What one app saw while flooding: answers that came back before `until` (the queue's
/// drain after it, served in whatever order is left, is not a share).
async fn flood(
    base: String,
    key: &'static str,
    loops: usize,
    until: std::time::Instant,
) -> (u64, u64) {
    let c = client();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (c, base) = (c.clone(), base.clone());
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0, 0);
                while std::time::Instant::now() < until {
                    let answer = c
                        .get(format!("{base}/api/v2/share"))
                        .bearer_auth(key)
                        .send()
                        .await;
                    let in_time = std::time::Instant::now() < until;
                    match answer {
                        Ok(r) if r.status() == 200 => ok += u64::from(in_time),
                        Ok(r) if r.status() == 429 => {
                            let body: Value = r.json().await.unwrap_or(Value::Null);
                            assert!(
                                body["message"].as_str().unwrap_or("").contains("for app"),
                                "the proxy's 429 names the app: {body}"
                            );
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        _ => {}
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let mut total = (0, 0);
    for t in tasks {
        let (ok, refused) = t.await.unwrap();
        total = (total.0 + ok, total.1 + refused);
    }
    total
}

/// Two apps flood one token's budget (L calls per 2 s window): they are served in the ratio
/// of their weights (3:1; measured 2.8-2.9, the shortfall is the start, when neither has used
/// anything), and an unauthenticated client costs none of it. `SHARE_SECONDS` (8) and
/// `SHARE_LOOPS` (senders per app, 8) size a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_contending_for_one_token_are_served_by_weight() {
    const L: u64 = 40;
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        api_rate_limit_per_minute: L,
        api_rate_limit_window: Duration::from_secs(2),
        ..sim_config()
    })
    .await;
    let dir = temp_dir("apps-weight");
    let apps = format!(
        "\n[[app]]\nname = \"heavy\"\nweight = 3\napi_key_sha256 = [\"{}\"]\n[[app]]\nname = \"light\"\nweight = 1\napi_key_sha256 = [\"{}\"]\n",
        sha_hex("heavy-key"),
        sha_hex("light-key")
    );
    let toml = proxy_toml(&sim.url(), SECRET, "", "validation = \"none\"", &dir).replace(
        "[audit]",
        &format!("[budget]\nrequests_per_window = {L}\nwindow_seconds = 2\nmax_queue_wait_ms = 4000\n\n[audit]"),
    ) + &apps_section(&dir, &apps, 3600);
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let base = format!("http://{}", p.running.proxy_addr);
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (seconds, loops) = (env("SHARE_SECONDS", 8), env("SHARE_LOOPS", 8) as usize);
    let until = std::time::Instant::now() + Duration::from_secs(seconds);
    let heavy = tokio::spawn(flood(base.clone(), "heavy-key", loops, until));
    let light = tokio::spawn(flood(base.clone(), "light-key", loops, until));
    // Meanwhile, an unauthenticated client is refused and spends nothing.
    for _ in 0..20 {
        assert_eq!(get(&p.url("/api/v2/share")).await.status(), 401);
    }
    let (heavy, light) = (heavy.await.unwrap(), light.await.unwrap());
    let s = stats(&sim).await;
    let served = s["api_requests"]["by_status"]["200"].as_u64().unwrap_or(0);
    let ratio = heavy.0 as f64 / light.0.max(1) as f64;
    println!("weights 3:1 → served heavy {} light {} (ratio {ratio:.2}); refused {} / {}; Genesys served {served}", heavy.0, light.0, heavy.1, light.1);
    assert!(
        served >= heavy.0 + light.0,
        "every call Genesys served was an app's"
    );
    assert!(
        (2.5..=3.5).contains(&ratio),
        "shares follow the weights: {heavy:?} {light:?}"
    );
    let m = metrics_text(&p).await;
    let admitted = |app: &str, how: &str| {
        metric(
            &m,
            &format!("genesys_proxy_budget_requests_total{{app=\"{app}\",outcome=\"{how}\"}}"),
        )
    };
    println!(
        "admitted at once / after queueing: heavy {} / {}, light {} / {}",
        admitted("heavy", "served"),
        admitted("heavy", "queued"),
        admitted("light", "served"),
        admitted("light", "queued")
    );
    assert!(admitted("heavy", "queued") > 0.0, "{m}");
    p.running.shutdown().await;
}

/// Two replicas (processes, `[cluster]` on a real Redis) with the same `apps.token_key`: a
/// token one issues is accepted by the other with no lookup; removing the app on both refuses
/// it; nothing an app proves itself with is stored in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn a_proxy_token_issued_by_one_replica_is_accepted_by_the_other() {
    let sim = start_sim(sim_config()).await;
    let redis = RedisServer::start();
    let mut confs = Vec::new();
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let dir = temp_dir(&format!("apps-replica-{name}"));
        let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
            .replace("format = \"text\"", "format = \"json\"")
            .replace("level = \"warn\"", "level = \"info\"")
            + &format!(
                "\n[cluster]\nredis_url = \"{}\"\ntimeout_ms = 200\n",
                redis.url()
            )
            + &apps_section(&dir, "", 3600);
        let conf = dir.join("proxy.toml");
        std::fs::write(&conf, &toml).unwrap();
        replicas.push(ProxyProcess::spawn(&conf));
        confs.push((conf, toml));
    }
    for r in &replicas {
        r.wait_ready().await;
    }
    let (a, b) = (
        format!("http://{}", replicas[0].proxy),
        format!("http://{}", replicas[1].proxy),
    );
    let token = token_of(&a, "billing-app", BILLING_SECRET).await;
    let on = |base: &str| {
        let (url, token) = (format!("{base}/api/v2/users"), token.clone());
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(on(&a).await, 200);
    assert_eq!(on(&b).await, 200, "replica b accepts a's token");
    // Remove billing on both and reload them.
    for ((conf, toml), r) in confs.iter().zip(&replicas) {
        let without = toml
            .replace(
                "[[app]]\nname = \"billing\"",
                "[[app]]\nname = \"billing-gone\"",
            )
            .replace(
                "client_id = \"billing-app\"",
                "client_id = \"billing-app-gone\"",
            );
        std::fs::write(conf, without).unwrap();
        let (status, body) = {
            let r = client()
                .post(format!("http://{}/reload", r.admin))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(on(&a).await, 401);
    assert_eq!(on(&b).await, 401);
    let stored = format!("{:?}", redis.dump());
    for secret in [BILLING_SECRET, OPS_KEY, TOKEN_KEY, token.as_str()] {
        assert!(
            !stored.contains(secret),
            "Redis holds an app secret or token"
        );
    }
    for r in replicas {
        let (_, stdout, stderr) = r.stop();
        for secret in [BILLING_SECRET, TOKEN_KEY, token.as_str()] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "a log holds an app secret"
            );
        }
    }
}

/// `anonymous = "cidr"`: callers without a proof keep the listener's credential, methods and
/// paths (a loopback sidecar beside authenticated apps); a wrong proof is still refused.
#[tokio::test]
async fn anonymous_cidr_serves_callers_without_a_proof_and_refuses_wrong_ones() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("apps-anonymous");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        + &apps_section(&dir, "", 3600).replace("[apps]\n", "[apps]\nanonymous = \"cidr\"\n");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let r = get(&p.url("/api/v2/routing/queues")).await;
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["client_id"], CLIENT_ID);
    assert_eq!(
        get(&p.url("/elsewhere")).await.status(),
        403,
        "[proxy] paths"
    );
    assert_eq!(status_of(&p, "/api/v2/x", "wrong-key").await, 401);
    assert_eq!(status_of(&p, "/api/v2/x", OPS_KEY).await, 200);
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(status["apps"]["anonymous"], "cidr");
    p.running.shutdown().await;
}

/// A login the proxy will not read (too large, not a form, another grant) is refused in
/// Genesys's shape, and the connection stays usable or is closed, never desynchronised.
#[tokio::test]
async fn malformed_logins_are_refused_in_genesys_shape() {
    let sim = start_sim(sim_config()).await;
    let p = apps_proxy(&sim, "").await;
    let c = client();
    let url = p.url("/oauth/token");
    let big = format!("grant_type=client_credentials&pad={}", "x".repeat(10_000));
    for (body, error) in [
        (big, "invalid_request"),
        ("grant_type=password".to_string(), "unsupported_grant_type"),
        ("{}".to_string(), "invalid_request"),
    ] {
        let r = c
            .post(&url)
            .basic_auth("billing-app", Some(BILLING_SECRET))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], error);
    }
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 400, "a login is a POST");
    // The same client goes on working.
    let token = token_of(
        &format!("http://{}", p.running.proxy_addr),
        "billing-app",
        BILLING_SECRET,
    )
    .await;
    assert_eq!(status_of(&p, "/api/v2/users", &token).await, 200);
    p.running.shutdown().await;
}

/// curl, a client we did not write: an API key works, another app's key gets that app's
/// rights (not more), a revoked or malformed one is refused; curl's own login (`-u` with a
/// form) gets a proxy token it can use.
#[tokio::test]
async fn curl_with_an_api_key_or_its_own_login() {
    let sim = start_sim(sim_config()).await;
    let p = apps_proxy(&sim, "").await;
    let base = format!("http://{}", p.running.proxy_addr);
    let curl = |args: Vec<String>| async move {
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-s", "-o", "/dev/stderr", "-w", "%{http_code}"])
                .args(args)
                .output()
                .expect("curl is installed")
        })
        .await
        .unwrap();
        let code: u16 = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
        (code, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let get = |path: &str, header: &str| {
        vec![
            "-H".to_string(),
            header.to_string(),
            format!("{base}{path}"),
        ]
    };
    let bearer = |k: &str| format!("Authorization: Bearer {k}");
    assert_eq!(
        curl(get("/api/v2/routing/queues", &bearer(OPS_KEY)))
            .await
            .0,
        200
    );
    for bad in [
        bearer("revoked-key"),
        "Authorization: Bearer".into(),
        "Authorization: Digest x".into(),
    ] {
        let (code, body) = curl(get("/api/v2/routing/queues", &bad)).await;
        assert_eq!(code, 401, "{bad}: {body}");
        assert!(body.contains("proxy.unauthenticated"), "{body}");
    }
    let (code, body) = curl(vec![
        "-u".into(),
        format!("billing-app:{BILLING_SECRET}"),
        "-d".into(),
        "grant_type=client_credentials".into(),
        format!("{base}/oauth/token"),
    ])
    .await;
    assert_eq!(code, 200, "{body}");
    let token = serde_json::from_str::<Value>(&body).unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(curl(get("/api/v2/users", &bearer(&token))).await.0, 200);
    // billing's token gets billing's rights, not ops's.
    assert_eq!(
        curl(get("/api/v2/routing/queues", &bearer(&token))).await.0,
        403
    );
    p.running.shutdown().await;
}
