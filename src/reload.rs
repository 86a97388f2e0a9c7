//! Configuration reload: every trigger (SIGHUP, `POST /reload`, a secret file changing) goes
//! through [`Reloader::reload`]: read → parse → validate → compare → apply.
//!
//! An invalid file changes nothing. What a change does follows from where its key lives in the
//! model ([`crate::config::Diff`]): [`Live`] settings are swapped in as one new snapshot;
//! [`crate::config::Restart`] settings are reported as "restart required" and never applied
//! (the running config keeps its own); a new client secret is handed to the refresher, which
//! mints and validates with it before anything is swapped.
//!
//! One change, one reload: the secret-file watcher reloads only when the bytes (or modes) of
//! the config and secret files differ from the last reload's ([`Reloader::reload_if_changed`]);
//! a secret the refresher was already asked for is not asked for again (it retries on its own
//! schedule); a file's warnings are logged when it changes, not on every reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{self, Config, Credential, CredentialName, Diff, Keyed, Live};
use crate::metrics::Metrics;
use crate::secret::SecretSource;
use crate::token::refresher::{Command, Credentials, RotationResult};

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Sighup,
    AdminApi,
    SecretFileChanged,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Sighup => "sighup",
            Trigger::AdminApi => "admin_api",
            Trigger::SecretFileChanged => "secret_file_changed",
        }
    }

    /// An operator asked (signal, API): a secret the refresher gave up on is tried again. A
    /// file event only reports a change of bytes.
    fn explicit(self) -> bool {
        self != Trigger::SecretFileChanged
    }
}

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
    /// The new secret is not tried yet (the token-request cap, or a working token is minted
    /// first); the current one keeps serving.
    RotationPending,
}

