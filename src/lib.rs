//! genesys-auth-proxy: lets internal applications call the Genesys Cloud Platform API without
//! holding a credential.
//!
//! # The map
//!
//! - [`cli`]: command-line definitions; [`commands`]: what each command does (with the `sim`
//!   feature, `commands::demo`: the `demo` and `sim` commands).
//! - [`app`]: the one place that wires services and listeners for `run` and `demo`;
//!   [`worker`]: the proxy's worker threads and accept loops, with [`admission`] (client
//!   address and connection cap at accept) and [`head_clock`] (the whole-request-head
//!   deadline); [`shutdown`]: the shutdown trigger every task listens to.
//! - [`config`]: the TOML file's serde mirror and the validated model: the `Process` (what one
//!   process owns) and its `Credential`s, each split by reload class: `Restart` (read once),
//!   `Live` (swapped in place as one `ArcSwap` snapshot) and `CredentialSettings` (validated by
//!   the refresher before use). Every model field names its file key, so the reload diff (and
//!   `check --keys`) follows from the types.
//! - [`apps`]: caller identity (`[[app]]`): the SDKs' login against the proxy and its own
//!   sealed tokens, API keys, per-app methods, paths, credential and budget weight, and the
//!   failed-proof guard.
//! - [`region`]: the Genesys Cloud region table; [`egress`]: the corporate forward proxy
//!   (`egress_proxy`) both hosts are reached through: a CONNECT tunnel for the API path.
//! - [`token`]: the token lifecycle. One [`token::refresher`] owns the token endpoint (through
//!   a [`token::minter::Minter`]); [`token::schedule`] decides when, as pure functions; the
//!   pool's tokens (`[token] pool_size`) live in a [`token::store`] that requests read
//!   lock-free and ask for a replacement after a 401.
//! - [`proxy`]: the pingora `ProxyHttp` implementation: thin hooks over the decisions in
//!   `proxy::decide` (allowlists, header rewriting, replay rules, refusals).
//! - [`budget`]: the per-token rate-limit budget: requests take a call before they are sent
//!   (lock-free while budget is plentiful), wait fairly in a bounded queue when it is spent,
//!   and a Genesys 429 is re-sent once budget frees.
//! - [`cluster`]: `[cluster]`, replicas sharing tokens and budget through one Redis link per
//!   process.
//! - [`admin`]: `/healthz`, `/readyz`, `/status`, `/metrics`, `/reload` on their own listener.
//! - [`reload`]: the one reload path (SIGHUP, `POST /reload`, [`watch`]ed secret files):
//!   read → parse → validate → compare → apply.
//! - [`anomaly`]: the sliding-window anomaly detector and its audit/metrics wiring.
//! - [`logging`]: JSON or text `tracing` logs, pingora's records bridged in, reloadable level.
//! - [`telemetry`]: `[tracing]`: OpenTelemetry spans per request, upstream attempt and token
//!   mint, `traceparent` continued to Genesys, exported over OTLP/HTTP off the request path.
//! - [`metrics`]: every Prometheus metric, defined in one place.
//! - [`audit`]: the hash-chained JSON-lines audit log (one writer thread) and its verifier.
//! - [`sim`] (with the `sim` feature, on by default): the Genesys Cloud simulator used by tests,
//!   benchmarks and `demo`.
//! - [`secret`]: secrets and tokens that cannot be printed; [`fingerprint`]: how secrets may
//!   be shown; [`files`]: bounded, non-blocking reads of
//!   operator-supplied files; [`sync`]: the poison-tolerant lock helper.
//!
//! # The life of a request
//!
//! 1. A [`worker`] thread accepts a connection on the proxy listener and hands it to pingora.
//! 2. [`proxy`] loads the live settings once for the request, checks the client address,
//!    answers an app's login itself, identifies the calling app (with `[[app]]`: its proof,
//!    which picks the credential), checks the method and path, takes a call of the rate-limit [`budget`] from the pool token with the
//!    most left (waiting fairly, bounded, if all are spent), strips any client
//!    `Authorization`, injects the bearer and forwards to the configured API host only.
//! 3. On an upstream 401 it asks the store for a replacement for the token it used (the
//!    pre-rotation token during a rotation, else a newer one the refresher mints, single
//!    flight), waits a bounded time, and replays the request (body from pingora's retry
//!    buffer).
//! 4. A Genesys 429 marks the token spent and the request is sent again once budget frees
//!    (within its queue wait). Everything else passes through unchanged.
//! 5. `logging` records metrics, feeds the anomaly detector and writes the optional access log.

pub mod admin;
pub mod admission;
pub mod anomaly;
pub mod app;
pub mod apps;
pub mod audit;
pub mod budget;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod egress;
pub mod files;
pub mod fingerprint;
pub mod head_clock;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod region;
pub mod reload;
pub mod secret;
pub mod shutdown;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sync;
pub mod telemetry;
pub mod token;
pub mod watch;
pub mod worker;

#[cfg(test)]
mod module_map {
    /// Every `pub mod` is named in its parent's `//!` map, so the maps cannot drift from the
    /// code (a module added without a word in the map fails here).
    #[test]
    fn every_public_module_is_named_in_its_parents_map() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut missing = Vec::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let doc: String = text
                    .lines()
                    .filter(|l| l.starts_with("//!"))
                    .collect::<Vec<_>>()
                    .join("\n");
                for line in text.lines() {
                    let Some(rest) = line
                        .strip_prefix("pub mod ")
                        .or_else(|| line.strip_prefix("pub(crate) mod "))
                    else {
                        continue;
                    };
                    let name = rest.trim_end_matches(';');
                    let named = doc
                        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .any(|w| w == name);
                    if !named {
                        missing.push(format!("{}: {name}", path.display()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in their module's map: {missing:?}");
    }
}
