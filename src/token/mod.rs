//! The token lifecycle.
//!
//! - [`endpoint`]: the token endpoint client and the failure classes.
//! - [`schedule`]: when to refresh, how long to back off, what the refresher does next (pure
//!   functions).
//! - [`minter`]: one validated token from one secret, under the per-minute cap.
//! - [`store`]: the current token in an `ArcSwap`, and the 401 → replacement hand-off;
//!   [`lease`]: a request's hold on a token and the 401 replay rule.
//! - [`refresher`]: the one task that mints tokens (refresh and secret rotation); [`report`]
//!   records its outcomes (metrics, audit, `/status`, anomalies); [`shared`]: its `[cluster]`
//!   side (adopt a stored token, take the lease, publish).
//! - [`idle`]: the org's inactivity timeout as learned (from `dateTokenIdles` and from kills):
//!   tokens presumed idle-dead are not used, and the pool rests them until needed.
//! - [`jwks`]: `validation = "jwks"`, verifying JWTs against the issuer's keys.

pub mod endpoint;
pub mod idle;
pub mod jwks;
pub mod lease;
pub mod minter;
pub mod refresher;
pub mod report;
pub mod schedule;
pub mod shared;
pub mod store;
