//! Reload classes: every file key belongs to exactly one of restart-only, live and credential,
//! and the diff between two configs follows from that.

use std::path::Path;

use super::*;

fn base(rest: &str) -> String {
    super::tests::base("", rest)
}

/// The reload class of every file key is decided by the model struct its field lives in. This
/// walks the file mirror's types (serde-reflection) and fails when a key is added to the file
/// without a field that names it, i.e. without being classified as restart-only, live or
/// credential.
#[test]
fn every_file_key_is_classified_exactly_once() {
    use serde_reflection::{ContainerFormat, Format, Tracer, TracerConfig};
    use std::collections::BTreeSet;
    let mut tracer = Tracer::new(TracerConfig::default());
    tracer
        .trace_simple_type::<file::FileConfig>()
        .expect("the file mirror can be traced");
    let registry = tracer.registry().expect("complete registry");
    fn walk(
        registry: &serde_reflection::Registry,
        name: &str,
        prefix: &str,
        out: &mut BTreeSet<String>,
    ) {
        let Some(ContainerFormat::Struct(fields)) = registry.get(name) else {
            return;
        };
        for f in fields {
            let key = if prefix.is_empty() {
                f.name.clone()
            } else {
                format!("{prefix}.{}", f.name)
            };
            let mut format = &f.value;
            while let Format::Option(inner) = format {
                format = inner;
            }
            match format {
                // A secret reference ({ env } or { file }) is one key.
                Format::TypeName(t) if t != "SecretRef" => walk(registry, t, &key, out),
                _ => {
                    out.insert(key);
                }
            }
        }
    }
    let mut file_keys = BTreeSet::new();
    walk(&registry, "FileConfig", "", &mut file_keys);

    let restart: BTreeSet<_> = Restart::all_keys()
        .into_iter()
        .chain(Process::all_keys())
        .collect();
    let live: BTreeSet<_> = Live::all_keys()
        .into_iter()
        .chain(apps::AppsSettings::all_keys())
        .chain(tls::TlsConfig::all_keys())
        .collect();
    let credentials: BTreeSet<_> = CredentialSettings::all_keys().into_iter().collect();
    for key in &file_keys {
        let classes = [&restart, &live, &credentials]
            .iter()
            .filter(|c| c.contains(key.as_str()))
            .count();
        assert_eq!(classes, 1, "file key {key:?} is in {classes} reload classes, not 1: give it a field in Restart, Live or CredentialSettings");
    }
    for key in restart.iter().chain(&live).chain(&credentials) {
        assert!(
            file_keys.contains(*key),
            "model names {key:?}, which is not a file key"
        );
    }
    assert!(file_keys.len() > 40, "{file_keys:?}");
}

#[test]
fn live_and_restart_changes_are_told_apart_by_type() {
    let old = parse(&base(""), Path::new("t.toml")).unwrap();
    let new = parse(
        &base(
            "[proxy]\nlisten = \"127.0.0.1:1234\"\nallowed_path_prefixes = [\"/api/v2/users\"]\n[anomaly]\nquiet_ms = 5",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let d = Diff::between(old.top(), new.top());
    assert_eq!(
        d.applied,
        vec!["proxy.allowed_path_prefixes", "anomaly.quiet_ms"]
    );
    assert_eq!(d.restart_required, vec!["proxy.listen"]);
    assert!(!d.credentials && !d.previous_secret);
}

#[test]
fn a_new_secret_is_a_credential_change_not_a_live_or_restart_one() {
    let with_secret = |secret: &str| {
        let f = super::tests::secret_file("rotate", secret);
        let text = format!(
            "[genesys]\nclient_id = \"abc\"\nclient_secret = {{ file = {:?} }}\n",
            f.display().to_string()
        );
        parse(&text, Path::new("t.toml")).unwrap()
    };
    let d = Diff::between(
        with_secret("old-secret").top(),
        with_secret("new-secret").top(),
    );
    assert!(d.credentials && !d.previous_secret, "{d:?}");
    assert!(
        d.applied.is_empty() && d.restart_required.is_empty(),
        "{d:?}"
    );
}
