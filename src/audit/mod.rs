//! The tamper-evident audit log: one JSON object per line, each carrying the SHA-256 of the
//! previous line (`prev`) and of itself (`hash`), appended, flushed and synced per event.
//!
//! A line is written as `{"ts":…,"seq":…,"event":…,"client_id":…,"details":…[,"token":…],"prev":…,"hash":…}`.
//! `hash` is the hex SHA-256 of the line up to and excluding `,"hash":…` with a closing `}`
//! appended, so the verifier needs no JSON canonicalisation. A restarted proxy reads the last
//! line and continues the chain. Tokens appear only as fingerprints.
//!
//! Writes happen on one writer thread fed by a channel: [`AuditLog::record`] never touches a
//! file, so a proxy worker that raises an anomaly during a 401 storm never waits for an fsync.
//! [`AuditLog::flush`] waits until everything recorded so far is written (the reload path
//! answers only after its events are on disk; shutdown flushes last).
//!
//! If the file cannot be written the proxy keeps serving: the failure is counted
//! (`audit_write_failures_total`), logged and shown in `/status`. Refusing traffic because a
//! disk filled up would turn an audit problem into an outage of every application.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

mod verify;
mod writer;

use writer::{Message, Writer};

use crate::metrics::Metrics;
use crate::sync::lock;

pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub(crate) const HASH_KEY: &str = ",\"hash\":\"";

/// Where the audit log goes (`audit.path`: a file, or `-` for standard output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    File(std::path::PathBuf),
    Stdout,
}

/// Every event the audit log knows; [`AuditEvent::as_str`] is both the `event` field and the
/// `audit_events_total{event}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    ProxyStarted,
    ProxyStopped,
    TokenAcquired,
    TokenRefreshFailed,
    TokenRateLimited,
    TokenValidationFailed,
    TokenRejectedUpstream,
    SecretRotated,
    SecretRotationFailed,
    FallbackToPreviousSecret,
    ConfigReloaded,
    ConfigReloadRejected,
    AnomalyRaised,
    AnomalyCleared,
    /// The file was deleted or replaced while the proxy ran; the chain continues in a new file.
    AuditLogReopened,
    /// `[cluster]`: Redis answers; tokens are shared with the other replicas.
    ClusterJoined,
    /// `[cluster]`: Redis failed; this replica mints for itself until it answers again.
    ClusterStandalone,
    /// An `[[app]]` logged in and got a proxy token (its fingerprint only).
    AppTokenIssued,
    /// App proofs failed from one source address: at most one line per source per minute,
    /// with the count since its last line.
    AppAuthFailed,
}

