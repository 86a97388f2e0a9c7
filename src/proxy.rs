//! The pingora `ProxyHttp` implementation. Hooks stay thin; the decisions (who may call, which
//! paths pass, whether a 401 is replayed, what error to answer) are plain functions below that
//! are tested without a socket.
//!
//! Hook order for one request: `request_filter` (allowlists, token) → `upstream_peer` →
//! `upstream_request_filter` (strip client credentials, inject bearer, force Host and URI) →
//! `upstream_response_filter` (401 → refresh → replay once) → `logging` (metrics).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Uri};
use ipnet::IpNet;
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorType, RetryType};

use crate::anomaly::{AnomalyMonitor, Kind};
use crate::config::{ApiTarget, ProxySettings};
use crate::metrics::Metrics;
use crate::token::store::{Token, TokenStore};

/// The error that tells pingora to run the request again after a 401.
const REPLAY: ErrorType = ErrorType::Custom("replay_after_401");

/// Everything the proxy hooks read. Settings sit in an `ArcSwap` so a reload can replace them.
pub struct ProxyState {
    pub settings: ArcSwap<ProxySettings>,
    pub api: ApiTarget,
    pub host_header: HeaderValue,
    /// Resolved API addresses; refreshed off the request path by a background task.
    pub upstream_addrs: ArcSwap<Vec<SocketAddr>>,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    pub anomaly: Arc<AnomalyMonitor>,
    /// `[log] access_log`, changeable by reload.
    pub access_log: AtomicBool,
    /// `genesys.ca_file`: the only CAs trusted for the API host, when set.
    pub upstream_ca: Option<Arc<pingora::protocols::tls::CaType>>,
}

pub struct GenesysProxy {
    pub state: Arc<ProxyState>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    upstream_status: u16,
    /// `ININ-Correlation-Id` of the upstream answer, kept only for the access log.
    correlation_id: Option<String>,
    token: Option<Arc<Token>>,
    replayed: bool,
    tries: u8,
}

/// A refusal the proxy answers itself, in Genesys's error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ClientNotAllowed,
    PathNotAllowed,
    NoToken,
    UpstreamUnreachable,
    UpstreamTimeout,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::ClientNotAllowed | Refusal::PathNotAllowed => 403,
            Refusal::NoToken => 503,
            Refusal::UpstreamUnreachable => 502,
            Refusal::UpstreamTimeout => 504,
        }
    }

    /// The reason, used both in `proxy.<reason>` and as the metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "client_not_allowed",
            Refusal::PathNotAllowed => "path_not_allowed",
            Refusal::NoToken => "no_token",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::UpstreamTimeout => "upstream_timeout",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "This client address is not allowed to use the proxy.",
            Refusal::PathNotAllowed => {
                "This path is not allowed by the proxy's allowed_path_prefixes."
            }
            Refusal::NoToken => "The proxy holds no valid Genesys Cloud token yet; retry shortly.",
            Refusal::UpstreamUnreachable => "The Genesys Cloud API could not be reached.",
            Refusal::UpstreamTimeout => "The Genesys Cloud API did not answer in time.",
        }
    }

    /// `{"message","code","status"}` as Genesys shapes its errors.
    pub fn body(self) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "message": self.message(),
                "code": format!("proxy.{}", self.reason()),
                "status": self.status(),
            })
            .to_string(),
        )
    }
}

/// Is `ip` inside one of the allowed networks? IPv4-mapped IPv6 addresses count as IPv4.
pub fn client_allowed(ip: IpAddr, allowed: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    allowed.iter().any(|net| net.contains(&ip))
}

/// Is `path` under an allowed prefix, with no dot segments or encoded separators that could
/// make the upstream see a different path than the one checked?
pub fn path_allowed(path: &str, prefixes: &[String]) -> bool {
    if !path.starts_with('/') || path.contains('\\') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%00")
    {
        return false;
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return false;
    }
    prefixes.iter().any(|p| path.starts_with(p.as_str()))
}

/// Can a request that got a 401 be replayed? Only once, and only if its whole body is still in
/// pingora's retry buffer and within the configured limit.
pub fn replayable(
    already_replayed: bool,
    content_length: Option<u64>,
    body_bytes_read: u64,
    buffer_truncated: bool,
    limit: u64,
) -> bool {
    !already_replayed
        && !buffer_truncated
        && content_length.unwrap_or(0) <= limit
        && body_bytes_read <= limit
}

