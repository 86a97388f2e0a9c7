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
    let book = Book::new(Clock::new(), Duration::from_secs(60));
    for _ in 0..5 {
        book.used(&ClientKey::App(0), now);
    }
    for _ in 0..2 {
        book.used(&ClientKey::App(1), now);
    }
    assert_eq!(next_client(&q, &book, &s, now), Some(ClientKey::App(0)));
    book.used(&ClientKey::App(0), now);
    book.used(&ClientKey::App(0), now);
    assert_eq!(
        next_client(&q, &book, &s, now),
        Some(ClientKey::App(1)),
        "7/3 > 2/1"
    );
    // A client that has used nothing yet goes first whatever its weight.
    let newcomer = ClientKey::Address("127.0.0.9".parse().unwrap());
    q.waiting
        .entry(newcomer.clone())
        .or_default()
        .push_back(waiter());
    assert_eq!(next_client(&q, &book, &s, now), Some(newcomer));
}

// Issue 22: usage fades with the horizon, whether or not anyone waits, and memory is bounded.
#[test]
fn usage_fades_and_is_forgotten() {
    let start = Instant::now();
    let book = Book::new(Clock::new(), Duration::from_secs(60));
    book.roll(start, Duration::from_secs(60));
    assert_eq!(book.horizon(), Duration::from_secs(3));
    let steady = ClientKey::App(0);
    // Two calls a second for 100 s: usage settles near rate x horizon (6), not 200.
    for i in 0..200u64 {
        book.used(&steady, start + Duration::from_millis(500 * i));
    }
    let now = start + Duration::from_millis(500 * 199);
    let u = book.usage_of(&steady, now);
    assert!((5.0..8.0).contains(&u), "{u}");
    // A minute later it is forgotten.
    let later = now + Duration::from_secs(60);
    book.roll(later, Duration::from_secs(60));
    assert_eq!(book.len(), 0);
    // However many addresses are seen, the map stays bounded.
    for i in 0..(USAGE_CLIENTS_MAX as u32 + 10) {
        book.used(
            &ClientKey::Address(std::net::IpAddr::from(i.to_be_bytes())),
            later,
        );
    }
    assert!(book.len() <= USAGE_CLIENTS_MAX);
}

