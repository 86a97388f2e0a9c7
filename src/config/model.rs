//! The validated configuration the rest of the program uses, built by `config::build`.
//!
//! [`Config`] is the [`Process`] (what one process owns: worker threads, connection cap,
//! admin, audit, log format, the Redis link) and its [`Credential`]s, each a symmetric entry.
//! A credential is split by how a reload treats it: [`Restart`] holds what is read once at
//! start-up (listener, hosts, HTTP client timeouts, pool size), [`Live`] what a reload swaps
//! in place as one snapshot (`ArcSwap<Live>`), and [`CredentialSettings`] what the refresher
//! must validate before it is used. Every field names its file key (see
//! [`super::keyed`]).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::Url;

use super::keyed::{keyed_sections, keyed_struct, Keyed};
use jsonwebtoken::Algorithm;

pub use crate::audit::AuditTarget;
use crate::secret::{Secret, SecretSource};

/// pingora replays at most this much request body from its retry buffer.
pub const PINGORA_RETRY_BUFFER_BYTES: u64 = 64 * 1024;

/// A whole, validated configuration file: what the process owns, and every credential as a
/// symmetric entry (the top-level `[genesys]`/`[oauth]` is `credentials[0]`, named
/// `default`; each `[[credential]]` follows in file order).
#[derive(Debug, Clone)]
pub struct Config {
    pub process: Process,
    /// `[apps]` and `[[app]]`: who may call (live).
    pub apps: super::apps::AppsSettings,
    /// `[proxy.tls]`: the listeners' certificate (live; on/off needs a restart).
    pub tls: super::tls::TlsConfig,
    /// Never empty.
    pub credentials: Vec<Credential>,
    /// Non-fatal findings (e.g. a secret file readable by others), printed at start-up.
    pub warnings: Vec<String>,
}

impl Config {
    /// The top-level credential.
    pub fn top(&self) -> &Credential {
        &self.credentials[0]
    }

    /// More than one credential: metrics and audit lines then name theirs.
    pub fn several(&self) -> bool {
        self.credentials.len() > 1
    }

    /// The credential called `name`.
    pub fn credential(&self, name: &CredentialName) -> Option<&Credential> {
        self.credentials.iter().find(|c| &c.name == name)
    }
}

/// One OAuth client: its listener, issuer, token lifecycle, and the live settings its
/// requests read. Built from its own section, inheriting `[proxy]`/`[token]` and the other
/// per-request sections from the top level where it does not say otherwise.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: CredentialName,
    pub restart: Restart,
    pub live: Live,
    pub secrets: CredentialSettings,
}

/// A credential's name, and every rule derived from it: the metric label, the config key
/// prefix in messages, the worker and audit scope names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialName(String);

impl CredentialName {
    /// The name the top-level credential goes by in `/status`, metrics and the audit log
    /// once there are several.
    pub const DEFAULT: &'static str = "default";

    pub fn top() -> Self {
        CredentialName(Self::DEFAULT.to_string())
    }

