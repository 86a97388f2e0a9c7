//! The control API under `/__sim/`: change the simulated Genesys org while it runs.
//!
//! Only loopback peers may call it (403 otherwise). Bodies are JSON; bad input gets 400 with a
//! reason, never a panic.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::state::{FaultKind, SimState};

pub fn router() -> Router<Arc<SimState>> {
    Router::new()
        .route("/clients/{id}/secrets", post(add_secret))
        .route("/clients/{id}/secrets/{secret}", delete(remove_secret))
        .route("/revoke", post(revoke))
        .route("/faults", post(faults))
        .route("/latency", put(latency))
        .route("/token-lifetime", put(token_lifetime))
        .route("/rotate-signing-key", post(rotate_signing_key))
        .route("/hostile-tokens", post(hostile_tokens))
        .route("/last-token-request", get(last_token_request))
        .route("/stats", get(stats))
        .route("/issued-tokens", get(issued_tokens))
        .route("/huge", get(huge))
        .layer(middleware::from_fn(loopback_only))
}

async fn loopback_only(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if !peer.ip().is_loopback() {
        return bad(
            StatusCode::FORBIDDEN,
            "the control API answers loopback peers only",
        );
    }
    next.run(request).await
}

fn bad(status: StatusCode, reason: &str) -> Response {
    (status, Json(serde_json::json!({ "error": reason }))).into_response()
}

fn ok(value: serde_json::Value) -> Response {
    (StatusCode::OK, Json(value)).into_response()
}

/// Parses a JSON body, answering 400 naming the problem instead of axum's plain-text rejection.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    secret: String,
}

async fn add_secret(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let body: SecretBody = match parse(&body) {
        Ok(b) => b,
        Err(reason) => return bad(StatusCode::BAD_REQUEST, &reason),
    };
    if id.is_empty() || id.contains(':') || body.secret.is_empty() {
        return bad(
            StatusCode::BAD_REQUEST,
            "client id must be non-empty without ':' and secret non-empty",
        );
    }
    let added = state.add_secret(&id, &body.secret);
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(serde_json::json!({ "client_id": id, "added": added })),
    )
        .into_response()
}

