//! The simulator's commands, built with the `sim` feature: `demo` (the simulator and the
//! proxy in front of it, the newcomer's first command) and `sim` (the simulator alone).

use std::path::Path;
use std::process::ExitCode;

use super::{exit_code, load_or_exit, runtime, EXIT_CONFIG};
use crate::cli::SimArgs;
use crate::config::LogFormat;
use crate::sim::{self, SimConfig};

/// Environment variable `demo` fills with a random secret when it is unset.
pub const DEMO_SECRET_ENV: &str = "GENESYS_DEMO_CLIENT_SECRET";

fn parse_clients(specs: &[String]) -> Result<Vec<(String, String)>, String> {
    specs
        .iter()
        .map(|s| match s.split_once(':') {
            Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
                Ok((id.to_string(), secret.to_string()))
            }
            _ => Err(format!(
                "--client {s:?}: expected ID:SECRET with both parts non-empty"
            )),
        })
        .collect()
}

pub fn run_sim(args: SimArgs) -> ExitCode {
    let clients = match parse_clients(&args.clients) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    crate::logging::init(LogFormat::Text, "info");
    let config = SimConfig {
        clients,
        token_lifetime_seconds: args.token_lifetime_seconds,
        token_rate_limit_per_minute: args.token_rate_limit_per_minute,
        api_rate_limit_per_minute: args.api_rate_limit_per_minute,
        api_rate_limit_window: std::time::Duration::from_secs(args.api_rate_limit_window_seconds),
        idle_timeout: args
            .idle_timeout_seconds
            .map(std::time::Duration::from_secs),
        token_format: args.token_format,
        tls: args.tls_cert_out.is_some(),
        endpoint_limits: args.endpoint_limits.clone(),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let handle = sim::start(config, listener)?;
        if let (Some(path), Some(pem)) = (&args.tls_cert_out, &handle.cert_pem) {
            std::fs::write(path, pem)
                .map_err(|e| anyhow::anyhow!("--tls-cert-out {}: {e}", path.display()))?;
        }
        println!("Genesys Cloud simulator listening on {}", handle.url());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = wait_term() => {}
        }
        drop(handle);
        Ok(())
    });
    exit_code(result)
}

async fn wait_term() {
    if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        s.recv().await;
    } else {
        std::future::pending::<()>().await;
    }
}

pub fn demo(path: &Path) -> ExitCode {
    if std::env::var_os(DEMO_SECRET_ENV).is_none() {
        // Single-threaded here: no runtime exists yet, so setting the variable is sound.
        std::env::set_var(DEMO_SECRET_ENV, sim::random_token());
    }
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(config.process.log.format, &config.top().live.log.level);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        let api = &config.top().restart.genesys.api;
        let sim_addr = format!("{}:{}", api.host, api.port);
        let listener = tokio::net::TcpListener::bind(&sim_addr).await.map_err(|e| {
            anyhow::anyhow!("cannot start the simulator on {sim_addr} (genesys.api_url in {}): {e}", path.display())
        })?;
        let sim = sim::start(
            SimConfig {
                clients: vec![(config.top().secrets.client_id.clone(), config.top().secrets.client_secret.expose().to_string())],
                token_lifetime_seconds: 3600,
                ..SimConfig::default()
            },
            listener,
        )?;
        let running = crate::app::start(config, path.to_path_buf()).await?;
        let p = running.proxy_addr;
        let a = running.admin_addr;
        let s = sim.url();
        println!(
            "\ngenesys-auth-proxy demo: simulator on {s}, proxy on http://{p}, admin on http://{a}\n\n\
             Try (no credentials needed, the proxy injects the token):\n\
             \x20 curl -s http://{p}/api/v2/organizations/me\n\
             \x20 curl -s 'http://{p}/api/v2/users?pageSize=5&pageNumber=1'\n\
             \x20 curl -s -X POST -d '{{\"hello\":\"world\"}}' http://{p}/api/v2/anything/you/like\n\
             \x20 curl -s http://{a}/status\n\
             \x20 curl -s http://{a}/metrics | grep genesys_proxy_\n\n\
             Make the simulator revoke every token, then watch the proxy refresh and replay:\n\
             \x20 curl -s -X POST -d '{{}}' {s}/__sim/revoke && curl -s http://{p}/api/v2/organizations/me\n\
             \x20 curl -s {s}/__sim/stats\n\n\
             Press Ctrl-C to stop.\n"
        );
        tokio::signal::ctrl_c().await?;
        running.shutdown().await;
        drop(sim);
        Ok(())
    });
    exit_code(result)
}
