//! Unit tests of the admission queue's ordering and client mapping.

use super::*;
use crate::config::AppGroup;

fn settings() -> BudgetSettings {
    BudgetSettings {
        requests_per_window: 300,
        window: Duration::from_secs(60),
        max_queue_wait: Duration::from_secs(5),
        max_queue_length: 1000,
        apps: vec![
            AppGroup {
                name: "reporting".into(),
                cidrs: vec!["10.1.0.0/16".parse().unwrap()],
                weight: 3,
            },
            AppGroup {
                name: "provisioning".into(),
                cidrs: vec!["10.2.0.0/16".parse().unwrap()],
                weight: 1,
            },
        ],
    }
}

#[test]
fn clients_map_to_their_group_or_address() {
    let s = settings();
    let ip = |a: &str| a.parse::<IpAddr>().unwrap();
    assert_eq!(Budget::client_key(&s, ip("10.1.2.3")), ClientKey::App(0));
    assert_eq!(
        Budget::client_key(&s, ip("::ffff:10.2.0.9")),
        ClientKey::App(1)
    );
    assert_eq!(
        Budget::client_key(&s, ip("127.0.0.1")),
        ClientKey::Address(ip("127.0.0.1"))
    );
    assert_eq!(Budget::app_label(&s, &ClientKey::App(0)), "reporting");
    assert_eq!(
        Budget::app_label(&s, &ClientKey::Address(ip("127.0.0.1"))),
        "other"
    );
}

#[test]
fn the_least_used_client_by_weight_goes_first() {
    let s = settings();
    let mut q = Queue::default();
    let waiter = || {
        let (tx, _rx) = oneshot::channel();
        Waiter { id: 0, grant: tx }
    };
    for k in [ClientKey::App(0), ClientKey::App(1)] {
        q.waiting.entry(k).or_default().push_back(waiter());
    }
    // Reporting (weight 3) used 5, provisioning (weight 1) used 2: 5/3 < 2/1.
    let now = Instant::now();
    q.horizon = Duration::from_secs(3);
    for _ in 0..5 {
        q.used(ClientKey::App(0), now);
    }
    for _ in 0..2 {
        q.used(ClientKey::App(1), now);
    }
    assert_eq!(next_client(&q, &s, now), Some(ClientKey::App(0)));
    q.used(ClientKey::App(0), now);
    q.used(ClientKey::App(0), now);
    assert_eq!(
        next_client(&q, &s, now),
        Some(ClientKey::App(1)),
        "7/3 > 2/1"
    );
    // A client that has used nothing yet goes first whatever its weight.
    let newcomer = ClientKey::Address("127.0.0.9".parse().unwrap());
    q.waiting
        .entry(newcomer.clone())
        .or_default()
        .push_back(waiter());
    assert_eq!(next_client(&q, &s, now), Some(newcomer));
}

// Issue 22: usage fades with the horizon, whether or not anyone waits, and memory is bounded.
#[test]
fn usage_fades_and_is_forgotten() {
    let mut q = Queue::default();
    let start = Instant::now();
    q.roll(start, Duration::from_secs(60));
    assert_eq!(q.horizon, Duration::from_secs(3));
    let steady = ClientKey::App(0);
    // Two calls a second for 100 s: usage settles near rate x horizon (6), not 200.
    for i in 0..200u64 {
        q.used(steady.clone(), start + Duration::from_millis(500 * i));
    }
    let now = start + Duration::from_millis(500 * 199);
    let u = q.usage_of(&steady, now);
    assert!((5.0..8.0).contains(&u), "{u}");
    // A minute later it is forgotten.
    let later = now + Duration::from_secs(60);
    q.roll(later, Duration::from_secs(60));
    assert!(q.usage.is_empty());
    // However many addresses are seen, the map stays bounded.
    for i in 0..(USAGE_CLIENTS_MAX as u32 + 10) {
        q.used(
            ClientKey::Address(std::net::IpAddr::from(i.to_be_bytes())),
            later,
        );
        q.roll(later, Duration::from_secs(60));
    }
    assert!(q.usage.len() <= USAGE_CLIENTS_MAX + 1);
}

/// A budget over a one-slot pool holding a fresh token.
fn budget_with_token() -> (Budget, Arc<Token>) {
    let dir = std::env::temp_dir().join(format!("gap-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let text = format!(
        "[genesys]\nclient_id = \"abc\"\nclient_secret = {{ file = {:?} }}\n",
        secret.display().to_string()
    );
    let config = crate::config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    let live = Arc::new(ArcSwap::from_pointee(config.top().live.clone()));
    let store = Arc::new(TokenStore::new());
    let secret = crate::token::secret::Secret::new("access-token");
    let life = Duration::from_secs(3600);
    let source = crate::token::store::TokenSource::Current;
    store.publish(Token::from_secret(&secret, life, 1, 0, Instant::now(), source).unwrap());
    let token = store.current().unwrap();
    (Budget::new(store, live, Arc::new(Metrics::new())), token)
}

#[test]
fn an_answer_wakes_the_dispatcher_only_while_requests_wait() {
    use futures_util::FutureExt;
    let (budget, token) = budget_with_token();
    // Every answer carries the rate-limit headers: with nobody waiting, no wake-up (it would
    // cost a switch to the dispatcher's thread per request).
    budget.observe(&token, 10, 300, Some(60));
    budget.exhausted(&token, Duration::from_secs(1));
    assert!(budget.changed.notified().now_or_never().is_none());
    // With a request waiting, a changed window may free budget for it.
    budget.queued.store(1, Ordering::SeqCst);
    budget.observe(&token, 10, 300, Some(60));
    assert!(budget.changed.notified().now_or_never().is_some());
}
