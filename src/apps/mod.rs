//! Caller identity: who is calling, with what proof, and what they may do. Once any `[[app]]`
//! is configured, every request must carry a proof (a proxy token from the app's own
//! client-credentials login, or an API key) or it is refused; the app then decides the
//! credential whose token is injected, the methods and paths it may use, and its weight in
//! the budget's fair queue.
//!
//! [`Registry`] is the validated `[[app]]` list made ready for the request path (lookups by
//! name, client id and key digest, and each app's metric handles); [`Gatekeeper`] holds the
//! current registry (a reload swaps it), the failure [`guard::Guard`] and the audit log.
//! The proofs: [`token`] (the proxy's own sealed tokens), [`login`] (the `/oauth/token` the
//! SDKs' gateway setting posts to), [`workload`] (JWTs such as Kubernetes ServiceAccount
//! tokens), and client certificates (`mtls_subjects`, verified at the TLS handshake). Pure functions over bytes: tested without a socket.

pub mod guard;
pub mod login;
pub mod token;
pub mod workload;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::apps::{Anonymous, AppSettings, AppsSettings, Digest32};
use crate::metrics::{AppMetrics, AppOutcome, AuthFailure, Handles};
use token::{TokenError, TokenKey};

/// An app's place in the budget's fair queue: its name and weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallerKey {
    pub name: Arc<str>,
    pub weight: u32,
}

/// One `[[app]]`, ready for the request path.
pub struct App {
    pub name: Arc<str>,
    /// Its place in [`Registry::apps`].
    pub index: usize,
    /// Index of its credential among the process's credentials.
    pub route: usize,
    pub allowed_methods: Vec<http::Method>,
    pub allowed_path_prefixes: Vec<String>,
    pub key: CallerKey,
    pub client_id: Option<String>,
    secret: Option<Digest32>,
    /// Ties its tokens to its current client id and secret.
    binding: [u8; 16],
    pub counters: Arc<Handles<AppOutcome>>,
    /// `/status`: which proofs it can use.
    pub api_keys: usize,
    pub mtls_subjects: Vec<String>,
}

/// Who a request is from.
pub enum Caller<'a> {
    /// No app proof, and none required (no `[[app]]`, or `anonymous = "cidr"`).
    Anonymous,
    App(&'a App),
    /// A workload token not seen yet: [`Registry::verify_workload`] decides (it may fetch the
    /// issuer's keys).
    Workload,
}

/// The `[[app]]` list made ready for lookups.
pub struct Registry {
    apps: Vec<App>,
    by_name: HashMap<Arc<str>, usize>,
    by_client_id: HashMap<String, usize>,
    by_key: HashMap<Digest32, usize>,
    /// `mtls_subjects`: client-certificate names.
    by_subject: HashMap<String, usize>,
    /// `jwt`: the issuers of workload tokens and the tokens already verified.
    workload: workload::Workload,
    token_key: Option<TokenKey>,
    pub settings: AppsSettings,
}

