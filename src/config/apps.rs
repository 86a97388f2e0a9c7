//! `[apps]` and `[[app]]`: who may call the proxy, with which proofs, through which
//! credential, and with what share of its budget. The validated model and its builder; the
//! run-time side (login, proofs, policy) is [`crate::apps`].
//!
//! Every key here is live: a reload rebuilds the apps and swaps them in place, so a removed
//! app's next request is refused and a changed secret revokes the tokens issued with the old
//! one.

use std::fmt;
use std::time::Duration;

use http::Method;
use sha2::{Digest, Sha256};

use super::build::{methods, path_prefixes};
use super::builder::{secret, Builder, Built};
use super::file::{AppEntry, AppsSection};
use super::keyed::keyed_struct;
use super::model::{Config, CredentialName};
use crate::secret::{Secret, SecretSource};

/// At most this many apps: each is a metric label value.
pub const APPS_MAX: usize = 256;

/// The shortest `apps.token_key` accepted (256 bits).
pub const TOKEN_KEY_MIN_BYTES: usize = 32;

/// Names a caller can never have: the label of unattributed requests, and of address groups.
pub const RESERVED_APP_NAMES: [&str; 2] = ["unknown", "other"];

keyed_struct! {
    /// `[apps]` and the `[[app]]` list, applied in place on reload.
    pub struct AppsSettings {
        /// Seals the proxy's own access tokens; the same on every replica.
        pub token_key: Option<Secret> => "apps.token_key",
        pub token_key_source: Option<SecretSource> => "apps.token_key",
        /// `expires_in` of a proxy-issued token.
        pub token_lifetime: Duration => "apps.token_lifetime_seconds",
        pub anonymous: Anonymous => "apps.anonymous",
        /// The SDKs' `path_params_login`: the login is answered at `/oauth/token` and under
        /// this prefix.
        pub login_path_prefix: String => "apps.login_path_prefix",
        /// Failed proofs from one source address in a minute before it is refused outright.
        pub max_auth_failures_per_minute: u32 => "apps.max_auth_failures_per_minute",
        pub apps: Vec<AppSettings> => "app",
    }
}

impl Default for AppsSettings {
    fn default() -> Self {
        AppsSettings {
            token_key: None,
            token_key_source: None,
            token_lifetime: Duration::from_secs(3600),
            anonymous: Anonymous::Unset,
            login_path_prefix: String::new(),
            max_auth_failures_per_minute: 20,
            apps: Vec::new(),
        }
    }
}

impl AppsSettings {
    /// Does any caller have to prove who it is?
    pub fn enabled(&self) -> bool {
        !self.apps.is_empty()
    }

    /// Secret files the watcher should follow.
    pub fn secret_files(&self) -> impl Iterator<Item = &std::path::PathBuf> {
        self.token_key_source
            .iter()
            .chain(
                self.apps
                    .iter()
                    .filter_map(|a| a.client_secret_source.as_ref()),
            )
            .filter_map(|s| match s {
                SecretSource::File(p) => Some(p),
                SecretSource::Env(_) => None,
            })
    }
}

/// What a request without an app proof gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Not written: with no `[[app]]`, today's CIDR-only behaviour on loopback listeners;
    /// with apps, refused (401).
    Unset,
    /// `anonymous = "cidr"`: served as the listener's credential when the address is allowed.
    Cidr,
}

/// A SHA-256 digest of a secret or key: compared, never printed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest32(pub [u8; 32]);

impl Digest32 {
    pub fn of(bytes: &[u8]) -> Self {
        Digest32(Sha256::digest(bytes).into())
    }
}

impl fmt::Debug for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest32({})", hex::encode(&self.0[..3]))
    }
}

/// One `[[app]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSettings {
    pub name: String,
    pub credential: CredentialName,
    /// Index of `credential` in [`Config::credentials`].
    pub route: usize,
    pub allowed_methods: Vec<Method>,
    pub allowed_path_prefixes: Vec<String>,
    pub weight: u32,
    pub client_id: Option<String>,
    /// SHA-256 of the client secret (read from its source, or `client_secret_sha256`).
    pub client_secret: Option<Digest32>,
    pub client_secret_source: Option<SecretSource>,
    /// SHA-256 of each accepted API key.
    pub api_keys: Vec<Digest32>,
    /// Client-certificate names that prove this app: a URI SAN as written (`spiffe://…`), or
    /// `dns:<name>` for a DNS SAN (lower case).
    pub mtls_subjects: Vec<String>,
    /// A workload token from this issuer, for this audience, naming one of these subjects.
    pub jwt: Option<JwtProof>,
}

