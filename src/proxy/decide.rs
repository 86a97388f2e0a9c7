//! The proxy's decisions as plain functions over request data, testable without a socket:
//! who may call, which paths pass, whether a 401 is replayed, how the upstream request is
//! rewritten, which error the proxy answers itself, and bounded metric labels.

use std::net::IpAddr;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType, Result};

/// A refusal the proxy answers itself, in Genesys's error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ClientNotAllowed,
    PathNotAllowed,
    MethodNotAllowed,
    BadRequest,
    TooManyConnections,
    NoToken,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// With `[[app]]`: no valid app proof.
    Unauthenticated,
    /// A known app outside its methods or paths.
    AppNotAllowed,
    /// Too many failed proofs from this address this minute.
    AuthThrottled,
    /// A body over `proxy.max_request_body_bytes`.
    RequestTooLarge,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::ClientNotAllowed | Refusal::PathNotAllowed | Refusal::AppNotAllowed => 403,
            Refusal::Unauthenticated => 401,
            Refusal::AuthThrottled => 429,
            Refusal::RequestTooLarge => 413,
            Refusal::MethodNotAllowed => 405,
            Refusal::BadRequest => 400,
            Refusal::NoToken | Refusal::TooManyConnections => 503,
            Refusal::UpstreamUnreachable => 502,
            Refusal::UpstreamTimeout => 504,
        }
    }

    /// The reason, used both in `proxy.<reason>` and as the metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "client_not_allowed",
            Refusal::PathNotAllowed => "path_not_allowed",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::BadRequest => "bad_request",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::NoToken => "no_token",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::AppNotAllowed => "app_not_allowed",
            Refusal::AuthThrottled => "auth_throttled",
            Refusal::RequestTooLarge => "request_too_large",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "This client address is not allowed to use the proxy.",
            Refusal::PathNotAllowed => {
                "This path is not allowed by the proxy's allowed_path_prefixes."
            }
            Refusal::MethodNotAllowed => {
                "This HTTP method is not allowed by the proxy's allowed_methods."
            }
            Refusal::BadRequest => "The request is malformed.",
            Refusal::TooManyConnections => {
                "The proxy is at its connection limit (proxy.max_connections); retry shortly."
            }
            Refusal::NoToken => "The proxy holds no valid Genesys Cloud token yet; retry shortly.",
            Refusal::UpstreamUnreachable => "The Genesys Cloud API could not be reached.",
            Refusal::UpstreamTimeout => "The Genesys Cloud API did not answer in time.",
            Refusal::Unauthenticated => {
                "This proxy requires an app proof: log in at /oauth/token with the app's client id and secret, or send Authorization: Bearer <api key>."
            }
            Refusal::AppNotAllowed => {
                "This app is not allowed this method or path (its allowed_methods and allowed_path_prefixes)."
            }
            Refusal::AuthThrottled => {
                "Too many failed app proofs from this address; retry after the minute ends."
            }
            Refusal::RequestTooLarge => {
                "The request body exceeds the proxy's max_request_body_bytes (Genesys Cloud accepts at most 512000 bytes)."
            }
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

/// Can a request that got a 401 be replayed at all? Only if its whole body is still in
/// pingora's retry buffer and within the configured limit.
pub fn replayable(
    content_length: Option<u64>,
    body_bytes_read: u64,
    buffer_truncated: bool,
    limit: u64,
) -> bool {
    !buffer_truncated && content_length.unwrap_or(0) <= limit && body_bytes_read <= limit
}

/// The error a streamed (chunked) body raises when it passes `proxy.max_request_body_bytes`.
pub const BODY_TOO_LARGE: ErrorType = ErrorType::Custom("request_too_large");

/// A declared `Content-Length` over `limit`.
pub fn declared_body_too_large(req: &RequestHeader, limit: u64) -> bool {
    req.headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > limit)
}

/// Which refusal an upstream error becomes.
pub fn refusal_for(etype: &ErrorType) -> Refusal {
    match etype {
        &BODY_TOO_LARGE => Refusal::RequestTooLarge,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            Refusal::UpstreamTimeout
        }
        _ => Refusal::UpstreamUnreachable,
    }
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
    // An origin-form URI (the usual case) already is just the path and query.
    let origin_form = upstream.uri.authority().is_none()
        && upstream.uri.scheme().is_none()
        && upstream.uri.path_and_query().map(|pq| pq.as_str()) == Some(path_and_query);
    if !origin_form {
        let uri: Uri = path_and_query
            .parse()
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad request path"))?;
        upstream.set_uri(uri);
    }
    upstream.remove_header(&header::AUTHORIZATION);
    upstream.remove_header(&header::PROXY_AUTHORIZATION);
    upstream.insert_header(header::HOST, host.clone())?;
    if let Some(bearer) = bearer {
        upstream.insert_header(header::AUTHORIZATION, bearer.clone())?;
    }
    Ok(())
}

/// Genesys's rate-limit headers, parsed once at compile time rather than per response.
pub const RATELIMIT_COUNT: HeaderName = HeaderName::from_static("inin-ratelimit-count");
pub const RATELIMIT_ALLOWED: HeaderName = HeaderName::from_static("inin-ratelimit-allowed");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("inin-ratelimit-reset");
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("inin-correlation-id");

pub fn header_u64(resp: &ResponseHeader, name: &HeaderName) -> Option<u64> {
    resp.headers.get(name)?.to_str().ok()?.trim().parse().ok()
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
    fn replay_rules() {
        assert!(replayable(Some(10_240), 10_240, false, 65_536));
        assert!(replayable(None, 0, false, 65_536));
        assert!(!replayable(Some(102_400), 65_536, true, 65_536));
        assert!(!replayable(Some(2_000), 2_000, false, 1_000));
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
