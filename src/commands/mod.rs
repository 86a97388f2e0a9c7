//! The commands behind the CLI. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or config.
//! With the `sim` feature, [`demo`] holds the `demo` and `sim` commands.

#[cfg(feature = "sim")]
pub mod demo;

use std::path::Path;
use std::process::ExitCode;

use crate::cli::Command;
use crate::config::{self, Config};

pub(crate) const EXIT_RUNTIME: u8 = 1;
pub(crate) const EXIT_CONFIG: u8 = 2;

pub fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run { config } => run(&config),
        Command::Check { keys: true, .. } => {
            print!("{}", crate::config::keys::render());
            ExitCode::SUCCESS
        }
        Command::Check { config, live, .. } => check(&config, live),
        #[cfg(feature = "sim")]
        Command::Demo { config } => demo::demo(&config),
        #[cfg(feature = "sim")]
        Command::Sim(args) => demo::run_sim(args),
        Command::AuditVerify { file, open } => audit_verify(&file, open),
    }
}

/// `audit-verify`: 0 when the chain is intact (and sealed, unless `open`), 1 otherwise.
fn audit_verify(file: &Path, open: bool) -> ExitCode {
    let f = file.display();
    match crate::audit::verify(file) {
        Ok(v) if !v.sealed && !open => {
            eprintln!(
                "{f}: NOT SEALED: {} events with an intact chain, but the last is not PROXY_STOPPED: the file was cut at the end or the proxy did not stop cleanly (for a running proxy's log use --open)",
                v.events
            );
            ExitCode::from(EXIT_RUNTIME)
        }
        Ok(v) => {
            let from = if v.continues_earlier_file {
                " (continues a chain from an earlier, deleted file)"
            } else {
                ""
            };
            let state = if v.sealed { "sealed" } else { "open" };
            println!(
                "{f}: ok, {} events, hash chain intact, {state}{from}; last hash {}",
                v.events, v.last_hash
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{f}: TAMPERED or damaged at {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

pub(crate) fn load_or_exit(path: &Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// 0 on success; 1 with the error chain on stderr (and in the log, when one is set up).
pub(crate) fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_RUNTIME)
        })
}

fn run(path: &Path) -> ExitCode {
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(config.process.log.format, &config.top().live.log.level);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        let running = crate::app::start(config, path.to_path_buf()).await?;
        running.run_until_signal().await
    });
    exit_code(result)
}

fn check(paths: &[std::path::PathBuf], live: bool) -> ExitCode {
    let mut configs = Vec::new();
    for path in paths {
        match load_or_exit(path) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {}: {w}", path.display());
                }
                println!("{}: ok", path.display());
                configs.push(c);
            }
            Err(code) => return code,
        }
    }
    if !live {
        return ExitCode::SUCCESS;
    }
    crate::app::install_crypto_provider();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    for (path, c) in paths.iter().zip(&configs) {
        // Every credential is checked; each is named when there are several.
        let several = c.several();
        for c in &c.credentials {
            let label = if several {
                format!(" credential {}:", c.name)
            } else {
                String::new()
            };
            match rt.block_on(live_check(c)) {
                Ok((fingerprint, lifetime)) => println!(
                    "{}:{label} live: minted and validated token {fingerprint} (lifetime {} s)",
                    path.display(),
                    lifetime.as_secs()
                ),
                Err(e) => {
                    eprintln!("{}:{label} live check failed: {e}", path.display());
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// Mints one token for `c`'s credential and validates it as the refresher would: its
/// fingerprint and lifetime.
async fn live_check(c: &config::Credential) -> Result<(String, std::time::Duration), String> {
    let endpoint =
        crate::token::endpoint::TokenEndpoint::for_credential(c).map_err(|e| e.to_string())?;
    let minted = endpoint
        .mint(&c.secrets.client_id, &c.secrets.client_secret)
        .await
        .map_err(|e| e.to_string())?;
    // The same check the refresher makes before it publishes a token.
    let mut exp = None;
    match (&c.restart.token.jwks, c.live.token.validation) {
        (Some(settings), _) => {
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
            let jwks = crate::token::jwks::Jwks::new(
                settings.clone(),
                endpoint.http_client(),
                endpoint.max_response_bytes(),
                metrics,
            );
            exp = Some(
                jwks.verify(minted.access_token.expose())
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        (None, config::Validation::TokensMe) => {
            endpoint
                .validate(&minted.access_token)
                .await
                .map_err(|e| e.to_string())?;
        }
        (None, _) => {}
    }
    let lifetime = crate::token::minter::lifetime(&minted, exp, c.live.token.max_lifetime)
        .map_err(|e| e.to_string())?;
    Ok((minted.access_token.fingerprint(), lifetime))
}
