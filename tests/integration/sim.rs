//! The simulator behaves like Genesys Cloud: token endpoint, API, rate limits, control API.

use std::time::Duration;

use base64::Engine;
use genesys_auth_proxy::fingerprint::fingerprint;
use genesys_auth_proxy::sim::{SimConfig, TokenFormat};
use serde_json::{json, Value};

use crate::support::*;

#[tokio::test]
async fn token_grant_success_has_genesys_shape() {
    let sim = start_sim(sim_config()).await;
    let r = mint(&sim, CLIENT_ID, SECRET).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["expires_in"], 86400);
    let token = v["access_token"].as_str().unwrap();
    // 32 random bytes, base64url.
    assert_eq!(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .unwrap()
            .len(),
        32
    );
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_invalid_client() {
    let sim = start_sim(sim_config()).await;
    let r = mint(&sim, CLIENT_ID, "wrong").await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error":"invalid_client","description":"authentication failed","error_description":"authentication failed"})
    );
    let r = client()
        .post(format!("{}/oauth/token", sim.url()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let s = stats(&sim).await;
    assert_eq!(s["token_requests"]["by_outcome"]["invalid_client"], 2);
}

#[tokio::test]
async fn other_grants_and_json_bodies_are_refused() {
    let sim = start_sim(sim_config()).await;
    let c = client();
    let r = c
        .post(format!("{}/oauth/token", sim.url()))
        .basic_auth(CLIENT_ID, Some(SECRET))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );
    let r = c
        .post(format!("{}/oauth/token", sim.url()))
        .basic_auth(CLIENT_ID, Some(SECRET))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_request");
    let r = c
        .post(format!("{}/oauth/token", sim.url()))
        .basic_auth(CLIENT_ID, Some(SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("%%%not=a&form")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn token_endpoint_throttles_with_400_not_429() {
    let sim = start_sim(SimConfig {
        token_rate_limit_per_minute: 3,
        ..sim_config()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(mint(&sim, CLIENT_ID, SECRET).await.status(), 200);
    }
    let r = mint(&sim, CLIENT_ID, SECRET).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_request");
    assert!(v["error_description"]
        .as_str()
        .unwrap()
        .starts_with("rate limit exceeded;"));
    assert_eq!(
        stats(&sim).await["token_requests"]["by_outcome"]["rate_limited"],
        1
    );
}

#[tokio::test]
async fn parallel_token_requests_are_counted_exactly() {
    let sim = start_sim(SimConfig {
        token_rate_limit_per_minute: 10_000,
        ..sim_config()
    })
    .await;
    let n = 200;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = sim.url();
            tokio::spawn(async move {
                client()
                    .post(format!("{url}/oauth/token"))
                    .basic_auth(CLIENT_ID, Some(SECRET))
                    .form(&[("grant_type", "client_credentials")])
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let s = stats(&sim).await;
    assert_eq!(s["token_requests"]["total"], n);
    assert_eq!(s["token_requests"]["by_outcome"]["success"], n);
    assert_eq!(s["live_tokens"], n);
}

#[tokio::test]
async fn several_secrets_and_removal_keeps_issued_tokens() {
    let sim = start_sim(sim_config()).await;
    let r = sim_post(
        &sim,
        &format!("/__sim/clients/{CLIENT_ID}/secrets"),
        json!({"secret": "second"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let with_old = mint_token(&sim).await;
    assert_eq!(mint(&sim, CLIENT_ID, "second").await.status(), 200);
    let r = sim_delete_secret(&sim, SECRET).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mint(&sim, CLIENT_ID, SECRET).await.status(), 401);
    assert_eq!(mint(&sim, CLIENT_ID, "second").await.status(), 200);
    let r = client()
        .get(format!("{}/api/v2/tokens/me", sim.url()))
        .bearer_auth(&with_old)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a token issued with a removed secret stays valid"
    );
    // A new client created from the control API.
    sim_post(&sim, "/__sim/clients/other/secrets", json!({"secret": "o"})).await;
    assert_eq!(mint(&sim, "other", "o").await.status(), 200);
}

#[tokio::test]
async fn api_resources_and_echo() {
    let sim = start_sim(sim_config()).await;
    let token = mint_token(&sim).await;
    let c = client();
    let get = |path: &str| {
        c.get(format!("{}{path}", sim.url()))
            .bearer_auth(&token)
            .send()
    };

    let r = get("/api/v2/tokens/me").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["OAuthClient"]["id"], CLIENT_ID);
    assert!(v["organization"]["id"].is_string() && v["homeOrganization"]["id"].is_string());
    assert!(v["authorizedScope"].is_array());

    let v: Value = get("/api/v2/organizations/me")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["state"], "active");
    assert!(v["defaultLanguage"].is_string() && v["name"].is_string());

    let v: Value = get("/api/v2/users?pageSize=25&pageNumber=6")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 137);
    assert_eq!(v["pageCount"], 6);
    assert_eq!(v["pageNumber"], 6);
    assert_eq!(v["entities"].as_array().unwrap().len(), 12);
    assert_eq!(get("/api/v2/users?pageSize=0").await.unwrap().status(), 400);

    let r = c
        .put(format!("{}/api/v2/routing/queues/q1?x=1&y=2", sim.url()))
        .bearer_auth(&token)
        .body("hello")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/api/v2/routing/queues/q1");
    assert_eq!(v["query"], "x=1&y=2");
    assert_eq!(v["body_len"], 5);
    assert_eq!(
        v["body_sha256"],
        genesys_auth_proxy::fingerprint::sha256_hex(b"hello")
    );
    assert_eq!(v["client_id"], CLIENT_ID);
    assert_eq!(v["token_fingerprint"], fingerprint(token.as_bytes()));

    let r = c
        .head(format!("{}/api/v2/tokens/me", sim.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .delete(format!("{}/api/v2/tokens/me", sim.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        get("/api/v2/tokens/me").await.unwrap().status(),
        401,
        "DELETE tokens/me revokes"
    );
    assert_eq!(stats(&sim).await["revocations"], 1);
}

#[tokio::test]
async fn unauthenticated_calls_get_genesys_401_bodies_with_correlation_ids() {
    let sim = start_sim(sim_config()).await;
    let c = client();
    let r = get(&format!("{}/api/v2/users", sim.url())).await;
    assert_eq!(r.status(), 401);
    let cid = r.headers()["inin-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "authentication.required");
    assert_eq!(v["status"], 401);
    assert_eq!(v["contextId"], cid);

    let r = c
        .get(format!("{}/api/v2/users", sim.url()))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad.credentials");

    let token = mint_token(&sim).await;
    let r = c
        .get(format!("{}/api/v2/users", sim.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    for h in [
        "inin-correlation-id",
        "inin-ratelimit-count",
        "inin-ratelimit-allowed",
        "inin-ratelimit-reset",
    ] {
        assert!(r.headers().contains_key(h), "missing {h}");
    }
    assert_eq!(r.headers()["inin-ratelimit-allowed"], "300");
}

#[tokio::test]
async fn api_rate_limit_is_per_token_with_retry_after() {
    let sim = start_sim(SimConfig {
        api_rate_limit_per_minute: 2,
        ..sim_config()
    })
    .await;
    let t1 = mint_token(&sim).await;
    let t2 = mint_token(&sim).await;
    let c = client();
    let call = |t: &str| {
        c.get(format!("{}/api/v2/x", sim.url()))
            .bearer_auth(t.to_string())
            .send()
    };
    assert_eq!(call(&t1).await.unwrap().status(), 200);
    assert_eq!(call(&t1).await.unwrap().status(), 200);
    let r = call(&t1).await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let cid = r.headers()["inin-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "too.many.requests.retry.after");
    assert_eq!(v["contextId"], cid);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("Retry the request in ["));
    assert_eq!(
        call(&t2).await.unwrap().status(),
        200,
        "the limit is per token"
    );
    let s = stats(&sim).await;
    assert_eq!(s["api_requests"]["by_status"]["429"], 1);
    assert_eq!(s["api_requests"]["by_token"][fingerprint(t1.as_bytes())], 3);
}

#[tokio::test]
async fn idle_tokens_die() {
    let sim = start_sim(SimConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..sim_config()
    })
    .await;
    let token = mint_token(&sim).await;
    let c = client();
    let call = || {
        c.get(format!("{}/api/v2/x", sim.url()))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(call().await.unwrap().status(), 200);
    // The idle timeout is the behaviour under test: time has to pass.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(call().await.unwrap().status(), 401);
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let sim = start_sim(sim_config()).await;
    sim_put(&sim, "/__sim/token-lifetime", json!({"seconds": 1})).await;
    let v: Value = mint(&sim, CLIENT_ID, SECRET).await.json().await.unwrap();
    assert_eq!(v["expires_in"], 1);
    let token = v["access_token"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = client()
        .get(format!("{}/api/v2/x", sim.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn scripted_faults_fail_the_next_calls_in_order() {
    let sim = start_sim(sim_config()).await;
    for (kind, count) in [
        ("status500", 1),
        ("garbage", 1),
        ("empty", 1),
        ("rate_limit", 1),
        ("invalid_client", 1),
    ] {
        assert_eq!(
            sim_post(&sim, "/__sim/faults", json!({"kind": kind, "count": count}))
                .await
                .status(),
            200
        );
    }
    let r = mint(&sim, CLIENT_ID, SECRET).await;
    assert_eq!(r.status(), 500);
    let r = mint(&sim, CLIENT_ID, SECRET).await;
    assert_eq!(r.status(), 200);
    assert!(
        serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).is_err(),
        "garbage is not JSON"
    );
    let r = mint(&sim, CLIENT_ID, SECRET).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));
    let r = mint(&sim, CLIENT_ID, SECRET).await;
    assert_eq!(r.status(), 400);
    let r = mint(&sim, CLIENT_ID, SECRET).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        mint(&sim, CLIENT_ID, SECRET).await.status(),
        200,
        "faults are used up"
    );
    let s = stats(&sim).await;
    assert_eq!(s["token_requests"]["total"], 6);
    assert_eq!(s["token_requests"]["by_outcome"]["status500"], 1);
}

#[tokio::test]
async fn timeout_fault_hangs_until_the_caller_gives_up() {
    let sim = start_sim(sim_config()).await;
    sim_post(
        &sim,
        "/__sim/faults",
        json!({"kind": "timeout", "count": 1}),
    )
    .await;
    let r = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(format!("{}/oauth/token", sim.url()))
        .basic_auth(CLIENT_ID, Some(SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout());
    assert_eq!(mint(&sim, CLIENT_ID, SECRET).await.status(), 200);
}

#[tokio::test]
async fn latency_is_added() {
    let sim = start_sim(sim_config()).await;
    let r = sim_put(
        &sim,
        "/__sim/latency",
        json!({"token_ms": 200, "api_ms": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let started = std::time::Instant::now();
    assert_eq!(mint(&sim, CLIENT_ID, SECRET).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn revoke_all_or_one_client() {
    let sim = start_sim(sim_config()).await;
    sim_post(&sim, "/__sim/clients/other/secrets", json!({"secret": "o"})).await;
    let mine = mint_token(&sim).await;
    let v: Value = mint(&sim, "other", "o").await.json().await.unwrap();
    let theirs = v["access_token"].as_str().unwrap().to_string();
    let r: Value = sim_post(&sim, "/__sim/revoke", json!({"client_id": "other"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["revoked"], 1);
    let c = client();
    let status = |t: String| {
        let c = c.clone();
        let url = format!("{}/api/v2/x", sim.url());
        async move { c.get(url).bearer_auth(t).send().await.unwrap().status() }
    };
    assert_eq!(status(theirs).await, 401);
    assert_eq!(status(mine.clone()).await, 200);
    sim_post(&sim, "/__sim/revoke", json!({})).await;
    assert_eq!(status(mine).await, 401);
    let s = stats(&sim).await;
    assert_eq!(s["revocations"], 2);
    assert_eq!(s["live_tokens"], 0);
}

#[tokio::test]
async fn control_api_rejects_bad_input_with_reasons() {
    let sim = start_sim(sim_config()).await;
    let c = client();
    let cases = [
        ("POST", "/__sim/faults", "{\"kind\":\"meteor\"}"),
        (
            "POST",
            "/__sim/faults",
            "{\"kind\":\"status500\",\"count\":0}",
        ),
        ("POST", "/__sim/faults", "not json"),
        ("PUT", "/__sim/latency", "{\"token_ms\":-1}"),
        ("PUT", "/__sim/token-lifetime", "{\"seconds\":0}"),
        ("POST", "/__sim/clients/x/secrets", "{\"secret\":\"\"}"),
        ("POST", "/__sim/revoke", "[1,2]"),
    ];
    for (method, path, body) in cases {
        let r = c
            .request(method.parse().unwrap(), format!("{}{path}", sim.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{method} {path} {body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string());
    }
    let r = c
        .delete(format!("{}/__sim/clients/nobody/secrets/x", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{}/__sim/rotate-signing-key", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "no signing keys in opaque mode");
}

#[tokio::test]
async fn jwt_mode_signs_with_a_published_key_and_rotation_keeps_the_old_one() {
    let sim = start_sim(SimConfig {
        token_format: TokenFormat::Jwt,
        ..sim_config()
    })
    .await;
    let token = mint_token(&sim).await;
    let jwks: Value = get_json(&format!("{}/.well-known/jwks.json", sim.url())).await;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let kid = header.kid.unwrap();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap();
    let decoding = jsonwebtoken::DecodingKey::from_rsa_components(
        key["n"].as_str().unwrap(),
        key["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[genesys_auth_proxy::sim::jwt::AUDIENCE]);
    validation.set_issuer(&[sim.url()]);
    let data = jsonwebtoken::decode::<Value>(&token, &decoding, &validation).unwrap();
    assert_eq!(data.claims["sub"], CLIENT_ID);
    assert!(
        data.claims["jti"].is_string()
            && data.claims["iat"].is_u64()
            && data.claims["exp"].is_u64()
    );

    let r: Value = client()
        .post(format!("{}/__sim/rotate-signing-key", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_kid = r["kid"].as_str().unwrap().to_string();
    assert_ne!(new_kid, kid);
    let jwks: Value = get_json(&format!("{}/.well-known/jwks.json", sim.url())).await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&kid.as_str()) && kids.contains(&new_kid.as_str()));
    let newer = mint_token(&sim).await;
    assert_eq!(
        jsonwebtoken::decode_header(&newer).unwrap().kid.unwrap(),
        new_kid
    );
    // JWTs are still accepted by the API like opaque tokens.
    let r = client()
        .get(format!("{}/api/v2/tokens/me", sim.url()))
        .bearer_auth(&newer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn jwks_is_absent_for_opaque_tokens() {
    let sim = start_sim(sim_config()).await;
    let r = get(&format!("{}/.well-known/jwks.json", sim.url())).await;
    assert_eq!(r.status(), 404);
}
