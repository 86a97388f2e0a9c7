//! `[oauth]`: any OAuth2 client-credentials issuer instead of `[genesys]`.

use std::path::Path;

use super::model::{AuthMethod, IssuerKind};
use super::tests::{err_of, secret_file};
use super::*;
use crate::config::model::KeySource;

fn oauth(extra: &str, token: &str) -> String {
    let f = secret_file("oauth", "s3cret\n");
    format!(
        "[oauth]\ntoken_url = \"https://idp.example.com/oauth/token\"\napi_url = \"https://api.example.com\"\nclient_id = \"app\"\nclient_secret = {{ file = {:?} }}\n{extra}\n[token]\n{token}\n",
        f.display().to_string()
    )
}

const JWKS: &str = "jwks_url = \"https://idp.example.com/.well-known/jwks.json\"";

#[test]
fn oauth_defaults_to_basic_auth_jwks_validation_and_any_path() {
    let c = parse(&oauth("", JWKS), Path::new("t.toml")).unwrap();
    let up = &c.top().restart.genesys;
    assert_eq!(up.token_url.as_str(), "https://idp.example.com/oauth/token");
    assert_eq!(up.api.base_url(), "https://api.example.com");
    assert_eq!(up.grant.issuer, IssuerKind::OAuth);
    assert_eq!(up.grant.auth_method, AuthMethod::ClientSecretBasic);
    assert!(up.grant.params.is_empty());
    assert_eq!(c.top().live.token.validation, Validation::Jwks);
    assert_eq!(
        c.top().live.proxy.allowed_path_prefixes,
        vec!["/".to_string()]
    );
    assert_eq!(c.top().secrets.client_id, "app");
}

#[test]
fn scope_audience_and_extra_params_are_sent_in_order() {
    let c = parse(
        &oauth(
            "auth_method = \"client_secret_post\"\nscope = \"read write\"\naudience = \"https://api.example.com\"\nextra_params = { resource = \"r1\", b = \"2\" }",
            JWKS,
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let g = &c.top().restart.genesys.grant;
    assert_eq!(g.auth_method, AuthMethod::ClientSecretPost);
    let params: Vec<(&str, &str)> = g
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        params,
        [
            ("scope", "read write"),
            ("audience", "https://api.example.com"),
            ("b", "2"),
            ("resource", "r1"),
        ]
    );
}

#[test]
fn exactly_one_issuer_section() {
    let both = format!("{}\n", oauth("", JWKS)).replace(
        "[token]",
        "[genesys]\nclient_id = \"x\"\nclient_secret = { env = \"HOME\" }\n[token]",
    );
    assert!(err_of(&both).contains("oauth: give either [genesys] or [oauth]"));
    let neither = "[token]\nvalidation = \"none\"\n";
    assert!(err_of(neither).contains("genesys: section is required"));
}

#[test]
fn oauth_keys_are_checked_and_named() {
    for (extra, needle) in [
        (
            "auth_method = \"private_key_jwt\"",
            "oauth.auth_method: \"private_key_jwt\"",
        ),
        (
            "extra_params = { grant_type = \"password\" }",
            "oauth.extra_params: \"grant_type\" is set by the proxy",
        ),
        (
            "extra_params = { client_secret = \"x\" }",
            "oauth.extra_params: \"client_secret\"",
        ),
        (
            "extra_params = { \"a b\" = \"x\" }",
            "oauth.extra_params: \"a b\" is not a parameter name",
        ),
        ("scope = \"\"", "oauth.scope: must be non-empty"),
        ("audience = \"a\\nb\"", "oauth.audience"),
    ] {
        let e = err_of(&oauth(extra, JWKS));
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let no_token_url =
        oauth("", JWKS).replace("token_url = \"https://idp.example.com/oauth/token\"\n", "");
    assert!(err_of(&no_token_url).contains("oauth.token_url: is required"));
    let http = oauth("", JWKS).replace("https://api.example.com", "http://api.example.com");
    assert!(err_of(&http).contains("oauth.api_url"));
    let no_secret = oauth("", JWKS).replace("client_secret", "previous_client_secret");
    assert!(err_of(&no_secret).contains("oauth.client_secret: is required"));
}

#[test]
fn oauth_validation_needs_keys_and_refuses_tokens_me() {
    let e = err_of(&oauth("", ""));
    assert!(
        e.contains("token.jwks_url") && e.contains("token.issuer"),
        "{e}"
    );
    let e = err_of(&oauth("", "validation = \"tokens_me\""));
    assert!(
        e.contains("token.validation") && e.contains("[oauth]"),
        "{e}"
    );
    let none = parse(&oauth("", "validation = \"none\""), Path::new("t.toml")).unwrap();
    assert_eq!(none.top().live.token.validation, Validation::None);
}

#[test]
fn jwks_is_discovered_from_the_issuer_without_jwks_url() {
    let c = parse(
        &oauth("", "issuer = \"https://idp.example.com/realms/main/\""),
        Path::new("t.toml"),
    )
    .unwrap();
    let jwks = c.top().restart.token.jwks.clone().unwrap();
    assert_eq!(
        jwks.keys,
        KeySource::Discover(
            "https://idp.example.com/realms/main/.well-known/openid-configuration"
                .parse()
                .unwrap()
        )
    );
    assert_eq!(
        jwks.issuer.as_deref(),
        Some("https://idp.example.com/realms/main/")
    );
    let e = err_of(&oauth("", "issuer = \"http://idp.example.com\""));
    assert!(e.contains("token.issuer: cannot discover"), "{e}");
}

#[test]
fn an_oauth_restart_key_is_reported_by_its_oauth_name() {
    let old = parse(&oauth("", JWKS), Path::new("t.toml")).unwrap();
    let new = parse(
        &oauth("scope = \"read\"", JWKS).replace("idp.example.com/oauth", "idp2.example.com/oauth"),
        Path::new("t.toml"),
    )
    .unwrap();
    let d = Diff::between(old.top(), new.top());
    assert_eq!(
        d.restart_required,
        vec!["oauth.token_url", "oauth.auth_method"]
    );
}
