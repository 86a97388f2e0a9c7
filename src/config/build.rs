//! From the file mirror to the validated model: one builder per section, each applying its
//! defaults and returning an error that names the key on the first bad value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::builder::{parse_cidrs, secret, Builder, Built};
use super::credential::CredentialSource;
use super::file::{
    AuditSection, FileConfig, LogSection, ProxySection, TokenSection, TracingSection,
};
use super::model::*;
use super::policy::{anomaly, budget, exposure_warnings};
use super::value::parse_url;

/// Applies defaults and validates. `file` names the source in error messages.
pub fn config(mut raw: FileConfig, file: &Path) -> Built<Config> {
    let entries = raw.credential.take().unwrap_or_default();
    let (apps_section, app_entries) = (raw.apps.take(), raw.app.take().unwrap_or_default());
    let tls_section = raw.proxy.tls.take();
    let mut b = Builder {
        file,
        warnings: Vec::new(),
        credential: None,
    };
    let process = process(&mut b, &mut raw)?;
    let tls = super::tls::tls(&b, tls_section)?;
    let source = CredentialSource::top(raw);
    let top = credential(&mut b, CredentialName::top(), source.clone(), &process)?;
    let mut config = Config {
        process,
        apps: super::apps::AppsSettings::default(),
        tls,
        credentials: vec![top],
        warnings: b.warnings,
    };
    for (name, source) in super::credential::entries(&config, &source, entries, file)? {
        let mut b = Builder {
            file,
            warnings: std::mem::take(&mut config.warnings),
            credential: Some(name.clone()),
        };
        let built = credential(&mut b, name.clone(), source, &config.process)?;
        config.warnings = b.warnings;
        let listen = built.restart.proxy.listen;
        config.process.credentials.listeners.push((name, listen));
        config.credentials.push(built);
    }
    let mut b = Builder {
        file,
        warnings: std::mem::take(&mut config.warnings),
        credential: None,
    };
    config.apps = super::apps::apps(&mut b, apps_section, app_entries, &config)?;
    config.warnings = b.warnings;
    Ok(config)
}

/// What the process owns, read once: worker threads and connection cap, admin, audit, log
/// format, and the Redis link (its password is read here, once).
fn process(b: &mut Builder, raw: &mut FileConfig) -> Built<Process> {
    let admin =
        AdminSettings {
            listen: b.addr(
                raw.admin.listen.as_deref(),
                "127.0.0.1:9090",
                "admin.listen",
            )?,
            reload_token: match raw.admin.reload_token.take() {
                None => None,
                Some(r) => Some(secret(b, r, "admin.reload_token")?.0),
            },
            allowed_hosts: admin_hosts(b, raw.admin.allowed_hosts.take())?,
            max_connections: match raw.admin.max_connections.unwrap_or(64) {
                n @ 1..=100 => n,
                _ => return Err(b.err(
                    "admin.max_connections",
                    "must be between 1 and 100 (the descriptors kept free for the admin listener)",
                )),
            },
            idle_timeout: b.ms(raw.admin.idle_timeout_ms, 10_000, "admin.idle_timeout_ms")?,
        };
    Ok(Process {
        proxy: proxy_process(b, &raw.proxy)?,
        admin,
        audit: audit(b, std::mem::take(&mut raw.audit))?,
        log: log(b, raw.log.clone())?.0,
        tracing: TracingRestart {
            otlp: tracing_settings(b, std::mem::take(&mut raw.tracing))?,
        },
        credentials: CredentialSet {
            listeners: Vec::new(),
        },
        cluster: ClusterRestart {
            settings: match raw.cluster.take() {
                None => None,
                Some(c) => Some(cluster(b, c)?),
            },
        },
    })
}

