//! Configuration reload: every trigger (SIGHUP, `POST /reload`, a secret file changing) goes
//! through [`Reloader::reload`]: read → parse → validate → compare → apply.
//!
//! An invalid file changes nothing. Settings that can change in place (allowlists, prefixes,
//! timeouts, refresh margins, limits, log level) apply at once; those that cannot (listen
//! addresses, threads, hosts, audit path, log format, token HTTP timeouts) are reported as
//! "restart required" while the rest still applies. A new client secret is handed to the
//! refresher, which mints and validates with it before anything is swapped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::audit::AuditLog;
use crate::config::{self, Config, TokenSettings};
use crate::metrics::Metrics;
use crate::proxy::ProxyState;
use crate::token::refresher::{Command, Credentials};
use crate::token::secret::SecretSource;

/// When and how often the configuration was (re)loaded, for `/status`.
#[derive(Debug, Clone, Copy)]
pub struct ConfigInfo {
    pub loaded_at: SystemTime,
    pub generation: u64,
}

/// The answer to one reload: HTTP status for `POST /reload` and a JSON body.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub status: u16,
    pub body: Value,
}

/// What differs between the running config and a newly read one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub applied: Vec<&'static str>,
    pub restart_required: Vec<&'static str>,
    pub credentials: bool,
    pub previous_secret: bool,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
            && self.restart_required.is_empty()
            && !self.credentials
            && !self.previous_secret
    }
}

/// Compares two configs key by key.
pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut d = Diff::default();
    let mut check = |changed: bool, key: &'static str, in_place: bool| {
        if changed {
            if in_place {
                d.applied.push(key)
            } else {
                d.restart_required.push(key)
            }
        }
    };
    let (op, np) = (&old.proxy, &new.proxy);
    check(op.listen != np.listen, "proxy.listen", false);
    check(op.threads != np.threads, "proxy.threads", false);
    check(op.reuse_port != np.reuse_port, "proxy.reuse_port", false);
    check(
        op.dns_refresh != np.dns_refresh,
        "proxy.dns_refresh_seconds",
        false,
    );
    check(
        op.shutdown_grace != np.shutdown_grace,
        "proxy.shutdown_grace_seconds",
        false,
    );
    check(
        op.allowed_client_cidrs != np.allowed_client_cidrs,
        "proxy.allowed_client_cidrs",
        true,
    );
    check(
        op.allowed_path_prefixes != np.allowed_path_prefixes,
        "proxy.allowed_path_prefixes",
        true,
    );
    check(
        op.replay_body_limit_bytes != np.replay_body_limit_bytes,
        "proxy.replay_body_limit_bytes",
        true,
    );
    check(
        op.token_wait_timeout != np.token_wait_timeout,
        "proxy.token_wait_timeout_ms",
        true,
    );
    check(
        op.refresh_wait_timeout != np.refresh_wait_timeout,
        "proxy.refresh_wait_timeout_ms",
        true,
    );
    check(
        op.upstream_connect_timeout != np.upstream_connect_timeout,
        "proxy.upstream_connect_timeout_ms",
        true,
    );
    check(
        op.upstream_read_timeout != np.upstream_read_timeout,
        "proxy.upstream_read_timeout_ms",
        true,
    );
    check(old.admin.listen != new.admin.listen, "admin.listen", false);
    let (og, ng) = (&old.genesys, &new.genesys);
    check(og.token_url != ng.token_url, "genesys.login_url", false);
    check(og.api != ng.api, "genesys.api_url", false);
    check(
        og.watch_secret_files != ng.watch_secret_files,
        "genesys.watch_secret_files",
        false,
    );
    check(og.ca_certs != ng.ca_certs, "genesys.ca_file", false);
    d.credentials = og.client_id != ng.client_id || og.client_secret != ng.client_secret;
    d.previous_secret = og.previous_client_secret != ng.previous_client_secret;
    let (ot, nt) = (&old.token, &new.token);
    check(
        ot.refresh_before_expiry != nt.refresh_before_expiry,
        "token.refresh_before_expiry_seconds",
        true,
    );
    check(ot.validation != nt.validation, "token.validation", true);
    check(
        ot.max_token_requests_per_minute != nt.max_token_requests_per_minute,
        "token.max_token_requests_per_minute",
        true,
    );
    check(
        ot.backoff_initial != nt.backoff_initial,
        "token.backoff_initial_ms",
        true,
    );
    check(
        ot.backoff_max != nt.backoff_max,
        "token.backoff_max_ms",
        true,
    );
    check(
        ot.rotation_retry_window != nt.rotation_retry_window,
        "token.rotation_retry_window_seconds",
        true,
    );
    check(
        ot.request_timeout != nt.request_timeout,
        "token.request_timeout_ms",
        false,
    );
    check(
        ot.connect_timeout != nt.connect_timeout,
        "token.connect_timeout_ms",
        false,
    );
    check(old.audit != new.audit, "audit.path", false);
    check(old.log.format != new.log.format, "log.format", false);
    check(old.log.level != new.log.level, "log.level", true);
    check(
        old.log.access_log != new.log.access_log,
        "log.access_log",
        true,
    );
    check(old.anomaly != new.anomaly, "anomaly", true);
    d
}

