//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics` (and `/reload`), on its own
//! port so load balancers and scrapers never share the proxy's allowlists or capacity.
//!
//! It has limits of its own ([`serve`]): at most `admin.max_connections` open at once (within
//! the descriptors the proxy's cap keeps free), a connection idle or slow for
//! `admin.idle_timeout_ms` is closed, so a flood of idle connections on either listener never
//! silences the other. Every path but `/healthz` and `/readyz` answers only a `Host` that is
//! the listener's own address, `localhost`, a loopback address or one of `admin.allowed_hosts`:
//! a web page that rebinds its own name to 127.0.0.1 cannot read `/status` or reload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::anomaly::AnomalyMonitor;
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::reload::{ReloadOutcome, Reloader};
use crate::secret::Secret;
use crate::sync::lock;
use crate::token::refresher::RefreshInfo;
use crate::token::store::{TokenSource, TokenStore};

/// One credential's running parts, as the admin listener reports them.
pub struct CredentialView {
    /// `default` for the top-level credential, else its `[[credential]]` name.
    pub name: crate::config::CredentialName,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    pub refresh: Arc<Mutex<RefreshInfo>>,
    pub anomaly: Arc<AnomalyMonitor>,
    pub budget: Arc<crate::budget::Budget>,
    /// With `validation = "jwks"`.
    pub jwks: Option<Arc<crate::token::jwks::Jwks>>,
    /// With `[cluster]`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

pub struct AdminState {
    /// Every credential: the top-level one first, then each `[[credential]]` in file order.
    pub credentials: Vec<CredentialView>,
    /// `[[app]]`: the current apps (for `/status`) and their metrics.
    pub apps: Arc<crate::apps::Gatekeeper>,
    pub audit: Arc<AuditLog>,
    /// True once shutdown began: `/readyz` answers 503 so balancers drain first.
    pub draining: AtomicBool,
    pub reloader: Arc<Reloader>,
    /// `admin.reload_token`: required on `POST /reload` when set.
    pub reload_token: Option<Secret>,
}

impl AdminState {
    /// Every credential, the top-level one first.
    pub fn credentials(&self) -> impl Iterator<Item = &CredentialView> {
        self.credentials.iter()
    }

    /// The top-level credential.
    pub fn top(&self) -> &CredentialView {
        &self.credentials[0]
    }
}

/// Every pool slot: its token (fingerprint only) and the budget left in its window.
fn pool_view(state: &CredentialView, now: Instant) -> serde_json::Value {
    let remaining = state.budget.remaining();
    let slots: Vec<serde_json::Value> = (0..state.store.slots())
        .map(|slot| {
            let token = state.store.slot(slot);
            serde_json::json!({
                "slot": slot,
                "fingerprint": token.as_ref().map(|t| t.fingerprint.clone()),
                "generation": token.as_ref().map(|t| t.generation),
                "valid": token.as_ref().is_some_and(|t| t.is_valid_at(now)),
                "refused_by_api": token.as_ref().is_some_and(|t| state.store.is_refused(t)),
                "expires_in_seconds": token.as_ref().map(|t| t.expires_at.saturating_duration_since(now).as_secs()),
                "idle_seconds": token.as_ref().map(|t| t.idle_for(now).as_secs()),
                "resting": token.as_ref().is_some_and(|t| state.store.is_dormant(t, now)),
                "wanted": state.store.is_wanted(slot),
                "budget_remaining": remaining.get(slot),
            })
        })
        .collect();
    serde_json::Value::Array(slots)
}

/// Routes shown in `/status` at most (the longest held first); `total` counts them all.
const HELD_ROUTES_SHOWN: usize = 32;

/// Routes held after an endpoint or org 429, with how long they have been and will be held.
fn held_routes(state: &CredentialView, now: Instant) -> serde_json::Value {
    let held = state.budget.holds.snapshot(now);
    let routes: Vec<serde_json::Value> = held
        .iter()
        .take(HELD_ROUTES_SHOWN)
        .map(|h| {
            serde_json::json!({
                "route": h.route,
                "held_for_seconds": h.held_for.as_secs(),
                "retry_after_seconds": h.left.as_secs_f64().ceil() as u64,
                "limited_answers": h.hits,
            })
        })
        .collect();
    serde_json::json!({"total": held.len(), "routes": routes})
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}

/// Ready when shutdown has not begun and every credential (or only `credential`, when named)
/// holds a valid token; otherwise the one-line reason, naming the credential when there are
/// several.
pub fn readiness(state: &AdminState, credential: Option<&str>) -> Result<(), String> {
    if state.draining.load(Ordering::Relaxed) {
        return Err("shutting down".into());
    }
    let several = state.credentials.len() > 1;
    for view in state.credentials() {
        if credential.is_some_and(|name| name != view.name.as_str()) {
            continue;
        }
        if let Err(reason) = credential_readiness(view) {
            return Err(if several {
                format!("credential {}: {reason}", view.name)
            } else {
                reason.to_string()
            });
        }
    }
    Ok(())
}

/// One credential: ready when it holds a valid token.
fn credential_readiness(state: &CredentialView) -> Result<(), &'static str> {
    let store = &state.store;
    // A token presumed idle-dead still counts: the next request re-mints it.
    if store.holds_valid(Instant::now()) {
        return Ok(());
    }
    if store.current().is_none() {
        Err("no token acquired yet")
    } else if store.all_refused() {
        Err("the API refused the current token (401) and no new token is published yet")
    } else {
        Err("token expired and no refresh succeeded")
    }
}

