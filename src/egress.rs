//! Egress through a corporate forward proxy (`egress_proxy`): the token endpoint through
//! reqwest's proxy support, the API path through an HTTP CONNECT tunnel that pingora then
//! speaks TLS over, with the API host's SNI and certificate checks unchanged. `NO_PROXY`
//! (or `no_proxy`) names hosts reached directly, with the rules reqwest and curl use.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use base64::Engine;
use ipnet::IpNet;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::EgressProxy;

/// A `NO_PROXY` list: `*`, IP addresses and networks, and domains (each matching itself and
/// every subdomain; a leading dot changes nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    nets: Vec<IpNet>,
    domains: Vec<String>,
}

impl NoProxy {
    pub fn parse(raw: &str) -> Self {
        let mut list = NoProxy::default();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                list.all = true;
            } else if let Ok(net) = entry.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = entry.trim_matches(['[', ']']).parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else {
                let domain = entry.trim_start_matches('.').to_ascii_lowercase();
                // A port in the entry (`host:8443`) is ignored, as reqwest ignores it.
                let domain = match domain.rsplit_once(':') {
                    Some((d, port)) if port.bytes().all(|b| b.is_ascii_digit()) => d.to_string(),
                    _ => domain,
                };
                list.domains.push(domain);
            }
        }
        list
    }

    /// `NO_PROXY`, else `no_proxy`, from the environment, as text (reqwest parses it too).
    pub fn from_env() -> Option<String> {
        std::env::var("NO_PROXY")
            .or_else(|_| std::env::var("no_proxy"))
            .ok()
    }

    /// Is `host` (a name or an address) reached directly?
    pub fn matches(&self, host: &str) -> bool {
        if self.all {
            return true;
        }
        let host = host.trim_matches(['[', ']']);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.nets.iter().any(|n| n.contains(&ip));
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.domains.iter().any(|d| {
            host == *d
                || (host.len() > d.len()
                    && host.ends_with(d.as_str())
                    && host.as_bytes()[host.len() - d.len() - 1] == b'.')
        })
    }
}

/// The answer head of a CONNECT is read up to this size at most.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

/// The API path's CONNECT tunnel through the egress proxy: pingora calls it instead of a
/// TCP connect, then does TLS (SNI = the API host) over the tunnel.
pub struct Tunnel {
    /// `host:port` of the API, as the CONNECT request names it (the forward proxy resolves
    /// it: networks that need a forward proxy often cannot resolve outside names).
    target: String,
    /// The forward proxy's `host:port`, for messages.
    proxy_name: String,
    /// The forward proxy's addresses, resolved off the request path.
    proxy_addrs: Arc<ArcSwap<Vec<SocketAddr>>>,
    /// `Proxy-Authorization: Basic …`, when a username is configured.
    authorization: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the Proxy-Authorization value.
        f.debug_struct("Tunnel")
            .field("target", &self.target)
            .field("proxy", &self.proxy_name)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    pub fn new(
        egress: &EgressProxy,
        api_host: &str,
        api_port: u16,
        proxy_addrs: Arc<ArcSwap<Vec<SocketAddr>>>,
        timeout: Duration,
    ) -> Self {
        let authorization = egress.username.as_ref().map(|user| {
            let password = egress.password.as_ref().map_or("", |p| p.expose());
            let pair = format!("{user}:{password}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let host = if api_host.contains(':') {
            format!("[{api_host}]")
        } else {
            api_host.to_string()
        };
        Tunnel {
            target: format!("{host}:{api_port}"),
            proxy_name: format!("{}:{}", egress.host, egress.port),
            proxy_addrs,
            authorization,
            timeout,
        }
    }

    /// The address pingora's peer names (and keys its connection pool by): the forward
    /// proxy's first, once resolved.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.proxy_addrs.load().first().copied()
    }

    fn fail(&self, etype: ErrorType, why: String) -> Box<Error> {
        Error::explain(
            etype,
            format!(
                "egress proxy {}: CONNECT {} {why}",
                self.proxy_name, self.target
            ),
        )
    }

    async fn open(&self) -> Result<tokio::net::TcpStream> {
        let addrs = self.proxy_addrs.load_full();
        if addrs.is_empty() {
            return Err(self.fail(
                ErrorType::ConnectNoRoute,
                "failed: the egress proxy's host has not resolved".into(),
            ));
        }
        let mut last = String::new();
        for addr in addrs.iter() {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(self.fail(
            ErrorType::ConnectRefused,
            format!("failed: cannot reach the egress proxy ({last})"),
        ))
    }

    async fn handshake(&self) -> Result<tokio::net::TcpStream> {
        let mut tcp = self.open().await?;
        let mut request = format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nUser-Agent: genesys-auth-proxy/{v}\r\n",
            t = self.target,
            v = env!("CARGO_PKG_VERSION"),
        );
        if let Some(auth) = &self.authorization {
            request.push_str("Proxy-Authorization: ");
            request.push_str(auth);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| self.fail(ErrorType::WriteError, format!("failed: {e}")))?;
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        let end = loop {
            let n = tcp
                .read(&mut buf)
                .await
                .map_err(|e| self.fail(ErrorType::ReadError, format!("failed: {e}")))?;
            if n == 0 {
                return Err(self.fail(
                    ErrorType::ConnectProxyFailure,
                    "failed: the egress proxy closed the connection without an answer".into(),
                ));
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if head.len() > MAX_CONNECT_HEAD {
                return Err(self.fail(
                    ErrorType::ConnectProxyFailure,
                    "failed: the egress proxy's answer head is too long".into(),
                ));
            }
        };
        let status_line = head
            .split(|b| *b == b'\n')
            .next()
            .map(|l| String::from_utf8_lossy(l).trim().to_string())
            .unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(200..=299) if end == head.len() => Ok(tcp),
            Some(200..=299) => Err(self.fail(
                ErrorType::ConnectProxyFailure,
                "failed: the egress proxy sent data before the tunnel was used".into(),
            )),
            _ => {
                // The status line only: a proxy's page may echo request headers.
                let shown: String = status_line.chars().take(200).collect();
                Err(self.fail(
                    ErrorType::ConnectProxyFailure,
                    format!("refused: {shown:?}"),
                ))
            }
        }
    }
}

#[async_trait]
impl L4Connect for Tunnel {
    async fn connect(&self, _addr: &PingoraAddr) -> Result<Stream> {
        match tokio::time::timeout(self.timeout, self.handshake()).await {
            Ok(Ok(tcp)) => Ok(Stream::from(tcp)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot open a tunnel through the egress proxy");
                Err(e)
            }
            Err(_) => {
                let e = self.fail(
                    ErrorType::ConnectTimedout,
                    format!("timed out after {:?}", self.timeout),
                );
                tracing::warn!(error = %e, "cannot open a tunnel through the egress proxy");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_as_reqwest_does() {
        let n = NoProxy::parse("internal.example, .corp.local, 10.0.0.0/8, ::1, sim:9180");
        assert!(n.matches("internal.example"));
        assert!(n.matches("api.internal.example"));
        assert!(!n.matches("notinternal.example"));
        assert!(n.matches("a.b.corp.local"));
        assert!(n.matches("corp.local"));
        assert!(n.matches("10.1.2.3"));
        assert!(!n.matches("11.1.2.3"));
        assert!(n.matches("[::1]"));
        assert!(n.matches("sim"));
        assert!(!n.matches("api.mypurecloud.com"));
        assert!(NoProxy::parse("*").matches("api.mypurecloud.com"));
        assert!(!NoProxy::parse("").matches("x"));
    }
}