/// `[[app]] jwt`: what a workload token must say to prove the app.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtProof {
    pub issuer: String,
    pub audience: String,
    pub subjects: Vec<String>,
    /// `jwks_url`, else the issuer's OpenID discovery document.
    pub keys: super::model::KeySource,
    /// `ca_file`: the only CAs trusted for the JWKS and discovery hosts (DER).
    pub ca_certs: Option<Vec<Vec<u8>>>,
}

/// Builds `[apps]` and `[[app]]` once every credential is known.
pub(super) fn apps(
    b: &mut Builder,
    section: Option<AppsSection>,
    entries: Vec<AppEntry>,
    config: &Config,
) -> Built<AppsSettings> {
    let section = section.unwrap_or_default();
    let (token_key, token_key_source) = match section.token_key {
        None => (None, None),
        Some(r) => {
            let (key, source) = secret(b, r, "apps.token_key")?;
            if key.expose().trim().len() < TOKEN_KEY_MIN_BYTES {
                return Err(b.err(
                    "apps.token_key",
                    format!("must be at least {TOKEN_KEY_MIN_BYTES} bytes (e.g. `openssl rand -base64 48`)"),
                ));
            }
            (Some(key), Some(source))
        }
    };
    let token_lifetime = match section.token_lifetime_seconds.unwrap_or(3600) {
        n @ 1..=86_400 => Duration::from_secs(n),
        _ => return Err(b.err("apps.token_lifetime_seconds", "must be between 1 and 86400")),
    };
    let anonymous = match section.anonymous.as_deref() {
        None => Anonymous::Unset,
        Some("cidr") => Anonymous::Cidr,
        Some(other) => {
            return Err(b.err(
                "apps.anonymous",
                format!("{other:?} is not \"cidr\" (leave it out to require an app proof)"),
            ))
        }
    };
    let login_path_prefix = login_prefix(b, section.login_path_prefix)?;
    let max_auth_failures_per_minute = match section.max_auth_failures_per_minute.unwrap_or(20) {
        n @ 1..=100_000 => n,
        _ => {
            return Err(b.err(
                "apps.max_auth_failures_per_minute",
                "must be between 1 and 100000",
            ))
        }
    };
    if entries.len() > APPS_MAX {
        return Err(b.err(
            "app",
            format!("at most {APPS_MAX} apps (each is a metric label)"),
        ));
    }
    let mut apps: Vec<AppSettings> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let app = app(b, i, entry, config)?;
        check_unique(b, &apps, &app, config)?;
        if app.client_id.is_some() && token_key.is_none() {
            return Err(b.err(
                "apps.token_key",
                format!(
                    "is required: app {:?} logs in with client_id, and its tokens are sealed with this key",
                    app.name
                ),
            ));
        }
        apps.push(app);
    }
    let settings = AppsSettings {
        token_key,
        token_key_source,
        token_lifetime,
        anonymous,
        login_path_prefix,
        max_auth_failures_per_minute,
        apps,
    };
    exposed_without_apps(b, &settings, config)?;
    Ok(settings)
}

/// A listener that faces the network needs apps, or `anonymous = "cidr"` said on purpose.
fn exposed_without_apps(b: &Builder, s: &AppsSettings, config: &Config) -> Built<()> {
    if s.enabled() || s.anonymous == Anonymous::Cidr {
        return Ok(());
    }
    match config
        .credentials
        .iter()
        .find(|c| !c.restart.proxy.listen.ip().is_loopback())
    {
        None => Ok(()),
        Some(c) => Err(b.err(
            &c.name.key("proxy.listen"),
            format!(
                "{} faces the network but no [[app]] is configured: every caller that reaches it would act as the OAuth client. Add [[app]] entries, or set [apps] anonymous = \"cidr\" to rely on allowed_client_cidrs alone",
                c.restart.proxy.listen
            ),
        )),
    }
}

fn login_prefix(b: &Builder, raw: Option<String>) -> Built<String> {
    const KEY: &str = "apps.login_path_prefix";
    let raw = raw.unwrap_or_default();
    let prefix = raw.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok(String::new());
    }
    let ok = prefix.starts_with('/')
        && !prefix.contains("..")
        && prefix
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"/-_.~".contains(&c));
    if !ok {
        return Err(b.err(
            KEY,
            format!("{raw:?} must start with '/' and hold only letters, digits and -_.~/"),
        ));
    }
    Ok(prefix.to_string())
}

/// An app name: `[a-z0-9-]`, 1 to 32, not reserved.
pub fn parse_app_name(name: &str) -> Result<String, String> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if !ok {
        return Err(format!("{name:?} must be 1 to 32 of [a-z0-9-]"));
    }
    if RESERVED_APP_NAMES.contains(&name) {
        return Err(format!("{name:?} is reserved (a metric label of its own)"));
    }
    Ok(name.to_string())
}