/// One credential: its listener, issuer, token settings and the live settings its requests
/// read (errors name `credential.<name>.<key>` through the builder).
pub(super) fn credential(
    b: &mut Builder,
    name: CredentialName,
    raw: CredentialSource,
    process: &Process,
) -> Built<Credential> {
    // Genesys's API lives under /api/v2/; another issuer's API may be anywhere.
    let default_prefix = if raw.oauth.is_some() { "/" } else { "/api/v2/" };
    let (listen, proxy_live) = proxy(b, raw.proxy, default_prefix)?;
    let admin = &process.admin;
    if admin.listen == listen.listen && admin.listen.port() != 0 {
        return Err(b.err("admin.listen", "must differ from proxy.listen"));
    }
    for w in exposure_warnings(&listen, &proxy_live, admin) {
        if !b.warnings.contains(&w) {
            b.warnings.push(w);
        }
    }
    let (upstream, secrets) = super::upstream::issuer(b, raw.genesys, raw.oauth)?;
    let (token_http, token_live) = token(b, raw.token, upstream.grant.issuer)?;
    let (_, log_live) = log(b, raw.log)?;
    Ok(Credential {
        name,
        restart: Restart {
            proxy: listen,
            genesys: upstream,
            token: token_http,
        },
        live: Live {
            proxy: proxy_live,
            token: token_live,
            log: log_live,
            anomaly: anomaly(b, raw.anomaly)?,
            budget: budget(b, raw.budget)?,
        },
        secrets,
    })
}

fn proxy_process(b: &Builder, p: &ProxySection) -> Built<ProxyProcess> {
    Ok(ProxyProcess {
        threads: match p.threads {
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            Some(n) if (1..=256).contains(&n) => n,
            Some(_) => return Err(b.err("proxy.threads", "must be between 1 and 256")),
        },
        reuse_port: p.reuse_port.unwrap_or(false),
        dns_refresh: Duration::from_secs(p.dns_refresh_seconds.unwrap_or(30).max(1)),
        shutdown_grace: Duration::from_secs(p.shutdown_grace_seconds.unwrap_or(30)),
        max_connections: match p.max_connections.unwrap_or(4096) {
            n @ 1..=1_000_000 => n,
            _ => return Err(b.err("proxy.max_connections", "must be between 1 and 1000000")),
        },
    })
}

fn proxy(b: &Builder, p: ProxySection, default_prefix: &str) -> Built<(ProxyListen, ProxyLive)> {
    let listen = ProxyListen {
        listen: b.addr(p.listen.as_deref(), "127.0.0.1:8080", "proxy.listen")?,
    };
    let replay_body_limit_bytes = p
        .replay_body_limit_bytes
        .unwrap_or(PINGORA_RETRY_BUFFER_BYTES);
    if replay_body_limit_bytes > PINGORA_RETRY_BUFFER_BYTES {
        return Err(b.err(
            "proxy.replay_body_limit_bytes",
            format!("{replay_body_limit_bytes} exceeds pingora's 65536-byte retry buffer"),
        ));
    }
    let max_request_body_bytes = match p.max_request_body_bytes.unwrap_or(512_000) {
        n @ 1..=MAX_REQUEST_BODY_CEILING => n,
        n => {
            return Err(b.err(
                "proxy.max_request_body_bytes",
                format!("{n} must be between 1 and {MAX_REQUEST_BODY_CEILING} (Genesys refuses bodies over 512000 bytes)"),
            ))
        }
    };
    let live = ProxyLive {
        allowed_client_cidrs: cidrs(b, p.allowed_client_cidrs)?,
        max_request_body_bytes,
        allowed_path_prefixes: path_prefixes(
            b,
            p.allowed_path_prefixes,
            default_prefix,
            "proxy.allowed_path_prefixes",
        )?,
        replay_body_limit_bytes,
        token_wait_timeout: b.ms(
            p.token_wait_timeout_ms,
            5_000,
            "proxy.token_wait_timeout_ms",
        )?,
        refresh_wait_timeout: b.ms(
            p.refresh_wait_timeout_ms,
            5_000,
            "proxy.refresh_wait_timeout_ms",
        )?,
        upstream_connect_timeout: b.ms(
            p.upstream_connect_timeout_ms,
            5_000,
            "proxy.upstream_connect_timeout_ms",
        )?,
        upstream_read_timeout: b.ms(
            p.upstream_read_timeout_ms,
            60_000,
            "proxy.upstream_read_timeout_ms",
        )?,
        request_header_timeout: b.ms(
            p.request_header_timeout_ms,
            10_000,
            "proxy.request_header_timeout_ms",
        )?,
        allowed_methods: methods(b, p.allowed_methods, "proxy.allowed_methods")?,
        allow_non_ascii_paths: p.allow_non_ascii_paths.unwrap_or(false),
    };
    Ok((listen, live))
}

/// The largest `proxy.max_request_body_bytes` accepted: 64 MiB, far above what Genesys takes.
const MAX_REQUEST_BODY_CEILING: u64 = 64 << 20;

fn cidrs(b: &Builder, raw: Option<Vec<String>>) -> Built<Vec<IpNet>> {
    let raw = raw.unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]);
    parse_cidrs(b, &raw, "proxy.allowed_client_cidrs")
}