    /// A `[[credential]]` name: `[a-z0-9-]`, 1 to 32 characters, not `default`.
    pub fn parse(name: &str) -> Result<Self, String> {
        let ok = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        if !ok {
            return Err(format!("{name:?} must be 1 to 32 of [a-z0-9-]"));
        }
        if name == Self::DEFAULT {
            return Err(format!("{name:?} is the name of the top-level credential"));
        }
        Ok(CredentialName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_top(&self) -> bool {
        self.0 == Self::DEFAULT
    }

    /// The key a user wrote for the model key `key` of this credential: the top level's as
    /// is; a `[[credential]]`'s listener and allowlists sit in the entry itself, everything
    /// else under the entry's sections.
    pub fn key(&self, key: &str) -> String {
        if self.is_top() {
            return key.to_string();
        }
        let own = key.strip_prefix("proxy.").filter(|k| {
            matches!(
                *k,
                "listen" | "allowed_client_cidrs" | "allowed_path_prefixes"
            )
        });
        format!("credential.{}.{}", self.0, own.unwrap_or(key))
    }
}

impl std::fmt::Display for CredentialName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

keyed_sections! {
    /// Process-wide settings, read once at start-up (a reload that changes one reports
    /// "restart required"): worker threads and the connection cap shared by every listener,
    /// the admin listener, audit log, log format, the set of credentials and the Redis link.
    pub struct Process {
        pub proxy: ProxyProcess,
        pub admin: AdminSettings,
        pub audit: AuditSettings,
        pub log: LogRestart,
        pub tracing: TracingRestart,
        pub credentials: CredentialSet,
        pub cluster: ClusterRestart,
    }
}

keyed_sections! {
    /// One credential's settings read once at start-up.
    pub struct Restart {
        pub proxy: ProxyListen,
        pub genesys: UpstreamSettings,
        pub token: TokenRestart,
    }
}

keyed_struct! {
    /// `[tracing]`: read once at start (the exporter and its queue are built once).
    pub struct TracingRestart {
        pub otlp: Option<TracingSettings> => "tracing.otlp_endpoint" | "tracing.service_name" | "tracing.sample_ratio" | "tracing.max_queue_spans",
    }
}

/// Where and how spans are exported (OTLP over HTTP, protobuf).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The traces URL: `otlp_endpoint` as written when it has a path, else with `/v1/traces`.
    pub endpoint: Url,
    /// `service.name` of every span's resource.
    pub service_name: String,
    /// The share of new traces recorded (a request with a `traceparent` follows its flag).
    pub sample_ratio: f64,
    /// Finished spans waiting for export, at most; more are dropped (and counted).
    pub max_queue_spans: usize,
}

keyed_struct! {
    /// `[cluster]`: read once at start.
    pub struct ClusterRestart {
        pub settings: Option<ClusterSettings> => "cluster.redis_url" | "cluster.password" | "cluster.key_prefix" | "cluster.timeout_ms" | "cluster.lease_ms",
    }
}

/// How replicas share their tokens through Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// `redis://` or `rediss://` (TLS), without a password.
    pub redis_url: String,
    /// `cluster.password`: the Redis AUTH password, read like a client secret.
    pub password: Option<Secret>,
    /// Every key and channel starts with this.
    pub key_prefix: String,
    /// Every Redis call gives up after this; the proxy then works standalone.
    pub timeout: Duration,
    /// How long a replica may hold the right to mint before others may take it.
    pub lease: Duration,
}

keyed_struct! {
    /// The `[[credential]]` entries by name and listener: adding, removing or moving one needs
    /// a restart (their other keys reload like the top-level ones).
    pub struct CredentialSet {
        pub listeners: Vec<(CredentialName, SocketAddr)> => "credential",
    }
}

keyed_sections! {
    /// Settings a reload applies in place, swapped as one snapshot. Readers load it once per
    /// unit of work (a request, a refresh) so a reload never mixes old and new values.
    pub struct Live {
        pub proxy: ProxyLive,
        pub token: TokenLive,
        pub log: LogLive,
        pub anomaly: AnomalyThresholds,
        pub budget: BudgetSettings,
    }
}

keyed_struct! {
    /// A credential's listener.
    pub struct ProxyListen {
        pub listen: SocketAddr => "proxy.listen",
    }
}

keyed_struct! {
    /// `[proxy]` keys of the worker threads every listener shares.
    pub struct ProxyProcess {
        /// Proxy worker threads, each with its own single-threaded runtime accepting on every
        /// listener.
        pub threads: usize => "proxy.threads",
        /// SO_REUSEPORT on the proxy listener, for hand-over restarts.
        pub reuse_port: bool => "proxy.reuse_port",
        pub dns_refresh: Duration => "proxy.dns_refresh_seconds",
        pub shutdown_grace: Duration => "proxy.shutdown_grace_seconds",
        /// Open client connections at most, over every listener; more are answered 503 and
        /// closed at accept.
        pub max_connections: usize => "proxy.max_connections",
    }
}

