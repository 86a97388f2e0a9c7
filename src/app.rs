//! The one place that wires the parts together: token store and refresher, DNS resolver, the
//! pingora proxy on its worker threads, the admin listener, audit log, and graceful shutdown.
//!
//! [`start`] reads like a script: build the shared parts, bind both listeners (port 0 works:
//! tests read the bound addresses from [`Running`]), spawn each service, and return at once;
//! [`Running::shutdown`] drains in-flight requests within the configured grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use http::HeaderValue;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::server::configuration::ServerConf;
use pingora::utils::tls::{parse_x509, WrappedX509};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::admission::{self, Gate};
use crate::anomaly::AnomalyMonitor;
use crate::audit::{AuditEvent, AuditLog};
use crate::budget::Budget;
use crate::config::{ApiTarget, Config, Live};
use crate::metrics::Metrics;
use crate::proxy::{GenesysProxy, ProxyState};
use crate::reload::Reloader;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::token::endpoint::TokenEndpoint;
use crate::token::refresher::{self, Credentials, RefreshInfo, Refresher};
use crate::token::report::Reporter;
use crate::token::secret::Secret;
use crate::token::store::TokenStore;
use crate::worker::{self, Worker};

/// A running proxy.
pub struct Running {
    pub reloader: Arc<Reloader>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    trigger: Trigger,
    done: JoinHandle<()>,
}

impl Running {
    /// Starts a graceful shutdown and waits until it is complete.
    pub async fn shutdown(self) {
        self.trigger.fire();
        let _ = self.done.await;
    }

