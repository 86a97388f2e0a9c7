//! Cluster mode (`[cluster]`): replicas share one token lifecycle through Redis. A process
//! holds one [`Link`] (one connection, one subscription) whatever its number of credentials;
//! each credential's [`Cluster`] handle derives its own keys on it.
//!
//! Each credential's tokens are stored sealed ([`seal`]) under
//! `{key_prefix}:{kid}:token:{slot}` with their expiry. A replica that needs a token first
//! reads the stored one; only if it has none it may use (missing, the one it holds, or one the
//! API refused) does it take the lease `{…}:lease:{slot}` (`SET NX PX`), read again, mint,
//! store and publish on `{key_prefix}:published`; the others wait for that message (or the
//! lease to lapse) and adopt the stored token. So a 401 storm across every replica costs one
//! token request. Every Redis call is bounded by `cluster.timeout_ms`; on any failure the
//! replica works standalone (it mints for itself), says so in a metric, `/status` and the
//! audit log, and converges again once Redis answers. Nothing on the request path touches
//! Redis.

pub mod seal;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, Notify};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::model::ClusterSettings;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::sync::lock;
pub use seal::{SealError, Sealer};

/// Why a Redis step failed. Every failure leaves the replica working standalone; the message
/// is what `/status` and the audit log show (never a secret or a token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.redis_url: {0}")]
    Url(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis: no answer within {0} ms")]
    Timeout(u128),
    #[error("redis: cannot connect in time")]
    ConnectTimeout,
    #[error("redis: cannot subscribe in time")]
    SubscribeTimeout,
    #[error("redis: reconnecting after a broken link")]
    Reconnecting,
    #[error("stored token is not text")]
    NotText,
    #[error("cannot encode the stored record: {0}")]
    Encode(String),
    #[error(transparent)]
    Seal(#[from] seal::SealError),
}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        ClusterError::Redis(e.to_string())
    }
}

/// A token read back from Redis.
pub struct Stored {
    pub token: Secret,
    pub expires_at_wall: SystemTime,
}

/// What the cluster task tells the refresher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedEvent {
    /// A replica stored a new token for key `kid`, slot `slot`.
    Published { kid: String, slot: usize },
    /// Redis answers (every second, and once subscribed): take the stored token if it
    /// differs from the held one, or store the held one if none is stored. Catches up on any
    /// publication missed while the subscription was down.
    Sync,
}

#[derive(Serialize, Deserialize)]
struct Record {
    exp_ms: u64,
    sealed: String,
}

/// A replica waits at most this long for the replica holding the lease to publish (a mint takes
/// tens of milliseconds; requests wait `proxy.refresh_wait_timeout_ms`, 5 s by default).
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(2);

/// Releases the lease only if this replica still owns it.
const RELEASE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Adds `ARGV[1]` calls to a token's shared count (`KEYS[1]`), opening its window of
/// `ARGV[2]` ms with the first call; returns the count and the ms left in the window. A zero
/// add never opens a window.
const ADD_USAGE: &str = r#"
local delta = tonumber(ARGV[1])
if delta == 0 and redis.call('exists', KEYS[1]) == 0 then return {0, -2} end
local total = redis.call('incrby', KEYS[1], delta)
if redis.call('pttl', KEYS[1]) < 0 then redis.call('pexpire', KEYS[1], ARGV[2]) end
return {total, redis.call('pttl', KEYS[1])}
"#;

/// Events waiting for a refresher, at most; more are dropped (see [`Cluster::new`]).
const EVENT_QUEUE: usize = 64;

/// Reconnect backoff: doubling from [`RECONNECT_FIRST`] to [`RECONNECT_MAX`].
#[derive(Default)]
struct Reconnect {
    not_before: Option<std::time::Instant>,
    failures: u32,
}

const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// A broken link is tried again at least this often, so replicas rejoin within about a second
/// of Redis answering again.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// The process's one link to Redis: one connection and one subscription, shared by every
/// credential ([`Cluster`] is a credential's handle on it). Publications are routed to every
/// credential's refresher, which keeps those of its own key id.
pub struct Link {
    settings: ClusterSettings,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// This replica's lease owner id.
    owner: String,
    up: AtomicBool,
    /// No new connection before this (backoff after a failed or dropped one).
    reconnect: Mutex<Reconnect>,
    /// Shared budget counts ignored as impossible (negative or above the limit).
    implausible: std::sync::atomic::AtomicU64,
    last_implausible_log: Mutex<Option<std::time::Instant>>,
    published: Notify,
    last_error: Mutex<Option<String>>,
    /// Each credential's refresher.
    routes: Mutex<Vec<mpsc::Sender<SharedEvent>>>,
    /// Each credential's `cluster_redis_up` (with several credentials every one renders it).
    up_gauges: Mutex<Vec<prometheus::IntGauge>>,
    audit: Arc<AuditLog>,
}

