//! The default of every optional setting, in one place.
//!
//! The parser takes its defaults from here and the model's doc comments
//! state the same values; the `Default` impls let code and tests build a
//! section without a file.

use std::time::Duration;

use crate::model::{Outbox, RuleStateMode, Store, SyncMode, TimeZone, Validation, WhenFull};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// `ingest.mqtt.url` port when the URL names none.
pub const MQTT_PORT: u16 = 1883;
/// `ingest.mqtt.max_packet_size`.
pub const MQTT_MAX_PACKET_SIZE: u64 = 256 * KIB;
/// `ingest.mqtt.keep_alive`.
pub const MQTT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// `ingest.mqtt.reconnect_min`.
pub const MQTT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// `ingest.mqtt.reconnect_max`.
pub const MQTT_RECONNECT_MAX: Duration = Duration::from_secs(30);
/// `ingest.mqtt.inflight`.
pub const MQTT_INFLIGHT: u16 = 1000;

/// `ingest.http.max_body`.
pub const HTTP_MAX_BODY: u64 = 16 * MIB;

/// `ingest.validation.max_event_size`.
pub const MAX_EVENT_SIZE: u64 = 64 * KIB;
/// `ingest.validation.max_future_skew`.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(5 * 60);
/// `ingest.validation.max_age`.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// `ingest.validation.dedup_retention`.
pub const DEDUP_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// `ingest.validation.venue_types`.
pub const VENUE_TYPES: &[&str] = &["venue.*", "match.*"];
/// `ingest.validation.dlq_max`.
pub const DLQ_MAX: usize = 1000;

/// `store.map_size`.
pub const MAP_SIZE: u64 = 4 * GIB;
/// `store.commit_max_events`.
pub const COMMIT_MAX_EVENTS: usize = 4096;
/// `store.commit_max_delay`: no waiting. Commits batch on their own: what
/// queues while one commit syncs goes into the next.
pub const COMMIT_MAX_DELAY: Duration = Duration::ZERO;
/// `store.sync`.
pub const SYNC: SyncMode = SyncMode::Full;
/// `store.rule_state`.
pub const RULE_STATE: RuleStateMode = RuleStateMode::Direct;
/// `store.checkpoint_interval`: a checkpoint's pause grows with the
/// customers changed since the last one, so they stay frequent.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// `store.checkpoint_max_keys`: about 200 MiB of customer records.
pub const CHECKPOINT_MAX_KEYS: usize = 200_000;
/// `store.checkpoint_max_events`: a few seconds of replay.
pub const CHECKPOINT_MAX_EVENTS: usize = 500_000;

/// `uplink.server_name`.
pub const UPLINK_SERVER_NAME: &str = "localhost";
/// `uplink.batch_max_records`.
pub const UPLINK_BATCH_MAX_RECORDS: usize = 2000;
/// `uplink.batch_max_bytes`.
pub const UPLINK_BATCH_MAX_BYTES: u64 = MIB;
/// `uplink.request_timeout`.
pub const UPLINK_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `uplink.keep_alive`.
pub const UPLINK_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// `uplink.idle_timeout`.
pub const UPLINK_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// `uplink.reconnect_min`.
pub const UPLINK_RECONNECT_MIN: Duration = Duration::from_millis(200);
/// `uplink.reconnect_max`.
pub const UPLINK_RECONNECT_MAX: Duration = Duration::from_secs(30);
/// `uplink.pseudonymize`.
pub const UPLINK_PSEUDONYMIZE: bool = true;
/// Name of the pseudonym key file in `site.data_dir` when
/// `uplink.pseudonym_key` is not set.
pub const PSEUDONYM_KEY_FILE: &str = "pseudonym.key";

/// `outbox.max_bytes`.
pub const OUTBOX_MAX_BYTES: u64 = GIB;
/// `outbox.when_full`.
pub const OUTBOX_WHEN_FULL: WhenFull = WhenFull::Block;

/// `site.timezone`.
pub const TIMEZONE: TimeZone = TimeZone::UTC;

/// `[achievement] version`.
pub const RULE_VERSION: u32 = 1;
/// `[achievement] lateness`.
pub const RULE_LATENESS: Duration = Duration::from_secs(30);
/// Largest `[achievement] lateness`: beyond this an instance would stay
/// open longer than events are accepted at all (`ingest.validation.max_age`
/// defaults to the same).
pub const RULE_LATENESS_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// `[achievement] min_contribution` of `group` and `venue` scopes.
pub const MIN_CONTRIBUTION: f64 = 1.0;
/// `[achievement] allow_gaps` of a `streak`.
pub const STREAK_ALLOW_GAPS: u32 = 0;
/// Largest `allow_gaps`: the engine remembers the last 64 instances of a
/// streak, so a gap must fit well inside them.
pub const STREAK_MAX_GAPS: u32 = 16;
/// Most `steps` of a `sequence`.
pub const SEQUENCE_MAX_STEPS: usize = 16;
/// Largest `n` of `limits.max_per_customer` and
/// `referral.max_per_referrer`: the engine keeps one timestamp per
/// counted event within the span, per customer and rule.
pub const RATE_MAX_COUNT: u32 = 1000;
/// Shortest `rolling:` and `tumbling:` window.
pub const WINDOW_MIN: Duration = Duration::from_secs(1);
/// Longest voucher `template`, in bytes.
pub const VOUCHER_TEMPLATE_MAX: usize = 256;

impl Default for Validation {
    fn default() -> Validation {
        Validation {
            max_event_size: MAX_EVENT_SIZE as usize,
            max_future_skew: MAX_FUTURE_SKEW,
            max_age: MAX_AGE,
            dedup_retention: DEDUP_RETENTION,
            venue_types: VENUE_TYPES.iter().map(|s| (*s).to_owned()).collect(),
            dlq_max: DLQ_MAX,
        }
    }
}

impl Default for Store {
    fn default() -> Store {
        Store {
            map_size: MAP_SIZE as usize,
            commit_max_events: COMMIT_MAX_EVENTS,
            commit_max_delay: COMMIT_MAX_DELAY,
            sync: SYNC,
            rule_state: RULE_STATE,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            checkpoint_max_keys: CHECKPOINT_MAX_KEYS,
            checkpoint_max_events: CHECKPOINT_MAX_EVENTS,
        }
    }
}

impl Default for Outbox {
    fn default() -> Outbox {
        Outbox {
            max_bytes: OUTBOX_MAX_BYTES,
            when_full: OUTBOX_WHEN_FULL,
        }
    }
}