impl Registry {
    pub fn new(settings: &AppsSettings, metrics: &AppMetrics) -> Registry {
        let apps: Vec<App> = settings
            .apps
            .iter()
            .enumerate()
            .map(|(i, a)| app(i, a, metrics))
            .collect();
        let by_client_id = apps
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((a.client_id.clone()?, i)))
            .collect();
        let by_name = apps
            .iter()
            .enumerate()
            .map(|(i, a)| (a.name.clone(), i))
            .collect();
        let by_key = settings
            .apps
            .iter()
            .enumerate()
            .flat_map(|(i, a)| a.api_keys.iter().map(move |k| (*k, i)))
            .collect();
        let by_subject = settings
            .apps
            .iter()
            .enumerate()
            .flat_map(|(i, a)| a.mtls_subjects.iter().map(move |s| (s.clone(), i)))
            .collect();
        let names: Vec<&str> = apps.iter().map(|a| &*a.name).collect();
        metrics.requests.forget(&names);
        Registry {
            by_name,
            by_subject,
            workload: workload::Workload::new(&settings.apps),
            by_client_id,
            by_key,
            token_key: settings
                .token_key
                .as_ref()
                .map(|k| TokenKey::new(k.expose().trim().as_bytes())),
            settings: settings.clone(),
            apps,
        }
    }

    /// Any `[[app]]` configured: requests are attributed.
    pub fn enabled(&self) -> bool {
        !self.apps.is_empty()
    }

    pub fn apps(&self) -> &[App] {
        &self.apps
    }

    /// Does any app prove itself with a client certificate?
    pub fn wants_certificates(&self) -> bool {
        !self.by_subject.is_empty()
    }

    /// Who sent a request with this `Authorization` value (the proof), at `now` (Unix
    /// seconds). Without one, the connection's verified client-certificate names (`peer`)
    /// may prove an app; a certificate that proves none is refused.
    pub fn identify(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<&[String]>,
        now: u64,
    ) -> Result<Caller<'_>, AuthFailure> {
        if !self.enabled() {
            return Ok(Caller::Anonymous);
        }
        let Some(value) = authorization else {
            if let Some(names) = peer.filter(|n| !n.is_empty()) {
                return names
                    .iter()
                    .find_map(|n| self.by_subject.get(n))
                    .map(|&i| Caller::App(&self.apps[i]))
                    .ok_or(AuthFailure::Certificate);
            }
            return match self.settings.anonymous {
                Anonymous::Cidr => Ok(Caller::Anonymous),
                Anonymous::Unset => Err(AuthFailure::Missing),
            };
        };
        let credential = bearer(value).ok_or(AuthFailure::Malformed)?;
        if credential.starts_with(token::PREFIX) {
            return self.by_token(credential, now).map(Caller::App);
        }
        let digest = Digest32::of(credential.as_bytes());
        if let Some(&i) = self.by_key.get(&digest) {
            return Ok(Caller::App(&self.apps[i]));
        }
        if !self.workload.is_empty() && workload::looks_like_jwt(credential) {
            return Ok(match self.workload.cached(credential, now) {
                Some(i) => Caller::App(&self.apps[i]),
                None => Caller::Workload,
            });
        }
        Err(AuthFailure::ApiKey)
    }

    /// The app a workload token proves (after [`Caller::Workload`]).
    pub async fn verify_workload(
        &self,
        authorization: Option<&[u8]>,
        now: u64,
    ) -> Result<&App, AuthFailure> {
        let token = authorization
            .and_then(bearer)
            .ok_or(AuthFailure::Malformed)?;
        let i = self
            .workload
            .verify(token, &self.settings.apps, now)
            .await?;
        Ok(&self.apps[i])
    }

    fn by_token(&self, token: &str, now: u64) -> Result<&App, AuthFailure> {
        let key = self.token_key.as_ref().ok_or(AuthFailure::AppToken)?;
        let mut buf = [0u8; 64];
        let claims = token::open(key, token, now, &mut buf).map_err(|e| match e {
            TokenError::Malformed => AuthFailure::Malformed,
            TokenError::BadTag | TokenError::Expired => AuthFailure::AppToken,
        })?;
        let app = self
            .by_name
            .get(claims.app)
            .map(|&i| &self.apps[i])
            .ok_or(AuthFailure::AppToken)?;
        // A token from before the app's secret or id changed is revoked.
        if app.secret.is_none()
            || !crate::fingerprint::constant_time_eq(&app.binding, &claims.binding)
        {
            return Err(AuthFailure::AppToken);
        }
        Ok(app)
    }

    /// The app whose client id and secret these are, checked in constant time (an unknown id
    /// costs the same digest and comparison).
    pub fn login(&self, client_id: &str, secret: &str) -> Option<&App> {
        let presented = Digest32::of(secret.as_bytes());
        let app = self.by_client_id.get(client_id).map(|&i| &self.apps[i]);
        let expected = app.and_then(|a| a.secret).unwrap_or(Digest32([0xa5; 32]));
        let same = crate::fingerprint::constant_time_eq(&presented.0, &expected.0);
        app.filter(|_| same)
    }

    /// A new proxy token for `app` (which logged in): the token and its lifetime in seconds.
    pub fn issue(&self, app: &App, now: u64) -> Option<(String, u64)> {
        let key = self.token_key.as_ref()?;
        let lifetime = self.settings.token_lifetime.as_secs();
        let claims = token::Claims {
            app: &app.name,
            expires_at: now + lifetime,
            binding: app.binding,
        };
        Some((token::issue(key, &claims, rand::random()), lifetime))
    }

    /// Is `path` the login endpoint (`/oauth/token`, or under `apps.login_path_prefix`)?
    pub fn is_login_path(&self, path: &str) -> bool {
        const LOGIN: &str = "/oauth/token";
        if path == LOGIN {
            return true;
        }
        let prefix = &self.settings.login_path_prefix;
        !prefix.is_empty() && path.strip_prefix(prefix.as_str()) == Some(LOGIN)
    }
}

