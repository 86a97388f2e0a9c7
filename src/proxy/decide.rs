//! The proxy's decisions as plain functions over request data, testable without a socket:
//! who may call, which paths pass, whether a 401 is replayed, how the upstream request is
//! rewritten, which error the proxy answers itself, and bounded metric labels.

use std::net::IpAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Uri};
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
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::ClientNotAllowed | Refusal::PathNotAllowed => 403,
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

/// Is `path` under an allowed prefix, and does it mean one thing only? The upstream must see
/// exactly the path that was checked, so anything a server might normalise differently is
/// refused: dot segments (also `..;` and percent-encoded dots), empty segments (`//`), path
/// parameters (`;`), encoded separators, double encoding (`%252e`), invalid escapes, control
/// characters, and bytes that do not decode to UTF-8 (overlong dots like `%c0%ae`).
pub fn path_allowed(path: &str, prefixes: &[String]) -> bool {
    if !path.starts_with('/') || path.contains(['\\', ';']) {
        return false;
    }
    let Some(decoded) = percent_decode(path).and_then(|b| String::from_utf8(b).ok()) else {
        return false;
    };
    let separators = |p: &str| p.matches('/').count();
    if separators(&decoded) != separators(path)
        || decoded.contains(['\\', ';'])
        || decoded.chars().any(char::is_control)
        || percent_decode(&decoded).is_some_and(|again| again != decoded.as_bytes())
    {
        return false;
    }
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let bad_segment = segments
        .iter()
        .enumerate()
        .any(|(i, seg)| matches!(*seg, "." | "..") || (seg.is_empty() && i != last));
    !bad_segment && prefixes.iter().any(|p| path.starts_with(p.as_str()))
}

/// Decodes `%XX` escapes; `None` when a `%` is not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Collapses `Content-Length: 5, 5` and repeated identical `Content-Length` headers into one
/// value, so the upstream reads the body exactly as the proxy did. Returns false when the
/// values differ or do not parse: the request's framing is ambiguous (a smuggling vector) and
/// must be refused.
pub fn normalise_content_length(req: &mut RequestHeader) -> bool {
    let lengths: Option<Vec<u64>> = req
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<Vec<&str>>>()
        .and_then(|values| {
            values
                .iter()
                .flat_map(|v| v.split(','))
                .map(|part| {
                    let part = part.trim();
                    let digits = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
                    digits.then(|| part.parse::<u64>().ok()).flatten()
                })
                .collect()
        });
    let Some(lengths) = lengths else {
        return false;
    };
    let Some(&first) = lengths.first() else {
        return true;
    };
    if lengths.iter().any(|l| *l != first) {
        return false;
    }
    if lengths.len() > 1 {
        req.remove_header(&header::CONTENT_LENGTH);
        return req
            .insert_header(header::CONTENT_LENGTH, first.to_string())
            .is_ok();
    }
    true
}

/// Removes what would turn the request into a protocol switch (`Upgrade: websocket`, `h2c`):
/// a 101 answer would hand the client a raw tunnel past every check. The Genesys REST API
/// needs none, and `Upgrade: h2c` is only an offer, so the request goes on as plain HTTP/1.1.
pub fn strip_upgrade(req: &mut RequestHeader) {
    let upgrade = req.headers.contains_key(header::UPGRADE);
    req.remove_header(&header::UPGRADE);
    req.remove_header("http2-settings");
    if !upgrade {
        return;
    }
    let kept: Vec<String> = req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_string)
        .collect();
    req.remove_header(&header::CONNECTION);
    if !kept.is_empty() {
        let _ = req.insert_header(header::CONNECTION, kept.join(", "));
    }
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

/// Replays after 401s, at most: the first may use the pre-rotation token, the second a token
/// minted after the first 401.
pub const MAX_REPLAYS: u8 = 2;

