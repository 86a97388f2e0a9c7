//! `[apps]` and `[[app]]`: one test per rule, each error naming its key.

use std::path::Path;

use super::apps::Anonymous;
use super::tests::{base, err_of, secret_file};
use super::*;

const KEY_LINE: &str = "0123456789abcdef0123456789abcdef";
const HEX_A: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
const HEX_B: &str = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

fn with_key(rest: &str) -> String {
    static KEY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| secret_file("app-token-key", &format!("{KEY_LINE}\n")));
    base(
        "",
        &format!(
            "[apps]\ntoken_key = {{ file = {:?} }}\n{rest}",
            key.display().to_string()
        ),
    )
}

#[test]
fn an_app_with_a_login_and_keys_is_built_with_defaults() {
    let secret = secret_file("billing", "billing-secret\n");
    let c = parse(
        &with_key(&format!(
            "[[app]]\nname = \"billing\"\nclient_id = \"billing-app\"\nclient_secret = {{ file = {:?} }}\napi_key_sha256 = [\"{HEX_A}\", \"{HEX_B}\"]\nweight = 2\n",
            secret.display().to_string()
        )),
        Path::new("t.toml"),
    )
    .unwrap();
    let a = &c.apps.apps[0];
    assert_eq!(a.name, "billing");
    assert!(a.credential.is_top());
    assert_eq!(a.weight, 2);
    assert_eq!(a.api_keys.len(), 2);
    // The secret file's contents are read and hashed (the trailing newline trimmed).
    assert_eq!(
        a.client_secret,
        Some(super::apps::Digest32::of(b"billing-secret"))
    );
    // Methods and paths default to the credential's.
    assert_eq!(a.allowed_methods, c.top().live.proxy.allowed_methods);
    assert_eq!(a.allowed_path_prefixes, vec!["/api/v2/".to_string()]);
    assert_eq!(c.apps.token_lifetime.as_secs(), 3600);
    assert_eq!(c.apps.anonymous, Anonymous::Unset);
    assert!(c.apps.secret_files().count() == 2);
}

#[test]
fn an_app_needs_a_proof_and_a_login_needs_the_token_key() {
    let e = err_of(&with_key("[[app]]\nname = \"billing\"\n"));
    assert!(e.contains("app.billing") && e.contains("no proof"), "{e}");
    let e = err_of(&base(
        "",
        &format!(
            "[[app]]\nname = \"billing\"\nclient_id = \"x\"\nclient_secret_sha256 = \"{HEX_A}\"\n"
        ),
    ));
    assert!(e.contains("apps.token_key"), "{e}");
    let e = err_of(&with_key(
        "[[app]]\nname = \"billing\"\nclient_id = \"x\"\n",
    ));
    assert!(e.contains("app.billing.client_secret"), "{e}");
}

#[test]
fn names_client_ids_and_keys_are_unique_and_well_formed() {
    let app = |name: &str, hex: &str| {
        format!("[[app]]\nname = \"{name}\"\napi_key_sha256 = [\"{hex}\"]\n")
    };
    let e = err_of(&with_key(&app("Billing", HEX_A)));
    assert!(e.contains("app[0].name"), "{e}");
    let e = err_of(&with_key(&app("unknown", HEX_A)));
    assert!(e.contains("reserved"), "{e}");
    let e = err_of(&with_key(&format!(
        "{}{}",
        app("a", HEX_A),
        app("a", HEX_B)
    )));
    assert!(e.contains("app.a.name"), "{e}");
    let e = err_of(&with_key(&format!(
        "{}{}",
        app("a", HEX_A),
        app("b", HEX_A)
    )));
    assert!(e.contains("app.b.api_key_sha256"), "{e}");
    let e = err_of(&with_key(&app("a", "abc")));
    assert!(
        e.contains("app.a.api_key_sha256") && e.contains("64 hex"),
        "{e}"
    );
    let both = format!(
        "[[app]]\nname = \"a\"\nclient_id = \"x\"\nclient_secret_sha256 = \"{HEX_A}\"\n[[app]]\nname = \"b\"\nclient_id = \"x\"\nclient_secret_sha256 = \"{HEX_B}\"\n"
    );
    let e = err_of(&with_key(&both));
    assert!(e.contains("app.b.client_id"), "{e}");
}

#[test]
fn an_app_names_a_known_credential() {
    let e = err_of(&with_key(&format!(
        "[[app]]\nname = \"a\"\ncredential = \"partner\"\napi_key_sha256 = [\"{HEX_A}\"]\n"
    )));
    assert!(
        e.contains("app.a.credential") && e.contains("partner"),
        "{e}"
    );
}

