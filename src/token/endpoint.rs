//! The HTTP client for the token endpoint and for token validation.
//!
//! Genesys: `POST /oauth/token` with `Authorization: Basic base64(id:secret)`, a form body
//! `grant_type=client_credentials` and nothing else (GENESYS.md). `[oauth]` issuers: RFC 6749
//! §2.3.1 client authentication (`client_secret_basic` form-encodes id and secret before
//! base64; `client_secret_post` puts them in the form), plus `scope`, `audience` and
//! `extra_params`. Every failure is classified into one of the outcomes the metrics and audit
//! log use. Error messages never contain a secret or a token.

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::{header, StatusCode, Url};
use serde::Deserialize;

use crate::config::model::{AuthMethod, Grant, IssuerKind, UpstreamSettings};
use crate::secret::Secret;

/// What a token call can come to. The names are the `outcome` label values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("the token endpoint refused the client credentials (invalid_client)")]
    InvalidClient,
    #[error("the token endpoint is throttling this client (rate limit exceeded)")]
    RateLimited,
    #[error("the token endpoint answered HTTP {0}{1}")]
    ServerError(u16, OAuthCode),
    #[error("network error talking to the token endpoint: {0}")]
    Network(String),
    #[error("unusable token response: {0}")]
    InvalidResponse(String),
    #[error("the new token failed validation: {0}")]
    ValidationFailed(String),
}

impl MintError {
    /// The `outcome` label for `genesys_proxy_token_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            MintError::InvalidClient => "invalid_client",
            MintError::RateLimited => "rate_limited",
            MintError::ServerError(..) => "server_error",
            MintError::Network(_) => "network_error",
            MintError::InvalidResponse(_) => "invalid_response",
            MintError::ValidationFailed(_) => "validation_failed",
        }
    }
}

/// The OAuth `error` code of a refused request (RFC 6749 §5.2, e.g. `invalid_scope`), shown
/// after the status; empty when the answer had none. Never the description, which an issuer
/// may fill with anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OAuthCode(pub Option<String>);

impl std::fmt::Display for OAuthCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(code) => write!(f, " ({code})"),
            None => Ok(()),
        }
    }
}

/// A freshly minted token, not yet validated.
#[derive(Debug)]
pub struct Minted {
    pub access_token: Secret,
    /// `expires_in`; an `[oauth]` issuer may leave it out when the token is a JWT with `exp`.
    pub expires_in: Option<Duration>,
}

/// Token endpoint and API base, with one pooled HTTP client.
#[derive(Clone)]
pub struct TokenEndpoint {
    client: reqwest::Client,
    token_url: Url,
    grant: Grant,
    /// Genesys only: `GET /api/v2/tokens/me?preserveIdleTTL=true`.
    tokens_me_url: Option<Url>,
    /// `token.max_response_bytes`: the largest answer read.
    max_response: usize,
}

/// Reads an answer's body, streamed, refusing it once it passes `cap` bytes: a hostile or
/// broken issuer cannot make the proxy hold more than `cap` (a 3 GB token answer once grew
/// the process until the kernel killed it).
pub async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let too_large = || format!("the answer is larger than token.max_response_bytes ({cap} bytes)");
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
    description: Option<String>,
}

