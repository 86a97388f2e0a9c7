//! Command-line definitions (clap). The commands themselves live in [`crate::commands`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const DEFAULT_CONFIG: &str = "conf/genesys-auth-proxy.toml";

#[derive(Debug, Parser)]
#[command(
    name = "genesys-auth-proxy",
    version,
    about = "Reverse proxy that injects Genesys Cloud client-credentials bearer tokens"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate config files; exit 2 naming the file and key on the first error.
    Check {
        /// Config files (repeatable).
        #[arg(short, long = "config", default_value = DEFAULT_CONFIG, num_args = 1..)]
        config: Vec<PathBuf>,
        /// Also mint one token and validate it with GET /api/v2/tokens/me.
        #[arg(long)]
        live: bool,
        /// Print every config key with its reload class and default (no file is read).
        #[arg(long, conflicts_with = "live")]
        keys: bool,
    },
    /// Start the built-in Genesys Cloud simulator and the proxy in front of it.
    #[cfg(feature = "sim")]
    Demo {
        /// Demo config (its api_url and login_url say where the simulator listens).
        #[arg(short, long, default_value = "conf/demo.toml")]
        config: PathBuf,
    },
    /// Run the Genesys Cloud simulator alone.
    #[cfg(feature = "sim")]
    Sim(SimArgs),
    /// Verify an audit log's hash chain and seal; exit 1 naming the first bad line.
    AuditVerify {
        /// The audit log (JSON lines).
        file: PathBuf,
        /// The log of a running proxy: do not require the last event to be PROXY_STOPPED.
        #[arg(long)]
        open: bool,
    },
}

#[cfg(feature = "sim")]
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on (login and API paths share it).
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub listen: std::net::SocketAddr,
    /// An OAuth client as ID:SECRET (repeatable; more secrets for one ID are all accepted).
    #[arg(long = "client", value_name = "ID:SECRET")]
    pub clients: Vec<String>,
    /// Lifetime (expires_in) of issued tokens; Genesys allows 300..172800, the simulator 1..172800.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=172_800))]
    pub token_lifetime_seconds: u64,
    /// Token calls per client per minute before answering 400 "rate limit exceeded".
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub token_rate_limit_per_minute: u64,
    /// API calls per token per window before answering 429 with Retry-After.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub api_rate_limit_per_minute: u64,
    /// Length of the per-token API rate-limit window (60 at Genesys; shorter makes tests fast).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub api_rate_limit_window_seconds: u64,
    /// Kill tokens unused for this long (an org with the inactivity timeout on). Off by default.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_seconds: Option<u64>,
    /// Issue opaque tokens (as Genesys does) or RS256 JWTs with a JWKS.
    #[arg(long, value_enum, default_value_t = crate::sim::TokenFormat::Opaque)]
    pub token_format: crate::sim::TokenFormat,
    /// Serve HTTPS with a certificate generated at start for localhost and 127.0.0.1, and write
    /// that certificate (PEM) to this file: point the proxy's genesys.ca_file at it.
    #[arg(long, value_name = "FILE")]
    pub tls_cert_out: Option<PathBuf>,
    /// An endpoint or organisation limit (repeatable): at most N calls under PATH_PREFIX from
    /// all tokens together per SECONDS, past which the normalised 429 is answered while the
    /// token's own inin-ratelimit headers still show budget.
    #[arg(long = "endpoint-limit", value_name = "PATH_PREFIX=N/SECONDS")]
    pub endpoint_limits: Vec<crate::sim::EndpointLimit>,
}
