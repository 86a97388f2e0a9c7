//! The simulator's in-memory state: OAuth clients and their secrets, issued tokens, rate-limit
//! windows, scripted faults and the counters behind `GET /__sim/stats`.
//!
//! Everything sits behind short-lived `std::sync::Mutex` locks that are never held across an
//! `.await`, so handlers on many threads can share it safely.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::jwt::SigningKeys;
use super::SimConfig;
use crate::fingerprint::{constant_time_eq, fingerprint};
use crate::sync::lock;

/// The way a scripted token-endpoint fault fails a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// HTTP 500 with a JSON error body.
    Status500,
    /// Never answer (until the caller gives up or the simulator stops).
    Timeout,
    /// HTTP 200 whose body is not JSON.
    Garbage,
    /// HTTP 200 with `{}`.
    Empty,
    /// Genesys's token-endpoint throttling answer (400 `invalid_request`, "rate limit exceeded").
    RateLimit,
    /// 401 `invalid_client`, as if the credentials were wrong.
    InvalidClient,
    /// HTTP 200 with 64 MiB of white space, chunked (no `Content-Length`): a client that
    /// reads answers whole runs out of memory.
    HugeBody,
    /// A good token whose answer says `expires_in: 1e300`.
    FarExpiry,
}

/// One issued access token.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub client_id: String,
    pub fingerprint: String,
    pub expires_at: Instant,
    pub last_used: Instant,
    pub issued_at: SystemTime,
    /// Start of the current per-token rate-limit window and the calls made in it.
    pub window_start: Instant,
    pub window_count: u64,
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Expired,
    Idle,
}

/// The answer to one authenticated API call's bookkeeping.
#[derive(Debug, Clone)]
pub struct ApiAdmission {
    pub client_id: String,
    pub fingerprint: String,
    pub issued_at: SystemTime,
    pub idles_at: Option<SystemTime>,
    /// Calls made in the current window, including this one.
    pub count: u64,
    pub allowed: u64,
    /// Seconds until the window resets (at least 1).
    pub reset_seconds: u64,
    pub limited: bool,
}

#[derive(Debug, Default)]
struct Stats {
    token_total: u64,
    token_by_outcome: BTreeMap<String, u64>,
    api_total: u64,
    api_by_status: BTreeMap<String, u64>,
    api_refused: BTreeMap<String, u64>,
    api_limited_by_token: BTreeMap<String, u64>,
    api_by_token: BTreeMap<String, u64>,
    api_endpoint_limited: u64,
    revocations: u64,
}

/// Shared simulator state.
pub struct SimState {
    pub config: SimConfig,
    clients: Mutex<HashMap<String, Vec<String>>>,
    tokens: Mutex<HashMap<String, TokenRecord>>,
    token_calls: Mutex<HashMap<String, VecDeque<Instant>>>,
    faults: Mutex<VecDeque<(FaultKind, u64)>>,
    recent: Mutex<VecDeque<String>>,
    stats: Mutex<Stats>,
    pub token_latency_ms: AtomicU64,
    pub api_latency_ms: AtomicU64,
    pub token_lifetime_seconds: AtomicU64,
    /// API calls being served right now (lets tests see a request is in flight).
    pub api_in_flight: AtomicU64,
    pub keys: SigningKeys,
    /// JWT mode: the last token request as received, without the secret.
    pub last_token_request: Mutex<Option<serde_json::Value>>,
    /// Per `config.endpoint_limits` entry: the window's start and the calls counted in it.
    endpoint_windows: Mutex<Vec<(Instant, u64)>>,
}

/// The token endpoint's throttling window (the API's is `SimConfig::api_rate_limit_window`).
const WINDOW: Duration = Duration::from_secs(60);
/// How many issued token values [`SimState::recent_token_values`] remembers.
pub const RECENT_TOKENS: usize = 4096;

