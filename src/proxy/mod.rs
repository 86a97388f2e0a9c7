//! The pingora `ProxyHttp` implementation. Hooks stay thin; the decisions (who may call, which
//! paths pass, whether a 401 is replayed, what error to answer) are plain functions below that
//! are tested without a socket.
//!
//! Hook order for one request: `request_filter` (allowlists, token) → `upstream_peer` →
//! `upstream_request_filter` (strip client credentials, inject bearer, force Host and URI) →
//! `upstream_response_filter` (401 → refresh → replay once) → `logging` (metrics).

mod decide;
mod gateway;
mod identify;
mod respond;
mod sanitize;
mod upstream;

pub use crate::metrics::status_label;
pub use decide::{
    client_allowed, declared_body_too_large, header_u64, refusal_for, replayable,
    rewrite_upstream_request, Refusal,
};
pub use sanitize::{normalise_content_length, path_allowed, strip_upgrade};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::HeaderValue;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorType, RetryType};

use opentelemetry::KeyValue;

use crate::anomaly::AnomalyMonitor;
use crate::budget::{Budget, ClientKey};
use crate::config::{ApiTarget, Live};
use crate::metrics::{Code, Metrics, ReplayOutcome};
use crate::token::lease::{Lease, PassReason, Verdict};
use crate::token::store::TokenStore;

/// The error that tells pingora to run the request again after a 401.
const REPLAY: ErrorType = ErrorType::Custom("replay_after_401");

/// Everything the proxy hooks read. The live settings sit in an `ArcSwap` so a reload can
/// replace them; each request loads them once (`RequestCtx::live`).
pub struct ProxyState {
    /// The credential's name (in spans).
    pub name: crate::config::CredentialName,
    pub live: Arc<ArcSwap<Live>>,
    pub api: ApiTarget,
    pub host_header: HeaderValue,
    /// The API host's addresses, resolved off the request path (shared by the credentials
    /// that call the same host).
    pub upstream_addrs: Arc<ArcSwap<Vec<SocketAddr>>>,
    /// `egress_proxy`: connections to the API go through this CONNECT tunnel.
    pub tunnel: Option<Arc<crate::egress::Tunnel>>,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    pub anomaly: Arc<AnomalyMonitor>,
    /// The token's rate-limit budget and the fair admission queue.
    pub budget: Arc<Budget>,
    /// `genesys.ca_file`: the only CAs trusted for the API host, when set.
    pub upstream_ca: Option<Arc<pingora::protocols::tls::CaType>>,
}

/// One listener's proxy. It serves its own credential, and with `[[app]]` any credential an
/// authenticated app is routed to.
pub struct GenesysProxy {
    /// Every credential's state, in config order; a request uses `routes[ctx.route]`.
    pub routes: Arc<[Arc<ProxyState>]>,
    /// This listener's credential.
    pub own: usize,
    /// Caller identity: the current `[[app]]`s, the failed-proof guard.
    pub gate: Arc<crate::apps::Gatekeeper>,
}

impl GenesysProxy {
    /// The credential a request goes with.
    fn state(&self, ctx: &RequestCtx) -> &ProxyState {
        &self.routes[ctx.route]
    }
}

/// The app a request was attributed to: the registry it was found in, and its place there.
pub(crate) struct Called {
    registry: Arc<crate::apps::Registry>,
    index: usize,
}

impl Called {
    pub(crate) fn app(&self) -> &crate::apps::App {
        &self.registry.apps()[self.index]
    }
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
    /// The token the request goes with, and what the 401 replay rule needs of its history.
    lease: Option<Lease>,
    tries: u8,
    /// Conflicting `Content-Length` values: refused, never forwarded.
    ambiguous_framing: bool,
    /// Who the request counts for in the rate-limit budget.
    client: Option<ClientKey>,
    /// Re-sends after a Genesys 429 so far (at most [`MAX_RATE_RETRIES`]).
    rate_retries: u8,
    /// Index into [`GenesysProxy::routes`]: the listener's own, or the app's credential.
    route: usize,
    /// The authenticated app, with `[[app]]`.
    caller: Option<Called>,
    /// Body bytes read so far (a chunked body is refused once past the limit).
    body_bytes: u64,
    /// The last upstream 429 was an endpoint or org limit (not the token's): when its route is
    /// free again.
    route_held_until: Option<Instant>,
    /// With `[tracing]`: the request's span and its current upstream attempt's.
    trace: Option<Box<crate::telemetry::RequestTrace>>,
}

/// Why a request without an app proof is refused, if it is: the listener's methods and paths.
fn anonymous_refusal(req: &RequestHeader, settings: &crate::config::ProxyLive) -> Option<Refusal> {
    if !settings.allowed_methods.contains(&req.method) {
        return Some(Refusal::MethodNotAllowed);
    }
    if !path_allowed(
        req.uri.path(),
        &settings.allowed_path_prefixes,
        settings.allow_non_ascii_paths,
    ) {
        return Some(Refusal::PathNotAllowed);
    }
    None
}