impl ReloadOutcome {
    pub const ALL: [ReloadOutcome; 6] = [
        ReloadOutcome::Applied,
        ReloadOutcome::PartiallyApplied,
        ReloadOutcome::Unchanged,
        ReloadOutcome::Rejected,
        ReloadOutcome::RotationFailed,
        ReloadOutcome::RotationPending,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::PartiallyApplied => "partially_applied",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Rejected => "rejected",
            ReloadOutcome::RotationFailed => "rotation_failed",
            ReloadOutcome::RotationPending => "rotation_pending",
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

/// The process-wide parts a reload swaps in place.
pub struct Swaps {
    /// `[apps]`/`[[app]]`.
    pub apps: Arc<crate::apps::Gatekeeper>,
    /// `[proxy.tls]`, when the listeners speak TLS.
    pub tls: Option<Arc<crate::worker::tls::ServerTls>>,
}

/// What a reload can change in one running credential.
pub struct ReloadTarget {
    /// `default` for the top-level credential, else its `[[credential]]` name.
    pub name: CredentialName,
    pub live: Arc<ArcSwap<Live>>,
    pub refresher: mpsc::Sender<Command>,
}

pub struct Reloader {
    path: PathBuf,
    current: tokio::sync::Mutex<Config>,
    /// The top-level credential first, then each `[[credential]]` in file order.
    targets: Vec<ReloadTarget>,
    /// What a reload swaps besides the credentials: `[apps]`, `[proxy.tls]`.
    swaps: Swaps,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    info: ArcSwap<ConfigInfo>,
    /// The config and secret files as the last reload read them (`None` before the first
    /// reload: the first watcher event always reloads, and a reload of unchanged files is a
    /// no-op).
    last_inputs: std::sync::Mutex<Option<[u8; 32]>>,
    /// The warnings the last reload logged: logged again only when something changed.
    last_warnings: std::sync::Mutex<Vec<String>>,
}

/// What one credential's part of a reload changed (keys as the user wrote them).
struct Part {
    name: CredentialName,
    applied: Vec<String>,
    restart_required: Vec<String>,
    /// Something besides a rotation answer changed.
    changed: bool,
    rotation: Option<Rotation>,
    new_secret: String,
}

/// A rotation asked of a refresher: its answer, or the channel it will come on.
enum Rotation {
    Asked(oneshot::Receiver<RotationResult>),
    Answered(RotationResult),
}

impl Rotation {
    /// The refresher's answer, waited for at most [`ROTATION_ANSWER_TIMEOUT`].
    async fn answer(self) -> RotationResult {
        let answer = match self {
            Rotation::Answered(result) => return result,
            Rotation::Asked(answer) => answer,
        };
        match tokio::time::timeout(ROTATION_ANSWER_TIMEOUT, answer).await {
            Err(_) => RotationResult::Pending {
                why: crate::token::refresher::PendingWhy::Backoff,
                next_attempt: SystemTime::now(),
                retry_until: SystemTime::now() + ROTATION_ANSWER_TIMEOUT,
            },
            Ok(Err(_)) => refresher_stopped(),
            Ok(Ok(result)) => result,
        }
    }
}

fn refresher_stopped() -> RotationResult {
    RotationResult::Failed {
        error: "the refresher stopped".into(),
        next_attempt: SystemTime::now(),
        retry_until: SystemTime::now(),
    }
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        config: Config,
        targets: Vec<ReloadTarget>,
        swaps: Swaps,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Every outcome starts at 0 so rate() and alerts work before the first reload.
        for outcome in ReloadOutcome::ALL {
            metrics
                .config_reloads_total
                .with_label_values(&[outcome.as_str()]);
        }
        let warnings = config.warnings.clone();
        Reloader {
            path,
            current: tokio::sync::Mutex::new(config),
            targets,
            swaps,
            audit,
            metrics,
            info: ArcSwap::from_pointee(ConfigInfo {
                loaded_at: SystemTime::now(),
                generation: 1,
            }),
            last_inputs: std::sync::Mutex::new(None),
            // Start-up logged these already.
            last_warnings: std::sync::Mutex::new(warnings),
        }
    }

    /// A digest of the config file and every secret file: bytes, mode and file identity, or
    /// the read error.
    async fn inputs_digest(&self) -> [u8; 32] {
        let mut files = vec![self.path.clone()];
        files.extend(self.watched_files().await);
        tokio::task::spawn_blocking(move || digest_files(&files))
            .await
            .unwrap_or([0; 32])
    }

    /// The watcher's reload: none at all when the files are byte-identical to what the last
    /// reload read (the watcher may see events that change nothing: a `touch`, a re-mount, a
    /// Kubernetes `..data` swap to the same content).
    pub async fn reload_if_changed(&self, trigger: Trigger) -> Option<ReloadReport> {
        let digest = self.inputs_digest().await;
        if *crate::sync::lock(&self.last_inputs) == Some(digest) {
            tracing::debug!(
                trigger = trigger.as_str(),
                "config and secret files unchanged; no reload"
            );
            return None;
        }
        Some(self.reload(trigger).await)
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
        let mut files: Vec<PathBuf> = Vec::new();
        if c.top().restart.genesys.watch_secret_files {
            for p in c.apps.secret_files().cloned().chain(c.tls.files()) {
                if !files.contains(&p) {
                    files.push(p);
                }
            }
        }
        for c in c
            .credentials
            .iter()
            .filter(|c| c.restart.genesys.watch_secret_files)
        {
            let sources = [
                Some(&c.secrets.client_secret_source),
                c.secrets.previous_client_secret_source.as_ref(),
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

    /// Runs one reload. Reloads are serialised up to the rotations they ask for: a second
    /// trigger waits until the first has read the file and applied it, not for the
    /// refreshers' answers, which every credential gives at once. The answer comes after the
    /// reload's audit events are written.
    pub async fn reload(&self, trigger: Trigger) -> ReloadReport {
        let digest = self.inputs_digest().await;
        *crate::sync::lock(&self.last_inputs) = Some(digest);
        let explicit = trigger.explicit();
        let trigger = trigger.as_str();
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
        let mut restart_required: Vec<String> = current
            .process
            .diff(&new.process)
            .into_iter()
            .map(String::from)
            .collect();
        // Keys of the process-wide parts swapped in place ([apps], [proxy.tls]).
        let mut swapped = current.apps.diff(&new.apps);
        swapped.dedup();
        if !swapped.is_empty() {
            self.swaps.apps.replace(&new.apps);
            current.apps = new.apps.clone();
        }
        match self.apply_tls(&mut current, &new) {
            TlsChange::None => {}
            TlsChange::Applied => swapped.push("proxy.tls"),
            TlsChange::RestartRequired => restart_required.push("proxy.tls".to_string()),
        }
        let parts = self.apply_all(&mut current, &new, explicit).await;
        drop(current);
        let answers = futures_util::future::join_all(parts.into_iter().map(|mut p| async {
            let rotation = match p.rotation.take() {
                Some(r) => Some(r.answer().await).filter(|r| *r != RotationResult::Current),
                None => None,
            };
            (p, rotation)
        }))
        .await;
        let changed = !restart_required.is_empty()
            || !swapped.is_empty()
            || answers.iter().any(|(p, r)| p.changed || r.is_some());
        self.log_warnings(&new.warnings, changed);
        if !changed {
            tracing::debug!(trigger, "reload: nothing changed");
            return self.finish(ReloadOutcome::Unchanged, json!({"outcome": "unchanged"}));
        }
        let now = SystemTime::now();
        let before = self.info.rcu(|i| ConfigInfo {
            loaded_at: now,
            generation: i.generation + 1,
        });
        let generation = before.generation + 1;
        let (mut applied, mut rotations) = (Vec::<String>::new(), json!({}));
        applied.extend(swapped.iter().map(|k| k.to_string()));
        let mut rotation = Value::Null;
        let (mut failed, mut pending) = (false, false);
        for (part, result) in answers {
            applied.extend(part.applied);
            restart_required.extend(part.restart_required);
            let Some(result) = result else {
                continue;
            };
            failed |= matches!(
                result,
                RotationResult::Failed { .. } | RotationResult::Abandoned
            );
            pending |= matches!(result, RotationResult::Pending { .. });
            let shown = rotation_json(&result, &part.new_secret);
            if part.name.is_top() {
                rotation = shown;
            } else {
                rotations[part.name.as_str()] = shown;
            }
        }
        let outcome = if failed {
            ReloadOutcome::RotationFailed
        } else if pending {
            ReloadOutcome::RotationPending
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

    /// Applies `new` credential by credential, each present before and after (adding or
    /// removing one is the restart-only key `credential`): live settings swapped in, new
    /// secrets handed to the refreshers (answers awaited by the caller, after the lock).
    async fn apply_all(&self, current: &mut Config, new: &Config, explicit: bool) -> Vec<Part> {
        // A credential's keys are reported under its name, except the top-level keys it
        // inherits (already reported once).
        let top = Diff::between(current.top(), new.top());
        let top_keys: Vec<&str> = top
            .applied
            .iter()
            .chain(&top.restart_required)
            .copied()
            .collect();
        let mut parts = Vec::new();
        for target in &self.targets {
            let cur = current
                .credentials
                .iter_mut()
                .find(|c| c.name == target.name);
            let (Some(cur), Some(next)) = (cur, new.credential(&target.name)) else {
                continue;
            };
            let diff = Diff::between(cur, next);
            // An operator's reload also asks the refresher about secrets it may have given
            // up on; the answer is "current" when there is nothing to do.
            if diff.is_empty() && !explicit {
                continue;
            }
            let is_top = target.name.is_top();
            let named = |keys: &[&'static str]| -> Vec<String> {
                keys.iter()
                    .filter(|k| is_top || !top_keys.contains(k))
                    .map(|k| target.name.key(k))
                    .collect()
            };
            let (applied, restart_required) = (named(&diff.applied), named(&diff.restart_required));
            self.apply_live(target, &cur.live, &next.live);
            cur.live = next.live.clone();
            let new_secret = next.secrets.client_secret.fingerprint();
            let rotation = self
                .apply_credentials(target, cur, next, &diff, explicit)
                .await;
            parts.push(Part {
                name: target.name.clone(),
                applied,
                restart_required,
                changed: !diff.is_empty(),
                rotation,
                new_secret,
            });
        }
        parts
    }

    /// New certificate material goes to the listeners' acceptor for new handshakes; turning
    /// TLS on or off needs a restart (reported, not applied).
    fn apply_tls(&self, current: &mut Config, new: &Config) -> TlsChange {
        if current.tls == new.tls {
            return TlsChange::None;
        }
        match (&self.swaps.tls, &new.tls.listener) {
            (Some(tls), Some(material)) => match tls.replace(material) {
                Ok(()) => {
                    current.tls = new.tls.clone();
                    tracing::info!(cert_file = %material.cert_file.display(), "proxy.tls: new certificate for new connections");
                    TlsChange::Applied
                }
                // Checked when the config was built; kept for a pair rustls still refuses.
                Err(e) => {
                    tracing::error!(error = %e, "proxy.tls: the new certificate is refused; the old one keeps serving");
                    TlsChange::None
                }
            },
            _ => TlsChange::RestartRequired,
        }
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
    fn apply_live(&self, target: &ReloadTarget, old: &Live, new: &Live) {
        if old == new {
            return;
        }
        target.live.store(Arc::new(new.clone()));
        if target.name.is_top() && old.log.level != new.log.level {
            if let Err(e) = crate::logging::set_level(&new.log.level) {
                tracing::warn!(error = %e, "log level not changed");
            }
        }
    }

    /// Logs the warnings of the files just read: all of them when the reload changed
    /// something, else only the ones the last reload did not log (a mode warning is not
    /// repeated on every reload of an unchanged file).
    fn log_warnings(&self, warnings: &[String], changed: bool) {
        let mut last = crate::sync::lock(&self.last_warnings);
        for w in warnings {
            if changed || !last.contains(w) {
                tracing::warn!("{w}");
            } else {
                tracing::debug!("{w}");
            }
        }
        *last = warnings.to_vec();
    }

    /// Hands changed secrets to the credential's refresher; returns the rotation asked for.
    /// The running config records the secret as requested whatever the answer: the
    /// refresher owns the retries, so a later reload of the same file asks nothing again.
    async fn apply_credentials(
        &self,
        target: &ReloadTarget,
        current: &mut Credential,
        new: &Credential,
        diff: &Diff,
        explicit: bool,
    ) -> Option<Rotation> {
        let (cur, next) = (&mut current.secrets, &new.secrets);
        if !diff.credentials && !explicit {
            if diff.previous_secret {
                let previous = next.previous_client_secret.clone();
                let _ = target.refresher.send(Command::SetPrevious(previous)).await;
                cur.previous_client_secret = next.previous_client_secret.clone();
                cur.previous_client_secret_source = next.previous_client_secret_source.clone();
            }
            return None;
        }
        let credentials = Credentials {
            client_id: next.client_id.clone(),
            secret: next.client_secret.clone(),
            previous: next.previous_client_secret.clone(),
        };
        *cur = next.clone();
        let (reply, answer) = oneshot::channel();
        let command = Command::Rotate { credentials, reply };
        Some(match target.refresher.send(command).await {
            Err(_) => Rotation::Answered(refresher_stopped()),
            Ok(()) => Rotation::Asked(answer),
        })
    }
}

/// What a reload did with `[proxy.tls]`.
enum TlsChange {
    None,
    Applied,
    RestartRequired,
}

/// A rotation's state as the reload answer and the audit line show it.
fn rotation_json(result: &RotationResult, new_secret: &str) -> Value {
    let at = |t: &SystemTime| humantime::format_rfc3339_seconds(*t).to_string();
    const KEEPS: &str = "the current secret and token keep serving; the new secret is retried on its own schedule until retry_until";
    match result {
        RotationResult::Current => json!({"outcome": "current", "new_secret": new_secret}),
        RotationResult::Rotated { generation } => {
            json!({"outcome": "rotated", "generation": generation, "new_secret": new_secret})
        }
        RotationResult::Failed {
            error,
            next_attempt,
            retry_until,
        } => json!({
            "outcome": "failed",
            "reason": error,
            "new_secret": new_secret,
            "next_attempt_at": at(next_attempt),
            "retry_until": at(retry_until),
            "note": KEEPS,
        }),
        RotationResult::Pending {
            why,
            next_attempt,
            retry_until,
        } => json!({
            "outcome": "pending",
            "reason": why.as_str(),
            "new_secret": new_secret,
            "next_attempt_at": at(next_attempt),
            "retry_until": at(retry_until),
            "note": KEEPS,
        }),
        RotationResult::Abandoned => json!({
            "outcome": "failed",
            "reason": "the retry window closed before the new secret validated",
            "new_secret": new_secret,
        }),
        RotationResult::Superseded => json!({"outcome": "superseded", "new_secret": new_secret}),
    }
}

/// SHA-256 over each file's path, mode and bytes, or its read error.
fn digest_files(files: &[PathBuf]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update([0]);
        #[cfg(unix)]
        if let Ok(m) = std::fs::metadata(f) {
            use std::os::unix::fs::MetadataExt;
            h.update(m.mode().to_le_bytes());
        }
        match crate::files::read_capped(f, crate::files::CONFIG_MAX_BYTES) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) => h.update(format!("error: {e}")),
        }
        h.update([0xff]);
    }
    h.finalize().into()
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
                "rotation_failed",
                "rotation_pending"
            ]
        );
    }
}