/// `unhealthy` when requests cannot succeed (see [`readiness`]), `degraded` when they do but
/// something needs attention, else `healthy`.
fn health(
    state: &CredentialView,
    info: &RefreshInfo,
    anomalies: bool,
    audit: &AuditLog,
) -> &'static str {
    let token = state.store.current();
    let usable = state.store.holds_valid(Instant::now());
    if !usable {
        "unhealthy"
    } else if info.consecutive_failures > 0
        || info.refresher_panics > 0
        || info.pending_rotation.is_some()
        || anomalies
        || audit.failures() > 0
        || token.is_some_and(|t| t.source == TokenSource::Previous)
    {
        "degraded"
    } else {
        "healthy"
    }
}

async fn readyz(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let credential = query.get("credential").map(String::as_str);
    if let Some(name) = credential {
        if !state.credentials().any(|c| c.name.as_str() == name) {
            return (
                StatusCode::NOT_FOUND,
                format!("no credential named {name:?}\n"),
            )
                .into_response();
        }
    }
    match readiness(&state, credential) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn status(State(state): State<Arc<AdminState>>) -> Response {
    let now = Instant::now();
    let config = state.reloader.info();
    let mut body = credential_status(state.top(), &state.audit, now);
    body["config"] = serde_json::json!({
        "loaded_at": rfc3339(config.loaded_at),
        "generation": config.generation,
        "path": state.reloader.path().display().to_string(),
    });
    body["audit_write_failures"] = state.audit.failures().into();
    body["credentials"] = state
        .credentials()
        .map(|c| (c.name.to_string(), credential_status(c, &state.audit, now)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    body["apps"] = apps_status(&state.apps);
    body["tracing"] = tracing_status();
    body["now"] = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .into();
    Json(body).into_response()
}

/// `tracing` in `/status`: where spans go and what became of them (`null` when off).
fn tracing_status() -> serde_json::Value {
    let (Some(endpoint), Some(m)) = (crate::telemetry::endpoint(), crate::telemetry::metrics())
    else {
        return serde_json::Value::Null;
    };
    use crate::metrics::SpanOutcome as O;
    serde_json::json!({
        "otlp_endpoint": endpoint,
        "queued_spans": m.queued.get(),
        "exported_spans": m.spans.get(O::Exported).get(),
        "dropped_spans": m.spans.get(O::Dropped).get(),
        "failed_spans": m.spans.get(O::Failed).get(),
    })
}

/// `apps` in `/status`: each app's credential, weight and proofs (never a secret, key or
/// token: counts only), and the addresses the failure guard tracks.
fn apps_status(gate: &crate::apps::Gatekeeper) -> serde_json::Value {
    let registry = gate.current();
    let apps: Vec<serde_json::Value> = registry
        .apps()
        .iter()
        .map(|a| {
            let mut proofs = Vec::new();
            if a.client_id.is_some() {
                proofs.push("client_credentials");
            }
            if a.api_keys > 0 {
                proofs.push("api_key");
            }
            if !a.mtls_subjects.is_empty() {
                proofs.push("client_certificate");
            }
            if registry.settings.apps[a.index].jwt.is_some() {
                proofs.push("workload_token");
            }
            serde_json::json!({
                "name": &*a.name,
                "credential": registry.settings.apps[a.index].credential.as_str(),
                "weight": a.key.weight,
                "client_id": a.client_id,
                "api_keys": a.api_keys,
                "mtls_subjects": a.mtls_subjects,
                "proofs": proofs,
                "allowed_methods": a.allowed_methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "allowed_path_prefixes": a.allowed_path_prefixes,
            })
        })
        .collect();
    serde_json::json!({
        "enabled": registry.enabled(),
        "anonymous": match registry.settings.anonymous {
            crate::config::apps::Anonymous::Cidr => "cidr",
            crate::config::apps::Anonymous::Unset => if registry.enabled() { "refused" } else { "cidr" },
        },
        "token_lifetime_seconds": registry.settings.token_lifetime.as_secs(),
        "apps": apps,
        "auth_failure_sources": gate.guard.sources(),
    })
}

/// One credential's part of `/status`: token, refreshes, anomalies, rotation, pool, JWKS and
/// counters.
fn credential_status(state: &CredentialView, audit: &AuditLog, now: Instant) -> serde_json::Value {
    let token = state.store.current();
    let info = lock(&state.refresh).clone();
    let anomaly = state.anomaly.view();
    let health = health(state, &info, !anomaly.active.is_empty(), audit);
    let token_json = token.map(|t| {
        serde_json::json!({
            "valid": t.is_valid_at(now),
            "refused_by_api": state.store.is_refused(&t),
            "expires_at": rfc3339(t.expires_at_wall),
            "expires_in_seconds": t.expires_at.saturating_duration_since(now).as_secs(),
            "generation": t.generation,
            "fingerprint": t.fingerprint,
            "source": t.source.as_str(),
            "lifetime_seconds": t.lifetime.as_secs(),
            // The issuer's longer lifetime, cut to token.max_lifetime_seconds.
            "lifetime_clamped_from_seconds": t.clamped_from.map(|d| d.as_secs()),
        })
    });
    let m = &state.metrics;
    let counter = |v: &prometheus::IntCounterVec| -> u64 {
        let mut total = 0;
        for family in prometheus::core::Collector::collect(v) {
            for metric in family.get_metric() {
                total += metric.get_counter().get_value() as u64;
            }
        }
        total
    };
    serde_json::json!({
        "status": health,
        "token": token_json.unwrap_or(serde_json::json!({"valid": false})),
        "last_refresh": info.last_refresh.map(rfc3339),
        "refresh_count": info.refresh_count,
        "consecutive_refresh_failures": info.consecutive_failures,
        "refresher_panics": info.refresher_panics,
        "last_refresher_panic": info.last_refresher_panic,
        "last_refresh_error": info.last_error,
        "anomaly": {
            "state": if anomaly.active.is_empty() { "clear" } else { "raised" },
            "since": anomaly.since.map(rfc3339),
            "reason": anomaly.reason,
            "active": anomaly.active,
        },
        "rotation": {
            "pending_new_secret": info.pending_rotation.as_ref().map(|p| p.new_secret.clone()),
            "next_attempt_at": info.pending_rotation.as_ref().map(|p| rfc3339(p.next_attempt)),
            "retry_until": info.pending_rotation.as_ref().map(|p| rfc3339(p.retry_until)),
            "last_error": info.last_rotation_error,
        },
        "pool": pool_view(state, now),
        "held_routes": held_routes(state, now),
        "idle_timeout": {
            "seconds": state.store.idle.timeout().map(|t| t.as_secs_f64()),
            "learned_from": state.store.idle.source(),
        },
        "jwks": state.jwks.as_ref().map(|j| {
            let (keys, age, url) = j.view();
            serde_json::json!({
                "key_ids": keys,
                "age_seconds": age.map(|a| a.as_secs()),
                "url": url.map(|u| u.to_string()),
            })
        }),
        "cluster": state.cluster.as_ref().map(|c| c.view()),
        "counters": {
            "requests_total": counter(m.requests.family()),
            "upstream_unauthorized_total": m.upstream_unauthorized_total.get(),
            "replays_total": counter(m.replays.family()),
            "token_requests_total": counter(&m.token_requests_total),
            "upstream_rate_limited_total": m.upstream_rate_limited_total.get(),
            "rejected_requests_total": counter(&m.rejected_requests_total),
        },
    })
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render_process(
            state.credentials().map(|c| &*c.metrics),
            Some(&state.apps.metrics),
            crate::telemetry::metrics(),
        ),
    )
        .into_response()
}

/// Same as SIGHUP: re-read config and secrets, validate, swap. 200 with the outcome, 4xx/5xx
/// with the reason. Only for deliberate callers (see [`reload_allowed`]).
async fn reload(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err((status, reason)) = reload_allowed(&headers, state.reload_token.as_ref()) {
        return (
            status,
            Json(serde_json::json!({"outcome": "refused", "reason": reason})),
        )
            .into_response();
    }
    let report = state
        .reloader
        .reload(crate::reload::Trigger::AdminApi)
        .await;
    (reload_status(report.outcome), Json(report.body)).into_response()
}

/// Who may trigger a reload. Any local process can reach the admin listener, including a web
/// page in a browser on the host, which can send a cross-origin POST without asking. So the
/// request must be one a page cannot send without a CORS preflight (which this listener never
/// grants): `Content-Type: application/json`; a request marked cross-site by the browser is
/// refused outright; and when `admin.reload_token` is set, `Authorization: Bearer <token>`.
pub fn reload_allowed(
    headers: &HeaderMap,
    token: Option<&Secret>,
) -> Result<(), (StatusCode, &'static str)> {
    let value = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if value(header::HeaderName::from_static("sec-fetch-site"))
        .is_some_and(|site| site != "same-origin" && site != "none")
        || value(header::ORIGIN).is_some()
    {
        return Err((
            StatusCode::FORBIDDEN,
            "cross-origin requests cannot reload the proxy",
        ));
    }
    let json = value(header::CONTENT_TYPE).is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send Content-Type: application/json (e.g. curl -X POST -H 'Content-Type: application/json' …/reload)",
        ));
    }
    if let Some(token) = token {
        let given = value(header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::fingerprint::constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
            return Err((
                StatusCode::UNAUTHORIZED,
                "admin.reload_token is set: send Authorization: Bearer <token>",
            ));
        }
    }
    Ok(())
}

