//! `[tracing]`: spans reach an OTLP receiver the project did not write the decoding of
//! (`tests/sdk/otlp_receiver.py`, the OpenTelemetry project's `opentelemetry-proto`), with the
//! attributes the contract names and the parent from the client's `traceparent`; Genesys
//! receives the upstream attempt's context; a collector that is down or stalled costs
//! requests nothing. The proxy runs as a child process (the tracer is process-wide).

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// The Python OTLP receiver, printing one JSON line per span.
struct Receiver {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start(extra: &[&str]) -> Option<Receiver> {
        let proto = crate::sdk::installed("python/opentelemetry/proto")?;
        let python_path = proto.parent()?.parent()?.to_path_buf();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/otlp_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(extra)
            .env("PYTHONPATH", python_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        let port = first["port"].as_u64().unwrap() as u16;
        let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = spans.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Some(Receiver { child, port, spans })
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (bounded) until a span satisfies `pred`, and returns it.
    async fn span(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(Duration::from_secs(15), what, || async {
            self.spans().iter().any(&pred)
        })
        .await;
        self.spans().into_iter().find(|s| pred(s)).unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy process with `[tracing]` pointed at `endpoint` and the access log on.
fn traced_proxy(sim: &genesys_auth_proxy::sim::SimHandle, tracing: &str) -> ProxyProcess {
    let dir = temp_dir("tracing");
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir)
        .replace("format = \"text\"", "format = \"json\"")
        .replace("level = \"warn\"", "level = \"info\"\naccess_log = true")
        + "\n[tracing]\n"
        + tracing;
    let conf = dir.join("proxy.toml");
    std::fs::write(&conf, toml).unwrap();
    ProxyProcess::spawn(&conf)
}

/// The simulator without its 300-a-minute token limit: the load here is about the collector.
fn unlimited_sim() -> genesys_auth_proxy::sim::SimConfig {
    genesys_auth_proxy::sim::SimConfig {
        api_rate_limit_per_minute: 1_000_000,
        ..sim_config()
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_with_the_contract_attributes_and_the_callers_parent() {
    let Some(receiver) = Receiver::start(&[]) else {
        return;
    };
    let sim = start_sim(unlimited_sim()).await;
    let proc = traced_proxy(
        &sim,
        &format!(
            "otlp_endpoint = \"http://127.0.0.1:{}\"\nservice_name = \"billing-gateway\"\n",
            receiver.port
        ),
    );
    proc.wait_ready().await;
    let proxy = proc.proxy.clone();
    let c = client();

    // A request continuing the caller's trace, with its tracestate.
    let r = c
        .get(format!(
            "http://{proxy}/api/v2/conversations/12345678/details?expand=participants"
        ))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let correlation = r.headers()["inin-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let echo: Value = r.json().await.unwrap();
    let seen = echo["traceparent"]
        .as_str()
        .expect("Genesys got a traceparent");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(
        parts[1], TRACE_ID,
        "the caller's trace continues to Genesys"
    );
    assert_ne!(
        parts[2], PARENT_ID,
        "Genesys's parent is the proxy's attempt span"
    );
    assert_eq!(parts[3], "01");
    assert_eq!(echo["tracestate"], "vendor=abc");
    let attempt_id = parts[2].to_string();

    // A request without one starts its own trace.
    let r = c
        .get(format!(
            "http://{proxy}/api/v2/users/00000000-0000-4000-8000-000000000001/roles"
        ))
        .send()
        .await
        .unwrap();
    let echo: Value = r.json().await.unwrap();
    let fresh = echo["traceparent"].as_str().unwrap().to_string();
    assert!(!fresh.contains(TRACE_ID), "{fresh}");

    // A 401 replay: two upstream attempts under one request span.
    sim_post(&sim, "/__sim/revoke", serde_json::json!({})).await;
    let r = c
        .get(format!("http://{proxy}/api/v2/analytics/x"))
        .header(
            "traceparent",
            format!("00-{}-{PARENT_ID}-01", "a".repeat(32)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The request span.
    let server = receiver
        .span("the continued request's server span", |s| {
            s["trace_id"] == TRACE_ID && s["kind"] == 2
        })
        .await;
    assert_eq!(server["name"], "GET /api/v2/conversations/{id}/details");
    assert_eq!(server["parent_span_id"], PARENT_ID);
    assert_eq!(server["trace_state"], "vendor=abc");
    assert_eq!(server["content_type"], "application/x-protobuf");
    assert_eq!(server["resource"]["service.name"], "billing-gateway");
    assert_eq!(attr(&server, "http.request.method"), "GET");
    assert_eq!(
        attr(&server, "http.route"),
        "/api/v2/conversations/{id}/details"
    );
    assert_eq!(
        attr(&server, "url.path"),
        "/api/v2/conversations/12345678/details",
        "the path without its query"
    );
    assert!(!server.to_string().contains("participants"), "{server}");
    assert_eq!(attr(&server, "http.response.status_code"), 200);
    assert_eq!(
        attr(&server, "genesys.correlation_id"),
        correlation.as_str()
    );
    assert_eq!(attr(&server, "genesys.credential"), "default");
    assert_eq!(attr(&server, "genesys.replays"), 0);
    assert!(attr(&server, "genesys.queue_wait_ms").is_f64(), "{server}");
    let fp = attr(&server, "genesys.token.fingerprint")
        .as_str()
        .unwrap()
        .to_string();
    assert!(fp.starts_with("sha256:"), "{fp}");

    // Its upstream attempt: a client span, the parent Genesys was given.
    let attempt = receiver
        .span("the attempt span", |s| {
            s["trace_id"] == TRACE_ID && s["kind"] == 3
        })
        .await;
    assert_eq!(attempt["span_id"], attempt_id.as_str());
    assert_eq!(attempt["parent_span_id"], server["span_id"]);
    assert_eq!(attr(&attempt, "http.response.status_code"), 200);
    assert_eq!(attr(&attempt, "http.request.resend_count"), 0);
    assert_eq!(
        attr(&attempt, "genesys.correlation_id"),
        correlation.as_str()
    );
    assert_eq!(attr(&attempt, "genesys.token.fingerprint"), fp.as_str());

    // The replayed request: 401 then 200, resend counts 0 and 1, replays 1.
    let replayed = "a".repeat(32);
    let server2 = receiver
        .span("the replayed request's span", |s| {
            s["trace_id"] == replayed.as_str() && s["kind"] == 2
        })
        .await;
    assert_eq!(attr(&server2, "genesys.replays"), 1);
    eventually(
        Duration::from_secs(15),
        "both attempts exported",
        || async {
            receiver
                .spans()
                .iter()
                .filter(|s| s["trace_id"] == replayed.as_str() && s["kind"] == 3)
                .count()
                == 2
        },
    )
    .await;
    let mut attempts: Vec<Value> = receiver
        .spans()
        .into_iter()
        .filter(|s| s["trace_id"] == replayed.as_str() && s["kind"] == 3)
        .collect();
    attempts.sort_by_key(|s| s["start_ns"].as_u64());
    assert_eq!(attr(&attempts[0], "http.response.status_code"), 401);
    assert_eq!(attempts[0]["status_code"], 2, "a 401 attempt is an error");
    assert_eq!(attr(&attempts[1], "http.response.status_code"), 200);
    assert_eq!(attr(&attempts[1], "http.request.resend_count"), 1);
    assert_ne!(
        attr(&attempts[0], "genesys.token.fingerprint"),
        attr(&attempts[1], "genesys.token.fingerprint"),
        "the replay went with the new token"
    );

    // Token spans: a refresh with its mint and its tokens/me validation as children.
    let refresh = receiver
        .span("a token refresh span", |s| s["name"] == "token refresh")
        .await;
    assert_eq!(attr(&refresh, "genesys.credential"), "default");
    let mint = receiver
        .span("its mint", |s| {
            s["name"] == "POST oauth/token" && s["parent_span_id"] == refresh["span_id"]
        })
        .await;
    assert_eq!(mint["kind"], 3);
    assert!(attr(&mint, "genesys.token.fingerprint").is_string());
    assert!(attr(&mint, "genesys.secret.fingerprint").is_string());
    receiver
        .span("its validation", |s| {
            s["name"] == "GET /api/v2/tokens/me" && s["parent_span_id"] == refresh["span_id"]
        })
        .await;

    let metrics = get_text(&format!("http://{}/metrics", proc.admin)).await;
    assert!(
        metric(
            &metrics,
            "genesys_proxy_trace_spans_total{outcome=\"exported\"}"
        ) >= 4.0
    );
    assert_eq!(
        metric(
            &metrics,
            "genesys_proxy_trace_spans_total{outcome=\"dropped\"}"
        ),
        0.0
    );
    let status = get_json(&format!("http://{}/status", proc.admin)).await;
    assert_eq!(
        status["tracing"]["otlp_endpoint"],
        format!("http://127.0.0.1:{}/v1/traces", receiver.port)
    );

    // The access log carries the trace id and the correlation id.
    let (_, logs, _) = proc.stop();
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["target"] == "access" && v["path"] == "/api/v2/conversations/12345678/details")
        .unwrap_or_else(|| panic!("no access line:\n{logs}"));
    assert_eq!(line["trace_id"], TRACE_ID);
    assert_eq!(line["correlation_id"], correlation.as_str());

    // Nothing secret reached the collector.
    let exported = serde_json::to_string(&receiver.spans()).unwrap();
    assert!(!exported.contains(SECRET), "the client secret was exported");
    assert!(
        !exported.to_lowercase().contains("bearer"),
        "a token was exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_ratio_zero_records_only_what_the_caller_sampled_and_still_propagates() {
    let Some(receiver) = Receiver::start(&[]) else {
        return;
    };
    let sim = start_sim(unlimited_sim()).await;
    let proc = traced_proxy(
        &sim,
        &format!(
            "otlp_endpoint = \"http://127.0.0.1:{}/v1/traces\"\nsample_ratio = 0.0\n",
            receiver.port
        ),
    );
    proc.wait_ready().await;
    let c = client();
    for _ in 0..20 {
        let echo: Value = c
            .get(format!("http://{}/api/v2/x", proc.proxy))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let tp = echo["traceparent"]
            .as_str()
            .expect("a traceparent even unsampled");
        assert!(tp.ends_with("-00"), "{tp}");
    }
    // A caller that sampled its trace is recorded whatever the ratio.
    let r = c
        .get(format!("http://{}/api/v2/sampled", proc.proxy))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    receiver
        .span("the sampled request", |s| {
            s["trace_id"] == TRACE_ID && s["kind"] == 2
        })
        .await;
    let metrics = get_text(&format!("http://{}/metrics", proc.admin)).await;
    // The sampled trace's server and client spans; nothing of the 20 others, no token spans.
    eventually(Duration::from_secs(15), "both spans exported", || async {
        receiver.spans().len() >= 2
    })
    .await;
    let spans = receiver.spans();
    assert!(
        spans.iter().all(|s| s["trace_id"] == TRACE_ID),
        "unsampled spans were exported: {spans:?}"
    );
    assert_eq!(spans.len(), 2, "{spans:?}\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_requests_nothing_and_its_batches_are_counted_failed() {
    let sim = start_sim(unlimited_sim()).await;
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proc = traced_proxy(
        &sim,
        &format!("otlp_endpoint = \"http://127.0.0.1:{port}\"\n"),
    );
    proc.wait_ready().await;
    let c = client();
    for i in 0..300 {
        let r = c
            .get(format!("http://{}/api/v2/users/{i}", proc.proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let admin = proc.admin.clone();
    eventually(
        Duration::from_secs(15),
        "failed batches counted",
        || async {
            let m = get_text(&format!("http://{admin}/metrics")).await;
            metric(&m, "genesys_proxy_trace_spans_total{outcome=\"failed\"}") >= 600.0
        },
    )
    .await;
    let status = get_json(&format!("http://{admin}/status")).await;
    assert_eq!(status["tracing"]["dropped_spans"], 0, "{status}");
    let (_, logs, _) = proc.stop();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("the OTLP collector did not take a batch"))
        .count();
    assert_eq!(warnings, 1, "one warning per minute at most:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_fills_the_bounded_queue_and_spans_are_dropped_not_waited_for() {
    let sim = start_sim(unlimited_sim()).await;
    // Accepts connections and never answers: every export waits for its timeout.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stall.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in stall.incoming().map_while(Result::ok) {
            keep.lock().unwrap().push(conn);
        }
    });
    let proc = traced_proxy(
        &sim,
        &format!("otlp_endpoint = \"http://127.0.0.1:{port}\"\nmax_queue_spans = 64\n"),
    );
    proc.wait_ready().await;
    let c = client();
    for i in 0..400 {
        let r = c
            .get(format!("http://{}/api/v2/users/{i}", proc.proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let m = get_text(&format!("http://{}/metrics", proc.admin)).await;
    // 800 spans: one batch (at most 512) is stuck in its export, 64 queued, the rest dropped.
    let dropped = metric(&m, "genesys_proxy_trace_spans_total{outcome=\"dropped\"}");
    let queued = metric(&m, "genesys_proxy_trace_export_queue_spans");
    let (_, logs, _) = proc.stop();
    assert!(
        dropped >= 800.0 - 512.0 - 64.0,
        "dropped {dropped}\n{m}\n{logs}"
    );
    assert!(queued <= 64.0, "queued {queued}");
    assert!(
        !held.lock().unwrap().is_empty(),
        "the exporter never connected"
    );
}
