//! The validated configuration the rest of the program uses. Built once from the file mirror by
//! [`Config::from_file`], which applies every default and returns an error naming the key on
//! the first bad value.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use reqwest::Url;

use super::file::FileConfig;
use super::parse::{
    anomaly_thresholds, load_ca_file, ms, parse_addr, parse_url, secret_source, token_settings,
};
use super::ConfigError;
use crate::region;
use crate::token::secret::{Secret, SecretSource};

/// pingora replays at most this much request body from its retry buffer.
pub const PINGORA_RETRY_BUFFER_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub genesys: GenesysSettings,
    pub token: TokenSettings,
    pub audit: AuditSettings,
    pub log: LogSettings,
    pub anomaly: crate::anomaly::Thresholds,
    /// Non-fatal findings (e.g. a secret file readable by others), printed at start-up.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub allowed_client_cidrs: Vec<IpNet>,
    pub allowed_path_prefixes: Vec<String>,
    pub replay_body_limit_bytes: u64,
    pub token_wait_timeout: Duration,
    pub refresh_wait_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub dns_refresh: Duration,
    /// Proxy worker threads, each with its own single-threaded runtime.
    pub threads: usize,
    /// SO_REUSEPORT on the proxy listener, for hand-over restarts.
    pub reuse_port: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
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

#[derive(Debug, Clone)]
pub struct GenesysSettings {
    /// `https://login.<domain>/oauth/token`.
    pub token_url: Url,
    pub api: ApiTarget,
    pub client_id: String,
    pub client_secret: Secret,
    pub client_secret_source: SecretSource,
    pub previous_client_secret: Option<Secret>,
    pub previous_client_secret_source: Option<SecretSource>,
    /// Reload when a secret file changes (the directory is watched: Kubernetes swaps a symlink).
    pub watch_secret_files: bool,
    /// `ca_file`: when set, the only CAs trusted for the login and API hosts (DER certificates).
    pub ca_certs: Option<Vec<Vec<u8>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// `GET /api/v2/tokens/me?preserveIdleTTL=true` with the new token before it is used.
    TokensMe,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenSettings {
    pub refresh_before_expiry: Duration,
    pub validation: Validation,
    pub max_token_requests_per_minute: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a failed rotation to a new secret keeps being retried.
    pub rotation_retry_window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    File(PathBuf),
    Stdout,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    pub target: AuditTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
    /// One line per request (target `access`): method, path without query, status, upstream
    /// status, duration, replayed, client address, correlation id. Never a header value.
    pub access_log: bool,
}

impl Config {
    /// Applies defaults and validates. `file` names the source in error messages.
    pub fn from_file(raw: FileConfig, file: &Path) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let mut warnings = Vec::new();

