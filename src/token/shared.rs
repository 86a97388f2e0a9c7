//! Who else holds this credential's tokens: the refresher's [`Peers`]. [`Standalone`] is a
//! replica alone (mint for itself, nothing to share); [`Redis`] is `[cluster]`: before
//! minting, take a token another replica stored or the lease to mint one; after minting,
//! store it for the others; adopt what others publish; converge when Redis returns. Every
//! failure of Redis means "work standalone" (mint here), never "wait". The refresher's loop
//! takes its peers as a parameter and never asks which kind it has (as linkerd2-proxy's
//! identity client takes its `Credentials`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::store::{Token, TokenSource, TokenStore};
use crate::cluster::{Cluster, ClusterError, Sealer, SharedEvent, Stored};
use crate::metrics::{ClusterTake, Metrics};
use crate::secret::Secret;

/// A stored token with less left than this is not worth adopting.
const MIN_LEFT: Duration = Duration::from_secs(2);
/// How often a replica waiting for the lease holder looks again (a publication wakes it
/// sooner).
const WAIT_STEP: Duration = Duration::from_millis(100);

/// What to do about a slot that needs a token.
pub enum Plan {
    /// A token another replica stored: accept it, nothing to mint.
    Adopted(Token),
    /// Mint, then store the token for the others (`leased`: release the lease after).
    MintShared { leased: bool },
    /// Alone, or Redis failed: mint for this replica alone.
    MintAlone,
}

/// The other holders of the credential's tokens, as the refresher sees them.
#[async_trait]
pub trait Peers: Send {
    /// Before minting `slot`.
    async fn plan(&mut self, store: &TokenStore, slot: usize) -> Plan;
    /// The token another replica stored for `slot`, when it is not the one held and has time
    /// left; numbered as the store's next generation.
    async fn adopt(&mut self, store: &TokenStore, slot: usize) -> Option<Token>;
    /// Stores the held token of `slot` for the others unless one is stored already.
    async fn offer(&mut self, store: &TokenStore, slot: usize);
    /// After a mint under [`Plan::MintShared`] or a rotation: store `token` for the others
    /// (and give the lease back).
    async fn share(&mut self, token: &Token, leased: bool);
    /// A mint under the lease failed: give the lease back.
    async fn release(&mut self, slot: usize);
    /// The next message from the other replicas; never resolves when alone.
    async fn next_event(&mut self) -> SharedEvent;
    /// Whether a publication with key id `kid` is for this credential and secret.
    fn ours(&self, kid: &str) -> bool;
    /// A rotation: the token another replica already minted with `new_secret`.
    async fn adopt_rotated(&mut self, store: &TokenStore, new_secret: &Secret) -> Option<Token>;
    /// After a rotation: seal with `new_secret` from now on.
    fn rekey(&mut self, new_secret: &Secret);
    /// A token was minted without sharing it (Redis failed).
    fn minted_alone(&self);
}

/// A replica alone: every token is minted here.
pub struct Standalone;

#[async_trait]
impl Peers for Standalone {
    async fn plan(&mut self, _: &TokenStore, _: usize) -> Plan {
        Plan::MintAlone
    }
    async fn adopt(&mut self, _: &TokenStore, _: usize) -> Option<Token> {
        None
    }
    async fn offer(&mut self, _: &TokenStore, _: usize) {}
    async fn share(&mut self, _: &Token, _: bool) {}
    async fn release(&mut self, _: usize) {}
    async fn next_event(&mut self) -> SharedEvent {
        std::future::pending().await
    }
    fn ours(&self, _: &str) -> bool {
        false
    }
    async fn adopt_rotated(&mut self, _: &TokenStore, _: &Secret) -> Option<Token> {
        None
    }
    fn rekey(&mut self, _: &Secret) {}
    fn minted_alone(&self) {}
}

/// `[cluster]`: the credential's handle on the Redis link, keyed by the current secret.
pub struct Redis {
    cluster: Arc<Cluster>,
    sealer: Sealer,
    events: mpsc::Receiver<SharedEvent>,
    metrics: Arc<Metrics>,
}

impl Redis {
    pub fn new(
        cluster: Arc<Cluster>,
        secret: &Secret,
        events: mpsc::Receiver<SharedEvent>,
        metrics: Arc<Metrics>,
    ) -> Result<Redis, ClusterError> {
        let sealer = cluster.sealer(secret)?;
        Ok(Redis {
            cluster,
            sealer,
            events,
            metrics,
        })
    }

    fn count(&self, how: ClusterTake) {
        self.metrics.cluster_tokens_total.inc(how);
    }

