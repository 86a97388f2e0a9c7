//! `[[credential]]`: each entry becomes a whole configuration from the top level plus its
//! overrides, with errors naming `credential.<name>.<key>`.

use std::path::Path;

use super::model::IssuerKind;
use super::tests::{base, err_of, secret_file};
use super::*;

fn entry(name: &str, listen: &str, extra: &str, issuer: &str) -> String {
    let f = secret_file("cred", "other-secret\n");
    // `issuer` is the section name, optionally followed by lines of its keys.
    let (section, keys) = issuer.split_once('\n').unwrap_or((issuer, ""));
    format!(
        "\n[[credential]]\nname = \"{name}\"\nlisten = \"{listen}\"\n{extra}\n[credential.{section}]\n{keys}\nclient_id = \"other\"\nclient_secret = {{ file = {:?} }}\n",
        f.display().to_string()
    )
}

#[test]
fn an_entry_inherits_the_top_level_and_overrides_its_own_keys() {
    let top = base(
        "region = \"eu-west-1\"",
        "[proxy]\nallowed_client_cidrs = [\"10.0.0.0/8\"]\n[token]\npool_size = 3\nmax_token_requests_per_minute = 7\n",
    );
    let text = format!(
        "{top}{}",
        entry(
            "reporting",
            "127.0.0.1:8081",
            "allowed_path_prefixes = [\"/api/v2/analytics/\"]\n[credential.token]\npool_size = 1",
            "genesys\nregion = \"ap-southeast-2\"",
        )
    );
    let c = parse(&text, Path::new("t.toml")).unwrap();
    assert_eq!(c.credentials.len(), 2);
    let rc = &c.credentials[1];
    assert_eq!(rc.name.as_str(), "reporting");
    assert_eq!(rc.restart.proxy.listen.to_string(), "127.0.0.1:8081");
    assert_eq!(rc.live.proxy.allowed_path_prefixes, ["/api/v2/analytics/"]);
    assert_eq!(
        rc.live.proxy.allowed_client_cidrs,
        c.top().live.proxy.allowed_client_cidrs,
        "inherited from [proxy]"
    );
    assert_eq!(rc.restart.token.pool_size, 1, "its own [credential.token]");
    assert_eq!(c.top().restart.token.pool_size, 3);
    assert_eq!(
        rc.live.token.max_token_requests_per_minute, 7,
        "inherited from [token]"
    );
    assert_eq!(rc.secrets.client_id, "other");
    assert_eq!(
        rc.restart.genesys.token_url.as_str(),
        "https://login.mypurecloud.com.au/oauth/token"
    );
    assert_eq!(
        c.process.credentials.listeners,
        vec![(
            CredentialName::parse("reporting").unwrap(),
            "127.0.0.1:8081".parse().unwrap()
        )]
    );
}

#[test]
fn an_oauth_entry_gets_the_oauth_defaults() {
    let oauth = "oauth\ntoken_url = \"https://idp.example.com/token\"\napi_url = \"https://api.example.com\"";
    let text = format!(
        "{}{}",
        base("", ""),
        entry(
            "partner",
            "127.0.0.1:8082",
            "[credential.token]\nvalidation = \"none\"",
            oauth
        )
    );
    let c = parse(&text, Path::new("t.toml")).unwrap();
    let p = &c.credentials[1];
    assert_eq!(p.restart.genesys.grant.issuer, IssuerKind::OAuth);
    assert_eq!(p.live.proxy.allowed_path_prefixes, ["/"]);
    assert_eq!(c.top().live.proxy.allowed_path_prefixes, ["/api/v2/"]);
}

