//! Every Prometheus metric, defined here and nowhere else. Names carry units; label values come
//! from small fixed sets (never paths, client addresses or tokens). Only the admin listener
//! serves them.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

mod handles;

pub use handles::{
    status_label, Admission, AppCounters, AppOutcome, AuthFailure, ClusterTake, Code, Handles,
    JwksFetch, RateLimitOutcome, ReplayOutcome, SpanOutcome,
};

use handles::LabelSet;

const PREFIX: &str = "genesys_proxy";

/// Latency buckets for a proxy: sub-millisecond to tens of seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    pub request_duration_seconds: Histogram,
    pub upstream_unauthorized_total: IntCounter,
    pub token_requests_total: IntCounterVec,
    pub token_refresh_duration_seconds: Histogram,
    pub token_expiry_timestamp_seconds: Gauge,
    pub token_fallback_active: IntGauge,
    pub secret_rotations_total: IntCounterVec,
    pub config_reloads_total: IntCounterVec,
    pub upstream_rate_limited_total: IntCounter,
    pub upstream_ratelimit_remaining: IntGauge,
    pub anomaly_active: IntGaugeVec,
    pub audit_events_total: IntCounterVec,
    pub audit_write_failures_total: IntCounter,
    pub rejected_requests_total: IntCounterVec,
    pub client_connections: IntGauge,
    pub budget_queue_depth: IntGauge,
    pub budget_queue_wait_seconds: Histogram,
    pub budget_queue_abandoned_total: IntCounter,
    pub token_pool_budget_remaining: IntGaugeVec,
    pub jwks_fetches_total: Handles<JwksFetch>,
    pub jwks_keys: IntGauge,
    pub cluster_redis_up: IntGauge,
    pub cluster_tokens_total: Handles<ClusterTake>,
    /// Handles to the request path's labelled counters (see [`handles`]).
    pub requests: Handles<Code>,
    pub replays: Handles<ReplayOutcome>,
    /// `rate_limited_total{scope="token"}`.
    pub rate_limited: Handles<RateLimitOutcome>,
    /// `rate_limited_total{scope="endpoint"}`.
    pub rate_limited_endpoint: Handles<RateLimitOutcome>,
    pub budget_requests: AppCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's `[[app]]` metrics: one set whatever the number of credentials, so they carry
/// no `credential` label.
pub struct AppMetrics {
    registry: Registry,
    /// `app_requests_total{app, outcome}`: configured names, and `unknown` for requests
    /// without a valid proof.
    pub requests: AppCounters<AppOutcome>,
    pub auth_failures: Handles<AuthFailure>,
}

impl Default for AppMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AppMetrics {
    #[rustfmt::skip]
    pub fn new() -> Self {
        let m = Maker(Registry::new());
        let requests = m.labelled_counter("app_requests_total", "Requests by [[app]] (configured names, else unknown) and outcome: allowed, not_allowed (outside its methods or paths), unauthenticated (no valid proof), rate_limited (over its share: the proxy's own 429).", &["app", "outcome"]);
        let failures = m.counter_vec("app_auth_failures_total", "Failed app proofs by kind: login (client id or secret), api_key, app_token (forged, expired or revoked), missing, malformed, throttled (refused unchecked: too many failures from the address), certificate (a verified client certificate naming no app), workload_token (a JWT that does not verify or names no app's subject).", "proof", AuthFailure::LABELS);
        AppMetrics {
            requests: AppCounters::new(requests, "unknown"),
            auth_failures: Handles::new(failures, &[]),
            registry: m.0,
        }
    }
}

/// The process's `[tracing]` metrics (rendered only when tracing is configured).
pub struct TraceMetrics {
    registry: Registry,
    /// `trace_spans_total{outcome}`: exported, dropped (the queue was full), failed (the
    /// collector refused or did not answer the batch).
    pub spans: Handles<SpanOutcome>,
    /// `trace_export_queue_spans`: finished spans waiting for export.
    pub queued: IntGauge,
}

impl Default for TraceMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceMetrics {
    #[rustfmt::skip]
    pub fn new() -> Self {
        let m = Maker(Registry::new());
        let spans = m.counter_vec("trace_spans_total", "Finished trace spans by outcome: exported (the collector took them), dropped (the export queue was full: never blocks a request), failed (the collector refused the batch or did not answer in time).", "outcome", SpanOutcome::LABELS);
        let queued = m.int_gauge("trace_export_queue_spans", "Finished spans waiting in the export queue (at most tracing.max_queue_spans).");
        TraceMetrics {
            spans: Handles::new(spans, &[]),
            queued,
            registry: m.0,
        }
    }
}

/// The Prometheus text exposition of several credentials' metrics: families of the same name
/// are merged (each sample carries its `credential` label), so every family appears once.
pub fn render_all<'a>(all: impl IntoIterator<Item = &'a Metrics>) -> String {
    render_with(all, None)
}

/// [`render_all`], plus the process's app metrics.
pub fn render_with<'a>(
    all: impl IntoIterator<Item = &'a Metrics>,
    apps: Option<&AppMetrics>,
) -> String {
    render_process(all, apps, None)
}

