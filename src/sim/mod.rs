//! The Genesys Cloud simulator: a local stand-in for `login.<domain>` and `api.<domain>` that
//! keeps state the way Genesys does (clients with several secrets, opaque tokens with lifetimes,
//! revocation, idle timeout, per-token API rate limits, token-endpoint throttling answered with
//! 400), plus a loopback-only control API under `/__sim/` for tests and demos.
//!
//! One listener serves both hosts' paths. Start it in-process with [`start`] on a listener you
//! bound (port 0 in tests), or from the command line with `genesys-auth-proxy sim`. [`jwt`]:
//! signed tokens of the generic-issuer mode and its JWKS; [`tls`]: its HTTPS listener.

mod api;
mod control;
pub mod jwt;
mod oauth;
pub mod state;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use state::{FaultKind, SimState};

/// The token format the simulator issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TokenFormat {
    /// Random opaque strings, as Genesys issues.
    #[default]
    Opaque,
    /// RS256 JWTs with a JWKS at `/.well-known/jwks.json` (for generic OAuth2 issuers).
    Jwt,
}

/// Start-up settings of the simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `(client_id, secret)` pairs known at start.
    pub clients: Vec<(String, String)>,
    pub token_lifetime_seconds: u64,
    pub token_rate_limit_per_minute: u64,
    /// API calls per token per window before 429 (the name says minute: Genesys's window).
    pub api_rate_limit_per_minute: u64,
    /// The per-token API rate-limit window: 60 s as at Genesys; shorter in tests.
    pub api_rate_limit_window: std::time::Duration,
    /// Tokens unused this long die (the org inactivity timeout). Sub-second values are for
    /// in-process tests; the CLI takes whole seconds.
    pub idle_timeout: Option<std::time::Duration>,
    pub token_format: TokenFormat,
    /// Serve HTTPS with a certificate generated at start (see [`SimHandle::cert_pem`]).
    pub tls: bool,
    /// Endpoint (org-wide) limits: calls under a path prefix, over every token, per window.
    pub endpoint_limits: Vec<EndpointLimit>,
}

/// `--endpoint-limit PATH_PREFIX=N/SECONDS`: at most `limit` calls whose path starts with
/// `prefix`, from all tokens together, per `window` (fixed windows from the first call). Past
/// it Genesys's normalised 429 is answered while the token's own headers still show budget,
/// as Genesys does for its endpoint and organisation limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointLimit {
    pub prefix: String,
    pub limit: u64,
    pub window: std::time::Duration,
}

impl std::str::FromStr for EndpointLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected PATH_PREFIX=N/SECONDS, e.g. /api/v2/flows=10/60");
        let (prefix, rate) = s.split_once('=').ok_or_else(bad)?;
        let (n, secs) = rate.split_once('/').ok_or_else(bad)?;
        let limit: u64 = n.trim().parse().map_err(|_| bad())?;
        let secs: u64 = secs.trim().parse().map_err(|_| bad())?;
        if !prefix.starts_with("/api/v2/") || limit == 0 || !(1..=3600).contains(&secs) {
            return Err(format!(
                "{s:?}: the prefix must start with /api/v2/, N must be at least 1 and SECONDS 1 to 3600"
            ));
        }
        Ok(EndpointLimit {
            prefix: prefix.to_string(),
            limit,
            window: std::time::Duration::from_secs(secs),
        })
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            clients: Vec::new(),
            token_lifetime_seconds: 86_400,
            token_rate_limit_per_minute: 300,
            api_rate_limit_per_minute: 300,
            api_rate_limit_window: std::time::Duration::from_secs(60),
            idle_timeout: None,
            token_format: TokenFormat::Opaque,
            tls: false,
            endpoint_limits: Vec::new(),
        }
    }
}

/// A running simulator. Dropping it stops the server.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub state: Arc<SimState>,
    /// With `tls`, the PEM certificate clients must trust.
    pub cert_pem: Option<String>,
    task: JoinHandle<()>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT` (`https://` with TLS), the base URL for login and API paths.
    pub fn url(&self) -> String {
        let scheme = if self.cert_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the simulator on `listener` until the returned handle is dropped.
pub fn start(config: SimConfig, listener: TcpListener) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let cert = if config.tls {
        Some(tls::generate().map_err(std::io::Error::other)?)
    } else {
        None
    };
    let scheme = if config.tls { "https" } else { "http" };
    let state = Arc::new(SimState::new(config));
    state.keys.set_issuer(format!("{scheme}://{addr}"));
    let app = router(state.clone());
    let cert_pem = cert.as_ref().map(|c| c.cert_pem.clone());
    let task = match cert {
        Some(cert) => tokio::spawn(tls::serve(listener, app, cert.server_config)),
        None => tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, service).await {
                tracing::error!(error = %e, "simulator server stopped");
            }
        }),
    };
    Ok(SimHandle {
        addr,
        state,
        cert_pem,
        task,
    })
}

fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/oauth/token", post(oauth::token))
        .route("/.well-known/jwks.json", get(oauth::jwks))
        .route("/.well-known/openid-configuration", get(oauth::discovery))
        .nest("/__sim", control::router())
        .route("/api/v2/{*rest}", any(api::handle))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> Response {
    genesys_error(
        StatusCode::NOT_FOUND,
        "not.found",
        "The requested resource was not found.",
    )
}

/// A fresh opaque token: 32 random bytes, base64url (43 characters, 256 bits of entropy).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A random correlation id in UUID form, like Genesys's `ININ-Correlation-Id`.
pub fn correlation_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A response in Genesys's `ErrorBody` shape, with `ININ-Correlation-Id` equal to `contextId`.
pub fn genesys_error(status: StatusCode, code: &str, message: &str) -> Response {
    genesys_error_with(status, code, message, HeaderMap::new())
}

pub fn genesys_error_with(
    status: StatusCode,
    code: &str,
    message: &str,
    mut headers: HeaderMap,
) -> Response {
    let cid = correlation_id();
    let body = serde_json::json!({
        "message": message,
        "code": code,
        "status": status.as_u16(),
        "contextId": cid,
        "details": [],
        "errors": [],
    });
    if let Ok(v) = HeaderValue::from_str(&cid) {
        headers.insert("inin-correlation-id", v);
    }
    (status, headers, axum::Json(body)).into_response()
}