fn app(b: &mut Builder, i: usize, e: AppEntry, config: &Config) -> Built<AppSettings> {
    let name = match e.name.as_deref() {
        None => return Err(b.err(&format!("app[{i}].name"), "is required")),
        Some(n) => parse_app_name(n).map_err(|m| b.err(&format!("app[{i}].name"), m))?,
    };
    let key = |k: &str| format!("app.{name}.{k}");
    let credential = match e.credential.as_deref() {
        None | Some(CredentialName::DEFAULT) => CredentialName::top(),
        Some(c) => CredentialName::parse(c).map_err(|m| b.err(&key("credential"), m))?,
    };
    let Some(route) = config.credentials.iter().position(|c| c.name == credential) else {
        return Err(b.err(
            &key("credential"),
            format!("no credential is named {:?}", credential.as_str()),
        ));
    };
    let proxy = &config.top().live.proxy;
    let allowed_methods = match e.allowed_methods {
        None => proxy.allowed_methods.clone(),
        some => methods(b, some, &key("allowed_methods"))?,
    };
    let allowed_path_prefixes = match e.allowed_path_prefixes {
        None => config.credentials[route]
            .live
            .proxy
            .allowed_path_prefixes
            .clone(),
        some => path_prefixes(b, some, "/", &key("allowed_path_prefixes"))?,
    };
    let weight = match e.weight.unwrap_or(1) {
        w @ 1..=1000 => w as u32,
        _ => return Err(b.err(&key("weight"), "must be between 1 and 1000")),
    };
    let (client_id, client_secret, client_secret_source) = login_proof(
        b,
        e.client_id,
        e.client_secret,
        e.client_secret_sha256,
        &key,
    )?;
    let api_keys = e
        .api_key_sha256
        .unwrap_or_default()
        .iter()
        .map(|h| parse_digest(b, h, &key("api_key_sha256")))
        .collect::<Built<Vec<_>>>()?;
    let mtls_subjects = certificate_proof(b, e.mtls_subjects, config, &key("mtls_subjects"))?;
    let jwt = match e.jwt {
        None => None,
        Some(j) => Some(jwt(b, j, &key("jwt"))?),
    };
    if client_id.is_none() && api_keys.is_empty() && mtls_subjects.is_empty() && jwt.is_none() {
        return Err(b.err(
            &format!("app.{name}"),
            "has no proof: set client_id + client_secret, api_key_sha256, mtls_subjects or jwt",
        ));
    }
    Ok(AppSettings {
        name,
        credential,
        route,
        allowed_methods,
        allowed_path_prefixes,
        weight,
        client_id,
        client_secret,
        client_secret_source,
        api_keys,
        mtls_subjects,
        jwt,
    })
}

/// The login proof: `client_id` with `client_secret` (a secret source, read and hashed) or
/// `client_secret_sha256`; all or nothing.
type LoginProof = (Option<String>, Option<Digest32>, Option<SecretSource>);

fn login_proof(
    b: &mut Builder,
    client_id: Option<String>,
    client_secret: Option<super::file::SecretRef>,
    client_secret_sha256: Option<String>,
    key: &dyn Fn(&str) -> String,
) -> Built<LoginProof> {
    let (client_secret, client_secret_source) = match (client_secret, client_secret_sha256) {
        (Some(_), Some(_)) => {
            return Err(b.err(
                &key("client_secret"),
                "set client_secret or client_secret_sha256, not both",
            ))
        }
        (Some(r), None) => {
            let (s, source) = secret(b, r, &key("client_secret"))?;
            (Some(Digest32::of(s.expose().as_bytes())), Some(source))
        }
        (None, Some(hex)) => (
            Some(parse_digest(b, &hex, &key("client_secret_sha256"))?),
            None,
        ),
        (None, None) => (None, None),
    };
    let client_id = match client_id {
        None => None,
        Some(id)
            if id.is_empty()
                || id.len() > 256
                || id.contains(':')
                || id.chars().any(char::is_control) =>
        {
            return Err(b.err(
                &key("client_id"),
                "must be 1 to 256 characters without ':' or control characters",
            ))
        }
        Some(id) => Some(id),
    };
    match (&client_id, &client_secret) {
        (Some(_), None) => {
            return Err(b.err(
                &key("client_secret"),
                "is required with client_id (or client_secret_sha256)",
            ))
        }
        (None, Some(_)) => return Err(b.err(&key("client_id"), "is required with client_secret")),
        _ => {}
    }
    Ok((client_id, client_secret, client_secret_source))
}

