//! Micro-benchmark of the per-request hot path: read the current token lock-free from the
//! store and rewrite the upstream request header (strip client credentials, inject the bearer,
//! force Host and URI), with the same
//! functions `request_filter` and `upstream_request_filter` call.
//!
//! Run: `cargo bench --bench token_inject`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use genesys_auth_proxy::proxy::rewrite_upstream_request;
use genesys_auth_proxy::token::store::{Token, TokenSource, TokenStore};
use http::{header, HeaderValue};
use pingora::http::RequestHeader;

fn store_with_token() -> Arc<TokenStore> {
    let store = Arc::new(TokenStore::new());
    let value =
        genesys_auth_proxy::secret::Secret::new("q2VhYzM5ZDctNjM1Yy00ZDQ3LWI1ZjEtY2E2N2E0ZjJiZjVm");
    let token = Token::from_secret(
        &value,
        Duration::from_secs(86_400),
        1,
        0,
        Instant::now(),
        TokenSource::Current,
    )
    .unwrap();
    store.publish(token);
    store
}

fn client_request() -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/api/v2/users?pageSize=25", None).unwrap();
    req.insert_header(header::HOST, "127.0.0.1:8080").unwrap();
    req.insert_header(header::AUTHORIZATION, "Bearer client-supplied")
        .unwrap();
    req.insert_header(header::ACCEPT, "application/json")
        .unwrap();
    req
}

fn bench(c: &mut Criterion) {
    let store = store_with_token();
    let host = HeaderValue::from_static("api.mypurecloud.com");

    c.bench_function("token_read", |b| {
        b.iter(|| std::hint::black_box(store.valid(Instant::now())))
    });

    let template = client_request();
    c.bench_function("token_read_and_header_injection", |b| {
        b.iter_batched(
            || template.clone(),
            |mut req| {
                let token = store.valid(Instant::now()).unwrap();
                let pq = req.uri.path_and_query().unwrap().as_str().to_string();
                rewrite_upstream_request(&mut req, &pq, &host, Some(&token.header)).unwrap();
                std::hint::black_box(req)
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
