//! A request's hold on a token, and the 401 replay rule in one place: the [`Lease`] remembers
//! what was newest when its token was handed out and the first refusal, and
//! [`Lease::refused`] decides, for every 401, whether the request is replayed (and with
//! which token) or the 401 passes through.
//!
//! The rule: a 401 reaches the client only if the API refused a token minted *after* the
//! request saw its first 401, or the replays are spent; a replacement must be newer than
//! what the request could have been sent with (one published after it was sent, e.g. adopted
//! from another replica, or after its token was refused); during a secret rotation the still
//! valid pre-rotation token comes first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::store::{Token, TokenStore};

/// Replays after 401s, at most: the first may use the pre-rotation token, the second a token
/// minted after the first 401.
pub const MAX_REPLAYS: u8 = 2;

/// What became of a 401.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Send the request again with this token.
    Replay(Arc<Token>),
    /// Let the 401 reach the client.
    PassThrough(PassReason),
}

/// Why a 401 passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    /// A token minted after the first 401 was refused too, or the replays are spent.
    RefusedAgain,
    /// The body cannot be sent again.
    NotReplayable,
    /// No replacement arrived within `proxy.refresh_wait_timeout_ms`.
    NoNewToken,
}

/// The first 401 of a request.
#[derive(Debug, Clone, Copy)]
struct FirstRefusal {
    /// The newest generation when the token was found refused: a 401 on a token newer than
    /// this reaches the client.
    newest: u64,
    /// A replacement must be newer than this.
    floor: u64,
    /// When replays must be under way by (`refresh_wait_timeout_ms` after the 401).
    deadline: Instant,
}

/// A request's token and what the replay rule needs to know of its history.
#[derive(Debug, Clone)]
pub struct Lease {
    token: Arc<Token>,
    /// The newest generation published when the request was given its token.
    newest_at_send: u64,
    first: Option<FirstRefusal>,
    replays: u8,
    /// How long the token had been idle when the request took it (what a 401 or an answer
    /// teaches of the org's idle timeout).
    idle_before: Duration,
}

impl Lease {
    /// `token`, handed out now.
    pub fn new(token: Arc<Token>, store: &TokenStore) -> Self {
        let idle_before = token.touch(Instant::now());
        Lease {
            token,
            newest_at_send: store.generation(),
            first: None,
            replays: 0,
            idle_before,
        }
    }

    /// The API accepted the token (any answer but 401): it survived its idle time.
    pub fn accepted(&self, store: &TokenStore) {
        if self.idle_before >= crate::token::idle::SHORTEST {
            store.idle.survived(self.idle_before);
        }
    }

    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// Replays made after a 401.
    pub fn replays(&self) -> u8 {
        self.replays
    }

    /// The request goes again with another token for another reason (a 429 re-admitted).
    pub fn reissue(&mut self, token: Arc<Token>) {
        self.idle_before = token.touch(Instant::now());
        self.token = token;
    }

