//! Structured logs: `tracing` as JSON lines (default) or text on stderr, with pingora's `log`
//! records bridged in. The level can be changed at run time by a config reload.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level` (pingora's crates
/// still stay at `info` unless it names them).
pub fn init(format: LogFormat, level: &str) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = from_env
        .and_then(|v| EnvFilter::try_new(guarded(&v)).ok())
        .or_else(|| EnvFilter::try_new(guarded(level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let max = filter.max_level_hint();
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(not_pingora_trace));
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

/// pingora's `trace!` records print raw request heads, the injected `Authorization: Bearer`
/// and a client's own credentials included, so they are dropped whatever the filter says (even
/// `RUST_LOG=trace` or `pingora_core=trace`).
fn not_pingora_trace(meta: &tracing::Metadata<'_>) -> bool {
    !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("pingora"))
}

/// pingora's `debug!` records print request lines with query strings and whole response
/// bodies; unless the filter names pingora itself, its crates stay at `info`.
///
/// `notify` stays at `info` too unless named: its `trace!` records one line per inotify event,
/// and a log file in a watched directory turned each line into another event, forever.
fn guarded(level: &str) -> String {
    let mut filter = level.to_string();
    if !level.contains("pingora") {
        filter.push_str(",pingora_proxy=info,pingora_core=info");
    }
    if !level.contains("notify") {
        filter.push_str(",notify=info");
    }
    filter
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
