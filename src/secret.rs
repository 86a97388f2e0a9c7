//! Secrets that cannot be printed: a redacting `Debug`, no `Display`, and a fingerprint for
//! anything that must tell two secrets apart in logs or the audit log.

use std::fmt;
use std::path::PathBuf;

use crate::fingerprint::fingerprint;

/// A client secret or access token. `Debug` prints only the fingerprint; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call sites are few and greppable: the token endpoint's Basic header
    /// and the bearer header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.fingerprint())
    }
}

/// Where a secret is read from. Secrets are never written inline in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("cannot read secret file {path}: {source}")]
    File {
        path: PathBuf,
        source: crate::files::FileError,
    },
    #[error("secret file {0} is not UTF-8")]
    FileNotUtf8(PathBuf),
    #[error("environment variable {0} is longer than 4096 bytes")]
    EnvTooLong(String),
    #[error("secret file {0} is empty")]
    FileEmpty(PathBuf),
}

impl SecretSource {
    /// Reads the secret now. A file's trailing newline is dropped (editors and `echo` add one).
    pub fn read(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Env(name) => {
                let value =
                    std::env::var(name).map_err(|_| SecretError::EnvMissing(name.clone()))?;
                let value = value.trim();
                if value.is_empty() {
                    return Err(SecretError::EnvEmpty(name.clone()));
                }
                if value.len() as u64 > crate::files::SECRET_MAX_BYTES {
                    return Err(SecretError::EnvTooLong(name.clone()));
                }
                Ok(Secret::new(value))
            }
            SecretSource::File(path) => {
                let raw = crate::files::read_capped(path, crate::files::SECRET_MAX_BYTES).map_err(
                    |source| SecretError::File {
                        path: path.clone(),
                        source,
                    },
                )?;
                let raw =
                    String::from_utf8(raw).map_err(|_| SecretError::FileNotUtf8(path.clone()))?;
                let value = raw.trim_end_matches(['\r', '\n']);
                if value.trim().is_empty() {
                    return Err(SecretError::FileEmpty(path.clone()));
                }
                Ok(Secret::new(value))
            }
        }
    }

    /// A warning when a secret file can be read by group or others.
    #[cfg(unix)]
    pub fn permission_warning(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let SecretSource::File(path) = self else {
            return None;
        };
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        (mode & 0o077 != 0).then(|| {
            format!(
                "secret file {} is readable by group or others (mode {:o}); chmod 600 it (on Kubernetes: defaultMode: 0400 on the secret volume)",
                path.display(),
                mode & 0o777
            )
        })
    }

    #[cfg(not(unix))]
    pub fn permission_warning(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("hunter2-very-secret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("sha256:"));
    }

    #[test]
    fn file_secret_drops_trailing_newline_and_rejects_empty() {
        let dir = std::env::temp_dir().join(format!("gap-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s");
        std::fs::write(&f, "abc\n").unwrap();
        assert_eq!(
            SecretSource::File(f.clone()).read().unwrap().expose(),
            "abc"
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            SecretSource::File(f.clone()).read(),
            Err(SecretError::FileEmpty(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
