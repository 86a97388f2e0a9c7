//! Configuration reload: every trigger (SIGHUP, `POST /reload`, a secret file changing) goes
//! through [`Reloader::reload`]: read → parse → validate → compare → apply.
//!
//! An invalid file changes nothing. What a change does follows from where its key lives in the
//! model ([`crate::config::Diff`]): [`Live`] settings are swapped in as one new snapshot;
//! [`crate::config::Restart`] settings are reported as "restart required" and never applied
//! (the running config keeps its own); a new client secret is handed to the refresher, which
//! mints and validates with it before anything is swapped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{self, Config, Diff, Live};
use crate::metrics::Metrics;
use crate::token::refresher::{Command, Credentials};
use crate::token::secret::SecretSource;

/// When and how often the configuration was (re)loaded, for `/status`.
#[derive(Debug, Clone, Copy)]
pub struct ConfigInfo {
    pub loaded_at: SystemTime,
    pub generation: u64,
}

/// How a reload ended: the `outcome` in its answer and the `config_reloads_total` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied,
    /// Live settings applied; some changed keys need a restart.
    PartiallyApplied,
    Unchanged,
    /// The file is invalid; nothing changed.
    Rejected,
    /// The new secret did not validate; the current one keeps serving and the new one is
    /// retried.
    RotationFailed,
}

impl ReloadOutcome {
    pub const ALL: [ReloadOutcome; 5] = [
        ReloadOutcome::Applied,
        ReloadOutcome::PartiallyApplied,
        ReloadOutcome::Unchanged,
        ReloadOutcome::Rejected,
        ReloadOutcome::RotationFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::PartiallyApplied => "partially_applied",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Rejected => "rejected",
            ReloadOutcome::RotationFailed => "rotation_failed",
        }
    }
}

/// The answer to one reload: its outcome and a JSON body (`POST /reload` returns both).
#[derive(Debug, Clone)]
pub struct ReloadReport {
    pub outcome: ReloadOutcome,
    pub body: Value,
}

/// How long a reload waits for the refresher to try the new secret.
const ROTATION_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// What a reload can change in one running credential.
pub struct ReloadTarget {
    /// `default` for the top-level credential, else its `[[credential]]` name.
    pub name: String,
    pub live: Arc<ArcSwap<Live>>,
    pub refresher: mpsc::Sender<Command>,
}

pub struct Reloader {
    path: PathBuf,
    current: tokio::sync::Mutex<Config>,
    /// The top-level credential first, then each `[[credential]]` in file order.
    targets: Vec<ReloadTarget>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    info: ArcSwap<ConfigInfo>,
}