    /// The API answered 401 to the lease's token. `replayable` says whether the body can be
    /// sent again (asked only when the rule allows a replay); `refresh_wait` is how long
    /// replays may wait for a replacement, counted from the first 401.
    pub async fn refused(
        &mut self,
        store: &TokenStore,
        refresh_wait: Duration,
        replayable: impl FnOnce() -> bool,
    ) -> Verdict {
        let used = self.token.clone();
        let earlier = self.first.map(|f| f.newest);
        let newest_at_send = self.newest_at_send;
        if self.first.is_none() {
            store.idle.killed(self.idle_before);
        }
        let first = *self.first.get_or_insert_with(|| {
            let newest = store.newest_when_refused(&used);
            FirstRefusal {
                newest,
                floor: newest.min(newest_at_send),
                deadline: Instant::now() + refresh_wait,
            }
        });
        let again = match earlier {
            None => false,
            Some(_) if self.replays >= MAX_REPLAYS => true,
            Some(newest) => used.generation > newest,
        };
        if again || !replayable() {
            // Tell the refresher anyway: the token is dead for the next request.
            store.reject(&used);
            return Verdict::PassThrough(if again {
                PassReason::RefusedAgain
            } else {
                PassReason::NotReplayable
            });
        }
        let wait = first.deadline.saturating_duration_since(Instant::now());
        match store.replacement_for(&used, first.floor, wait).await {
            Some(replacement) => {
                self.idle_before = replacement.touch(Instant::now());
                self.token = replacement.clone();
                self.replays += 1;
                Verdict::Replay(replacement)
            }
            None => Verdict::PassThrough(PassReason::NoNewToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::token::store::TokenSource;

    fn token(generation: u64) -> Token {
        let secret = Secret::new(format!("token-{generation}"));
        let life = Duration::from_secs(3600);
        Token::from_secret(
            &secret,
            life,
            generation,
            0,
            Instant::now(),
            TokenSource::Current,
        )
        .unwrap()
    }

    fn store_with(generation: u64) -> TokenStore {
        let store = TokenStore::new();
        store.publish(token(generation));
        store
    }

    const WAIT: Duration = Duration::from_millis(200);

    fn replayed(v: &Verdict) -> Option<u64> {
        match v {
            Verdict::Replay(t) => Some(t.generation),
            Verdict::PassThrough(_) => None,
        }
    }

    #[tokio::test]
    async fn a_first_401_is_replayed_with_a_token_minted_after_it() {
        let store = Arc::new(store_with(1));
        let mut lease = Lease::new(store.current().unwrap(), &store);
        let refresher = {
            let store = store.clone();
            tokio::spawn(async move {
                store.woken().await;
                store.publish(token(2));
            })
        };
        let v = lease.refused(&store, WAIT, || true).await;
        assert_eq!(replayed(&v), Some(2));
        assert_eq!((lease.replays(), lease.token().generation), (1, 2));
        refresher.await.unwrap();
    }

    #[tokio::test]
    async fn replays_are_bounded_even_for_tokens_that_existed_at_the_first_401() {
        let store = store_with(5);
        let mut lease = Lease::new(store.current().unwrap(), &store);
        // 6 is published after the request was sent with 5, before its 401: it is the
        // replacement at once.
        store.publish(token(6));
        assert_eq!(
            replayed(&lease.refused(&store, WAIT, || true).await),
            Some(6)
        );
        // 6 already existed at the first 401, so a 401 on it is replayed once more, with 7 ...
        store.publish(token(7));
        assert_eq!(
            replayed(&lease.refused(&store, WAIT, || true).await),
            Some(7)
        );
        // ... and replays are bounded whatever happens.
        let v = lease.refused(&store, WAIT, || true).await;
        assert!(
            matches!(v, Verdict::PassThrough(PassReason::RefusedAgain)),
            "{v:?}"
        );
        assert_eq!(lease.replays(), MAX_REPLAYS);
    }

    #[tokio::test]
    async fn a_token_refused_after_a_fresh_one_was_minted_is_final() {
        let store = store_with(5);
        let mut lease = Lease::new(store.current().unwrap(), &store);
        // First 401 on 5: newest is 5; the refresher mints 6 and the request is replayed.
        let publish = async {
            store.woken().await;
            store.publish(token(6));
        };
        let (v, ()) = tokio::join!(lease.refused(&store, WAIT, || true), publish);
        assert_eq!(replayed(&v), Some(6));
        // 6 was minted after the first 401 and is refused too: the 401 is real.
        let v = lease.refused(&store, WAIT, || true).await;
        assert!(
            matches!(v, Verdict::PassThrough(PassReason::RefusedAgain)),
            "{v:?}"
        );
    }

    // Regression: a request sent before another request's 401 brought a replacement must be
    // replayed with that replacement, not wait for yet another token.
    #[tokio::test]
    async fn a_late_401_takes_the_replacement_another_request_brought() {
        let store = store_with(1);
        let first = store.current().unwrap();
        let mut early = Lease::new(first.clone(), &store);
        let mut late = Lease::new(first.clone(), &store);
        store.reject(&first);
        store.publish(token(2));
        let v = early.refused(&store, WAIT, || true).await;
        assert_eq!(replayed(&v), Some(2));
        let started = Instant::now();
        let v = late.refused(&store, WAIT, || true).await;
        assert_eq!(replayed(&v), Some(2));
        assert!(started.elapsed() < WAIT, "no wait for another token");
    }

    // Regression: during a secret rotation the pre-rotation token comes first.
    #[tokio::test]
    async fn during_a_rotation_the_pre_rotation_token_comes_first() {
        let store = store_with(1);
        store.publish_rotated(token(2), Duration::from_secs(60));
        let mut lease = Lease::new(store.current().unwrap(), &store);
        let v = lease.refused(&store, WAIT, || true).await;
        assert_eq!(replayed(&v), Some(1), "the pre-rotation token");
    }

    // Regression: a body that cannot be sent again passes the 401 through, and the token is
    // still reported refused (the next request must not get it).
    #[tokio::test]
    async fn an_unreplayable_401_still_reports_the_token_refused() {
        let store = store_with(3);
        let used = store.current().unwrap();
        let mut lease = Lease::new(used.clone(), &store);
        let v = lease.refused(&store, WAIT, || false).await;
        assert!(
            matches!(v, Verdict::PassThrough(PassReason::NotReplayable)),
            "{v:?}"
        );
        assert!(store.is_refused(&used));
        assert!(store.valid(Instant::now()).is_none());
    }

    #[tokio::test]
    async fn no_replacement_in_time_passes_the_401_through() {
        let store = store_with(1);
        let mut lease = Lease::new(store.current().unwrap(), &store);
        let v = lease
            .refused(&store, Duration::from_millis(20), || true)
            .await;
        assert!(
            matches!(v, Verdict::PassThrough(PassReason::NoNewToken)),
            "{v:?}"
        );
    }
}
