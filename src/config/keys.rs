//! `genesys-auth-proxy check --keys`: every file key with its reload class and default, read
//! from the model (the structs a key's field lives in decide its class; see [`super::keyed`]),
//! and the reference configuration's header, which a test keeps equal to it.

use std::path::Path;

use super::apps::AppsSettings;
use super::keyed::Keyed;
use super::model::{CredentialSettings, Live, Process, Restart};

/// How a reload treats a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyClass {
    /// Applied in place, as one snapshot.
    Live,
    /// A client secret or id: the refresher validates it before it is used.
    Secret,
    /// Read at start-up; a reload that changes it reports "restart required".
    Restart,
}

impl KeyClass {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyClass::Live => "live",
            KeyClass::Secret => "secret",
            KeyClass::Restart => "restart",
        }
    }
}

/// One file key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub key: &'static str,
    pub class: KeyClass,
    /// The value a file without the key gets (`Debug` form), for a key that has one.
    pub default: Option<String>,
}

/// Every key in model order: process restart keys, a credential's restart keys, live keys,
/// then the secrets.
pub fn table() -> Vec<KeyRow> {
    let defaults = defaults();
    let classes: [(KeyClass, Vec<&'static str>); 6] = [
        (KeyClass::Restart, Process::all_keys()),
        (KeyClass::Restart, Restart::all_keys()),
        (KeyClass::Live, Live::all_keys()),
        (KeyClass::Live, AppsSettings::all_keys()),
        (KeyClass::Live, super::tls::TlsConfig::all_keys()),
        (KeyClass::Secret, CredentialSettings::all_keys()),
    ];
    let mut rows: Vec<KeyRow> = Vec::new();
    for (class, keys) in classes {
        for key in keys {
            if rows.iter().any(|r| r.key == key) {
                continue;
            }
            let default = defaults
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone());
            rows.push(KeyRow {
                key,
                class,
                default,
            });
        }
    }
    rows
}

/// The values of a file that sets only what has no default.
fn defaults() -> Vec<(&'static str, String)> {
    let dir = std::env::temp_dir().join(format!("gap-keys-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let secret = dir.join("secret");
    let _ = std::fs::write(&secret, "placeholder\n");
    let text = format!(
        "[genesys]\nclient_id = \"placeholder\"\nclient_secret = {{ file = {:?} }}\n",
        secret.display().to_string()
    );
    let parsed = super::parse(&text, Path::new("defaults.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(config) = parsed else {
        return Vec::new();
    };
    let mut out = Vec::new();
    config.process.values(&mut out);
    let top = config.top();
    top.restart.values(&mut out);
    top.live.values(&mut out);
    config.apps.values(&mut out);
    config.tls.values(&mut out);
    // Secrets have no default, and their values are never printed. A few values read better
    // than their `Debug` form.
    for (key, value) in &mut out {
        match *key {
            "proxy.threads" => *value = "the number of CPUs".into(),
            "genesys.login_url" => *value = top.restart.genesys.token_url.to_string(),
            "genesys.api_url" => *value = top.restart.genesys.api.base_url(),
            _ => {}
        }
    }
    out
}

/// The table as `check --keys` prints it: key, class, default.
pub fn render() -> String {
    let rows = table();
    let width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in rows {
        let default = r.default.as_deref().unwrap_or("-");
        out.push_str(&format!(
            "{:width$}  {:7}  {default}\n",
            r.key,
            r.class.as_str()
        ));
    }
    out
}

/// The reference configuration's header: the keys of each reload class, wrapped as comments.
pub fn header() -> String {
    let rows = table();
    let mut out = String::from(
        "# Reload classes (from the code: `genesys-auth-proxy check --keys` prints every key with\n# its class and default; a test keeps this list equal to it):\n",
    );
    for class in [KeyClass::Live, KeyClass::Secret, KeyClass::Restart] {
        let keys: Vec<&str> = rows
            .iter()
            .filter(|r| r.class == class)
            .map(|r| r.key)
            .collect();
        let mut line = format!("# {}:", class.as_str());
        for key in keys {
            if line.len() + 1 + key.len() > 95 {
                out.push_str(&line);
                out.push('\n');
                line = "#  ".to_string();
            }
            line.push(' ');
            line.push_str(key);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_one_class_and_the_defaults_come_from_the_code() {
        let rows = table();
        let row = |k: &str| rows.iter().find(|r| r.key == k).unwrap().clone();
        assert_eq!(row("proxy.listen").class, KeyClass::Restart);
        assert_eq!(
            row("proxy.listen").default.as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(row("proxy.threads").class, KeyClass::Restart);
        assert_eq!(row("proxy.allowed_path_prefixes").class, KeyClass::Live);
        assert_eq!(
            row("token.max_token_requests_per_minute")
                .default
                .as_deref(),
            Some("20")
        );
        assert_eq!(row("genesys.client_secret").class, KeyClass::Secret);
        assert_eq!(row("genesys.client_secret").default, None, "never printed");
        let mut keys: Vec<_> = rows.iter().map(|r| r.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), rows.len(), "each key once");
    }

    /// The reference configuration's header is what the code says, not a list kept by hand.
    #[test]
    fn the_reference_config_header_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/genesys-auth-proxy.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let header = header();
        assert!(
            text.contains(&header),
            "conf/genesys-auth-proxy.toml must contain, as generated:\n{header}"
        );
    }
}
