//! One credential's running parts: its token store, refresher, budget, anomaly monitor and
//! JWKS cache, and its listener. The top-level credential is one unit; each `[[credential]]`
//! is another. What the process owns is shared, not repeated per unit: the worker threads
//! (each accepts on every unit's listener), the connection cap, the Redis link, the DNS
//! lookups of each API host, the audit log and admin listener. A unit's token lifecycle is
//! its own, so one credential's failures never touch another's tokens.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use http::HeaderValue;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::ServerConf;
use pingora::utils::tls::{parse_x509, WrappedX509};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::CredentialView;
use crate::admission::{self, Capacity, Gate};
use crate::anomaly::AnomalyMonitor;
use crate::audit::AuditLog;
use crate::budget::Budget;
use crate::config::{ApiTarget, Credential, CredentialName, Live, Process};
use crate::metrics::Metrics;
use crate::proxy::{GenesysProxy, ProxyState};
use crate::reload::ReloadTarget;
use crate::shutdown::Shutdown;
use crate::token::endpoint::TokenEndpoint;
use crate::token::refresher::{self, Credentials, RefreshInfo, Refresher};
use crate::token::report::Reporter;
use crate::token::shared::{self, Peers, Standalone};
use crate::token::store::TokenStore;
use crate::worker::{self, Listener, Worker};

/// A credential whose listener is bound but whose tasks are not started yet: binding every
/// listener first means a port clash fails start-up before anything runs.
pub(super) struct Bound {
    pub config: Credential,
    pub listener: TcpListener,
    pub addr: SocketAddr,
}

impl Bound {
    pub fn bind(config: &Credential, reuse_port: bool) -> anyhow::Result<Bound> {
        let listen = config.restart.proxy.listen;
        let key = config.name.key("proxy.listen");
        let listener = worker::bind(listen, reuse_port)
            .with_context(|| format!("{key}: cannot bind {listen}"))?;
        Ok(Bound {
            config: config.clone(),
            addr: listener.local_addr()?,
            listener,
        })
    }
}

/// What a unit takes from the process.
pub(super) struct Shared<'a> {
    pub audit: Arc<AuditLog>,
    pub redis: Option<&'a Arc<crate::cluster::Link>>,
    pub resolver: &'a mut Resolver,
    pub shutdown: Shutdown,
}