#[test]
fn a_short_token_key_a_bad_lifetime_or_anonymous_value_is_refused() {
    let short = secret_file("short-key", "too-short\n");
    let e = err_of(&base(
        "",
        &format!(
            "[apps]\ntoken_key = {{ file = {:?} }}\n",
            short.display().to_string()
        ),
    ));
    assert!(
        e.contains("apps.token_key") && e.contains("32 bytes"),
        "{e}"
    );
    let e = err_of(&with_key("token_lifetime_seconds = 0\n"));
    assert!(e.contains("apps.token_lifetime_seconds"), "{e}");
    let e = err_of(&with_key("anonymous = \"everyone\"\n"));
    assert!(e.contains("apps.anonymous"), "{e}");
    let e = err_of(&with_key("login_path_prefix = \"login\"\n"));
    assert!(e.contains("apps.login_path_prefix"), "{e}");
}

#[test]
fn a_network_listener_needs_apps_or_an_explicit_anonymous() {
    let e = err_of(&base(
        "",
        "[proxy]\nlisten = \"0.0.0.0:8080\"\nallowed_client_cidrs = [\"10.0.0.0/8\"]\n",
    ));
    assert!(e.contains("proxy.listen") && e.contains("[[app]]"), "{e}");
    let ok = base(
        "",
        "[proxy]\nlisten = \"0.0.0.0:8080\"\nallowed_client_cidrs = [\"10.0.0.0/8\"]\n[apps]\nanonymous = \"cidr\"\n",
    );
    assert!(parse(&ok, Path::new("t.toml")).is_ok());
    let with_app = base(
        "",
        &format!("[proxy]\nlisten = \"0.0.0.0:8080\"\nallowed_client_cidrs = [\"10.0.0.0/8\"]\n[[app]]\nname = \"a\"\napi_key_sha256 = [\"{HEX_A}\"]\n"),
    );
    assert!(parse(&with_app, Path::new("t.toml")).is_ok());
    // Loopback listeners keep working without apps.
    assert!(parse(&base("", ""), Path::new("t.toml")).is_ok());
}

#[test]
fn app_changes_are_live() {
    let one = with_key(&format!(
        "[[app]]\nname = \"a\"\napi_key_sha256 = [\"{HEX_A}\"]\n"
    ));
    let two = with_key(&format!(
        "[[app]]\nname = \"a\"\napi_key_sha256 = [\"{HEX_B}\"]\n"
    ));
    let (c1, c2) = (
        parse(&one, Path::new("t.toml")).unwrap(),
        parse(&two, Path::new("t.toml")).unwrap(),
    );
    assert_eq!(c1.apps.diff(&c2.apps), vec!["app"]);
    assert!(c1.process.diff(&c2.process).is_empty());
    let rows = keys::table();
    let row = |k: &str| rows.iter().find(|r| r.key == k).unwrap().class;
    assert_eq!(row("app"), keys::KeyClass::Live);
    assert_eq!(row("apps.token_key"), keys::KeyClass::Live);
}

#[test]
fn certificate_and_workload_proofs_are_checked() {
    let e = err_of(&with_key(
        "[[app]]\nname = \"a\"\nmtls_subjects = [\"spiffe://cluster.local/ns/a/sa/b\"]\n",
    ));
    assert!(
        e.contains("app.a.mtls_subjects") && e.contains("client_ca_file"),
        "{e}"
    );
    let e = err_of(&with_key(
        "[[app]]\nname = \"a\"\nmtls_subjects = [\"just-a-name\"]\n",
    ));
    assert!(e.contains("app.a.mtls_subjects"), "{e}");
    let e = err_of(&with_key(
        "[[app]]\nname = \"a\"\njwt = { issuer = \"https://k8s.example\", subjects = [\"s\"] }\n",
    ));
    assert!(e.contains("app.a.jwt.audience"), "{e}");
    let e = err_of(&with_key(
        "[[app]]\nname = \"a\"\njwt = { issuer = \"https://k8s.example\", audience = \"x\" }\n",
    ));
    assert!(e.contains("app.a.jwt.subjects"), "{e}");
    let c = parse(
        &with_key(
            "[[app]]\nname = \"a\"\njwt = { issuer = \"https://kubernetes.default.svc\", audience = \"genesys-auth-proxy\", subjects = [\"system:serviceaccount:a:b\"] }\n",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let jwt = c.apps.apps[0].jwt.as_ref().unwrap();
    assert_eq!(
        jwt.keys,
        super::model::KeySource::Discover(
            "https://kubernetes.default.svc/.well-known/openid-configuration"
                .parse()
                .unwrap()
        )
    );
}
