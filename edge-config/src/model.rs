//! The validated configuration model: what the rest of Touchline reads.
//!
//! These types hold values that already passed validation: paths are
//! absolute (resolved against the config file's folder), sizes are bytes,
//! durations are `Duration`s, CEL expressions compiled once without error.
//! Every default is documented on its field and applied by the parser (the
//! values live in [`crate::defaults`]).
//!
//! Sizes are written `"64KiB"` (units `B`, `KiB`, `MiB`, `GiB`) or as a
//! plain number of bytes and must be greater than zero; durations are
//! written `"30s"` (units `ms`, `s`, `m`, `h`, `d`) and must be greater than
//! zero unless a field says otherwise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A whole site configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteConfig {
    /// The file this was loaded from (absolute), for messages.
    pub source: PathBuf,
    pub site: Site,
    pub ingest: Ingest,
    pub store: Store,
    /// `None` when the `[uplink]` section is absent: records stay in the
    /// outbox until one is configured.
    pub uplink: Option<Uplink>,
    pub outbox: Outbox,
    /// `None` when the `[admin]` section is absent: no admin listener
    /// (metrics and probes are still served on the HTTP ingest port when
    /// that is configured).
    pub admin: Option<Admin>,
}

/// `[site]`
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// `id`: required; `[A-Za-z0-9._-]{1,64}`. Must match the site
    /// certificate's name when an uplink is configured.
    pub id: String,
    /// `data_dir`: required; the LMDB environment lives here.
    pub data_dir: PathBuf,
    /// `rules`: glob patterns of rule files (TOML); default none. Kept as
    /// written; [`crate::load_rules`] resolves relative patterns against
    /// the config file's folder, requires each to match at least one file
    /// and loads the matches in sorted order. `*` matches neither `/` nor
    /// a leading `.`; `**` matches folders recursively.
    pub rules: Vec<String>,
}

/// `[ingest]` and its subsections.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingest {
    pub mqtt: Option<Mqtt>,
    pub http: Option<Http>,
    pub validation: Validation,
}

/// `[ingest.mqtt]`
#[derive(Debug, Clone, PartialEq)]
pub struct Mqtt {
    /// `url`: `mqtt://host:port` (required); the port defaults to 1883,
    /// IPv6 hosts go in brackets (`mqtt://[::1]:1883`) and are stored
    /// without them. Other schemes (`mqtts`, `ws`, ...) are refused.
    pub host: String,
    pub port: u16,
    /// `client_id`: required, non-empty (persistent sessions need it).
    pub client_id: String,
    /// `topics`: topic filters, at least one; each a valid MQTT filter
    /// (`+` and `#` fill a whole level, `#` only as the last one).
    pub topics: Vec<String>,
    /// `max_packet_size`: default 256 KiB. Must be at least
    /// `validation.max_event_size` and at most MQTT's limit (256 MiB).
    pub max_packet_size: usize,
    /// `keep_alive`: default 30 s; whole seconds from 1 s to 65535 s (the
    /// protocol's 16-bit field).
    pub keep_alive: Duration,
    /// `reconnect_min` / `reconnect_max`: jittered exponential backoff
    /// bounds; defaults 100 ms and 30 s; `reconnect_min <= reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// `inflight`: how many unacknowledged QoS 1 messages we accept from
    /// the broker at once; default 1000, at least 1.
    pub inflight: u16,
}

/// `[ingest.http]`
#[derive(Debug, Clone, PartialEq)]
pub struct Http {
    /// `listen`: socket address, e.g. `127.0.0.1:8088` (required).
    pub listen: SocketAddr,
    /// `max_body`: default 16 MiB; larger requests get 413. Must be at
    /// least `validation.max_event_size`.
    pub max_body: usize,
}

/// `[ingest.validation]`
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// `max_event_size`: default 64 KiB per event.
    pub max_event_size: usize,
    /// `max_future_skew`: default 5 min; events further ahead are rejected.
    /// Zero is allowed (no event time may lie ahead of the site clock).
    pub max_future_skew: Duration,
    /// `max_age`: default 7 days; older events are rejected.
    pub max_age: Duration,
    /// `dedup_retention`: default 24 h; (source, id) pairs seen within it
    /// are duplicates.
    pub dedup_retention: Duration,
    /// `venue_types`: event type patterns that are venue-wide and carry no
    /// subject. A trailing `*` matches any suffix (`*` anywhere else is an
    /// error). Default `["venue.*", "match.*"]`. Every other type requires
    /// `subject`.
    pub venue_types: Vec<String>,
    /// `dlq_max`: dead-letter samples kept (oldest evicted); default 1000;
    /// 0 keeps none.
    pub dlq_max: usize,
}

