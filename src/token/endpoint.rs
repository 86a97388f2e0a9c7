//! The HTTP client for the Genesys token endpoint and for token validation.
//!
//! `POST /oauth/token` with `Authorization: Basic`, a form body `grant_type=client_credentials`
//! and nothing else (GENESYS.md). Every failure is classified into one of the outcomes the
//! metrics and audit log use. Error messages never contain a secret or a token.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::{header, StatusCode, Url};
use serde::Deserialize;

use super::secret::Secret;

/// What a token call can come to. The names are the `outcome` label values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("the token endpoint refused the client credentials (invalid_client)")]
    InvalidClient,
    #[error("the token endpoint is throttling this client (rate limit exceeded)")]
    RateLimited,
    #[error("the token endpoint answered HTTP {0}")]
    ServerError(u16),
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
            MintError::ServerError(_) => "server_error",
            MintError::Network(_) => "network_error",
            MintError::InvalidResponse(_) => "invalid_response",
            MintError::ValidationFailed(_) => "validation_failed",
        }
    }
}

/// A freshly minted token, not yet validated.
#[derive(Debug)]
pub struct Minted {
    pub access_token: Secret,
    pub expires_in: Duration,
}

/// Token endpoint and API base, with one pooled HTTP client.
#[derive(Clone)]
pub struct TokenEndpoint {
    client: reqwest::Client,
    token_url: Url,
    tokens_me_url: Url,
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

impl TokenEndpoint {
    /// `ca_certs` (DER), when given, are the only trusted CAs (the `genesys.ca_file` key).
    pub fn new(
        token_url: Url,
        api_base: &str,
        connect_timeout: Duration,
        request_timeout: Duration,
        ca_certs: Option<&[Vec<u8>]>,
    ) -> Result<Self, String> {
        let tokens_me_url =
            Url::parse(&format!("{api_base}/api/v2/tokens/me?preserveIdleTTL=true"))
                .map_err(|e| format!("bad API URL: {e}"))?;
        let mut builder = reqwest::Client::builder();
        if let Some(certs) = ca_certs {
            let certs = certs
                .iter()
                .map(|der| reqwest::Certificate::from_der(der))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("genesys.ca_file: {e}"))?;
            builder = builder.tls_certs_only(certs);
        }
        let client = builder
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("genesys-auth-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(TokenEndpoint {
            client,
            token_url,
            tokens_me_url,
        })
    }

    /// The endpoint a validated config describes (token URL, API base, timeouts, `ca_file`).
    pub fn for_config(config: &crate::config::Config) -> Result<Self, String> {
        let r = &config.restart;
        Self::new(
            r.genesys.token_url.clone(),
            &r.genesys.api.base_url(),
            r.token.connect_timeout,
            r.token.request_timeout,
            r.genesys.ca_certs.as_deref(),
        )
    }

    /// The HTTP client (timeouts, `ca_file`), shared with the JWKS fetches.
    pub fn http_client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// Runs the client-credentials grant once.
    pub async fn mint(&self, client_id: &str, secret: &Secret) -> Result<Minted, MintError> {
        let basic = STANDARD.encode(format!("{client_id}:{}", secret.expose()));
        let mut auth = header::HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| MintError::InvalidResponse("credentials are not a valid header".into()))?;
        auth.set_sensitive(true);
        let response = self
            .client
            .post(self.token_url.clone())
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/json")
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|e| MintError::Network(describe(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| MintError::Network(describe(&e)))?;
        classify(status, &body)
    }

    /// Checks a new token with `GET /api/v2/tokens/me?preserveIdleTTL=true`.
    pub async fn validate(&self, token: &Secret) -> Result<(), MintError> {
        let mut bearer = header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| MintError::InvalidResponse("token is not a valid header value".into()))?;
        bearer.set_sensitive(true);
        let status = self.tokens_me(bearer).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(MintError::ValidationFailed(format!(
                "GET /api/v2/tokens/me answered HTTP {}",
                status.as_u16()
            )))
        }
    }

    /// Is a held token still accepted? False only for a 401: anything else (network, 5xx,
    /// 429) says nothing about the token.
    pub async fn still_accepted(&self, bearer: &header::HeaderValue) -> bool {
        !matches!(
            self.tokens_me(bearer.clone()).await,
            Ok(StatusCode::UNAUTHORIZED)
        )
    }

    /// `GET /api/v2/tokens/me?preserveIdleTTL=true` with `bearer`: the answer's status.
    async fn tokens_me(&self, bearer: header::HeaderValue) -> Result<StatusCode, MintError> {
        let response = self
            .client
            .get(self.tokens_me_url.clone())
            .header(header::AUTHORIZATION, bearer)
            .send()
            .await
            .map_err(|e| MintError::ValidationFailed(describe(&e)))?;
        Ok(response.status())
    }
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
        let expires_in = match parsed.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
        .ok_or_else(|| MintError::InvalidResponse("no numeric expires_in".into()))?;
        if !(expires_in.is_finite() && expires_in >= 1.0) {
            return Err(MintError::InvalidResponse(format!(
                "expires_in {expires_in} is not positive"
            )));
        }
        if header::HeaderValue::from_str(&token).is_err() {
            return Err(MintError::InvalidResponse(
                "access_token has characters not allowed in a header".into(),
            ));
        }
        return Ok(Minted {
            access_token: Secret::new(token),
            expires_in: Duration::from_secs_f64(expires_in.min(10.0 * 86_400.0)),
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
    Err(MintError::ServerError(status.as_u16()))
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
        assert_eq!(m.expires_in, Duration::from_secs(86400));
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
            class(200, r#"{"access_token":"a"}"#).unwrap_err().outcome(),
            "invalid_response"
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
            MintError::ServerError(400)
        );
        assert_eq!(class(500, "oops").unwrap_err(), MintError::ServerError(500));
        assert_eq!(class(503, "").unwrap_err().outcome(), "server_error");
    }

    #[test]
    fn error_text_never_holds_the_body() {
        let e = class(200, r#"{"access_token":"TOPSECRET","expires_in":0}"#).unwrap_err();
        assert!(!e.to_string().contains("TOPSECRET"));
    }
}
