//! With `[[app]]`: who sent the request. The proof in `Authorization` names an app (or the
//! request is refused 401, counted and rate limited per source); the app's methods and paths
//! are checked (403 `proxy.app_not_allowed`); the app's credential becomes the request's
//! route. The presented bearer never goes upstream: `rewrite_upstream_request` replaces it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::{path_allowed, respond, Called, GenesysProxy, Refusal, RequestCtx};
use crate::apps::{unix_now, Caller, Registry};
use crate::metrics::{AppOutcome, AuthFailure};

/// Identifies the caller. `Some(true)`: the request was answered (refused); `None`: go on,
/// with `ctx.caller` and `ctx.route` set for an app.
pub(super) async fn caller(
    proxy: &GenesysProxy,
    registry: Arc<Registry>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    ip: IpAddr,
) -> Result<Option<bool>> {
    let gate = &proxy.gate;
    let own = &proxy.routes[proxy.own];
    if gate.guard.throttled(ip, Instant::now()).is_some() {
        gate.metrics.auth_failures.inc(AuthFailure::Throttled);
        gate.metrics
            .requests
            .inc("unknown", AppOutcome::Unauthenticated);
        return respond::refuse(own, session, Refusal::AuthThrottled, &ctx.live)
            .await
            .map(Some);
    }
    let req = session.req_header();
    let proof = req.headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    // A verified client certificate's names, looked up only when an app can use them.
    let names = match proof {
        None if registry.wants_certificates() => session
            .client_addr()
            .and_then(|a| a.as_inet())
            .and_then(|addr| gate.peers.get(addr)),
        _ => None,
    };
    let now = unix_now();
    let found = match registry.identify(proof, names.as_deref(), now) {
        Ok(Caller::Anonymous) => return Ok(None),
        Ok(Caller::App(app)) => Ok(app),
        Ok(Caller::Workload) => registry.verify_workload(proof, now).await,
        Err(failure) => Err(failure),
    };
    let req = session.req_header();
    let index = match found {
        Ok(app) => {
            let allowed = app.allowed_methods.contains(&req.method)
                && path_allowed(
                    req.uri.path(),
                    &app.allowed_path_prefixes,
                    ctx.live.proxy.allow_non_ascii_paths,
                );
            if !allowed {
                app.counters.inc(AppOutcome::NotAllowed);
                return respond::refuse(own, session, Refusal::AppNotAllowed, &ctx.live)
                    .await
                    .map(Some);
            }
            app.index
        }
        Err(failure) => {
            // A missing proof guesses nothing: counted, not held against the address.
            if failure == AuthFailure::Missing {
                gate.metrics.auth_failures.inc(failure);
            } else {
                gate.failed(ip, failure, registry.settings.max_auth_failures_per_minute);
            }
            gate.metrics
                .requests
                .inc("unknown", AppOutcome::Unauthenticated);
            return respond::refuse(own, session, Refusal::Unauthenticated, &ctx.live)
                .await
                .map(Some);
        }
    };
    let route = registry.apps()[index].route;
    if route != ctx.route {
        if let Some(state) = proxy.routes.get(route) {
            ctx.route = route;
            ctx.live = state.live.load_full();
        }
    }
    ctx.caller = Some(Called { registry, index });
    Ok(None)
}