/// `mtls_subjects`: each a URI or `dns:` SAN, and a client CA to verify them with.
fn certificate_proof(
    b: &Builder,
    raw: Option<Vec<String>>,
    config: &Config,
    key: &str,
) -> Built<Vec<String>> {
    let mtls_subjects = raw
        .unwrap_or_default()
        .iter()
        .map(|s| subject(s).map_err(|m| b.err(key, m)))
        .collect::<Built<Vec<_>>>()?;
    if !mtls_subjects.is_empty()
        && config
            .tls
            .listener
            .as_ref()
            .is_none_or(|t| t.client_roots.is_none())
    {
        return Err(b.err(
            key,
            "needs [proxy.tls] with client_ca_file (the CA whose client certificates are verified)",
        ));
    }
    Ok(mtls_subjects)
}

fn jwt(b: &Builder, j: super::file::JwtSection, key: &str) -> Built<JwtProof> {
    use super::model::KeySource;
    use super::value::{load_ca_file, parse_url};
    let k = |s: &str| format!("{key}.{s}");
    let issuer = match j.issuer {
        Some(i) if !i.is_empty() => i,
        _ => return Err(b.err(&k("issuer"), "is required (the token's iss)")),
    };
    let audience = match j.audience {
        Some(a) if !a.is_empty() => a,
        _ => return Err(b.err(&k("audience"), "is required (the token's aud)")),
    };
    let subjects = j.subjects.unwrap_or_default();
    if subjects.is_empty() || subjects.iter().any(String::is_empty) {
        return Err(b.err(
            &k("subjects"),
            "must list the token subjects (sub) that prove the app",
        ));
    }
    let keys = match j.jwks_url {
        Some(u) => KeySource::Url(parse_url(&u).map_err(|m| b.err(&k("jwks_url"), m))?),
        None => {
            let doc = format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            );
            KeySource::Discover(parse_url(&doc).map_err(|m| {
                b.err(
                    &k("issuer"),
                    format!("is not a URL for OpenID discovery (set jwks_url): {m}"),
                )
            })?)
        }
    };
    let ca_certs = match j.ca_file {
        None => None,
        Some(f) => {
            Some(load_ca_file(std::path::Path::new(&f)).map_err(|m| b.err(&k("ca_file"), m))?)
        }
    };
    Ok(JwtProof {
        issuer,
        audience,
        subjects,
        keys,
        ca_certs,
    })
}

/// An `mtls_subjects` entry: a URI (`scheme://…`, as a SPIFFE ID is) or `dns:<name>`.
fn subject(s: &str) -> Result<String, String> {
    if let Some(name) = s.strip_prefix("dns:") {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-.*".contains(&c));
        return if ok {
            Ok(format!("dns:{}", name.to_ascii_lowercase()))
        } else {
            Err(format!("{s:?} is not a DNS name"))
        };
    }
    match s.split_once("://") {
        Some((scheme, rest))
            if !scheme.is_empty()
                && !rest.is_empty()
                && scheme
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c)) =>
        {
            Ok(s.to_string())
        }
        _ => Err(format!(
            "{s:?} is neither a URI SAN (spiffe://trust-domain/path) nor dns:<name>"
        )),
    }
}

/// Names, client ids and keys belong to one app each, and app names do not collide with
/// `[[budget.app]]` groups (both are the budget's `app` label).
fn check_unique(
    b: &Builder,
    apps: &[AppSettings],
    new: &AppSettings,
    config: &Config,
) -> Built<()> {
    let key = |k: &str| format!("app.{}.{k}", new.name);
    if apps.iter().any(|a| a.name == new.name) {
        return Err(b.err(&key("name"), "is used by another [[app]]"));
    }
    let mut groups = config.credentials.iter().flat_map(|c| &c.live.budget.apps);
    if groups.any(|g| g.name == new.name) {
        return Err(b.err(&key("name"), "is also a [[budget.app]] name"));
    }
    if let Some(id) = &new.client_id {
        if apps.iter().any(|a| a.client_id.as_ref() == Some(id)) {
            return Err(b.err(&key("client_id"), "is used by another [[app]]"));
        }
    }
    for s in &new.mtls_subjects {
        if apps.iter().any(|a| a.mtls_subjects.contains(s)) {
            return Err(b.err(
                &key("mtls_subjects"),
                format!("{s:?} proves another app already"),
            ));
        }
    }
    for (i, k) in new.api_keys.iter().enumerate() {
        if new.api_keys[..i].contains(k) || apps.iter().any(|a| a.api_keys.contains(k)) {
            return Err(b.err(
                &key("api_key_sha256"),
                "lists a key digest twice or one another app has (each key proves one app)",
            ));
        }
    }
    Ok(())
}

fn parse_digest(b: &Builder, hex_text: &str, key: &str) -> Built<Digest32> {
    let mut out = [0u8; 32];
    match hex::decode_to_slice(hex_text.trim(), &mut out) {
        Ok(()) => Ok(Digest32(out)),
        Err(_) => Err(b.err(
            key,
            "must be 64 hex digits: the SHA-256 of the secret (`printf %s \"$KEY\" | sha256sum`)",
        )),
    }
}
