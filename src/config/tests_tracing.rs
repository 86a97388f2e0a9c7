//! `[tracing]`: defaults once an endpoint is set, errors naming the key, and nothing without
//! an endpoint.

use std::path::Path;

use super::tests::{base, err_of};
use super::*;

fn tracing(keys: &str) -> String {
    base("", &format!("[tracing]\n{keys}\n"))
}

#[test]
fn without_the_section_nothing_is_traced() {
    let c = parse(&base("", ""), Path::new("t.toml")).unwrap();
    assert!(c.process.tracing.otlp.is_none());
}

#[test]
fn an_endpoint_alone_gets_the_documented_defaults_and_the_traces_path() {
    let c = parse(
        &tracing("otlp_endpoint = \"http://collector:4318\""),
        Path::new("t.toml"),
    )
    .unwrap();
    let t = c.process.tracing.otlp.as_ref().unwrap();
    assert_eq!(t.endpoint.as_str(), "http://collector:4318/v1/traces");
    assert_eq!(t.service_name, "genesys-auth-proxy");
    assert_eq!(t.sample_ratio, 1.0);
    assert_eq!(t.max_queue_spans, 4096);
}

#[test]
fn an_endpoint_with_a_path_is_the_traces_url_itself() {
    let c = parse(
        &tracing(
            "otlp_endpoint = \"https://otel.example.net/tenant-a/v1/traces\"\nservice_name = \"billing\"\nsample_ratio = 0.01\nmax_queue_spans = 64",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let t = c.process.tracing.otlp.as_ref().unwrap();
    assert_eq!(
        t.endpoint.as_str(),
        "https://otel.example.net/tenant-a/v1/traces"
    );
    assert_eq!(t.service_name, "billing");
    assert_eq!(t.sample_ratio, 0.01);
    assert_eq!(t.max_queue_spans, 64);
}

#[test]
fn bad_tracing_keys_are_named() {
    for (keys, key, says) in [
        (
            "sample_ratio = 0.5",
            "tracing.sample_ratio",
            "needs tracing.otlp_endpoint",
        ),
        (
            "service_name = \"x\"",
            "tracing.service_name",
            "needs tracing.otlp_endpoint",
        ),
        (
            "otlp_endpoint = \"collector:4318\"",
            "tracing.otlp_endpoint",
            "http:// or https://",
        ),
        (
            "otlp_endpoint = \"grpc://collector:4317\"",
            "tracing.otlp_endpoint",
            "http:// or https://",
        ),
        (
            "otlp_endpoint = \"not a url\"",
            "tracing.otlp_endpoint",
            "is not a URL",
        ),
        (
            "otlp_endpoint = \"http://user:pw@collector:4318\"",
            "tracing.otlp_endpoint",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        (
            "otlp_endpoint = \"http://collector:4318/?k=v\"",
            "tracing.otlp_endpoint",
            "query",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nsample_ratio = 1.5",
            "tracing.sample_ratio",
            "between 0.0 and 1.0",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nsample_ratio = nan",
            "tracing.sample_ratio",
            "between 0.0 and 1.0",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nsample_ratio = -0.1",
            "tracing.sample_ratio",
            "between 0.0 and 1.0",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nmax_queue_spans = 10",
            "tracing.max_queue_spans",
            "between 64 and 1000000",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nservice_name = \"  \"",
            "tracing.service_name",
            "1 to 255",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nsampler = \"always\"",
            "sampler",
            "",
        ),
    ] {
        let e = err_of(&tracing(keys));
        assert!(e.contains(key) && e.contains(says), "{keys}: {e}");
    }
}

#[test]
fn credentials_in_a_rejected_endpoint_are_not_echoed() {
    for url in [
        "http://user:hunter2-secret@collector:4318",
        "grpc://user:hunter2-secret@collector:4317",
        "http://collector:4318/v1/traces?api_key=hunter2-secret",
        "http://user:hunter2-secret@:4318",
    ] {
        let e = err_of(&tracing(&format!("otlp_endpoint = \"{url}\"")));
        assert!(!e.contains("hunter2-secret"), "{e}");
    }
}
