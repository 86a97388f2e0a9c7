//! Parsers behind [`super::model`]: each turns one raw value (or one section) into a checked one or a
//! message that the caller attaches to the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;

use super::file::{AnomalySection, SecretRef, TokenSection};
use super::model::{TokenSettings, Validation};
use super::ConfigError;
use crate::token::secret::SecretSource;

/// An event-count threshold with its default; zero is refused (it would never raise).
pub(super) fn count<E>(
    value: Option<u32>,
    default: u32,
    key: &str,
    err: &E,
) -> Result<u32, ConfigError>
where
    E: Fn(&str, String) -> ConfigError,
{
    match value.unwrap_or(default) {
        0 => Err(err(key, "must be at least 1".into())),
        n => Ok(n),
    }
}

/// A millisecond setting with its default; zero is refused (it would disable a timeout).
pub(super) fn ms<E>(
    value: Option<u64>,
    default: u64,
    key: &str,
    err: &E,
) -> Result<Duration, ConfigError>
where
    E: Fn(&str, String) -> ConfigError,
{
    let v = value.unwrap_or(default);
    if v == 0 {
        return Err(err(key, "must be greater than 0".into()));
    }
    Ok(Duration::from_millis(v))
}

/// Reads a PEM bundle; at least one certificate is required.
pub(super) fn load_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")"))
}

/// Parses a base URL; plain `http` is accepted only for loopback hosts (the simulator).
pub(super) fn parse_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    let host = url.host_str().ok_or_else(|| format!("{s:?} has no host"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(host) => Ok(url),
        "http" => Err(format!(
            "{s:?} uses plain http; only https is allowed for non-loopback hosts"
        )),
        other => Err(format!("{s:?}: scheme {other:?} is not http or https")),
    }
}

pub(super) fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_matches(|c| c == '[' || c == ']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn secret_source(r: SecretRef) -> Result<SecretSource, String> {
    match (r.env, r.file) {
        (Some(env), None) if !env.trim().is_empty() => Ok(SecretSource::Env(env)),
        (None, Some(file)) if !file.trim().is_empty() => {
            Ok(SecretSource::File(PathBuf::from(file)))
        }
        _ => Err("give exactly one of { env = \"NAME\" } or { file = \"/path\" }".into()),
    }
}

/// `[token]` with defaults.
pub(super) fn token_settings<E>(t: TokenSection, err: &E) -> Result<TokenSettings, ConfigError>
where
    E: Fn(&str, String) -> ConfigError,
{
    let validation = match t.validation.as_deref().unwrap_or("tokens_me") {
        "tokens_me" => Validation::TokensMe,
        "none" => Validation::None,
        "jwks" => {
            return Err(err(
                "token.validation",
                "\"jwks\" is for generic OAuth2 issuers and is not supported yet; Genesys tokens are opaque: use \"tokens_me\"".into(),
            ))
        }
        other => return Err(err("token.validation", format!("{other:?} is not one of \"tokens_me\", \"none\""))),
    };
    let max_per_minute = t.max_token_requests_per_minute.unwrap_or(20);
    if !(1..=600).contains(&max_per_minute) {
        return Err(err(
            "token.max_token_requests_per_minute",
            "must be between 1 and 600".into(),
        ));
    }
    let backoff_initial = ms(t.backoff_initial_ms, 500, "token.backoff_initial_ms", err)?;
    let backoff_max = ms(t.backoff_max_ms, 60_000, "token.backoff_max_ms", err)?;
    if backoff_max < backoff_initial {
        return Err(err(
            "token.backoff_max_ms",
            "must be at least token.backoff_initial_ms".into(),
        ));
    }
    Ok(TokenSettings {
        refresh_before_expiry: Duration::from_secs(t.refresh_before_expiry_seconds.unwrap_or(300)),
        validation,
        max_token_requests_per_minute: max_per_minute as u32,
        backoff_initial,
        backoff_max,
        request_timeout: ms(
            t.request_timeout_ms,
            10_000,
            "token.request_timeout_ms",
            err,
        )?,
        connect_timeout: ms(t.connect_timeout_ms, 3_000, "token.connect_timeout_ms", err)?,
        rotation_retry_window: Duration::from_secs(t.rotation_retry_window_seconds.unwrap_or(600)),
    })
}

/// `[anomaly]` with defaults.
pub(super) fn anomaly_thresholds<E>(
    a: AnomalySection,
    err: &E,
) -> Result<crate::anomaly::Thresholds, ConfigError>
where
    E: Fn(&str, String) -> ConfigError,
{
    let d = crate::anomaly::Thresholds::default();
    Ok(crate::anomaly::Thresholds {
        window: ms(
            a.window_ms,
            d.window.as_millis() as u64,
            "anomaly.window_ms",
            &err,
        )?,
        quiet: ms(
            a.quiet_ms,
            d.quiet.as_millis() as u64,
            "anomaly.quiet_ms",
            &err,
        )?,
        refresh_failures: count(
            a.refresh_failures,
            d.refresh_failures,
            "anomaly.refresh_failures",
            &err,
        )?,
        invalid_client: count(
            a.invalid_client,
            d.invalid_client,
            "anomaly.invalid_client",
            &err,
        )?,
        early_rejection: count(
            a.early_rejection,
            d.early_rejection,
            "anomaly.early_rejection",
            &err,
        )?,
        unauthorized: count(a.unauthorized, d.unauthorized, "anomaly.unauthorized", err)?,
        rate_limited: count(a.rate_limited, d.rate_limited, "anomaly.rate_limited", err)?,
        early_rejection_age: ms(
            a.early_rejection_age_ms,
            d.early_rejection_age.as_millis() as u64,
            "anomaly.early_rejection_age_ms",
            &err,
        )?,
    })
}
