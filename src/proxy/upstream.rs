//! What the proxy does with what Genesys answers, and the rate-limit budget around it:
//! admission before a request is sent, the rate-limit headers and 401/429 counts on every
//! answer, a 429 re-sent once budget frees, and whether a request may be sent again at all.

use std::time::{Duration, Instant};

use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::decide::{CORRELATION_ID, RATELIMIT_ALLOWED, RATELIMIT_COUNT, RATELIMIT_RESET};
use super::respond::{self, respond_rate_limited};
use super::{
    header_u64, replay_error, replayable, ProxyState, Refusal, RequestCtx, MAX_RATE_RETRIES,
};
use crate::anomaly::Kind;
use crate::budget::holds::{classify, route_key, Scope};
use crate::budget::{Admit, Budget, ClientKey, Refused};
use crate::metrics::{Admission, AppOutcome, RateLimitOutcome, ReplayOutcome};
use crate::token::lease::Lease;

/// Checks out the request's token and a call of the rate-limit budget (waiting for a token at
/// start-up, and fairly if the budget is spent), or answers the proxy's own 429 or 503.
pub(super) async fn admit(
    state: &ProxyState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    client: ClientKey,
) -> Result<bool> {
    let settings = &ctx.live.budget;
    let arrived = Instant::now();
    if let Some(done) = wait_for_route(state, session, ctx).await? {
        return Ok(done);
    }
    let token_wait = ctx.live.proxy.token_wait_timeout;
    // What is left of the request's queue wait (a held route's wait came out of it).
    let wait = (ctx.started + settings.max_queue_wait).saturating_duration_since(Instant::now());
    let admit = state
        .budget
        .checkout(settings, client.clone(), wait, token_wait);
    let admitted = unless_client_left(session, admit, "queued for rate-limit budget").await?;
    if let Some(trace) = &ctx.trace {
        let waited = arrived.elapsed().as_secs_f64() * 1000.0;
        trace.set(opentelemetry::KeyValue::new(
            "genesys.queue_wait_ms",
            waited,
        ));
    }
    let app = Budget::app_label(settings, &client);
    let m = &state.metrics;
    if let Some(called) = &ctx.caller {
        let outcome = match admitted {
            Admit::Refused { .. } => AppOutcome::RateLimited,
            _ => AppOutcome::Allowed,
        };
        called.app().counters.inc(outcome);
    }
    match admitted {
        Admit::Go { queued, token } => {
            let outcome = if queued {
                Admission::Queued
            } else {
                Admission::Served
            };
            m.budget_requests.inc(app, outcome);
            ctx.lease = Some(Lease::new(token, &state.store));
            ctx.client = Some(client);
            Ok(false)
        }
        Admit::Refused { why, retry_after } => {
            m.budget_requests.inc(app, Admission::Refused);
            m.rate_limited.inc(match why {
                Refused::QueueFull => RateLimitOutcome::QueueFull,
                Refused::QueueTimeout => RateLimitOutcome::QueueTimeout,
            });
            let over = ctx.caller.as_ref().map(|c| &*c.app().name);
            respond_rate_limited(session, retry_after, over, state.budget.allowed()).await?;
            Ok(true)
        }
        Admit::NoToken => respond::refuse(state, session, Refusal::NoToken, &ctx.live).await,
    }
}

/// A request to a route held after an endpoint or org 429 waits until the hold ends, within
/// what is left of its `max_queue_wait_ms`, or gets the proxy's own 429 with the hold's
/// `Retry-After`: `Some(true)` when answered. Other routes pass at the cost of one atomic load.
async fn wait_for_route(
    state: &ProxyState,
    session: &mut Session,
    ctx: &RequestCtx,
) -> Result<Option<bool>> {
    let req = session.req_header();
    let now = Instant::now();
    let Some(until) = state
        .budget
        .holds
        .held_until(req.method.as_str(), req.uri.path(), now)
    else {
        return Ok(None);
    };
    let deadline = ctx.started + ctx.live.budget.max_queue_wait;
    if until > deadline {
        state
            .metrics
            .rate_limited_endpoint
            .inc(RateLimitOutcome::QueueTimeout);
        let allowed = state.budget.allowed();
        respond_rate_limited(session, until - now, None, allowed).await?;
        return Ok(Some(true));
    }
    let sleep = tokio::time::sleep_until(until.into());
    unless_client_left(session, sleep, "waiting for its held route").await?;
    Ok(None)
}

