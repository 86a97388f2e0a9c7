//! `[proxy.tls]`: the proxy listeners speak TLS. The files are read and checked when the
//! config is built (readable, PEM, key matches certificate, certificate not expired, client CA
//! parses), so `check` names the bad key and a reload with a bad new pair changes nothing. The
//! material itself is live: a reload (a watched file changed) swaps it in for new handshakes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use super::builder::{Builder, Built};
use super::file::TlsSection;
use super::keyed::keyed_struct;

keyed_struct! {
    /// `[proxy.tls]` for every proxy listener, applied in place on reload (turning TLS on or
    /// off needs a restart).
    pub struct TlsConfig {
        pub listener: Option<ListenerTls> => "proxy.tls.cert_file" | "proxy.tls.key_file" | "proxy.tls.client_ca_file",
    }
}

impl TlsConfig {
    /// The files the watcher should follow.
    pub fn files(&self) -> Vec<PathBuf> {
        let Some(t) = &self.listener else {
            return Vec::new();
        };
        let mut files = vec![t.cert_file.clone(), t.key_file.clone()];
        files.extend(t.client_ca_file.clone());
        files
    }
}

/// A certificate pair and optional client CA, read and checked.
#[derive(Clone)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub chain: Vec<CertificateDer<'static>>,
    /// Never printed (`Debug` shows a digest of the files).
    pub key: Arc<PrivateKeyDer<'static>>,
    pub client_roots: Option<Vec<CertificateDer<'static>>>,
    /// When the server certificate expires.
    pub not_after: SystemTime,
    /// SHA-256 over the three files' bytes: what a reload compares.
    digest: [u8; 32],
}

impl PartialEq for ListenerTls {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
            && self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.client_ca_file == other.client_ca_file
    }
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("client_ca_file", &self.client_ca_file)
            .field("files", &hex::encode(&self.digest[..6]))
            .finish()
    }
}

/// The largest certificate, key or CA file read.
const TLS_FILE_MAX: u64 = 1024 * 1024;

pub(super) fn tls(b: &Builder, raw: Option<TlsSection>) -> Built<TlsConfig> {
    let Some(raw) = raw else {
        return Ok(TlsConfig { listener: None });
    };
    let path = |v: Option<String>, key: &str| -> Built<PathBuf> {
        match v {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err(b.err(key, "is required in [proxy.tls]")),
        }
    };
    let cert_file = path(raw.cert_file, "proxy.tls.cert_file")?;
    let key_file = path(raw.key_file, "proxy.tls.key_file")?;
    let client_ca_file = raw.client_ca_file.map(PathBuf::from);
    let mut digest = Sha256::new();
    let cert_bytes = read(b, &cert_file, "proxy.tls.cert_file", &mut digest)?;
    let key_bytes = read(b, &key_file, "proxy.tls.key_file", &mut digest)?;
    let chain = certificates(b, &cert_bytes, "proxy.tls.cert_file")?;
    if chain.is_empty() {
        return Err(b.err("proxy.tls.cert_file", "holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        b.err(
            "proxy.tls.key_file",
            format!("holds no PEM private key: {e}"),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
        |e| {
            b.err(
                "proxy.tls.key_file",
                format!("does not match the certificate in proxy.tls.cert_file: {e}"),
            )
        },
    )?;
    let not_after = validity(&chain[0])
        .map_err(|m| b.err("proxy.tls.cert_file", m))?
        .1;
    if not_after <= SystemTime::now() {
        return Err(b.err(
            "proxy.tls.cert_file",
            format!(
                "expired at {}",
                humantime::format_rfc3339_seconds(not_after)
            ),
        ));
    }
    let client_roots = match &client_ca_file {
        None => None,
        Some(ca) => {
            let bytes = read(b, ca, "proxy.tls.client_ca_file", &mut digest)?;
            let roots = certificates(b, &bytes, "proxy.tls.client_ca_file")?;
            let mut store = rustls::RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
            if added == 0 {
                return Err(b.err("proxy.tls.client_ca_file", "holds no usable CA certificate"));
            }
            Some(roots)
        }
    };
    Ok(TlsConfig {
        listener: Some(ListenerTls {
            cert_file,
            key_file,
            client_ca_file,
            chain,
            key: Arc::new(key),
            client_roots,
            not_after,
            digest: digest.finalize().into(),
        }),
    })
}

/// The PEM certificates of a file (`key` names it in the error).
fn certificates(b: &Builder, pem: &[u8], key: &str) -> Built<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| b.err(key, format!("is not PEM certificates: {e}")))
}

fn read(b: &Builder, path: &Path, key: &str, digest: &mut Sha256) -> Built<Vec<u8>> {
    let bytes = crate::files::read_capped(path, TLS_FILE_MAX)
        .map_err(|e| b.err(key, format!("cannot read {}: {e}", path.display())))?;
    digest.update(path.as_os_str().as_encoded_bytes());
    digest.update((bytes.len() as u64).to_le_bytes());
    digest.update(&bytes);
    Ok(bytes)
}

/// A certificate's validity period.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let v = parsed.validity();
    let at = |t: i64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}