/// What one credential's part of a reload changed.
struct Applied {
    applied: Vec<String>,
    restart_required: Vec<String>,
    rotation: Value,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        config: Config,
        targets: Vec<ReloadTarget>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Every outcome starts at 0 so rate() and alerts work before the first reload.
        for outcome in ReloadOutcome::ALL {
            metrics
                .config_reloads_total
                .with_label_values(&[outcome.as_str()]);
        }
        Reloader {
            path,
            current: tokio::sync::Mutex::new(config),
            targets,
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

    /// Secret files to watch (their directories are watched, not the files), of every
    /// credential that asks for it.
    pub async fn watched_files(&self) -> Vec<PathBuf> {
        let c = self.current.lock().await;
        let all = std::iter::once(&*c).chain(c.extra.iter().map(|e| &e.config));
        let mut files = Vec::new();
        for c in all.filter(|c| c.restart.genesys.watch_secret_files) {
            let sources = [
                Some(&c.credentials.client_secret_source),
                c.credentials.previous_client_secret_source.as_ref(),
            ];
            for source in sources.into_iter().flatten() {
                if let SecretSource::File(p) = source {
                    if !files.contains(p) {
                        files.push(p.clone());
                    }
                }
            }
        }
        files
    }

    /// Runs one reload. Reloads are serialised: a second trigger waits for the first. The
    /// answer comes after the reload's audit events are written.
    pub async fn reload(&self, trigger: &str) -> ReloadReport {
        let mut current = self.current.lock().await;
        // File I/O (config, secrets, CA bundle) off the async runtime: a slow disk must not
        // stall the admin listener.
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
        let new = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return self.rejected(trigger, e.to_string()).await,
            Err(e) => {
                return self
                    .rejected(trigger, format!("config reader failed: {e}"))
                    .await
            }
        };
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let parts = self.apply_all(&mut current, &new).await;
        if parts.iter().all(|(_, p)| p.is_none()) {
            return self.finish(ReloadOutcome::Unchanged, json!({"outcome": "unchanged"}));
        }
        let generation = self.info().generation + 1;
        self.info.store(Arc::new(ConfigInfo {
            loaded_at: SystemTime::now(),
            generation,
        }));
        let (mut applied, mut restart_required, mut rotations) = (vec![], vec![], json!({}));
        let mut rotation = Value::Null;
        for (name, part) in parts.into_iter() {
            let Some(part) = part else { continue };
            applied.extend(part.applied);
            restart_required.extend(part.restart_required);
            if name == config::DEFAULT_CREDENTIAL {
                rotation = part.rotation;
            } else if !part.rotation.is_null() {
                rotations[name] = part.rotation;
            }
        }
        let failed = |r: &Value| r.get("outcome") == Some(&json!("failed"));
        let outcome = if failed(&rotation)
            || rotations
                .as_object()
                .is_some_and(|m| m.values().any(failed))
        {
            ReloadOutcome::RotationFailed
        } else if restart_required.is_empty() {
            ReloadOutcome::Applied
        } else {
            ReloadOutcome::PartiallyApplied
        };
        let mut body = json!({
            "outcome": outcome.as_str(),
            "trigger": trigger,
            "config_generation": generation,
            "applied": applied,
            "restart_required": restart_required,
            "rotation": rotation,
        });
        if rotations.as_object().is_some_and(|m| !m.is_empty()) {
            body["credential_rotations"] = rotations;
        }
        self.audit
            .record(AuditEvent::ConfigReloaded, body.clone(), None);
        self.audit.flush().await;
        tracing::info!(trigger, outcome = outcome.as_str(), applied = ?applied, restart_required = ?restart_required, "configuration reloaded");
        self.finish(outcome, body)
    }

    /// Applies `new` credential by credential: the top level, then each `[[credential]]`
    /// present before and after (adding or removing one is the restart-only key
    /// `credential`). `None` for a credential nothing changed in.
    async fn apply_all(
        &self,
        current: &mut Config,
        new: &Config,
    ) -> Vec<(String, Option<Applied>)> {
        let top = Diff::between(current, new);
        let mut parts = Vec::new();
        let top_keys: Vec<&str> = top
            .applied
            .iter()
            .chain(&top.restart_required)
            .copied()
            .collect();
        for target in &self.targets {
            let is_top = target.name == config::DEFAULT_CREDENTIAL;
            let (cur, next) = if is_top {
                (&mut *current, new)
            } else {
                let cur = current.extra.iter_mut().find(|e| e.name == target.name);
                let next = new.extra.iter().find(|e| e.name == target.name);
                match (cur, next) {
                    (Some(c), Some(n)) => (&mut c.config, &n.config),
                    _ => continue,
                }
            };
            let diff = Diff::between(cur, next);
            if diff.is_empty() {
                parts.push((target.name.clone(), None));
                continue;
            }
            // A credential's keys are reported under its name, except the top-level keys it
            // inherits (already reported once).
            let named = |keys: &[&'static str]| -> Vec<String> {
                keys.iter()
                    .filter(|k| is_top || !top_keys.contains(k))
                    .map(|k| {
                        if is_top {
                            k.to_string()
                        } else {
                            config::credential::key_of(&target.name, k)
                        }
                    })
                    .collect()
            };
            let (applied, restart_required) = (named(&diff.applied), named(&diff.restart_required));
            self.apply_live(target, &cur.live, &next.live, is_top);
            cur.live = next.live.clone();
            let rotation = self.apply_credentials(target, cur, next, &diff).await;
            parts.push((
                target.name.clone(),
                Some(Applied {
                    applied,
                    restart_required,
                    rotation,
                }),
            ));
        }
        // The set of credentials itself (the restart-only key `credential`) lives in the top
        // level's config: keep the running one.
        parts
    }

