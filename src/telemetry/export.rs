//! Where finished spans leave the process: a bounded queue that the request path only ever
//! `try_send`s to (a full queue drops the span and counts it: it never blocks or slows a
//! request), and one thread that batches the queue and exports each batch over OTLP/HTTP on a
//! runtime of its own, so a slow or absent collector touches nothing but that thread.
//!
//! The thread does not wait *on the queue*: a receiver blocked in `recv` is woken by every
//! send, which under load is a futex wake and a context switch per span (measured: 2.0
//! context switches per request with tracing on against 0.45 off). It sleeps (`park_timeout`)
//! until the batch's deadline, and a request wakes it only when its span is the one that
//! fills a batch; control messages (flush, shutdown) wake it too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

use crate::metrics::{SpanOutcome, TraceMetrics};

/// Spans per export request at most (the OTLP SDKs' default).
const MAX_BATCH: usize = 512;
/// A batch smaller than [`MAX_BATCH`] waits at most this long.
pub(super) const DELAY: Duration = Duration::from_secs(1);
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
    /// Spans queued and not yet taken by the thread: the one that makes it `wake_at` wakes
    /// the thread.
    pending: Arc<AtomicUsize>,
    /// A full batch, or a full queue if that is smaller.
    wake_at: usize,
    thread: Thread,
    metrics: Arc<TraceMetrics>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for QueueProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueProcessor")
    }
}

