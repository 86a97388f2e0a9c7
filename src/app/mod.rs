//! The one place that wires the parts together: token store and refresher, DNS resolver, the
//! pingora proxy on its worker threads, the admin listener, audit log, and graceful shutdown.
//!
//! [`start`] reads like a script: build the shared parts, bind both listeners (port 0 works:
//! tests read the bound addresses from [`Running`]), spawn each service, and return at once;
//! [`Running::shutdown`] drains in-flight requests within the configured grace period.

mod unit;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use pingora::apps::ServerApp;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::audit::{AuditEvent, AuditLog};
use crate::config::{Config, DEFAULT_CREDENTIAL};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::shutdown::{self, Trigger};
use crate::token::store::TokenStore;
use unit::{Bound, ProxyWorkers, Unit};

/// A running `[[credential]]`: where its listener is and its token store.
pub struct RunningCredential {
    pub name: String,
    pub proxy_addr: SocketAddr,
    pub store: Arc<TokenStore>,
}

/// A running proxy.
pub struct Running {
    pub reloader: Arc<Reloader>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    /// Each `[[credential]]`, in file order (the top-level credential is the fields above).
    pub credentials: Vec<RunningCredential>,
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
                    let report = self.reloader.reload(crate::reload::Trigger::Sighup).await;
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

/// Binds the listeners, starts every background task and returns.
/// `config_path` is where reloads read the configuration from.
pub async fn start(config: Config, config_path: PathBuf) -> anyhow::Result<Running> {
    install_crypto_provider();
    // With [[credential]]s every metric sample and audit line names its credential; a
    // single-credential proxy renders exactly as before.
    let top_metrics = Arc::new(if config.extra.is_empty() {
        Metrics::new()
    } else {
        Metrics::for_credential(DEFAULT_CREDENTIAL)
    });
    let r = &config.restart;
    let target = &r.audit.target;
    let audit = Arc::new(
        AuditLog::open(target, &config.credentials.client_id, top_metrics.clone())
            .with_context(|| format!("audit.path: cannot open {target:?}"))?,
    );
    // Every listener is bound before anything starts: a clash fails start-up cleanly.
    let mut bound = vec![Bound::bind(DEFAULT_CREDENTIAL, &config)?];
    for extra in &config.extra {
        bound.push(Bound::bind(&extra.name, &extra.config)?);
    }
    let admin_listener = TcpListener::bind(r.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", r.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let (trigger, shutdown) = shutdown::channel();

    let units = start_units(bound, &audit, top_metrics.clone(), &shutdown)?;
    let reloader = Arc::new(Reloader::new(
        config_path,
        config.clone(),
        units.iter().map(Unit::reload_target).collect(),
        audit.clone(),
        top_metrics.clone(),
    ));
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let files = reloader.watched_files().await;
    tasks.extend(crate::watch::secret_files(
        reloader.clone(),
        files,
        shutdown.clone(),
    ));
    let mut views = units.iter().map(Unit::view);
    let top = views.next().context("the top-level credential")?;
    let admin_state = Arc::new(AdminState {
        top,
        others: views.collect(),
        audit: audit.clone(),
        draining: false.into(),
        reloader: reloader.clone(),
        reload_token: r.admin.reload_token.clone(),
    });
    let limits = admin::Limits {
        max_connections: r.admin.max_connections,
        idle_timeout: r.admin.idle_timeout,
        allowed_hosts: Arc::new(r.admin.allowed_hosts.clone()),
    };
    let admin = spawn_admin(admin_listener, admin_state.clone(), limits);

    record_start(&audit, &config, &units, admin_addr);
    for u in &units {
        tracing::info!(credential = %u.name, proxy = %u.addr, admin = %admin_addr, "genesys-auth-proxy listening");
    }
    let credentials = units[1..]
        .iter()
        .map(|u| RunningCredential {
            name: u.name.clone(),
            proxy_addr: u.addr,
            store: u.store.clone(),
        })
        .collect();
    let (store, metrics) = (units[0].store.clone(), units[0].metrics.clone());
    let units_addr = units[0].addr;
    let mut workers = Vec::new();
    for u in units {
        tasks.extend(u.tasks);
        workers.push(u.workers);
    }
    let done = tokio::spawn(drain(shutdown, admin_state, workers, admin, tasks));
    Ok(Running {
        reloader,
        proxy_addr: units_addr,
        admin_addr,
        store,
        metrics,
        audit,
        credentials,
        trigger,
        done,
    })
}

/// Starts every bound credential. With several, each gets metrics labelled with its name and
/// an audit handle naming it; a single credential keeps the unlabelled ones.
fn start_units(
    bound: Vec<Bound>,
    audit: &Arc<AuditLog>,
    top_metrics: Arc<Metrics>,
    shutdown: &shutdown::Shutdown,
) -> anyhow::Result<Vec<Unit>> {
    let several = bound.len() > 1;
    let mut units = Vec::with_capacity(bound.len());
    for b in bound {
        let (metrics, audit) = if !several {
            (top_metrics.clone(), audit.clone())
        } else {
            let scoped = Arc::new(audit.scoped(&b.name, &b.config.credentials.client_id));
            let metrics = if b.name == DEFAULT_CREDENTIAL {
                top_metrics.clone()
            } else {
                Arc::new(Metrics::for_credential(&b.name))
            };
            (metrics, scoped)
        };
        units.push(Unit::start(b, metrics, audit, shutdown.clone())?);
    }
    Ok(units)
}

/// `PROXY_STARTED`, with every credential's listener when there are several.
fn record_start(audit: &AuditLog, config: &Config, units: &[Unit], admin_addr: SocketAddr) {
    let mut details = serde_json::json!({
        "proxy_listen": units[0].addr.to_string(),
        "admin_listen": admin_addr.to_string(),
        "api_host": config.restart.genesys.api.host,
        "version": env!("CARGO_PKG_VERSION"),
    });
    if units.len() > 1 {
        let listeners: serde_json::Map<String, serde_json::Value> = units
            .iter()
            .map(|u| (u.name.clone(), u.addr.to_string().into()))
            .collect();
        details["credential_listeners"] = listeners.into();
    }
    audit.record(AuditEvent::ProxyStarted, details, None);
}

/// The admin listener outlives the proxy's drain, so balancers see `/readyz` 503 while it
/// runs; it stops when the returned sender fires.
fn spawn_admin(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: admin::Limits,
) -> (Trigger, JoinHandle<()>) {
    let (stop, stopped) = shutdown::channel();
    let router = admin::router(state);
    let task = tokio::spawn(admin::serve(listener, router, limits, stopped));
    (stop, task)
}

/// Waits for the shutdown, then stops in order: readiness off, every proxy drained, background
/// tasks, admin listener, and the audit log flushed last.
async fn drain(
    mut shutdown: shutdown::Shutdown,
    admin_state: Arc<AdminState>,
    proxies: Vec<ProxyWorkers>,
    admin: (Trigger, JoinHandle<()>),
    tasks: Vec<JoinHandle<()>>,
) {
    shutdown.wait().await;
    admin_state.draining.store(true, Ordering::Relaxed);
    for proxy in &proxies {
        proxy.pingora_shutdown.send_replace(true);
    }
    for proxy in proxies {
        for app in &proxy.apps {
            app.cleanup().await;
        }
        for done in proxy.done {
            let _ = done.await;
        }
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
