//! `[proxy.tls]`: the proxy listener speaks TLS, asks for client certificates and takes a
//! verified certificate's SAN as an app proof. Certificates are made at test time by the
//! `openssl` CLI; curl is the client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::apps::{apps_section, OPS_KEY};
use crate::support::*;

/// A CA and certificates made with the openssl CLI.
pub struct Pki {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = temp_dir(name);
        for ca in ["ca", "other-ca"] {
            openssl(
                &dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                    "-subj",
                    &format!("/CN={ca}"),
                    "-days",
                    "2",
                ],
            );
        }
        let pki = Pki { dir };
        pki.issue("server", "ca", "DNS:localhost,IP:127.0.0.1", "2");
        pki
    }

    /// A key and a certificate `name` signed by `ca` with `san`, valid for `days` (negative:
    /// already expired).
    pub fn issue(&self, name: &str, ca: &str, san: &str, days: &str) {
        let d = &self.dir;
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!("subjectAltName={san}\n"),
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                days,
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// `[proxy.tls]` with the server pair and, optionally, the client CA.
    pub fn section(&self, client_ca: bool) -> String {
        let mut s = format!(
            "[proxy.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            self.path("server.crt"),
            self.path("server.key")
        );
        if client_ca {
            s += &format!("client_ca_file = {:?}\n", self.path("ca.crt"));
        }
        s
    }
}