    /// Waits for SIGTERM or SIGINT, then shuts down gracefully. SIGHUP reloads.
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
                    let report = self.reloader.reload("sighup").await;
                    tracing::info!(outcome = report.outcome.as_str(), body = %report.body, "SIGHUP reload");
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

/// The parts every service shares.
struct Core {
    live: Arc<ArcSwap<Live>>,
    /// With `validation = "jwks"`: the key-set cache (the refresher verifies, `/status` shows).
    jwks: Option<Arc<crate::token::jwks::Jwks>>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    audit: Arc<AuditLog>,
    store: Arc<TokenStore>,
    anomaly: Arc<AnomalyMonitor>,
    refresh_info: Arc<Mutex<RefreshInfo>>,
}

impl Core {
    fn new(config: &Config) -> anyhow::Result<Core> {
        let metrics = Arc::new(Metrics::new());
        let target = &config.restart.audit.target;
        let audit = Arc::new(
            AuditLog::open(target, &config.credentials.client_id, metrics.clone())
                .with_context(|| format!("audit.path: cannot open {target:?}"))?,
        );
        let live = Arc::new(ArcSwap::from_pointee(config.live.clone()));
        let jwks = match &config.restart.token.jwks {
            None => None,
            Some(settings) => {
                let client = TokenEndpoint::for_config(config)
                    .map_err(anyhow::Error::msg)?
                    .http_client();
                let jwks = crate::token::jwks::Jwks::new(settings.clone(), client, metrics.clone());
                Some(Arc::new(jwks))
            }
        };
        let store = Arc::new(TokenStore::with_slots(config.restart.token.pool_size));
        let anomaly = Arc::new(AnomalyMonitor::new(
            live.clone(),
            audit.clone(),
            metrics.clone(),
        ));
        Ok(Core {
            jwks,
            budget: Arc::new(Budget::new(store.clone(), live.clone(), metrics.clone())),
            live,
            metrics,
            audit,
            store,
            anomaly,
            refresh_info: Arc::default(),
        })
    }
}

impl Core {
    fn admin_state(
        &self,
        reloader: Arc<Reloader>,
        reload_token: Option<Secret>,
    ) -> Arc<AdminState> {
        Arc::new(AdminState {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            refresh: self.refresh_info.clone(),
            audit: self.audit.clone(),
            draining: false.into(),
            anomaly: self.anomaly.clone(),
            reloader,
            reload_token,
            budget: self.budget.clone(),
            jwks: self.jwks.clone(),
        })
    }
}

/// Binds the listeners, starts every background task and returns.
/// `config_path` is where reloads read the configuration from.
pub async fn start(config: Config, config_path: PathBuf) -> anyhow::Result<Running> {
    install_crypto_provider();
    let core = Core::new(&config)?;
    let r = &config.restart;
    let proxy_listener = worker::bind(r.proxy.listen, r.proxy.reuse_port)
        .with_context(|| format!("proxy.listen: cannot bind {}", r.proxy.listen))?;
    let admin_listener = TcpListener::bind(r.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", r.admin.listen))?;
    let (proxy_addr, admin_addr) = (proxy_listener.local_addr()?, admin_listener.local_addr()?);
    let (trigger, shutdown) = shutdown::channel();

    let (commands, refresher) = spawn_refresher(&core, &config, shutdown.clone())?;
    let state = proxy_state(&core, &config)?;
    let mut tasks = vec![
        refresher,
        tokio::spawn(resolve_loop(
            r.genesys.api.clone(),
            state.clone(),
            r.proxy.dns_refresh,
            shutdown.clone(),
        )),
        spawn_anomaly_ticks(core.anomaly.clone(), shutdown.clone()),
        tokio::spawn(core.budget.clone().dispatch(shutdown.clone())),
    ];
    let reloader = Arc::new(Reloader::new(
        config_path,
        config.clone(),
        core.live.clone(),
        commands,
        core.audit.clone(),
        core.metrics.clone(),
    ));
    let files = reloader.watched_files().await;
    tasks.extend(crate::watch::secret_files(
        reloader.clone(),
        files,
        shutdown.clone(),
    ));
    let admin_state = core.admin_state(reloader.clone(), r.admin.reload_token.clone());
    let admin = spawn_admin(admin_listener, admin_state.clone());
    let proxy = spawn_workers(proxy_listener, state, &config, shutdown.clone())?;

    core.audit.record(
        AuditEvent::ProxyStarted,
        serde_json::json!({
            "proxy_listen": proxy_addr.to_string(),
            "admin_listen": admin_addr.to_string(),
            "api_host": r.genesys.api.host,
            "version": env!("CARGO_PKG_VERSION"),
        }),
        None,
    );
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, api = %r.genesys.api.base_url(), "genesys-auth-proxy listening");
    let done = tokio::spawn(drain(shutdown, admin_state, proxy, admin, tasks));
    Ok(Running {
        reloader,
        proxy_addr,
        admin_addr,
        store: core.store,
        metrics: core.metrics,
        audit: core.audit,
        trigger,
        done,
    })
}

/// The refresher task and the channel the reload path commands it through.
fn spawn_refresher(
    core: &Core,
    config: &Config,
    shutdown: Shutdown,
) -> anyhow::Result<(mpsc::Sender<refresher::Command>, JoinHandle<()>)> {
    let endpoint = TokenEndpoint::for_config(config).map_err(anyhow::Error::msg)?;
    let (commands_tx, commands_rx) = mpsc::channel(16);
    let shared = refresher::Shared {
        store: core.store.clone(),
        live: core.live.clone(),
        report: Reporter {
            metrics: core.metrics.clone(),
            audit: core.audit.clone(),
            anomaly: core.anomaly.clone(),
            info: core.refresh_info.clone(),
        },
    };
    let c = &config.credentials;
    let credentials = Credentials {
        client_id: c.client_id.clone(),
        secret: c.client_secret.clone(),
        previous: c.previous_client_secret.clone(),
    };
    let refresher = Refresher::new(
        shared,
        endpoint,
        credentials,
        commands_rx,
        core.jwks.clone(),
    );
    Ok((commands_tx, tokio::spawn(refresher.run(shutdown))))
}

fn proxy_state(core: &Core, config: &Config) -> anyhow::Result<Arc<ProxyState>> {
    let upstream = &config.restart.genesys;
    Ok(Arc::new(ProxyState {
        live: core.live.clone(),
        host_header: HeaderValue::from_str(&upstream.api.host_header())
            .context("genesys.api_url: host is not a valid Host header")?,
        api: upstream.api.clone(),
        upstream_addrs: ArcSwap::from_pointee(Vec::new()),
        store: core.store.clone(),
        metrics: core.metrics.clone(),
        anomaly: core.anomaly.clone(),
        budget: core.budget.clone(),
        upstream_ca: upstream.ca_certs.as_ref().map(|certs| {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::from(wrapped.into_boxed_slice())
        }),
    }))
}

/// Clears quiet anomalies every 250 ms.
fn spawn_anomaly_ticks(anomaly: Arc<AnomalyMonitor>, mut shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => anomaly.tick(),
                _ = shutdown.wait() => return,
            }
        }
    })
}