        let p = raw.proxy;
        let listen = parse_addr(p.listen.as_deref().unwrap_or("127.0.0.1:8080"))
            .map_err(|m| err("proxy.listen", m))?;
        let cidrs = p
            .allowed_client_cidrs
            .unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]);
        let mut allowed_client_cidrs = Vec::with_capacity(cidrs.len());
        for c in &cidrs {
            let net = c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    err(
                        "proxy.allowed_client_cidrs",
                        format!("{c:?} is not a CIDR or IP address"),
                    )
                })?;
            allowed_client_cidrs.push(net);
        }
        if allowed_client_cidrs.is_empty() {
            return Err(err(
                "proxy.allowed_client_cidrs",
                "must list at least one CIDR".into(),
            ));
        }
        let allowed_path_prefixes = p
            .allowed_path_prefixes
            .unwrap_or_else(|| vec!["/api/v2/".into()]);
        if allowed_path_prefixes.is_empty() {
            return Err(err(
                "proxy.allowed_path_prefixes",
                "must list at least one prefix".into(),
            ));
        }
        for prefix in &allowed_path_prefixes {
            if !prefix.starts_with('/') || prefix.contains("..") {
                return Err(err(
                    "proxy.allowed_path_prefixes",
                    format!("{prefix:?} must start with '/' and contain no '..'"),
                ));
            }
        }
        let replay_body_limit_bytes = p
            .replay_body_limit_bytes
            .unwrap_or(PINGORA_RETRY_BUFFER_BYTES);
        if replay_body_limit_bytes > PINGORA_RETRY_BUFFER_BYTES {
            return Err(err(
                "proxy.replay_body_limit_bytes",
                format!("{replay_body_limit_bytes} exceeds pingora's 65536-byte retry buffer"),
            ));
        }
        let proxy = ProxySettings {
            listen,
            allowed_client_cidrs,
            allowed_path_prefixes,
            replay_body_limit_bytes,
            token_wait_timeout: ms(
                p.token_wait_timeout_ms,
                5_000,
                "proxy.token_wait_timeout_ms",
                &err,
            )?,
            refresh_wait_timeout: ms(
                p.refresh_wait_timeout_ms,
                5_000,
                "proxy.refresh_wait_timeout_ms",
                &err,
            )?,
            upstream_connect_timeout: ms(
                p.upstream_connect_timeout_ms,
                5_000,
                "proxy.upstream_connect_timeout_ms",
                &err,
            )?,
            upstream_read_timeout: ms(
                p.upstream_read_timeout_ms,
                60_000,
                "proxy.upstream_read_timeout_ms",
                &err,
            )?,
            shutdown_grace: Duration::from_secs(p.shutdown_grace_seconds.unwrap_or(30)),
            dns_refresh: Duration::from_secs(p.dns_refresh_seconds.unwrap_or(30).max(1)),
            threads: match p.threads {
                None => std::thread::available_parallelism().map_or(2, |n| n.get()),
                Some(n) if (1..=256).contains(&n) => n,
                Some(_) => return Err(err("proxy.threads", "must be between 1 and 256".into())),
            },
            reuse_port: p.reuse_port.unwrap_or(false),
        };

        let admin = AdminSettings {
            listen: parse_addr(raw.admin.listen.as_deref().unwrap_or("127.0.0.1:9090"))
                .map_err(|m| err("admin.listen", m))?,
        };
        if admin.listen == proxy.listen && admin.listen.port() != 0 {
            return Err(err("admin.listen", "must differ from proxy.listen".into()));
        }

        let g = raw.genesys.ok_or_else(|| {
            err(
                "genesys",
                "section is required (client_id, client_secret)".into(),
            )
        })?;
        let region = g.region.as_deref().unwrap_or("us-east-1");
        let domain = region::domain_for(region).ok_or_else(|| {
            err(
                "genesys.region",
                format!("{region:?} is neither a known region nor a domain"),
            )
        })?;
        let (login_default, api_default) = region::urls_for(&domain);
        let login_url = parse_url(g.login_url.as_deref().unwrap_or(&login_default))
            .map_err(|m| err("genesys.login_url", m))?;
        let token_url = login_url
            .join("/oauth/token")
            .map_err(|e| err("genesys.login_url", e.to_string()))?;
        let api_url = parse_url(g.api_url.as_deref().unwrap_or(&api_default))
            .map_err(|m| err("genesys.api_url", m))?;
        if !matches!(api_url.path(), "" | "/") || api_url.query().is_some() {
            return Err(err(
                "genesys.api_url",
                "must be scheme://host[:port] with no path".into(),
            ));
        }
        let api = ApiTarget {
            tls: api_url.scheme() == "https",
            host: api_url
                .host_str()
                .unwrap_or_default()
                .trim_matches(|c| c == '[' || c == ']')
                .to_string(),
            port: api_url.port_or_known_default().unwrap_or(443),
        };
        let client_id = g.client_id.unwrap_or_default();
        if client_id.trim().is_empty() {
            return Err(err(
                "genesys.client_id",
                "is required and must not be empty".into(),
            ));
        }
        if client_id.contains(':') {
            return Err(err("genesys.client_id", "must not contain ':'".into()));
        }
        let secret_ref = g.client_secret.ok_or_else(|| {
            err(
                "genesys.client_secret",
                "is required: { env = \"NAME\" } or { file = \"/path\" }".into(),
            )
        })?;
        let client_secret_source =
            secret_source(secret_ref).map_err(|m| err("genesys.client_secret", m))?;
        let client_secret = client_secret_source
            .read()
            .map_err(|e| err("genesys.client_secret", e.to_string()))?;
        warnings.extend(client_secret_source.permission_warning());
        let (previous_client_secret, previous_client_secret_source) = match g.previous_client_secret
        {
            None => (None, None),
            Some(r) => {
                let key = "genesys.previous_client_secret";
                let source = secret_source(r).map_err(|m| err(key, m))?;
                warnings.extend(source.permission_warning());
                let secret = source.read().map_err(|e| err(key, e.to_string()))?;
                (Some(secret), Some(source))
            }
        };
        let genesys = GenesysSettings {
            token_url,
            api,
            client_id,
            client_secret,
            client_secret_source,
            previous_client_secret,
            previous_client_secret_source,
            watch_secret_files: g.watch_secret_files.unwrap_or(true),
            ca_certs: match g.ca_file {
                None => None,
                Some(f) => {
                    Some(load_ca_file(Path::new(&f)).map_err(|m| err("genesys.ca_file", m))?)
                }
            },
        };

        let token = token_settings(raw.token, &err)?;

        let audit_path = raw.audit.path.unwrap_or_else(|| "audit.jsonl".into());
        let audit = AuditSettings {
            target: match audit_path.as_str() {
                "" => {
                    return Err(err(
                        "audit.path",
                        "must not be empty (use \"-\" for stdout)".into(),
                    ))
                }
                "-" => AuditTarget::Stdout,
                p => AuditTarget::File(PathBuf::from(p)),
            },
        };

        let log = LogSettings {
            format: match raw.log.format.as_deref().unwrap_or("json") {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                other => {
                    return Err(err(
                        "log.format",
                        format!("{other:?} is not \"json\" or \"text\""),
                    ))
                }
            },
            level: {
                let level = raw.log.level.unwrap_or_else(|| "info".into());
                tracing_subscriber::EnvFilter::try_new(&level)
                    .map_err(|e| err("log.level", format!("{level:?}: {e}")))?;
                level
            },
            access_log: raw.log.access_log.unwrap_or(false),
        };

        let anomaly = anomaly_thresholds(raw.anomaly, &err)?;

        Ok(Config {
            anomaly,
            proxy,
            admin,
            genesys,
            token,
            audit,
            log,
            warnings,
        })
    }
}
