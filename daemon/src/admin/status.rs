//! `GET /v1/status`: what the daemon is doing, as one JSON document.
//!
//! The same types are what `touchline status` deserializes, so the
//! server and the command cannot drift apart. Counters count since the
//! daemon started; outbox values are what the store holds now.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ingest::RejectReason;

use super::{Observed, Sample};

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub site: String,
    /// Touchline version of the running daemon.
    pub version: String,
    /// RFC 3339 start time.
    pub started_at: String,
    pub uptime_seconds: f64,
    /// Same verdict as `GET /readyz`.
    pub ready: bool,
    /// Readiness checks that fail, with why (empty when ready).
    pub not_ready: BTreeMap<String, String>,
    pub events: EventCounters,
    pub store: StoreCounters,
    pub outbox: OutboxStatus,
    pub uplink: UplinkStatus,
    pub mqtt: MqttStatus,
    pub rules: Vec<RuleStatus>,
}

/// Ingest counters (both sources).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventCounters {
    pub received: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Every reason label, zeros included.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Submissions refused for back-pressure (HTTP 503, MQTT retried).
    pub backpressure: u64,
    pub submit_errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreCounters {
    pub commits: u64,
    pub storage_errors: u64,
    pub map_full_events: u64,
    /// The LMDB environments' maps: `store`, and `writeback` (the
    /// written-back dedup keys). Absent from daemons older than the field.
    #[serde(default)]
    pub maps: BTreeMap<String, MapStatus>,
}

/// How full one LMDB map is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MapStatus {
    pub size_bytes: u64,
    /// High-water mark: bytes up to the highest page a commit has used
    /// (freed pages below it are reused first).
    pub used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxStatus {
    pub records: u64,
    pub bytes: u64,
    /// `outbox.max_bytes`.
    pub max_bytes: u64,
    /// Sequence of the oldest waiting record; `None` when empty.
    pub oldest_seq: Option<u64>,
    /// Seconds since the event time of the oldest waiting record.
    pub oldest_age_seconds: Option<f64>,
    pub next_seq: u64,
    /// Highest sequence given up by `drop-oldest`; 0 when none.
    pub dropped_through: u64,
    /// Records dropped by `drop-oldest` since start.
    pub records_dropped: u64,
    /// Why the outbox could not be read (values then come from the
    /// writer's counters and `oldest_*` are `None`).
    pub read_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub configured: bool,
    pub connected: bool,
    /// Highest sequence the central side acknowledged in this run; 0
    /// until the first session.
    pub last_acked_seq: u64,
    pub records_sent: u64,
    pub records_acked: u64,
    pub reconnects: u64,
    pub refusals: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MqttStatus {
    pub configured: bool,
    pub connected: bool,
    pub connects: u64,
    pub connection_errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub id: String,
    pub version: u32,
    pub matches: u64,
    pub awards: u64,
    pub predicate_errors: u64,
}

/// Builds the report from one sample.
pub(super) fn report(observed: &Observed, sample: &Sample) -> StatusReport {
    let ingest = &sample.ingest;
    let store = observed.store.stats();
    let readiness = observed.readiness_of(sample);
    let (outbox, read_error) = sample.outbox_view(&store);
    StatusReport {
        site: observed.site.clone(),
        version: crate::admin::VERSION.to_string(),
        started_at: crate::clock::format_ms(observed.started_at_ms),
        uptime_seconds: observed.started.elapsed().as_secs_f64(),
        ready: readiness.ready(),
        not_ready: readiness
            .failing()
            .map(|c| (c.name.to_string(), c.detail.clone()))
            .collect(),
        events: EventCounters {
            received: ingest.received,
            accepted: ingest.accepted,
            duplicates: ingest.duplicates,
            rejected: ingest.rejected_total(),
            rejected_by_reason: RejectReason::ALL
                .iter()
                .map(|r| (r.label().to_string(), ingest.rejected_for(*r)))
                .collect(),
            backpressure: ingest.backpressure,
            submit_errors: ingest.submit_errors,
        },
        store: StoreCounters {
            commits: store.commits(),
            storage_errors: store.storage_errors(),
            map_full_events: store.map_full_events(),
            maps: [
                ("store", store.map_size_bytes(), store.map_used_bytes()),
                (
                    "writeback",
                    store.writeback_map_size_bytes(),
                    store.writeback_map_used_bytes(),
                ),
            ]
            .into_iter()
            .map(|(name, size_bytes, used_bytes)| {
                (
                    name.to_string(),
                    MapStatus {
                        size_bytes,
                        used_bytes,
                    },
                )
            })
            .collect(),
        },
        outbox: OutboxStatus {
            records: outbox.records,
            bytes: outbox.bytes,
            max_bytes: observed.outbox_max_bytes,
            oldest_seq: outbox.oldest_seq,
            oldest_age_seconds: sample.oldest_age_seconds(),
            next_seq: outbox.next_seq,
            dropped_through: outbox.dropped_through,
            records_dropped: store.records_dropped(),
            read_error,
        },
        uplink: UplinkStatus {
            configured: observed.uplink_configured,
            connected: observed.uplink.connected(),
            last_acked_seq: observed.uplink.last_acked(),
            records_sent: observed.uplink.records_sent(),
            records_acked: observed.uplink.records_acked(),
            reconnects: observed.uplink.reconnects(),
            refusals: observed.uplink.refusals(),
        },
        mqtt: MqttStatus {
            configured: observed.mqtt_configured,
            connected: ingest.mqtt_connected,
            connects: ingest.mqtt_connects,
            connection_errors: ingest.mqtt_connection_errors,
        },
        rules: observed
            .store
            .engine_stats()
            .rules()
            .iter()
            .map(|r| RuleStatus {
                id: r.id().to_string(),
                version: r.version(),
                matches: r.matched(),
                awards: r.awards(),
                predicate_errors: r.predicate_errors(),
            })
            .collect(),
    }
}
