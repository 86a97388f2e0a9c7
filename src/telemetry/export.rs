//! Where finished spans leave the process: a bounded queue that the request path only ever
//! `try_send`s to (a full queue drops the span and counts it: it never blocks or slows a
//! request), and one thread that batches the queue and exports each batch over OTLP/HTTP on a
//! runtime of its own, so a slow or absent collector touches nothing but that thread.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

use crate::metrics::{SpanOutcome, TraceMetrics};

/// Spans per export request at most (the OTLP SDKs' default).
const MAX_BATCH: usize = 512;
/// A batch smaller than [`MAX_BATCH`] waits at most this long.
const DELAY: Duration = Duration::from_secs(1);
/// One export attempt gives up after this (the batch is then counted failed).
pub(super) const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// A failing collector is reported at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

enum Msg {
    Span(Box<SpanData>),
    /// Export everything queued, then answer.
    Flush(SyncSender<()>),
    /// Export everything queued, shut the exporter down, answer and end.
    Shutdown(SyncSender<()>),
}

/// The span processor: `on_end` queues, one thread exports.
pub(super) struct QueueProcessor {
    tx: SyncSender<Msg>,
    metrics: Arc<TraceMetrics>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for QueueProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueProcessor")
    }
}

impl QueueProcessor {
    /// Starts the export thread. `exporter` already knows the resource.
    pub(super) fn start<E>(
        exporter: E,
        capacity: usize,
        metrics: Arc<TraceMetrics>,
    ) -> std::io::Result<Self>
    where
        E: SpanExporter + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let m = metrics.clone();
        let worker = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(rx, exporter, &m))?;
        Ok(QueueProcessor {
            tx,
            metrics,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Sends a control message and waits (bounded) for its answer.
    fn control(&self, msg: fn(SyncSender<()>) -> Msg, timeout: Duration) -> OTelSdkResult {
        let (done, answered) = mpsc::sync_channel(1);
        // A full queue: the thread is draining it, so this send waits at most until one slot
        // frees; a gone thread fails at once.
        self.tx
            .send(msg(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answered
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => self.metrics.queued.inc(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.spans.inc(SpanOutcome::Dropped)
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Msg::Flush, EXPORT_TIMEOUT + Duration::from_secs(1))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let answered = self.control(Msg::Shutdown, timeout);
        if answered.is_ok() {
            if let Some(worker) = crate::sync::lock(&self.worker).take() {
                let _ = worker.join();
            }
        }
        answered
    }
}

/// The export thread: batches of up to [`MAX_BATCH`] spans, sent when full or [`DELAY`]
/// after the first span of the batch came in.
fn export_loop<E: SpanExporter>(rx: Receiver<Msg>, exporter: E, metrics: &TraceMetrics) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "tracing: cannot start the export runtime; spans will be dropped");
            return;
        }
    };
    let mut out = Outbox {
        batch: Vec::with_capacity(MAX_BATCH),
        since: None,
        last_warning: None,
        failures_unreported: 0,
    };
    loop {
        let wait = out.since.map_or(Duration::from_secs(3600), |t| {
            (t + DELAY).saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(Msg::Span(span)) => {
                metrics.queued.dec();
                out.push(*span);
                if out.batch.len() >= MAX_BATCH {
                    out.send(&runtime, &exporter, metrics);
                }
            }
            Ok(Msg::Flush(done)) => {
                out.drain(&rx, &runtime, &exporter, metrics);
                let _ = done.send(());
            }
            Ok(Msg::Shutdown(done)) => {
                out.drain(&rx, &runtime, &exporter, metrics);
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => out.send(&runtime, &exporter, metrics),
            Err(RecvTimeoutError::Disconnected) => {
                out.send(&runtime, &exporter, metrics);
                let _ = exporter.shutdown();
                return;
            }
        }
    }
}

struct Outbox {
    batch: Vec<SpanData>,
    /// When the batch's first span came in.
    since: Option<Instant>,
    last_warning: Option<Instant>,
    /// Failed batches since the last warning.
    failures_unreported: u64,
}

impl Outbox {
    fn push(&mut self, span: SpanData) {
        self.since.get_or_insert_with(Instant::now);
        self.batch.push(span);
    }

    /// Everything queued now, in batches.
    fn drain<E: SpanExporter>(
        &mut self,
        rx: &Receiver<Msg>,
        runtime: &tokio::runtime::Runtime,
        exporter: &E,
        metrics: &TraceMetrics,
    ) {
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Span(span) => {
                    metrics.queued.dec();
                    self.push(*span);
                    if self.batch.len() >= MAX_BATCH {
                        self.send(runtime, exporter, metrics);
                    }
                }
                Msg::Flush(done) | Msg::Shutdown(done) => {
                    let _ = done.send(());
                }
            }
        }
        self.send(runtime, exporter, metrics);
    }

    fn send<E: SpanExporter>(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        exporter: &E,
        metrics: &TraceMetrics,
    ) {
        self.since = None;
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(MAX_BATCH));
        let n = batch.len() as u64;
        let result = runtime.block_on(async {
            match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
                Ok(r) => r,
                Err(_) => Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)),
            }
        });
        match result {
            Ok(()) => metrics.spans.get(SpanOutcome::Exported).inc_by(n),
            Err(e) => {
                metrics.spans.get(SpanOutcome::Failed).inc_by(n);
                self.failures_unreported += 1;
                let now = Instant::now();
                if self
                    .last_warning
                    .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
                {
                    tracing::warn!(
                        error = %e,
                        failed_batches = self.failures_unreported,
                        "tracing: the OTLP collector did not take a batch of spans (counted in trace_spans_total{{outcome=\"failed\"}}; requests are not affected)"
                    );
                    self.last_warning = Some(now);
                    self.failures_unreported = 0;
                }
            }
        }
    }
}

/// The OTLP exporter's HTTP client: the proxy's own reqwest client (rustls with the ring
/// provider; no proxy from the environment), run on the export thread's runtime.
#[derive(Debug)]
pub(super) struct Http(pub reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Http {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        let mut req = self.0.request(parts.method, url).body(body);
        for (name, value) in &parts.headers {
            req = req.header(name, value);
        }
        let answer = req.send().await?;
        let status = answer.status();
        let headers = answer.headers().clone();
        // A collector's answer is small (an ExportTraceServiceResponse); a huge one fails.
        let body = crate::token::endpoint::read_capped(answer, 64 * 1024).await?;
        let mut response = http::Response::new(bytes::Bytes::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}
