//! Watching the secret files: a change reloads the configuration through the one reload path
//! ([`crate::reload::Reloader::reload_if_changed`]), so rotation needs no signal.
//!
//! Only events that can change what a file holds count: a write closed, a create, a rename or
//! move, a delete, a mode change, and the same on Kubernetes' `..data` entries (a secret volume
//! is updated by swapping the `..data` symlink). Opening, reading and closing a file unwritten
//! never count: the proxy reads its own secret files on every reload, and reacting to that
//! made one change reload forever. A burst of events (an editor's save, the `..data` swap)
//! settles into one reload, and a reload finds byte-identical files a no-op.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use tokio::sync::mpsc;

use crate::reload::{Reloader, Trigger};

/// A burst of events is over when none arrived for this long.
const SETTLE: Duration = Duration::from_millis(300);

/// Watches the directories holding the secret files and reloads after a burst of events
/// settles.
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
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SETTLE) => break,
                    got = rx.recv() => if got.is_none() { return },
                }
            }
            if let Some(report) = reloader.reload_if_changed(Trigger::SecretFileChanged).await {
                tracing::info!(
                    outcome = report.outcome.as_str(),
                    "reload after secret file change"
                );
            }
        }
    }))
}

/// Does this kind of event say a file's content or identity may have changed?
pub fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Metadata(_)) => {
            true
        }
        EventKind::Modify(_) => true,
        // A write closed: the content changed. Opens, reads and unwritten closes did not.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        // The kernel queue overflowed (notify flags a rescan): something may have changed.
        EventKind::Any | EventKind::Other => true,
    }
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
        changes_content(&event.kind)
            && (event.paths.is_empty()
                || event.paths.iter().any(|p| {
                    p.file_name().is_some_and(|n| {
                        names.iter().any(|w| w == n) || n.to_string_lossy().starts_with("..")
                    })
                }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind, RenameMode};

    #[test]
    fn reads_never_count_and_changes_always_do() {
        let reads = [
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
        ];
        for k in reads {
            assert!(!changes_content(&k), "{k:?}");
        }
        let changes = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Permissions)),
            EventKind::Other,
        ];
        for k in changes {
            assert!(changes_content(&k), "{k:?}");
        }
    }
}
