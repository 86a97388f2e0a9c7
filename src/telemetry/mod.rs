//! `[tracing]`: OpenTelemetry traces, exported over OTLP/HTTP (protobuf).
//!
//! A proxied request is a server span (`GET /api/v2/users/{id}`: the route with ids
//! collapsed) with a client span per upstream attempt (a 401 replay or a re-sent 429 is a
//! second attempt); token mints, their validation and secret rotations are spans of their
//! own traces. An incoming W3C `traceparent`/`tracestate` is continued, and the attempt's own
//! context is what Genesys receives. Sampling is parent-based: a request whose `traceparent`
//! says "sampled" is recorded, one that says "not sampled" is not, and a new trace is
//! recorded with probability `sample_ratio`.
//!
//! Spans are made with the OpenTelemetry API directly rather than through `tracing` spans:
//! a request lives across a dozen pingora callbacks (no one scope to enter), and an
//! unsampled request then costs one sampling decision and no allocation for attributes.
//! Finished spans go to a bounded queue and one export thread ([`export`]); nothing on the
//! request path waits for the collector.
//!
//! The tracer is process-wide (like the log subscriber): the first `app::start` with
//! `[tracing]` installs it.

mod export;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanKind, Status, TraceContextExt, TraceId, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub use opentelemetry::context::FutureExt;

use crate::config::model::TracingSettings;
use crate::metrics::TraceMetrics;

struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    metrics: Arc<TraceMetrics>,
    propagator: TraceContextPropagator,
    endpoint: String,
}

static TRACES: OnceLock<Traces> = OnceLock::new();

fn traces() -> Option<&'static Traces> {
    TRACES.get()
}

/// Builds the exporter and its thread and installs the tracer. Errors name `[tracing]`.
/// A second call in one process (tests starting several proxies) keeps the first tracer.
pub fn init(settings: &TracingSettings) -> anyhow::Result<()> {
    if TRACES.get().is_some() {
        tracing::warn!("tracing: a tracer is already installed in this process; keeping it");
        return Ok(());
    }
    let client = crate::token::endpoint::http_client(
        None,
        Duration::from_secs(2),
        export::EXPORT_TIMEOUT,
        None,
    )
    .map_err(|e| anyhow::anyhow!("tracing.otlp_endpoint: {e}"))?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(export::Http(client))
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.as_str())
        .with_timeout(export::EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("tracing.otlp_endpoint: {e}"))?;
    // OTEL_RESOURCE_ATTRIBUTES (pod name, namespace...) are read; `service_name` wins.
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
    let metrics = Arc::new(TraceMetrics::new());
    let processor = export::QueueProcessor::start(
        exporter,
        settings.max_queue_spans,
        export::DELAY,
        metrics.clone(),
    )
    .map_err(|e| anyhow::anyhow!("tracing: cannot start the export thread: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("genesys-auth-proxy");
    let endpoint = settings.endpoint.to_string();
    tracing::info!(endpoint = %endpoint, sample_ratio = settings.sample_ratio, "tracing: exporting spans over OTLP/HTTP");
    let _ = TRACES.set(Traces {
        provider,
        tracer,
        metrics,
        propagator: TraceContextPropagator::new(),
        endpoint,
    });
    Ok(())
}

/// Whether spans are made at all.
pub fn enabled() -> bool {
    TRACES.get().is_some()
}

/// `trace_spans_total` and the queue gauge, when tracing is on.
pub fn metrics() -> Option<&'static TraceMetrics> {
    traces().map(|t| &*t.metrics)
}

/// The OTLP traces URL, when tracing is on (for `/status`).
pub fn endpoint() -> Option<&'static str> {
    traces().map(|t| t.endpoint.as_str())
}

/// Exports what is queued (bounded: the export timeout), at shutdown.
pub fn flush() {
    if let Some(t) = traces() {
        let _ = t.provider.force_flush();
    }
}

/// `traceparent`'s trace id when it is well-formed (version 00 shape, not all zeros): what
/// the access log shows when tracing is off.
pub fn incoming_trace_id(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = v.split('-');
    let (version, trace) = (parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_hexdigit());
    (hex(version, 2) && version != "ff" && hex(trace, 32) && trace.bytes().any(|c| c != b'0'))
        .then_some(trace)
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Upstream<'a>(&'a mut pingora::http::RequestHeader);

impl Injector for Upstream<'_> {
    fn set(&mut self, key: &str, value: String) {
        let _ = self.0.insert_header(key.to_string(), value);
    }
}

/// A proxied request's span, and its current upstream attempt's.
pub struct RequestTrace {
    cx: Context,
    attempt: Option<Context>,
}

/// Starts the span of a request (`None` when tracing is off), continuing the client's
/// `traceparent` when it sent a valid one.
pub fn start_request(
    method: &str,
    route: String,
    path_template: &str,
    path: &str,
    headers: &http::HeaderMap,
) -> Option<Box<RequestTrace>> {
    let t = traces()?;
    let parent = t.propagator.extract(&Headers(headers));
    // The path as the access log has it: never the query string.
    let attributes = vec![
        KeyValue::new("http.request.method", method.to_string()),
        KeyValue::new("http.route", path_template.to_string()),
        KeyValue::new("url.path", path.to_string()),
    ];
    let span = t
        .tracer
        .span_builder(route)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&t.tracer, &parent);
    Some(Box::new(RequestTrace {
        cx: parent.with_span(span),
        attempt: None,
    }))
}

