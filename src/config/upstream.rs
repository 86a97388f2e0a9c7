//! The issuer sections: `[genesys]` (region-derived hosts, Genesys's fixed grant) or `[oauth]`
//! (any RFC 6749 client-credentials issuer). Exactly one is given; both yield the same
//! [`UpstreamSettings`] and [`CredentialSettings`].

use std::path::Path;

use reqwest::Url;

use super::builder::{secret, Builder, Built};
use super::file::{GenesysSection, OAuthSection, SecretRef};
use super::model::*;
use super::value::{load_ca_file, parse_url};
use crate::region;

/// Form parameters the proxy sets itself; `oauth.extra_params` may not name them.
const RESERVED_PARAMS: [&str; 7] = [
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
    "client_assertion",
    "client_assertion_type",
];

/// The issuer section, whichever of `[genesys]` and `[oauth]` was given.
pub(super) fn issuer(
    b: &mut Builder,
    genesys: Option<GenesysSection>,
    oauth: Option<OAuthSection>,
) -> Built<(UpstreamSettings, CredentialSettings)> {
    match (genesys, oauth) {
        (Some(g), None) => {
            let mut upstream = genesys_upstream(b, &g)?;
            let egress = (
                g.egress_proxy,
                g.egress_proxy_username,
                g.egress_proxy_password,
            );
            upstream.egress = egress_proxy(b, "genesys", egress)?;
            let ids = (g.client_id, g.client_secret, g.previous_client_secret);
            Ok((upstream, credentials(b, "genesys", ids)?))
        }
        (None, Some(o)) => {
            let mut upstream = oauth_upstream(b, &o)?;
            let egress = (
                o.egress_proxy,
                o.egress_proxy_username,
                o.egress_proxy_password,
            );
            upstream.egress = egress_proxy(b, "oauth", egress)?;
            let ids = (o.client_id, o.client_secret, o.previous_client_secret);
            Ok((upstream, credentials(b, "oauth", ids)?))
        }
        (Some(_), Some(_)) => Err(b.err(
            "oauth",
            "give either [genesys] or [oauth], not both (one issuer per proxy)",
        )),
        (None, None) => Err(b.err(
            "genesys",
            "section is required (client_id, client_secret), or [oauth] for another OAuth2 issuer",
        )),
    }
}

/// Token URL and API target from `region`, `login_url` and `api_url`.
fn genesys_upstream(b: &Builder, g: &GenesysSection) -> Built<UpstreamSettings> {
    let region = g.region.as_deref().unwrap_or("us-east-1");
    let domain = region::domain_for(region).ok_or_else(|| {
        b.err(
            "genesys.region",
            format!("{region:?} is neither a known region nor a domain"),
        )
    })?;
    let (login_default, api_default) = region::urls_for(&domain);
    let login_url = parse_url(g.login_url.as_deref().unwrap_or(&login_default))
        .map_err(|m| b.err("genesys.login_url", m))?;
    let token_url = login_url
        .join("/oauth/token")
        .map_err(|e| b.err("genesys.login_url", e.to_string()))?;
    let api = api_target(
        b,
        g.api_url.as_deref().unwrap_or(&api_default),
        "genesys.api_url",
    )?;
    Ok(UpstreamSettings {
        token_url,
        api,
        watch_secret_files: g.watch_secret_files.unwrap_or(true),
        ca_certs: ca_file(b, g.ca_file.as_deref(), "genesys.ca_file")?,
        grant: Grant::genesys(),
        egress: None,
    })
}

/// `[oauth]`: the token URL as given (it is the issuer's full endpoint), the API target and
/// the grant's authentication method and parameters.
fn oauth_upstream(b: &Builder, o: &OAuthSection) -> Built<UpstreamSettings> {
    let token_url = o.token_url.as_deref().ok_or_else(|| {
        b.err(
            "oauth.token_url",
            "is required (the issuer's token endpoint)",
        )
    })?;
    let token_url = parse_url(token_url).map_err(|m| b.err("oauth.token_url", m))?;
    let api_url = o.api_url.as_deref().ok_or_else(|| {
        b.err(
            "oauth.api_url",
            "is required (where requests are forwarded)",
        )
    })?;
    let api = api_target(b, api_url, "oauth.api_url")?;
    let auth_method = match o.auth_method.as_deref().unwrap_or("client_secret_basic") {
        "client_secret_basic" => AuthMethod::ClientSecretBasic,
        "client_secret_post" => AuthMethod::ClientSecretPost,
        other => {
            return Err(b.err(
                "oauth.auth_method",
                format!("{other:?} is not \"client_secret_basic\" or \"client_secret_post\""),
            ))
        }
    };
    let mut params = Vec::new();
    for (key, value) in [("scope", &o.scope), ("audience", &o.audience)] {
        if let Some(v) = value {
            params.push((key.to_string(), param_value(b, v, &format!("oauth.{key}"))?));
        }
    }
    for (name, value) in o.extra_params.iter().flatten() {
        let key = "oauth.extra_params";
        if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(b.err(key, format!("{name:?} is not a parameter name")));
        }
        if RESERVED_PARAMS.contains(&name.as_str()) {
            return Err(b.err(
                key,
                format!("{name:?} is set by the proxy (use oauth.scope / oauth.audience)"),
            ));
        }
        params.push((name.clone(), param_value(b, value, key)?));
    }
    Ok(UpstreamSettings {
        token_url,
        api,
        watch_secret_files: o.watch_secret_files.unwrap_or(true),
        ca_certs: ca_file(b, o.ca_file.as_deref(), "oauth.ca_file")?,
        grant: Grant {
            issuer: IssuerKind::OAuth,
            auth_method,
            params,
        },
        egress: None,
    })
}

