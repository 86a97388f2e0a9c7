//! `genesys-auth-proxy`: parse the command line and hand over to [`genesys_auth_proxy::commands`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = genesys_auth_proxy::cli::Cli::parse();
    genesys_auth_proxy::commands::dispatch(cli.command)
}

/// glibc malloc's arena locks showed up as contention under load; mimalloc has thread-local
/// heaps.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
