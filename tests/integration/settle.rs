//! Issue 21: secret rotation that settles. One change of a watched file gives one reload and
//! no more (the watcher once reacted to the proxy's own reads of the file and reloaded every
//! 300 ms forever); a refused new secret is retried on its own schedule, not on every reload;
//! the working secret mints first, past the per-minute cap when no usable token is left.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

/// All reloads so far, whatever their outcome.
fn reloads(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("genesys_proxy_config_reloads_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn reloads_of(admin: &str) -> f64 {
    reloads(&get_text(&format!("http://{admin}/metrics")).await)
}

/// Replaces `path` by a rename, with `mode`.
fn rename_into(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Watches `what` for `window`: it must hold at every look (bounded observation, not a sleep
/// to synchronise).
async fn stays<F, Fut>(window: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(check().await, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// A proxy process with JSON logs whose secret is `secret_file`.
fn spawn_watched(
    sim: &genesys_auth_proxy::sim::SimHandle,
    dir: &Path,
    secret_file: &Path,
) -> ProxyProcess {
    let toml = proxy_toml(&sim.url(), SECRET, "", "", dir)
        .replace(
            &format!("{:?}", dir.join("client-secret")),
            &format!("{secret_file:?}"),
        )
        .replace("format = \"text\"", "format = \"json\"")
        .replace("level = \"warn\"", "level = \"info\"");
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, &toml).unwrap();
    ProxyProcess::spawn(&conf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_atomic_rename_of_an_unchanged_secret_reloads_at_most_once() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("settle");
    let secret_file = dir.join("client-secret");
    let proc = spawn_watched(&sim, &dir, &secret_file);
    // Mode 0644, Kubernetes' default for secret volumes.
    rename_into(&secret_file, &format!("{SECRET}\n"), 0o644);
    proc.wait_ready().await;
    let admin = proc.admin.clone();
    // `mv new secret` with the same bytes: at most one reload (a no-op), then quiet. Before
    // the fix: a reload every ~300 ms, forever, each warning about the mode.
    rename_into(&secret_file, &format!("{SECRET}\n"), 0o644);
    stays(Duration::from_secs(4), "at most one reload", || async {
        reloads_of(&admin).await <= 1.0
    })
    .await;
    let r = get(&format!("http://{}/api/v2/users/me", proc.proxy)).await;
    assert_eq!(r.status(), 200);
    let (_, logs, _) = proc.stop();
    // Logged once per change of the file (start-up, then the mode change to 0644), never
    // per no-op reload; it names the Kubernetes fix.
    let warnings = count(&logs, "readable by group or others");
    assert!((1..=2).contains(&warnings), "{warnings} warnings:\n{logs}");
    assert!(logs.contains("defaultMode: 0400"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_data_swap_reloads_exactly_once() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("settle-k8s");
    let volume = dir.join("secret-volume");
    std::fs::create_dir_all(&volume).unwrap();
    k8s_volume(
        &volume,
        "client-secret",
        "2026_12_02_a",
        &format!("{SECRET}\n"),
    );
    let proc = spawn_watched(&sim, &dir, &volume.join("client-secret"));
    proc.wait_ready().await;
    let admin = proc.admin.clone();
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "k8s-rotated"}),
    )
    .await;
    let before = reloads_of(&admin).await;
    k8s_volume(&volume, "client-secret", "2026_12_02_b", "k8s-rotated\n");
    std::fs::remove_dir_all(volume.join("..2026_12_02_a")).unwrap();
    let rotated = |admin: String| async move {
        let m = get_text(&format!("http://{admin}/metrics")).await;
        metric(
            &m,
            "genesys_proxy_secret_rotations_total{outcome=\"success\"}",
        ) == 1.0
    };
    eventually(Duration::from_secs(10), "the swap to rotate", || {
        rotated(admin.clone())
    })
    .await;
    stays(
        Duration::from_secs(4),
        "exactly one reload per swap",
        || async { reloads_of(&admin).await == before + 1.0 },
    )
    .await;
    // A swap to the same bytes changes nothing: no reload at all.
    k8s_volume(&volume, "client-secret", "2026_12_02_c", "k8s-rotated\n");
    std::fs::remove_dir_all(volume.join("..2026_12_02_b")).unwrap();
    stays(
        Duration::from_secs(3),
        "no reload for identical bytes",
        || async { reloads_of(&admin).await == before + 1.0 },
    )
    .await;
    let (_, logs, _) = proc.stop();
    assert!(!logs.contains(SECRET) && !logs.contains("k8s-rotated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_new_secret_is_tried_a_handful_of_times_while_the_current_one_serves() {
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("settle-refused");
    // The shipped backoff defaults, not the fast test ones: the bound is stated for them.
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        .replace("backoff_initial_ms = 50", "backoff_initial_ms = 500")
        .replace("backoff_max_ms = 400", "backoff_max_ms = 60000");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let refused_before = invalid_client(&sim).await;
    let started = Instant::now();
    write_atomic(&p.dir.join("client-secret"), "never-registered\n");
    eventually(Duration::from_secs(5), "the first attempt", || async {
        invalid_client(&sim).await > refused_before
    })
    .await;
    // Watch for 8 s: the current token keeps serving, and the new secret is tried on its own
    // backoff (4 s, 8 s … with equal jitter: at most 3 attempts in 8 s), not per reload.
    // Before the fix: 22 refused token requests in 7 s.
    let c = client();
    while started.elapsed() < Duration::from_secs(8) {
        let r = c.get(p.url("/api/v2/users/me")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts = invalid_client(&sim).await - refused_before;
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} refused token requests in 8 s"
    );
    let m = metrics_text(&p).await;
    assert!(reloads(&m) <= 1.0, "reloads: {}", reloads(&m));
    let s: Value = get_json(&p.admin("/status")).await;
    let rotation = &s["rotation"];
    assert_eq!(
        rotation["pending_new_secret"],
        genesys_auth_proxy::fingerprint::fingerprint(b"never-registered")
    );
    assert!(rotation["next_attempt_at"].is_string(), "{s}");
    p.running.shutdown().await;
}

async fn invalid_client(sim: &genesys_auth_proxy::sim::SimHandle) -> u64 {
    stats(sim).await["token_requests"]["by_outcome"]["invalid_client"]
        .as_u64()
        .unwrap_or(0)
}

// The run of the report: 10 rotations each followed by a revoke (21 mints, past the cap of
// 20 a minute), then a wrong secret, all under steady load. Before the fix: 2 x 401 and
// 2 x 503, the cap holding back the one mint that mattered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_and_revokes_past_the_cap_then_a_wrong_secret_lose_no_request() {
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        api_rate_limit_per_minute: 1_000_000,
        token_rate_limit_per_minute: 10_000,
        ..sim_config()
    })
    .await;
    let dir = temp_dir("settle-cap");
    let toml = proxy_toml(
        &sim.url(),
        SECRET,
        "",
        "max_token_requests_per_minute = 20",
        &dir,
    )
    .replace("client_id = ", "watch_secret_files = false\nclient_id = ");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let load = Load::start(p.url(""), 4);
    let mut old = SECRET.to_string();
    for i in 1..=10u64 {
        let new = format!("capped-rotation-{i}");
        sim_post(
            &sim,
            &format!("/__sim/clients/{CLIENT_ID}/secrets"),
            json!({"secret": new}),
        )
        .await;
        write_atomic(&p.dir.join("client-secret"), &format!("{new}\n"));
        let (status, body) = post_reload(&p).await;
        // The last rotations may meet the cap: pending, then done on the refresher's schedule.
        assert!(status == 200 || status == 202, "rotation {i}: {body}");
        eventually(
            Duration::from_secs(70),
            &format!("rotation {i}"),
            || async {
                let m = metrics_text(&p).await;
                metric(
                    &m,
                    "genesys_proxy_secret_rotations_total{outcome=\"success\"}",
                ) == i as f64
            },
        )
        .await;
        sim_delete_secret(&sim, &old).await;
        let generation = p.running.store.generation();
        sim_post(&sim, "/__sim/revoke", json!({"client_id": CLIENT_ID})).await;
        // The revoke is found by the next request's 401; the re-mint follows.
        eventually(
            Duration::from_secs(10),
            "a token after the revoke",
            || async {
                let _ = client().get(p.url("/api/v2/users/me")).send().await;
                p.running.store.generation() > generation
                    && p.running
                        .store
                        .current()
                        .is_some_and(|t| t.is_valid_at(Instant::now()))
            },
        )
        .await;
        old = new;
    }
    let minted = token_successes(&stats(&sim).await);
    assert!(minted > 20, "the run must pass the cap: {minted} mints");
    write_atomic(&p.dir.join("client-secret"), "wrong-secret\n");
    let (status, body) = post_reload(&p).await;
    assert!(status == 502 || status == 202, "{body}");
    // One more revoke while the wrong secret is pending and the cap is spent.
    let generation = p.running.store.generation();
    sim_post(&sim, "/__sim/revoke", json!({"client_id": CLIENT_ID})).await;
    eventually(
        Duration::from_secs(10),
        "a token after the last revoke",
        || async {
            let _ = client().get(p.url("/api/v2/users/me")).send().await;
            p.running.store.generation() > generation
        },
    )
    .await;
    let (sent, failures) = load.finish().await;
    println!(
        "rotations+revokes past the cap: {minted} mints, {} of {sent} requests failed",
        failures.len()
    );
    assert!(sent > 100, "{sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    p.running.shutdown().await;
}