/// [`render_with`], plus the `[tracing]` metrics when tracing is on.
pub fn render_process<'a>(
    all: impl IntoIterator<Item = &'a Metrics>,
    apps: Option<&AppMetrics>,
    traces: Option<&TraceMetrics>,
) -> String {
    let mut families: Vec<prometheus::proto::MetricFamily> = Vec::new();
    let registries = all
        .into_iter()
        .map(|m| &m.registry)
        .chain(apps.map(|a| &a.registry))
        .chain(traces.map(|t| &t.registry));
    for registry in registries {
        for mut family in registry.gather() {
            match families.iter_mut().find(|f| f.name() == family.name()) {
                Some(f) => f.mut_metric().extend(family.take_metric()),
                None => families.push(family),
            }
        }
    }
    let mut out = Vec::new();
    // Encoding our own well-formed families into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&families, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

/// Creates metrics and registers each one as it is made, so the set of fields and the set of
/// registered collectors cannot drift apart. Definitions are constants: the `expect`s cannot
/// fire at run time (the unit test renders every metric).
struct Maker(Registry);

impl Maker {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("unique metric names"); // ok: constant set
        c
    }

    fn hist(&self, name: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(name, help)
            .namespace(PREFIX)
            .buckets(LATENCY_BUCKETS.to_vec());
        self.add(Histogram::with_opts(opts).expect("static metric definition")) // ok: constant
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::with_opts(opts(name, help)).expect("static metric definition"))
        // ok: constant
    }

    fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::with_opts(opts(name, help)).expect("static metric definition"))
        // ok: constant
    }

    fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::with_opts(opts(name, help)).expect("static metric definition"))
        // ok: constant
    }

    fn int_gauge_vec(&self, name: &str, help: &str, label: &str) -> IntGaugeVec {
        self.add(IntGaugeVec::new(opts(name, help), &[label]).expect("static metric definition"))
        // ok: constant
    }

    fn labelled_counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(opts(name, help), labels).expect("static metric definition"))
        // ok: constant
    }

    /// A labelled counter whose `known` label values start at 0, so rate() and alerts work
    /// before the first event.
    fn counter_vec(&self, name: &str, help: &str, label: &str, known: &[&str]) -> IntCounterVec {
        let c = self.add(
            IntCounterVec::new(opts(name, help), &[label]).expect("static metric definition"), // ok: constant
        );
        for v in known {
            c.with_label_values(&[v]);
        }
        c
    }
}

/// Outcomes of a token call (`token_requests_total{outcome}`).
const TOKEN_OUTCOMES: &[&str] = &[
    "success",
    "invalid_client",
    "rate_limited",
    "server_error",
    "network_error",
    "invalid_response",
    "validation_failed",
];
const REJECT_REASONS: &[&str] = &[
    "client_not_allowed",
    "path_not_allowed",
    "method_not_allowed",
    "bad_request",
    "too_many_connections",
    "request_header_timeout",
    "no_token",
    "upstream_unreachable",
    "upstream_timeout",
    "unauthenticated",
    "app_not_allowed",
    "auth_throttled",
    "tls_required",
    "tls_handshake_failed",
];

impl Metrics {
    /// Metrics without a `credential` label: a single-credential proxy renders as it always
    /// did.
    pub fn new() -> Self {
        Self::with_registry(Registry::new())
    }

    /// Metrics whose every sample carries `credential="<name>"` (with `[[credential]]`s).
    pub fn for_credential(name: &str) -> Self {
        let labels =
            std::collections::HashMap::from([("credential".to_string(), name.to_string())]);
        // Only an empty prefix is refused, and there is none.
        match Registry::new_custom(None, Some(labels)) {
            Ok(registry) => Self::with_registry(registry),
            Err(_) => Self::new(),
        }
    }

