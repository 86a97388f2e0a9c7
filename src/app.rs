//! The one place that wires the parts together: token store and refresher, DNS resolver, the
//! pingora proxy on its listener, the admin listener, audit log, and graceful shutdown.
//!
//! [`start`] binds both listeners (port 0 works: tests read the bound addresses from
//! [`Running`]) and returns at once; [`Running::shutdown`] drains in-flight requests within the
//! configured grace period.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use http::HeaderValue;
use pingora::apps::ServerApp;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::server::configuration::ServerConf;
use pingora::utils::tls::{parse_x509, WrappedX509};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::anomaly::AnomalyMonitor;
use crate::audit::AuditLog;
use crate::config::{ApiTarget, Config};
use crate::metrics::Metrics;
use crate::proxy::{GenesysProxy, ProxyState};
use crate::reload::Reloader;
use crate::token::endpoint::TokenEndpoint;
use crate::token::refresher::{Credentials, RefreshInfo, Refresher};
use crate::token::store::TokenStore;

/// A running proxy.
pub struct Running {
    pub reloader: Arc<Reloader>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    shutdown_tx: watch::Sender<bool>,
    done: JoinHandle<()>,
}

impl Running {
    /// Starts a graceful shutdown and waits until it is complete.
    pub async fn shutdown(self) {
        self.shutdown_tx.send_replace(true);
        let _ = self.done.await;
    }

    /// Waits for SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    let outcome = self.reloader.reload("sighup").await;
                    tracing::info!(status = outcome.status, outcome = %outcome.body, "SIGHUP reload");
                }
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        self.shutdown().await;
        Ok(())
    }
}

/// Installs the ring crypto provider once (the only provider compiled in).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Binds the listeners, starts every background task and returns.
/// `config_path` is where reloads read the configuration from.
pub async fn start(config: Config, config_path: PathBuf) -> anyhow::Result<Running> {
    install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    let audit = Arc::new(
        AuditLog::open(
            &config.audit.target,
            &config.genesys.client_id,
            metrics.clone(),
        )
        .with_context(|| format!("audit.path: cannot open {:?}", config.audit.target))?,
    );
    let store = Arc::new(TokenStore::new());
    let anomaly = Arc::new(AnomalyMonitor::new(
        config.anomaly.clone(),
        audit.clone(),
        metrics.clone(),
    ));
    let refresh_info = Arc::new(Mutex::new(RefreshInfo::default()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let proxy_listener = bind(config.proxy.listen, config.proxy.reuse_port)
        .with_context(|| format!("proxy.listen: cannot bind {}", config.proxy.listen))?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", config.admin.listen))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let api = config.genesys.api.clone();
    let endpoint = TokenEndpoint::for_config(&config).map_err(anyhow::Error::msg)?;
    let token_settings = Arc::new(ArcSwap::from_pointee(config.token.clone()));
    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(16);
    let refresher = Refresher {
        store: store.clone(),
        endpoint,
        credentials: Credentials {
            client_id: config.genesys.client_id.clone(),
            secret: config.genesys.client_secret.clone(),
            previous: config.genesys.previous_client_secret.clone(),
        },
        settings: token_settings.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        info: refresh_info.clone(),
        commands: commands_rx,
        anomaly: anomaly.clone(),
    };
    let refresher_task = tokio::spawn(refresher.run(shutdown_rx.clone()));

    let state = Arc::new(ProxyState {
        settings: ArcSwap::from_pointee(config.proxy.clone()),
        host_header: HeaderValue::from_str(&api.host_header())
            .context("genesys.api_url: host is not a valid Host header")?,
        api: api.clone(),
        upstream_addrs: ArcSwap::from_pointee(Vec::new()),
        store: store.clone(),
        metrics: metrics.clone(),
        anomaly: anomaly.clone(),
        access_log: config.log.access_log.into(),
        upstream_ca: config.genesys.ca_certs.as_ref().map(|certs| {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::from(wrapped.into_boxed_slice())
        }),
    });
    let resolver_task = tokio::spawn(resolve_loop(
        api.clone(),
        state.clone(),
        config.proxy.dns_refresh,
        shutdown_rx.clone(),
    ));

    // Clears quiet anomalies.
    let anomaly_task = {
        let anomaly = anomaly.clone();
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => anomaly.tick(),
                    _ = until_true(&mut shutdown) => return,
                }
            }
        })
    };
    let reloader = Arc::new(Reloader::new(
        config_path,
        config.clone(),
        state.clone(),
        token_settings,
        commands_tx,
        audit.clone(),
        metrics.clone(),
    ));
    let watch_task = crate::watch::secret_files(
        reloader.clone(),
        reloader.watched_files().await,
        shutdown_rx.clone(),
    );
    let admin_state = Arc::new(AdminState {
        store: store.clone(),
        metrics: metrics.clone(),
        refresh: refresh_info,
        audit: audit.clone(),
        draining: false.into(),
        anomaly: anomaly.clone(),
        reloader: reloader.clone(),
    });
    // The admin listener outlives the drain, so balancers see /readyz 503 while it runs.
    let (admin_stop_tx, mut admin_shutdown) = watch::channel(false);
    let admin_router = admin::router(admin_state.clone());
    let admin_task = tokio::spawn(async move {
        let serve = axum::serve(admin_listener, admin_router).with_graceful_shutdown(async move {
            let _ = admin_shutdown.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    let server_conf = Arc::new(ServerConf::default());
    let (pingora_shutdown_tx, pingora_shutdown_rx) = watch::channel(false);
    // One single-threaded runtime per worker thread, each accepting on a clone of the listener:
    // a connection lives on one thread, with no cross-thread wake-ups (pingora's own model).
    // Each worker has its own pingora app, hence its own upstream connection pool: pooled
    // connections never move between threads (a shared pool races its idle watcher and logs
    // "failed to acquire reusable stream" under load).
    let mut apps = Vec::with_capacity(config.proxy.threads);
    let std_listener = proxy_listener.into_std()?;
    let mut workers = Vec::with_capacity(config.proxy.threads);
    for i in 0..config.proxy.threads {
        let listener = std_listener.try_clone()?;
        let app = Arc::new(pingora::proxy::http_proxy(
            &server_conf,
            GenesysProxy {
                state: state.clone(),
            },
        ));
        apps.push(app.clone());
        let worker = Worker {
            app,
            pingora_shutdown: pingora_shutdown_rx.clone(),
            shutdown: shutdown_rx.clone(),
            grace: config.proxy.shutdown_grace,
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker.run(listener)),
                    Err(e) => tracing::error!(error = %e, "cannot start a proxy worker runtime"),
                }
                let _ = done_tx.send(());
            })
            .context("spawning a proxy worker thread")?;
        workers.push(done_rx);
    }
    drop(std_listener);

    audit.record(
        "PROXY_STARTED",
        serde_json::json!({
            "proxy_listen": proxy_addr.to_string(),
            "admin_listen": admin_addr.to_string(),
            "api_host": api.host,
            "version": env!("CARGO_PKG_VERSION"),
        }),
        None,
    );
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, api = %api.base_url(), "genesys-auth-proxy listening");

    let mut shutdown = shutdown_rx;
    let done = tokio::spawn(async move {
        let _ = shutdown.wait_for(|s| *s).await;
        admin_state.draining.store(true, Ordering::Relaxed);
        pingora_shutdown_tx.send_replace(true);
        for app in &apps {
            app.cleanup().await;
        }
        for done in workers {
            let _ = done.await;
        }
        if let Some(t) = watch_task {
            let _ = t.await;
        }
        admin_stop_tx.send_replace(true);
        let _ = anomaly_task.await;
        let _ = refresher_task.await;
        let _ = resolver_task.await;
        let _ = admin_task.await;
        audit.record("PROXY_STOPPED", serde_json::json!({}), None);
        tracing::info!("stopped");
    });

    Ok(Running {
        reloader,
        proxy_addr,
        admin_addr,
        store,
        metrics,
        shutdown_tx,
        done,
    })
}