    async fn rejected(&self, trigger: &str, reason: String) -> ReloadReport {
        self.audit.record(
            AuditEvent::ConfigReloadRejected,
            json!({"trigger": trigger, "reason": reason}),
            None,
        );
        self.audit.flush().await;
        tracing::error!(trigger, %reason, "configuration reload rejected; nothing changed");
        self.finish(
            ReloadOutcome::Rejected,
            json!({"outcome": "rejected", "reason": reason}),
        )
    }

    fn finish(&self, outcome: ReloadOutcome, body: Value) -> ReloadReport {
        self.metrics
            .config_reloads_total
            .with_label_values(&[outcome.as_str()])
            .inc();
        ReloadReport { outcome, body }
    }

    /// Swaps in the new live snapshot; the log level is the one live setting that must be
    /// pushed (into the tracing filter) rather than read, and it is process-wide: the top
    /// level's.
    fn apply_live(&self, target: &ReloadTarget, old: &Live, new: &Live, is_top: bool) {
        if old == new {
            return;
        }
        target.live.store(Arc::new(new.clone()));
        if is_top && old.log.level != new.log.level {
            if let Err(e) = crate::logging::set_level(&new.log.level) {
                tracing::warn!(error = %e, "log level not changed");
            }
        }
    }

    /// Hands changed secrets to the credential's refresher; returns what to report under
    /// `rotation`.
    async fn apply_credentials(
        &self,
        target: &ReloadTarget,
        current: &mut Config,
        new: &Config,
        diff: &Diff,
    ) -> Value {
        let (cur, next) = (&mut current.credentials, &new.credentials);
        if !diff.credentials {
            if diff.previous_secret {
                let previous = next.previous_client_secret.clone();
                let _ = target.refresher.send(Command::SetPrevious(previous)).await;
                cur.previous_client_secret = next.previous_client_secret.clone();
                cur.previous_client_secret_source = next.previous_client_secret_source.clone();
            }
            return Value::Null;
        }
        let new_secret = next.client_secret.fingerprint();
        match self.rotate(target, next).await {
            Ok(generation) => {
                *cur = next.clone();
                json!({"outcome": "rotated", "generation": generation, "new_secret": new_secret})
            }
            Err(reason) => json!({
                "outcome": "failed",
                "reason": reason,
                "new_secret": new_secret,
                "note": "the current secret and token keep serving; the new secret is retried for token.rotation_retry_window_seconds",
            }),
        }
    }

    /// Asks the refresher to rotate and waits (bounded) for its answer.
    async fn rotate(
        &self,
        target: &ReloadTarget,
        next: &config::CredentialSettings,
    ) -> Result<u64, String> {
        let credentials = Credentials {
            client_id: next.client_id.clone(),
            secret: next.client_secret.clone(),
            previous: next.previous_client_secret.clone(),
        };
        let (reply, answer) = oneshot::channel();
        let command = Command::Rotate { credentials, reply };
        if target.refresher.send(command).await.is_err() {
            return Err("the refresher stopped".into());
        }
        match tokio::time::timeout(ROTATION_ANSWER_TIMEOUT, answer).await {
            Err(_) => Err("no answer from the refresher in time; it keeps trying".into()),
            Ok(Err(_)) => Err("the refresher stopped".into()),
            Ok(Ok(result)) => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_are_the_metric_labels() {
        let names: Vec<_> = ReloadOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names,
            [
                "applied",
                "partially_applied",
                "unchanged",
                "rejected",
                "rotation_failed"
            ]
        );
    }
}
