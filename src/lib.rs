//! genesys-auth-proxy: lets internal applications call the Genesys Cloud Platform API without
//! holding a credential.
//!
//! # The map
//!
//! - [`cli`]: command-line definitions; [`app`] wires listeners and services for `run` and
//!   `demo`.
//! - [`config`]: the TOML file's serde mirror and the validated model the rest of the code uses.
//! - [`region`]: the Genesys Cloud region table.
//! - [`token`]: the token lifecycle. One refresher owns the token endpoint; the current token
//!   lives in an `ArcSwap` store that requests read lock-free.
//! - [`proxy`]: the pingora `ProxyHttp` implementation: allowlists, header rewriting, the
//!   401 → refresh → replay path.
//! - [`admin`]: `/healthz`, `/readyz`, `/status`, `/metrics`, `/reload` on their own listener.
//! - [`reload`]: the one reload path (SIGHUP, `POST /reload`, [`watch`]ed secret files):
//!   read → parse → validate → compare → apply; new secrets go to the refresher to validate.
//! - [`anomaly`]: the sliding-window anomaly detector and its audit/metrics wiring.
//! - [`logging`]: JSON or text `tracing` logs, pingora's records bridged in, reloadable level.
//! - [`metrics`]: every Prometheus metric, defined in one place.
//! - [`audit`]: the hash-chained JSON-lines audit log and its verifier.
//! - [`sim`]: the Genesys Cloud simulator used by tests, benchmarks and `demo`.
//! - [`commands`]: what each CLI command does; [`fingerprint`]: how secrets may be shown.
//!
//! # The life of a request
//!
//! 1. pingora accepts a connection on the proxy listener ([`app`]).
//! 2. [`proxy`] checks the client address and the path, loads the current token once from the
//!    store (waiting a bounded time if there is none), strips any client `Authorization`,
//!    injects the bearer and forwards to the configured API host only.
//! 3. On an upstream 401 it asks the refresher for a token newer than the one it used, waits a
//!    bounded time, and replays the request once (body from pingora's retry buffer).
//! 4. Everything else, including a second 401 and 429s, passes through unchanged.
//! 5. `logging` records metrics, feeds the anomaly detector and writes the optional access log.

pub mod admin;
pub mod anomaly;
pub mod app;
pub mod audit;
pub mod cli;
pub mod commands;
pub mod config;
#[cfg(feature = "sim")]
pub mod demo;
pub mod fingerprint;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod region;
pub mod reload;
pub mod shutdown;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sync;
pub mod token;
pub mod watch;
pub mod worker;