impl QueueProcessor {
    /// Starts the export thread. `exporter` already knows the resource; a batch smaller than
    /// [`MAX_BATCH`] is sent `delay` after its first span.
    pub(super) fn start<E>(
        exporter: E,
        capacity: usize,
        delay: Duration,
        metrics: Arc<TraceMetrics>,
    ) -> std::io::Result<Self>
    where
        E: SpanExporter + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let pending = Arc::new(AtomicUsize::new(0));
        let queue = Queue {
            rx,
            pending: pending.clone(),
            metrics: metrics.clone(),
        };
        let worker = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(queue, exporter, delay))?;
        Ok(QueueProcessor {
            tx,
            pending,
            wake_at: capacity.clamp(1, MAX_BATCH),
            thread: worker.thread().clone(),
            metrics,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Sends a control message and waits (bounded) for its answer.
    fn control(&self, msg: fn(SyncSender<()>) -> Msg, timeout: Duration) -> OTelSdkResult {
        let (done, answered) = mpsc::sync_channel(1);
        // A full queue: the thread, woken here, drains it, so this send waits at most until
        // one slot frees; a gone thread fails at once.
        self.thread.unpark();
        self.tx
            .send(msg(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        self.thread.unpark();
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
        // Counted before it is sent, so the thread never takes a span it has not counted.
        // Exactly one sender sees the count reach `wake_at` (it moves by one at a time): that
        // one wakes the thread. Below it, the batch's deadline does.
        let reached = self.pending.fetch_add(1, Ordering::AcqRel) + 1 == self.wake_at;
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => self.metrics.queued.inc(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                self.metrics.spans.inc(SpanOutcome::Dropped)
            }
        }
        if reached {
            self.thread.unpark();
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

impl Drop for QueueProcessor {
    fn drop(&mut self) {
        // The thread sees the queue disconnected when it next looks: let that be now.
        self.thread.unpark();
    }
}

/// The thread's end of the queue.
struct Queue {
    rx: Receiver<Msg>,
    pending: Arc<AtomicUsize>,
    metrics: Arc<TraceMetrics>,
}

/// What the thread found in the queue.
enum Next {
    Span(Box<SpanData>),
    Flush(SyncSender<()>),
    Shutdown(SyncSender<()>),
    Empty,
    /// Every sender is gone (the processor was dropped without a shutdown).
    Gone,
}

impl Queue {
    fn take(&self) -> Next {
        match self.rx.try_recv() {
            Ok(Msg::Span(span)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                self.metrics.queued.dec();
                Next::Span(span)
            }
            Ok(Msg::Flush(done)) => Next::Flush(done),
            Ok(Msg::Shutdown(done)) => Next::Shutdown(done),
            Err(TryRecvError::Empty) => Next::Empty,
            Err(TryRecvError::Disconnected) => Next::Gone,
        }
    }
}

/// The export thread: batches of up to [`MAX_BATCH`] spans, sent when full or `delay` after
/// the first span of the batch came in.
fn export_loop<E: SpanExporter>(queue: Queue, exporter: E, delay: Duration) {
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
    let metrics = queue.metrics.clone();
    let mut out = Outbox {
        batch: Vec::with_capacity(MAX_BATCH),
        since: None,
        last_warning: None,
        failures_unreported: 0,
    };
    loop {
        // Everything queued now; a flush or shutdown answers once what came before it is out.
        loop {
            match queue.take() {
                Next::Span(span) => {
                    out.push(*span);
                    if out.batch.len() >= MAX_BATCH {
                        out.send(&runtime, &exporter, &metrics);
                    }
                }
                Next::Flush(done) => {
                    out.send(&runtime, &exporter, &metrics);
                    let _ = done.send(());
                }
                Next::Shutdown(done) => {
                    out.send(&runtime, &exporter, &metrics);
                    let _ = exporter.shutdown();
                    let _ = done.send(());
                    return;
                }
                Next::Empty => break,
                Next::Gone => {
                    out.send(&runtime, &exporter, &metrics);
                    let _ = exporter.shutdown();
                    return;
                }
            }
        }
        match out.since {
            Some(t) if t.elapsed() >= delay => out.send(&runtime, &exporter, &metrics),
            // Woken by a full batch, a control message, the deadline or spuriously: each
            // looks at the queue again. An idle thread looks once per `delay` anyway.
            Some(t) => {
                std::thread::park_timeout((t + delay).saturating_duration_since(Instant::now()))
            }
            None => std::thread::park_timeout(delay),
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::sync::mpsc::Sender;

    /// An exporter that reports each batch's size, and can be held inside `export` until
    /// the test lets it go.
    #[derive(Debug)]
    struct Recording {
        batches: Sender<usize>,
        /// When set: `export` says it started on `started`, then waits for `go`.
        gate: Option<(Sender<()>, Mutex<Receiver<()>>)>,
    }

    impl SpanExporter for Recording {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Some((started, go)) = &self.gate {
                let _ = started.send(());
                let _ = crate::sync::lock(go).recv();
            }
            let _ = self.batches.send(batch.len());
            Ok(())
        }
    }

    const NEVER: Duration = Duration::from_secs(3600);
    const PATIENCE: Duration = Duration::from_secs(10);

    fn provider(
        exporter: Recording,
        capacity: usize,
        delay: Duration,
    ) -> (SdkTracerProvider, Arc<TraceMetrics>) {
        let metrics = Arc::new(TraceMetrics::new());
        let processor = QueueProcessor::start(exporter, capacity, delay, metrics.clone()).unwrap();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        (provider, metrics)
    }

    fn spans(provider: &SdkTracerProvider, n: usize) {
        let tracer = provider.tracer("test");
        for _ in 0..n {
            tracer.start("span").end();
        }
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_a_partial_one_on_its_deadline_or_a_flush() {
        let (tx, batches) = mpsc::channel();
        let exporter = Recording {
            batches: tx,
            gate: None,
        };
        // The deadline is an hour away: only the 512th span can wake the thread.
        let (provider, metrics) = provider(exporter, 4096, NEVER);
        spans(&provider, MAX_BATCH + 3);
        assert_eq!(batches.recv_timeout(PATIENCE), Ok(MAX_BATCH));
        provider.force_flush().unwrap();
        assert_eq!(batches.try_recv(), Ok(3));
        assert_eq!(metrics.spans.get(SpanOutcome::Exported).get(), 515);
        assert_eq!(metrics.queued.get(), 0);

        // With a short deadline, a partial batch goes out by itself.
        let (tx, batches) = mpsc::channel();
        let exporter = Recording {
            batches: tx,
            gate: None,
        };
        let (quick, _) = provider_with_delay(exporter, Duration::from_millis(20));
        spans(&quick, 2);
        assert_eq!(batches.recv_timeout(PATIENCE), Ok(2));
        provider.shutdown().unwrap();
        quick.shutdown().unwrap();
    }

    fn provider_with_delay(
        exporter: Recording,
        delay: Duration,
    ) -> (SdkTracerProvider, Arc<TraceMetrics>) {
        provider(exporter, 4096, delay)
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_shutdown_exports_what_is_queued() {
        let (tx, batches) = mpsc::channel();
        let (started_tx, started) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let exporter = Recording {
            batches: tx,
            gate: Some((started_tx, Mutex::new(go_rx))),
        };
        let (provider, metrics) = provider(exporter, 4, NEVER);
        // A full batch, taken off the queue four at a time, then held inside `export`.
        let tracer = provider.tracer("test");
        let mut ended = 0;
        while started.try_recv().is_err() {
            tracer.start("span").end();
            ended += 1;
            assert!(ended < 100_000, "the export never started");
            std::thread::yield_now();
        }
        let before = metrics.spans.get(SpanOutcome::Dropped).get();
        // The thread is inside `export` (a span or so may have been queued since it took the
        // batch): the queue fills to four, the rest are dropped.
        let room = 4 - metrics.queued.get() as u64;
        spans(&provider, 7);
        let (dropped, queued) = (
            metrics.spans.get(SpanOutcome::Dropped).get() - before,
            metrics.queued.get(),
        );
        go.send(()).unwrap();
        assert_eq!((dropped, queued), (7 - room, 4));
        assert_eq!(batches.recv_timeout(PATIENCE), Ok(MAX_BATCH));
        // Shutdown: what is queued (and whatever else filled the batch) goes out first.
        let shut = std::thread::spawn(move || provider.shutdown());
        while let Ok(()) = go.send(()) {
            if shut.is_finished() {
                break;
            }
            std::thread::yield_now();
        }
        shut.join().unwrap().unwrap();
        let exported = metrics.spans.get(SpanOutcome::Exported).get();
        let dropped = metrics.spans.get(SpanOutcome::Dropped).get();
        assert_eq!(exported + dropped, ended + 7);
        assert_eq!(metrics.queued.get(), 0);
    }
}
