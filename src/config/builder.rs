//! The builder every section's validation shares: it names the file (and the
//! `[[credential]]`) in errors and collects warnings. A leaf: it knows the model's vocabulary
//! and the value parsers, no section.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use super::model::CredentialName;
use super::value::{parse_addr, secret_source};
use super::ConfigError;

/// The file being built: names it in errors and collects warnings.
pub(super) struct Builder<'a> {
    pub(super) file: &'a Path,
    pub(super) warnings: Vec<String>,
    /// Building a `[[credential]]`: its name, which prefixes every key in errors.
    pub(super) credential: Option<CredentialName>,
}

pub(super) type Built<T> = Result<T, ConfigError>;

impl Builder<'_> {
    pub(super) fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let key = match &self.credential {
            None => key.to_string(),
            Some(name) => name.key(key),
        };
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key,
            message: message.into(),
        }
    }

    /// A millisecond setting with its default; zero is refused (it would disable a timeout).
    pub(super) fn ms(&self, value: Option<u64>, default: u64, key: &str) -> Built<Duration> {
        match value.unwrap_or(default) {
            0 => Err(self.err(key, "must be greater than 0")),
            v => Ok(Duration::from_millis(v)),
        }
    }

    /// An event-count threshold with its default; zero is refused (it would never raise).
    pub(super) fn count(&self, value: Option<u32>, default: u32, key: &str) -> Built<u32> {
        match value.unwrap_or(default) {
            0 => Err(self.err(key, "must be at least 1")),
            n => Ok(n),
        }
    }

    pub(super) fn addr(&self, value: Option<&str>, default: &str, key: &str) -> Built<SocketAddr> {
        parse_addr(value.unwrap_or(default)).map_err(|m| self.err(key, m))
    }
}

pub(super) fn parse_cidrs(b: &Builder, raw: &[String], key: &str) -> Built<Vec<IpNet>> {
    if raw.is_empty() {
        return Err(b.err(key, "must list at least one CIDR"));
    }
    raw.iter()
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| b.err(key, format!("{c:?} is not a CIDR or IP address")))
        })
        .collect()
}

pub(super) fn secret(
    b: &mut Builder,
    r: super::file::SecretRef,
    key: &str,
) -> Built<(crate::secret::Secret, crate::secret::SecretSource)> {
    let source = secret_source(r).map_err(|m| b.err(key, m))?;
    let secret = source.read().map_err(|e| b.err(key, e.to_string()))?;
    b.warnings.extend(source.permission_warning());
    Ok((secret, source))
}