impl SimState {
    pub fn new(config: SimConfig) -> Self {
        let mut clients: HashMap<String, Vec<String>> = HashMap::new();
        for (id, secret) in &config.clients {
            clients.entry(id.clone()).or_default().push(secret.clone());
        }
        let lifetime = config.token_lifetime_seconds;
        let keys = SigningKeys::new(config.token_format == super::TokenFormat::Jwt);
        let n_limits = config.endpoint_limits.len();
        SimState {
            config,
            clients: Mutex::new(clients),
            tokens: Mutex::new(HashMap::new()),
            token_calls: Mutex::new(HashMap::new()),
            faults: Mutex::new(VecDeque::new()),
            recent: Mutex::new(VecDeque::new()),
            stats: Mutex::new(Stats::default()),
            token_latency_ms: AtomicU64::new(0),
            api_latency_ms: AtomicU64::new(0),
            token_lifetime_seconds: AtomicU64::new(lifetime),
            api_in_flight: AtomicU64::new(0),
            keys,
            last_token_request: Mutex::new(None),
            endpoint_windows: Mutex::new(vec![(Instant::now(), 0); n_limits]),
        }
    }

    // ---- clients -------------------------------------------------------------------------

    pub fn check_credentials(&self, id: &str, secret: &str) -> bool {
        let clients = lock(&self.clients);
        clients.get(id).is_some_and(|secrets| {
            secrets
                .iter()
                .any(|s| constant_time_eq(s.as_bytes(), secret.as_bytes()))
        })
    }

    /// Adds `secret` to client `id`, creating the client. Returns false if it was already there.
    pub fn add_secret(&self, id: &str, secret: &str) -> bool {
        let mut clients = lock(&self.clients);
        let secrets = clients.entry(id.to_string()).or_default();
        if secrets.iter().any(|s| s == secret) {
            return false;
        }
        secrets.push(secret.to_string());
        true
    }

    /// Removes one secret. Tokens already issued with it stay valid, as at Genesys.
    pub fn remove_secret(&self, id: &str, secret: &str) -> bool {
        let mut clients = lock(&self.clients);
        match clients.get_mut(id) {
            Some(secrets) => {
                let before = secrets.len();
                secrets.retain(|s| s != secret);
                before != secrets.len()
            }
            None => false,
        }
    }

    // ---- token endpoint ------------------------------------------------------------------

    /// Takes the next scripted fault, if any.
    pub fn next_fault(&self) -> Option<FaultKind> {
        let mut faults = lock(&self.faults);
        let (kind, left) = faults.front_mut()?;
        let kind = *kind;
        *left -= 1;
        if *left == 0 {
            faults.pop_front();
        }
        Some(kind)
    }

    pub fn push_fault(&self, kind: FaultKind, count: u64) {
        if count > 0 {
            lock(&self.faults).push_back((kind, count));
        }
    }

    /// Records one token call for `client_id` and says whether it is over the per-minute limit.
    pub fn token_rate_limited(&self, client_id: &str, now: Instant) -> bool {
        let limit = self.config.token_rate_limit_per_minute;
        let mut calls = lock(&self.token_calls);
        let window = calls.entry(client_id.to_string()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            window.pop_front();
        }
        if window.len() as u64 >= limit {
            return true;
        }
        window.push_back(now);
        false
    }

    /// Stores a newly issued token and returns its lifetime in seconds.
    pub fn store_token(&self, token: &str, client_id: &str, now: Instant) -> u64 {
        let lifetime = self.token_lifetime_seconds.load(Ordering::Relaxed);
        let record = TokenRecord {
            client_id: client_id.to_string(),
            fingerprint: fingerprint(token.as_bytes()),
            expires_at: now + Duration::from_secs(lifetime),
            last_used: now,
            issued_at: SystemTime::now(),
            window_start: now,
            window_count: 0,
        };
        let mut tokens = lock(&self.tokens);
        // Forget dead tokens now and then so a long benchmark does not grow without bound.
        if tokens.len() > 10_000 {
            tokens.retain(|_, r| r.expires_at > now);
        }
        tokens.insert(token.to_string(), record);
        drop(tokens);
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_TOKENS {
            recent.pop_front();
        }
        recent.push_back(token.to_string());
        lifetime
    }

    pub fn count_token_outcome(&self, outcome: &str) {
        let mut stats = lock(&self.stats);
        stats.token_total += 1;
        *stats
            .token_by_outcome
            .entry(outcome.to_string())
            .or_default() += 1;
    }

    // ---- API -----------------------------------------------------------------------------