/// An HTTP client for an issuer's hosts: `ca_certs` (DER) as the only trusted CAs when set, no
/// redirects, the proxy's user agent. A bad certificate's error starts with `ca_file:`.
///
/// With `egress`, every call goes through that forward proxy (CONNECT for HTTPS) except to
/// hosts `NO_PROXY` names; without it, no proxy at all: `HTTP(S)_PROXY` in the environment
/// is not read, so the token endpoint and the API path never take different routes.
pub fn http_client(
    ca_certs: Option<&[Vec<u8>]>,
    connect_timeout: Duration,
    request_timeout: Duration,
    egress: Option<&crate::config::EgressProxy>,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    builder = match egress {
        None => builder.no_proxy(),
        Some(e) => {
            let mut proxy = reqwest::Proxy::all(e.url.as_str())
                .map_err(|err| format!("egress_proxy: {err}"))?
                .no_proxy(
                    e.no_proxy
                        .as_deref()
                        .and_then(reqwest::NoProxy::from_string),
                );
            if let Some(user) = &e.username {
                proxy = proxy.basic_auth(user, e.password.as_ref().map_or("", |p| p.expose()));
            }
            builder.proxy(proxy)
        }
    };
    if let Some(certs) = ca_certs {
        let certs = certs
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("ca_file: {e}"))?;
        builder = builder.tls_certs_only(certs);
    }
    builder
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("genesys-auth-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

impl TokenEndpoint {
    /// Where tokens are requested.
    pub fn token_url(&self) -> &Url {
        &self.token_url
    }

    /// The endpoint of `upstream` (token URL, grant, API base, `ca_file`) with these timeouts.
    pub fn new(
        upstream: &UpstreamSettings,
        connect_timeout: Duration,
        request_timeout: Duration,
        max_response: usize,
    ) -> Result<Self, String> {
        let api_base = upstream.api.base_url();
        let tokens_me_url = match upstream.grant.issuer {
            IssuerKind::Genesys => Some(
                Url::parse(&format!("{api_base}/api/v2/tokens/me?preserveIdleTTL=true"))
                    .map_err(|e| format!("bad API URL: {e}"))?,
            ),
            IssuerKind::OAuth => None,
        };
        let section = upstream.grant.issuer.section();
        let client = http_client(
            upstream.ca_certs.as_deref(),
            connect_timeout,
            request_timeout,
            upstream.egress.as_ref(),
        )
        .map_err(|e| match e.starts_with("ca_file:") {
            true => format!("{section}.{e}"),
            false => e,
        })?;
        Ok(TokenEndpoint {
            client,
            token_url: upstream.token_url.clone(),
            grant: upstream.grant.clone(),
            tokens_me_url,
            max_response,
        })
    }

    /// The endpoint a validated config describes (token URL, API base, timeouts, `ca_file`).
    pub fn for_credential(credential: &crate::config::Credential) -> Result<Self, String> {
        let r = &credential.restart;
        let t = &r.token;
        Self::new(
            &r.genesys,
            t.connect_timeout,
            t.request_timeout,
            t.max_response_bytes,
        )
    }

    /// `token.max_response_bytes`, for the JWKS and discovery fetches.
    pub fn max_response_bytes(&self) -> usize {
        self.max_response
    }

    /// The HTTP client (timeouts, `ca_file`), shared with the JWKS fetches.
    pub fn http_client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// Runs the client-credentials grant once.
    pub async fn mint(&self, client_id: &str, secret: &Secret) -> Result<Minted, MintError> {
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let mut request = self
            .client
            .post(self.token_url.clone())
            .header(header::ACCEPT, "application/json");
        match self.grant.auth_method {
            AuthMethod::ClientSecretBasic => {
                let auth = basic_auth(self.grant.issuer, client_id, secret)?;
                request = request.header(header::AUTHORIZATION, auth);
            }
            AuthMethod::ClientSecretPost => {
                form.push(("client_id", client_id));
                form.push(("client_secret", secret.expose()));
            }
        }
        form.extend(
            self.grant
                .params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| MintError::Network(describe(&e)))?;
        let status = response.status();
        let body = read_capped(response, self.max_response)
            .await
            .map_err(MintError::InvalidResponse)?;
        classify(status, &body)
    }

    /// Checks a new token with `GET /api/v2/tokens/me?preserveIdleTTL=true`; its
    /// `dateTokenIdles`, when Genesys fills it (the org's idle timeout is on), comes back as
    /// the time left until the fresh token would idle out.
    pub async fn validate(&self, token: &Secret) -> Result<Option<Duration>, MintError> {
        if self.tokens_me_url.is_none() {
            return Err(MintError::ValidationFailed(
                "validation = \"tokens_me\" needs [genesys]".into(),
            ));
        }
        let mut bearer = header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| MintError::InvalidResponse("token is not a valid header value".into()))?;
        bearer.set_sensitive(true);
        let response = self.tokens_me_response(bearer).await?;
        let status = response.status();
        if status.is_success() {
            let body = read_capped(response, self.max_response)
                .await
                .unwrap_or_default();
            Ok(idles_after(&body))
        } else {
            Err(MintError::ValidationFailed(format!(
                "GET /api/v2/tokens/me answered HTTP {}",
                status.as_u16()
            )))
        }
    }

    /// Is a held token still accepted? False only for a 401: anything else (network, 5xx,
    /// 429) says nothing about the token. An `[oauth]` API has no such call: its tokens are
    /// taken as accepted until a request of their own meets a 401 (and is replayed).
    pub async fn still_accepted(&self, bearer: &header::HeaderValue) -> bool {
        self.tokens_me_url.is_none()
            || !matches!(
                self.tokens_me(bearer.clone()).await,
                Ok(StatusCode::UNAUTHORIZED)
            )
    }

    /// `GET /api/v2/tokens/me?preserveIdleTTL=true` with `bearer`: the answer's status.
    async fn tokens_me(&self, bearer: header::HeaderValue) -> Result<StatusCode, MintError> {
        Ok(self.tokens_me_response(bearer).await?.status())
    }

    async fn tokens_me_response(
        &self,
        bearer: header::HeaderValue,
    ) -> Result<reqwest::Response, MintError> {
        let Some(url) = self.tokens_me_url.clone() else {
            return Err(MintError::ValidationFailed(
                "no tokens/me with [oauth]".into(),
            ));
        };
        let response = self
            .client
            .get(url)
            .header(header::AUTHORIZATION, bearer)
            .send()
            .await
            .map_err(|e| MintError::ValidationFailed(describe(&e)))?;
        Ok(response)
    }
}

