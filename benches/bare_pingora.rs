//! The bare pingora reference for `benches/load-compare.sh`: the smallest `ProxyHttp` that does
//! what the proxy does per request at its core (forward to one upstream over plain HTTP with a
//! static `Authorization` header), run with pingora's own `Server`. The gap between this and
//! genesys-auth-proxy is our cost; the gap between this and nginx is pingora's.
//!
//!   bare-pingora LISTEN UPSTREAM "Bearer <token>" [THREADS]

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::*;

struct Bare {
    upstream: SocketAddr,
    authorization: http::HeaderValue,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream.insert_header(http::header::AUTHORIZATION, self.authorization.clone())?;
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [listen, upstream, authorization, rest @ ..] = args.as_slice() else {
        eprintln!("usage: bare-pingora LISTEN UPSTREAM AUTHORIZATION [THREADS]");
        std::process::exit(2);
    };
    let threads = rest.first().and_then(|t| t.parse().ok()).unwrap_or(2);
    let bare = Bare {
        upstream: upstream.parse().expect("UPSTREAM is ip:port"),
        authorization: http::HeaderValue::from_str(authorization).expect("a header value"),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One single-threaded runtime per thread, as genesys-auth-proxy runs its workers (pingora's
    // default, a work-stealing runtime, costs more per request on loopback).
    let conf = pingora::server::configuration::ServerConf {
        work_stealing: false,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, bare);
    service.add_tcp(listen);
    service.threads = Some(threads);
    server.add_service(service);
    server.run_forever();
}
