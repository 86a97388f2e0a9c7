//! TLS on the proxy listeners (`[proxy.tls]`): rustls with ring, TLS 1.2 and 1.3 only (rustls
//! has no renegotiation), ALPN `http/1.1`, and, with `client_ca_file`, client certificates
//! asked for and verified against that CA (a certificate from another CA, or an expired one,
//! fails the handshake; a client without one may still prove itself otherwise). A reload
//! swaps the acceptor for new handshakes; open connections keep theirs.
//!
//! A client that speaks plain HTTP to a TLS listener gets a plain-text 400 naming the problem
//! instead of a hang or a TLS alert it cannot read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use pingora::listeners::tls::Acceptor;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use x509_parser::extensions::GeneralName;

use crate::config::tls::ListenerTls;
use crate::sync::lock;

/// Why rustls refused a checked pair or client CA (rare: `check` reads the same files).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("proxy.tls: {0}")]
    Config(#[from] rustls::Error),
    #[error("proxy.tls.client_ca_file: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

/// A listener's TLS: the current acceptor, swapped by reloads.
pub struct ServerTls {
    acceptor: ArcSwap<Acceptor>,
}

impl ServerTls {
    pub fn new(t: &ListenerTls) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            acceptor: ArcSwap::from_pointee(acceptor(t)?),
        })
    }

    /// New handshakes use `t` from now on.
    pub fn replace(&self, t: &ListenerTls) -> Result<(), TlsError> {
        self.acceptor.store(Arc::new(acceptor(t)?));
        Ok(())
    }

    pub fn current(&self) -> Arc<Acceptor> {
        self.acceptor.load_full()
    }
}

fn acceptor(t: &ListenerTls) -> Result<Acceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?;
    let builder = match &t.client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(roots.iter().cloned());
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                .allow_unauthenticated()
                .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(t.chain.clone(), t.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Acceptor::from_server_config(Arc::new(config)))
}

/// The names a verified client certificate proves, as `[[app]] mtls_subjects` write them: its
/// URI SANs as they are (`spiffe://…`) and its DNS SANs as `dns:<name>` (lower case).
pub fn peer_names(cert: &[u8]) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(uri.to_string()),
            GeneralName::DNSName(dns) => Some(format!("dns:{}", dns.to_ascii_lowercase())),
            _ => None,
        })
        .collect()
}

/// The verified client-certificate names of open TLS connections, by client address (one
/// entry per connection that presented a certificate, removed when it closes).
#[derive(Default)]
pub struct Peers(Mutex<HashMap<SocketAddr, Arc<[String]>>>);

impl Peers {
    pub fn insert(&self, peer: SocketAddr, names: Arc<[String]>) {
        lock(&self.0).insert(peer, names);
    }

    pub fn remove(&self, peer: &SocketAddr) {
        lock(&self.0).remove(peer);
    }

    pub fn get(&self, peer: &SocketAddr) -> Option<Arc<[String]>> {
        lock(&self.0).get(peer).cloned()
    }
}

/// Does the connection start like a TLS handshake (a record of type 22)? A client that sent
/// something else (plain HTTP) is answered in plain text and closed.
pub async fn starts_with_tls(tcp: &mut TcpStream) -> bool {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) if first[0] == 0x16 => true,
        Ok(1) => {
            let body = r#"{"message":"This proxy listener speaks TLS: use https://.","code":"proxy.tls_required","status":400}"#;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(answer.as_bytes()).await;
            let _ = tcp.shutdown().await;
            false
        }
        _ => false,
    }
}
