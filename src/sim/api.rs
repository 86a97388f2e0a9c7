//! `/api/v2/*` as on `api.<domain>`: bearer checks, the per-token rate limit, a few real
//! resources (`tokens/me`, `organizations/me`, `users`) and an echo for everything else.
//!
//! Every answer carries `ININ-Correlation-Id` and the `inin-ratelimit-*` headers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::state::{ApiAdmission, SimState, TokenRefusal};
use super::{correlation_id, genesys_error, genesys_error_with};
use crate::fingerprint::sha256_hex;

/// The fixed organisation every simulated client belongs to.
const ORG_ID: &str = "6d2f0b7e-5c1a-4a8e-9d3b-2f1e0c9a8b7d";
const ORG_NAME: &str = "Simulated Org";
/// How many users `GET /api/v2/users` lists.
pub const USER_COUNT: u64 = 137;

pub async fn handle(
    State(state): State<Arc<SimState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = bearer(&headers) else {
        state.count_api(401, None);
        return genesys_error(
            StatusCode::UNAUTHORIZED,
            "authentication.required",
            "No authentication bearer token specified in authorization header.",
        );
    };
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    let preserve_idle =
        path == "/api/v2/tokens/me" && query.split('&').any(|kv| kv == "preserveIdleTTL=true");
    let admission = match state.admit(token, Instant::now(), preserve_idle) {
        Ok(a) => a,
        Err(refusal) => {
            state.count_api(401, None);
            state.count_refusal(refusal);
            let message = match refusal {
                TokenRefusal::Unknown => "Invalid login credentials.",
                TokenRefusal::Expired => "Invalid login credentials. The token has expired.",
                TokenRefusal::Idle => "Invalid login credentials. The session idled out.",
            };
            return genesys_error(StatusCode::UNAUTHORIZED, "bad.credentials", message);
        }
    };
    let limits = ratelimit_headers(&admission);
    if admission.limited {
        state.count_api(429, Some(&admission.fingerprint));
        let mut headers = limits;
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(admission.reset_seconds),
        );
        let message = format!(
            "Rate limit exceeded the maximum. Retry the request in [{}] seconds",
            admission.reset_seconds
        );
        return genesys_error_with(
            StatusCode::TOO_MANY_REQUESTS,
            "too.many.requests.retry.after",
            &message,
            headers,
        );
    }
    if let Some(seconds) = state.endpoint_limited(path, Instant::now()) {
        // Genesys's normalised body, the same as for the token's own limit; only the token's
        // headers (count below allowed) tell it apart.
        state.count_api(429, None);
        let mut headers = limits;
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        let message =
            format!("Rate limit exceeded the maximum. Retry the request in [{seconds}] seconds");
        return genesys_error_with(
            StatusCode::TOO_MANY_REQUESTS,
            "too.many.requests.retry.after",
            &message,
            headers,
        );
    }
    state.api_in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(&state);
    let latency = state.api_latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let response = route(
        &state, &method, path, query, &headers, &body, token, &admission,
    );
    state.count_api(response.status().as_u16(), Some(&admission.fingerprint));
    with_headers(response, limits)
}