/// The request's span (tracing on): named by its route with ids collapsed.
fn trace_request(req: &RequestHeader) -> Option<Box<crate::telemetry::RequestTrace>> {
    let route = crate::budget::holds::route_key(req.method.as_str(), req.uri.path());
    let template = route.split_once(' ').map_or("", |(_, p)| p).to_string();
    crate::telemetry::start_request(
        req.method.as_str(),
        route,
        &template,
        req.uri.path(),
        &req.headers,
    )
}

/// Re-sends of one request after Genesys answered 429, at most.
pub(crate) const MAX_RATE_RETRIES: u8 = 2;

/// The error that makes pingora run the request again (see `error_while_proxy`).
pub(crate) fn replay_error() -> Box<Error> {
    let mut e = Error::explain(
        REPLAY,
        "upstream answered 401 or 429; sending the request again",
    );
    e.retry = RetryType::Decided(true);
    e
}

#[async_trait]
impl ProxyHttp for GenesysProxy {
    type CTX = RequestCtx;

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // None: pingora's default adds response compression, disabled, which still builds a
        // module context for every request. The proxy never compresses (it relays bodies).
    }

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            live: self.routes[self.own].live.load_full(),
            upstream_status: 0,
            correlation_id: None,
            lease: None,
            tries: 0,
            ambiguous_framing: false,
            client: None,
            rate_retries: 0,
            route: self.own,
            caller: None,
            body_bytes: 0,
            route_held_until: None,
            trace: None,
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
        let own = &self.routes[self.own];
        if crate::telemetry::enabled() {
            ctx.trace = trace_request(session.req_header());
        }
        if ctx.ambiguous_framing {
            return respond::refuse(own, session, Refusal::BadRequest, &ctx.live).await;
        }
        let ip = session
            .client_addr()
            .and_then(PingoraAddr::as_inet)
            .map(|a| a.ip())
            .filter(|ip| client_allowed(*ip, &ctx.live.proxy.allowed_client_cidrs));
        let Some(ip) = ip else {
            return respond::refuse(own, session, Refusal::ClientNotAllowed, &ctx.live).await;
        };
        // The registry is kept (an `Arc`) only when apps are configured: a guard must not be
        // held across an await.
        let registry = {
            let current = self.gate.current();
            current
                .enabled()
                .then(|| arc_swap::Guard::into_inner(current))
        };
        if let Some(registry) = registry {
            if registry.is_login_path(session.req_header().uri.path()) {
                return gateway::login(&self.gate, &registry, session, ip).await;
            }
            if let Some(done) = identify::caller(self, registry, session, ctx, ip).await? {
                return Ok(done);
            }
        }
        let client = match &ctx.caller {
            Some(called) => ClientKey::Caller(called.app().key.clone()),
            None => {
                if let Some(refusal) = anonymous_refusal(session.req_header(), &ctx.live.proxy) {
                    return respond::refuse(own, session, refusal, &ctx.live).await;
                }
                Budget::client_key(&ctx.live.budget, ip)
            }
        };
        // Before admission: a body Genesys would refuse costs no API call and no budget.
        if declared_body_too_large(session.req_header(), ctx.live.proxy.max_request_body_bytes) {
            return respond::refuse(own, session, Refusal::RequestTooLarge, &ctx.live).await;
        }
        upstream::admit(self.state(ctx), session, ctx, client).await
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A declared length was checked in `request_filter`; this catches a chunked body
        // before its over-limit part reaches Genesys (the unfinished request is abandoned).
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > ctx.live.proxy.max_request_body_bytes {
                return Error::e_explain(
                    decide::BODY_TOO_LARGE,
                    "the chunked request body passed proxy.max_request_body_bytes",
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.tries += 1;
        let state = self.state(ctx);
        let addrs = state.upstream_addrs.load();
        let addr = match &state.tunnel {
            Some(tunnel) => tunnel.peer_addr(),
            None => addrs
                .get(usize::from(ctx.tries) % addrs.len().max(1))
                .copied(),
        };
        let Some(addr) = addr else {
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                "the Genesys API host has not resolved yet",
            );
        };
        let settings = &ctx.live.proxy;
        // SNI is always the API host: an empty SNI would disable certificate checks.
        let mut peer = HttpPeer::new(addr, state.api.tls, state.api.host.clone());
        peer.options.connection_timeout = Some(settings.upstream_connect_timeout);
        peer.options.total_connection_timeout = Some(settings.upstream_connect_timeout);
        peer.options.read_timeout = Some(settings.upstream_read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        // No watcher task per pooled connection (our pingora patch, vendor/README.md): a
        // pooled connection is checked when it is taken, which saves a task, a timer and a
        // wake-up per request.
        peer.options.idle_watch = false;
        peer.options.ca = state.upstream_ca.clone();
        if let Some(tunnel) = &state.tunnel {
            peer.options.custom_l4 = Some(tunnel.clone());
        }
        if let Some(trace) = &mut ctx.trace {
            let (lease, tries) = (&ctx.lease, ctx.tries);
            trace.start_attempt(_session.req_header().method.as_str(), || {
                let mut attributes = vec![
                    KeyValue::new("server.address", state.api.host.clone()),
                    KeyValue::new("server.port", i64::from(state.api.port)),
                    KeyValue::new("http.request.resend_count", i64::from(tries - 1)),
                ];
                if let Some(lease) = lease {
                    let fp = lease.token().fingerprint.clone();
                    attributes.push(KeyValue::new("genesys.token.fingerprint", fp));
                }
                attributes
            });
        }
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
            &self.state(ctx).host_header,
            ctx.lease.as_ref().map(|l| &l.token().header),
        )?;
        if let Some(trace) = &ctx.trace {
            trace.inject(upstream);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let state = &self.routes[ctx.route];
        upstream::observe_upstream(state, session.req_header(), upstream, ctx);
        if upstream.status == 429 {
            return upstream::absorb_429(state, session, ctx).await;
        }
        if upstream.status != 401 {
            return Ok(());
        }
        let Some(mut lease) = ctx.lease.take() else {
            return Ok(());
        };
        let store = &state.store;
        let wait = ctx.live.proxy.refresh_wait_timeout;
        let verdict = lease
            .refused(store, wait, || upstream::may_replay(state, session, ctx))
            .await;
        ctx.lease = Some(lease);
        match verdict {
            Verdict::Replay(_) => Err(replay_error()),
            Verdict::PassThrough(PassReason::NoNewToken) => {
                state.metrics.replays.inc(ReplayOutcome::NoNewToken);
                Ok(())
            }
            Verdict::PassThrough(_) => Ok(()),
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
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // Our replay is safe for any method: the upstream refused the request before acting on it.
        if e.etype() == &REPLAY {
            return e;
        }
        if let Some(trace) = &mut ctx.trace {
            trace.end_attempt(Some(e.etype().as_str()));
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
            Some(r)
                if respond::refuse(&self.routes[ctx.route], session, r, &ctx.live)
                    .await
                    .is_ok() =>
            {
                r.status()
            }
            _ => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        if let Some(trace) = &mut ctx.trace {
            trace.end_attempt(Some(e.etype().as_str()));
        }
        e
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        crate::head_clock::request_done(ctx.live.proxy.request_header_timeout);
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let metrics = &self.state(ctx).metrics;
        metrics.requests.inc(Code(status));
        metrics
            .request_duration_seconds
            .observe(ctx.started.elapsed().as_secs_f64());
        let replays = ctx.lease.as_ref().map_or(0, Lease::replays);
        if replays > 0 {
            let outcome = if status == 401 {
                ReplayOutcome::RejectedAgain
            } else {
                ReplayOutcome::Success
            };
            metrics.replays.inc(outcome);
        }
        let trace_id = match ctx.trace.take() {
            Some(trace) => {
                let id = ctx
                    .live
                    .log
                    .access_log
                    .then(|| trace.trace_id().to_string());
                let state = self.state(ctx);
                let attributes = || {
                    let mut a = vec![
                        KeyValue::new("genesys.credential", state.name.to_string()),
                        KeyValue::new("genesys.replays", i64::from(replays)),
                        KeyValue::new("genesys.rate_limit_resends", i64::from(ctx.rate_retries)),
                    ];
                    if let Some(called) = &ctx.caller {
                        a.push(KeyValue::new("genesys.app", called.app().name.to_string()));
                    }
                    if let Some(lease) = &ctx.lease {
                        let fp = lease.token().fingerprint.clone();
                        a.push(KeyValue::new("genesys.token.fingerprint", fp));
                    }
                    if let Some(id) = &ctx.correlation_id {
                        a.push(KeyValue::new("genesys.correlation_id", id.clone()));
                    }
                    if ctx.upstream_status != 0 {
                        let s = i64::from(ctx.upstream_status);
                        a.push(KeyValue::new("genesys.upstream_status_code", s));
                    }
                    a
                };
                let attributes = if trace.recording() {
                    attributes()
                } else {
                    Vec::new()
                };
                trace.finish(status, attributes);
                id
            }
            None if ctx.live.log.access_log => {
                crate::telemetry::incoming_trace_id(&session.req_header().headers)
                    .map(str::to_string)
            }
            None => None,
        };
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
                replayed = replays > 0,
                replays,
                client = %client,
                app = ctx.caller.as_ref().map_or("", |c| &*c.app().name),
                correlation_id = ctx.correlation_id.as_deref().unwrap_or(""),
                trace_id = trace_id.as_deref().unwrap_or(""),
                "request"
            );
        }
    }
}
