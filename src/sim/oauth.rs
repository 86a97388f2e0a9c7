//! `POST /oauth/token` (client-credentials grant, as on `login.<domain>`) and the JWKS.
//!
//! Answers follow GENESYS.md: wrong credentials are 401 `invalid_client`; throttling is **400**
//! `invalid_request` with a description starting `rate limit exceeded;`; JSON bodies and
//! credentials in the form are not accepted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::state::{FaultKind, SimState};
use super::TokenFormat;

/// How long a `timeout` fault hangs: longer than any sane client timeout, bounded so a
/// forgotten connection does not live forever.
const HANG: Duration = Duration::from_secs(300);

pub async fn token(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = state
        .token_latency_ms
        .load(std::sync::atomic::Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if let Some(fault) = state.next_fault() {
        return fault_response(&state, fault).await;
    }
    let (outcome, response) = grant(&state, &headers, &body);
    state.count_token_outcome(outcome);
    response
}

/// A stats outcome and the answer that goes with it.
type Answer = (&'static str, Response);

/// A refused grant request: stats outcome, OAuth `error`, description (answered with 400).
type BadRequest = (&'static str, &'static str, &'static str);

fn bad_request((outcome, error, description): BadRequest) -> Answer {
    let answer = oauth_error(StatusCode::BAD_REQUEST, error, description);
    (outcome, answer)
}

/// Runs the grant and returns the stats outcome with the answer.
fn grant(state: &SimState, headers: &HeaderMap, body: &[u8]) -> Answer {
    if let Err(refused) = client_credentials_request(headers, body) {
        return bad_request(refused);
    }
    let Some((client_id, secret)) = basic_credentials(headers) else {
        return ("invalid_client", invalid_client());
    };
    if state.token_rate_limited(&client_id, Instant::now()) {
        return ("rate_limited", rate_limited());
    }
    if !state.check_credentials(&client_id, &secret) {
        return ("invalid_client", invalid_client());
    }
    let lifetime = state
        .token_lifetime_seconds
        .load(std::sync::atomic::Ordering::Relaxed);
    let token = match state.config.token_format {
        TokenFormat::Opaque => super::random_token(),
        TokenFormat::Jwt => match state.keys.sign(&client_id, lifetime) {
            Some(t) => t,
            None => {
                let error = oauth_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "signing failed",
                );
                return ("server_error", error);
            }
        },
    };
    let lifetime = state.store_token(&token, &client_id, Instant::now());
    let body = serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": lifetime,
    });
    let answer = (StatusCode::OK, no_store(), Json(body)).into_response();
    ("success", answer)
}

/// Checks the request is a form-encoded client-credentials grant, as Genesys requires.
fn client_credentials_request(headers: &HeaderMap, body: &[u8]) -> Result<(), BadRequest> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return Err((
            "invalid_request",
            "invalid_request",
            "request body must be application/x-www-form-urlencoded",
        ));
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| ("invalid_request", "invalid_request", "malformed form body"))?;
    let grant_type = form.iter().find(|(k, _)| k == "grant_type");
    match grant_type.map(|(_, v)| v.as_str()) {
        Some("client_credentials") => Ok(()),
        Some(_) => Err((
            "unsupported_grant_type",
            "unsupported_grant_type",
            "unsupported grant type",
        )),
        None => Err(("invalid_request", "invalid_request", "missing grant_type")),
    }
}

async fn fault_response(state: &SimState, fault: FaultKind) -> Response {
    let (outcome, response) = match fault {
        FaultKind::Status500 => (
            "status500",
            oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal server error (simulated)",
            ),
        ),
        FaultKind::Garbage => (
            "garbage",
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body>upstream connect error</body></html>",
            )
                .into_response(),
        ),
        FaultKind::Empty => (
            "empty",
            (StatusCode::OK, Json(serde_json::json!({}))).into_response(),
        ),
        FaultKind::RateLimit => ("rate_limited", rate_limited()),
        FaultKind::InvalidClient => ("invalid_client", invalid_client()),
        FaultKind::Timeout => {
            state.count_token_outcome("timeout");
            tokio::time::sleep(HANG).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
    };
    state.count_token_outcome(outcome);
    response
}

pub async fn jwks(State(state): State<Arc<SimState>>) -> Response {
    if state.config.token_format != TokenFormat::Jwt {
        return super::genesys_error(
            StatusCode::NOT_FOUND,
            "not.found",
            "JWKS is only published with --token-format jwt (Genesys tokens are opaque)",
        );
    }
    Json(state.keys.jwks()).into_response()
}

/// `Authorization: Basic base64(id:secret)` → `(id, secret)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    if id.is_empty() {
        return None;
    }
    Some((id.to_string(), secret.to_string()))
}

fn invalid_client() -> Response {
    let body = serde_json::json!({
        "error": "invalid_client",
        "description": "authentication failed",
        "error_description": "authentication failed",
    });
    (StatusCode::UNAUTHORIZED, no_store(), Json(body)).into_response()
}

fn rate_limited() -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "rate limit exceeded; please wait before requesting another token",
    )
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = serde_json::json!({
        "error": error,
        "description": description,
        "error_description": description,
    });
    (status, no_store(), Json(body)).into_response()
}

fn no_store() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}
