//! One test per validation rule: each bad input must be refused with its key named.

use std::path::{Path, PathBuf};

use super::*;

/// A secret file of its own for each call: tests run in parallel.
pub(super) fn secret_file(name: &str, contents: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("gap-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = dir.join(format!("{name}-{n}"));
    std::fs::write(&p, contents).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p
}

pub(super) fn base(extra_genesys: &str, rest: &str) -> String {
    let f = secret_file("base", "s3cret\n");
    format!(
        "[genesys]\nclient_id = \"abc\"\nclient_secret = {{ file = {:?} }}\n{extra_genesys}\n{rest}",
        f.display().to_string()
    )
}

pub(super) fn err_of(text: &str) -> String {
    match parse(text, Path::new("t.toml")) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = parse(&base("", ""), Path::new("t.toml")).unwrap();
    assert_eq!(c.top().restart.proxy.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.process.admin.listen.to_string(), "127.0.0.1:9090");
    assert_eq!(
        c.top().live.proxy.allowed_path_prefixes,
        vec!["/api/v2/".to_string()]
    );
    assert_eq!(c.top().live.proxy.replay_body_limit_bytes, 65536);
    assert_eq!(
        c.top().restart.genesys.token_url.as_str(),
        "https://login.mypurecloud.com/oauth/token"
    );
    assert_eq!(c.top().restart.genesys.api.host, "api.mypurecloud.com");
    assert!(c.top().restart.genesys.api.tls);
    assert_eq!(c.top().secrets.client_secret.expose(), "s3cret");
    assert_eq!(c.top().live.token.validation, Validation::TokensMe);
    assert_eq!(c.top().live.token.refresh_before_expiry.as_secs(), 300);
    assert_eq!(c.top().live.token.max_token_requests_per_minute, 20);
}

#[test]
fn unknown_key_is_rejected() {
    let e = err_of(&base("", "[proxy]\nlisten_addr = \"127.0.0.1:1\""));
    assert!(e.contains("listen_addr"), "{e}");
}

#[test]
fn syntax_error_names_the_file() {
    let e = err_of("[proxy\n");
    assert!(e.starts_with("t.toml"), "{e}");
}

#[test]
fn missing_genesys_section() {
    assert!(err_of("[proxy]\n").contains("genesys"));
}

#[test]
fn missing_client_id() {
    let f = secret_file("noid", "x");
    let e = err_of(&format!(
        "[genesys]\nclient_secret = {{ file = {:?} }}\n",
        f.display().to_string()
    ));
    assert!(e.contains("genesys.client_id"), "{e}");
}

#[test]
fn inline_secret_string_is_refused() {
    let e = err_of("[genesys]\nclient_id = \"a\"\nclient_secret = \"plain\"\n");
    assert!(e.contains("client_secret"), "{e}");
}

#[test]
fn missing_secret_env_var() {
    let e = err_of(
        "[genesys]\nclient_id = \"a\"\nclient_secret = { env = \"GAP_TEST_SURELY_UNSET_VAR\" }\n",
    );
    assert!(
        e.contains("genesys.client_secret") && e.contains("GAP_TEST_SURELY_UNSET_VAR"),
        "{e}"
    );
}

#[test]
fn empty_secret_file() {
    let f = secret_file("empty", "\n");
    let e = err_of(&format!(
        "[genesys]\nclient_id = \"a\"\nclient_secret = {{ file = {:?} }}\n",
        f.display().to_string()
    ));
    assert!(
        e.contains("genesys.client_secret") && e.contains("empty"),
        "{e}"
    );
}

#[test]
fn secret_with_both_env_and_file() {
    let e =
        err_of("[genesys]\nclient_id = \"a\"\nclient_secret = { env = \"X\", file = \"/y\" }\n");
    assert!(e.contains("exactly one"), "{e}");
}

#[cfg(unix)]
#[test]
fn group_readable_secret_file_warns() {
    use std::os::unix::fs::PermissionsExt;
    let f = secret_file("loose", "abc");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = parse(
        &format!(
            "[genesys]\nclient_id = \"a\"\nclient_secret = {{ file = {:?} }}\n",
            f.display().to_string()
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert!(
        c.warnings.iter().any(|w| w.contains("readable")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn unknown_region() {
    assert!(err_of(&base("region = \"mars-1\"", "")).contains("genesys.region"));
}

#[test]
fn bare_domain_region() {
    let c = parse(
        &base("region = \"new9.pure.cloud\"", ""),
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(c.top().restart.genesys.api.host, "api.new9.pure.cloud");
}

#[test]
fn plain_http_refused_unless_loopback() {
    let e = err_of(&base("api_url = \"http://api.example.com\"", ""));
    assert!(e.contains("genesys.api_url") && e.contains("http"), "{e}");
    let e = err_of(&base("login_url = \"http://login.example.com\"", ""));
    assert!(e.contains("genesys.login_url"), "{e}");
    let c = parse(
        &base(
            "api_url = \"http://127.0.0.1:9999\"\nlogin_url = \"http://localhost:9999\"",
            "",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert!(!c.top().restart.genesys.api.tls);
    assert_eq!(c.top().restart.genesys.api.host_header(), "127.0.0.1:9999");
}

#[test]
fn api_url_with_path_refused() {
    assert!(err_of(&base("api_url = \"https://api.example.com/v2\"", "")).contains("no path"));
}

#[test]
fn bad_listen_address() {
    assert!(err_of(&base("", "[proxy]\nlisten = \"localhost\"")).contains("proxy.listen"));
    assert!(err_of(&base("", "[admin]\nlisten = \"nope\"")).contains("admin.listen"));
}

#[test]
fn same_listen_for_admin_and_proxy() {
    let e = err_of(&base(
        "",
        "[proxy]\nlisten = \"127.0.0.1:8000\"\n[admin]\nlisten = \"127.0.0.1:8000\"",
    ));
    assert!(e.contains("admin.listen"), "{e}");
}

#[test]
fn bad_cidr() {
    let e = err_of(&base(
        "",
        "[proxy]\nallowed_client_cidrs = [\"10.0.0.0/33\"]",
    ));
    assert!(e.contains("proxy.allowed_client_cidrs"), "{e}");
    let e = err_of(&base("", "[proxy]\nallowed_client_cidrs = []"));
    assert!(e.contains("proxy.allowed_client_cidrs"), "{e}");
}

#[test]
fn bad_path_prefix() {
    let e = err_of(&base("", "[proxy]\nallowed_path_prefixes = [\"api\"]"));
    assert!(e.contains("proxy.allowed_path_prefixes"), "{e}");
    let e = err_of(&base(
        "",
        "[proxy]\nallowed_path_prefixes = [\"/api/../x\"]",
    ));
    assert!(e.contains("proxy.allowed_path_prefixes"), "{e}");
}

#[test]
fn replay_limit_above_pingora_buffer() {
    let e = err_of(&base("", "[proxy]\nreplay_body_limit_bytes = 70000"));
    assert!(e.contains("proxy.replay_body_limit_bytes"), "{e}");
}

#[test]
fn zero_timeout_refused() {
    let e = err_of(&base("", "[proxy]\ntoken_wait_timeout_ms = 0"));
    assert!(e.contains("proxy.token_wait_timeout_ms"), "{e}");
}

#[test]
fn validation_values() {
    assert!(err_of(&base("", "[token]\nvalidation = \"jwks\"")).contains("token.jwks_url"));
    assert!(err_of(&base("", "[token]\nvalidation = \"maybe\"")).contains("token.validation"));
    let c = parse(
        &base("", "[token]\nvalidation = \"none\""),
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(c.top().live.token.validation, Validation::None);
}

#[test]
fn token_rate_cap_range() {
    let e = err_of(&base("", "[token]\nmax_token_requests_per_minute = 0"));
    assert!(e.contains("token.max_token_requests_per_minute"), "{e}");
}

#[test]
fn backoff_max_below_initial() {
    let e = err_of(&base(
        "",
        "[token]\nbackoff_initial_ms = 5000\nbackoff_max_ms = 100",
    ));
    assert!(e.contains("token.backoff_max_ms"), "{e}");
}

#[test]
fn bad_log_settings() {
    assert!(err_of(&base("", "[log]\nformat = \"xml\"")).contains("log.format"));
    assert!(err_of(&base("", "[log]\nlevel = \"foo=notalevel\"")).contains("log.level"));
}

#[test]
fn empty_audit_path() {
    assert!(err_of(&base("", "[audit]\npath = \"\"")).contains("audit.path"));
    let c = parse(&base("", "[audit]\npath = \"-\""), Path::new("t.toml")).unwrap();
    assert_eq!(c.process.audit.target, AuditTarget::Stdout);
}

#[test]
fn client_id_with_colon() {
    let f = secret_file("colon", "x");
    let e = err_of(&format!(
        "[genesys]\nclient_id = \"a:b\"\nclient_secret = {{ file = {:?} }}\n",
        f.display().to_string()
    ));
    assert!(e.contains("genesys.client_id"), "{e}");
}

#[test]
fn ca_file_must_hold_pem_certificates() {
    let e = err_of(&base("ca_file = \"/nonexistent/ca.pem\"", ""));
    assert!(
        e.contains("genesys.ca_file") && e.contains("cannot read"),
        "{e}"
    );
    let junk = secret_file("junk-ca", "not a certificate\n");
    let e = err_of(&base(
        &format!("ca_file = {:?}", junk.display().to_string()),
        "",
    ));
    assert!(
        e.contains("genesys.ca_file") && e.contains("no PEM certificate"),
        "{e}"
    );
}

#[test]
fn threads_range() {
    let e = err_of(&base("", "[proxy]\nthreads = 0"));
    assert!(e.contains("proxy.threads"), "{e}");
}

#[test]
fn anomaly_thresholds_must_be_positive() {
    let e = err_of(&base("", "[anomaly]\nrefresh_failures = 0"));
    assert!(e.contains("anomaly.refresh_failures"), "{e}");
    let e = err_of(&base("", "[anomaly]\nquiet_ms = 0"));
    assert!(e.contains("anomaly.quiet_ms"), "{e}");
    let e = err_of(&base("", "[anomaly]\nwhatever = 1"));
    assert!(e.contains("whatever"), "{e}");
}

#[test]
fn exposed_listeners_are_warned_about() {
    let c = parse(
        &base(
            "",
            "[proxy]\nlisten = \"0.0.0.0:8080\"\n[admin]\nlisten = \"0.0.0.0:9090\"\n[apps]\nanonymous = \"cidr\"",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let w = c.warnings.join("\n");
    assert!(
        w.contains("proxy.listen = 0.0.0.0:8080") && w.contains("only allows loopback"),
        "{w}"
    );
    assert!(
        w.contains("admin.listen = 0.0.0.0:9090") && w.contains("admin.reload_token"),
        "{w}"
    );
    let c = parse(
        &base(
            "",
            "[proxy]\nlisten = \"0.0.0.0:8080\"\nallowed_client_cidrs = [\"0.0.0.0/0\"]\n[apps]\nanonymous = \"cidr\"",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert!(
        c.warnings.iter().any(|w| w.contains("every address")),
        "{:?}",
        c.warnings
    );
    let quiet = parse(&base("", ""), Path::new("t.toml")).unwrap();
    assert!(quiet.warnings.is_empty(), "{:?}", quiet.warnings);
}

#[test]
fn budget_and_pool_are_validated() {
    let c = parse(
        &base(
            "",
            "[token]\npool_size = 4\n[budget]\nmax_queue_wait_ms = 100\n[[budget.app]]\nname = \"reporting\"\ncidrs = [\"10.1.0.0/16\"]\nweight = 3",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(c.top().restart.token.pool_size, 4);
    assert_eq!(c.top().live.budget.apps[0].name, "reporting");
    assert_eq!(c.top().live.budget.apps[0].weight, 3);
    assert_eq!(c.top().live.budget.requests_per_window, 300);
    for (rest, key) in [
        ("[token]\npool_size = 51", "token.pool_size"),
        ("[token]\npool_size = 0", "token.pool_size"),
        (
            "[budget]\nrequests_per_window = 0",
            "budget.requests_per_window",
        ),
        ("[budget]\nwindow_seconds = 0", "budget.window_seconds"),
        (
            "[budget]\nmax_queue_wait_ms = 0",
            "budget.max_queue_wait_ms",
        ),
        (
            "[[budget.app]]\nname = \"other\"\ncidrs = [\"10.0.0.0/8\"]",
            "budget.app[0].name",
        ),
        (
            "[[budget.app]]\nname = \"a b\"\ncidrs = [\"10.0.0.0/8\"]",
            "budget.app[0].name",
        ),
        (
            "[[budget.app]]\nname = \"a\"\ncidrs = []",
            "budget.app[0].cidrs",
        ),
        (
            "[[budget.app]]\nname = \"a\"\ncidrs = [\"x\"]",
            "budget.app[0].cidrs",
        ),
        (
            "[[budget.app]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\nweight = 0",
            "budget.app[0].weight",
        ),
    ] {
        let e = err_of(&base("", rest));
        assert!(e.contains(key), "{rest}: {e}");
    }
}

#[test]
fn jwks_validation_needs_a_jwks_url_and_refuses_hmac() {
    let ok = parse(
        &base(
            "",
            "[token]\nvalidation = \"jwks\"\njwks_url = \"https://idp.example.com/.well-known/jwks.json\"\nissuer = \"https://idp.example.com\"\nalgorithms = [\"RS256\", \"ES256\"]",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let jwks = ok.top().restart.token.jwks.clone().unwrap();
    assert_eq!(jwks.algorithms.len(), 2);
    assert_eq!(jwks.cache.as_secs(), 86_400);
    assert_eq!(jwks.leeway.as_secs(), 30);
    for (rest, key) in [
        ("[token]\nvalidation = \"jwks\"", "token.jwks_url"),
        (
            "[token]\nvalidation = \"jwks\"\njwks_url = \"http://idp.example.com/k\"",
            "token.jwks_url",
        ),
        (
            "[token]\nvalidation = \"jwks\"\njwks_url = \"https://i/k\"\nalgorithms = [\"HS256\"]",
            "token.algorithms",
        ),
        (
            "[token]\nvalidation = \"jwks\"\njwks_url = \"https://i/k\"\nalgorithms = [\"none\"]",
            "token.algorithms",
        ),
        (
            "[token]\nvalidation = \"jwks\"\njwks_url = \"https://i/k\"\nalgorithms = []",
            "token.algorithms",
        ),
    ] {
        let e = err_of(&base("", rest));
        assert!(e.contains(key), "{rest}: {e}");
    }
}

// Regression (issue 21): `check` accepted login_url/api_url/token_url with user:password@ in
// them (as it already refused for redis_url); the error must not echo the password either.
#[test]
fn urls_with_credentials_are_refused_without_echoing_them() {
    for key in ["login_url", "api_url"] {
        let e = err_of(&base(
            &format!("{key} = \"https://user:hunter2@login.mypurecloud.com\""),
            "",
        ));
        assert!(e.contains(&format!("genesys.{key}")), "{e}");
        assert!(e.contains("holds credentials"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
    // A URL that does not even parse is not echoed with its password either.
    let e = err_of(&base("login_url = \"https://u:hunter2@[bad\"", ""));
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn admin_limits_and_hosts_are_checked() {
    let e = err_of(&base("", "[admin]\nmax_connections = 0"));
    assert!(e.contains("admin.max_connections"), "{e}");
    let e = err_of(&base("", "[admin]\nallowed_hosts = [\"http://x\"]"));
    assert!(e.contains("admin.allowed_hosts"), "{e}");
    let c = parse(
        &base("", "[admin]\nallowed_hosts = [\"Proxy.NS.svc\"]"),
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(c.process.admin.allowed_hosts, ["proxy.ns.svc"]);
    assert_eq!(c.process.admin.max_connections, 64);
    assert!(!c.top().live.proxy.allow_non_ascii_paths);
}
