//! Configuration: [`file`](mod@file) is the serde mirror of the TOML file (the stable external
//! format), [`model`] the validated types the program uses, `build` the step between them
//! (defaults and checks, one builder per section, on `value` parsers). [`keyed`] ties each
//! model field to its file key and its reload class; [`keys`] lists them (`check --keys`). [`credential`]: `[[credential]]`
//! entries; [`apps`]: `[apps]` and `[[app]]` (callers and their proofs); [`tls`]:
//! `[proxy.tls]`. Only this module knows TOML.

pub mod apps;
mod build;
mod builder;
pub mod credential;
pub mod file;
pub mod keyed;
pub mod keys;
pub mod model;
mod policy;
pub mod tls;
mod upstream;
pub(crate) mod value;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_apps;
#[cfg(test)]
mod tests_classes;
#[cfg(test)]
mod tests_credential;
#[cfg(test)]
mod tests_oauth;
#[cfg(test)]
mod tests_tracing;

use std::path::{Path, PathBuf};

pub use keyed::Keyed;
pub use model::{
    AnomalyThresholds, ApiTarget, AppGroup, AuditTarget, BudgetSettings, Config, Credential,
    CredentialName, CredentialSettings, Diff, EgressProxy, Live, LogFormat, Process, ProxyLive,
    Restart, TokenLive, TracingSettings, Validation,
};

/// Why a config file was refused. The message always names the file, and the key when one is
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: crate::files::FileError,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let bytes =
        crate::files::read_capped(path, crate::files::CONFIG_MAX_BYTES).map_err(|source| {
            ConfigError::Read {
                file: path.to_path_buf(),
                source,
            }
        })?;
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
        file: path.to_path_buf(),
        message: "is not UTF-8".into(),
    })?;
    parse(&text, path)
}

/// Parses and validates config text; `path` is used in messages only.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw: file::FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    build::config(raw, path)
}