    /// Checks a bearer token, marks it used (unless `preserve_idle`) and counts it against its
    /// per-minute window.
    pub fn admit(
        &self,
        token: &str,
        now: Instant,
        preserve_idle: bool,
    ) -> Result<ApiAdmission, TokenRefusal> {
        let mut tokens = lock(&self.tokens);
        let record = tokens.get_mut(token).ok_or(TokenRefusal::Unknown)?;
        if now >= record.expires_at {
            // Kept (until the periodic clean-up) so every later use counts as expired too.
            return Err(TokenRefusal::Expired);
        }
        if let Some(idle) = self.config.idle_timeout {
            if now.duration_since(record.last_used) >= idle {
                tokens.remove(token);
                return Err(TokenRefusal::Idle);
            }
        }
        if !preserve_idle {
            record.last_used = now;
        }
        let api_window = self.config.api_rate_limit_window;
        if now.duration_since(record.window_start) >= api_window {
            record.window_start = now;
            record.window_count = 0;
        }
        let allowed = self.config.api_rate_limit_per_minute;
        let limited = record.window_count >= allowed;
        if !limited {
            record.window_count += 1;
        }
        let elapsed = now.duration_since(record.window_start);
        let reset_seconds = (api_window.saturating_sub(elapsed).as_secs_f64().ceil() as u64).max(1);
        let idles_at = self.config.idle_timeout.map(|idle| {
            SystemTime::now() + idle.saturating_sub(now.duration_since(record.last_used))
        });
        Ok(ApiAdmission {
            client_id: record.client_id.clone(),
            fingerprint: record.fingerprint.clone(),
            issued_at: record.issued_at,
            idles_at,
            count: record.window_count,
            allowed,
            reset_seconds,
            limited,
        })
    }

    /// Counts a call to `path` against the endpoint limits it falls under; `Some(seconds)`
    /// until the first exceeded one's window resets when it is over.
    pub fn endpoint_limited(&self, path: &str, now: Instant) -> Option<u64> {
        let limits = &self.config.endpoint_limits;
        if limits.is_empty() {
            return None;
        }
        let mut windows = lock(&self.endpoint_windows);
        let mut over = None;
        for (limit, (start, count)) in limits.iter().zip(windows.iter_mut()) {
            if !path.starts_with(&limit.prefix) {
                continue;
            }
            if now.duration_since(*start) >= limit.window {
                *start = now;
                *count = 0;
            }
            if *count >= limit.limit {
                let left = limit.window.saturating_sub(now.duration_since(*start));
                let secs = (left.as_secs_f64().ceil() as u64).max(1);
                over = Some(over.map_or(secs, |s: u64| s.max(secs)));
            } else {
                *count += 1;
            }
        }
        if over.is_some() {
            lock(&self.stats).api_endpoint_limited += 1;
        }
        over
    }

    /// Revokes one token (DELETE /api/v2/tokens/me).
    pub fn revoke_token(&self, token: &str) -> bool {
        let removed = lock(&self.tokens).remove(token).is_some();
        if removed {
            lock(&self.stats).revocations += 1;
        }
        removed
    }

    /// Revokes every live token, or those of one client. Returns how many.
    pub fn revoke_all(&self, client_id: Option<&str>) -> u64 {
        let mut tokens = lock(&self.tokens);
        let before = tokens.len();
        match client_id {
            Some(id) => tokens.retain(|_, r| r.client_id != id),
            None => tokens.clear(),
        }
        let n = (before - tokens.len()) as u64;
        lock(&self.stats).revocations += n;
        n
    }

    /// The raw values of the last [`RECENT_TOKENS`] tokens issued, revoked or not: lets leak
    /// tests grep every output for them.
    pub fn recent_token_values(&self) -> Vec<String> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Counts a refused bearer token by why it was refused (`api_requests.refused`): an
    /// `expired` count above zero means a client sent a token past its `expires_in`.
    pub fn count_refusal(&self, refusal: TokenRefusal) {
        let reason = match refusal {
            TokenRefusal::Unknown => "unknown_or_revoked",
            TokenRefusal::Expired => "expired",
            TokenRefusal::Idle => "idle",
        };
        *lock(&self.stats)
            .api_refused
            .entry(reason.to_string())
            .or_default() += 1;
    }

