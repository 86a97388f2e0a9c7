//! `[[credential]]`: further OAuth clients behind one proxy, each on its own listener with its
//! own token lifecycle. Each entry is built like the top-level credential from the top level's
//! per-credential sections (`[proxy]`, `[token]`, `[log]`, `[anomaly]`, `[budget]`) with the
//! entry's listener, allowlists, issuer section and `[token]` overrides put in; process-wide
//! sections (`[admin]`, `[audit]`, `[cluster]`, the worker keys of `[proxy]`) are the
//! process's and are not read again. Errors name `credential.<name>.<key>`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use super::builder::Built;
use super::file::{CredentialSection, FileConfig, LogSection, ProxySection, TokenSection};
use super::model::{Config, CredentialName};
use super::value::parse_addr;
use super::ConfigError;

/// At most this many `[[credential]]` entries: each has its own listener and refresher, and
/// its name is a metric label value.
pub const MAX_CREDENTIALS: usize = 32;

/// The sections a credential is built from: the top level's, with a `[[credential]]`'s
/// overrides put in by [`super::credential`].
#[derive(Debug, Clone)]
pub(super) struct CredentialSource {
    pub proxy: ProxySection,
    pub genesys: Option<super::file::GenesysSection>,
    pub oauth: Option<super::file::OAuthSection>,
    pub token: TokenSection,
    pub log: LogSection,
    pub anomaly: super::file::AnomalySection,
    pub budget: super::file::BudgetSection,
}

impl CredentialSource {
    pub(super) fn top(raw: FileConfig) -> Self {
        CredentialSource {
            proxy: raw.proxy,
            genesys: raw.genesys,
            oauth: raw.oauth,
            token: raw.token,
            log: raw.log,
            anomaly: raw.anomaly,
            budget: raw.budget,
        }
    }
}

/// Checks every entry's name and listener and returns what each is built from, in file order.
pub(super) fn entries(
    config: &Config,
    top: &CredentialSource,
    entries: Vec<CredentialSection>,
    file: &Path,
) -> Built<Vec<(CredentialName, CredentialSource)>> {
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
    let mut out = Vec::with_capacity(entries.len());
    let mut names = HashSet::new();
    let mut listens: Vec<SocketAddr> = vec![
        config.top().restart.proxy.listen,
        config.process.admin.listen,
    ];
    for (i, entry) in entries.into_iter().enumerate() {
        let raw_name = entry
            .name
            .clone()
            .ok_or_else(|| invalid(format!("credential[{i}].name"), "is required".into()))?;
        let name = CredentialName::parse(&raw_name)
            .map_err(|m| invalid(format!("credential[{i}].name"), m))?;
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
        out.push((name, merged(top, entry)));
    }
    Ok(out)
}

/// The top level's per-credential sections as this credential sees them.
fn merged(top: &CredentialSource, entry: CredentialSection) -> CredentialSource {
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
