//! `[[credential]]`: further OAuth clients behind one proxy, each on its own listener with its
//! own token lifecycle. Each entry becomes a whole [`Config`]: the top-level file with the
//! entry's listener, allowlists, issuer section and `[token]` overrides put in, built and
//! checked like the top level, with errors naming `credential.<name>.<key>`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use super::build::{one, Built};
use super::file::{CredentialSection, FileConfig};
use super::model::{Config, CredentialConfig, DEFAULT_CREDENTIAL};
use super::value::parse_addr;
use super::ConfigError;

/// At most this many `[[credential]]` entries: each has its own listener, worker threads and
/// refresher, and its name is a metric label value.
pub const MAX_CREDENTIALS: usize = 32;

/// The key a user wrote for `key` of credential `name`: its listener and allowlists sit in the
/// entry itself, everything else under the entry's sections.
pub fn key_of(name: &str, key: &str) -> String {
    let own = key.strip_prefix("proxy.").filter(|k| {
        matches!(
            *k,
            "listen" | "allowed_client_cidrs" | "allowed_path_prefixes"
        )
    });
    format!("credential.{name}.{}", own.unwrap_or(key))
}

/// Builds every entry into `main.extra` and records the set in `main.restart.credentials`.
pub(super) fn add(
    main: &mut Config,
    top: FileConfig,
    entries: Vec<CredentialSection>,
    file: &Path,
) -> Built<()> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        file: file.to_path_buf(),
        key,
        message,
    };
    if entries.len() > MAX_CREDENTIALS {
        return Err(invalid(
            "credential".into(),
            format!("at most {MAX_CREDENTIALS} entries"),
        ));
    }
    let mut names = HashSet::new();
    let mut listens: Vec<SocketAddr> = vec![main.restart.proxy.listen, main.restart.admin.listen];
    for (i, entry) in entries.into_iter().enumerate() {
        let name = entry
            .name
            .clone()
            .ok_or_else(|| invalid(format!("credential[{i}].name"), "is required".into()))?;
        check_name(&name).map_err(|m| invalid(format!("credential[{i}].name"), m))?;
        if !names.insert(name.clone()) {
            return Err(invalid(
                format!("credential.{name}.name"),
                "is used by another credential".into(),
            ));
        }
        let listen = entry
            .listen
            .as_deref()
            .ok_or_else(|| invalid(format!("credential.{name}.listen"), "is required".into()))?;
        let addr =
            parse_addr(listen).map_err(|m| invalid(format!("credential.{name}.listen"), m))?;
        if addr.port() != 0 && listens.contains(&addr) {
            return Err(invalid(
                format!("credential.{name}.listen"),
                format!("{addr} is already proxy.listen, admin.listen or another credential's"),
            ));
        }
        listens.push(addr);
        let config = one(merged(&top, entry), file, Some(&name))?;
        for w in &config.warnings {
            if !main.warnings.contains(w) {
                main.warnings.push(w.clone());
            }
        }
        main.restart
            .credentials
            .listeners
            .push((name.clone(), config.restart.proxy.listen));
        main.extra.push(CredentialConfig { name, config });
    }
    Ok(())
}

/// `[a-z0-9-]`, 1 to 32 characters, not the default credential's name.
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if !ok {
        return Err(format!("{name:?} must be 1 to 32 of [a-z0-9-]"));
    }
    if name == DEFAULT_CREDENTIAL {
        return Err(format!("{name:?} is the name of the top-level credential"));
    }
    Ok(())
}

/// The top-level file as this credential sees it.
fn merged(top: &FileConfig, entry: CredentialSection) -> FileConfig {
    let mut f = top.clone();
    f.proxy.listen = entry.listen;
    if entry.allowed_client_cidrs.is_some() {
        f.proxy.allowed_client_cidrs = entry.allowed_client_cidrs;
    }
    if entry.allowed_path_prefixes.is_some() {
        f.proxy.allowed_path_prefixes = entry.allowed_path_prefixes;
    }
    f.genesys = entry.genesys;
    f.oauth = entry.oauth;
    if let Some(token) = entry.token {
        f.token = f.token.overlaid(token);
    }
    f
}