/// The HTTP status `POST /reload` answers for each outcome.
pub fn reload_status(outcome: ReloadOutcome) -> StatusCode {
    match outcome {
        ReloadOutcome::Applied | ReloadOutcome::PartiallyApplied | ReloadOutcome::Unchanged => {
            StatusCode::OK
        }
        ReloadOutcome::Rejected => StatusCode::BAD_REQUEST,
        ReloadOutcome::RotationFailed => StatusCode::BAD_GATEWAY,
        // Accepted: the new secret is tried on the refresher's schedule.
        ReloadOutcome::RotationPending => StatusCode::ACCEPTED,
    }
}

/// The admin listener's own limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: std::time::Duration,
    pub allowed_hosts: Arc<Vec<String>>,
}

/// No admin connection lives longer than this, whatever it does (scrapers reconnect).
const CONNECTION_LIFE: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves `router` on `listener` until `stop` fires, within `limits`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    mut stop: crate::shutdown::Shutdown,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or a transient accept error): pause rather than spin.
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin listener: admin.max_connections reached; closing a connection");
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let router = router.clone();
        let hosts = limits.allowed_hosts.clone();
        let idle = limits.idle_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    let allowed = host_checked(req.uri().path())
                        .then(|| req.headers().get(header::HOST))
                        .flatten()
                        .is_none_or(|h| host_allowed(h.to_str().ok(), local, &hosts));
                    async move {
                        if !allowed {
                            return Ok::<_, std::convert::Infallible>(host_refused());
                        }
                        use tower::ServiceExt;
                        router.oneshot(req.map(axum::body::Body::new)).await
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(idle)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFE, conn).await;
        });
    }
}