/// Should a request whose token `used_generation` was just refused be replayed again?
///
/// The rule: a 401 reaches the client only if Genesys refused a token minted *after* the
/// request saw its first 401 (`newest_at_first_401` is the newest generation published at
/// that moment; `None` means this is the first 401), or the replays are spent.
pub fn replay_after_401(
    replays: u8,
    used_generation: u64,
    newest_at_first_401: Option<u64>,
) -> bool {
    match newest_at_first_401 {
        None => true,
        Some(_) if replays >= MAX_REPLAYS => false,
        Some(newest) => used_generation <= newest,
    }
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

pub fn header_u64(resp: &ResponseHeader, name: &str) -> Option<u64> {
    resp.headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Status codes as static labels, so the label set stays bounded and allocation-free.
pub fn status_label(status: u16) -> &'static str {
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
    fn paths_that_could_mean_two_things_are_refused() {
        let p = vec!["/api/v2/".to_string()];
        for bad in [
            "/api/v2/..;/x",
            "/api/v2/x/..;/../y",
            "/api/v2/users;jsessionid=1",
            "/api/v2//x",
            "/api/v2/a//b",
            "/api/v2/%252e%252e/x",
            "/api/v2/%252fadmin",
            "/api/v2/%c0%ae%c0%ae/x",
            "/api/v2/%e0%80%ae/x",
            "/api/v2/%ff",
            "/api/v2/%zz",
            "/api/v2/%2",
            "/api/v2/a%00b",
            "/api/v2/a%0ab",
            "/api/v2/%5cx",
        ] {
            assert!(!path_allowed(bad, &p), "{bad} must be refused");
        }
        for good in [
            "/api/v2/users",
            "/api/v2/users/",
            "/api/v2/users/5f3c-11/roles",
            "/api/v2/users/caf%C3%A9",
            "/api/v2/search%20term",
        ] {
            assert!(path_allowed(good, &p), "{good} must pass");
        }
    }

    #[test]
    fn content_lengths_are_collapsed_or_refused() {
        let req = |values: &[&str]| {
            let mut r = RequestHeader::build("POST", b"/api/v2/x", None).unwrap();
            for v in values {
                r.append_header(header::CONTENT_LENGTH, *v).unwrap();
            }
            r
        };
        for ok in [&["5, 5"][..], &["5", "5"], &["5,5, 5"], &["5"]] {
            let mut r = req(ok);
            assert!(normalise_content_length(&mut r), "{ok:?}");
            let all: Vec<_> = r.headers.get_all(header::CONTENT_LENGTH).iter().collect();
            assert_eq!(all, vec!["5"], "{ok:?}");
        }
        for bad in [
            &["5, 6"][..],
            &["5", "6"],
            &["-5"],
            &["5,"],
            &["0x5"],
            &["99999999999999999999999"],
        ] {
            assert!(!normalise_content_length(&mut req(bad)), "{bad:?}");
        }
    }

    #[test]
    fn upgrades_are_stripped_other_connection_options_kept() {
        let mut req = RequestHeader::build("GET", b"/api/v2/users", None).unwrap();
        req.insert_header(header::UPGRADE, "websocket").unwrap();
        req.insert_header(header::CONNECTION, "keep-alive, Upgrade")
            .unwrap();
        req.insert_header("http2-settings", "AAA").unwrap();
        strip_upgrade(&mut req);
        assert!(req.headers.get(header::UPGRADE).is_none());
        assert!(req.headers.get("http2-settings").is_none());
        assert_eq!(req.headers.get(header::CONNECTION).unwrap(), "keep-alive");
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
        assert!(replayable(Some(10_240), 10_240, false, 65_536));
        assert!(replayable(None, 0, false, 65_536));
        assert!(!replayable(Some(102_400), 65_536, true, 65_536));
        assert!(!replayable(Some(2_000), 2_000, false, 1_000));
    }

    #[test]
    fn a_401_reaches_the_client_only_for_a_token_minted_after_the_first_401() {
        // First 401: always replay.
        assert!(replay_after_401(0, 5, None));
        // The replay used the pre-rotation token (4) or one that existed at the first 401 (5):
        // replay again with a fresh one.
        assert!(replay_after_401(1, 4, Some(5)));
        assert!(replay_after_401(1, 5, Some(5)));
        // A token minted after the first 401 was refused: the 401 is real.
        assert!(!replay_after_401(1, 6, Some(5)));
        // Bounded whatever happens.
        assert!(!replay_after_401(MAX_REPLAYS, 4, Some(5)));
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
