//! Shutdown as a named type (mini-redis's `shutdown.rs`): one [`Trigger`], any number of
//! [`Shutdown`] listeners that background tasks select on.

use tokio::sync::watch;

/// Fires the shutdown once; every [`Shutdown`] made from it sees it.
pub struct Trigger(watch::Sender<bool>);

/// Listens for the shutdown. Cheap to clone: one per task.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and its first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    pub fn listener(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the shutdown fired (at once if it already has). The watch guard is
    /// dropped inside, so callers stay `Send`.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    /// The underlying receiver, for pingora's `process_new`, which takes one.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}