/// Which refusal an upstream error becomes.
pub fn refusal_for(etype: &ErrorType) -> Refusal {
    match etype {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            Refusal::UpstreamTimeout
        }
        _ => Refusal::UpstreamUnreachable,
    }
}

/// The error that makes pingora run the request again (see `error_while_proxy`).
fn replay_error() -> Box<Error> {
    let mut e = Error::explain(
        REPLAY,
        "upstream answered 401; replaying with another token",
    );
    e.retry = RetryType::Decided(true);
    e
}

/// Rewrites the request that goes upstream: only the path and query are kept (an
/// absolute-form URI cannot pick the host), client credentials are removed, `Host` is the API
/// host, and the bearer is injected.
pub fn rewrite_upstream_request(
    upstream: &mut RequestHeader,
    path_and_query: &str,
    host: &HeaderValue,
    bearer: Option<&HeaderValue>,
) -> Result<()> {
    let uri: Uri = path_and_query
        .parse()
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad request path"))?;
    upstream.set_uri(uri);
    upstream.remove_header(&header::AUTHORIZATION);
    upstream.remove_header(&header::PROXY_AUTHORIZATION);
    upstream.insert_header(header::HOST, host.clone())?;
    if let Some(bearer) = bearer {
        upstream.insert_header(header::AUTHORIZATION, bearer.clone())?;
    }
    Ok(())
}

