//! Ingest: CloudEvents in over MQTT and HTTP, validated, handed to the
//! store, and acknowledged to the sender only after the commit that holds
//! their effects.
//!
//! The store plugs in through `EventSink`, so both sources share one
//! contract: a submission either commits (every event gets an outcome) or
//! takes no effect and tells why, and the source decides how to push back
//! (MQTT withholds acks, HTTP answers 503). Bad input is answered, counted,
//! logged at a bounded rate and sampled into the dead-letter store; it
//! never stops the pipeline.

use std::future::Future;

use crate::event::{DeadLetter, Event, EventOutcome, SubmitError};

pub mod gate;
pub mod http;
pub mod mqtt;
mod ratelimit;
mod stats;
pub mod validate;

pub use http::{router, serve, HttpIngestConfig};
pub use mqtt::MqttError;
pub use stats::{IngestSnapshot, IngestStats};
pub use validate::{parse_event, parse_event_value, RejectReason, Rejection};

/// Where validated events go: the store.
pub trait EventSink: Clone + Send + Sync + 'static {
    /// Commits the events; resolves only after the commit holding their
    /// effects. One outcome per event, same order. On `Err` nothing took
    /// effect and the caller still owns the retry.
    fn submit(
        &self,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Vec<EventOutcome>, SubmitError>> + Send;

    /// As [`EventSink::submit`], but refuses with [`SubmitError::Busy`]
    /// when the store cannot take the events within `wait`: for a source
    /// that answers a client who can retry (HTTP), rather than holding its
    /// request, body and all, while the queue stays full. By default it
    /// waits as `submit` does.
    fn submit_within(
        &self,
        events: Vec<Event>,
        wait: std::time::Duration,
    ) -> impl Future<Output = Result<Vec<EventOutcome>, SubmitError>> + Send {
        let _ = wait;
        self.submit(events)
    }

    /// Keeps bounded samples of rejected input for `touchline dlq`.
    fn dead_letter(&self, samples: Vec<DeadLetter>) -> impl Future<Output = ()> + Send;
}

/// Arrival time in ms since the Unix epoch (UTC).
fn now_ms() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

/// Tallies store outcomes into (accepted, duplicates).
fn count_outcomes(outcomes: &[EventOutcome]) -> (u64, u64) {
    let duplicates = outcomes
        .iter()
        .filter(|o| matches!(o, EventOutcome::Duplicate))
        .count() as u64;
    (outcomes.len() as u64 - duplicates, duplicates)
}
