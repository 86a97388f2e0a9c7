//! Watching the secret files: a change reloads the configuration through the one reload path
//! ([`crate::reload::Reloader::reload`]), so rotation needs no signal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::reload::Reloader;

/// Watches the directories holding the secret files and reloads after a burst of events
/// settles (Kubernetes updates a secret by swapping a `..data` symlink: several events).
pub fn secret_files(
    reloader: Arc<Reloader>,
    files: Vec<PathBuf>,
    mut shutdown: crate::shutdown::Shutdown,
) -> Option<tokio::task::JoinHandle<()>> {
    if files.is_empty() {
        return None;
    }
    let (tx, mut rx) = mpsc::channel::<()>(64);
    let watcher = watch_directories(&files, tx)?;
    Some(tokio::spawn(async move {
        let _watcher = watcher; // dropped (and the watch removed) when the task ends
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                _ = shutdown.wait() => return,
            }
            // Debounce: wait until no event arrived for 300 ms.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => break,
                    got = rx.recv() => if got.is_none() { return },
                }
            }
            let report = reloader.reload("secret_file_changed").await;
            tracing::info!(
                outcome = report.outcome.as_str(),
                "reload after secret file change"
            );
        }
    }))
}

/// A watcher on the directories of `files` that sends on `tx` when one of them (or a
/// Kubernetes `..data` entry beside it) changes.
fn watch_directories(
    files: &[PathBuf],
    tx: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    // Only our files (or Kubernetes' `..data`-style entries) count; other files in the same
    // directory, such as an audit log, must not trigger reloads.
    let relevant = move |event: &notify::Event| {
        event.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                names.iter().any(|w| w == n) || n.to_string_lossy().starts_with("..")
            })
        })
    };
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            if event.as_ref().is_ok_and(&relevant) {
                let _ = tx.try_send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch secret files; use SIGHUP or POST /reload after changing them");
            return None;
        }
    };
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| {
            f.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch secret directory");
        }
    }
    Some(watcher)
}