fn app(index: usize, a: &AppSettings, metrics: &AppMetrics) -> App {
    let name: Arc<str> = a.name.as_str().into();
    App {
        index,
        route: a.route,
        allowed_methods: a.allowed_methods.clone(),
        allowed_path_prefixes: a.allowed_path_prefixes.clone(),
        key: CallerKey {
            name: name.clone(),
            weight: a.weight,
        },
        client_id: a.client_id.clone(),
        secret: a.client_secret,
        binding: binding(a),
        counters: metrics.requests.handles(&name),
        api_keys: a.api_keys.len(),
        mtls_subjects: a.mtls_subjects.clone(),
        name,
    }
}

/// What an app's tokens are bound to: its name, client id and secret digest.
fn binding(a: &AppSettings) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"genesys-auth-proxy app binding v1\0");
    h.update(a.name.as_bytes());
    h.update([0]);
    h.update(a.client_id.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(a.client_secret.map_or([0; 32], |d| d.0));
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The credential of `Authorization: Bearer <credential>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let credential = rest.trim();
    (!credential.is_empty() && credential.len() <= 4096 && !credential.contains(' '))
        .then_some(credential)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current apps (swapped by reloads), the failure guard, metrics and the audit log: what
/// every listener shares.
pub struct Gatekeeper {
    registry: ArcSwap<Registry>,
    pub guard: guard::Guard,
    /// Verified client-certificate names of open TLS connections.
    pub peers: crate::worker::tls::Peers,
    pub metrics: Arc<AppMetrics>,
    audit: Arc<AuditLog>,
}

impl Gatekeeper {
    pub fn new(settings: &AppsSettings, audit: Arc<AuditLog>) -> Gatekeeper {
        let metrics = Arc::new(AppMetrics::new());
        Gatekeeper {
            registry: ArcSwap::from_pointee(Registry::new(settings, &metrics)),
            guard: guard::Guard::default(),
            peers: crate::worker::tls::Peers::default(),
            metrics,
            audit,
        }
    }

    /// The registry as it is now: load once per request (no reference count is taken until
    /// a request is attributed and keeps it: [`arc_swap::Guard::into_inner`]).
    pub fn current(&self) -> arc_swap::Guard<Arc<Registry>> {
        self.registry.load()
    }

    /// A reload's new `[apps]`/`[[app]]`: the next request uses them.
    pub fn replace(&self, settings: &AppsSettings) {
        self.registry
            .store(Arc::new(Registry::new(settings, &self.metrics)));
    }

    /// Counts a failed proof from `source`, and writes its audit line when one is due.
    pub fn failed(&self, source: IpAddr, proof: AuthFailure, max_per_minute: u32) {
        self.metrics.auth_failures.inc(proof);
        if let Some(line) = self
            .guard
            .failed(source, proof, Instant::now(), max_per_minute)
        {
            self.record_failures(&line);
        }
    }

    /// Writes the `APP_AUTH_FAILED` lines the guard owes (every one with `all`, at shutdown),
    /// so failures after a source's last line are not lost when it stops failing.
    pub fn sweep(&self, all: bool) {
        for line in self.guard.sweep(Instant::now(), all) {
            self.record_failures(&line);
        }
    }

    fn record_failures(&self, line: &guard::FailureLine) {
        self.audit.record(
            AuditEvent::AppAuthFailed,
            serde_json::json!({
                "source": line.source.to_string(),
                "proof": line.proof.label(),
                "failures": line.failures,
                "throttled": line.throttled,
                "window_seconds": guard::WINDOW.as_secs(),
            }),
            None,
        );
    }

    /// Sweeps every 10 s until shutdown, then once more for everything left.
    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: crate::shutdown::Shutdown) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sweep(false),
                () = shutdown.wait() => break,
            }
        }
        self.sweep(true);
    }

    /// `APP_TOKEN_ISSUED`, with the token's fingerprint only.
    pub fn issued(&self, app: &App, token: &str, expires_in: u64, source: IpAddr) {
        self.audit.record(
            AuditEvent::AppTokenIssued,
            serde_json::json!({
                "app": &*app.name,
                "app_client_id": app.client_id,
                "expires_in": expires_in,
                "source": source.to_string(),
            }),
            Some(&crate::fingerprint::fingerprint(token.as_bytes())),
        );
    }
}

#[cfg(test)]
mod tests;
