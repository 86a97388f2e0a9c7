//! The app login the SDKs' gateway setting sends to the proxy (`POST /oauth/token`): checked
//! against the `[[app]]` client ids and secrets, answered with a proxy-issued token in
//! Genesys's response shape. The Genesys token never leaves the proxy.

use std::net::IpAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{header, Method};
use pingora::prelude::*;
use pingora::proxy::Session;

use crate::apps::login::{self, LoginError, BODY_MAX};
use crate::apps::{unix_now, Gatekeeper, Registry};
use crate::metrics::AuthFailure;

/// Answers a login; `Ok(true)`: the request is done.
pub(super) async fn login(
    gate: &Gatekeeper,
    registry: &Registry,
    session: &mut Session,
    ip: IpAddr,
) -> Result<bool> {
    let (status, body) = match issue(gate, registry, session, ip).await? {
        Ok(body) => (200, body),
        Err(e) => login::error_answer(e),
    };
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    // RFC 6749 §5.1: a token answer is never cached.
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    resp.insert_header(header::PRAGMA, "no-cache")?;
    if status == 401 {
        resp.insert_header(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"genesys-auth-proxy\"",
        )?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}

/// The token answer, or why not. The outer error is a broken connection.
async fn issue(
    gate: &Gatekeeper,
    registry: &Registry,
    session: &mut Session,
    ip: IpAddr,
) -> Result<Result<Bytes, LoginError>> {
    if session.req_header().method != Method::POST {
        return Ok(Err(LoginError::InvalidRequest));
    }
    if gate.guard.throttled(ip, Instant::now()).is_some() {
        gate.metrics.auth_failures.inc(AuthFailure::Throttled);
        return Ok(Err(LoginError::Throttled));
    }
    let max = registry.settings.max_auth_failures_per_minute;
    let proof = session
        .req_header()
        .headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let (client_id, secret) = match login::basic_credentials(proof) {
        Ok(pair) => pair,
        Err(e) => {
            gate.failed(ip, AuthFailure::Login, max);
            return Ok(Err(e));
        }
    };
    let Some(body) = read_body(session).await? else {
        // The rest of an oversized body is not read: the connection cannot be reused.
        session.set_keepalive(None);
        return Ok(Err(LoginError::InvalidRequest));
    };
    if let Err(e) = login::check_grant(&body) {
        return Ok(Err(e));
    }
    let Some(app) = registry.login(&client_id, secret.expose()) else {
        gate.failed(ip, AuthFailure::Login, max);
        return Ok(Err(LoginError::InvalidClient));
    };
    let Some((token, expires_in)) = registry.issue(app, unix_now()) else {
        return Ok(Err(LoginError::InvalidClient));
    };
    gate.issued(app, &token, expires_in, ip);
    Ok(Ok(login::success_body(&token, expires_in)))
}

/// The request body, at most [`BODY_MAX`] bytes (`None` past that).
async fn read_body(session: &mut Session) -> Result<Option<Bytes>> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > BODY_MAX {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}
