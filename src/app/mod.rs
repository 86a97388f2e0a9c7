//! The one place that wires the parts together: what the process owns once (worker threads
//! accepting on every credential's listener under one connection cap, the Redis link, one DNS
//! loop per API host, the admin listener, audit log, graceful shutdown) and each credential's
//! unit (token store, refresher, budget).
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
use crate::config::{Config, CredentialName};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::shutdown::{self, Trigger};
use crate::token::store::TokenStore;
use unit::{spawn_workers, Bound, ProxyWorkers, Resolver, Shared, Unit};

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
    let p = &config.process;
    if let Some(settings) = &p.tracing.otlp {
        crate::telemetry::init(settings)?;
    }
    // With [[credential]]s every metric sample and audit line names its credential; a
    // single-credential proxy renders exactly as before.
    let several = config.several();
    let top_metrics = Arc::new(if several {
        Metrics::for_credential(CredentialName::DEFAULT)
    } else {
        Metrics::new()
    });
    let target = &p.audit.target;
    let audit = Arc::new(
        AuditLog::open(target, &config.top().secrets.client_id, top_metrics.clone())
            .with_context(|| format!("audit.path: cannot open {target:?}"))?,
    );
    // Every listener is bound before anything starts: a clash fails start-up cleanly.
    let bound = config
        .credentials
        .iter()
        .map(|c| Bound::bind(c, p.proxy.reuse_port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let admin_listener = TcpListener::bind(p.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", p.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let (trigger, shutdown) = shutdown::channel();

    // What the process owns once, whatever the number of credentials.
    let redis = match &p.cluster.settings {
        None => None,
        Some(settings) => Some(
            crate::cluster::Link::new(settings.clone(), top_metrics.clone(), audit.clone())
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let mut resolver = Resolver::default();
    let process = Process {
        audit: &audit,
        top_metrics: &top_metrics,
        redis: redis.as_ref(),
        shutdown: &shutdown,
    };
    let mut units = start_units(bound, &process, &mut resolver)?;
    let mut tasks: Vec<JoinHandle<()>> = resolver.spawn(p.proxy.dns_refresh, &shutdown);
    if let Some(redis) = &redis {
        tasks.push(tokio::spawn(redis.clone().run(shutdown.clone())));
    }
    let gate = Arc::new(crate::apps::Gatekeeper::new(&config.apps, audit.clone()));
    tasks.push(tokio::spawn(gate.clone().run_sweeper(shutdown.clone())));
    let tls = match &config.tls.listener {
        None => None,
        Some(t) => Some(Arc::new(crate::worker::tls::ServerTls::new(t)?)),
    };
    let workers = spawn_workers(&mut units, p, &gate, tls.clone(), shutdown.clone())?;
    let reloader = Arc::new(Reloader::new(
        config_path,
        config.clone(),
        units.iter().map(Unit::reload_target).collect(),
        crate::reload::Swaps {
            apps: gate.clone(),
            tls,
        },
        audit.clone(),
        top_metrics.clone(),
    ));
    let files = reloader.watched_files().await;
    tasks.extend(crate::watch::secret_files(
        reloader.clone(),
        files,
        shutdown.clone(),
    ));
    let admin_state = Arc::new(AdminState {
        credentials: units.iter().map(Unit::view).collect(),
        apps: gate.clone(),
        audit: audit.clone(),
        draining: false.into(),
        reloader: reloader.clone(),
        reload_token: p.admin.reload_token.clone(),
    });
    let admin = spawn_admin(admin_listener, admin_state.clone(), &p.admin);

    record_start(&audit, &config, &units, admin_addr);
    for u in &units {
        tracing::info!(credential = %u.name, proxy = %u.addr, admin = %admin_addr, "genesys-auth-proxy listening");
    }
    let credentials = units[1..]
        .iter()
        .map(|u| RunningCredential {
            name: u.name.to_string(),
            proxy_addr: u.addr,
            store: u.store.clone(),
        })
        .collect();
    let (store, metrics, proxy_addr) = (
        units[0].store.clone(),
        units[0].metrics.clone(),
        units[0].addr,
    );
    for u in units {
        tasks.extend(u.tasks);
    }
    let done = tokio::spawn(drain(shutdown, admin_state, workers, admin, tasks));
    Ok(Running {
        reloader,
        proxy_addr,
        admin_addr,
        store,
        metrics,
        audit,
        credentials,
        trigger,
        done,
    })
}

/// What every unit takes from the process.
struct Process<'a> {
    audit: &'a Arc<AuditLog>,
    top_metrics: &'a Arc<Metrics>,
    redis: Option<&'a Arc<crate::cluster::Link>>,
    shutdown: &'a shutdown::Shutdown,
}

/// Starts every bound credential. With several, each gets metrics labelled with its name and
/// an audit handle naming it; a single credential keeps the unlabelled ones.
fn start_units(
    bound: Vec<Bound>,
    p: &Process,
    resolver: &mut Resolver,
) -> anyhow::Result<Vec<Unit>> {
    let several = bound.len() > 1;
    let mut units = Vec::with_capacity(bound.len());
    for b in bound {
        let (metrics, audit) = if !several {
            (p.top_metrics.clone(), p.audit.clone())
        } else {
            let name = &b.config.name;
            let scoped = Arc::new(p.audit.scoped(name.as_str(), &b.config.secrets.client_id));
            let metrics = if name.is_top() {
                p.top_metrics.clone()
            } else {
                Arc::new(Metrics::for_credential(name.as_str()))
            };
            (metrics, scoped)
        };
        let shared = Shared {
            audit,
            redis: p.redis,
            resolver,
            shutdown: p.shutdown.clone(),
        };
        units.push(Unit::start(b, metrics, shared)?);
    }
    Ok(units)
}

/// `PROXY_STARTED`, with every credential's listener when there are several.
fn record_start(audit: &AuditLog, config: &Config, units: &[Unit], admin_addr: SocketAddr) {
    let mut details = serde_json::json!({
        "proxy_listen": units[0].addr.to_string(),
        "admin_listen": admin_addr.to_string(),
        "api_host": config.top().restart.genesys.api.host,
        "version": env!("CARGO_PKG_VERSION"),
    });
    if units.len() > 1 {
        let listeners: serde_json::Map<String, serde_json::Value> = units
            .iter()
            .map(|u| (u.name.to_string(), u.addr.to_string().into()))
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
    settings: &crate::config::model::AdminSettings,
) -> (Trigger, JoinHandle<()>) {
    let limits = admin::Limits {
        max_connections: settings.max_connections,
        idle_timeout: settings.idle_timeout,
        allowed_hosts: Arc::new(settings.allowed_hosts.clone()),
    };
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
    // The last requests' spans (bounded by the export timeout; off the runtime's threads).
    if crate::telemetry::enabled() {
        let _ = tokio::task::spawn_blocking(crate::telemetry::flush).await;
    }
    tracing::info!("stopped");
}
