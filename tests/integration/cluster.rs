//! `[cluster]`: replicas (real proxy processes) sharing one token lifecycle through a real
//! `redis-server`, in front of the simulator.

use std::time::Duration;

use genesys_auth_proxy::sim::SimHandle;
use serde_json::{json, Value};

use crate::support::*;

/// A replica's config: JSON logs (to learn its port-0 addresses), `[cluster]` on `redis`,
/// the secret in its own file.
fn replica_conf(
    sim: &SimHandle,
    redis: &RedisServer,
    secret: &str,
    name: &str,
) -> std::path::PathBuf {
    let dir = temp_dir(&format!("cluster-{name}-{}", redis.port));
    let toml = proxy_toml(&sim.url(), secret, "", "", &dir)
        .replace("format = \"text\"", "format = \"json\"")
        .replace("level = \"warn\"", "level = \"info\"")
        + &format!(
            "\n[cluster]\nredis_url = \"{}\"\ntimeout_ms = 200\nlease_ms = 5000\n",
            redis.url()
        );
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, toml).unwrap();
    conf
}

async fn replicas(sim: &SimHandle, redis: &RedisServer, n: usize) -> Vec<ProxyProcess> {
    let mut all = Vec::new();
    for i in 0..n {
        all.push(ProxyProcess::spawn(&replica_conf(
            sim,
            redis,
            SECRET,
            &format!("r{i}"),
        )));
    }
    for r in &all {
        r.wait_ready().await;
    }
    all
}

async fn status(r: &ProxyProcess) -> Value {
    get_json(&format!("http://{}/status", r.admin)).await
}