/// `TokenInfo.dateTokenIdles` (RFC 3339) as time from now, when present and in the future.
fn idles_after(body: &[u8]) -> Option<Duration> {
    let info: serde_json::Value = serde_json::from_slice(body).ok()?;
    let date = info.get("dateTokenIdles")?.as_str()?;
    let at = humantime::parse_rfc3339(date)
        .or_else(|_| humantime::parse_rfc3339_weak(date.trim_end_matches('Z')))
        .ok()?;
    at.duration_since(SystemTime::now()).ok()
}

/// Turns a token-endpoint answer into a token or a classified error.
pub fn classify(status: StatusCode, body: &[u8]) -> Result<Minted, MintError> {
    if status.is_success() {
        let parsed: TokenResponse = serde_json::from_slice(body).map_err(|_| {
            MintError::InvalidResponse(format!("HTTP {} body is not JSON", status.as_u16()))
        })?;
        let token = parsed
            .access_token
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| MintError::InvalidResponse("no access_token".into()))?;
        if let Some(tt) = parsed.token_type.as_deref() {
            if !tt.eq_ignore_ascii_case("bearer") {
                return Err(MintError::InvalidResponse(format!(
                    "token_type {tt:?} is not bearer"
                )));
            }
        }
        let raw = parsed.expires_in.filter(|v| !v.is_null());
        let expires_in = match &raw {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        if raw.is_some() && expires_in.is_none() {
            return Err(MintError::InvalidResponse(
                "expires_in is not a number".into(),
            ));
        }
        if let Some(e) = expires_in.filter(|e| !(e.is_finite() && *e >= 1.0)) {
            return Err(MintError::InvalidResponse(format!(
                "expires_in {e} is not positive"
            )));
        }
        if header::HeaderValue::from_str(&token).is_err() {
            return Err(MintError::InvalidResponse(
                "access_token has characters not allowed in a header".into(),
            ));
        }
        return Ok(Minted {
            access_token: Secret::new(token),
            // Cut far below f64's range so the Duration is sound; the minter then cuts it to
            // token.max_lifetime_seconds and says so.
            expires_in: expires_in.map(|e| Duration::from_secs_f64(e.min(366.0 * 86_400.0))),
        });
    }
    let oauth: Option<OAuthError> = serde_json::from_slice(body).ok();
    let error = oauth
        .as_ref()
        .and_then(|o| o.error.as_deref())
        .unwrap_or("");
    let description = oauth
        .as_ref()
        .and_then(|o| o.error_description.as_deref().or(o.description.as_deref()))
        .unwrap_or("")
        .to_ascii_lowercase();
    if error == "invalid_client" || status == StatusCode::UNAUTHORIZED {
        return Err(MintError::InvalidClient);
    }
    // Genesys throttles the token endpoint with 400 invalid_request "rate limit exceeded; ...".
    if status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::BAD_REQUEST && description.starts_with("rate limit exceeded"))
    {
        return Err(MintError::RateLimited);
    }
    let code =
        (!error.is_empty() && error.len() <= 64 && error.bytes().all(|c| c.is_ascii_graphic()))
            .then(|| error.to_string());
    Err(MintError::ServerError(status.as_u16(), OAuthCode(code)))
}