/// The admin listener outlives the proxy's drain, so balancers see `/readyz` 503 while it
/// runs; it stops when the returned sender fires.
fn spawn_admin(listener: TcpListener, state: Arc<AdminState>) -> (Trigger, JoinHandle<()>) {
    let (stop, mut stopped) = shutdown::channel();
    let router = admin::router(state);
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stopped.wait().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    (stop, task)
}

/// The proxy's worker threads, and how to stop them.
struct ProxyWorkers {
    apps: Vec<Arc<pingora::proxy::HttpProxy<GenesysProxy>>>,
    pingora_shutdown: watch::Sender<bool>,
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
}

fn spawn_workers(
    listener: TcpListener,
    state: Arc<ProxyState>,
    config: &Config,
    shutdown: Shutdown,
) -> anyhow::Result<ProxyWorkers> {
    let server_conf = Arc::new(ServerConf::default());
    let (pingora_shutdown, pingora_rx) = watch::channel(false);
    let threads = config.restart.proxy.threads;
    let (limit, warning) = admission::connection_limit(config.restart.proxy.max_connections);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let gate = Arc::new(Gate::new(state.live.clone(), state.metrics.clone(), limit));
    let std_listener = listener.into_std()?;
    let mut workers = ProxyWorkers {
        apps: Vec::with_capacity(threads),
        pingora_shutdown,
        done: Vec::with_capacity(threads),
    };
    for i in 0..threads {
        let listener = std_listener.try_clone()?;
        let proxy = GenesysProxy {
            state: state.clone(),
        };
        let mut app = pingora::proxy::http_proxy(&server_conf, proxy);
        // CONNECT reaches our hooks, which refuse it in the Genesys error shape (pingora's own
        // refusal is an empty 405).
        let mut options = HttpServerOptions::default();
        options.allow_connect_method_proxying = true;
        app.server_options = Some(options);
        let app = Arc::new(app);
        workers.apps.push(app.clone());
        let worker = Worker {
            app,
            pingora_shutdown: pingora_rx.clone(),
            shutdown: shutdown.clone(),
            grace: config.restart.proxy.shutdown_grace,
            gate: gate.clone(),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(worker.run(listener)),
                    Err(e) => tracing::error!(error = %e, "cannot start a proxy worker runtime"),
                }
                let _ = done_tx.send(());
            })
            .context("spawning a proxy worker thread")?;
        workers.done.push(done_rx);
    }
    Ok(workers)
}

/// Waits for the shutdown, then stops in order: readiness off, proxy drained, background
/// tasks, admin listener, and the audit log flushed last.
async fn drain(
    mut shutdown: Shutdown,
    admin_state: Arc<AdminState>,
    proxy: ProxyWorkers,
    admin: (Trigger, JoinHandle<()>),
    tasks: Vec<JoinHandle<()>>,
) {
    shutdown.wait().await;
    admin_state.draining.store(true, Ordering::Relaxed);
    proxy.pingora_shutdown.send_replace(true);
    for app in &proxy.apps {
        app.cleanup().await;
    }
    for done in proxy.done {
        let _ = done.await;
    }
    for task in tasks {
        let _ = task.await;
    }
    admin.0.fire();
    let _ = admin.1.await;
    let audit = &admin_state.audit;
    audit.record(AuditEvent::ProxyStopped, serde_json::json!({}), None);
    audit.flush().await;
    tracing::info!("stopped");
}

/// Resolves the API host now and every `every`, off the request path. A failed lookup keeps
/// the previous addresses.
async fn resolve_loop(
    api: ApiTarget,
    state: Arc<ProxyState>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => return,
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