pub(super) fn path_prefixes(
    b: &Builder,
    raw: Option<Vec<String>>,
    default: &str,
    key: &str,
) -> Built<Vec<String>> {
    let prefixes = raw.unwrap_or_else(|| vec![default.into()]);
    if prefixes.is_empty() {
        return Err(b.err(key, "must list at least one prefix"));
    }
    if let Some(bad) = prefixes
        .iter()
        .find(|p| !p.starts_with('/') || p.contains(".."))
    {
        return Err(b.err(
            key,
            format!("{bad:?} must start with '/' and contain no '..'"),
        ));
    }
    Ok(prefixes)
}

/// The methods the Genesys Platform API uses, forwarded by default.
const DEFAULT_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

pub(super) fn methods(
    b: &Builder,
    raw: Option<Vec<String>>,
    key: &str,
) -> Built<Vec<http::Method>> {
    let raw = raw.unwrap_or_else(|| DEFAULT_METHODS.map(String::from).to_vec());
    if raw.is_empty() {
        return Err(b.err(key, "must list at least one method"));
    }
    raw.iter()
        .map(|m| match m.as_str() {
            "CONNECT" | "TRACE" => Err(b.err(
                key,
                format!("{m:?} is never forwarded (tunnels and request echo are refused)"),
            )),
            _ if m.is_empty() || !m.bytes().all(|c| c.is_ascii_uppercase()) => {
                Err(b.err(key, format!("{m:?} is not an upper-case HTTP method name")))
            }
            _ => http::Method::from_bytes(m.as_bytes())
                .map_err(|_| b.err(key, format!("{m:?} is not an HTTP method"))),
        })
        .collect()
}

fn token(b: &Builder, t: TokenSection, issuer: IssuerKind) -> Built<(TokenRestart, TokenLive)> {
    // Genesys tokens are opaque (checked with tokens/me); another issuer's are JWTs checked
    // against its JWKS unless the user says "none".
    let default = match issuer {
        IssuerKind::Genesys => "tokens_me",
        IssuerKind::OAuth => "jwks",
    };
    let validation = match t.validation.as_deref().unwrap_or(default) {
        "tokens_me" if issuer == IssuerKind::OAuth => return Err(b.err(
            "token.validation",
            "\"tokens_me\" asks Genesys's /api/v2/tokens/me; with [oauth] use \"jwks\" or \"none\"",
        )),
        "tokens_me" => Validation::TokensMe,
        "jwks" => Validation::Jwks,
        "none" => Validation::None,
        other => {
            return Err(b.err(
                "token.validation",
                format!("{other:?} is not one of \"tokens_me\", \"jwks\", \"none\""),
            ))
        }
    };
    let jwks = jwks(b, &t, validation)?;
    let max_per_minute = t.max_token_requests_per_minute.unwrap_or(20);
    if !(1..=600).contains(&max_per_minute) {
        return Err(b.err(
            "token.max_token_requests_per_minute",
            "must be between 1 and 600",
        ));
    }
    let backoff_initial = b.ms(t.backoff_initial_ms, 500, "token.backoff_initial_ms")?;
    let backoff_max = b.ms(t.backoff_max_ms, 60_000, "token.backoff_max_ms")?;
    if backoff_max < backoff_initial {
        return Err(b.err(
            "token.backoff_max_ms",
            "must be at least token.backoff_initial_ms",
        ));
    }
    let http = TokenRestart {
        request_timeout: b.ms(t.request_timeout_ms, 10_000, "token.request_timeout_ms")?,
        connect_timeout: b.ms(t.connect_timeout_ms, 3_000, "token.connect_timeout_ms")?,
        max_response_bytes: match t.max_response_bytes.unwrap_or(1024 * 1024) {
            n @ 1024..=67_108_864 => n as usize,
            _ => {
                return Err(b.err(
                    "token.max_response_bytes",
                    "must be between 1024 and 67108864 (64 MiB)",
                ))
            }
        },
        pool_size: match t.pool_size.unwrap_or(1) {
            n @ 1..=50 => n,
            _ => return Err(b.err("token.pool_size", "must be between 1 and 50")),
        },
        jwks,
    };
    let live = TokenLive {
        refresh_before_expiry: Duration::from_secs(t.refresh_before_expiry_seconds.unwrap_or(300)),
        validation,
        max_token_requests_per_minute: max_per_minute as u32,
        backoff_initial,
        backoff_max,
        rotation_retry_window: Duration::from_secs(t.rotation_retry_window_seconds.unwrap_or(600)),
        max_lifetime: match t.max_lifetime_seconds.unwrap_or(172_800) {
            n @ 60..=31_536_000 => Duration::from_secs(n),
            _ => {
                return Err(b.err(
                    "token.max_lifetime_seconds",
                    "must be between 60 and 31536000 (a year); Genesys's own maximum is 172800",
                ))
            }
        },
    };
    Ok((http, live))
}

