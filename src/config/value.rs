//! Value parsers: each turns one raw value into a checked one, or a message the caller attaches
//! to the key. They know nothing of the model's types (so `build` depends on them, not the
//! reverse).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use reqwest::Url;

use super::file::SecretRef;
use crate::secret::SecretSource;

/// Reads a PEM bundle; at least one certificate is required.
pub(super) fn load_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bytes = crate::files::read_capped(path, crate::files::CONFIG_MAX_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
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

/// Parses a base URL; plain `http` is accepted only for loopback hosts (the simulator). A URL
/// with credentials in it (`user:password@`) is refused, and never echoed in the error.
pub(crate) fn parse_url(raw: &str) -> Result<Url, String> {
    let shown = redact_userinfo(raw);
    let s = shown.as_str();
    let url = Url::parse(raw).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{s:?} holds credentials (user:password@); the client secret goes in client_secret = {{ env = \"NAME\" }} or {{ file = \"/path\" }}"
        ));
    }
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

/// `scheme://…@host/…` for a URL whose authority holds an `@`, so no error shows a password.
fn redact_userinfo(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://…{}", &rest[at..]),
        None => s.to_string(),
    }
}

pub(crate) fn is_loopback_host(host: &str) -> bool {
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

/// `{issuer}/.well-known/openid-configuration` (a trailing `/` of the issuer is dropped).
pub fn discovery_url(issuer: &str) -> Result<reqwest::Url, String> {
    let base = issuer.trim_end_matches('/');
    reqwest::Url::parse(&format!("{base}/.well-known/openid-configuration"))
        .map_err(|e| format!("{issuer:?} is not a URL: {e}"))
}
