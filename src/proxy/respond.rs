//! The answers the proxy writes itself, in Genesys's error shape.

use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::decide::{RATELIMIT_ALLOWED, RATELIMIT_COUNT, RATELIMIT_RESET};
use super::{ProxyState, Refusal};
use crate::config::Live;

/// The proxy's own 429 when no budget frees within the request's wait: Genesys's shape and
/// message, with an honest `Retry-After`, so SDK retry policies behave as with Genesys. With
/// `[[app]]`, the message names the app that is over its share. Like Genesys's, it carries
/// `inin-ratelimit-count/allowed/reset` (the window spent: count = allowed = the token's
/// `allowed`, reset = `Retry-After`), so SDK retry logic reads it the same way.
pub(super) async fn respond_rate_limited(
    session: &mut Session,
    retry_after: Duration,
    app: Option<&str>,
    allowed: u64,
) -> Result<()> {
    let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let body = rate_limited_body(seconds, app);
    let mut resp = ResponseHeader::build(429, Some(7))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::RETRY_AFTER, seconds.to_string())?;
    resp.insert_header(RATELIMIT_COUNT, allowed.to_string())?;
    resp.insert_header(RATELIMIT_ALLOWED, allowed.to_string())?;
    resp.insert_header(RATELIMIT_RESET, seconds.to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// The body of the proxy's own 429: Genesys's code and message, naming the app over its share.
fn rate_limited_body(seconds: u64, app: Option<&str>) -> Bytes {
    let whose = app.map_or(String::new(), |a| {
        format!(" for app {a} (over its share of the token's budget)")
    });
    Bytes::from(
        serde_json::json!({
            "message": format!("Rate limit exceeded the maximum{whose}. Retry the request in [{seconds}] seconds"),
            "code": "too.many.requests.retry.after",
            "status": 429,
        })
        .to_string(),
    )
}

/// Answers a refusal in the Genesys error shape; a 405 lists the allowed methods.
pub(super) async fn respond(session: &mut Session, refusal: Refusal, live: &Live) -> Result<()> {
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
    match refusal {
        Refusal::Unauthenticated => resp.insert_header(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"genesys-auth-proxy\"",
        )?,
        Refusal::AuthThrottled => resp.insert_header(
            header::RETRY_AFTER,
            crate::apps::guard::WINDOW.as_secs().to_string(),
        )?,
        _ => {}
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Answers `refusal` and counts it; `Ok(true)`: the request is done.
pub(super) async fn refuse(
    state: &ProxyState,
    session: &mut Session,
    refusal: Refusal,
    live: &Live,
) -> Result<bool> {
    state
        .metrics
        .rejected_requests_total
        .with_label_values(&[refusal.reason()])
        .inc();
    respond(session, refusal, live).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxys_429_names_the_app_over_its_share() {
        let v: serde_json::Value =
            serde_json::from_slice(&rate_limited_body(3, Some("billing"))).unwrap();
        assert_eq!(v["code"], "too.many.requests.retry.after");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains("for app billing"), "{message}");
        assert!(
            message.ends_with("Retry the request in [3] seconds"),
            "{message}"
        );
        let v: serde_json::Value = serde_json::from_slice(&rate_limited_body(3, None)).unwrap();
        assert!(!v["message"].as_str().unwrap().contains("app"));
    }
}