keyed_struct! {
    /// `[proxy]` keys read per request.
    pub struct ProxyLive {
        pub allowed_client_cidrs: Vec<IpNet> => "proxy.allowed_client_cidrs",
        pub allowed_path_prefixes: Vec<String> => "proxy.allowed_path_prefixes",
        pub replay_body_limit_bytes: u64 => "proxy.replay_body_limit_bytes",
        /// Larger request bodies are refused with 413 before any API call (Genesys's
        /// documented limit is 512,000 bytes).
        pub max_request_body_bytes: u64 => "proxy.max_request_body_bytes",
        pub token_wait_timeout: Duration => "proxy.token_wait_timeout_ms",
        pub refresh_wait_timeout: Duration => "proxy.refresh_wait_timeout_ms",
        pub upstream_connect_timeout: Duration => "proxy.upstream_connect_timeout_ms",
        pub upstream_read_timeout: Duration => "proxy.upstream_read_timeout_ms",
        /// The whole request head must arrive within this.
        pub request_header_timeout: Duration => "proxy.request_header_timeout_ms",
        /// Methods forwarded; others get 405 (upper case).
        pub allowed_methods: Vec<http::Method> => "proxy.allowed_methods",
        /// Path characters outside ASCII once decoded (Genesys API paths are ASCII).
        pub allow_non_ascii_paths: bool => "proxy.allow_non_ascii_paths",
    }
}

keyed_struct! {
    pub struct AdminSettings {
        pub listen: SocketAddr => "admin.listen",
        /// When set, `POST /reload` requires `Authorization: Bearer <token>`.
        pub reload_token: Option<Secret> => "admin.reload_token",
        /// `Host` names accepted besides the listener's own address and `localhost`.
        pub allowed_hosts: Vec<String> => "admin.allowed_hosts",
        /// Open admin connections at most (within the descriptors kept free for it).
        pub max_connections: usize => "admin.max_connections",
        /// A connection waiting this long for a request head (idle or slow) is closed.
        pub idle_timeout: Duration => "admin.idle_timeout_ms",
    }
}

keyed_struct! {
    /// Where tokens come from and requests go: fixed for the life of the process. From
    /// `[genesys]` or, for any other OAuth2 issuer, `[oauth]`.
    pub struct UpstreamSettings {
        /// `https://login.<domain>/oauth/token`, or `oauth.token_url`.
        pub token_url: Url => "genesys.login_url" | "genesys.region" | "oauth.token_url",
        pub api: ApiTarget => "genesys.api_url" | "oauth.api_url",
        /// Reload when a secret file changes (the directory is watched: Kubernetes swaps a
        /// symlink).
        pub watch_secret_files: bool => "genesys.watch_secret_files" | "oauth.watch_secret_files",
        /// `ca_file`: when set, the only CAs trusted for the login and API hosts (DER).
        pub ca_certs: Option<Vec<Vec<u8>>> => "genesys.ca_file" | "oauth.ca_file",
        /// How the grant request is made.
        pub grant: Grant => "oauth.auth_method" | "oauth.scope" | "oauth.audience" | "oauth.extra_params",
        /// `egress_proxy`: the forward proxy both hosts are reached through, unless `NO_PROXY`
        /// names them.
        pub egress: Option<EgressProxy> => "genesys.egress_proxy" | "oauth.egress_proxy" | "genesys.egress_proxy_username" | "oauth.egress_proxy_username" | "genesys.egress_proxy_password" | "oauth.egress_proxy_password",
    }
}

/// A corporate HTTP forward proxy (`http://host:port`, CONNECT for HTTPS), with optional
/// Basic credentials (the password read like a secret).
#[derive(Debug, Clone, PartialEq)]
pub struct EgressProxy {
    /// `http://host:port`, without credentials.
    pub url: Url,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `NO_PROXY` (or `no_proxy`) as the environment had it at load: hosts reached directly.
    pub no_proxy: Option<String>,
}

impl EgressProxy {
    /// Is `host` reached directly (named by `NO_PROXY`)?
    pub fn bypasses(&self, host: &str) -> bool {
        self.no_proxy
            .as_deref()
            .is_some_and(|raw| crate::egress::NoProxy::parse(raw).matches(host))
    }
}

/// Which section configured the issuer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuerKind {
    /// `[genesys]`: Basic auth with the raw id and secret, a form with `grant_type` only
    /// (GENESYS.md), opaque tokens checked with `tokens/me`.
    Genesys,
    /// `[oauth]`: RFC 6749 client authentication, optional scope/audience/extra parameters.
    OAuth,
}

