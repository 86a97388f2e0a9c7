//! What caller identity costs per request, for each proof, as `request_filter` pays it: one
//! registry load and `identify` over the `Authorization` value (no apps configured; an API
//! key, hashed and looked up; a proxy-issued token, its HMAC checked; a forged token), and the
//! login the SDKs make (secret digest compared, token sealed).
//!
//! Run: `cargo bench --bench app_auth`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use genesys_auth_proxy::apps::{unix_now, Gatekeeper};
use genesys_auth_proxy::config::{self, Config};

const KEY: &str = "bench-api-key-5b8e2d7c91f4a6";
const SECRET: &str = "bench-app-secret-7f3a9c2e";

fn config(apps: bool) -> Config {
    let dir = std::env::temp_dir().join(format!("gap-bench-apps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{text}\n")).unwrap();
        p.display().to_string()
    };
    let client = write("client", "bench");
    let mut text =
        format!("[genesys]\nclient_id = \"bench\"\nclient_secret = {{ file = {client:?} }}\n");
    if apps {
        let key = write("token-key", "bench-token-key-0123456789abcdef0123456789");
        let secret = write("app-secret", SECRET);
        let digest = genesys_auth_proxy::fingerprint::sha256_hex(KEY.as_bytes());
        text += &format!(
            "[apps]\ntoken_key = {{ file = {key:?} }}\n[[app]]\nname = \"billing\"\nclient_id = \"billing-app\"\nclient_secret = {{ file = {secret:?} }}\n[[app]]\nname = \"ops\"\napi_key_sha256 = [\"{digest}\"]\n"
        );
        for i in 0..30 {
            let d = genesys_auth_proxy::fingerprint::sha256_hex(format!("other-{i}").as_bytes());
            text += &format!("[[app]]\nname = \"app-{i}\"\napi_key_sha256 = [\"{d}\"]\n");
        }
    }
    config::parse(&text, std::path::Path::new("bench.toml")).unwrap()
}

fn gate(apps: bool) -> Gatekeeper {
    let audit = Arc::new(
        genesys_auth_proxy::audit::AuditLog::open(
            &config::AuditTarget::File(
                std::env::temp_dir().join(format!("gap-bench-audit-{}.jsonl", std::process::id())),
            ),
            "bench",
            Arc::new(genesys_auth_proxy::metrics::Metrics::new()),
        )
        .unwrap(),
    );
    Gatekeeper::new(&config(apps).apps, audit)
}

fn identify(c: &mut Criterion) {
    let mut g = c.benchmark_group("identify");
    let none = gate(false);
    let with = gate(true);
    let now = unix_now();
    let registry = with.current();
    let billing = registry.login("billing-app", SECRET).unwrap();
    let (token, _) = registry.issue(billing, now).unwrap();
    let token_header = format!("Bearer {token}");
    let key_header = format!("Bearer {KEY}");
    let mut forged = token_header.clone();
    forged.pop();
    forged.push('A');
    g.bench_function("no_apps", |b| {
        b.iter(|| black_box(none.current().identify(black_box(None), None, now).is_ok()))
    });
    g.bench_function("api_key", |b| {
        b.iter(|| {
            black_box(
                with.current()
                    .identify(black_box(Some(key_header.as_bytes())), None, now)
                    .is_ok(),
            )
        })
    });
    g.bench_function("app_token", |b| {
        b.iter(|| {
            black_box(
                with.current()
                    .identify(black_box(Some(token_header.as_bytes())), None, now)
                    .is_ok(),
            )
        })
    });
    g.bench_function("forged_token", |b| {
        b.iter(|| {
            black_box(
                with.current()
                    .identify(black_box(Some(forged.as_bytes())), None, now)
                    .is_err(),
            )
        })
    });
    g.bench_function("login_and_issue", |b| {
        b.iter(|| {
            let r = with.current();
            let app = r
                .login(black_box("billing-app"), black_box(SECRET))
                .unwrap();
            black_box(r.issue(app, now))
        })
    });
    g.finish();
}

criterion_group!(benches, identify);
criterion_main!(benches);