/// `egress_proxy`, its username and password, of one issuer section.
type Egress = (Option<String>, Option<String>, Option<SecretRef>);

/// `egress_proxy = "http://host:port"`: plain HTTP to the forward proxy (the tunnel to the
/// API is TLS end to end), no credentials in the URL (they would show wherever the URL
/// does), a username with an optional password read like a secret.
fn egress_proxy(b: &mut Builder, section: &str, raw: Egress) -> Built<Option<EgressProxy>> {
    let key = |name: &str| format!("{section}.{name}");
    let (url, username, password) = raw;
    let Some(url) = url else {
        if username.is_some() || password.is_some() {
            return Err(b.err(
                &key("egress_proxy"),
                "is required when egress_proxy_username or egress_proxy_password is set",
            ));
        }
        return Ok(None);
    };
    let k = key("egress_proxy");
    let parsed = Url::parse(&url).map_err(|e| b.err(&k, format!("{url:?} is not a URL: {e}")))?;
    if parsed.scheme() != "http" {
        return Err(b.err(
            &k,
            format!(
                "scheme {:?} is not supported: use http://host:port (the tunnel to Genesys is TLS end to end)",
                parsed.scheme()
            ),
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(b.err(
            &k,
            format!(
                "must not carry credentials: set {} and {} instead",
                key("egress_proxy_username"),
                key("egress_proxy_password")
            ),
        ));
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
        return Err(b.err(&k, "must be http://host[:port] with no path"));
    }
    let host = parsed
        .host_str()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    if host.is_empty() {
        return Err(b.err(&k, "names no host"));
    }
    if let Some(user) = &username {
        if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
            return Err(b.err(
                &key("egress_proxy_username"),
                "must be non-empty, without ':' or control characters",
            ));
        }
    }
    let password = match password {
        None => None,
        Some(_) if username.is_none() => {
            return Err(b.err(
                &key("egress_proxy_password"),
                format!("needs {} (Basic credentials)", key("egress_proxy_username")),
            ))
        }
        Some(r) => Some(secret(b, r, &key("egress_proxy_password"))?.0),
    };
    Ok(Some(EgressProxy {
        port: parsed.port_or_known_default().unwrap_or(80),
        url: parsed,
        host,
        username,
        password,
        no_proxy: crate::egress::NoProxy::from_env(),
    }))
}

fn param_value(b: &Builder, value: &str, key: &str) -> Built<String> {
    if value.trim().is_empty() || value.chars().any(char::is_control) {
        return Err(b.err(key, "must be non-empty text without control characters"));
    }
    Ok(value.to_string())
}

/// `scheme://host[:port]`, no path: where requests are forwarded.
fn api_target(b: &Builder, url: &str, key: &str) -> Built<ApiTarget> {
    let api_url = parse_url(url).map_err(|m| b.err(key, m))?;
    if !matches!(api_url.path(), "" | "/") || api_url.query().is_some() {
        return Err(b.err(key, "must be scheme://host[:port] with no path"));
    }
    Ok(ApiTarget {
        tls: api_url.scheme() == "https",
        host: api_url
            .host_str()
            .unwrap_or_default()
            .trim_matches(|c| c == '[' || c == ']')
            .to_string(),
        port: api_url.port_or_known_default().unwrap_or(443),
    })
}

fn ca_file(b: &Builder, file: Option<&str>, key: &str) -> Built<Option<Vec<Vec<u8>>>> {
    match file {
        None => Ok(None),
        Some(f) => Ok(Some(load_ca_file(Path::new(f)).map_err(|m| b.err(key, m))?)),
    }
}

/// `client_id`, `client_secret` and `previous_client_secret` of one issuer section.
type Ids = (Option<String>, Option<SecretRef>, Option<SecretRef>);

/// Client id and secrets of `section`; each secret is read now so a bad one fails the load.
fn credentials(b: &mut Builder, section: &str, ids: Ids) -> Built<CredentialSettings> {
    let key = |name: &str| format!("{section}.{name}");
    let (client_id, client_secret, previous_client_secret) = ids;
    let client_id = client_id.unwrap_or_default();
    if client_id.trim().is_empty() {
        return Err(b.err(&key("client_id"), "is required and must not be empty"));
    }
    if client_id.contains(':') && section == "genesys" {
        return Err(b.err(&key("client_id"), "must not contain ':'"));
    }
    if client_id.chars().any(char::is_control) {
        return Err(b.err(&key("client_id"), "must not contain control characters"));
    }
    let secret_ref = client_secret.ok_or_else(|| {
        b.err(
            &key("client_secret"),
            "is required: { env = \"NAME\" } or { file = \"/path\" }",
        )
    })?;
    let (client_secret, client_secret_source) = secret(b, secret_ref, &key("client_secret"))?;
    let (previous_client_secret, previous_client_secret_source) = match previous_client_secret {
        None => (None, None),
        Some(r) => {
            let (s, src) = secret(b, r, &key("previous_client_secret"))?;
            (Some(s), Some(src))
        }
    };
    Ok(CredentialSettings {
        client_id,
        client_secret,
        client_secret_source,
        previous_client_secret,
        previous_client_secret_source,
    })
}
