//! The refresher's side of `[cluster]`: before minting, take a token another replica stored or
//! the lease to mint one; after minting, store it for the others; adopt what others publish;
//! converge when Redis returns. Every failure of Redis means "work standalone" (mint here),
//! never "wait".

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::refresher::Refresher;
use super::schedule::Reason;
use super::store::{Token, TokenSource};
use crate::cluster::{Cluster, ClusterError, Sealer, SharedEvent};
use crate::metrics::ClusterTake;
use crate::secret::Secret;

/// A stored token with less left than this is not worth adopting.
const MIN_LEFT: Duration = Duration::from_secs(2);
/// How often a replica waiting for the lease holder looks again (a publication wakes it
/// sooner).
const WAIT_STEP: Duration = Duration::from_millis(100);

/// The refresher's link to Redis, keyed by the current secret.
pub struct SharedLink {
    pub cluster: Arc<Cluster>,
    pub sealer: Sealer,
    pub events: mpsc::Receiver<SharedEvent>,
}

impl SharedLink {
    pub fn new(
        cluster: Arc<Cluster>,
        secret: &Secret,
        events: mpsc::Receiver<SharedEvent>,
    ) -> Result<SharedLink, ClusterError> {
        let sealer = cluster.sealer(secret)?;
        Ok(SharedLink {
            cluster,
            sealer,
            events,
        })
    }
}

/// What to do about a slot that needs a token.
pub enum Plan {
    /// A token another replica stored was adopted: nothing to mint.
    Adopted,
    /// Mint, then store the token for the others (`leased`: release the lease after).
    MintShared { leased: bool },
    /// No cluster, or Redis failed: mint for this replica alone.
    MintAlone,
}

impl Refresher {
    /// Before minting `slot`: adopt a stored token, or take the lease (reading again once it
    /// is ours), or wait for the replica holding it to publish, at most
    /// [`crate::cluster::MAX_LEASE_WAIT`]: then mint here (a holder that died or left its lease
    /// behind costs one extra token request, never a request).
    pub(super) async fn plan(&mut self, slot: usize, reason: Reason, started: Instant) -> Plan {
        let Some(link) = &self.link else {
            return Plan::MintAlone;
        };
        let (cluster, deadline) = (
            link.cluster.clone(),
            Instant::now() + link.cluster.lease_wait(),
        );
        loop {
            match self.adopt_stored(slot, reason, started).await {
                Ok(true) => return Plan::Adopted,
                Ok(false) => {}
                Err(_) => return Plan::MintAlone,
            }
            let Some(link) = &self.link else {
                return Plan::MintAlone;
            };
            match cluster.take_lease(&link.sealer, slot).await {
                Err(_) => return Plan::MintAlone,
                Ok(true) => {
                    return match self.adopt_stored(slot, reason, started).await {
                        Ok(true) => {
                            self.release(slot).await;
                            Plan::Adopted
                        }
                        Ok(false) => Plan::MintShared { leased: true },
                        Err(_) => Plan::MintAlone,
                    }
                }
                Ok(false) if Instant::now() >= deadline => return Plan::MintAlone,
                Ok(false) => cluster.wait_published(WAIT_STEP).await,
            }
        }
    }

    /// Takes the stored token of `slot` when it differs from the one held and has time left.
    /// `Err` when Redis failed.
    pub(super) async fn adopt_stored(
        &mut self,
        slot: usize,
        reason: Reason,
        started: Instant,
    ) -> Result<bool, ClusterError> {
        let Some(link) = &self.link else {
            return Ok(false);
        };
        let Some(stored) = link.cluster.load(&link.sealer, slot).await? else {
            return Ok(false);
        };
        let left = stored
            .expires_at_wall
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let held = self.shared.store.slot(slot);
        let fingerprint = stored.token.fingerprint();
        if left < MIN_LEFT || held.is_some_and(|h| h.fingerprint == fingerprint) {
            return Ok(false);
        }
        let generation = self.shared.store.generation() + 1;
        let Ok(token) = Token::from_secret(
            &stored.token,
            left,
            generation,
            slot,
            Instant::now(),
            TokenSource::Shared,
        ) else {
            return Ok(false);
        };
        self.count(ClusterTake::Adopted);
        self.accept(token, reason, started);
        Ok(true)
    }

    /// After a mint: store the token for the other replicas (and give the lease back).
    pub(super) async fn share(&mut self, token: &Token, leased: bool) {
        let Some(link) = &self.link else { return };
        if let Some(value) = token.access_token() {
            let saved = link
                .cluster
                .save(&link.sealer, token.slot, &value, token.expires_at_wall)
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

    pub(super) async fn release(&self, slot: usize) {
        if let Some(link) = &self.link {
            link.cluster.release_lease(&link.sealer, slot).await;
        }
    }

    pub(super) fn count(&self, how: ClusterTake) {
        self.shared.report.metrics.cluster_tokens_total.inc(how);
    }

    /// A message from the cluster task.
    pub(super) async fn on_shared(&mut self, event: SharedEvent) {
        let now = Instant::now();
        match event {
            SharedEvent::Published { kid, slot } => {
                let ours = self.link.as_ref().is_some_and(|l| l.sealer.kid == kid);
                if ours && slot < self.shared.store.slots() {
                    let _ = self.adopt_stored(slot, Reason::Shared, now).await;
                }
            }
            // Take what is stored, or store ours if nothing is (after a Redis outage the first
            // replica to do so wins, the others adopt its token).
            SharedEvent::Sync => {
                for slot in 0..self.shared.store.slots() {
                    if let Ok(false) = self.adopt_stored(slot, Reason::Shared, now).await {
                        self.offer_held(slot).await;
                    }
                }
            }
        }
    }

    /// Stores the held token of `slot` unless a token is already stored.
    async fn offer_held(&mut self, slot: usize) {
        let Some(link) = &self.link else { return };
        let Some(held) = self.shared.store.slot(slot) else {
            return;
        };
        if self.shared.store.is_refused(&held) || !held.is_valid_at(Instant::now()) {
            return;
        }
        if let (Ok(None), Some(value)) = (
            link.cluster.load(&link.sealer, slot).await,
            held.access_token(),
        ) {
            let _ = link
                .cluster
                .save(&link.sealer, slot, &value, held.expires_at_wall)
                .await;
        }
    }

    /// Rotation in cluster mode: a token another replica already minted with the new secret
    /// is adopted without minting. `None` when there is none (then mint).
    pub(super) async fn adopt_rotated(&mut self, new_secret: &Secret) -> Option<Token> {
        let link = self.link.as_mut()?;
        let sealer = link.cluster.sealer(new_secret).ok()?;
        let stored = link.cluster.load(&sealer, 0).await.ok()??;
        let left = stored
            .expires_at_wall
            .duration_since(SystemTime::now())
            .ok()
            .filter(|l| *l >= MIN_LEFT)?;
        let generation = self.shared.store.generation() + 1;
        let token = Token::from_secret(
            &stored.token,
            left,
            generation,
            0,
            Instant::now(),
            TokenSource::Shared,
        )
        .ok()?;
        self.count(ClusterTake::Adopted);
        Some(token)
    }

    /// After a rotation: seal with the new secret from now on.
    pub(super) fn rekey(&mut self, new_secret: &Secret) {
        if let Some(link) = self.link.as_mut() {
            match link.cluster.sealer(new_secret) {
                Ok(sealer) => link.sealer = sealer,
                Err(e) => tracing::warn!(error = %e, "cluster: cannot derive the new sealing key"),
            }
        }
    }
}