/// `[store]`
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// `map_size`: LMDB map size; default 4 GiB. Must exceed
    /// `outbox.max_bytes`.
    pub map_size: usize,
    /// `commit_max_events`: group commit closes after this many events;
    /// default 4096, at least 1.
    pub commit_max_events: usize,
    /// `commit_max_delay`: or after this long since its first event;
    /// default 2 ms; zero is allowed (commit without waiting for more).
    pub commit_max_delay: Duration,
    /// `sync`: default `full`.
    pub sync: SyncMode,
}

/// How each commit reaches the disk (see README for the faults each mode
/// guards against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `full`: fsync data and meta page on every commit. Survives power loss.
    Full,
    /// `no-meta-sync`: skip the meta page fsync. Survives process crashes;
    /// an OS crash or power loss may undo the last commit(s).
    NoMetaSync,
    /// `none`: no fsync at commit. Survives process crashes only.
    None,
}

/// `[uplink]`
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    /// `central`: address of the central receiver, `IP:port` (required).
    pub central: SocketAddr,
    /// `server_name`: TLS name of the central certificate; default
    /// `localhost`.
    pub server_name: String,
    /// `ca`, `cert`, `key`: PEM files (required). Not opened by the
    /// parser: the daemon reports a missing or unreadable file at start.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `batch_max_records`: default 2000, at least 1.
    pub batch_max_records: usize,
    /// `batch_max_bytes`: default 1 MiB; at most half the protocol's frame
    /// limit (8 MiB), leaving room for the envelope.
    pub batch_max_bytes: usize,
    /// `keep_alive`: default 5 s; `idle_timeout`: default 30 s. Keep-alive
    /// must be below the idle timeout.
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    /// `reconnect_min` / `reconnect_max`: defaults 200 ms and 30 s;
    /// `reconnect_min <= reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// `pseudonymize`: default true: customer ids leave the site as
    /// HMAC-SHA256(key, id), hex.
    pub pseudonymize: bool,
    /// `pseudonym_key`: file holding the HMAC key. `None` when not set:
    /// then the key is `<data_dir>/pseudonym.key`
    /// ([`crate::defaults::PSEUDONYM_KEY_FILE`]), created with a random key
    /// when absent.
    pub pseudonym_key: Option<PathBuf>,
}

/// `[outbox]`
#[derive(Debug, Clone, PartialEq)]
pub struct Outbox {
    /// `max_bytes`: default 1 GiB.
    pub max_bytes: u64,
    /// `when_full`: default `block`.
    pub when_full: WhenFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// `block`: ingest back-pressures (MQTT stops acking, HTTP answers 503).
    Block,
    /// `drop-oldest`: the oldest records are dropped, counted and logged.
    DropOldest,
}

/// `[admin]`: the operator's HTTP listener for `/metrics`, `/healthz`,
/// `/readyz` and `/v1/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// `listen`: socket address, e.g. `127.0.0.1:9464` (required). Port 0
    /// picks a free port (for tests). Keep it on a management network: it
    /// is not authenticated.
    pub listen: SocketAddr,
}

/// All rules loaded from a site's rule files.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleBundle {
    pub achievements: Vec<AchievementRule>,
    /// The files the bundle was read from, in load order.
    pub files: Vec<PathBuf>,
}

/// `[[achievement]]`
#[derive(Debug, Clone, PartialEq)]
pub struct AchievementRule {
    /// `id`: required, unique in the bundle, `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// `name`: required, non-empty.
    pub name: String,
    /// `version`: default 1, at least 1.
    pub version: u32,
    /// `on`: event types (exact CloudEvents `type`s), at least one; each
    /// non-empty, without whitespace, listed once.
    pub on: Vec<String>,
    /// `when`: CEL predicate; optional (absent: every event of the `on`
    /// types matches). Non-empty, at most 16 KiB; it was compiled once at
    /// load without error.
    pub when: Option<String>,
    /// `measure`: required.
    pub measure: Measure,
    /// `window`: required.
    pub window: Window,
    /// `tiers`: at least one, `at` strictly ascending and positive.
    pub tiers: Vec<Tier>,
    /// Where the rule was defined, for messages: the rule file (absolute)
    /// and the 1-based line of its `[[achievement]]` header.
    pub file: PathBuf,
    pub line: usize,
}

/// `measure`
#[derive(Debug, Clone, PartialEq)]
pub enum Measure {
    /// `count`: each matching event adds 1.
    Count,
}

/// `window`
#[derive(Debug, Clone, PartialEq)]
pub enum Window {
    /// `lifetime`: one window instance forever, named `"lifetime"`.
    Lifetime,
}

/// One entry of `tiers`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// `at`: the measure value that reaches this tier; an integer or a
    /// float, greater than 0, a whole number for `count`.
    pub at: f64,
    /// `badge`: optional, non-empty.
    pub badge: Option<String>,
    /// `points`: category → integer amount (BTreeMap for a stable order);
    /// default none. Categories follow the id rule `[A-Za-z0-9._-]{1,64}`.
    pub points: BTreeMap<String, i64>,
}