impl AuditEvent {
    pub const ALL: [AuditEvent; 19] = [
        AuditEvent::ProxyStarted,
        AuditEvent::ProxyStopped,
        AuditEvent::TokenAcquired,
        AuditEvent::TokenRefreshFailed,
        AuditEvent::TokenRateLimited,
        AuditEvent::TokenValidationFailed,
        AuditEvent::TokenRejectedUpstream,
        AuditEvent::SecretRotated,
        AuditEvent::SecretRotationFailed,
        AuditEvent::FallbackToPreviousSecret,
        AuditEvent::ConfigReloaded,
        AuditEvent::ConfigReloadRejected,
        AuditEvent::AnomalyRaised,
        AuditEvent::AnomalyCleared,
        AuditEvent::AuditLogReopened,
        AuditEvent::ClusterJoined,
        AuditEvent::ClusterStandalone,
        AuditEvent::AppTokenIssued,
        AuditEvent::AppAuthFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::ProxyStarted => "PROXY_STARTED",
            AuditEvent::ProxyStopped => "PROXY_STOPPED",
            AuditEvent::TokenAcquired => "TOKEN_ACQUIRED",
            AuditEvent::TokenRefreshFailed => "TOKEN_REFRESH_FAILED",
            AuditEvent::TokenRateLimited => "TOKEN_RATE_LIMITED",
            AuditEvent::TokenValidationFailed => "TOKEN_VALIDATION_FAILED",
            AuditEvent::TokenRejectedUpstream => "TOKEN_REJECTED_UPSTREAM",
            AuditEvent::SecretRotated => "SECRET_ROTATED",
            AuditEvent::SecretRotationFailed => "SECRET_ROTATION_FAILED",
            AuditEvent::FallbackToPreviousSecret => "FALLBACK_TO_PREVIOUS_SECRET",
            AuditEvent::ConfigReloaded => "CONFIG_RELOADED",
            AuditEvent::ConfigReloadRejected => "CONFIG_RELOAD_REJECTED",
            AuditEvent::AnomalyRaised => "ANOMALY_RAISED",
            AuditEvent::AnomalyCleared => "ANOMALY_CLEARED",
            AuditEvent::AuditLogReopened => "AUDIT_LOG_REOPENED",
            AuditEvent::ClusterJoined => "CLUSTER_JOINED",
            AuditEvent::ClusterStandalone => "CLUSTER_STANDALONE",
            AuditEvent::AppTokenIssued => "APP_TOKEN_ISSUED",
            AuditEvent::AppAuthFailed => "APP_AUTH_FAILED",
        }
    }
}

/// The audit log. Cheap to share behind an `Arc`; recording never blocks on I/O. Handles
/// made with [`AuditLog::scoped`] write to the same file and chain.
pub struct AuditLog {
    shared: Arc<Shared>,
    scope: Option<Arc<Scope>>,
}

/// The writer thread and its channel, shared by every scoped handle.
struct Shared {
    tx: Mutex<Option<mpsc::SyncSender<Message>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    failures: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

/// Events waiting for the writer, at most. The writer syncs each event to disk; a disk that
/// stalls must not let the queue, and the process, grow without end: past this, events are
/// dropped and counted as failed writes (`audit_write_failures_total`).
pub const QUEUE: usize = 4096;

/// With `[[credential]]`s: the credential a handle's events are about.
pub(crate) struct Scope {
    credential: String,
    client_id: String,
}

impl AuditLog {
    /// Opens (or creates with mode 0600) the log, reads its tail to continue the chain and
    /// starts the writer thread.
    pub fn open(
        target: &AuditTarget,
        client_id: &str,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let failures = Arc::new(AtomicU64::new(0));
        let writer = Writer::open(target, client_id, metrics.clone(), failures.clone())?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            shared: Arc::new(Shared {
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                failures,
                metrics,
            }),
            scope: None,
        })
    }

    /// A handle on the same log whose events name `credential` and its `client_id`.
    pub fn scoped(&self, credential: &str, client_id: &str) -> AuditLog {
        AuditLog {
            shared: self.shared.clone(),
            scope: Some(Arc::new(Scope {
                credential: credential.to_string(),
                client_id: client_id.to_string(),
            })),
        }
    }

    /// Queues one event for the writer. Never fails the caller and never blocks on I/O.
    /// Strings in `details` longer than [`ECHO_MAX_CHARS`] are cut: details echo what issuers
    /// and clients sent (a 1 MiB JWT `kid` once added 10 MB to the log in 8 s).
    pub fn record(
        &self,
        event: AuditEvent,
        mut details: serde_json::Value,
        token_fingerprint: Option<&str>,
    ) {
        cap_strings(&mut details);
        let message = Message::Event {
            ts: SystemTime::now(),
            event,
            details,
            token: token_fingerprint.map(str::to_string),
            scope: self.scope.clone(),
        };
        let full = match lock(&self.shared.tx).as_ref() {
            Some(tx) => matches!(tx.try_send(message), Err(mpsc::TrySendError::Full(_))),
            None => false,
        };
        if full {
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
            self.shared.metrics.audit_write_failures_total.inc();
            tracing::error!(
                event = event.as_str(),
                "audit queue full (the disk is not keeping up); event dropped"
            );
        }
    }

    /// Resolves once every event recorded before the call has been written (or has failed).
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let Some(tx) = lock(&self.shared.tx).clone() else {
            return;
        };
        let sent = match tx.try_send(Message::Flush(done)) {
            Ok(()) => true,
            // A full queue: wait for room off the async runtime (a flush is never dropped).
            Err(mpsc::TrySendError::Full(flush)) => {
                tokio::task::spawn_blocking(move || tx.send(flush).is_ok())
                    .await
                    .unwrap_or(false)
            }
            Err(mpsc::TrySendError::Disconnected(_)) => false,
        };
        if sent {
            let _ = wait.await;
        }
    }

    /// Audit writes that failed since start.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }
}