async fn remove_secret(
    State(state): State<Arc<SimState>>,
    Path((id, secret)): Path<(String, String)>,
) -> Response {
    if state.remove_secret(&id, &secret) {
        ok(serde_json::json!({ "client_id": id, "removed": true }))
    } else {
        bad(StatusCode::NOT_FOUND, "no such client or secret")
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    client_id: Option<String>,
}

async fn revoke(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let body: RevokeBody = if body.is_empty() {
        RevokeBody::default()
    } else {
        match parse(&body) {
            Ok(b) => b,
            Err(reason) => return bad(StatusCode::BAD_REQUEST, &reason),
        }
    };
    let n = state.revoke_all(body.client_id.as_deref());
    ok(serde_json::json!({ "revoked": n }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    kind: FaultKind,
    #[serde(default = "one")]
    count: u64,
}

fn one() -> u64 {
    1
}

async fn faults(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let body: FaultBody = match parse(&body) {
        Ok(b) => b,
        Err(reason) => return bad(StatusCode::BAD_REQUEST, &reason),
    };
    if body.count == 0 || body.count > 1_000_000 {
        return bad(
            StatusCode::BAD_REQUEST,
            "count must be between 1 and 1000000",
        );
    }
    state.push_fault(body.kind, body.count);
    ok(serde_json::json!({ "kind": body.kind, "count": body.count }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyBody {
    token_ms: Option<u64>,
    api_ms: Option<u64>,
}

/// Added latency is capped at ten minutes so a typo cannot wedge a test run for hours.
const MAX_LATENCY_MS: u64 = 600_000;

async fn latency(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let body: LatencyBody = match parse(&body) {
        Ok(b) => b,
        Err(reason) => return bad(StatusCode::BAD_REQUEST, &reason),
    };
    if body.token_ms.unwrap_or(0) > MAX_LATENCY_MS || body.api_ms.unwrap_or(0) > MAX_LATENCY_MS {
        return bad(StatusCode::BAD_REQUEST, "latency must be at most 600000 ms");
    }
    if let Some(ms) = body.token_ms {
        state.token_latency_ms.store(ms, Ordering::Relaxed);
    }
    if let Some(ms) = body.api_ms {
        state.api_latency_ms.store(ms, Ordering::Relaxed);
    }
    ok(serde_json::json!({
        "token_ms": state.token_latency_ms.load(Ordering::Relaxed),
        "api_ms": state.api_latency_ms.load(Ordering::Relaxed),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifetimeBody {
    seconds: u64,
}

async fn token_lifetime(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let body: LifetimeBody = match parse(&body) {
        Ok(b) => b,
        Err(reason) => return bad(StatusCode::BAD_REQUEST, &reason),
    };
    // Genesys allows 300..=172800; the simulator also allows shorter lifetimes so tests of
    // proactive refresh finish in seconds.
    if body.seconds == 0 || body.seconds > 172_800 {
        return bad(
            StatusCode::BAD_REQUEST,
            "seconds must be between 1 and 172800",
        );
    }
    state
        .token_lifetime_seconds
        .store(body.seconds, Ordering::Relaxed);
    ok(serde_json::json!({ "seconds": body.seconds }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// Withdraw the old keys from the JWKS at once instead of after the grace period.
    #[serde(default)]
    retire_old: bool,
}

async fn rotate_signing_key(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let body: RotateBody = if body.is_empty() {
        RotateBody::default()
    } else {
        match parse(&body) {
            Ok(b) => b,
            Err(reason) => return bad(StatusCode::BAD_REQUEST, &reason),
        }
    };
    match state.keys.rotate(body.retire_old) {
        Some(kid) => ok(serde_json::json!({ "kid": kid })),
        None => bad(
            StatusCode::CONFLICT,
            "signing keys exist only with --token-format jwt",
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostileBody {
    kind: super::jwt::Hostile,
    #[serde(default = "one")]
    count: u64,
}

/// Queues hostile tokens (JWT mode): the next `count` grants issue a token of `kind`.
async fn hostile_tokens(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let body: HostileBody = match parse(&body) {
        Ok(b) => b,
        Err(reason) => return bad(StatusCode::BAD_REQUEST, &reason),
    };
    if state.config.token_format != super::TokenFormat::Jwt {
        return bad(
            StatusCode::CONFLICT,
            "hostile tokens exist only with --token-format jwt",
        );
    }
    if body.count == 0 || body.count > 1000 {
        return bad(StatusCode::BAD_REQUEST, "count must be between 1 and 1000");
    }
    state.keys.push_hostile(body.kind, body.count);
    ok(serde_json::json!({ "kind": body.kind, "count": body.count }))
}

/// The last token request's authentication method and parameters (JWT mode; never the
/// secret).
async fn last_token_request(State(state): State<Arc<SimState>>) -> Response {
    let last = crate::sync::lock(&state.last_token_request).clone();
    ok(last.unwrap_or(serde_json::Value::Null))
}

async fn stats(State(state): State<Arc<SimState>>) -> Response {
    ok(state.stats_json(Instant::now()))
}

/// The raw values of the most recently issued tokens (simulator only: they let a leak test run
/// against a simulator in another process grep every output for them).
async fn issued_tokens(State(state): State<Arc<SimState>>) -> Response {
    ok(serde_json::json!({ "tokens": state.recent_token_values() }))
}

/// `GET /__sim/huge?mib=N` (1 to 256, default 64): N MiB of white space, chunked (no
/// `Content-Length`), for clients that must read answers under a size cap (point a
/// `jwks_url` here).
async fn huge(Query(q): Query<std::collections::HashMap<String, String>>) -> Response {
    let mib: usize = q
        .get("mib")
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=256).contains(n))
        .unwrap_or(64);
    let chunks = (0..mib)
        .map(|_| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![b' '; 1 << 20])));
    axum::body::Body::from_stream(futures_util::stream::iter(chunks)).into_response()
}