/// A running credential.
pub(super) struct Unit {
    pub name: CredentialName,
    pub addr: SocketAddr,
    /// The listener, handed to the process's worker threads.
    pub listener: Option<TcpListener>,
    pub state: Arc<ProxyState>,
    pub live: Arc<ArcSwap<Live>>,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    pub anomaly: Arc<AnomalyMonitor>,
    pub budget: Arc<Budget>,
    pub jwks: Option<Arc<crate::token::jwks::Jwks>>,
    pub refresh_info: Arc<Mutex<RefreshInfo>>,
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub commands: mpsc::Sender<refresher::Command>,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Unit {
    /// Starts the credential's refresher, anomaly ticks and budget dispatcher.
    pub fn start(bound: Bound, metrics: Arc<Metrics>, process: Shared) -> anyhow::Result<Unit> {
        let Shared {
            audit,
            redis,
            resolver,
            shutdown,
        } = process;
        let config = &bound.config;
        let live = Arc::new(ArcSwap::from_pointee(config.live.clone()));
        let endpoint = TokenEndpoint::for_credential(config).map_err(anyhow::Error::msg)?;
        let jwks = config.restart.token.jwks.as_ref().map(|settings| {
            let client = endpoint.http_client();
            Arc::new(crate::token::jwks::Jwks::new(
                settings.clone(),
                client,
                endpoint.max_response_bytes(),
                metrics.clone(),
            ))
        });
        let store = Arc::new(TokenStore::with_slots(config.restart.token.pool_size));
        let anomaly = Arc::new(AnomalyMonitor::new(
            live.clone(),
            audit.clone(),
            metrics.clone(),
        ));
        let budget = Arc::new(Budget::new(store.clone(), live.clone(), metrics.clone()));
        let refresh_info: Arc<Mutex<RefreshInfo>> = Arc::default();
        let (commands, commands_rx) = mpsc::channel(16);
        let shared = refresher::Shared {
            name: config.name.clone(),
            store: store.clone(),
            live: live.clone(),
            report: Reporter {
                metrics: metrics.clone(),
                audit,
                anomaly: anomaly.clone(),
                info: refresh_info.clone(),
            },
        };
        let c = &config.secrets;
        let credentials = Credentials {
            client_id: c.client_id.clone(),
            secret: c.client_secret.clone(),
            previous: c.previous_client_secret.clone(),
        };
        let (cluster, peers): (_, Box<dyn Peers>) = match redis {
            None => (None, Box::new(Standalone)),
            Some(redis) => {
                let token_url = config.restart.genesys.token_url.as_str();
                let (cluster, events) =
                    crate::cluster::Cluster::new(redis, token_url, &c.client_id, &metrics);
                let peers =
                    shared::Redis::new(cluster.clone(), &c.client_secret, events, metrics.clone())
                        .map_err(anyhow::Error::msg)?;
                (Some(cluster), Box::new(peers))
            }
        };
        let refresher = Refresher::new(
            shared,
            endpoint,
            credentials,
            commands_rx,
            jwks.clone(),
            peers,
        );
        let upstream = &config.restart.genesys;
        let api = &upstream.api;
        // Through an egress proxy (unless NO_PROXY names the API host), the proxy's host is
        // what is resolved; the API host is named in the CONNECT and resolved by the proxy.
        let tunnel = match &upstream.egress {
            Some(egress) if !egress.bypasses(&api.host) => {
                let proxy_host = ApiTarget {
                    tls: false,
                    host: egress.host.clone(),
                    port: egress.port,
                };
                let addrs = resolver.addresses(&proxy_host);
                let timeout = config.live.proxy.upstream_connect_timeout;
                Some(Arc::new(crate::egress::Tunnel::new(
                    egress, &api.host, api.port, addrs, timeout,
                )))
            }
            _ => None,
        };
        let addrs = resolver.addresses(api);
        let state = proxy_state(
            config, &live, addrs, tunnel, &store, &metrics, &anomaly, &budget,
        )?;
        let mut tasks = vec![
            tokio::spawn(refresher.run(shutdown.clone())),
            spawn_anomaly_ticks(anomaly.clone(), shutdown.clone()),
            tokio::spawn(crate::budget::dispatch(budget.clone(), shutdown.clone())),
        ];
        if let Some(cluster) = &cluster {
            tasks.push(tokio::spawn(share_budget(
                cluster.clone(),
                budget.clone(),
                live.clone(),
                shutdown.clone(),
            )));
        }
        Ok(Unit {
            name: bound.config.name.clone(),
            addr: bound.addr,
            listener: Some(bound.listener),
            state,
            live,
            store,
            metrics,
            anomaly,
            budget,
            jwks,
            refresh_info,
            cluster,
            commands,
            tasks,
        })
    }

    /// What the admin listener reports of this credential.
    pub fn view(&self) -> CredentialView {
        CredentialView {
            name: self.name.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            refresh: self.refresh_info.clone(),
            anomaly: self.anomaly.clone(),
            budget: self.budget.clone(),
            jwks: self.jwks.clone(),
            cluster: self.cluster.clone(),
        }
    }

    /// What a reload may change in this credential.
    pub fn reload_target(&self) -> ReloadTarget {
        ReloadTarget {
            name: self.name.clone(),
            live: self.live.clone(),
            refresher: self.commands.clone(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn proxy_state(
    config: &Credential,
    live: &Arc<ArcSwap<Live>>,
    upstream_addrs: Arc<ArcSwap<Vec<SocketAddr>>>,
    tunnel: Option<Arc<crate::egress::Tunnel>>,
    store: &Arc<TokenStore>,
    metrics: &Arc<Metrics>,
    anomaly: &Arc<AnomalyMonitor>,
    budget: &Arc<Budget>,
) -> anyhow::Result<Arc<ProxyState>> {
    let upstream = &config.restart.genesys;
    Ok(Arc::new(ProxyState {
        name: config.name.clone(),
        live: live.clone(),
        host_header: HeaderValue::from_str(&upstream.api.host_header())
            .context("api_url: host is not a valid Host header")?,
        api: upstream.api.clone(),
        upstream_addrs,
        tunnel,
        store: store.clone(),
        metrics: metrics.clone(),
        anomaly: anomaly.clone(),
        budget: budget.clone(),
        upstream_ca: upstream.ca_certs.as_ref().map(|certs| {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::from(wrapped.into_boxed_slice())
        }),
    }))
}

/// `[cluster]`: every 200 ms, adds the calls this replica made with each token to the count in
/// Redis and takes the total back into the budget, so replicas sharing a token do not together
/// overrun its rate limit. Off the request path; a Redis failure only loses the sharing.
async fn share_budget(
    cluster: Arc<crate::cluster::Cluster>,
    budget: Arc<Budget>,
    live: Arc<ArcSwap<Live>>,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let window = live.load().budget.window;
        for (token, delta) in budget.take_unshared() {
            if let Ok(Some((total, left))) =
                cluster.add_usage(&token.fingerprint, delta, window).await
            {
                if !budget.observe_shared(&token, total, left) {
                    cluster.implausible_count(&token.fingerprint, total);
                }
            }
        }
    }
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

/// The process's proxy worker threads, and how to stop them.
pub(super) struct ProxyWorkers {
    pub apps: Vec<Arc<pingora::proxy::HttpProxy<GenesysProxy>>>,
    pub pingora_shutdown: watch::Sender<bool>,
    pub done: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// Starts `proxy.threads` worker threads, each accepting on every unit's listener under the
/// process's one connection cap.
pub(super) fn spawn_workers(
    units: &mut [Unit],
    process: &Process,
    gate: &Arc<crate::apps::Gatekeeper>,
    tls: Option<Arc<crate::worker::tls::ServerTls>>,
    shutdown: Shutdown,
) -> anyhow::Result<ProxyWorkers> {
    let server_conf = Arc::new(ServerConf::default());
    let (pingora_shutdown, pingora_rx) = watch::channel(false);
    let threads = process.proxy.threads;
    let (limit, warning) = admission::connection_limit(process.proxy.max_connections);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let capacity = Capacity::new(limit);
    // Every listener can reach every credential: an app's credential picks the route.
    let routes: Arc<[Arc<ProxyState>]> = units.iter().map(|u| u.state.clone()).collect();
    let mut listeners = Vec::with_capacity(units.len());
    for u in units.iter_mut() {
        let listener = u.listener.take().context("a unit's listener")?.into_std()?;
        let gate = Arc::new(Gate::new(
            u.state.live.clone(),
            u.metrics.clone(),
            capacity.clone(),
        ));
        listeners.push((listener, gate));
    }
    let mut workers = ProxyWorkers {
        apps: Vec::with_capacity(threads * listeners.len()),
        pingora_shutdown,
        done: Vec::with_capacity(threads),
    };
    for i in 0..threads {
        let mut mine = Vec::with_capacity(listeners.len());
        for (own, (socket, accept_gate)) in listeners.iter().enumerate() {
            let proxy = GenesysProxy {
                routes: routes.clone(),
                own,
                gate: gate.clone(),
            };
            let mut app = pingora::proxy::http_proxy(&server_conf, proxy);
            // CONNECT reaches our hooks, which refuse it in the Genesys error shape (pingora's
            // own refusal is an empty 405).
            let mut options = HttpServerOptions::default();
            options.allow_connect_method_proxying = true;
            app.server_options = Some(options);
            let app = Arc::new(app);
            workers.apps.push(app.clone());
            mine.push(Listener {
                socket: socket.try_clone()?,
                app,
                gate: accept_gate.clone(),
                tls: tls.clone(),
                apps: gate.clone(),
            });
        }
        let worker = Worker {
            listeners: mine,
            pingora_shutdown: pingora_rx.clone(),
            shutdown: shutdown.clone(),
            grace: process.proxy.shutdown_grace,
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(worker.run()),
                    Err(e) => tracing::error!(error = %e, "cannot start a proxy worker runtime"),
                }
                let _ = done_tx.send(());
            })
            .context("spawning a proxy worker thread")?;
        workers.done.push(done_rx);
    }
    Ok(workers)
}

/// The DNS lookups of every API host the credentials call: one loop per distinct host and
/// port, whose answers every credential calling it reads.
#[derive(Default)]
pub(super) struct Resolver {
    targets: Vec<(ApiTarget, Arc<ArcSwap<Vec<SocketAddr>>>)>,
}

impl Resolver {
    /// Where the addresses of `api` will be.
    pub fn addresses(&mut self, api: &ApiTarget) -> Arc<ArcSwap<Vec<SocketAddr>>> {
        let same = |t: &ApiTarget| t.host == api.host && t.port == api.port;
        if let Some((_, addrs)) = self.targets.iter().find(|(t, _)| same(t)) {
            return addrs.clone();
        }
        let addrs = Arc::new(ArcSwap::from_pointee(Vec::new()));
        self.targets.push((api.clone(), addrs.clone()));
        addrs
    }

    /// Starts one lookup loop per host.
    pub fn spawn(self, every: Duration, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        self.targets
            .into_iter()
            .map(|(api, addrs)| tokio::spawn(resolve_loop(api, addrs, every, shutdown.clone())))
            .collect()
    }
}

/// Resolves the API host now and every `every`, off the request path. A failed lookup keeps
/// the previous addresses.
async fn resolve_loop(
    api: ApiTarget,
    addrs_out: Arc<ArcSwap<Vec<SocketAddr>>>,
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
                    addrs_out.store(Arc::new(addrs));
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