impl IssuerKind {
    /// The config section that names this issuer's keys.
    pub fn section(self) -> &'static str {
        match self {
            IssuerKind::Genesys => "genesys",
            IssuerKind::OAuth => "oauth",
        }
    }
}

/// How the client authenticates at the token endpoint (`oauth.auth_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `Authorization: Basic` (RFC 6749 §2.3.1).
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

/// The client-credentials request: how to authenticate and which form parameters to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub issuer: IssuerKind,
    pub auth_method: AuthMethod,
    /// Added after `grant_type`: `scope`, `audience`, then `extra_params` in key order.
    pub params: Vec<(String, String)>,
}

impl Grant {
    /// Genesys's grant: Basic auth, nothing but `grant_type`.
    pub fn genesys() -> Self {
        Grant {
            issuer: IssuerKind::Genesys,
            auth_method: AuthMethod::ClientSecretBasic,
            params: Vec::new(),
        }
    }
}

keyed_struct! {
    /// The client credentials. A change goes to the refresher, which mints and validates with
    /// the new secret before anything is swapped.
    pub struct CredentialSettings {
        pub client_id: String => "genesys.client_id" | "oauth.client_id",
        pub client_secret: Secret => "genesys.client_secret" | "oauth.client_secret",
        pub client_secret_source: SecretSource => "genesys.client_secret",
        pub previous_client_secret: Option<Secret> => "genesys.previous_client_secret" | "oauth.previous_client_secret",
        pub previous_client_secret_source: Option<SecretSource> => "genesys.previous_client_secret",
    }
}

keyed_struct! {
    /// The token endpoint's HTTP client timeouts (the client is built once) and the pool.
    pub struct TokenRestart {
        pub request_timeout: Duration => "token.request_timeout_ms",
        pub connect_timeout: Duration => "token.connect_timeout_ms",
        /// The largest answer read from the token endpoint, discovery or the JWKS.
        pub max_response_bytes: usize => "token.max_response_bytes",
        /// Tokens held at once (each has its own rate-limit budget at Genesys).
        pub pool_size: usize => "token.pool_size",
        /// With `validation = "jwks"`: where the keys are and what the tokens must say.
        pub jwks: Option<JwksSettings> => "token.jwks_url" | "token.issuer" | "token.audience" | "token.algorithms" | "token.jwks_cache_seconds" | "token.leeway_seconds",
    }
}

keyed_struct! {
    /// When and how the refresher mints.
    pub struct TokenLive {
        pub refresh_before_expiry: Duration => "token.refresh_before_expiry_seconds",
        pub validation: Validation => "token.validation",
        pub max_token_requests_per_minute: u32 => "token.max_token_requests_per_minute",
        pub backoff_initial: Duration => "token.backoff_initial_ms",
        pub backoff_max: Duration => "token.backoff_max_ms",
        /// How long a failed rotation to a new secret keeps being retried.
        pub rotation_retry_window: Duration => "token.rotation_retry_window_seconds",
        /// A longer lifetime from the issuer (`expires_in`, a JWT's `exp`) is cut to this.
        pub max_lifetime: Duration => "token.max_lifetime_seconds",
    }
}

keyed_struct! {
    pub struct AuditSettings {
        pub target: AuditTarget => "audit.path",
    }
}

keyed_struct! {
    pub struct LogRestart {
        pub format: LogFormat => "log.format",
    }
}

keyed_struct! {
    pub struct LogLive {
        pub level: String => "log.level",
        /// One line per request (target `access`): method, path without query, status,
        /// upstream status, duration, replayed, client address, correlation id. Never a header
        /// value.
        pub access_log: bool => "log.access_log",
    }
}

keyed_struct! {
    /// `[anomaly]`: thresholds and windows of the anomaly detector.
    pub struct AnomalyThresholds {
        pub window: Duration => "anomaly.window_ms",
        pub quiet: Duration => "anomaly.quiet_ms",
        pub refresh_failures: u32 => "anomaly.refresh_failures",
        pub invalid_client: u32 => "anomaly.invalid_client",
        pub early_rejection: u32 => "anomaly.early_rejection",
        pub unauthorized: u32 => "anomaly.unauthorized",
        pub rate_limited: u32 => "anomaly.rate_limited",
        /// A token rejected younger than this counts as an early rejection.
        pub early_rejection_age: Duration => "anomaly.early_rejection_age_ms",
    }
}