/// One credential's handle on the process's [`Link`]: its key derivation context.
pub struct Cluster {
    link: Arc<Link>,
    /// The credential's identity (token URL and client id): part of every key derivation.
    context: String,
}

impl Cluster {
    /// The handle of the credential `client_id` at `token_url`; events for its refresher go
    /// to the returned receiver.
    pub fn new(
        link: &Arc<Link>,
        token_url: &str,
        client_id: &str,
        metrics: &Metrics,
    ) -> (Arc<Cluster>, mpsc::Receiver<SharedEvent>) {
        // Bounded: the events are hints (a Sync comes every second), so a refresher that is busy
        // minting loses nothing by missing some; an unbounded queue could grow without end.
        let (events, receiver) = mpsc::channel(EVENT_QUEUE);
        lock(&link.routes).push(events);
        let gauge = metrics.cluster_redis_up.clone();
        gauge.set(i64::from(link.is_up()));
        lock(&link.up_gauges).push(gauge);
        let cluster = Cluster {
            link: link.clone(),
            context: format!("{token_url} {client_id}"),
        };
        (Arc::new(cluster), receiver)
    }

    /// The sealing key of `secret` for this credential.
    pub fn sealer(&self, secret: &Secret) -> Result<Sealer, ClusterError> {
        Ok(Sealer::derive(secret, &self.context)?)
    }

    /// The process's link.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }
}

impl std::ops::Deref for Cluster {
    type Target = Link;

    fn deref(&self) -> &Link {
        &self.link
    }
}

impl Link {
    /// The link `[cluster]` describes. Nothing is connected yet.
    pub fn new(
        settings: ClusterSettings,
        metrics: Arc<Metrics>,
        audit: Arc<AuditLog>,
    ) -> Result<Arc<Link>, ClusterError> {
        let mut info: redis::ConnectionInfo = settings
            .redis_url
            .as_str()
            .parse()
            .map_err(|e: redis::RedisError| ClusterError::Url(e.to_string()))?;
        if let Some(p) = &settings.password {
            info.redis.password = Some(p.expose().to_string());
        }
        let client = redis::Client::open(info)
            .map_err(|e: redis::RedisError| ClusterError::Url(e.to_string()))?;
        metrics.cluster_redis_up.set(0);
        let link = Link {
            settings,
            client,
            conn: tokio::sync::Mutex::new(None),
            owner: crate::fingerprint::sha256_hex(
                format!("{}{:?}", std::process::id(), SystemTime::now()).as_bytes(),
            )[..16]
                .to_string(),
            up: AtomicBool::new(false),
            reconnect: Mutex::new(Reconnect::default()),
            implausible: std::sync::atomic::AtomicU64::new(0),
            last_implausible_log: Mutex::new(None),
            published: Notify::new(),
            last_error: Mutex::new(None),
            routes: Mutex::new(Vec::new()),
            up_gauges: Mutex::new(vec![metrics.cluster_redis_up.clone()]),
            audit,
        };
        Ok(Arc::new(link))
    }

    /// Tells every credential's refresher (a full queue drops the hint).
    fn send(&self, event: SharedEvent) {
        for route in lock(&self.routes).iter() {
            let _ = route.try_send(event.clone());
        }
    }

    /// Whether the last Redis call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// How long a replica waits for another one's lease before it mints for itself: the
    /// lease, but at most [`MAX_LEASE_WAIT`] (a lease its holder failed to release must not
    /// keep requests waiting for their replacement token).
    pub fn lease_wait(&self) -> Duration {
        self.settings.lease.min(MAX_LEASE_WAIT)
    }

    fn key(&self, s: &Sealer, what: &str, slot: usize) -> String {
        format!("{}:{}:{what}:{slot}", self.settings.key_prefix, s.kid)
    }

    fn channel(&self) -> String {
        format!("{}:published", self.settings.key_prefix)
    }

    /// The stored token of `slot`, if there is one this secret can open.
    pub async fn load(&self, s: &Sealer, slot: usize) -> Result<Option<Stored>, ClusterError> {
        let key = self.key(s, "token", slot);
        let value: Option<String> = self
            .call(|mut c| {
                let key = key.clone();
                async move { redis::AsyncCommands::get(&mut c, key).await }
            })
            .await?;
        let Some(record) = value.and_then(|v| serde_json::from_str::<Record>(&v).ok()) else {
            return Ok(None);
        };
        let aad = format!("{key}|{}", record.exp_ms);
        let Some(plain) = s.open(aad.as_bytes(), &record.sealed) else {
            return Ok(None);
        };
        let token = String::from_utf8(plain).map_err(|_| ClusterError::NotText)?;
        Ok(Some(Stored {
            token: Secret::new(token),
            expires_at_wall: UNIX_EPOCH + Duration::from_millis(record.exp_ms),
        }))
    }

