//! Locking shared by every module that keeps state behind a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, carrying on if another thread panicked while holding it: every critical
/// section in this crate leaves its data consistent, so a poisoned lock still holds valid data,
/// and refusing to serve because of an earlier panic would only widen the damage.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