/// Decrements the in-flight count however the handler ends (including cancellation).
struct InFlight<'a>(&'a SimState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.api_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
fn route(
    state: &SimState,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
    token: &str,
    admission: &ApiAdmission,
) -> Response {
    match (method.as_str(), path) {
        ("GET", "/api/v2/tokens/me") => Json(token_info(admission)).into_response(),
        ("HEAD", "/api/v2/tokens/me") => StatusCode::OK.into_response(),
        ("DELETE", "/api/v2/tokens/me") => {
            state.revoke_token(token);
            StatusCode::NO_CONTENT.into_response()
        }
        ("GET", "/api/v2/organizations/me") => Json(organization()).into_response(),
        ("GET", "/api/v2/users") => users(query),
        _ => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            Json(serde_json::json!({
                "method": method.as_str(),
                "path": path,
                "query": query,
                "host": host,
                "body_sha256": sha256_hex(body),
                "body_len": body.len(),
                "client_id": admission.client_id,
                "token_fingerprint": admission.fingerprint,
                "header_names": header_names(headers),
                // W3C trace context carries no secret: echoed so a test sees what Genesys got.
                "traceparent": headers.get("traceparent").and_then(|v| v.to_str().ok()),
                "tracestate": headers.get("tracestate").and_then(|v| v.to_str().ok()),
                "content_length": headers.get_all(header::CONTENT_LENGTH).iter().map(|v| v.to_str().unwrap_or("")).collect::<Vec<_>>(),
            }))
            .into_response()
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn ratelimit_headers(a: &ApiAdmission) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("inin-ratelimit-count", HeaderValue::from(a.count));
    h.insert("inin-ratelimit-allowed", HeaderValue::from(a.allowed));
    h.insert("inin-ratelimit-reset", HeaderValue::from(a.reset_seconds));
    h
}

fn with_headers(mut response: Response, extra: HeaderMap) -> Response {
    let headers = response.headers_mut();
    headers.extend(extra);
    if !headers.contains_key("inin-correlation-id") {
        if let Ok(v) = HeaderValue::from_str(&correlation_id()) {
            headers.insert("inin-correlation-id", v);
        }
    }
    response
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn token_info(a: &ApiAdmission) -> serde_json::Value {
    let org = serde_json::json!({"id": ORG_ID, "name": ORG_NAME, "selfUri": format!("/api/v2/organizations/{ORG_ID}")});
    let mut info = serde_json::json!({
        "organization": org,
        "homeOrganization": org,
        "authorizedScope": [],
        "OAuthClient": {
            "id": a.client_id,
            "name": format!("Simulated client {}", a.client_id),
            "organization": {"id": ORG_ID},
        },
        "dateCreated": rfc3339(a.issued_at),
    });
    if let Some(idles) = a.idles_at {
        info["dateTokenIdles"] = serde_json::Value::String(rfc3339(idles));
    }
    info
}

fn organization() -> serde_json::Value {
    serde_json::json!({
        "id": ORG_ID,
        "name": ORG_NAME,
        "defaultLanguage": "en-us",
        "defaultCountryCode": "US",
        "thirdPartyOrgName": "simulated-org",
        "domain": "simulated-org",
        "version": 42,
        "state": "active",
        "defaultSiteId": "a1b2c3d4-0000-4000-8000-000000000001",
        "supportURI": "https://help.mypurecloud.com",
        "voicemailEnabled": true,
        "productPlatform": "PureCloud",
        "selfUri": "/api/v2/organizations/me",
        "features": {"realtimeCIC": false, "purecloud": true},
    })
}

/// Paged listing of [`USER_COUNT`] generated users; `pageSize` 1..=500 (default 25),
/// `pageNumber` from 1.
fn users(query: &str) -> Response {
    let mut page_size = 25u64;
    let mut page_number = 1u64;
    for (k, v) in form_pairs(query) {
        let parsed = v.parse::<u64>();
        match (k.as_str(), parsed) {
            ("pageSize", Ok(n)) if (1..=500).contains(&n) => page_size = n,
            ("pageNumber", Ok(n)) if n >= 1 => page_number = n,
            ("pageSize", _) | ("pageNumber", _) => {
                return genesys_error(
                    StatusCode::BAD_REQUEST,
                    "bad.request",
                    &format!("The request could not be understood by the server due to malformed syntax: invalid {k}"),
                )
            }
            _ => {}
        }
    }
    let page_count = USER_COUNT.div_ceil(page_size);
    let first = (page_number - 1).saturating_mul(page_size);
    let entities: Vec<_> = (first..USER_COUNT.min(first.saturating_add(page_size)))
        .map(user)
        .collect();
    Json(serde_json::json!({
        "entities": entities,
        "pageSize": page_size,
        "pageNumber": page_number,
        "total": USER_COUNT,
        "pageCount": page_count,
        "firstUri": format!("/api/v2/users?pageSize={page_size}&pageNumber=1"),
        "lastUri": format!("/api/v2/users?pageSize={page_size}&pageNumber={page_count}"),
        "selfUri": format!("/api/v2/users?pageSize={page_size}&pageNumber={page_number}"),
    }))
    .into_response()
}

fn user(i: u64) -> serde_json::Value {
    serde_json::json!({
        "id": format!("00000000-0000-4000-8000-{i:012}"),
        "name": format!("Sim User {i}"),
        "email": format!("user{i}@example.com"),
        "state": "active",
        "username": format!("user{i}@example.com"),
        "version": 1,
        "division": {"id": "00000000-0000-4000-8000-0000000d1e00", "name": "Home"},
        "selfUri": format!("/api/v2/users/00000000-0000-4000-8000-{i:012}"),
    })
}

/// The request's header names, lower case and sorted (values are never echoed: one is the
/// bearer token).
fn header_names(headers: &HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str(query).unwrap_or_default()
}
