//! The registry's decisions: proofs, revocation by secret change, login.

use super::*;
use crate::config::apps::AppSettings;
use crate::config::CredentialName;
use crate::secret::Secret;

const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";

fn app(name: &str, client_id: Option<&str>, secret: Option<&str>, keys: &[&str]) -> AppSettings {
    AppSettings {
        name: name.into(),
        credential: CredentialName::top(),
        route: 0,
        allowed_methods: vec![http::Method::GET],
        allowed_path_prefixes: vec!["/api/v2/".into()],
        weight: 1,
        client_id: client_id.map(String::from),
        client_secret: secret.map(|s| Digest32::of(s.as_bytes())),
        client_secret_source: None,
        api_keys: keys.iter().map(|k| Digest32::of(k.as_bytes())).collect(),
        mtls_subjects: Vec::new(),
        jwt: None,
    }
}

fn settings(apps: Vec<AppSettings>) -> AppsSettings {
    AppsSettings {
        token_key: Some(Secret::new(KEY)),
        apps,
        ..AppsSettings::default()
    }
}

fn name_of(r: &Result<Caller<'_>, AuthFailure>) -> Result<Option<String>, AuthFailure> {
    match r {
        Ok(Caller::Anonymous) => Ok(None),
        Ok(Caller::App(a)) => Ok(Some(a.name.to_string())),
        Ok(Caller::Workload) => Ok(Some("<workload token>".into())),
        Err(e) => Err(*e),
    }
}

#[test]
fn without_apps_everyone_is_anonymous_and_with_apps_a_proof_is_required() {
    let m = AppMetrics::new();
    let none = Registry::new(&AppsSettings::default(), &m);
    assert_eq!(name_of(&none.identify(None, None, 1)), Ok(None));
    let r = Registry::new(&settings(vec![app("billing", None, None, &["k1"])]), &m);
    assert_eq!(
        name_of(&r.identify(None, None, 1)),
        Err(AuthFailure::Missing)
    );
    assert_eq!(
        name_of(&r.identify(Some(b"Basic abc"), None, 1)),
        Err(AuthFailure::Malformed)
    );
    assert_eq!(
        name_of(&r.identify(Some(b"Bearer k1"), None, 1)),
        Ok(Some("billing".into()))
    );
    assert_eq!(
        name_of(&r.identify(Some(b"bearer k1"), None, 1)),
        Ok(Some("billing".into()))
    );
    assert_eq!(
        name_of(&r.identify(Some(b"Bearer k2"), None, 1)),
        Err(AuthFailure::ApiKey)
    );
    let mut open = settings(vec![app("billing", None, None, &["k1"])]);
    open.anonymous = Anonymous::Cidr;
    let r = Registry::new(&open, &m);
    assert_eq!(name_of(&r.identify(None, None, 1)), Ok(None));
    assert_eq!(
        name_of(&r.identify(Some(b"Bearer wrong"), None, 1)),
        Err(AuthFailure::ApiKey),
        "a wrong proof is refused even where anonymous callers are served"
    );
}

#[test]
fn a_login_token_is_bound_to_the_apps_current_secret() {
    let m = AppMetrics::new();
    let before = settings(vec![
        app("billing", Some("billing-app"), Some("s1"), &[]),
        app("crm", Some("crm-app"), Some("s2"), &[]),
    ]);
    let r = Registry::new(&before, &m);
    assert!(
        r.login("billing-app", "s2").is_none(),
        "another app's secret"
    );
    assert!(r.login("nobody", "s1").is_none());
    let billing = r.login("billing-app", "s1").unwrap();
    let (token, lifetime) = r.issue(billing, 1_000).unwrap();
    assert_eq!(lifetime, 3600);
    let header = format!("Bearer {token}");
    assert_eq!(
        name_of(&r.identify(Some(header.as_bytes()), None, 1_001)),
        Ok(Some("billing".into()))
    );
    assert_eq!(
        name_of(&r.identify(Some(header.as_bytes()), None, 1_000 + 3600)),
        Err(AuthFailure::AppToken),
        "expired"
    );
    // Another replica with the same key accepts it.
    let replica = Registry::new(&before, &m);
    assert!(replica
        .identify(Some(header.as_bytes()), None, 1_001)
        .is_ok());
    // A rotated secret revokes it; so does removing the app, or another key.
    let rotated = settings(vec![app(
        "billing",
        Some("billing-app"),
        Some("s1-new"),
        &[],
    )]);
    let r2 = Registry::new(&rotated, &m);
    assert_eq!(
        name_of(&r2.identify(Some(header.as_bytes()), None, 1_001)),
        Err(AuthFailure::AppToken)
    );
    let removed = settings(vec![app("crm", Some("crm-app"), Some("s2"), &[])]);
    let r3 = Registry::new(&removed, &m);
    assert_eq!(
        name_of(&r3.identify(Some(header.as_bytes()), None, 1_001)),
        Err(AuthFailure::AppToken)
    );
    let mut rekeyed = before.clone();
    rekeyed.token_key = Some(Secret::new("another-key-another-key-another-key!!"));
    let r4 = Registry::new(&rekeyed, &m);
    assert_eq!(
        name_of(&r4.identify(Some(header.as_bytes()), None, 1_001)),
        Err(AuthFailure::AppToken)
    );
}

#[test]
fn the_login_path_is_fixed_or_under_the_prefix() {
    let m = AppMetrics::new();
    let mut s = settings(vec![app("billing", None, None, &["k"])]);
    s.login_path_prefix = "/login".into();
    let r = Registry::new(&s, &m);
    assert!(r.is_login_path("/oauth/token"));
    assert!(r.is_login_path("/login/oauth/token"));
    assert!(!r.is_login_path("/login/oauth/tokens"));
    assert!(!r.is_login_path("/api/v2/oauth/token"));
}

#[test]
fn removed_apps_lose_their_metric_series() {
    let m = AppMetrics::new();
    let r = Registry::new(&settings(vec![app("billing", None, None, &["k"])]), &m);
    r.apps()[0].counters.inc(AppOutcome::Allowed);
    let text = crate::metrics::render_with([], Some(&m));
    assert!(text.contains("app=\"billing\""), "{text}");
    let _ = Registry::new(&settings(vec![app("crm", None, None, &["k2"])]), &m);
    let text = crate::metrics::render_with([], Some(&m));
    assert!(!text.contains("app=\"billing\""), "{text}");
}
