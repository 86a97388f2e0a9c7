//! `POST /oauth/token` (client-credentials grant, as on `login.<domain>`) and the JWKS.
//!
//! Answers follow GENESYS.md: wrong credentials are 401 `invalid_client`; throttling is **400**
//! `invalid_request` with a description starting `rate limit exceeded;`; JSON bodies and
//! credentials in the form are not accepted.
//!
//! With `--token-format jwt` the simulator stands for a generic OAuth2 issuer instead (Genesys
//! tokens are opaque): it also takes `client_secret_post`, form-decodes Basic credentials as
//! RFC 6749 §2.3.1 says, publishes an OpenID discovery document, and keeps the last token
//! request's parameters (never the secret) for `GET /__sim/last-token-request`.

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
        if fault == FaultKind::FarExpiry {
            return far_expiry(&state, &headers, &body).await;
        }
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
    let form = match client_credentials_request(headers, body) {
        Ok(form) => form,
        Err(refused) => return bad_request(refused),
    };
    let generic = state.config.token_format == TokenFormat::Jwt;
    let (client_id, secret) = match client_credentials(state, headers, &form, generic) {
        Ok(Some(pair)) => pair,
        Ok(None) => return ("invalid_client", invalid_client()),
        Err(refused) => return bad_request(refused),
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
    // A JWT whose exp is the point of the test comes without expires_in.
    let mut exp_only = false;
    let token = match state.config.token_format {
        TokenFormat::Opaque => super::random_token(),
        TokenFormat::Jwt => match state.keys.sign(&client_id, lifetime) {
            Some((t, hostile)) => {
                use super::jwt::Hostile;
                exp_only = matches!(hostile, Some(Hostile::FarExp | Hostile::ExpPastYear9999));
                t
            }
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
    let mut body = serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": lifetime,
    });
    if exp_only {
        body.as_object_mut().map(|b| b.remove("expires_in"));
    }
    let answer = (StatusCode::OK, no_store(), Json(body)).into_response();
    ("success", answer)
}

/// The client's id and secret: Basic only for Genesys; Basic (form-decoded) or the form's
/// `client_id`/`client_secret` for a generic issuer, never both (RFC 6749 §2.3). A generic
/// request's parameters are recorded first.
fn client_credentials(
    state: &SimState,
    headers: &HeaderMap,
    form: &[(String, String)],
    generic: bool,
) -> Result<Option<(String, String)>, BadRequest> {
    let basic = basic_credentials(headers);
    if !generic {
        return Ok(basic);
    }
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let posted = field("client_id").zip(field("client_secret"));
    let method = match (&basic, &posted) {
        (Some(_), Some(_)) => {
            return Err((
                "invalid_request",
                "invalid_request",
                "more than one client authentication method",
            ))
        }
        (Some(_), None) => "client_secret_basic",
        (None, Some(_)) => "client_secret_post",
        (None, None) => "none",
    };
    let params: serde_json::Map<String, serde_json::Value> = form
        .iter()
        .filter(|(k, _)| k != "client_secret")
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    *crate::sync::lock(&state.last_token_request) = Some(serde_json::json!({
        "auth_method": method,
        "params": params,
        "client_secret_in_form": field("client_secret").is_some(),
    }));
    Ok(basic
        .map(|(id, secret)| (form_decode(&id), form_decode(&secret)))
        .or(posted))
}

/// Undoes `application/x-www-form-urlencoded` encoding of one value.
fn form_decode(s: &str) -> String {
    form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Checks the request is a form-encoded client-credentials grant, as Genesys requires, and
/// returns its parameters.
fn client_credentials_request(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<(String, String)>, BadRequest> {
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
        Some("client_credentials") => Ok(form),
        Some(_) => Err((
            "unsupported_grant_type",
            "unsupported_grant_type",
            "unsupported grant type",
        )),
        None => Err(("invalid_request", "invalid_request", "missing grant_type")),
    }
}

/// A real grant whose answer claims a lifetime no issuer gives (the token itself lives as
/// configured).
async fn far_expiry(state: &SimState, headers: &HeaderMap, body: &[u8]) -> Response {
    let (outcome, response) = grant(state, headers, body);
    state.count_token_outcome(outcome);
    if outcome != "success" {
        return response;
    }
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let mut answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    // serde_json writes 1e300 as a plain (finite) number.
    answer["expires_in"] = serde_json::json!(1e300);
    (StatusCode::OK, no_store(), Json(answer)).into_response()
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
        FaultKind::HugeBody => {
            let chunks = (0..64).map(|_| {
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![b' '; 1 << 20]))
            });
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            ("huge_body", (StatusCode::OK, body).into_response())
        }
        // Answered by `far_expiry` before faults are read.
        FaultKind::FarExpiry => ("far_expiry", StatusCode::OK.into_response()),
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

/// `GET /.well-known/openid-configuration` (JWT mode): where a client discovers the JWKS.
pub async fn discovery(State(state): State<Arc<SimState>>) -> Response {
    if state.config.token_format != TokenFormat::Jwt {
        return super::genesys_error(
            StatusCode::NOT_FOUND,
            "not.found",
            "discovery is only published with --token-format jwt",
        );
    }
    let issuer = state.keys.issuer();
    Json(serde_json::json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/oauth/token"),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
    .into_response()
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
