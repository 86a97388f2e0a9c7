//! HTTPS for the simulator: a certificate generated at start for `localhost` and `127.0.0.1`,
//! so tests can prove the proxy verifies the API host's certificate and sends SNI, as it must
//! against the real `api.<domain>`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tower::ServiceExt;

/// A self-signed certificate and the server configuration that presents it.
pub struct SimCert {
    /// PEM of the certificate: the trust anchor a client needs (`genesys.ca_file`).
    pub cert_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Generates a certificate valid for `localhost` and `127.0.0.1`.
pub fn generate() -> Result<SimCert, String> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    let cert_pem = certified.cert.pem();
    let cert_der = certified.cert.der().clone();
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
        .map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .map_err(|e| e.to_string())?;
    Ok(SimCert {
        cert_pem,
        server_config: Arc::new(server_config),
    })
}

/// Serves `app` over TLS on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, app: Router, config: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that refuses our certificate fails here: nothing to serve.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
