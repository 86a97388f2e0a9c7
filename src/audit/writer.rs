//! The audit log's writer thread: the open file (or stdout), the end of the chain, and the
//! one place lines are hashed and written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::AuditTarget;
use super::{AuditEvent, GENESIS, HASH_KEY};
use crate::metrics::Metrics;

#[derive(Serialize)]
struct Body<'a> {
    ts: String,
    seq: u64,
    event: &'a str,
    client_id: &'a str,
    /// With `[[credential]]`s: which credential the event is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<&'a str>,
    details: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    prev: &'a str,
}

enum Sink {
    File(File),
    Stdout,
}

/// What the writer thread is asked to do.
pub(super) enum Message {
    Event {
        ts: SystemTime,
        event: AuditEvent,
        details: serde_json::Value,
        token: Option<String>,
        scope: Option<Arc<super::Scope>>,
    },
    /// Answer once every earlier message is handled.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The writer thread's state: the open sink and the end of the chain.
pub(super) struct Writer {
    sink: Sink,
    seq: u64,
    prev: String,
    client_id: String,
    path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    failures: Arc<AtomicU64>,
}

impl Writer {
    /// Opens (or creates with mode 0600) the log and reads its tail to continue the chain.
    pub(super) fn open(
        target: &AuditTarget,
        client_id: &str,
        metrics: Arc<Metrics>,
        failures: Arc<AtomicU64>,
    ) -> std::io::Result<Writer> {
        let (sink, seq, prev, path) = match target {
            AuditTarget::Stdout => (Sink::Stdout, 0, GENESIS.to_string(), None),
            AuditTarget::File(path) => {
                let (seq, prev) = match File::open(path) {
                    // Only a regular file has a chain to continue (not /dev/null, a FIFO...).
                    Ok(f) if f.metadata()?.is_file() => last_link(f)?,
                    Ok(_) => (0, GENESIS.to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, GENESIS.to_string()),
                    Err(e) => return Err(e),
                };
                (
                    Sink::File(open_append(path)?),
                    seq,
                    prev,
                    Some(path.clone()),
                )
            }
        };
        Ok(Writer {
            sink,
            seq,
            prev,
            client_id: client_id.to_string(),
            path,
            metrics,
            failures,
        })
    }

    /// Handles messages until every sender is gone.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Message>) {
        for message in rx {
            match message {
                Message::Event {
                    ts,
                    event,
                    details,
                    token,
                    scope,
                } => {
                    if self.reopen_if_replaced() {
                        self.append(ts, event, &details, token.as_deref(), scope.as_deref());
                    } else {
                        // Written into the unlinked inode, the event would be lost without a
                        // trace: count it as the failure it is.
                        self.failures.fetch_add(1, Ordering::Relaxed);
                        self.metrics.audit_write_failures_total.inc();
                    }
                }
                Message::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// Opens for appending, creating with mode 0600.
fn open_append(path: &Path) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

impl Writer {
    /// If the log file was deleted or replaced (rotated away, removed by an operator), writes
    /// would go on into an unlinked inode nobody can read: open the path again and record the
    /// break, continuing the chain (`AUDIT_LOG_REOPENED` carries the previous seq and hash).
    /// False when the path cannot be opened again: events cannot be written where anyone
    /// reads them.
    fn reopen_if_replaced(&mut self) -> bool {
        let (Sink::File(file), Some(path)) = (&self.sink, &self.path) else {
            return true;
        };
        if same_file(file, path) {
            return true;
        }
        match open_append(path) {
            Ok(f) => {
                self.sink = Sink::File(f);
                let details = serde_json::json!({
                    "reason": "the audit file was deleted or replaced while the proxy ran",
                    "previous_seq": self.seq,
                    "previous_hash": self.prev,
                });
                tracing::warn!(path = %path.display(), "audit file was deleted or replaced; reopened it and continued the chain");
                self.append(
                    SystemTime::now(),
                    AuditEvent::AuditLogReopened,
                    &details,
                    None,
                    None,
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "audit file was deleted or replaced and cannot be reopened; the event is lost (audit_write_failures_total)");
                false
            }
        }
    }

    fn append(
        &mut self,
        ts: SystemTime,
        event: AuditEvent,
        details: &serde_json::Value,
        token: Option<&str>,
        scope: Option<&super::Scope>,
    ) {
        let seq = self.seq + 1;
        let body = Body {
            ts: humantime::format_rfc3339_millis(ts).to_string(),
            seq,
            event: event.as_str(),
            client_id: scope.map_or(self.client_id.as_str(), |s| s.client_id.as_str()),
            credential: scope.map(|s| s.credential.as_str()),
            details,
            token,
            prev: &self.prev,
        };
        let Ok(body) = serde_json::to_string(&body) else {
            return;
        };
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        let line = format!("{}{HASH_KEY}{hash}\"}}\n", &body[..body.len() - 1]);
        let written = match &mut self.sink {
            Sink::File(f) => f
                .write_all(line.as_bytes())
                .and_then(|_| f.flush())
                .and_then(|_| f.sync_data()),
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes()).and_then(|_| out.flush())
            }
        };
        match written {
            Ok(()) => {
                self.seq = seq;
                self.prev = hash;
                self.metrics
                    .audit_events_total
                    .with_label_values(&[event.as_str()])
                    .inc();
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.metrics.audit_write_failures_total.inc();
                tracing::error!(error = %e, event = event.as_str(), path = ?self.path, "cannot write audit event; continuing to serve");
            }
        }
    }
}

/// Is the open `file` still the one at `path` (same device and inode)?
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            (Ok(_), Err(_)) => false,
            _ => true,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// Reads the sequence number and hash of the last line of an existing log.
fn last_link(f: File) -> std::io::Result<(u64, String)> {
    let mut last = None;
    for line in BufReader::new(f).lines() {
        let line = line?;
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    let Some(line) = last else {
        return Ok((0, GENESIS.to_string()));
    };
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("last audit line is not JSON: {e}"),
        )
    })?;
    let seq = v["seq"].as_u64().unwrap_or(0);
    let hash = v["hash"].as_str().unwrap_or(GENESIS).to_string();
    Ok((seq, hash))
}
