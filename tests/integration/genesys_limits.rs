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
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("max_request_body_bytes = 1000", "max_request_body_bytes = 2000");
    write_atomic(&conf, &text);
    let (status, body) = post_reload(&p).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(post(1001).await.unwrap().status(), 200);
    assert_eq!(post(2001).await.unwrap().status(), 413);
}