async fn respond(session: &mut Session, refusal: Refusal) -> Result<()> {
    let body = refusal.body();
    let mut resp = ResponseHeader::build(refusal.status(), Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

impl GenesysProxy {
    async fn refuse(&self, session: &mut Session, refusal: Refusal) -> Result<bool> {
        self.state
            .metrics
            .rejected_requests_total
            .with_label_values(&[refusal.reason()])
            .inc();
        respond(session, refusal).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for GenesysProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            upstream_status: 0,
            correlation_id: None,
            token: None,
            replayed: false,
            tries: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let settings = self.state.settings.load();
        let ip = session
            .client_addr()
            .and_then(PingoraAddr::as_inet)
            .map(|a| a.ip());
        if !ip.is_some_and(|ip| client_allowed(ip, &settings.allowed_client_cidrs)) {
            return self.refuse(session, Refusal::ClientNotAllowed).await;
        }
        if !path_allowed(
            session.req_header().uri.path(),
            &settings.allowed_path_prefixes,
        ) {
            return self.refuse(session, Refusal::PathNotAllowed).await;
        }
        let token = match self.state.store.valid(Instant::now()) {
            Some(t) => Some(t),
            None => {
                self.state
                    .store
                    .wait_valid(settings.token_wait_timeout)
                    .await
            }
        };
        match token {
            Some(t) => {
                ctx.token = Some(t);
                Ok(false)
            }
            None => self.refuse(session, Refusal::NoToken).await,
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
        let settings = self.state.settings.load();
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
        let metrics = &self.state.metrics;
        ctx.upstream_status = upstream.status.as_u16();
        if self.state.access_log.load(Ordering::Relaxed) {
            ctx.correlation_id = upstream
                .headers
                .get("inin-correlation-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        if let (Some(count), Some(allowed)) = (
            header_u64(upstream, "inin-ratelimit-count"),
            header_u64(upstream, "inin-ratelimit-allowed"),
        ) {
            metrics
                .upstream_ratelimit_remaining
                .set(allowed.saturating_sub(count) as i64);
        }
        match upstream.status.as_u16() {
            401 => {}
            429 => {
                metrics.upstream_rate_limited_total.inc();
                self.state.anomaly.observe(Kind::RateLimitStorm);
                return Ok(());
            }
            _ => return Ok(()),
        }
        metrics.upstream_unauthorized_total.inc();
        self.state.anomaly.observe(Kind::UnauthorizedSpike);
        let Some(used) = ctx.token.clone() else {
            return Ok(());
        };
        let settings = self.state.settings.load();
        let req = session.req_header();
        let content_length = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let downstream = session.as_downstream();
        if !replayable(
            ctx.replayed,
            content_length,
            downstream.body_bytes_read() as u64,
            downstream.retry_buffer_truncated(),
            settings.replay_body_limit_bytes,
        ) {
            // A refused replay is counted in `logging`; here only the too-large case.
            if !ctx.replayed {
                metrics
                    .replays_total
                    .with_label_values(&["body_too_large"])
                    .inc();
            }
            // Tell the refresher anyway: the token is dead for the next request.
            self.state.store.report_rejected(used.generation);
            return Ok(());
        }
        self.state.store.report_rejected(used.generation);
        // During a secret rotation the token from before it is still valid: try it first.
        if let Some(fallback) = self
            .state
            .store
            .fallback_valid(Instant::now())
            .filter(|f| f.generation < used.generation)
        {
            ctx.token = Some(fallback);
            ctx.replayed = true;
            return Err(replay_error());
        }
        match self
            .state
            .store
            .wait_newer(used.generation, settings.refresh_wait_timeout)
            .await
        {
            Some(fresh) => {
                ctx.token = Some(fresh);
                ctx.replayed = true;
                Err(replay_error())
            }
            None => {
                metrics
                    .replays_total
                    .with_label_values(&["no_new_token"])
                    .inc();
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
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.esource() {
            pingora::ErrorSource::Upstream
            | pingora::ErrorSource::Internal
            | pingora::ErrorSource::Unset => {
                let refusal = refusal_for(e.etype());
                self.state
                    .metrics
                    .rejected_requests_total
                    .with_label_values(&[refusal.reason()])
                    .inc();
                if respond(session, refusal).await.is_err() {
                    0
                } else {
                    refusal.status()
                }
            }
            pingora::ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => {
                    let _ = session.respond_error(400).await;
                    400
                }
            },
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
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
        if ctx.replayed {
            let outcome = if status == 401 {
                "rejected_again"
            } else {
                "success"
            };
            metrics.replays_total.with_label_values(&[outcome]).inc();
        }
        if self.state.access_log.load(Ordering::Relaxed) {
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
                replayed = ctx.replayed,
                client = %client,
                correlation_id = ctx.correlation_id.as_deref().unwrap_or(""),
                "request"
            );
        }
    }
}

fn header_u64(resp: &ResponseHeader, name: &str) -> Option<u64> {
    resp.headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Status codes as static labels, so the label set stays bounded and allocation-free.
fn status_label(status: u16) -> &'static str {
    const COMMON: [(u16, &str); 21] = [
        (200, "200"),
        (201, "201"),
        (202, "202"),
        (204, "204"),
        (301, "301"),
        (302, "302"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (409, "409"),
        (413, "413"),
        (415, "415"),
        (429, "429"),
        (500, "500"),
        (501, "501"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, label)) = COMMON.iter().find(|(code, _)| *code == status) {
        return label;
    }
    match status {
        0 => "0",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_mapped_addresses_are_allowed() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(client_allowed("127.0.0.1".parse().unwrap(), &nets));
        assert!(client_allowed("::1".parse().unwrap(), &nets));
        assert!(client_allowed("::ffff:127.0.0.1".parse().unwrap(), &nets));
        assert!(!client_allowed("10.0.0.1".parse().unwrap(), &nets));
    }

    #[test]
    fn paths_are_checked_without_tricks() {
        let p = vec!["/api/v2/".to_string()];
        assert!(path_allowed("/api/v2/users", &p));
        assert!(!path_allowed("/api/v1/users", &p));
        assert!(!path_allowed("/api/v2/../../admin", &p));
        assert!(!path_allowed("/api/v2/%2e%2e/secret", &p));
        assert!(!path_allowed("/api/v2/a%2Fb", &p));
        assert!(!path_allowed("/api/v2/./x", &p));
        assert!(!path_allowed("/api/v2\\..\\x", &p));
        assert!(!path_allowed("api/v2/users", &p));
        assert!(!path_allowed("/__sim/stats", &p));
    }

    #[test]
    fn replay_rules() {
        assert!(replayable(false, Some(10_240), 10_240, false, 65_536));
        assert!(replayable(false, None, 0, false, 65_536));
        assert!(!replayable(true, None, 0, false, 65_536));
        assert!(!replayable(false, Some(102_400), 65_536, true, 65_536));
        assert!(!replayable(false, Some(2_000), 2_000, false, 1_000));
    }

    #[test]
    fn status_labels_are_bounded() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(0), "0");
    }

    #[test]
    fn refusal_bodies_have_genesys_shape() {
        let v: serde_json::Value = serde_json::from_slice(&Refusal::NoToken.body()).unwrap();
        assert_eq!(v["code"], "proxy.no_token");
        assert_eq!(v["status"], 503);
        assert_eq!(
            refusal_for(&ErrorType::ConnectRefused),
            Refusal::UpstreamUnreachable
        );
        assert_eq!(
            refusal_for(&ErrorType::ReadTimedout),
            Refusal::UpstreamTimeout
        );
    }
}