/// `Authorization: Basic …`, marked sensitive. Genesys takes the raw `id:secret`; RFC 6749
/// §2.3.1 form-encodes each part first (an issuer decodes them; for letters, digits and
/// `-._*` the two are the same).
fn basic_auth(
    issuer: IssuerKind,
    client_id: &str,
    secret: &Secret,
) -> Result<header::HeaderValue, MintError> {
    let pair = match issuer {
        IssuerKind::Genesys => format!("{client_id}:{}", secret.expose()),
        IssuerKind::OAuth => {
            let encode =
                |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            format!("{}:{}", encode(client_id), encode(secret.expose()))
        }
    };
    let mut auth = header::HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair)))
        .map_err(|_| MintError::InvalidResponse("credentials are not a valid header".into()))?;
    auth.set_sensitive(true);
    Ok(auth)
}

/// A reqwest error without its URL's query (there is none, but be sure) or any header.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_token_idles_becomes_the_time_left() {
        let at = SystemTime::now() + Duration::from_secs(300);
        let millis = humantime::format_rfc3339_millis(at).to_string();
        let left = idles_after(format!("{{\"dateTokenIdles\":\"{millis}\"}}").as_bytes()).unwrap();
        assert!((298..=300).contains(&left.as_secs()), "{left:?}");
        let seconds = humantime::format_rfc3339_seconds(at).to_string();
        assert!(idles_after(format!("{{\"dateTokenIdles\":\"{seconds}\"}}").as_bytes()).is_some());
        // Absent (no idle timeout), in the past, or not a date: nothing learned.
        assert_eq!(idles_after(b"{\"organization\":{}}"), None);
        assert_eq!(
            idles_after(b"{\"dateTokenIdles\":\"2001-01-01T00:00:00Z\"}"),
            None
        );
        assert_eq!(idles_after(b"{\"dateTokenIdles\":\"soon\"}"), None);
    }

    fn class(status: u16, body: &str) -> Result<Minted, MintError> {
        classify(StatusCode::from_u16(status).unwrap(), body.as_bytes())
    }

    #[test]
    fn success_reads_expires_in() {
        let m = class(
            200,
            r#"{"access_token":"abc","token_type":"bearer","expires_in":86400}"#,
        )
        .unwrap();
        assert_eq!(m.expires_in, Some(Duration::from_secs(86400)));
        assert_eq!(m.access_token.expose(), "abc");
    }

    #[test]
    fn every_failure_is_classified() {
        assert_eq!(
            class(200, "<html>").unwrap_err().outcome(),
            "invalid_response"
        );
        assert_eq!(class(200, "{}").unwrap_err().outcome(), "invalid_response");
        assert_eq!(
            class(200, r#"{"access_token":"","expires_in":5}"#)
                .unwrap_err()
                .outcome(),
            "invalid_response"
        );
        assert_eq!(
            class(200, r#"{"access_token":"a","expires_in":0}"#)
                .unwrap_err()
                .outcome(),
            "invalid_response"
        );
        assert_eq!(
            class(200, r#"{"access_token":"a","expires_in":-5}"#)
                .unwrap_err()
                .outcome(),
            "invalid_response"
        );
        assert_eq!(
            class(200, r#"{"access_token":"a","expires_in":"soon"}"#)
                .unwrap_err()
                .outcome(),
            "invalid_response"
        );
        // Left out: the minter takes the JWT's exp or refuses it.
        assert_eq!(
            class(200, r#"{"access_token":"a"}"#).unwrap().expires_in,
            None
        );
        assert_eq!(
            class(401, r#"{"error":"invalid_client","description":"authentication failed","error_description":"authentication failed"}"#)
                .unwrap_err(),
            MintError::InvalidClient
        );
        assert_eq!(
            class(400, r#"{"error":"invalid_request","error_description":"rate limit exceeded; try later"}"#).unwrap_err(),
            MintError::RateLimited
        );
        assert_eq!(
            class(400, r#"{"error":"invalid_request"}"#).unwrap_err(),
            MintError::ServerError(400, OAuthCode(Some("invalid_request".into())))
        );
        assert_eq!(
            class(
                400,
                r#"{"error":"invalid_scope","error_description":"no such scope"}"#
            )
            .unwrap_err()
            .to_string(),
            "the token endpoint answered HTTP 400 (invalid_scope)"
        );
        assert_eq!(
            class(500, "oops").unwrap_err(),
            MintError::ServerError(500, OAuthCode(None))
        );
        assert_eq!(class(503, "").unwrap_err().outcome(), "server_error");
    }

    #[test]
    fn error_text_never_holds_the_body() {
        let e = class(200, r#"{"access_token":"TOPSECRET","expires_in":0}"#).unwrap_err();
        assert!(!e.to_string().contains("TOPSECRET"));
    }
}