    /// Stores `token` for `slot` until it expires and tells every replica.
    pub async fn save(
        &self,
        s: &Sealer,
        slot: usize,
        token: &Secret,
        expires_at_wall: SystemTime,
    ) -> Result<(), ClusterError> {
        let key = self.key(s, "token", slot);
        let exp_ms = expires_at_wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let ttl = expires_at_wall
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_millis()
            .max(1) as u64;
        let aad = format!("{key}|{exp_ms}");
        let sealed = s.seal(aad.as_bytes(), token.expose().as_bytes())?;
        let value = serde_json::to_string(&Record { exp_ms, sealed })
            .map_err(|e| ClusterError::Encode(e.to_string()))?;
        let (channel, message) = (self.channel(), format!("{}:{slot}", s.kid));
        self.call(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(&key)
                .arg(&value)
                .arg("PX")
                .arg(ttl)
                .ignore()
                .cmd("PUBLISH")
                .arg(&channel)
                .arg(&message)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Takes the right to mint for `slot` (`SET NX PX lease_ms`): true when this replica has
    /// it.
    pub async fn take_lease(&self, s: &Sealer, slot: usize) -> Result<bool, ClusterError> {
        let key = self.key(s, "lease", slot);
        let (owner, ttl) = (self.owner.clone(), self.settings.lease.as_millis() as u64);
        let set: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    /// Gives the lease back, if this replica still holds it.
    pub async fn release_lease(&self, s: &Sealer, slot: usize) {
        let key = self.key(s, "lease", slot);
        let owner = self.owner.clone();
        // One round trip (EVAL, not EVALSHA with a NOSCRIPT retry): a lease left behind makes
        // the others wait for it to lapse.
        let _ = self
            .call(|mut c| async move {
                redis::cmd("EVAL")
                    .arg(RELEASE)
                    .arg(1)
                    .arg(&key)
                    .arg(&owner)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// Adds `delta` calls made with the token `fingerprint` to the count all replicas share
    /// (one window of `window` from the first call): the total, and the time left in the
    /// window (`None` when no call was made yet).
    pub async fn add_usage(
        &self,
        fingerprint: &str,
        delta: u64,
        window: Duration,
    ) -> Result<Option<(i64, Duration)>, ClusterError> {
        let key = format!("{}:budget:{fingerprint}", self.settings.key_prefix);
        let ms = window.as_millis() as u64;
        let (total, ttl): (i64, i64) = self
            .call(|mut c| async move {
                redis::Script::new(ADD_USAGE)
                    .key(&key)
                    .arg(delta)
                    .arg(ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok((ttl > 0).then(|| (total, Duration::from_millis(ttl as u64))))
    }

    /// Waits until another replica publishes a token, or `at_most`.
    pub async fn wait_published(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.published.notified()).await;
    }

    /// One bounded Redis call; its outcome moves the link up or down.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, ClusterError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = async {
            let conn = self.connection().await.map_err(|e| (e, false))?;
            match tokio::time::timeout(self.settings.timeout, op(conn)).await {
                Ok(Ok(v)) => Ok(v),
                // An error reply (WRONGTYPE, NOSCRIPT …) says the link works.
                Ok(Err(e))
                    if e.kind() != redis::ErrorKind::IoError
                        && !e.is_timeout()
                        && !e.is_connection_dropped()
                        && !e.is_unrecoverable_error() =>
                {
                    Err((ClusterError::from(e), false))
                }
                Ok(Err(e)) => Err((ClusterError::from(e), true)),
                Err(_) => Err((
                    ClusterError::Timeout(self.settings.timeout.as_millis()),
                    true,
                )),
            }
        }
        .await;
        match result {
            Ok(v) => {
                self.mark_up();
                Ok(v)
            }
            Err((e, broken)) => {
                // A connection that timed out (a black-holed link, a reply too large to read
                // in time) is never trusted again: the next call opens a new one, after a
                // backoff. The redis client would otherwise keep the stalled socket forever.
                if broken {
                    self.drop_connection().await;
                }
                self.mark_down(&e);
                Err(e)
            }
        }
    }

    async fn drop_connection(&self) {
        *self.conn.lock().await = None;
        let mut r = lock(&self.reconnect);
        r.failures = r.failures.saturating_add(1);
        let delay = RECONNECT_FIRST
            .saturating_mul(1 << r.failures.min(10))
            .min(RECONNECT_MAX);
        r.not_before = Some(std::time::Instant::now() + delay);
    }

    /// `[cluster]` budget: a shared count that cannot be true was ignored.
    pub fn implausible_count(&self, fingerprint: &str, total: i64) {
        self.implausible.fetch_add(1, Ordering::Relaxed);
        let mut last = lock(&self.last_implausible_log);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(token = fingerprint, count = total, "cluster: ignoring a shared budget count outside [0, allowed] (written by something other than a replica?)");
        }
    }

    /// The shared connection, connecting (bounded) when there is none yet.
    async fn connection(&self) -> Result<ConnectionManager, ClusterError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        if let Some(t) = lock(&self.reconnect).not_before {
            if std::time::Instant::now() < t {
                return Err(ClusterError::Reconnecting);
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.settings.timeout)
            .set_response_timeout(self.settings.timeout)
            .set_number_of_retries(1);
        let connect = self.client.get_connection_manager_with_config(config);
        let connected = match tokio::time::timeout(self.settings.timeout, connect).await {
            Err(_) => Err(ClusterError::ConnectTimeout),
            Ok(Err(e)) => Err(ClusterError::from(e)),
            Ok(Ok(c)) => Ok(c),
        };
        let mut r = lock(&self.reconnect);
        match connected {
            Ok(c) => {
                *r = Reconnect::default();
                *conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                r.failures = r.failures.saturating_add(1);
                let delay = RECONNECT_FIRST
                    .saturating_mul(1 << r.failures.min(10))
                    .min(RECONNECT_MAX);
                r.not_before = Some(std::time::Instant::now() + delay);
                Err(e)
            }
        }
    }

    fn set_up_gauges(&self, value: i64) {
        for gauge in lock(&self.up_gauges).iter() {
            gauge.set(value);
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.set_up_gauges(1);
            *lock(&self.last_error) = None;
            self.audit.record(
                AuditEvent::ClusterJoined,
                json!({"redis": self.settings.redis_url, "key_prefix": self.settings.key_prefix}),
                None,
            );
            tracing::info!(redis = %self.settings.redis_url, "cluster: sharing tokens through Redis");
        }
    }

    fn mark_down(&self, error: &ClusterError) {
        *lock(&self.last_error) = Some(error.to_string());
        if self.up.swap(false, Ordering::Relaxed) {
            self.set_up_gauges(0);
            self.audit.record(
                AuditEvent::ClusterStandalone,
                json!({"redis": self.settings.redis_url, "error": error.to_string()}),
                None,
            );
            tracing::warn!(redis = %self.settings.redis_url, %error, "cluster: Redis unavailable; minting standalone until it answers");
        }
    }

    /// `/status` `cluster`: shared or standalone, and why.
    pub fn view(&self) -> serde_json::Value {
        json!({
            "state": if self.is_up() { "shared" } else { "standalone" },
            "redis": self.settings.redis_url,
            "key_prefix": self.settings.key_prefix,
            "last_error": *lock(&self.last_error),
            "implausible_budget_counts": self.implausible.load(Ordering::Relaxed),
        })
    }

    /// Keeps the link alive until shutdown: the subscription to published tokens, and every
    /// second a `PING` (so a Redis outage and its end are noticed without traffic) followed by
    /// a [`SharedEvent::Sync`] (so replicas converge even on a publication they missed).
    pub async fn run(self: Arc<Self>, mut shutdown: crate::shutdown::Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let subscription = self.subscribe().await;
            let Ok(mut pubsub) = subscription else {
                tokio::select! {
                    _ = tick.tick() => { self.ping_and_sync().await; }
                    _ = shutdown.wait() => return,
                }
                continue;
            };
            self.send(SharedEvent::Sync);
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    m = futures_util::StreamExt::next(&mut messages) => match m {
                        Some(m) => self.on_published(m.get_payload::<String>().unwrap_or_default()),
                        None => break,
                    },
                    _ = tick.tick() => {
                        if !self.ping_and_sync().await {
                            break;
                        }
                    }
                    _ = shutdown.wait() => return,
                }
            }
        }
    }

    /// A `PING`; when Redis answers, asks the refresher to sync. True when it answered.
    async fn ping_and_sync(&self) -> bool {
        let up = self.ping().await.is_ok();
        if up {
            self.send(SharedEvent::Sync);
        }
        up
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, ClusterError> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(self.channel()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.settings.timeout, connect).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(ClusterError::from(e)),
            Err(_) => Err(ClusterError::SubscribeTimeout),
        }
    }

    async fn ping(&self) -> Result<(), ClusterError> {
        self.call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    fn on_published(&self, payload: String) {
        let Some((kid, slot)) = payload.rsplit_once(':') else {
            return;
        };
        let Ok(slot) = slot.parse() else { return };
        self.published.notify_waiters();
        self.send(SharedEvent::Published {
            kid: kid.to_string(),
            slot,
        });
    }
}
