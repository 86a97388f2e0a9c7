//! Genesys as it really limits: the 512,000-byte request limit, 429s that are an endpoint's or
//! the org's rather than the token's, and pools that rest tokens the org's idle timeout would
//! kill.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn api_total(stats: &Value) -> u64 {
    stats["api_requests"]["total"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413_at_no_api_cost() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy(&sim).await;
    let before = api_total(&stats(&sim).await);
    let c = client();
    // Declared length over the 512,000-byte default: refused before admission.
    let r = c
        .post(p.url("/api/v2/analytics/conversations/details/query"))
        .header("content-type", "application/json")
        .body(vec![b' '; 512_001])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "proxy.request_too_large");
    assert_eq!(v["status"], 413);
    // Exactly the limit passes.
    let r = c
        .post(p.url("/api/v2/analytics/conversations/details/query"))
        .body(vec![b' '; 512_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(echoed["body_len"], 512_000);
    // A chunked body (no declared length) over the limit: 413, and Genesys never gets a
    // complete request.
    let mut tcp = tokio::net::TcpStream::connect(p.running.proxy_addr)
        .await
        .unwrap();
    let head = "POST /api/v2/analytics/conversations/details/query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 65_536];
    for _ in 0..8 {
        let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
        piece.extend_from_slice(&chunk);
        piece.extend_from_slice(b"\r\n");
        if tcp.write_all(&piece).await.is_err() {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("proxy.request_too_large"), "{answer}");
    let after = stats(&sim).await;
    // Only the request at the limit reached the API.
    assert_eq!(api_total(&after) - before, 1, "{after}");
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_rejected_requests_total{reason=\"request_too_large\"}"
        ),
        2.0,
        "{m}"
    );
}

#[tokio::test]
async fn the_body_limit_is_a_live_key() {
    let sim = start_sim(sim_config()).await;
    let p = start_proxy_with(&sim, "max_request_body_bytes = 1000", "").await;
    p.ready().await;
    let c = client();
    let post = |n: usize| {
        c.post(p.url("/api/v2/conversations/messages"))
            .body(vec![b'x'; n])
            .send()
    };
    assert_eq!(post(1000).await.unwrap().status(), 200);
    assert_eq!(post(1001).await.unwrap().status(), 413);
    let conf = p.dir.join("proxy.toml");
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        "max_request_body_bytes = 1000",
        "max_request_body_bytes = 2000",
    );
    write_atomic(&conf, &text);
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(post(1001).await.unwrap().status(), 200);
    assert_eq!(post(2001).await.unwrap().status(), 413);
}

/// A simulator with an endpoint limit on analytics queries: `n` calls per `seconds`, over
/// every token together.
async fn sim_with_endpoint_limit(n: u64, seconds: u64) -> genesys_auth_proxy::sim::SimHandle {
    let limit = format!("/api/v2/analytics/conversations/details/query={n}/{seconds}");
    start_sim(genesys_auth_proxy::sim::SimConfig {
        endpoint_limits: vec![limit.parse().unwrap()],
        ..sim_config()
    })
    .await
}

const QUERY: &str = "/api/v2/analytics/conversations/details/query";

fn endpoint_metric(m: &str, outcome: &str) -> f64 {
    metric(
        m,
        &format!("genesys_proxy_rate_limited_total{{outcome=\"{outcome}\",scope=\"endpoint\"}}"),
    )
}

fn token_scope_total(m: &str) -> f64 {
    ["absorbed", "passed_through", "queue_timeout", "queue_full"]
        .iter()
        .map(|o| {
            metric(
                m,
                &format!("genesys_proxy_rate_limited_total{{outcome=\"{o}\",scope=\"token\"}}"),
            )
        })
        .sum()
}