    pub fn count_api(&self, status: u16, fingerprint: Option<&str>) {
        let mut stats = lock(&self.stats);
        stats.api_total += 1;
        *stats.api_by_status.entry(status.to_string()).or_default() += 1;
        if let Some(fp) = fingerprint {
            *stats.api_by_token.entry(fp.to_string()).or_default() += 1;
            if status == 429 {
                *stats
                    .api_limited_by_token
                    .entry(fp.to_string())
                    .or_default() += 1;
            }
        }
    }

    pub fn stats_json(&self, now: Instant) -> serde_json::Value {
        let live = lock(&self.tokens)
            .values()
            .filter(|r| r.expires_at > now)
            .count();
        let stats = lock(&self.stats);
        serde_json::json!({
            "token_requests": {"total": stats.token_total, "by_outcome": stats.token_by_outcome},
            "api_requests": {
                "total": stats.api_total,
                "by_status": stats.api_by_status,
                "by_token": stats.api_by_token,
                "refused": stats.api_refused,
                "rate_limited_by_token": stats.api_limited_by_token,
                "endpoint_limited": stats.api_endpoint_limited,
                "in_flight": self.api_in_flight.load(Ordering::Relaxed),
            },
            "revocations": stats.revocations,
            "live_tokens": live,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(limit: u64) -> SimState {
        SimState::new(SimConfig {
            clients: vec![("c".into(), "s".into())],
            token_rate_limit_per_minute: limit,
            api_rate_limit_per_minute: 2,
            ..SimConfig::default()
        })
    }

    #[test]
    fn faults_are_consumed_in_order() {
        let s = state(10);
        s.push_fault(FaultKind::Garbage, 2);
        s.push_fault(FaultKind::Empty, 1);
        assert_eq!(s.next_fault(), Some(FaultKind::Garbage));
        assert_eq!(s.next_fault(), Some(FaultKind::Garbage));
        assert_eq!(s.next_fault(), Some(FaultKind::Empty));
        assert_eq!(s.next_fault(), None);
    }

    #[test]
    fn token_rate_limit_slides() {
        let s = state(2);
        let t0 = Instant::now();
        assert!(!s.token_rate_limited("c", t0));
        assert!(!s.token_rate_limited("c", t0));
        assert!(s.token_rate_limited("c", t0));
        assert!(!s.token_rate_limited("c", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn api_window_limits_per_token() {
        let s = state(10);
        let t0 = Instant::now();
        s.store_token("tok", "c", t0);
        assert!(!s.admit("tok", t0, false).unwrap().limited);
        assert!(!s.admit("tok", t0, false).unwrap().limited);
        assert!(s.admit("tok", t0, false).unwrap().limited);
        assert!(!s.admit("tok", t0 + WINDOW, false).unwrap().limited);
        assert_eq!(
            s.admit("nope", t0, false).unwrap_err(),
            TokenRefusal::Unknown
        );
    }

    #[test]
    fn the_api_window_length_is_configurable_and_headers_follow_it() {
        let s = SimState::new(SimConfig {
            api_rate_limit_per_minute: 2,
            api_rate_limit_window: Duration::from_secs(5),
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        s.store_token("tok", "c", t0);
        let first = s.admit("tok", t0, false).unwrap();
        assert_eq!((first.count, first.allowed, first.reset_seconds), (1, 2, 5));
        let second = s.admit("tok", t0 + Duration::from_secs(2), false).unwrap();
        assert_eq!((second.count, second.reset_seconds), (2, 3));
        let third = s
            .admit("tok", t0 + Duration::from_millis(4_500), false)
            .unwrap();
        assert!(third.limited && third.reset_seconds == 1, "{third:?}");
        let next = s.admit("tok", t0 + Duration::from_secs(5), false).unwrap();
        assert!(!next.limited && next.count == 1);
    }

    #[test]
    fn removing_a_secret_keeps_issued_tokens() {
        let s = state(10);
        let t0 = Instant::now();
        s.store_token("tok", "c", t0);
        assert!(s.remove_secret("c", "s"));
        assert!(!s.check_credentials("c", "s"));
        assert!(s.admit("tok", t0, false).is_ok());
    }
}