#[test]
fn entries_are_checked_and_errors_name_the_credential() {
    let b = base("", "");
    for (entries, needle) in [
        (
            entry("Bad_Name", "127.0.0.1:8081", "", "genesys"),
            "credential[0].name: \"Bad_Name\" must be 1 to 32 of [a-z0-9-]",
        ),
        (
            entry("default", "127.0.0.1:8081", "", "genesys"),
            "is the name of the top-level credential",
        ),
        (
            entry("a", "127.0.0.1:8081", "", "genesys")
                + &entry("a", "127.0.0.1:8082", "", "genesys"),
            "credential.a.name: is used by another credential",
        ),
        (
            entry("a", "127.0.0.1:8080", "", "genesys"),
            "credential.a.listen: 127.0.0.1:8080 is already",
        ),
        (
            entry("a", "127.0.0.1:8081", "", "genesys")
                + &entry("b", "127.0.0.1:8081", "", "genesys"),
            "credential.b.listen",
        ),
        (
            entry("a", "nowhere", "", "genesys"),
            "credential.a.listen: \"nowhere\"",
        ),
        (
            entry(
                "a",
                "127.0.0.1:8081",
                "allowed_client_cidrs = [\"x\"]",
                "genesys",
            ),
            "credential.a.allowed_client_cidrs",
        ),
        (
            entry("a", "127.0.0.1:8081", "", "genesys\nregion = \"mars\""),
            "credential.a.genesys.region",
        ),
        (
            entry(
                "a",
                "127.0.0.1:8081",
                "[credential.token]\npool_size = 0",
                "genesys",
            ),
            "credential.a.token.pool_size",
        ),
        (
            entry("a", "127.0.0.1:8081", "", "genesys")
                .replace("[credential.genesys]", "[credential.nothing]"),
            "unknown field",
        ),
    ] {
        let e = err_of(&format!("{b}{entries}"));
        assert!(e.contains(needle), "{needle}: {e}");
    }
    let no_issuer = format!("{b}\n[[credential]]\nname = \"a\"\nlisten = \"127.0.0.1:8081\"\n");
    assert!(err_of(&no_issuer).contains("credential.a.genesys: section is required"));
}

#[test]
fn adding_a_credential_is_a_restart_key() {
    let one = parse(&base("", ""), Path::new("t.toml")).unwrap();
    let two = parse(
        &format!(
            "{}{}",
            base("", ""),
            entry("a", "127.0.0.1:8081", "", "genesys")
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(one.process.diff(&two.process), ["credential"]);
}

#[test]
fn cluster_settings_are_checked() {
    let ok = parse(
        &base(
            "",
            "[cluster]\nredis_url = \"rediss://redis.internal:6380/2\"",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let c = ok.process.cluster.settings.unwrap();
    assert_eq!(c.key_prefix, "genesys-auth-proxy");
    assert_eq!(c.timeout.as_millis(), 250);
    assert_eq!(c.lease.as_millis(), 15_000);
    assert!(parse(&base("", ""), Path::new("t.toml"))
        .unwrap()
        .process
        .cluster
        .settings
        .is_none());
    for (cluster, needle) in [
        ("", "cluster.redis_url: is required"),
        (
            "redis_url = \"http://x\"",
            "cluster.redis_url: must be redis://",
        ),
        (
            "redis_url = \"redis://:hunter2@x\"",
            "must not hold a password",
        ),
        (
            "redis_url = \"redis://x\"\ntimeout_ms = 0",
            "cluster.timeout_ms",
        ),
        (
            "redis_url = \"redis://x\"\nlease_ms = 10",
            "cluster.lease_ms",
        ),
        (
            "redis_url = \"redis://x\"\nkey_prefix = \"a b\"",
            "cluster.key_prefix",
        ),
        (
            "redis_url = \"redis://x\"\npassword = \"inline\"",
            "expected struct SecretRef",
        ),
    ] {
        let e = err_of(&base("", &format!("[cluster]\n{cluster}")));
        assert!(e.contains(needle), "{needle}: {e}");
        assert!(!e.contains("hunter2"), "the password is not echoed: {e}");
    }
}

#[test]
fn an_entry_has_its_own_egress_proxy_and_errors_name_it() {
    let top = base("", "");
    let text = format!(
        "{top}{}",
        entry(
            "partner",
            "127.0.0.1:8082",
            "",
            "genesys\nregion = \"eu-west-1\"\negress_proxy = \"http://egress.internal:3128\"",
        )
    );
    let c = parse(&text, Path::new("t.toml")).unwrap();
    assert!(c.top().restart.genesys.egress.is_none());
    let egress = c.credentials[1].restart.genesys.egress.as_ref().unwrap();
    assert_eq!(
        (egress.host.as_str(), egress.port),
        ("egress.internal", 3128)
    );
    let bad = text.replace(
        "http://egress.internal:3128",
        "socks5://egress.internal:1080",
    );
    let e = err_of(&bad);
    assert!(e.contains("credential.partner.genesys.egress_proxy"), "{e}");
}