/// The JWKS keys, required with `validation = "jwks"` (Genesys tokens are opaque: `tokens_me`).
fn jwks(b: &Builder, t: &TokenSection, validation: Validation) -> Built<Option<JwksSettings>> {
    use jsonwebtoken::{Algorithm, AlgorithmFamily};
    if validation != Validation::Jwks {
        return Ok(None);
    }
    // Without jwks_url the keys are found through {issuer}/.well-known/openid-configuration.
    let url = match (&t.jwks_url, &t.issuer) {
        (Some(url), _) => KeySource::Url(parse_url(url).map_err(|m| b.err("token.jwks_url", m))?),
        (None, Some(issuer)) => {
            let discovery = super::value::discovery_url(issuer)
                .and_then(|u| parse_url(u.as_str()))
                .map_err(|m| b.err("token.issuer", format!("cannot discover the JWKS: {m}")))?;
            KeySource::Discover(discovery)
        }
        (None, None) => {
            return Err(b.err(
                "token.jwks_url",
                "validation = \"jwks\" needs token.jwks_url, or token.issuer to discover it",
            ))
        }
    };
    let names = t.algorithms.clone().unwrap_or_else(|| vec!["RS256".into()]);
    if names.is_empty() {
        return Err(b.err("token.algorithms", "must list at least one algorithm"));
    }
    let mut algorithms = Vec::new();
    for name in &names {
        let alg: Algorithm = name.parse().map_err(|_| {
            b.err(
                "token.algorithms",
                format!("{name:?} is not a JWT algorithm"),
            )
        })?;
        if alg.family() == AlgorithmFamily::Hmac {
            return Err(b.err(
                "token.algorithms",
                format!("{name:?} is refused: HMAC cannot be checked against a public JWKS"),
            ));
        }
        algorithms.push(alg);
    }
    Ok(Some(JwksSettings {
        keys: url,
        issuer: t.issuer.clone(),
        audience: t.audience.clone(),
        algorithms,
        cache: Duration::from_secs(t.jwks_cache_seconds.unwrap_or(86_400).max(1)),
        leeway: Duration::from_secs(t.leeway_seconds.unwrap_or(30)),
    }))
}

/// `[cluster]`: a Redis URL without a password (that goes in `cluster.password`), bounded
/// timeouts.
fn cluster(b: &mut Builder, c: super::file::ClusterSection) -> Built<ClusterSettings> {
    let url = c
        .redis_url
        .ok_or_else(|| b.err("cluster.redis_url", "is required in [cluster]"))?;
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| b.err("cluster.redis_url", format!("{url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") || parsed.host_str().is_none() {
        return Err(b.err(
            "cluster.redis_url",
            "must be redis://host[:port][/db] or rediss://… (TLS)",
        ));
    }
    if parsed.password().is_some() {
        return Err(b.err(
            "cluster.redis_url",
            "must not hold a password: use cluster.password = { env = \"NAME\" } or { file = \"/path\" }",
        ));
    }
    let password = match c.password {
        None => None,
        Some(r) => Some(secret(b, r, "cluster.password")?.0),
    };
    let key_prefix = c.key_prefix.unwrap_or_else(|| "genesys-auth-proxy".into());
    if key_prefix.is_empty()
        || key_prefix
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control())
    {
        return Err(b.err("cluster.key_prefix", "must be non-empty without spaces"));
    }
    let timeout = b.ms(c.timeout_ms, 250, "cluster.timeout_ms")?;
    let lease = b.ms(c.lease_ms, 15_000, "cluster.lease_ms")?;
    if lease < Duration::from_secs(1) {
        return Err(b.err(
            "cluster.lease_ms",
            "must be at least 1000 (a mint takes that long)",
        ));
    }
    Ok(ClusterSettings {
        redis_url: url,
        password,
        key_prefix,
        timeout,
        lease,
    })
}

