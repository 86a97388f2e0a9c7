//! The pingora `ProxyHttp` implementation. Hooks stay thin; the decisions (who may call, which
//! paths pass, whether a 401 is replayed, what error to answer) are plain functions below that
//! are tested without a socket.
//!
//! Hook order for one request: `request_filter` (allowlists, token) → `upstream_peer` →
//! `upstream_request_filter` (strip client credentials, inject bearer, force Host and URI) →
//! `upstream_response_filter` (401 → refresh → replay once) → `logging` (metrics).

mod decide;
mod sanitize;

pub use decide::{
    client_allowed, header_u64, refusal_for, replay_after_401, replayable,
    rewrite_upstream_request, status_label, Refusal, MAX_REPLAYS,
};
pub use sanitize::{normalise_content_length, path_allowed, strip_upgrade};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue};
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorType, RetryType};

use crate::anomaly::{AnomalyMonitor, Kind};
use crate::budget::{Admit, Budget, ClientKey, Refused};
use crate::config::{ApiTarget, Live};
use crate::metrics::Metrics;
use crate::token::store::{Token, TokenStore};

/// The error that tells pingora to run the request again after a 401.
const REPLAY: ErrorType = ErrorType::Custom("replay_after_401");

/// Everything the proxy hooks read. The live settings sit in an `ArcSwap` so a reload can
/// replace them; each request loads them once (`RequestCtx::live`).
pub struct ProxyState {
    pub live: Arc<ArcSwap<Live>>,
    pub api: ApiTarget,
    pub host_header: HeaderValue,
    /// Resolved API addresses; refreshed off the request path by a background task.
    pub upstream_addrs: ArcSwap<Vec<SocketAddr>>,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    pub anomaly: Arc<AnomalyMonitor>,
    /// The token's rate-limit budget and the fair admission queue.
    pub budget: Arc<Budget>,
    /// `genesys.ca_file`: the only CAs trusted for the API host, when set.
    pub upstream_ca: Option<Arc<pingora::protocols::tls::CaType>>,
}

pub struct GenesysProxy {
    pub state: Arc<ProxyState>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    /// The live settings as they were when the request arrived: one snapshot for the whole
    /// request, so a reload mid-request never mixes limits.
    live: Arc<Live>,
    upstream_status: u16,
    /// `ININ-Correlation-Id` of the upstream answer, kept only for the access log.
    correlation_id: Option<String>,
    token: Option<Arc<Token>>,
    /// Replays after 401s so far (at most [`MAX_REPLAYS`]).
    replays: u8,
    /// The newest token generation when the request first saw a 401, and when its replays
    /// must be under way by (`refresh_wait_timeout_ms` after that 401).
    first_401: Option<(u64, Instant)>,
    tries: u8,
    /// Conflicting `Content-Length` values: refused, never forwarded.
    ambiguous_framing: bool,
    /// Who the request counts for in the rate-limit budget.
    client: Option<ClientKey>,
    /// Re-sends after a Genesys 429 so far (at most [`MAX_RATE_RETRIES`]).
    rate_retries: u8,
}

/// Re-sends of one request after Genesys answered 429, at most.
const MAX_RATE_RETRIES: u8 = 2;

/// The error that makes pingora run the request again (see `error_while_proxy`).
fn replay_error() -> Box<Error> {
    let mut e = Error::explain(
        REPLAY,
        "upstream answered 401 or 429; sending the request again",
    );
    e.retry = RetryType::Decided(true);
    e
}

