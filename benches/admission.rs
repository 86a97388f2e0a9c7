//! Micro-benchmark of the rate-limit budget's admission decision, as `request_filter` takes it
//! for every request: which client the request counts for (its `[[budget.app]]` group or its
//! address), then one call taken from the pool token with the most budget left, and the
//! answer's rate-limit headers fed back (`observe`, on every upstream response).
//!
//! The `2_threads` benches run two threads at once on one budget, as two worker threads do.
//!
//! Run: `cargo bench --bench admission`

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use genesys_auth_proxy::budget::{Admit, Budget};
use genesys_auth_proxy::metrics::Metrics;
use genesys_auth_proxy::secret::Secret;
use genesys_auth_proxy::token::store::{Token, TokenSource, TokenStore};

/// Settings with two application groups and a budget the loop never spends.
fn live() -> genesys_auth_proxy::config::Live {
    let dir = std::env::temp_dir().join(format!("gap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "bench\n").unwrap();
    let text = format!(
        r#"[genesys]
client_id = "bench"
client_secret = {{ file = {:?} }}
[token]
pool_size = 4
[budget]
requests_per_window = 1000000000000
[[budget.app]]
name = "reporting"
cidrs = ["10.1.0.0/16"]
weight = 3
[[budget.app]]
name = "provisioning"
cidrs = ["10.2.0.0/16"]
"#,
        secret.display().to_string()
    );
    genesys_auth_proxy::config::parse(&text, std::path::Path::new("bench.toml"))
        .expect("bench config")
        .top()
        .live
        .clone()
}

fn token(slot: usize, generation: u64) -> Token {
    let secret = Secret::new("bench-access-token");
    let life = Duration::from_secs(86_400);
    Token::from_secret(
        &secret,
        life,
        generation,
        slot,
        Instant::now(),
        TokenSource::Current,
    )
    .expect("a valid header value")
}

fn bench(c: &mut Criterion) {
    let live = Arc::new(ArcSwap::from_pointee(live()));
    let snapshot = live.load_full();
    for slots in [1usize, 4] {
        let store = Arc::new(TokenStore::with_slots(slots));
        for slot in 0..slots {
            store.publish(token(slot, slot as u64 + 1));
        }
        let budget = Budget::new(store.clone(), live.clone(), Arc::new(Metrics::new()));
        let fallback = store.current().unwrap();
        let ip: IpAddr = "10.1.4.2".parse().unwrap();
        let settings = &snapshot.budget;
        let admit = || {
            let client = Budget::client_key(settings, ip);
            // The fast path never waits, so the future is ready at its first poll.
            let admitted = budget
                .admit(settings, client, &fallback, settings.max_queue_wait)
                .now_or_never();
            match admitted {
                Some(Admit::Go { token, .. }) => token,
                _ => panic!("the bench budget is never spent"),
            }
        };
        c.bench_function(&format!("admit_pool_{slots}"), |b| {
            b.iter(|| std::hint::black_box(admit()))
        });
        c.bench_function(&format!("admit_and_observe_pool_{slots}"), |b| {
            b.iter(|| budget.observe(&admit(), 10, 1_000_000_000_000, Some(60)))
        });
        // Two worker threads admitting at once, as two pingora workers do under load: the
        // time per admission (and answer) with both contending for the budget's state.
        c.bench_function(&format!("admit_and_observe_2_threads_pool_{slots}"), |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(2);
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for t in 0..2u8 {
                        let (budget, fallback) = (&budget, &fallback);
                        scope.spawn(move || {
                            let ip = IpAddr::from([10, 1, 4, 2 + t]);
                            for _ in 0..per_thread {
                                let client = Budget::client_key(settings, ip);
                                let admitted = budget
                                    .admit(settings, client, fallback, settings.max_queue_wait)
                                    .now_or_never();
                                let Some(Admit::Go { token, .. }) = admitted else {
                                    panic!("the bench budget is never spent");
                                };
                                budget.observe(&token, 10, 1_000_000_000_000, Some(60));
                            }
                        });
                    }
                });
                // Each thread made half the admissions in the elapsed time: reported per
                // admission as one thread sees it (equal to the one-thread figure when they
                // do not contend).
                start.elapsed() * 2
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