/// A budget over a one-slot pool holding a fresh token.
fn budget_with_token() -> (Budget, Arc<Token>) {
    // A file of its own: tests run in parallel.
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gap-budget-{}-{n}", std::process::id()));
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
    let secret = crate::secret::Secret::new("access-token");
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

/// Admits without waiting: `Some(true)` sent, `Some(false)` refused, `None` it would wait.
fn try_admit(budget: &Budget, fallback: &Arc<Token>) -> Option<bool> {
    use futures_util::FutureExt;
    let settings = budget.live.load().budget.clone();
    let client = ClientKey::Address("127.0.0.1".parse().unwrap());
    let admitted = budget
        .admit(&settings, client, fallback, settings.max_queue_wait)
        .now_or_never()?;
    Some(matches!(admitted, Admit::Go { .. }))
}

// Issue 22: the lock-free tickets are the window's own paced credit, never more.
#[tokio::test]
async fn tickets_hand_out_exactly_the_windows_burst() {
    let (budget, token) = budget_with_token();
    // 300 a minute: a burst of 30, the first taken under the lock, the rest as tickets.
    let sent = std::iter::from_fn(|| try_admit(&budget, &token).filter(|ok| *ok))
        .take(100)
        .count();
    assert_eq!(sent, 30);
    assert_eq!(budget.tickets[0].count(), 0);
    assert_eq!(budget.remaining(), vec![270]);
}

#[tokio::test]
async fn a_report_reaches_the_window_and_a_spent_token_voids_the_tickets() {
    let (budget, token) = budget_with_token();
    assert_eq!(try_admit(&budget, &token), Some(true));
    let handed_out = budget.tickets[0].count();
    assert_eq!(handed_out, 29);
    // An ordinary report (plenty left) is recorded without a lock and applied by the next
    // step that holds it; the tickets out stay good.
    budget.observe(&token, 1, 300, Some(60));
    assert_eq!(budget.tickets[0].count(), handed_out);
    assert_eq!(budget.remaining(), vec![299]);
    // Genesys says the token is spent (another user of the client): less room than the
    // tickets promise, so they are given back at once and nothing more is sent to collect a
    // 429.
    budget.observe(&token, 300, 300, Some(60));
    assert_eq!(budget.tickets[0].count(), 0);
    assert_eq!(
        try_admit(&budget, &token),
        Some(false),
        "refused: no budget for a minute"
    );
    assert_eq!(budget.remaining(), vec![0]);
}

#[tokio::test]
async fn a_waiting_request_voids_the_tickets_so_nobody_passes_the_queue() {
    use std::future::Future;
    let (budget, token) = budget_with_token();
    // Spend the burst, then wait: the next request queues (budget frees within its wait).
    while try_admit(&budget, &token) == Some(true) {}
    assert_eq!(
        budget.queued.load(Ordering::SeqCst),
        0,
        "the last one was not queued"
    );
    let settings = budget.live.load().budget.clone();
    let client = ClientKey::Address("127.0.0.2".parse().unwrap());
    let mut waiting = Box::pin(budget.admit(&settings, client, &token, settings.max_queue_wait));
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(waiting.as_mut().poll(&mut cx).is_pending());
    assert_eq!(budget.queued.load(Ordering::SeqCst), 1);
    // Tickets issued now would let newcomers past the waiter; none are.
    budget.tickets[0].refill(token.generation, 5, u64::MAX);
    assert!(
        budget.take_ticket(Instant::now()).is_none(),
        "nobody passes a waiter"
    );
}

// Issue 22: one checkout for every request: the ticket, the cold-start wait for a token, the
// locked path.
#[tokio::test]
async fn checkout_waits_for_a_first_token_and_says_when_none_comes() {
    let (budget, token) = budget_with_token();
    let settings = budget.live.load().budget.clone();
    let client = || ClientKey::Address("127.0.0.1".parse().unwrap());
    let wait = settings.max_queue_wait;
    let got = budget
        .checkout(&settings, client(), wait, Duration::from_millis(10))
        .await;
    assert!(matches!(got, Admit::Go { ref token, .. } if token.generation == 1));
    // Every token refused (or none yet): the checkout waits for the refresher's next one ...
    budget.store.reject(&token);
    let store = budget.store.clone();
    let publish = async {
        store.woken().await;
        let secret = crate::secret::Secret::new("access-token-2");
        let life = Duration::from_secs(3600);
        let source = crate::token::store::TokenSource::Current;
        store.publish(Token::from_secret(&secret, life, 2, 0, Instant::now(), source).unwrap());
    };
    let (got, ()) = tokio::join!(
        budget.checkout(&settings, client(), wait, Duration::from_secs(5)),
        publish
    );
    assert!(matches!(got, Admit::Go { ref token, .. } if token.generation == 2));
    // ... and says so when none comes in time.
    let (budget, token) = budget_with_token();
    budget.store.reject(&token);
    let got = budget
        .checkout(&settings, client(), wait, Duration::from_millis(20))
        .await;
    assert!(matches!(got, Admit::NoToken), "{got:?}");
}

/// Issue 23: two apps always waiting are granted in the ratio of their weights.
#[test]
fn backlogged_apps_are_served_in_the_ratio_of_their_weights() {
    let s = settings();
    let app = |name: &str, weight: u32| {
        ClientKey::Caller(crate::apps::CallerKey {
            name: name.into(),
            weight,
        })
    };
    let (heavy, light) = (app("heavy", 3), app("light", 1));
    let mut q = Queue::default();
    for k in [&heavy, &light] {
        for _ in 0..2 {
            let (tx, _rx) = oneshot::channel();
            q.waiting
                .entry(k.clone())
                .or_default()
                .push_back(Waiter { id: 0, grant: tx });
        }
    }
    let start = Instant::now();
    let book = Book::new(Clock::new(), Duration::from_secs(2));
    let mut served = (0u32, 0u32);
    // 20 grants a second for 8 s, as a 40-per-2-s window paces them.
    for i in 0..160u64 {
        let now = start + Duration::from_millis(50 * i);
        let next = next_client(&q, &book, &s, now).unwrap();
        book.used(&next, now);
        if next == heavy {
            served.0 += 1;
        } else {
            served.1 += 1;
        }
    }
    let ratio = f64::from(served.0) / f64::from(served.1);
    assert!((2.7..=3.3).contains(&ratio), "{served:?}");
}