/// curl over HTTPS trusting the test CA, with a client certificate when `cert` is set:
/// the status (0 when the handshake failed) and the body.
pub async fn curl(pki: &Pki, url: String, cert: Option<&str>, extra: &[&str]) -> (u16, String) {
    let mut args: Vec<String> = vec![
        "-s".into(),
        "-o".into(),
        "/dev/stderr".into(),
        "-w".into(),
        "%{http_code}".into(),
        "--cacert".into(),
        pki.path("ca.crt"),
    ];
    if let Some(c) = cert {
        args.extend([
            "--cert".into(),
            pki.path(&format!("{c}.crt")),
            "--key".into(),
            pki.path(&format!("{c}.key")),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(url);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(&args)
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn tls_proxy(pki: &Pki, sim: &genesys_auth_proxy::sim::SimHandle) -> Proxy {
    let dir = temp_dir("tls-proxy");
    let apps = "\n[[app]]\nname = \"reporting\"\nmtls_subjects = [\"spiffe://cluster.local/ns/reporting/sa/app\"]\nallowed_path_prefixes = [\"/api/v2/analytics/\"]\n[[app]]\nname = \"internal\"\nmtls_subjects = [\"dns:Internal.Example\"]\n";
    let toml = proxy_toml(&sim.url(), SECRET, &pki.section(true), "", &dir)
        + &apps_section(&dir, apps, 3600);
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    p
}

#[tokio::test]
async fn client_certificates_prove_apps_by_their_san_and_others_are_refused() {
    let pki = Pki::new("pki");
    pki.issue(
        "reporting",
        "ca",
        "URI:spiffe://cluster.local/ns/reporting/sa/app",
        "2",
    );
    pki.issue("internal", "ca", "DNS:internal.example", "2");
    pki.issue(
        "nobody",
        "ca",
        "URI:spiffe://cluster.local/ns/x/sa/nobody",
        "2",
    );
    pki.issue(
        "stranger",
        "other-ca",
        "URI:spiffe://cluster.local/ns/reporting/sa/app",
        "2",
    );
    pki.issue(
        "expired",
        "ca",
        "URI:spiffe://cluster.local/ns/reporting/sa/app",
        "-1",
    );
    let sim = start_sim(sim_config()).await;
    let p = tls_proxy(&pki, &sim).await;
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", p.running.proxy_addr.port());
    let before = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();

    // The SPIFFE certificate is the reporting app: its paths pass, with the Genesys token.
    let (code, body) = curl(&pki, url("/api/v2/analytics/x"), Some("reporting"), &[]).await;
    assert_eq!(code, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["client_id"], CLIENT_ID);
    let (code, _) = curl(&pki, url("/api/v2/users"), Some("reporting"), &[]).await;
    assert_eq!(code, 403, "held to its paths");
    // A DNS SAN, matched without regard to case.
    assert_eq!(
        curl(&pki, url("/api/v2/users"), Some("internal"), &[])
            .await
            .0,
        200
    );
    // A valid certificate that proves no app: 401.
    let (code, body) = curl(&pki, url("/api/v2/users"), Some("nobody"), &[]).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("proxy.unauthenticated"));
    let during = stats(&sim).await["api_requests"]["total"].as_u64().unwrap();
    // Another CA's or an expired certificate fails the handshake: nothing is forwarded.
    for cert in ["stranger", "expired"] {
        assert_eq!(
            curl(&pki, url("/api/v2/users"), Some(cert), &[]).await.0,
            0,
            "{cert}"
        );
    }
    assert_eq!(
        stats(&sim).await["api_requests"]["total"].as_u64().unwrap(),
        during
    );
    assert_eq!(
        during - before,
        2,
        "only the two allowed calls reached Genesys"
    );
    // No certificate: other proofs still work over TLS.
    let key = format!("Authorization: Bearer {OPS_KEY}");
    assert_eq!(
        curl(&pki, url("/api/v2/users"), None, &["-H", &key])
            .await
            .0,
        200
    );
    assert_eq!(curl(&pki, url("/api/v2/users"), None, &[]).await.0, 401);
    // Plain HTTP to the TLS listener: a clear refusal, not a hang.
    let r = client()
        .get(format!(
            "http://127.0.0.1:{}/api/v2/users",
            p.running.proxy_addr.port()
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("proxy.tls_required"));
    let m = metrics_text(&p).await;
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_rejected_requests_total{reason=\"tls_handshake_failed\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "genesys_proxy_app_auth_failures_total{proof=\"certificate\"}"
        ),
        1.0
    );
    p.running.shutdown().await;
}

#[tokio::test]
async fn a_bad_tls_file_is_refused_by_check_naming_the_key() {
    let pki = Pki::new("pki-bad");
    pki.issue("expired-server", "ca", "IP:127.0.0.1", "-1");
    let dir = temp_dir("tls-bad");
    let base = proxy_toml("http://127.0.0.1:1", SECRET, "", "", &dir);
    let cases = [
        (
            format!(
                "[proxy.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.path("server.crt"),
                pki.path("ca.key")
            ),
            "proxy.tls.key_file",
        ),
        (
            format!(
                "[proxy.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.path("expired-server.crt"),
                pki.path("expired-server.key")
            ),
            "proxy.tls.cert_file",
        ),
        (
            format!(
                "[proxy.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
                pki.path("server.crt"),
                pki.path("server.key"),
                pki.path("server.key")
            ),
            "proxy.tls.client_ca_file",
        ),
        (
            format!(
                "[proxy.tls]\ncert_file = \"/nonexistent.crt\"\nkey_file = {:?}\n",
                pki.path("server.key")
            ),
            "proxy.tls.cert_file",
        ),
    ];
    for (tls, key) in cases {
        let text = format!("{base}\n{tls}");
        let e = genesys_auth_proxy::config::parse(&text, Path::new("t.toml"))
            .err()
            .unwrap_or_else(|| panic!("accepted: {tls}"))
            .to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
}

/// The subject of the certificate the listener serves now (a new handshake).
async fn served_subject(pki: &Pki, port: u16) -> String {
    let ca = pki.path("ca.crt");
    tokio::task::spawn_blocking(move || {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl s_client -connect 127.0.0.1:{port} -CAfile {ca} </dev/null 2>/dev/null | openssl x509 -noout -subject"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .await
    .unwrap()
}

/// cert-manager renews the pair under load: new handshakes get the new certificate (after a
/// moment where the files on disk do not match, which keeps the old pair), and no request
/// fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_pair_replaced_under_load_loses_no_request() {
    let pki = Pki::new("pki-renew");
    pki.issue("renewed", "ca", "DNS:localhost,IP:127.0.0.1", "2");
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("tls-renew");
    // The listener's files live in the proxy's own directory, as a mounted Secret would.
    for f in ["server.crt", "server.key"] {
        std::fs::copy(pki.dir.join(f), dir.join(f)).unwrap();
    }
    let tls = format!(
        "[proxy.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        dir.join("server.crt").display().to_string(),
        dir.join("server.key").display().to_string()
    );
    let toml = proxy_toml(&sim.url(), SECRET, &tls, "", &dir) + "\n[apps]\nanonymous = \"cidr\"\n";
    let p = start_from_toml(&toml, dir.clone()).await;
    p.ready().await;
    let port = p.running.proxy_addr.port();
    assert!(served_subject(&pki, port).await.contains("CN = server"));
    genesys_auth_proxy::app::install_crypto_provider();
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(pki.dir.join("ca.crt")).unwrap()).unwrap();
    // No pooled connections: every request is a new handshake.
    let c = reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (c, stop) = (c.clone(), stop.clone());
            let url = format!("https://localhost:{port}/api/v2/renew");
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(r.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The certificate first, then the key: in between the pair on disk does not match.
    write_atomic(
        &dir.join("server.crt"),
        &std::fs::read_to_string(pki.dir.join("renewed.crt")).unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_atomic(
        &dir.join("server.key"),
        &std::fs::read_to_string(pki.dir.join("renewed.key")).unwrap(),
    );
    eventually(
        Duration::from_secs(10),
        "new handshakes get the renewed certificate",
        || async { served_subject(&pki, port).await.contains("CN = renewed") },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in loops {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!(
        "certificate renewed under load: {ok} requests, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 20, "{ok}");
    p.running.shutdown().await;
}

/// A client that starts a handshake and stalls is dropped within request_header_timeout_ms,
/// like one trickling its request head.
#[tokio::test]
async fn a_stalled_handshake_is_dropped_within_the_head_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new("pki-stall");
    let sim = start_sim(sim_config()).await;
    let dir = temp_dir("tls-stall");
    let extra = format!("request_header_timeout_ms = 500\n{}", pki.section(false));
    let toml =
        proxy_toml(&sim.url(), SECRET, &extra, "", &dir) + "\n[apps]\nanonymous = \"cidr\"\n";
    let p = start_from_toml(&toml, dir).await;
    p.ready().await;
    let mut tcp = tokio::net::TcpStream::connect(p.running.proxy_addr)
        .await
        .unwrap();
    // The first byte of a TLS record, then nothing.
    tcp.write_all(&[0x16]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not answered: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    p.running.shutdown().await;
}
