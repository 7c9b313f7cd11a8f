//! Readiness: whether this daemon should get traffic now.
//!
//! Ready means every stage events pass through can take them: the store
//! answers reads, the rules are loaded, and each configured ingest source
//! is up (HTTP bound, MQTT holding a broker session). The uplink is not a
//! condition: an uplink outage only grows the outbox, which is exactly
//! what the site is built to ride out. A daemon that is stopping is not
//! ready, so load balancers and probes stop sending before it goes.

use serde::Serialize;

/// One condition and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `store`, `rules`, `http`, `mqtt` or `lifecycle`.
    pub name: &'static str,
    pub ok: bool,
    /// What was found, in words.
    pub detail: String,
}

/// Every check, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub checks: Vec<Check>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The checks that fail.
    pub fn failing(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }

    pub(super) fn check(&mut self, name: &'static str, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name,
            ok,
            detail: detail.into(),
        });
    }
}
