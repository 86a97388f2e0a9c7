//! Secret rotation, the refresher's other job: mint and validate with the new credentials
//! before anything is swapped; on failure keep everything and retry for the configured window.

use std::time::{Instant, SystemTime};

use serde_json::json;

use super::endpoint::MintError;
use super::refresher::{
    build_token, failure_class, Command, Credentials, Loop, PendingRotation, Reason, Refresher,
};
use super::schedule::backoff;
use super::store::TokenSource;

impl Refresher {
    pub(super) async fn handle(&mut self, cmd: Command, st: &mut Loop) {
        match cmd {
            Command::SetPrevious(previous) => self.credentials.previous = previous,
            Command::Rotate { credentials, reply } => {
                if credentials == self.credentials {
                    st.pending = None;
                    self.info().pending_rotation = None;
                    let _ = reply.send(Ok(self.store.generation()));
                    return;
                }
                let result = self.try_rotate(credentials, st).await;
                let _ = reply.send(result);
            }
        }
    }

    /// One rotation attempt: mint and validate with the new credentials, then swap.
    pub(super) async fn try_rotate(
        &mut self,
        new: Credentials,
        st: &mut Loop,
    ) -> Result<u64, String> {
        let settings = self.settings.load_full();
        let generation = self.store.generation() + 1;
        let requested_at = Instant::now();
        st.recent.push_back(requested_at);
        let result = match self.mint_counted(&new.client_id, &new.secret).await {
            Ok(minted) => self.validate(&minted, &settings).await.map(|()| minted),
            Err(e) => Err(e),
        };
        let new_fp = new.secret.fingerprint();
        match result.and_then(|m| {
            build_token(&m, generation, requested_at, TokenSource::Current).map(|t| (m, t))
        }) {
            Ok((minted, token)) => {
                let old_fp = self.credentials.secret.fingerprint();
                let previous = new
                    .previous
                    .clone()
                    .or_else(|| Some(self.credentials.secret.clone()));
                self.credentials = Credentials { previous, ..new };
                st.pending = None;
                st.failures = 0;
                st.backoff_until = None;
                self.metrics
                    .secret_rotations_total
                    .with_label_values(&["success"])
                    .inc();
                self.audit.record(
                    "SECRET_ROTATED",
                    json!({"generation": generation, "old_secret": old_fp, "new_secret": new_fp}),
                    Some(&token.fingerprint),
                );
                {
                    let mut info = self.info();
                    info.pending_rotation = None;
                    info.last_rotation_error = None;
                }
                self.accept(token, &minted, Reason::Rotation);
                tracing::info!(generation, new_secret_fingerprint = %new_fp, "client secret rotated");
                Ok(generation)
            }
            Err(e) => {
                self.metrics
                    .secret_rotations_total
                    .with_label_values(&["failed"])
                    .inc();
                // A refused or throttled new secret is as telling as on a normal refresh.
                if matches!(e, MintError::InvalidClient | MintError::RateLimited) {
                    self.observe_failure(&e);
                }
                let window = settings.rotation_retry_window;
                let now = Instant::now();
                let (deadline, failures) = match &st.pending {
                    Some(p) if p.credentials.secret == new.secret => (p.deadline, p.failures + 1),
                    _ => (now + window, 1),
                };
                let class = failure_class(&e);
                let delay = backoff(
                    failures,
                    class,
                    settings.backoff_initial,
                    settings.backoff_max,
                    rand::random(),
                );
                let retry_until = SystemTime::now() + deadline.saturating_duration_since(now);
                self.audit.record(
                    "SECRET_ROTATION_FAILED",
                    json!({
                        "new_secret": new_fp,
                        "outcome": e.outcome(),
                        "error": e.to_string(),
                        "attempt": failures,
                        "retry_in_ms": delay.as_millis() as u64,
                        "retry_until": humantime::format_rfc3339_seconds(retry_until).to_string(),
                    }),
                    self.store
                        .current()
                        .map(|t| t.fingerprint.clone())
                        .as_deref(),
                );
                {
                    let mut info = self.info();
                    info.pending_rotation = Some((new_fp.clone(), retry_until));
                    info.last_rotation_error = Some(e.to_string());
                }
                tracing::warn!(new_secret_fingerprint = %new_fp, error = %e, attempt = failures, "secret rotation failed; keeping the current secret and retrying");
                st.pending = Some(PendingRotation {
                    credentials: new,
                    deadline,
                    next_try: now + delay,
                    failures,
                });
                Err(e.to_string())
            }
        }
    }
}