fn token_requests(s: &Value) -> u64 {
    token_successes(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn three_replicas_share_one_token_and_a_revoke_under_load_costs_one_token_request() {
    let sim = start_sim(sim_config()).await;
    let redis = RedisServer::start();
    let all = replicas(&sim, &redis, 3).await;
    assert_eq!(
        token_requests(&stats(&sim).await),
        1,
        "one token for three replicas at start"
    );
    let mut fingerprints = Vec::new();
    for r in &all {
        let s = status(r).await;
        assert_eq!(s["cluster"]["state"], "shared", "{s}");
        fingerprints.push(s["token"]["fingerprint"].clone());
    }
    assert!(
        fingerprints.iter().all(|f| *f == fingerprints[0]),
        "{fingerprints:?}"
    );

    let loads: Vec<Load> = all
        .iter()
        .map(|r| Load::start(format!("http://{}", r.proxy), 3))
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut sent, mut failures) = (0, Vec::new());
    for l in loads {
        let (n, f) = l.finish().await;
        failures.extend(f);
        sent += n;
    }
    if !failures.is_empty() {
        let mut why = String::new();
        for r in &all {
            let m = get_text(&format!("http://{}/metrics", r.admin)).await;
            why += &m
                .lines()
                .filter(|l| {
                    l.starts_with("genesys_proxy_replays_total")
                        || l.starts_with("genesys_proxy_cluster_tokens_total")
                })
                .collect::<Vec<_>>()
                .join("\n");
            why += "\n";
        }
        panic!("{failures:?}\n{why}");
    }
    assert!(sent > 100, "{sent}");
    let s = stats(&sim).await;
    assert_eq!(
        token_requests(&s),
        2,
        "exactly one token request cluster-wide for the revoke: {s}"
    );
    let after: Vec<Value> = futures_join(all.iter().map(status)).await;
    let shared = after
        .iter()
        .filter(|s| s["token"]["source"] == "shared")
        .count();
    assert_eq!(
        shared, 2,
        "two replicas adopted the one that minted: {after:?}"
    );
    // Nothing in Redis is a usable token.
    for (key, value) in redis.dump() {
        for t in sim.state.recent_token_values() {
            assert!(
                !value.contains(&t) && !key.contains(&t),
                "token in the clear at {key}"
            );
        }
    }
}

async fn futures_join<F: std::future::Future<Output = Value>>(
    fs: impl Iterator<Item = F>,
) -> Vec<Value> {
    let mut out = Vec::new();
    for f in fs {
        out.push(f.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn redis_failing_mid_run_loses_nothing_and_replicas_converge_when_it_returns() {
    let sim = start_sim(sim_config()).await;
    let mut redis = RedisServer::start();
    let all = replicas(&sim, &redis, 2).await;
    let loads: Vec<Load> = all
        .iter()
        .map(|r| Load::start(format!("http://{}", r.proxy), 3))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    // Tokens die while Redis is gone: each replica mints for itself.
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    for r in &all {
        let admin = r.admin.clone();
        eventually(Duration::from_secs(10), "standalone", || {
            let admin = admin.clone();
            async move {
                get_json(&format!("http://{admin}/status")).await["cluster"]["state"]
                    == "standalone"
            }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during = token_requests(&stats(&sim).await);
    assert!(
        (2..=3).contains(&during),
        "each replica minted standalone: {during}"
    );
    redis.restart();
    eventually(
        Duration::from_secs(15),
        "both replicas share one token again",
        || async {
            let a = status(&all[0]).await;
            let b = status(&all[1]).await;
            a["cluster"]["state"] == "shared"
                && b["cluster"]["state"] == "shared"
                && a["token"]["fingerprint"] == b["token"]["fingerprint"]
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for l in loads {
        let (n, failures) = l.finish().await;
        assert!(n > 50 && failures.is_empty(), "{n} {failures:?}");
    }
    assert_eq!(
        token_requests(&stats(&sim).await),
        during,
        "converging costs no token request"
    );
    let m = get_text(&format!("http://{}/metrics", all[0].admin)).await;
    assert_eq!(metric(&m, "genesys_proxy_cluster_redis_up"), 1.0);
    assert!(
        metric(
            &m,
            "genesys_proxy_cluster_tokens_total{how=\"minted_standalone\"}"
        ) >= 1.0,
        "{m}"
    );
    let (_, logs, _) = all.into_iter().next().unwrap().stop();
    assert!(logs.contains("minting standalone"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn a_replica_with_another_secret_cannot_read_the_shared_token() {
    let sim = start_sim(sim_config()).await;
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "second-secret"}),
    )
    .await;
    let redis = RedisServer::start();
    let a = ProxyProcess::spawn(&replica_conf(&sim, &redis, SECRET, "a"));
    a.wait_ready().await;
    let b = ProxyProcess::spawn(&replica_conf(&sim, &redis, "second-secret", "b"));
    b.wait_ready().await;
    let (sa, sb) = (status(&a).await, status(&b).await);
    assert_ne!(
        sa["token"]["fingerprint"], sb["token"]["fingerprint"],
        "B could not use A's token"
    );
    assert_eq!(sb["token"]["source"], "current", "B minted its own: {sb}");
    assert_eq!(token_requests(&stats(&sim).await), 2);
    let keys: Vec<String> = redis.dump().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys.iter().filter(|k| k.contains(":token:")).count(),
        2,
        "two namespaces: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn the_second_replica_to_rotate_adopts_the_first_ones_token() {
    let sim = start_sim(sim_config()).await;
    let redis = RedisServer::start();
    let all = replicas(&sim, &redis, 2).await;
    assert_eq!(token_requests(&stats(&sim).await), 1);
    sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "rotated-secret"}),
    )
    .await;
    for (i, r) in all.iter().enumerate() {
        let conf = replica_conf_path(r);
        write_atomic(&conf.with_file_name("client-secret"), "rotated-secret\n");
        let admin = r.admin.clone();
        eventually(Duration::from_secs(10), "rotation", || {
            let admin = admin.clone();
            async move { get_json(&format!("http://{admin}/status")).await["refresh_count"] == 2 }
        })
        .await;
        assert_eq!(
            token_requests(&stats(&sim).await),
            2,
            "replica {i}: one token request for the rotation"
        );
    }
    let (a, b) = (status(&all[0]).await, status(&all[1]).await);
    assert_eq!(a["token"]["fingerprint"], b["token"]["fingerprint"]);
    assert_eq!(b["token"]["source"], "shared", "{b}");
}

/// Where a replica's config lives (its secret file is beside it).
fn replica_conf_path(r: &ProxyProcess) -> std::path::PathBuf {
    r.conf.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn replicas_share_the_tokens_rate_limit_budget_through_redis() {
    let sim = start_sim(sim_config()).await;
    let redis = RedisServer::start();
    let all = replicas(&sim, &redis, 2).await;
    let c = client();
    for i in 0..15 {
        let r = c
            .get(format!("http://{}/api/v2/budget/{i}", all[0].proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The idle replica sent nothing and saw no Genesys header, yet knows the token's budget
    // is 15 calls lighter.
    let admin = all[1].admin.clone();
    eventually(
        Duration::from_secs(5),
        "the idle replica to see the shared count",
        || {
            let admin = admin.clone();
            async move {
                let s = get_json(&format!("http://{admin}/status")).await;
                s["pool"][0]["budget_remaining"] == 300 - 15
            }
        },
    )
    .await;
    let counts: Vec<(String, String)> = redis
        .dump()
        .into_iter()
        .filter(|(k, _)| k.contains(":budget:"))
        .collect();
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(counts[0].1, "15");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn a_lease_left_behind_costs_a_token_request_not_a_request() {
    let sim = start_sim(sim_config()).await;
    let redis = RedisServer::start();
    let all = replicas(&sim, &redis, 1).await;
    // A replica that crashed while minting left its lease for a minute.
    let token_key = redis
        .dump()
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| k.contains(":token:0"))
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let _: () = redis::cmd("SET")
        .arg(token_key.replace(":token:", ":lease:"))
        .arg("crashed-replica")
        .arg("PX")
        .arg(60_000)
        .query(&mut c)
        .unwrap();
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    let started = std::time::Instant::now();
    let r = get(&format!("http://{}/api/v2/after-crash", all[0].proxy)).await;
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let m = get_text(&format!("http://{}/metrics", all[0].admin)).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_cluster_tokens_total{how=\"minted_standalone\"}"
        ),
        1.0,
        "{m}"
    );
}

/// One Redis link for the process: three credentials in one replica hold one connection and
/// one subscription (before: one of each per credential, six in all), and each credential's
/// token is still stored under its own key id and found by a second replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak tier: .ci/run runs it (cargo test -- --ignored)"]
async fn three_credentials_share_one_redis_link() {
    const OTHER: [(&str, &str); 2] = [("reporting-client", "rs-1"), ("partner-client", "ps-2")];
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        clients: vec![
            (CLIENT_ID.into(), SECRET.into()),
            (OTHER[0].0.into(), OTHER[0].1.into()),
            (OTHER[1].0.into(), OTHER[1].1.into()),
        ],
        ..sim_config()
    })
    .await;
    let redis = RedisServer::start();
    let conf = |name: &str| {
        let conf = replica_conf(&sim, &redis, SECRET, name);
        let dir = conf.parent().unwrap().to_path_buf();
        let mut toml = std::fs::read_to_string(&conf).unwrap();
        for (i, (id, secret)) in OTHER.iter().enumerate() {
            let file = dir.join(format!("secret-{i}"));
            write_atomic(&file, &format!("{secret}\n"));
            toml += &format!(
                "\n[[credential]]\nname = \"c{i}\"\nlisten = \"127.0.0.1:0\"\n[credential.genesys]\nlogin_url = \"{u}\"\napi_url = \"{u}\"\nclient_id = \"{id}\"\nclient_secret = {{ file = {file:?} }}\n",
                u = sim.url()
            );
        }
        std::fs::write(&conf, toml).unwrap();
        conf
    };
    let a = ProxyProcess::spawn(&conf("a"));
    a.wait_ready().await;
    let shared = |s: &Value| {
        ["default", "c0", "c1"]
            .iter()
            .all(|c| s["credentials"][c]["cluster"]["state"] == "shared")
    };
    eventually(
        Duration::from_secs(10),
        "every credential shared",
        || async { shared(&status(&a).await) },
    )
    .await;
    eventually(Duration::from_secs(10), "three tokens stored", || async {
        redis
            .dump()
            .iter()
            .filter(|(k, _)| k.contains(":token:"))
            .count()
            == 3
    })
    .await;
    assert_eq!(redis.clients(), 2, "one connection and one subscription");
    // The one link's state is every credential's: none renders "Redis down".
    let m = get_text(&format!("http://{}/metrics", a.admin)).await;
    for c in ["default", "c0", "c1"] {
        let sample = format!("genesys_proxy_cluster_redis_up{{credential=\"{c}\"}}");
        assert_eq!(metric(&m, &sample), 1.0, "{sample} in\n{m}");
    }
    // A second replica adopts all three stored tokens: no token request.
    let before = token_requests(&stats(&sim).await);
    let b = ProxyProcess::spawn(&conf("b"));
    b.wait_ready().await;
    eventually(Duration::from_secs(10), "b shared", || async {
        shared(&status(&b).await)
    })
    .await;
    assert_eq!(
        token_requests(&stats(&sim).await),
        before,
        "b adopted every token"
    );
    assert_eq!(redis.clients(), 4, "two replicas, two connections each");
    drop((a, b));
}
