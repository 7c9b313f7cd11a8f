//! CloudEvents as Touchline sees them once validated.
//!
//! Parsing and validation live in `ingest::validate`; this is the value
//! every later stage (store, engine) works with.

use serde::{Deserialize, Serialize};

/// A validated CloudEvents 1.0 event (JSON structured mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub source: String,
    /// CloudEvents `type`: routes the event to rules.
    pub kind: String,
    /// The customer; `None` only for venue-wide event types.
    pub subject: Option<String>,
    /// Event time, ms since the Unix epoch (UTC); arrival time when the
    /// event carried no `time`.
    pub time_ms: i64,
    /// CloudEvents `data`, `Null` when absent.
    pub data: serde_json::Value,
}

/// What the store did with one accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// Committed; `records` outbox records (awards, …) were produced.
    Committed { records: u32 },
    /// Already seen within the dedup retention: nothing changed.
    Duplicate,
}

/// Why a submission was not committed. Nothing of it took effect; the
/// caller keeps the events and retries (MQTT: does not ack; HTTP: 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Outbox at `max_bytes` under the `block` policy.
    #[error("outbox is full (policy: block)")]
    OutboxFull,
    /// LMDB map is full; the operator must raise `store.map_size`.
    #[error("store map is full: raise store.map_size")]
    StoreFull,
    /// The writer has as many events queued as it takes, and none left
    /// the queue within the caller's wait (see
    /// `StoreHandle::submit_within`).
    #[error("store is busy: as many events are queued as it takes")]
    Busy,
    /// The writer is shutting down or gone.
    #[error("store is closed")]
    Closed,
    /// Any other storage failure (logged by the writer with detail).
    #[error("store error: {0}")]
    Storage(String),
}

/// A rejected input kept as a bounded sample for `touchline dlq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Arrival time, ms since the Unix epoch.
    pub at_ms: i64,
    /// Where it came from: `mqtt:<topic>` or `http:<peer>`.
    pub origin: String,
    /// Short machine-readable reason, the same label as the counter.
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// The first bytes of the input (at most 1 KiB), lossily as UTF-8.
    pub sample: String,
}