impl Default for AnomalyThresholds {
    fn default() -> Self {
        AnomalyThresholds {
            window: Duration::from_secs(60),
            quiet: Duration::from_secs(120),
            refresh_failures: 3,
            invalid_client: 1,
            early_rejection: 1,
            unauthorized: 20,
            rate_limited: 10,
            early_rejection_age: Duration::from_secs(60),
        }
    }
}

keyed_struct! {
    /// `[budget]`: living within Genesys's per-token rate limit.
    pub struct BudgetSettings {
        /// Calls a token may make per window until Genesys's headers say otherwise.
        pub requests_per_window: u64 => "budget.requests_per_window",
        pub window: Duration => "budget.window_seconds",
        /// Longest a request waits for budget before the proxy answers 429 itself.
        pub max_queue_wait: Duration => "budget.max_queue_wait_ms",
        pub max_queue_length: usize => "budget.max_queue_length",
        /// Application groups for fair sharing; clients outside them share by address.
        pub apps: Vec<AppGroup> => "budget.app",
    }
}

/// `[[budget.app]]`: requests from these networks count as one application.
#[derive(Debug, Clone, PartialEq)]
pub struct AppGroup {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    /// Its share relative to others (default 1).
    pub weight: u64,
}

/// Where requests go: scheme, host and port of the Genesys API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl ApiTarget {
    /// The `Host` header value: the host, plus the port when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Base URL, e.g. `https://api.mypurecloud.com`.
    pub fn base_url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host_header()
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// `GET /api/v2/tokens/me?preserveIdleTTL=true` with the new token before it is used.
    TokensMe,
    /// The token is a JWT verified against the issuer's JWKS (`[token] jwks_url`).
    Jwks,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// How a reload classifies what changed between two configs: every key is in exactly one
/// class, decided by the struct its field lives in.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Live keys: applied in place.
    pub applied: Vec<&'static str>,
    /// Restart-only keys: reported, not applied.
    pub restart_required: Vec<&'static str>,
    /// Client id or secret: the refresher validates before swapping.
    pub credentials: bool,
    /// Only the previous (fallback) secret.
    pub previous_secret: bool,
}

impl Diff {
    /// What changed in one credential (`old` and `new` have the same name).
    pub fn between(old: &Credential, new: &Credential) -> Diff {
        let (oc, nc) = (&old.secrets, &new.secrets);
        Diff {
            applied: old.live.diff(&new.live),
            restart_required: old
                .restart
                .diff(&new.restart)
                .into_iter()
                .map(|k| in_section(new.restart.genesys.grant.issuer, k))
                .collect(),
            credentials: oc.client_id != nc.client_id || oc.client_secret != nc.client_secret,
            previous_secret: oc.previous_client_secret != nc.previous_client_secret,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
            && self.restart_required.is_empty()
            && !self.credentials
            && !self.previous_secret
    }
}

/// A key as the user wrote it: the upstream keys are declared under `genesys.`; with
/// `[oauth]` they are reported under the `oauth.` names.
fn in_section(issuer: IssuerKind, key: &'static str) -> &'static str {
    if issuer == IssuerKind::Genesys {
        return key;
    }
    match key {
        "genesys.login_url" | "genesys.region" => "oauth.token_url",
        "genesys.api_url" => "oauth.api_url",
        "genesys.watch_secret_files" => "oauth.watch_secret_files",
        "genesys.ca_file" => "oauth.ca_file",
        other => other,
    }
}

/// Where the signing keys are published.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// `token.jwks_url`.
    Url(Url),
    /// The discovery document of `token.issuer`, whose `jwks_uri` names the JWKS.
    Discover(Url),
}

/// What `validation = "jwks"` checks (the `[token]` JWKS keys).
#[derive(Debug, Clone, PartialEq)]
pub struct JwksSettings {
    pub keys: KeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub algorithms: Vec<Algorithm>,
    pub cache: Duration,
    pub leeway: Duration,
}
