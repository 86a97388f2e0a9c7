//! The serde mirror of the TOML file: exactly the keys a user may write, unknown keys rejected.
//! Every field is optional here; defaults and checks live in [`super::model`].

use serde::Deserialize;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub admin: AdminSection,
    pub genesys: Option<GenesysSection>,
    /// Any other OAuth2 client-credentials issuer, instead of `[genesys]`.
    pub oauth: Option<OAuthSection>,
    #[serde(default)]
    pub token: TokenSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub log: LogSection,
    /// `[tracing]`: OpenTelemetry spans over OTLP/HTTP (process-wide).
    #[serde(default)]
    pub tracing: TracingSection,
    #[serde(default)]
    pub anomaly: AnomalySection,
    #[serde(default)]
    pub budget: BudgetSection,
    /// `[[credential]]`: further OAuth clients, each on its own listener.
    pub credential: Option<Vec<CredentialSection>>,
    /// `[cluster]`: replicas share tokens through Redis.
    pub cluster: Option<ClusterSection>,
    /// `[apps]`: how callers prove who they are.
    pub apps: Option<AppsSection>,
    /// `[[app]]`: the callers, each with its proofs, its credential and its share.
    pub app: Option<Vec<AppEntry>>,
}

/// `[apps]`: settings every `[[app]]` shares.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppsSection {
    pub token_key: Option<SecretRef>,
    pub token_lifetime_seconds: Option<u64>,
    pub anonymous: Option<String>,
    pub login_path_prefix: Option<String>,
    pub max_auth_failures_per_minute: Option<u32>,
}

/// `[[app]]`: one caller.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntry {
    pub name: Option<String>,
    pub credential: Option<String>,
    pub allowed_methods: Option<Vec<String>>,
    pub allowed_path_prefixes: Option<Vec<String>>,
    pub weight: Option<u64>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretRef>,
    pub client_secret_sha256: Option<String>,
    pub api_key_sha256: Option<Vec<String>>,
    pub mtls_subjects: Option<Vec<String>>,
    pub jwt: Option<JwtSection>,
}

/// `[[app]] jwt = { … }`: a workload token (e.g. a Kubernetes projected ServiceAccount token).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub subjects: Option<Vec<String>>,
    pub jwks_url: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub redis_url: Option<String>,
    pub password: Option<SecretRef>,
    pub key_prefix: Option<String>,
    pub timeout_ms: Option<u64>,
    pub lease_ms: Option<u64>,
}

/// `[[credential]]`: one more OAuth client with its own listener and token lifecycle. Keys it
/// leaves out come from the top-level `[proxy]` and `[token]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSection {
    pub name: Option<String>,
    pub listen: Option<String>,
    pub allowed_client_cidrs: Option<Vec<String>>,
    pub allowed_path_prefixes: Option<Vec<String>>,
    pub genesys: Option<GenesysSection>,
    pub oauth: Option<OAuthSection>,
    pub token: Option<TokenSection>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    pub requests_per_window: Option<u64>,
    pub window_seconds: Option<u64>,
    pub max_queue_wait_ms: Option<u64>,
    pub max_queue_length: Option<usize>,
    pub app: Option<Vec<AppSection>>,
}

/// `[[budget.app]]`: an application group for fair sharing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSection {
    pub name: Option<String>,
    pub cidrs: Option<Vec<String>>,
    pub weight: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalySection {
    pub window_ms: Option<u64>,
    pub quiet_ms: Option<u64>,
    pub refresh_failures: Option<u32>,
    pub invalid_client: Option<u32>,
    pub early_rejection: Option<u32>,
    pub early_rejection_age_ms: Option<u64>,
    pub unauthorized: Option<u32>,
    pub rate_limited: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub listen: Option<String>,
    pub allowed_client_cidrs: Option<Vec<String>>,
    pub allowed_path_prefixes: Option<Vec<String>>,
    pub replay_body_limit_bytes: Option<u64>,
    pub max_request_body_bytes: Option<u64>,
    pub token_wait_timeout_ms: Option<u64>,
    pub refresh_wait_timeout_ms: Option<u64>,
    pub upstream_connect_timeout_ms: Option<u64>,
    pub upstream_read_timeout_ms: Option<u64>,
    pub shutdown_grace_seconds: Option<u64>,
    pub dns_refresh_seconds: Option<u64>,
    pub threads: Option<usize>,
    pub reuse_port: Option<bool>,
    pub max_connections: Option<usize>,
    pub request_header_timeout_ms: Option<u64>,
    pub allowed_methods: Option<Vec<String>>,
    pub allow_non_ascii_paths: Option<bool>,
    /// `[proxy.tls]`: the listeners speak TLS.
    pub tls: Option<TlsSection>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub client_ca_file: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Option<String>,
    pub reload_token: Option<SecretRef>,
    pub allowed_hosts: Option<Vec<String>>,
    pub max_connections: Option<usize>,
    pub idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesysSection {
    pub region: Option<String>,
    pub login_url: Option<String>,
    pub api_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretRef>,
    pub previous_client_secret: Option<SecretRef>,
    pub watch_secret_files: Option<bool>,
    pub ca_file: Option<String>,
    pub egress_proxy: Option<String>,
    pub egress_proxy_username: Option<String>,
    pub egress_proxy_password: Option<SecretRef>,
}

/// `[oauth]`: a generic OAuth2 issuer (RFC 6749 client-credentials grant).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthSection {
    pub token_url: Option<String>,
    pub api_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretRef>,
    pub previous_client_secret: Option<SecretRef>,
    pub watch_secret_files: Option<bool>,
    pub auth_method: Option<String>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub extra_params: Option<std::collections::BTreeMap<String, String>>,
    pub ca_file: Option<String>,
    pub egress_proxy: Option<String>,
    pub egress_proxy_username: Option<String>,
    pub egress_proxy_password: Option<SecretRef>,
}

/// `{ env = "NAME" }` or `{ file = "/path" }`. A plain string is refused on purpose: secrets do
/// not belong in config files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub env: Option<String>,
    pub file: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSection {
    pub refresh_before_expiry_seconds: Option<u64>,
    pub validation: Option<String>,
    pub max_token_requests_per_minute: Option<u64>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub rotation_retry_window_seconds: Option<u64>,
    pub max_response_bytes: Option<u64>,
    pub max_lifetime_seconds: Option<u64>,
    pub pool_size: Option<usize>,
    pub jwks_url: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub jwks_cache_seconds: Option<u64>,
    pub leeway_seconds: Option<u64>,
}

/// Declares `TokenSection::overlaid`: every field of `over` that is set wins.
macro_rules! overlay {
    ($($field:ident),* $(,)?) => {
        impl TokenSection {
            /// `self` with every key `over` sets replaced (a credential's `[credential.token]`).
            pub fn overlaid(self, over: TokenSection) -> TokenSection {
                TokenSection { $( $field: over.$field.or(self.$field), )* }
            }
        }
    };
}

overlay!(
    refresh_before_expiry_seconds,
    validation,
    max_token_requests_per_minute,
    backoff_initial_ms,
    backoff_max_ms,
    request_timeout_ms,
    connect_timeout_ms,
    rotation_retry_window_seconds,
    max_response_bytes,
    max_lifetime_seconds,
    pool_size,
    jwks_url,
    issuer,
    audience,
    algorithms,
    jwks_cache_seconds,
    leeway_seconds,
);

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    pub path: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
    pub max_queue_spans: Option<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<String>,
    pub level: Option<String>,
    pub access_log: Option<bool>,
}
