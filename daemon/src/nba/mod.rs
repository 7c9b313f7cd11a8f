//! Next best action: the deterministic decision core.
//!
//! When a moment happens (a trigger event), each eligible fan should get
//! the offer most worth showing, within the contact limits, and the
//! outcome should teach the next decision. This module holds that logic
//! as plain data and pure functions, with no I/O, no locks and no clock:
//! time comes in as event-time milliseconds and randomness from a seeded
//! generator the caller owns. The store's writer thread owns the state, so
//! every decision, outcome and learner update commits in the same LMDB
//! transaction as the event that caused it.
//!
//! One decision, in order (the caller evaluates `audience`, consent and
//! the `weight`/`segment` expressions, which need the profile):
//! 1. [`control`]: is the customer in the hashed control group? Control
//!    customers go through the same steps but are only recorded.
//! 2. [`learner`]: a Thompson sample of each candidate's propensity, or an
//!    exploring decision.
//! 3. [`arbiter`]: rank by propensity × value × weight and admit the top K
//!    through [`policy`]; a suppressed offer lets the next best through.
//! 4. [`instance`]: the shown offer, persisted until answered or expired;
//!    [`escalation`] changes its payload while it is open.
//! 5. [`stats`]: per-offer counters and the uplift against control.
//!
//! [`state`] gives every persisted type a versioned byte form.

pub mod arbiter;
pub mod catalog;
pub mod control;
pub mod eligibility;
pub mod escalation;
pub mod expr;
pub mod instance;
pub mod learner;
pub mod outcome;
pub mod policy;
mod sampling;
pub mod state;
pub mod stats;

use std::time::Duration;

pub use outcome::Outcome;

/// A configured duration as event-time milliseconds; durations beyond
/// the i64 range (hundreds of millions of years) saturate.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