impl Drop for Shared {
    /// Closes the channel and waits for the writer to drain it: nothing recorded is lost.
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
    }
}

pub use verify::{verify, Verified, VerifyError};

/// The longest string an audit line echoes in `details`.
pub const ECHO_MAX_CHARS: usize = 512;

/// Cuts every string in `v` to [`ECHO_MAX_CHARS`], saying how long it was.
fn cap_strings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.len() > ECHO_MAX_CHARS => {
            let cut: String = s.chars().take(ECHO_MAX_CHARS).collect();
            *s = format!("{cut}… ({} bytes in all)", s.len());
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(cap_strings),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(cap_strings),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gap-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("audit.jsonl")
    }

    fn write_three(path: &Path) {
        let m = Arc::new(Metrics::new());
        let log = AuditLog::open(&AuditTarget::File(path.to_path_buf()), "cid", m.clone()).unwrap();
        log.record(AuditEvent::ProxyStarted, serde_json::json!({}), None);
        log.record(
            AuditEvent::TokenAcquired,
            serde_json::json!({"generation": 1}),
            Some("sha256:abcdefabcdef"),
        );
        drop(log);
        // A restart continues the chain.
        let log = AuditLog::open(&AuditTarget::File(path.to_path_buf()), "cid", m).unwrap();
        log.record(AuditEvent::ProxyStopped, serde_json::json!({}), None);
    }

    #[test]
    fn intact_chain_verifies_across_restart() {
        let p = temp("ok");
        write_three(&p);
        let v = verify(&p).unwrap();
        assert_eq!(
            (v.events, v.sealed, v.continues_earlier_file),
            (3, true, false)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn each_tampering_kind_names_the_line() {
        let p = temp("tamper");
        write_three(&p);
        let original = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        let edited = original.replace("\"generation\":1", "\"generation\":2");
        std::fs::write(&p, edited).unwrap();
        assert_eq!(verify(&p).unwrap_err().line, 2);

        std::fs::write(&p, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        assert_eq!(verify(&p).unwrap_err().line, 2);

        std::fs::write(&p, format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2])).unwrap();
        assert_eq!(verify(&p).unwrap_err().line, 1);

        std::fs::write(&p, &original[..original.len() - 10]).unwrap();
        assert_eq!(verify(&p).unwrap_err().line, 3);

        // Cut at a line boundary: the chain holds, but the seal is gone.
        std::fs::write(&p, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
        let v = verify(&p).unwrap();
        assert_eq!((v.events, v.sealed), (2, false));

        std::fs::write(&p, "").unwrap();
        let e = verify(&p).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        assert!(
            verify(Path::new("/dev/zero")).is_err(),
            "devices are refused"
        );
    }

    #[test]
    fn a_deleted_log_is_reopened_and_the_chain_continues() {
        let p = temp("deleted");
        let m = Arc::new(Metrics::new());
        let log = AuditLog::open(&AuditTarget::File(p.clone()), "cid", m.clone()).unwrap();
        log.record(AuditEvent::ProxyStarted, serde_json::json!({}), None);
        log.record(AuditEvent::TokenAcquired, serde_json::json!({}), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(log.flush());
        let old = std::fs::read_to_string(&p).unwrap();
        let last_hash = verify(&p).unwrap().last_hash;
        std::fs::remove_file(&p).unwrap();
        log.record(AuditEvent::ProxyStopped, serde_json::json!({}), None);
        drop(log);
        let new = std::fs::read_to_string(&p).expect("the file was recreated");
        assert!(
            new.lines().next().unwrap().contains("AUDIT_LOG_REOPENED"),
            "{new}"
        );
        assert!(
            new.contains(&last_hash),
            "the break names the lost chain's end"
        );
        let v = verify(&p).unwrap();
        assert!(
            v.continues_earlier_file && v.sealed && v.events == 2,
            "{v:?}"
        );
        // The two files together are one intact chain.
        std::fs::write(&p, format!("{old}{new}")).unwrap();
        let v = verify(&p).unwrap();
        assert!(!v.continues_earlier_file && v.events == 4, "{v:?}");
        assert_eq!(m.audit_write_failures_total.get(), 0);
    }

    // Regression (issue 21): an audit file that could not be reopened left
    // audit_write_failures at 0 while every event went into an unlinked inode.
    #[test]
    fn an_audit_file_that_cannot_be_reopened_counts_as_failed_writes() {
        let p = temp("unreopenable");
        let m = Arc::new(Metrics::new());
        let log = AuditLog::open(&AuditTarget::File(p.clone()), "cid", m.clone()).unwrap();
        log.record(AuditEvent::ProxyStarted, serde_json::json!({}), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(log.flush());
        assert_eq!(log.failures(), 0);
        // The whole directory goes: the path cannot be opened again.
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
        log.record(AuditEvent::TokenAcquired, serde_json::json!({}), None);
        log.record(AuditEvent::ProxyStopped, serde_json::json!({}), None);
        rt.block_on(log.flush());
        assert_eq!(log.failures(), 2);
        assert_eq!(m.audit_write_failures_total.get(), 2);
    }

    // Regression (issue 21): an issuer's 1 MiB `kid` was echoed in full into the audit log.
    #[test]
    fn long_echoed_strings_are_cut() {
        let p = temp("echo");
        let m = Arc::new(Metrics::new());
        let log = AuditLog::open(&AuditTarget::File(p.clone()), "cid", m).unwrap();
        let kid = "k".repeat(1 << 20);
        log.record(
            AuditEvent::TokenValidationFailed,
            serde_json::json!({"error": format!("no key {kid:?} in the JWKS"), "list": [kid.clone()]}),
            None,
        );
        drop(log);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.len() < 4 * ECHO_MAX_CHARS, "{} bytes", text.len());
        assert!(text.contains("bytes in all"), "{text}");
        assert!(verify(&p).is_ok());
    }

    // Issue 22: the queue to the writer is bounded; what does not fit is dropped and counted,
    // never held in memory without end.
    #[test]
    fn a_burst_past_the_queue_is_dropped_and_counted() {
        let p = temp("burst");
        let m = Arc::new(Metrics::new());
        let log = AuditLog::open(&AuditTarget::File(p.clone()), "cid", m.clone()).unwrap();
        let n = 4 * QUEUE as u64;
        for i in 0..n {
            log.record(AuditEvent::TokenAcquired, serde_json::json!({"i": i}), None);
        }
        let dropped = log.failures();
        drop(log);
        let written = std::fs::read_to_string(&p).unwrap().lines().count() as u64;
        assert_eq!(written + dropped, n, "every event written or counted");
        assert!(written >= QUEUE as u64, "{written}");
        assert_eq!(m.audit_write_failures_total.get(), dropped);
        // Dropped events were never chained: the chain of what was written holds.
        let v = verify(&p).unwrap();
        assert_eq!(v.events as u64, written);
    }
}