/// The proxy's own 429 when no budget frees within the request's wait: Genesys's shape and
/// message, with an honest `Retry-After`, so SDK retry policies behave as with Genesys.
async fn respond_rate_limited(session: &mut Session, retry_after: Duration) -> Result<()> {
    let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let body = Bytes::from(
        serde_json::json!({
            "message": format!("Rate limit exceeded the maximum. Retry the request in [{seconds}] seconds"),
            "code": "too.many.requests.retry.after",
            "status": 429,
        })
        .to_string(),
    );
    let mut resp = ResponseHeader::build(429, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::RETRY_AFTER, seconds.to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Answers a refusal in the Genesys error shape; a 405 lists the allowed methods.
async fn respond(session: &mut Session, refusal: Refusal, live: &Live) -> Result<()> {
    let body = refusal.body();
    let mut resp = ResponseHeader::build(refusal.status(), Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    if refusal == Refusal::MethodNotAllowed {
        let allow: Vec<&str> = live
            .proxy
            .allowed_methods
            .iter()
            .map(|m| m.as_str())
            .collect();
        resp.insert_header(header::ALLOW, allow.join(", "))?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

impl GenesysProxy {
    /// Records what every upstream answer tells: status, correlation id (for the access log),
    /// the rate-limit headers, and 401/429 counts for metrics and the anomaly detector.
    fn observe_upstream(&self, upstream: &ResponseHeader, ctx: &mut RequestCtx) {
        let metrics = &self.state.metrics;
        ctx.upstream_status = upstream.status.as_u16();
        if ctx.live.log.access_log {
            ctx.correlation_id = upstream
                .headers
                .get("inin-correlation-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        let budget = &self.state.budget;
        if let (Some(token), Some(count), Some(allowed)) = (
            ctx.token.as_ref(),
            header_u64(upstream, "inin-ratelimit-count"),
            header_u64(upstream, "inin-ratelimit-allowed"),
        ) {
            let reset = header_u64(upstream, "inin-ratelimit-reset");
            budget.observe(token, count, allowed, reset);
        }
        match ctx.upstream_status {
            401 => {
                metrics.upstream_unauthorized_total.inc();
                self.state.anomaly.observe(Kind::UnauthorizedSpike);
            }
            429 => {
                metrics.upstream_rate_limited_total.inc();
                self.state.anomaly.observe(Kind::RateLimitStorm);
                if let Some(token) = ctx.token.as_ref() {
                    let retry_after = header_u64(upstream, "retry-after")
                        .map_or(ctx.live.budget.window, Duration::from_secs);
                    budget.exhausted(token, retry_after);
                }
            }
            _ => {}
        }
    }

    /// Genesys answered 429 (the limit is lower than the budget thought, or another user of
    /// the client spent it): the request was not processed, so it is re-sent once budget frees,
    /// if that fits in what is left of its `max_queue_wait_ms`. Otherwise the 429 passes through.
    async fn absorb_429(&self, session: &Session, ctx: &mut RequestCtx) -> Result<()> {
        let metrics = &self.state.metrics;
        let passed = || {
            metrics
                .rate_limited_total
                .with_label_values(&["passed_through"])
                .inc()
        };
        let (Some(token), Some(client)) = (ctx.token.clone(), ctx.client.clone()) else {
            passed();
            return Ok(());
        };
        if ctx.rate_retries >= MAX_RATE_RETRIES || !self.may_replay(session, ctx) {
            passed();
            return Ok(());
        }
        let deadline = ctx.started + ctx.live.budget.max_queue_wait;
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.state.budget.admit(client, &token, wait).await {
            Admit::Go { token, .. } => {
                ctx.token = Some(token);
                ctx.rate_retries += 1;
                metrics
                    .rate_limited_total
                    .with_label_values(&["absorbed"])
                    .inc();
                Err(replay_error())
            }
            Admit::Refused { .. } => {
                passed();
                Ok(())
            }
        }
    }

    /// Whether a request that got a 401 can be replayed (see [`replayable`]); counts a body
    /// too large to replay.
    fn may_replay(&self, session: &Session, ctx: &RequestCtx) -> bool {
        let content_length = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let downstream = session.as_downstream();
        let ok = replayable(
            content_length,
            downstream.body_bytes_read() as u64,
            downstream.retry_buffer_truncated(),
            ctx.live.proxy.replay_body_limit_bytes,
        );
        // A refused further replay is counted in `logging`; here only the too-large case.
        if !ok && ctx.replays == 0 {
            self.state
                .metrics
                .replays_total
                .with_label_values(&["body_too_large"])
                .inc();
        }
        ok
    }

    async fn refuse(&self, session: &mut Session, refusal: Refusal, live: &Live) -> Result<bool> {
        self.state
            .metrics
            .rejected_requests_total
            .with_label_values(&[refusal.reason()])
            .inc();
        respond(session, refusal, live).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for GenesysProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            live: self.state.live.load_full(),
            upstream_status: 0,
            correlation_id: None,
            token: None,
            replays: 0,
            first_401: None,
            tries: 0,
            ambiguous_framing: false,
            client: None,
            rate_retries: 0,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        crate::head_clock::head_received();
        strip_upgrade(session.req_header_mut());
        // Before pingora sets up the body reader from the length.
        ctx.ambiguous_framing = !normalise_content_length(session.req_header_mut());
        // Pipelined requests are served in order (RFC 9112 §9.3.2) instead of answering the
        // first and dropping the rest on a connection that said keep-alive.
        session.as_downstream_mut().set_pipelining_enabled(true);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let settings = &ctx.live.proxy;
        if ctx.ambiguous_framing {
            return self.refuse(session, Refusal::BadRequest, &ctx.live).await;
        }
        if !settings
            .allowed_methods
            .contains(&session.req_header().method)
        {
            return self
                .refuse(session, Refusal::MethodNotAllowed, &ctx.live)
                .await;
        }
        let ip = session
            .client_addr()
            .and_then(PingoraAddr::as_inet)
            .map(|a| a.ip());
        if !ip.is_some_and(|ip| client_allowed(ip, &settings.allowed_client_cidrs)) {
            return self
                .refuse(session, Refusal::ClientNotAllowed, &ctx.live)
                .await;
        }
        if !path_allowed(
            session.req_header().uri.path(),
            &settings.allowed_path_prefixes,
        ) {
            return self
                .refuse(session, Refusal::PathNotAllowed, &ctx.live)
                .await;
        }
        let wait = settings.token_wait_timeout;
        let token = match self.state.store.valid(Instant::now()) {
            Some(t) => t,
            None => match self.state.store.wait_valid(wait).await {
                Some(t) => t,
                None => return self.refuse(session, Refusal::NoToken, &ctx.live).await,
            },
        };
        let Some(ip) = ip else {
            return self
                .refuse(session, Refusal::ClientNotAllowed, &ctx.live)
                .await;
        };
        let client = Budget::client_key(&ctx.live.budget, ip);
        let wait = ctx.live.budget.max_queue_wait;
        let admitted = self.state.budget.admit(client.clone(), &token, wait).await;
        let app = Budget::app_label(&ctx.live.budget, &client);
        let m = &self.state.metrics;
        match admitted {
            Admit::Go { queued, token } => {
                let outcome = if queued { "queued" } else { "served" };
                m.budget_requests_total
                    .with_label_values(&[app, outcome])
                    .inc();
                ctx.token = Some(token);
                ctx.client = Some(client);
                Ok(false)
            }
            Admit::Refused { why, retry_after } => {
                m.budget_requests_total
                    .with_label_values(&[app, "refused"])
                    .inc();
                let outcome = match why {
                    Refused::QueueFull => "queue_full",
                    Refused::QueueTimeout => "queue_timeout",
                };
                m.rate_limited_total.with_label_values(&[outcome]).inc();
                respond_rate_limited(session, retry_after).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.tries += 1;
        let addrs = self.state.upstream_addrs.load();
        let Some(addr) = addrs
            .get(usize::from(ctx.tries) % addrs.len().max(1))
            .copied()
        else {
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                "the Genesys API host has not resolved yet",
            );
        };
        let settings = &ctx.live.proxy;
        // SNI is always the API host: an empty SNI would disable certificate checks.
        let mut peer = HttpPeer::new(addr, self.state.api.tls, self.state.api.host.clone());
        peer.options.connection_timeout = Some(settings.upstream_connect_timeout);
        peer.options.total_connection_timeout = Some(settings.upstream_connect_timeout);
        peer.options.read_timeout = Some(settings.upstream_read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.options.ca = self.state.upstream_ca.clone();
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let path_and_query = session
            .req_header()
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        rewrite_upstream_request(
            upstream,
            path_and_query,
            &self.state.host_header,
            ctx.token.as_deref().map(|t| &t.header),
        )
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.observe_upstream(upstream, ctx);
        if upstream.status == 429 {
            return self.absorb_429(session, ctx).await;
        }
        let Some(used) = ctx.token.clone().filter(|_| upstream.status == 401) else {
            return Ok(());
        };
        let store = &self.state.store;
        let earlier = ctx.first_401.map(|(newest, _)| newest);
        let (newest, deadline) = *ctx.first_401.get_or_insert_with(|| {
            let wait = ctx.live.proxy.refresh_wait_timeout;
            (store.generation(), Instant::now() + wait)
        });
        if !replay_after_401(ctx.replays, used.generation, earlier)
            || !self.may_replay(session, ctx)
        {
            // Tell the refresher anyway: the token is dead for the next request.
            store.reject(&used);
            return Ok(());
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match store.replacement_for(&used, newest, wait).await {
            Some(replacement) => {
                ctx.token = Some(replacement);
                ctx.replays += 1;
                Err(replay_error())
            }
            None => {
                let m = &self.state.metrics;
                m.replays_total.with_label_values(&["no_new_token"]).inc();
                Ok(())
            }
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        // A client that hangs up mid-request is routine, not an error of the proxy.
        *error.esource() == pingora::ErrorSource::Downstream
            && matches!(
                error.etype(),
                ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
            )
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        // A replay after a 401 is expected behaviour, counted in replays_total; not a warning.
        error.etype() == &REPLAY
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        _ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // Our replay is safe for any method: the upstream refused the request before acting on it.
        if e.etype() == &REPLAY {
            return e;
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent()
            || session.as_downstream().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let refusal = match (e.esource(), e.etype()) {
            (
                pingora::ErrorSource::Downstream,
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ) => None,
            (pingora::ErrorSource::Downstream, _) => Some(Refusal::BadRequest),
            (_, etype) => Some(refusal_for(etype)),
        };
        let code = match refusal {
            Some(r) if self.refuse(session, r, &ctx.live).await.is_ok() => r.status(),
            _ => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        crate::head_clock::request_done(ctx.live.proxy.request_header_timeout);
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let metrics = &self.state.metrics;
        metrics
            .requests_total
            .with_label_values(&[status_label(status)])
            .inc();
        metrics
            .request_duration_seconds
            .observe(ctx.started.elapsed().as_secs_f64());
        if ctx.replays > 0 {
            let outcome = if status == 401 {
                "rejected_again"
            } else {
                "success"
            };
            metrics.replays_total.with_label_values(&[outcome]).inc();
        }
        if ctx.live.log.access_log {
            let req = session.req_header();
            let client = session
                .client_addr()
                .and_then(PingoraAddr::as_inet)
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(
                target: "access",
                method = %req.method,
                path = req.uri.path(),
                status,
                upstream_status = ctx.upstream_status,
                duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0,
                replayed = ctx.replays > 0,
                replays = ctx.replays,
                client = %client,
                correlation_id = ctx.correlation_id.as_deref().unwrap_or(""),
                "request"
            );
        }
    }
}
