//! The token lifecycle.
//!
//! - [`secret`]: secrets and tokens that cannot be printed.
//! - [`endpoint`]: the token endpoint client and the failure classes.
//! - [`schedule`]: when to refresh and how long to back off (pure functions).
//! - [`store`]: the current token in an `ArcSwap`, and the 401 → refresh hand-off.
//! - [`refresher`]: the one task that mints tokens; `rotation` is its secret-rotation half.

pub mod endpoint;
pub mod refresher;
mod rotation;
pub mod schedule;
pub mod secret;
pub mod store;