/// Paths answered whatever the `Host`: probes and balancers send any name.
fn host_checked(path: &str) -> bool {
    !matches!(path, "/healthz" | "/readyz")
}

/// Is `host` (a `Host` header value) the listener's own address, `localhost`, a loopback
/// address or an allowed name? A missing or unreadable header is refused by the caller
/// reading `None` as "not allowed" only when a header was sent.
pub fn host_allowed(host: Option<&str>, local: std::net::SocketAddr, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    // "[::1]:9090", "[::1]", "127.0.0.1:9090", "name:9090", "name".
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, _)) => ip.to_string(),
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
            Some(_) => return false,
            None => host.clone(),
        }
    };
    let name = name.trim_end_matches('.');
    if name == "localhost" || allowed.iter().any(|a| a == name) {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            ip.is_loopback() || ip == local.ip() || ip.to_canonical() == local.ip().to_canonical()
        }
        Err(_) => false,
    }
}

fn host_refused() -> Response {
    (
        StatusCode::MISDIRECTED_REQUEST,
        Json(serde_json::json!({
            "message": "this admin listener answers only its own address, localhost or admin.allowed_hosts in the Host header",
            "code": "proxy.host_not_allowed",
            "status": 421,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod host_tests {
    use super::*;

    // Regression (issue 21): /status and POST /reload answered `Host: evil.example`, so a
    // page rebinding its name to 127.0.0.1 could read status and reload.
    #[test]
    fn only_the_listeners_own_names_pass() {
        let local: std::net::SocketAddr = "10.1.2.3:9090".parse().unwrap();
        let extra = vec!["proxy-admin.ns.svc".to_string()];
        for ok in [
            "localhost",
            "localhost:9090",
            "LOCALHOST:9090",
            "127.0.0.1:9090",
            "127.0.0.5",
            "[::1]:9090",
            "10.1.2.3:9090",
            "proxy-admin.ns.svc:9090",
            "localhost.",
        ] {
            assert!(host_allowed(Some(ok), local, &extra), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9090",
            "10.1.2.4:9090",
            "localhost.evil.example",
            "[::1",
            "127.0.0.1:x",
            "",
        ] {
            assert!(!host_allowed(Some(bad), local, &extra), "{bad}");
        }
        assert!(!host_allowed(None, local, &extra));
        assert!(!host_checked("/healthz") && !host_checked("/readyz"));
        assert!(host_checked("/status") && host_checked("/reload") && host_checked("/metrics"));
    }
}