fn audit(b: &Builder, a: AuditSection) -> Built<AuditSettings> {
    let target = match a.path.as_deref().unwrap_or("audit.jsonl") {
        "" => return Err(b.err("audit.path", "must not be empty (use \"-\" for stdout)")),
        "-" => AuditTarget::Stdout,
        p => AuditTarget::File(PathBuf::from(p)),
    };
    Ok(AuditSettings { target })
}

fn log(b: &Builder, l: LogSection) -> Built<(LogRestart, LogLive)> {
    let format = match l.format.as_deref().unwrap_or("json") {
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => {
            return Err(b.err(
                "log.format",
                format!("{other:?} is not \"json\" or \"text\""),
            ))
        }
    };
    let level = l.level.unwrap_or_else(|| "info".into());
    tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| b.err("log.level", format!("{level:?}: {e}")))?;
    Ok((
        LogRestart { format },
        LogLive {
            level,
            access_log: l.access_log.unwrap_or(false),
        },
    ))
}

/// `[tracing]`: nothing is traced without `otlp_endpoint`; the other keys need it.
fn tracing_settings(b: &Builder, t: TracingSection) -> Built<Option<TracingSettings>> {
    let Some(raw) = t.otlp_endpoint else {
        for (set, key) in [
            (t.service_name.is_some(), "tracing.service_name"),
            (t.sample_ratio.is_some(), "tracing.sample_ratio"),
            (t.max_queue_spans.is_some(), "tracing.max_queue_spans"),
        ] {
            if set {
                return Err(b.err(
                    key,
                    "needs tracing.otlp_endpoint (nothing is exported without it)",
                ));
            }
        }
        return Ok(None);
    };
    let key = "tracing.otlp_endpoint";
    let mut endpoint = reqwest::Url::parse(&raw).map_err(|e| {
        // A value with userinfo is not echoed (it may hold a password).
        let shown = if raw.contains('@') {
            "the value".to_string()
        } else {
            format!("{raw:?}")
        };
        b.err(key, format!("{shown} is not a URL: {e}"))
    })?;
    if !endpoint.username().is_empty() || endpoint.password().is_some() {
        return Err(b.err(
            key,
            "must not carry credentials (a collector's auth header goes in OTEL_EXPORTER_OTLP_HEADERS)",
        ));
    }
    if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
        return Err(b.err(
            key,
            format!("{raw:?} must be an http:// or https:// URL with a host (OTLP over HTTP, e.g. http://collector:4318)"),
        ));
    }
    if endpoint.query().is_some() || endpoint.fragment().is_some() {
        // Not echoed: a query is where an API key would be.
        return Err(b.err(key, "must not have a query or fragment (a collector's auth header goes in OTEL_EXPORTER_OTLP_HEADERS)"));
    }
    // A base URL like an OTLP SDK's OTEL_EXPORTER_OTLP_ENDPOINT gets the traces path; a URL
    // with a path is the traces URL itself.
    if endpoint.path() == "/" {
        endpoint.set_path("/v1/traces");
    }
    let service_name = t
        .service_name
        .unwrap_or_else(|| "genesys-auth-proxy".into());
    if service_name.trim().is_empty() || service_name.len() > 255 {
        return Err(b.err("tracing.service_name", "must be 1 to 255 characters"));
    }
    let sample_ratio = t.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(b.err(
            "tracing.sample_ratio",
            format!("{sample_ratio} must be between 0.0 and 1.0"),
        ));
    }
    let max_queue_spans = match t.max_queue_spans.unwrap_or(4096) {
        n @ 64..=1_000_000 => n,
        n => {
            return Err(b.err(
                "tracing.max_queue_spans",
                format!("{n} must be between 64 and 1000000"),
            ))
        }
    };
    Ok(Some(TracingSettings {
        endpoint,
        service_name,
        sample_ratio,
        max_queue_spans,
    }))
}

/// `admin.allowed_hosts`: bare host names (no scheme, port or path), lower-cased.
fn admin_hosts(b: &Builder, hosts: Option<Vec<String>>) -> Built<Vec<String>> {
    let hosts = hosts.unwrap_or_default();
    let mut out = Vec::with_capacity(hosts.len());
    for h in hosts {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
        if !ok {
            return Err(b.err(
                "admin.allowed_hosts",
                format!("{h:?} is not a host name (letters, digits, '-' and '.'; no port)"),
            ));
        }
        out.push(h.to_ascii_lowercase());
    }
    Ok(out)
}