/// Binds a listener; with `reuse_port` a second process can bind the same address, which is
/// how a restart hands over without refusing connections (see the README).
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// One proxy worker: its own runtime, accept loop and connections.
struct Worker {
    app: Arc<pingora::proxy::HttpProxy<GenesysProxy>>,
    pingora_shutdown: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
}

impl Worker {
    /// Accepts until shutdown, then waits up to the grace period for this worker's connections.
    async fn run(mut self, listener: std::net::TcpListener) {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "proxy worker cannot use the listener");
                return;
            }
        };
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        let stream = to_pingora_stream(tcp, peer);
                        let app = self.app.clone();
                        let watch = self.pingora_shutdown.clone();
                        tracker.spawn(async move {
                            let mut reuse = app.process_new(stream, &watch).await;
                            while let Some(stream) = reuse {
                                reuse = app.process_new(stream, &watch).await;
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = until_true(&mut self.shutdown) => break,
            }
        }
        drop(listener);
        tracker.close();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_seconds = self.grace.as_secs(),
                "grace period over; dropping remaining connections"
            );
        }
    }
}

/// Wraps an accepted socket the way pingora's own listener does, so `client_addr()` works.
fn to_pingora_stream(tcp: tokio::net::TcpStream, peer: SocketAddr) -> pingora::protocols::Stream {
    let mut stream = pingora::protocols::l4::stream::Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
    Box::new(stream)
}

/// Resolves the API host now and every `every`, off the request path. A failed lookup keeps
/// the previous addresses.
async fn resolve_loop(
    api: ApiTarget,
    state: Arc<ProxyState>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = until_true(&mut shutdown) => return,
        }
        match tokio::net::lookup_host((api.host.as_str(), api.port)).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if !addrs.is_empty() {
                    state.upstream_addrs.store(Arc::new(addrs));
                }
                delay = every;
            }
            Err(e) => {
                tracing::warn!(host = %api.host, error = %e, "cannot resolve the Genesys API host; keeping previous addresses");
                delay = Duration::from_secs(1).min(every);
            }
        }
    }
}

/// Resolves once the shutdown flag is true (the watch guard is dropped inside, keeping callers
/// `Send`).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