    /// One line per metric: name, help, label and its known values.
    #[rustfmt::skip]
    fn with_registry(registry: Registry) -> Self {
        let m = Maker(registry);
        let requests_total = m.counter_vec("requests_total", "Requests answered by the proxy, by HTTP status code.", "code", &[]);
        let replays_total = m.counter_vec("replays_total", "Requests replayed or not after an upstream 401, by outcome.", "outcome", ReplayOutcome::LABELS);
        let rate_limited_total = m.labelled_counter("rate_limited_total", "Requests that met a rate limit, by scope (token: the token's own budget; endpoint: an endpoint or org limit met while the token had budget, which holds that route) and outcome: absorbed (a 429 re-sent after budget freed or the hold ended), passed_through (Genesys's 429), queue_timeout and queue_full (the proxy's own 429).", &["scope", "outcome"]);
        // Every series from 0, so rate() and alerts work before the first event.
        for scope in ["token", "endpoint"] {
            for outcome in RateLimitOutcome::LABELS {
                rate_limited_total.with_label_values(&[scope, outcome]);
            }
        }
        let budget_requests_total = m.labelled_counter("budget_requests_total", "Requests by application group (configured [[budget.app]] names, else other) and admission: served at once, served after queueing, or refused.", &["app", "outcome"]);
        Metrics {
            request_duration_seconds: m.hist("request_duration_seconds", "Time from request start to response end, in seconds."),
            upstream_unauthorized_total: m.counter("upstream_unauthorized_total", "Upstream 401 answers seen."),
            token_requests_total: m.counter_vec("token_requests_total", "Token endpoint calls by outcome.", "outcome", TOKEN_OUTCOMES),
            token_refresh_duration_seconds: m.hist("token_refresh_duration_seconds", "Duration of a token refresh (mint and validate), in seconds."),
            token_expiry_timestamp_seconds: m.gauge("token_expiry_timestamp_seconds", "Unix time at which the current token expires."),
            token_fallback_active: m.int_gauge("token_fallback_active", "1 while the token in use was minted with the previous client secret."),
            secret_rotations_total: m.counter_vec("secret_rotations_total", "Client secret rotations by outcome.", "outcome", &["success", "failed"]),
            config_reloads_total: m.counter_vec("config_reloads_total", "Configuration reloads by outcome.", "outcome", &[]),
            upstream_rate_limited_total: m.counter("upstream_rate_limited_total", "Upstream 429 answers passed through."),
            upstream_ratelimit_remaining: m.int_gauge("upstream_ratelimit_remaining", "Requests left in the current Genesys rate-limit window (allowed - count)."),
            anomaly_active: m.int_gauge_vec("anomaly_active", "1 while an anomaly of this kind is raised.", "kind"),
            audit_events_total: m.counter_vec("audit_events_total", "Audit events written, by event.", "event", &[]),
            audit_write_failures_total: m.counter("audit_write_failures_total", "Audit events that could not be written."),
            rejected_requests_total: m.counter_vec("rejected_requests_total", "Requests refused by the proxy itself, by reason.", "reason", REJECT_REASONS),
            client_connections: m.int_gauge("client_connections", "Client connections open on the proxy listener."),
            budget_queue_depth: m.int_gauge("budget_queue_depth", "Requests waiting for rate-limit budget."),
            budget_queue_wait_seconds: m.hist("budget_queue_wait_seconds", "Time requests waited for rate-limit budget, in seconds."),
            budget_queue_abandoned_total: m.counter("budget_queue_abandoned_total", "Queued requests whose client left before budget freed: they left the queue unsent."),
            token_pool_budget_remaining: m.int_gauge_vec("token_pool_budget_remaining", "Rate-limit budget left in the current window, per token pool slot (0 .. pool_size-1).", "slot"),
            jwks_fetches_total: Handles::new(m.counter_vec("jwks_fetches_total", "JWKS fetches (validation = \"jwks\") by outcome.", "outcome", JwksFetch::LABELS), &[]),
            jwks_keys: m.int_gauge("jwks_keys", "Keys in the cached JWKS (validation = \"jwks\")."),
            cluster_redis_up: m.int_gauge("cluster_redis_up", "[cluster]: 1 while Redis answers and tokens are shared, 0 while this replica works standalone."),
            cluster_tokens_total: Handles::new(m.counter_vec("cluster_tokens_total", "[cluster]: tokens this replica took, by how: adopted (stored by another replica), minted_shared (minted under the lease and stored), minted_standalone (minted alone while Redis failed).", "how", ClusterTake::LABELS), &[]),
            requests: Handles::new(requests_total, &[]),
            replays: Handles::new(replays_total, &[]),
            rate_limited: Handles::new(rate_limited_total.clone(), &["token"]),
            rate_limited_endpoint: Handles::new(rate_limited_total, &["endpoint"]),
            budget_requests: AppCounters::new(budget_requests_total, "other"),
            registry: m.0,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render_all([self])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_prefixed_and_rendered() {
        let m = Metrics::new();
        m.requests.inc(Code(200));
        m.token_requests_total.with_label_values(&["success"]).inc();
        m.replays.inc(ReplayOutcome::Success);
        m.secret_rotations_total
            .with_label_values(&["success"])
            .inc();
        m.config_reloads_total.with_label_values(&["success"]).inc();
        m.audit_events_total
            .with_label_values(&["PROXY_STARTED"])
            .inc();
        m.rejected_requests_total
            .with_label_values(&["client_not_allowed"])
            .inc();
        m.request_duration_seconds.observe(0.001);
        m.anomaly_active
            .with_label_values(&["refresh_failures"])
            .set(0);
        let text = m.render();
        for name in [
            "requests_total",
            "request_duration_seconds",
            "upstream_unauthorized_total",
            "replays_total",
            "token_requests_total",
            "token_refresh_duration_seconds",
            "token_expiry_timestamp_seconds",
            "token_fallback_active",
            "secret_rotations_total",
            "config_reloads_total",
            "upstream_rate_limited_total",
            "upstream_ratelimit_remaining",
            "anomaly_active",
            "audit_events_total",
            "rejected_requests_total",
        ] {
            assert!(
                text.contains(&format!("genesys_proxy_{name}")),
                "missing {name}"
            );
        }
    }
}