    /// [`Peers::adopt`], telling a Redis failure apart from "nothing to adopt".
    async fn stored(
        &mut self,
        store: &TokenStore,
        slot: usize,
    ) -> Result<Option<Token>, ClusterError> {
        let Some(stored) = self.cluster.load(&self.sealer, slot).await? else {
            return Ok(None);
        };
        let held = store.slot(slot);
        if held.is_some_and(|h| h.fingerprint == stored.token.fingerprint()) {
            return Ok(None);
        }
        let token = adoptable(store, &stored, slot);
        if token.is_some() {
            self.count(ClusterTake::Adopted);
        }
        Ok(token)
    }
}

/// `stored` as the store's next token for `slot`, if it has time left.
fn adoptable(store: &TokenStore, stored: &Stored, slot: usize) -> Option<Token> {
    let left = stored
        .expires_at_wall
        .duration_since(SystemTime::now())
        .ok()
        .filter(|l| *l >= MIN_LEFT)?;
    let generation = store.generation() + 1;
    Token::from_secret(
        &stored.token,
        left,
        generation,
        slot,
        Instant::now(),
        TokenSource::Shared,
    )
    .ok()
}

#[async_trait]
impl Peers for Redis {
    /// Adopt a stored token, or take the lease (reading again once it is ours), or wait for
    /// the replica holding it to publish, at most [`crate::cluster::MAX_LEASE_WAIT`]: then
    /// mint here (a holder that died or left its lease behind costs one extra token request,
    /// never a request).
    async fn plan(&mut self, store: &TokenStore, slot: usize) -> Plan {
        let deadline = Instant::now() + self.cluster.lease_wait();
        loop {
            match self.stored(store, slot).await {
                Ok(Some(token)) => return Plan::Adopted(token),
                Ok(None) => {}
                Err(_) => return Plan::MintAlone,
            }
            match self.cluster.take_lease(&self.sealer, slot).await {
                Err(_) => return Plan::MintAlone,
                Ok(true) => {
                    return match self.stored(store, slot).await {
                        Ok(Some(token)) => {
                            self.release(slot).await;
                            Plan::Adopted(token)
                        }
                        Ok(None) => Plan::MintShared { leased: true },
                        Err(_) => Plan::MintAlone,
                    }
                }
                Ok(false) if Instant::now() >= deadline => return Plan::MintAlone,
                Ok(false) => self.cluster.wait_published(WAIT_STEP).await,
            }
        }
    }

    async fn adopt(&mut self, store: &TokenStore, slot: usize) -> Option<Token> {
        self.stored(store, slot).await.ok().flatten()
    }

    async fn offer(&mut self, store: &TokenStore, slot: usize) {
        let Some(held) = store.slot(slot) else {
            return;
        };
        if store.is_refused(&held) || !held.is_valid_at(Instant::now()) {
            return;
        }
        if let (Ok(None), Some(value)) = (
            self.cluster.load(&self.sealer, slot).await,
            held.access_token(),
        ) {
            let expires = held.expires_at_wall;
            let _ = self.cluster.save(&self.sealer, slot, &value, expires).await;
        }
    }

    async fn share(&mut self, token: &Token, leased: bool) {
        if let Some(value) = token.access_token() {
            let saved = self
                .cluster
                .save(&self.sealer, token.slot, &value, token.expires_at_wall)
                .await;
            self.count(if saved.is_ok() {
                ClusterTake::MintedShared
            } else {
                ClusterTake::MintedStandalone
            });
        }
        if leased {
            self.release(token.slot).await;
        }
    }

    async fn release(&mut self, slot: usize) {
        self.cluster.release_lease(&self.sealer, slot).await;
    }

    async fn next_event(&mut self) -> SharedEvent {
        match self.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }

    fn ours(&self, kid: &str) -> bool {
        self.sealer.kid == kid
    }

    async fn adopt_rotated(&mut self, store: &TokenStore, new_secret: &Secret) -> Option<Token> {
        let sealer = self.cluster.sealer(new_secret).ok()?;
        let stored = self.cluster.load(&sealer, 0).await.ok()??;
        let token = adoptable(store, &stored, 0)?;
        self.count(ClusterTake::Adopted);
        Some(token)
    }

    fn rekey(&mut self, new_secret: &Secret) {
        match self.cluster.sealer(new_secret) {
            Ok(sealer) => self.sealer = sealer,
            Err(e) => tracing::warn!(error = %e, "cluster: cannot derive the new sealing key"),
        }
    }

    fn minted_alone(&self) {
        self.count(ClusterTake::MintedStandalone);
    }
}