/// Records what every upstream answer tells: status, correlation id (for the access log),
/// the rate-limit headers, and 401/429 counts for metrics and the anomaly detector. A 429
/// is classified: the token's own limit rests the token; an endpoint or org limit holds the
/// request's route instead.
pub(super) fn observe_upstream(
    state: &ProxyState,
    req: &RequestHeader,
    upstream: &ResponseHeader,
    ctx: &mut RequestCtx,
) {
    let metrics = &state.metrics;
    ctx.upstream_status = upstream.status.as_u16();
    if ctx.live.log.access_log || ctx.trace.is_some() {
        ctx.correlation_id = upstream
            .headers
            .get(&CORRELATION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    if let Some(trace) = &ctx.trace {
        trace.attempt_answered(ctx.upstream_status, ctx.correlation_id.as_deref());
    }
    let budget = &state.budget;
    let count = header_u64(upstream, &RATELIMIT_COUNT);
    let allowed = header_u64(upstream, &RATELIMIT_ALLOWED);
    let token = ctx.lease.as_ref().map(Lease::token);
    // What the budget knew before this answer: only needed for a 429 without headers.
    let left_before = match (token, count, ctx.upstream_status) {
        (Some(token), None, 429) => budget.left_of(token),
        _ => None,
    };
    if let (Some(token), Some(count), Some(allowed)) = (token, count, allowed) {
        let reset = header_u64(upstream, &RATELIMIT_RESET);
        budget.observe(token, count, allowed, reset);
    }
    if ctx.upstream_status != 401 {
        if let Some(lease) = &ctx.lease {
            lease.accepted(&state.store);
        }
    }
    match ctx.upstream_status {
        401 => {
            metrics.upstream_unauthorized_total.inc();
            state.anomaly.observe(Kind::UnauthorizedSpike);
        }
        429 => {
            metrics.upstream_rate_limited_total.inc();
            state.anomaly.observe(Kind::RateLimitStorm);
            let Some(token) = ctx.lease.as_ref().map(Lease::token) else {
                return;
            };
            let retry_after = header_u64(upstream, &header::RETRY_AFTER);
            let now = Instant::now();
            match classify(count, allowed, left_before) {
                Scope::Token => {
                    let retry_after =
                        retry_after.map_or(ctx.live.budget.window, Duration::from_secs);
                    budget.exhausted(token, retry_after);
                    ctx.route_held_until = None;
                }
                Scope::Endpoint => {
                    let until = now + Duration::from_secs(retry_after.unwrap_or(1).max(1));
                    let route = route_key(req.method.as_str(), req.uri.path());
                    tracing::info!(route = %route, retry_after_seconds = (until - now).as_secs(), "Genesys limited an endpoint while the token had budget; holding the route");
                    budget.holds.hold(route, until, now);
                    ctx.route_held_until = Some(until);
                }
            }
        }
        _ => {}
    }
}

/// Genesys answered 429 (the limit is lower than the budget thought, or another user of
/// the client spent it): the request was not processed, so it is re-sent once budget frees,
/// if that fits in what is left of its `max_queue_wait_ms`. Otherwise the 429 passes through.
pub(super) async fn absorb_429(
    state: &ProxyState,
    session: &Session,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let metrics = &state.metrics;
    let held_until = ctx.route_held_until;
    let counters = match held_until {
        None => &metrics.rate_limited,
        Some(_) => &metrics.rate_limited_endpoint,
    };
    let passed = || counters.inc(RateLimitOutcome::PassedThrough);
    let token = ctx.lease.as_ref().map(|l| l.token().clone());
    let (Some(token), Some(client)) = (token, ctx.client.clone()) else {
        passed();
        return Ok(());
    };
    if ctx.rate_retries >= MAX_RATE_RETRIES || !may_replay(state, session, ctx) {
        passed();
        return Ok(());
    }
    let deadline = ctx.started + ctx.live.budget.max_queue_wait;
    if let Some(free_at) = held_until {
        // The token is not at fault: the request waits out the route's hold, then takes a
        // call like any other (from the token with the most left).
        if free_at > deadline {
            passed();
            return Ok(());
        }
        tokio::time::sleep_until(free_at.into()).await;
    }
    let wait = deadline.saturating_duration_since(Instant::now());
    let budget = &state.budget;
    match budget.admit(&ctx.live.budget, client, &token, wait).await {
        Admit::Go { token, .. } => {
            if let Some(lease) = ctx.lease.as_mut() {
                lease.reissue(token);
            }
            ctx.rate_retries += 1;
            counters.inc(RateLimitOutcome::Absorbed);
            Err(replay_error())
        }
        Admit::Refused { .. } | Admit::NoToken => {
            passed();
            Ok(())
        }
    }
}

/// Whether a request that got a 401 or 429 can be sent again (see [`replayable`]); counts a
/// body too large to replay.
pub(super) fn may_replay(state: &ProxyState, session: &Session, ctx: &RequestCtx) -> bool {
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
    if !ok && ctx.lease.as_ref().map_or(0, Lease::replays) == 0 {
        state.metrics.replays.inc(ReplayOutcome::BodyTooLarge);
    }
    ok
}

/// No `Content-Length` above 0 and no `Transfer-Encoding`: nothing to read after the head.
fn has_no_body(req: &pingora::http::RequestHeader) -> bool {
    let h = &req.headers;
    !h.contains_key(header::TRANSFER_ENCODING)
        && h.get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Waits for `wait`; a request without a body also notices its client leaving meanwhile (a
/// FIN on the idle connection) and then ends, `while_` naming what it was waiting for, instead
/// of being sent for nobody.
async fn unless_client_left<T>(
    session: &mut Session,
    wait: impl std::future::Future<Output = T>,
    while_: &str,
) -> Result<T> {
    if !has_no_body(session.req_header()) {
        return Ok(wait.await);
    }
    tokio::select! {
        biased;
        done = wait => Ok(done),
        () = client_left(session) => Error::e_explain(
            ErrorType::ConnectionClosed,
            format!("client left while {while_}"),
        ),
    }
}

/// Resolves when the client closes its side of the connection; never otherwise (bytes of a
/// pipelined next request are kept for it by pingora).
async fn client_left(session: &mut Session) {
    if session
        .as_downstream_mut()
        .read_body_or_idle(true)
        .await
        .is_ok()
    {
        std::future::pending::<()>().await;
    }
}