#[tokio::test]
async fn an_endpoint_limit_holds_its_route_and_other_routes_keep_every_token() {
    let sim = sim_with_endpoint_limit(2, 30).await;
    let dir = temp_dir("endpoint-hold");
    let toml = proxy_toml(&sim.url(), SECRET, "", "pool_size = 2", &dir)
        .replace("[audit]", "[budget]\nmax_queue_wait_ms = 500\n\n[audit]");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    // Both pool tokens minted (and validated) before anything is counted.
    eventually(
        std::time::Duration::from_secs(10),
        "the pool is full",
        || async { token_successes(&stats(&sim).await) == 2 },
    )
    .await;
    let c = client();
    let query = || c.post(p.url(QUERY)).body("{}").send();
    assert_eq!(query().await.unwrap().status(), 200);
    assert_eq!(query().await.unwrap().status(), 200);
    // The third meets the endpoint limit while the token has budget: Genesys's 429 passes
    // through (the hold, 30 s, is longer than the request may wait), with its Retry-After.
    let r = query().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    let genesys_429s = |s: &Value| s["api_requests"]["endpoint_limited"].as_u64().unwrap();
    assert_eq!(
        genesys_429s(&stats(&sim).await),
        1,
        "sent once, not re-sent on the other token"
    );
    // The route is held: the next query is answered by the proxy, costing no API call, with
    // Genesys's rate-limit headers.
    let before = api_total(&stats(&sim).await);
    let r = query().await.unwrap();
    assert_eq!(r.status(), 429);
    let h = r.headers();
    assert!(h.contains_key("retry-after"));
    let allowed: u64 = h["inin-ratelimit-allowed"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(allowed, 300);
    assert_eq!(h["inin-ratelimit-count"], h["inin-ratelimit-allowed"]);
    assert!(h.contains_key("inin-ratelimit-reset"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "too.many.requests.retry.after");
    assert_eq!(api_total(&stats(&sim).await), before);
    // Other routes keep flowing at once: no token was marked spent (both keep their budget).
    let started = std::time::Instant::now();
    let mut served = 0;
    for _ in 0..40 {
        let r = c.get(p.url("/api/v2/users")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        served += 1;
    }
    let took = started.elapsed();
    let s = stats(&sim).await;
    eprintln!("served {served} requests on other routes in {took:?} while {QUERY} was held");
    assert_eq!(token_successes(&s), 2, "no token re-minted or rested: {s}");
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(status["held_routes"]["total"], 1, "{status}");
    assert_eq!(
        status["held_routes"]["routes"][0]["route"],
        format!("POST {QUERY}")
    );
    for slot in status["pool"].as_array().unwrap() {
        assert!(slot["budget_remaining"].as_u64().unwrap() > 250, "{status}");
    }
    let m = metrics_text(&p).await;
    assert_eq!(endpoint_metric(&m, "passed_through"), 1.0, "{m}");
    assert_eq!(endpoint_metric(&m, "queue_timeout"), 1.0, "{m}");
    assert_eq!(token_scope_total(&m), 0.0, "{m}");
}

#[tokio::test]
async fn a_request_to_a_held_route_waits_out_the_hold_within_its_queue_wait() {
    let sim = sim_with_endpoint_limit(2, 1).await;
    let dir = temp_dir("endpoint-wait");
    let toml = proxy_toml(&sim.url(), SECRET, "", "pool_size = 2", &dir)
        .replace("[audit]", "[budget]\nmax_queue_wait_ms = 5000\n\n[audit]");
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let c = client();
    // Five at once: two pass, the others meet the limit (Retry-After 1 s), wait for the route
    // and are re-sent; a later request waits for the hold instead of collecting a 429.
    let sends: Vec<_> = (0..5)
        .map(|i| {
            let c = c.clone();
            let url = p.url(QUERY);
            tokio::spawn(async move { c.post(url).body(format!("{{\"n\":{i}}}")).send().await })
        })
        .collect();
    for s in sends {
        let r = s.await.unwrap().unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    let m = metrics_text(&p).await;
    assert!(endpoint_metric(&m, "absorbed") >= 1.0, "{m}");
    assert_eq!(endpoint_metric(&m, "passed_through"), 0.0, "{m}");
    assert_eq!(token_scope_total(&m), 0.0, "{m}");
    let s = stats(&sim).await;
    assert_eq!(token_successes(&s), 2, "{s}");
}

#[test]
fn the_endpoint_limit_flag_names_a_bad_value() {
    let bad: Result<genesys_auth_proxy::sim::EndpointLimit, _> = "/api/v2/flows=ten/60".parse();
    assert!(bad.unwrap_err().contains("PATH_PREFIX=N/SECONDS"));
    let ok: genesys_auth_proxy::sim::EndpointLimit = "/api/v2/flows=10/60".parse().unwrap();
    assert_eq!(ok.limit, 10);
}

/// Tokens that served API requests (each token's validation call aside).
fn serving_tokens(stats: &Value) -> usize {
    stats["api_requests"]["by_token"]
        .as_object()
        .unwrap()
        .values()
        .filter(|n| n.as_u64().unwrap_or(0) > 1)
        .count()
}

fn idle_kills(stats: &Value) -> u64 {
    stats["api_requests"]["refused"]["idle"]
        .as_u64()
        .unwrap_or(0)
}

/// A simulator whose org kills tokens unused for `idle`.
async fn idle_org(idle: std::time::Duration) -> genesys_auth_proxy::sim::SimHandle {
    start_sim(genesys_auth_proxy::sim::SimConfig {
        idle_timeout: Some(idle),
        ..sim_config()
    })
    .await
}

/// The measurement: pool of 4, idle timeout 3 s, 1 request/s for 20 s. Before: every
/// request went to the token with the most budget left, so the trickle was spread over all
/// four, each idled out between its requests: 11 token requests and 8 idle kills. Now the
/// trickle stays on the first token and the others rest.
#[tokio::test]
async fn light_traffic_on_a_pool_stays_on_one_token_and_nothing_idles_out() {
    let sim = idle_org(std::time::Duration::from_secs(3)).await;
    let p = start_pool(&sim, 4).await;
    let c = client();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    for i in 0..20 {
        tick.tick().await;
        let r = c.get(p.url("/api/v2/users")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let s = stats(&sim).await;
    let tokens = token_successes(&s);
    let kills = idle_kills(&s);
    eprintln!("pool 4, idle 3 s, 1 req/s for 20 s: {tokens} token requests, {kills} idle kills");
    assert_eq!(kills, 0, "{s}");
    // The initial four; nothing re-minted (at most one per idle period would be allowed).
    assert!(tokens <= 4 + 20 / 3, "{s}");
    assert_eq!(serving_tokens(&s), 1, "{s}");
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(status["idle_timeout"]["seconds"], 3.0, "{status}");
    assert_eq!(status["idle_timeout"]["learned_from"], "date_token_idles");
    let resting = status["pool"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["resting"] == true)
        .count();
    assert_eq!(resting, 3, "{status}");
    // Readiness holds while tokens rest.
    assert_eq!(get(&p.admin("/readyz")).await.status(), 200);
}

#[tokio::test]
async fn the_idle_timeout_is_learned_from_kills_and_then_nothing_more_is_killed() {
    // No tokens/me check, so no dateTokenIdles: only the kills can teach it.
    let sim = idle_org(std::time::Duration::from_secs(2)).await;
    let p = start_proxy_with(&sim, "", "validation = \"none\"").await;
    p.ready().await;
    let c = client();
    let call = || async {
        let r = c.get(p.url("/api/v2/users")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    };
    call().await;
    let mut kills = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
        call().await;
        kills.push(idle_kills(&stats(&sim).await));
    }
    eprintln!("idle kills after each quiet gap: {kills:?}");
    // Two kills at about the same idle time teach it; after that, a token idle that long is
    // re-minted before use instead of collecting a 401.
    assert_eq!(kills, [1, 2, 2, 2], "{}", stats(&sim).await);
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(status["idle_timeout"]["learned_from"], "kills", "{status}");
}

#[tokio::test]
async fn pressure_wakes_a_resting_token_before_the_one_in_use_is_spent() {
    // 20 calls per token per 4 s window; idle timeout 3 s, reported by tokens/me.
    let sim = start_sim(genesys_auth_proxy::sim::SimConfig {
        idle_timeout: Some(std::time::Duration::from_secs(3)),
        api_rate_limit_per_minute: 20,
        api_rate_limit_window: std::time::Duration::from_secs(4),
        ..sim_config()
    })
    .await;
    let dir = temp_dir("idle-pressure");
    let toml = proxy_toml(&sim.url(), SECRET, "", "pool_size = 2", &dir).replace(
        "[audit]",
        "[budget]\nrequests_per_window = 20\nwindow_seconds = 4\nmax_queue_wait_ms = 8000\n\n[audit]",
    );
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    eventually(
        std::time::Duration::from_secs(10),
        "both slots minted",
        || async { token_successes(&stats(&sim).await) == 2 },
    )
    .await;
    let c = client();
    // Quiet long enough for slot 1 to rest (slot 0 is kept in use).
    for _ in 0..4 {
        let r = c.get(p.url("/api/v2/users")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    }
    let status = get_json(&p.admin("/status")).await;
    assert_eq!(status["pool"][1]["resting"], true, "{status}");
    // A burst of 30: more than slot 0's window. Past half of it, slot 1 is minted anew and
    // serves the rest; nobody is sent with an idle-dead token.
    let sends: Vec<_> = (0..30)
        .map(|_| {
            let c = c.clone();
            let url = p.url("/api/v2/users");
            tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    for s in sends {
        assert_eq!(s.await.unwrap(), 200);
    }
    let s = stats(&sim).await;
    eprintln!(
        "burst after rest: {} token requests, {} idle kills",
        token_successes(&s),
        idle_kills(&s)
    );
    assert_eq!(idle_kills(&s), 0, "{s}");
    assert_eq!(token_successes(&s), 3, "slot 1 re-minted once: {s}");
    assert_eq!(serving_tokens(&s), 2, "{s}");
}
