//! Structured logs: `tracing` as JSON lines (default) or text on stderr, with pingora's `log`
//! records bridged in. The level can be changed at run time by a config reload.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(guarded(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let max = filter.max_level_hint();
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    if installed.is_ok() {
        let _ = LEVEL.set(handle);
        cap_log_crate(max);
    }
}

/// Changes the level filter (config reload). Errors name the bad filter.
pub fn set_level(level: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(guarded(level)).map_err(|e| format!("log.level {level:?}: {e}"))?;
    let max = filter.max_level_hint();
    if let Some(handle) = LEVEL.get() {
        handle.reload(filter).map_err(|e| e.to_string())?;
        cap_log_crate(max);
    }
    Ok(())
}

/// pingora's `debug!` records print request lines with query strings and whole response
/// bodies; unless the filter names pingora itself, its crates stay at `info`.
fn guarded(level: &str) -> String {
    if level.contains("pingora") {
        level.to_string()
    } else {
        format!("{level},pingora_proxy=info,pingora_core=info")
    }
}

/// The `log` bridge would otherwise hand every pingora `debug!` record to the filter at run
/// time; capping `log`'s own level makes a disabled record cost one comparison.
fn cap_log_crate(max: Option<tracing::level_filters::LevelFilter>) {
    use tracing::level_filters::LevelFilter as L;
    log::set_max_level(match max {
        Some(L::OFF) => log::LevelFilter::Off,
        Some(L::ERROR) => log::LevelFilter::Error,
        Some(L::WARN) => log::LevelFilter::Warn,
        Some(L::INFO) => log::LevelFilter::Info,
        Some(L::DEBUG) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
}
