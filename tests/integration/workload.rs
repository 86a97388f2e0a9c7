//! `[[app]] jwt`: workload tokens from an independent issuer (PyJWT and cryptography, serving
//! OpenID discovery and a JWKS: `tests/sdk/jose_issuer.py`) with the Kubernetes claim shape.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::apps::apps_section;
use crate::support::*;

const AUDIENCE: &str = "genesys-auth-proxy";
const SUBJECT: &str = "system:serviceaccount:reporting:app";

/// The issuer process; it stops when its stdin closes (on drop).
struct Issuer {
    child: Child,
    issuer: String,
    tokens: Value,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn issuer() -> Option<Issuer> {
    let python = crate::sdk::installed("python/jwt")?;
    let mut child = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/jose_issuer.py"
        ))
        .args([AUDIENCE, SUBJECT])
        .env("PYTHONPATH", python.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    Some(Issuer {
        child,
        issuer: v["issuer"].as_str().unwrap().to_string(),
        tokens: v["tokens"].clone(),
    })
}

#[tokio::test]
async fn workload_tokens_prove_their_app_and_forged_or_wrong_ones_are_refused() {
    let Some(iss) = issuer() else { return };
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("workload");
    let app = format!(
        "\n[[app]]\nname = \"reporting\"\nallowed_path_prefixes = [\"/api/v2/analytics/\"]\njwt = {{ issuer = \"{}\", audience = \"{AUDIENCE}\", subjects = [\"{SUBJECT}\"] }}\n",
        iss.issuer
    );
    let toml = proxy_toml(&sim.url(), SECRET, "", "", &dir) + &apps_section(&dir, &app, 3600);
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let call = |token: String, path: &'static str| {
        let url = p.url(path);
        async move {
            let r = client().get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let token = |case: &str| iss.tokens[case].as_str().unwrap().to_string();
    for case in ["good", "good_es256"] {
        let (status, echo) = call(token(case), "/api/v2/analytics/x").await;
        assert_eq!(status, 200, "{case}: {echo}");
        assert_eq!(
            echo["client_id"], CLIENT_ID,
            "the Genesys token went upstream"
        );
        // Held to the app's paths.
        assert_eq!(call(token(case), "/api/v2/users").await.0, 403, "{case}");
    }
    // The workload token never reaches Genesys.
    let s = stats(&sim).await;
    let fp = genesys_auth_proxy::fingerprint::fingerprint(token("good").as_bytes());
    assert!(!s["api_requests"]["by_token"]
        .as_object()
        .unwrap()
        .contains_key(&fp));
    let before = s["api_requests"]["total"].as_u64().unwrap();
    for case in [
        "wrong_audience",
        "wrong_subject",
        "wrong_issuer",
        "expired",
        "not_yet_valid",
        "unknown_kid",
        "bad_signature",
        "alg_none",
        "hs256_public_key",
    ] {
        let (status, body) = call(token(case), "/api/v2/analytics/x").await;
        assert_eq!(status, 401, "{case}: {body}");
        assert_eq!(body["code"], "proxy.unauthenticated", "{case}");
    }
    assert_eq!(
        stats(&sim).await["api_requests"]["total"].as_u64().unwrap(),
        before,
        "no refused token reached Genesys"
    );
    // A verified token keeps working once the issuer is gone (remembered until its exp).
    let good = token("good");
    drop(iss);
    assert_eq!(call(good, "/api/v2/analytics/x").await.0, 200);
    let m = metrics_text(&p).await;
    assert!(
        metric(
            &m,
            "genesys_proxy_app_auth_failures_total{proof=\"workload_token\"}"
        ) >= 7.0,
        "{m}"
    );
    p.running.shutdown().await;
}