/// How long a reload waits for the refresher to try the new secret.
const ROTATION_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Reloader {
    path: PathBuf,
    current: tokio::sync::Mutex<Config>,
    proxy: Arc<ProxyState>,
    token_settings: Arc<ArcSwap<TokenSettings>>,
    refresher: mpsc::Sender<Command>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    info: ArcSwap<ConfigInfo>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        config: Config,
        proxy: Arc<ProxyState>,
        token_settings: Arc<ArcSwap<TokenSettings>>,
        refresher: mpsc::Sender<Command>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reloader {
            path,
            current: tokio::sync::Mutex::new(config),
            proxy,
            token_settings,
            refresher,
            audit,
            metrics,
            info: ArcSwap::from_pointee(ConfigInfo {
                loaded_at: SystemTime::now(),
                generation: 1,
            }),
        }
    }

    pub fn info(&self) -> ConfigInfo {
        **self.info.load()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Secret files to watch (their directories are watched, not the files).
    pub async fn watched_files(&self) -> Vec<PathBuf> {
        let c = self.current.lock().await;
        if !c.genesys.watch_secret_files {
            return Vec::new();
        }
        [
            Some(&c.genesys.client_secret_source),
            c.genesys.previous_client_secret_source.as_ref(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|s| match s {
            SecretSource::File(p) => Some(p.clone()),
            SecretSource::Env(_) => None,
        })
        .collect()
    }

    /// Runs one reload. Reloads are serialised: a second trigger waits for the first.
    pub async fn reload(&self, trigger: &str) -> ReloadOutcome {
        let mut current = self.current.lock().await;
        let new = match config::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                let reason = e.to_string();
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["rejected"])
                    .inc();
                self.audit.record(
                    "CONFIG_RELOAD_REJECTED",
                    json!({"trigger": trigger, "reason": reason}),
                    None,
                );
                tracing::error!(trigger, %reason, "configuration reload rejected; nothing changed");
                return ReloadOutcome {
                    status: 400,
                    body: json!({"outcome": "rejected", "reason": reason}),
                };
            }
        };
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let d = diff(&current, &new);
        if d.is_empty() {
            self.metrics
                .config_reloads_total
                .with_label_values(&["unchanged"])
                .inc();
            return ReloadOutcome {
                status: 200,
                body: json!({"outcome": "unchanged"}),
            };
        }

        // In-place settings.
        let mut proxy = new.proxy.clone();
        proxy.listen = current.proxy.listen;
        proxy.threads = current.proxy.threads;
        proxy.reuse_port = current.proxy.reuse_port;
        proxy.dns_refresh = current.proxy.dns_refresh;
        proxy.shutdown_grace = current.proxy.shutdown_grace;
        self.proxy.settings.store(Arc::new(proxy.clone()));
        let mut token = new.token.clone();
        token.request_timeout = current.token.request_timeout;
        token.connect_timeout = current.token.connect_timeout;
        self.token_settings.store(Arc::new(token.clone()));
        if current.log.level != new.log.level {
            if let Err(e) = crate::logging::set_level(&new.log.level) {
                tracing::warn!(error = %e, "log level not changed");
            }
        }
        self.proxy
            .access_log
            .store(new.log.access_log, std::sync::atomic::Ordering::Relaxed);
        self.proxy.anomaly.set_thresholds(new.anomaly.clone());
        let mut next = current.clone();
        next.proxy = proxy;
        next.token = token;
        next.log.level = new.log.level.clone();
        next.log.access_log = new.log.access_log;
        next.anomaly = new.anomaly.clone();

        // Secrets: the refresher validates before it swaps.
        let mut rotation = Value::Null;
        let mut status = 200;
        if d.previous_secret && !d.credentials {
            let _ = self
                .refresher
                .send(Command::SetPrevious(
                    new.genesys.previous_client_secret.clone(),
                ))
                .await;
            next.genesys.previous_client_secret = new.genesys.previous_client_secret.clone();
            next.genesys.previous_client_secret_source =
                new.genesys.previous_client_secret_source.clone();
        }
        if d.credentials {
            let credentials = Credentials {
                client_id: new.genesys.client_id.clone(),
                secret: new.genesys.client_secret.clone(),
                previous: new.genesys.previous_client_secret.clone(),
            };
            let (tx, rx) = oneshot::channel();
            let answer = match self
                .refresher
                .send(Command::Rotate {
                    credentials,
                    reply: tx,
                })
                .await
            {
                Ok(()) => tokio::time::timeout(ROTATION_ANSWER_TIMEOUT, rx)
                    .await
                    .map_err(|_| {
                        "no answer from the refresher in time; it keeps trying".to_string()
                    })
                    .and_then(|r| r.map_err(|_| "the refresher stopped".to_string()))
                    .and_then(|r| r),
                Err(_) => Err("the refresher stopped".to_string()),
            };
            match answer {
                Ok(generation) => {
                    next.genesys.client_id = new.genesys.client_id.clone();
                    next.genesys.client_secret = new.genesys.client_secret.clone();
                    next.genesys.client_secret_source = new.genesys.client_secret_source.clone();
                    next.genesys.previous_client_secret =
                        new.genesys.previous_client_secret.clone();
                    next.genesys.previous_client_secret_source =
                        new.genesys.previous_client_secret_source.clone();
                    rotation = json!({"outcome": "rotated", "generation": generation, "new_secret": new.genesys.client_secret.fingerprint()});
                }
                Err(reason) => {
                    status = 502;
                    rotation = json!({
                        "outcome": "failed",
                        "reason": reason,
                        "new_secret": new.genesys.client_secret.fingerprint(),
                        "note": "the current secret and token keep serving; the new secret is retried for token.rotation_retry_window_seconds",
                    });
                }
            }
        }
        *current = next;
        let generation = self.info().generation + 1;
        self.info.store(Arc::new(ConfigInfo {
            loaded_at: SystemTime::now(),
            generation,
        }));

        let outcome = if status != 200 {
            "rotation_failed"
        } else if d.restart_required.is_empty() {
            "applied"
        } else {
            "partially_applied"
        };
        self.metrics
            .config_reloads_total
            .with_label_values(&[outcome])
            .inc();
        let body = json!({
            "outcome": outcome,
            "trigger": trigger,
            "config_generation": generation,
            "applied": d.applied,
            "restart_required": d.restart_required,
            "rotation": rotation,
        });
        self.audit.record("CONFIG_RELOADED", body.clone(), None);
        tracing::info!(trigger, outcome, applied = ?d.applied, restart_required = ?d.restart_required, "configuration reloaded");
        ReloadOutcome { status, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_proxy: &str, secret: &str) -> Config {
        let dir = std::env::temp_dir().join(format!("gap-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A file of its own per call: tests run in parallel.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = dir.join(format!("s-{n}"));
        std::fs::write(&f, secret).unwrap();
        let text = format!(
            "[proxy]\n{extra_proxy}\n[genesys]\nclient_id = \"a\"\nclient_secret = {{ file = {:?} }}\n",
            f.display().to_string()
        );
        config::parse(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn identical_configs_do_not_differ() {
        assert!(diff(&config("", "s"), &config("", "s")).is_empty());
    }

    #[test]
    fn in_place_and_restart_keys_are_told_apart() {
        let d = diff(
            &config("", "s"),
            &config(
                "listen = \"127.0.0.1:1234\"\nallowed_path_prefixes = [\"/api/v2/users\"]",
                "s",
            ),
        );
        assert_eq!(d.applied, vec!["proxy.allowed_path_prefixes"]);
        assert_eq!(d.restart_required, vec!["proxy.listen"]);
        assert!(!d.credentials);
    }

    #[test]
    fn a_new_secret_is_a_credentials_change() {
        let d = diff(&config("", "s"), &config("", "t"));
        assert!(d.credentials && d.applied.is_empty() && d.restart_required.is_empty());
    }
}
