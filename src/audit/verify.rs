//! The audit log's verifier: the hash chain, line by line, streaming (a log can be large).
//!
//! Besides edits, deletions, insertions and reordering (a broken chain), it reports what the
//! chain alone cannot prove: an empty file, and a log that is not *sealed* — whose last event
//! is not `PROXY_STOPPED`. A running proxy's log is unsealed; a stopped proxy's log that is
//! unsealed was cut at the end (or the proxy crashed). `audit-verify` fails on an unsealed log
//! unless told it is a live one (`--open`).

use std::io::{BufRead, BufReader};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{AuditEvent, GENESIS, HASH_KEY};

/// Why a log failed verification; `line` is 1-based (0: the file as a whole).
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct VerifyError {
    pub line: usize,
    pub reason: String,
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub events: usize,
    /// The last event is `PROXY_STOPPED`.
    pub sealed: bool,
    /// The first line continues a chain from an earlier file (`AUDIT_LOG_REOPENED`).
    pub continues_earlier_file: bool,
    /// The hash of the last line: keep it elsewhere to detect a cut to an earlier seal.
    pub last_hash: String,
}

/// Verifies the hash chain of a log file.
pub fn verify(path: &Path) -> Result<Verified, VerifyError> {
    let whole = |reason: String| VerifyError { line: 0, reason };
    let file = crate::files::open_regular(path)
        .map_err(|e| whole(format!("cannot read {}: {e}", path.display())))?;
    let mut reader = BufReader::new(file);
    let mut chain = Chain {
        prev: GENESIS.to_string(),
        next_seq: None,
        verified: Verified {
            events: 0,
            sealed: false,
            continues_earlier_file: false,
            last_hash: GENESIS.to_string(),
        },
    };
    let mut raw = Vec::new();
    for n in 1.. {
        raw.clear();
        let read = reader
            .read_until(b'\n', &mut raw)
            .map_err(|e| whole(format!("cannot read {}: {e}", path.display())))?;
        if read == 0 {
            break;
        }
        chain.check_line(n, &raw)?;
    }
    if chain.verified.events == 0 {
        return Err(whole(
            "empty: no events (a log always starts with PROXY_STARTED)".into(),
        ));
    }
    Ok(chain.verified)
}

struct Chain {
    prev: String,
    next_seq: Option<u64>,
    verified: Verified,
}

impl Chain {
    fn check_line(&mut self, n: usize, raw: &[u8]) -> Result<(), VerifyError> {
        let bad = |reason: &str| VerifyError {
            line: n,
            reason: reason.to_string(),
        };
        let line = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
        let Some(line) = line.strip_suffix('\n') else {
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
        let event = v["event"].as_str().unwrap_or("");
        let prev = v["prev"].as_str().unwrap_or("");
        let reopened = event == AuditEvent::AuditLogReopened.as_str();
        if n == 1 && reopened && prev != GENESIS {
            // The proxy reopened a deleted file: the chain goes on from the lost one.
            self.verified.continues_earlier_file = true;
        } else if prev != self.prev {
            return Err(bad(
                "prev does not match the previous line's hash (deleted, reordered or inserted line)",
            ));
        }
        let seq = v["seq"].as_u64().ok_or_else(|| bad("no seq"))?;
        if let Some(expected) = self.next_seq {
            if seq != expected {
                return Err(bad(&format!("seq {seq} where {expected} was expected")));
            }
        }
        self.next_seq = Some(seq + 1);
        self.prev = stored.to_string();
        self.verified.events += 1;
        self.verified.sealed = event == AuditEvent::ProxyStopped.as_str();
        self.verified.last_hash = stored.to_string();
        Ok(())
    }
}
