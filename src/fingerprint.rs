//! Fingerprints: the only form in which a token or secret may appear in logs, metrics,
//! `/status`, the audit log or simulator stats.

use sha2::{Digest, Sha256};

/// `sha256:` followed by the first 12 hex digits of the SHA-256 of `secret`.
///
/// Twelve hex digits (48 bits) tell tokens apart in an audit trail without giving an attacker
/// anything usable: the input has at least 256 bits of entropy.
pub fn fingerprint(secret: &[u8]) -> String {
    let digest = Sha256::digest(secret);
    let mut out = String::with_capacity(19);
    out.push_str("sha256:");
    out.push_str(&hex::encode(&digest[..6]));
    out
}

/// Compares two secrets without stopping at the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hex SHA-256 of `data` (used for body digests, not for secrets).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_has_fixed_shape_and_hides_input() {
        let fp = fingerprint(b"super-secret-token");
        assert!(fp.starts_with("sha256:"));
        assert_eq!(fp.len(), "sha256:".len() + 12);
        assert!(!fp.contains("super"));
        assert_eq!(fp, fingerprint(b"super-secret-token"));
        assert_ne!(fp, fingerprint(b"other"));
    }
}
