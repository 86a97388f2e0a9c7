//! The tamper-evident audit log: one JSON object per line, each carrying the SHA-256 of the
//! previous line (`prev`) and of itself (`hash`), appended, flushed and synced per event.
//!
//! A line is written as `{"ts":…,"seq":…,"event":…,"client_id":…,"details":…[,"token":…],"prev":…,"hash":…}`.
//! `hash` is the hex SHA-256 of the line up to and excluding `,"hash":…` with a closing `}`
//! appended, so the verifier needs no JSON canonicalisation. A restarted proxy reads the last
//! line and continues the chain. Tokens appear only as fingerprints.
//!
//! If the file cannot be written the proxy keeps serving: the failure is counted
//! (`audit_write_failures_total`), logged and shown in `/status`. Refusing traffic because a
//! disk filled up would turn an audit problem into an outage of every application.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::AuditTarget;
use crate::metrics::Metrics;
use crate::sync::lock;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_KEY: &str = ",\"hash\":\"";

#[derive(Serialize)]
struct Body<'a> {
    ts: String,
    seq: u64,
    event: &'a str,
    client_id: &'a str,
    details: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    prev: &'a str,
}

enum Sink {
    File(File),
    Stdout,
}

struct Chain {
    sink: Sink,
    seq: u64,
    prev: String,
}

/// The audit log writer. Cheap to share behind an `Arc`.
pub struct AuditLog {
    chain: Mutex<Chain>,
    client_id: String,
    metrics: Arc<Metrics>,
    failures: AtomicU64,
    path: Option<PathBuf>,
}

impl AuditLog {
    /// Opens (or creates with mode 0600) the log and reads its tail to continue the chain.
    pub fn open(
        target: &AuditTarget,
        client_id: &str,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
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
                let mut opts = OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                (Sink::File(opts.open(path)?), seq, prev, Some(path.clone()))
            }
        };
        Ok(AuditLog {
            chain: Mutex::new(Chain { sink, seq, prev }),
            client_id: client_id.to_string(),
            metrics,
            failures: AtomicU64::new(0),
            path,
        })
    }

    /// Appends one event. Never fails the caller: a write error is counted and logged.
    pub fn record(&self, event: &str, details: serde_json::Value, token_fingerprint: Option<&str>) {
        let mut chain = lock(&self.chain);
        let seq = chain.seq + 1;
        let body = Body {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            seq,
            event,
            client_id: &self.client_id,
            details: &details,
            token: token_fingerprint,
            prev: &chain.prev,
        };
        let Ok(body) = serde_json::to_string(&body) else {
            return;
        };
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        let line = format!("{}{HASH_KEY}{hash}\"}}\n", &body[..body.len() - 1]);
        let written = match &mut chain.sink {
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
                chain.seq = seq;
                chain.prev = hash;
                self.metrics
                    .audit_events_total
                    .with_label_values(&[event])
                    .inc();
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.metrics.audit_write_failures_total.inc();
                tracing::error!(error = %e, event, path = ?self.path, "cannot write audit event; continuing to serve");
            }
        }
    }

    /// Audit writes that failed since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
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

/// Why a log failed verification; `line` is 1-based.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct VerifyError {
    pub line: usize,
    pub reason: String,
}

/// Verifies the hash chain of a log file and returns the number of events.
pub fn verify(path: &Path) -> Result<usize, VerifyError> {
    let text = std::fs::read(path).map_err(|e| VerifyError {
        line: 0,
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    let text = String::from_utf8(text).map_err(|_| VerifyError {
        line: 0,
        reason: "file is not UTF-8".into(),
    })?;
    let mut prev = GENESIS.to_string();
    let mut expected_seq: Option<u64> = None;
    let mut count = 0;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, raw) in lines.iter().enumerate() {
        let n = i + 1;
        let bad = |reason: &str| VerifyError {
            line: n,
            reason: reason.to_string(),
        };
        let Some(line) = raw.strip_suffix('\n') else {
            return Err(bad("truncated: the last line has no newline"));
        };
        let at = line.rfind(HASH_KEY).ok_or_else(|| bad("no hash field"))?;
        let body = format!("{}}}", &line[..at]);
        let stored = line[at + HASH_KEY.len()..]
            .strip_suffix("\"}")
            .ok_or_else(|| bad("malformed hash field"))?;
        if hex::encode(Sha256::digest(body.as_bytes())) != stored {
            return Err(bad("hash does not match the line's content (edited)"));
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad("not valid JSON"))?;
        if v["prev"].as_str() != Some(prev.as_str()) {
            return Err(bad("prev does not match the previous line's hash (deleted, reordered or inserted line)"));
        }
        let seq = v["seq"].as_u64().ok_or_else(|| bad("no seq"))?;
        if let Some(expected) = expected_seq {
            if seq != expected {
                return Err(bad(&format!("seq {seq} where {expected} was expected")));
            }
        }
        expected_seq = Some(seq + 1);
        prev = stored.to_string();
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gap-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("audit.jsonl")
    }

    fn write_three(path: &Path) {
        let m = Arc::new(Metrics::new());
        let log = AuditLog::open(&AuditTarget::File(path.to_path_buf()), "cid", m.clone()).unwrap();
        log.record("PROXY_STARTED", serde_json::json!({}), None);
        log.record(
            "TOKEN_ACQUIRED",
            serde_json::json!({"generation": 1}),
            Some("sha256:abcdefabcdef"),
        );
        drop(log);
        // A restart continues the chain.
        let log = AuditLog::open(&AuditTarget::File(path.to_path_buf()), "cid", m).unwrap();
        log.record("PROXY_STOPPED", serde_json::json!({}), None);
    }

    #[test]
    fn intact_chain_verifies_across_restart() {
        let p = temp("ok");
        write_three(&p);
        assert_eq!(verify(&p).unwrap(), 3);
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
    }
}
