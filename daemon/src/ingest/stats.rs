//! Ingest counters, and the one place a rejection is accounted for.
//!
//! Both sources (MQTT, HTTP) share one `IngestStats`, so the numbers the
//! operator sees (and the per-reason log rate limit) cover the site, not
//! one listener. Counters are relaxed atomics: they are statistics, never
//! used to synchronise anything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::event::{DeadLetter, SubmitError};

use super::ratelimit::{ReasonLimiter, Verdict, Window};
use super::validate::{RejectReason, Rejection};

/// At most one log line per reject reason per this many ms.
const LOG_WINDOW_MS: i64 = 10_000;
/// At most this many dead-letter samples per reject reason per second.
const DLQ_SAMPLES_PER_SECOND: u32 = 10;
/// Bytes of the rejected input kept in a dead-letter sample.
const SAMPLE_BYTES: usize = 1024;

/// Live ingest counters, shared by every source.
pub struct IngestStats {
    received: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: [AtomicU64; RejectReason::COUNT],
    backpressure: AtomicU64,
    submit_errors: AtomicU64,
    mqtt_connected: AtomicBool,
    mqtt_connects: AtomicU64,
    mqtt_connection_errors: AtomicU64,
    mqtt_stale_acks: AtomicU64,
    log_limit: ReasonLimiter,
    dlq_limit: ReasonLimiter,
    backpressure_log: Window,
}

/// A point-in-time copy of `IngestStats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestSnapshot {
    /// Events that arrived (a batch counts its elements; an unsplittable
    /// batch counts as one).
    pub received: u64,
    /// Events committed by the store (first time seen).
    pub accepted: u64,
    /// Events the store dropped as already seen.
    pub duplicates: u64,
    /// Rejected events, indexed by `RejectReason::index()`.
    pub rejected: [u64; RejectReason::COUNT],
    /// Submissions the store refused for back-pressure (outbox or map
    /// full): HTTP 503s and MQTT retries.
    pub backpressure: u64,
    /// Submissions that failed for another storage reason.
    pub submit_errors: u64,
    /// Whether the MQTT client holds a broker session right now.
    pub mqtt_connected: bool,
    /// Successful MQTT connections (ConnAcks), the first one included.
    pub mqtt_connects: u64,
    /// MQTT connection losses and failed connection attempts.
    pub mqtt_connection_errors: u64,
    /// Acks not sent because their message arrived on an earlier
    /// connection (the broker redelivers those).
    pub mqtt_stale_acks: u64,
}

impl IngestSnapshot {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    pub fn rejected_for(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    /// Reconnections: connections after the first.
    pub fn mqtt_reconnects(&self) -> u64 {
        self.mqtt_connects.saturating_sub(1)
    }
}

impl Default for IngestStats {
    fn default() -> Self {
        IngestStats::new()
    }
}

impl IngestStats {
    pub fn new() -> IngestStats {
        IngestStats {
            received: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            backpressure: AtomicU64::new(0),
            submit_errors: AtomicU64::new(0),
            mqtt_connected: AtomicBool::new(false),
            mqtt_connects: AtomicU64::new(0),
            mqtt_connection_errors: AtomicU64::new(0),
            mqtt_stale_acks: AtomicU64::new(0),
            log_limit: ReasonLimiter::new(LOG_WINDOW_MS, 1),
            dlq_limit: ReasonLimiter::new(1_000, DLQ_SAMPLES_PER_SECOND),
            backpressure_log: Window::new(LOG_WINDOW_MS, 1),
        }
    }

    pub fn snapshot(&self) -> IngestSnapshot {
        IngestSnapshot {
            received: self.received.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            rejected: std::array::from_fn(|i| self.rejected[i].load(Relaxed)),
            backpressure: self.backpressure.load(Relaxed),
            submit_errors: self.submit_errors.load(Relaxed),
            mqtt_connected: self.mqtt_connected.load(Relaxed),
            mqtt_connects: self.mqtt_connects.load(Relaxed),
            mqtt_connection_errors: self.mqtt_connection_errors.load(Relaxed),
            mqtt_stale_acks: self.mqtt_stale_acks.load(Relaxed),
        }
    }

    pub(crate) fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Relaxed);
    }

    pub(crate) fn add_outcomes(&self, accepted: u64, duplicates: u64) {
        self.accepted.fetch_add(accepted, Relaxed);
        self.duplicates.fetch_add(duplicates, Relaxed);
    }

    /// Counts a refused submission; logs it at most once per window (with
    /// the number of refusals held back since), as a full outbox refuses
    /// every request until it drains.
    pub(crate) fn record_backpressure(&self, source: &str, error: &SubmitError, now_ms: i64) {
        self.backpressure.fetch_add(1, Relaxed);
        if let Verdict::Allow { suppressed } = self.backpressure_log.check(now_ms) {
            tracing::warn!(
                source,
                error = %error,
                suppressed_since_last = suppressed,
                "store refused ingest (back-pressure); senders are held off until it drains"
            );
        }
    }

    pub(crate) fn add_submit_error(&self) {
        self.submit_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn mqtt_connected(&self) -> bool {
        self.mqtt_connected.load(Relaxed)
    }

    pub(crate) fn set_mqtt_connected(&self, connected: bool) {
        self.mqtt_connected.store(connected, Relaxed);
        if connected {
            self.mqtt_connects.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn add_mqtt_connection_error(&self) {
        self.mqtt_connection_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn add_mqtt_stale_ack(&self) {
        self.mqtt_stale_acks.fetch_add(1, Relaxed);
    }

    /// Accounts for one rejected input: counts it, logs it (at most once
    /// per reason per window, with the number held back since), and
    /// returns a dead-letter sample unless this reason is over its sample
    /// rate. `origin` is e.g. `mqtt:<topic>` or `http:<peer>`.
    pub(crate) fn record_rejection(
        &self,
        origin: &dyn Fn() -> String,
        raw: &[u8],
        rejection: &Rejection,
        now_ms: i64,
    ) -> Option<DeadLetter> {
        let reason = rejection.reason;
        self.rejected[reason.index()].fetch_add(1, Relaxed);
        let mut origin_text = None;
        if let Verdict::Allow { suppressed } = self.log_limit.check(reason, now_ms) {
            let origin = origin_text.get_or_insert_with(origin);
            tracing::warn!(
                reason = reason.label(),
                origin = %origin,
                detail = %rejection.detail,
                suppressed_since_last = suppressed,
                "rejected input event"
            );
        }
        match self.dlq_limit.check(reason, now_ms) {
            Verdict::Suppress => None,
            Verdict::Allow { .. } => Some(DeadLetter {
                at_ms: now_ms,
                origin: origin_text.unwrap_or_else(origin),
                reason: reason.label().to_string(),
                detail: rejection.detail.clone(),
                sample: String::from_utf8_lossy(&raw[..raw.len().min(SAMPLE_BYTES)]).into_owned(),
            }),
        }
    }
}