impl RequestTrace {
    /// The trace id (32 hex digits), for the access log.
    pub fn trace_id(&self) -> TraceId {
        self.cx.span().span_context().trace_id()
    }

    pub fn recording(&self) -> bool {
        self.cx.span().is_recording()
    }

    /// Adds an attribute to the request's span.
    pub fn set(&self, kv: KeyValue) {
        self.cx.span().set_attribute(kv);
    }

    /// Ends the previous attempt (if still open) and starts the next, a child of the request.
    /// `attributes` is called only when the request is recorded. An attempt of an unrecorded
    /// request is still a context of its own, so Genesys gets a fresh parent id (flagged not
    /// sampled).
    pub fn start_attempt(&mut self, name: &str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        self.end_attempt(None);
        let Some(t) = traces() else { return };
        let mut builder = t
            .tracer
            .span_builder(name.to_string())
            .with_kind(SpanKind::Client);
        if self.recording() {
            builder = builder.with_attributes(attributes());
        }
        let span = t.tracer.build_with_context(builder, &self.cx);
        self.attempt = Some(self.cx.with_span(span));
    }

    /// What Genesys answered the current attempt.
    pub fn attempt_answered(&self, status: u16, correlation_id: Option<&str>) {
        let Some(cx) = &self.attempt else { return };
        let span = cx.span();
        if !span.is_recording() {
            return;
        }
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(id) = correlation_id {
            span.set_attribute(KeyValue::new("genesys.correlation_id", id.to_string()));
        }
        if status >= 400 {
            span.set_status(Status::error(status.to_string()));
        }
    }

    /// Ends the current attempt, with the error that ended it if one did.
    pub fn end_attempt(&mut self, error: Option<&str>) {
        let Some(cx) = self.attempt.take() else {
            return;
        };
        let span = cx.span();
        if let Some(e) = error {
            span.set_attribute(KeyValue::new("error.type", e.to_string()));
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }

    /// Writes the current attempt's (else the request's) `traceparent`/`tracestate` into the
    /// upstream request, replacing any the client sent.
    pub fn inject(&self, upstream: &mut pingora::http::RequestHeader) {
        let Some(t) = traces() else { return };
        upstream.remove_header("traceparent");
        upstream.remove_header("tracestate");
        let cx = self.attempt.as_ref().unwrap_or(&self.cx);
        t.propagator.inject_context(cx, &mut Upstream(upstream));
    }

    /// Ends the request's span with its final status.
    pub fn finish(mut self, status: u16, attributes: Vec<KeyValue>) {
        self.end_attempt(None);
        let span = self.cx.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            span.set_attributes(attributes);
            if status >= 500 || status == 0 {
                span.set_status(Status::error(if status == 0 {
                    "no response".to_string()
                } else {
                    status.to_string()
                }));
            }
        }
        span.end();
    }
}

/// Starts a span (`None` when tracing is off) as a child of the current context (a token
/// refresh's mint inside its refresh), or the root of a new trace. Run the work it covers
/// with `.with_context(cx.clone())` so its own spans become children.
pub fn start(name: &'static str, kind: SpanKind, attributes: Vec<KeyValue>) -> Option<Context> {
    let t = traces()?;
    let parent = Context::current();
    let span = t
        .tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(&t.tracer, &parent);
    Some(parent.with_span(span))
}

/// Ends a span from [`start`]: `Err` marks it failed with that error.
pub fn end(cx: Option<Context>, outcome: Result<Vec<KeyValue>, String>) {
    let Some(cx) = cx else { return };
    let span = cx.span();
    match outcome {
        Ok(attributes) => span.set_attributes(attributes),
        Err(e) => {
            span.set_attribute(KeyValue::new("error.type", e.clone()));
            span.set_status(Status::error(e));
        }
    }
    span.end();
}

/// Runs `fut` inside `cx` (when there is one), so spans started in it are its children.
pub async fn within<F: std::future::Future>(cx: &Option<Context>, fut: F) -> F::Output {
    match cx {
        Some(cx) => fut.with_context(cx.clone()).await,
        None => fut.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_trace_ids_are_taken_only_from_well_formed_traceparents() {
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", v.parse().unwrap());
            incoming_trace_id(&h).map(str::to_string)
        };
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            with(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        assert_eq!(
            with("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(with(&format!("ff-{id}-00f067aa0ba902b7-01")), None);
        assert_eq!(with("00-4bf92f-00f067aa0ba902b7-01"), None);
        assert_eq!(
            with(&format!("00-{}-00f067aa0ba902b7-01", "g".repeat(32))),
            None
        );
        assert_eq!(incoming_trace_id(&http::HeaderMap::new()), None);
    }
}
