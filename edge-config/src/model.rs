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

pub use crate::timezone::TimeZone;

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
    /// `[nba]`: next-best-action policy; every default applies when the
    /// section is absent.
    pub nba: NbaPolicy,
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
    /// `timezone`: the IANA time zone (`"Europe/London"`) whose local
    /// dates bound `day` windows and `every = "day"` streaks; default
    /// `UTC`.
    pub timezone: TimeZone,
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
    /// `commit_max_delay`: how long a commit waits for more events after
    /// its first; default 0: it takes what is already queued and commits
    /// (what arrives meanwhile queues for the next one, so batches grow
    /// with load). A wait only pays on a disk whose fsync is slow enough
    /// that fewer, larger commits matter more than latency.
    pub commit_max_delay: Duration,
    /// `sync`: default `full`.
    pub sync: SyncMode,
    /// `rule_state`: where the engine's state lives between commits;
    /// default `direct`.
    pub rule_state: RuleStateMode,
    /// `checkpoint_interval`: in `journal` mode, the longest time between
    /// checkpoints; default 1 s.
    pub checkpoint_interval: Duration,
    /// `checkpoint_max_keys`: in `journal` mode, a checkpoint is due once
    /// this many state keys changed since the last (bounds memory);
    /// default 200,000, at least 1.
    pub checkpoint_max_keys: usize,
    /// `checkpoint_max_events`: in `journal` mode, a checkpoint is due
    /// once the journal holds this many events (bounds the replay after a
    /// crash); default 500,000, at least 1.
    pub checkpoint_max_events: usize,
}

/// Where the engine's state lives between commits (see README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleStateMode {
    /// `journal`: in the writer's memory, made durable by journaling the
    /// events that changed it in each commit, written back to LMDB at
    /// checkpoints; replayed after a crash.
    Journal,
    /// `direct`: written to LMDB in each event's commit.
    Direct,
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
    /// `request_timeout`: default 30 s: how long one exchange (a batch's
    /// upload, the central side's write, its answer) may take before the
    /// session is given up. A batch that times out goes again at half the
    /// size, down to one record.
    pub request_timeout: Duration,
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
    /// `[[offer]]`s, in file order.
    pub offers: Vec<Offer>,
    /// `[[voucher_pool]]`s of every rule file, in load order.
    pub voucher_pools: Vec<VoucherPool>,
    /// The site's `site.timezone`, copied by [`crate::load_rules`] so the
    /// engine evaluates `day` windows with the bundle it was given (a
    /// reload picks up a changed zone together with the rules). UTC when
    /// the bundle was built without a site config.
    pub timezone: TimeZone,
    /// The files the bundle was read from, in load order.
    pub files: Vec<PathBuf>,
    /// Their texts as read, in the same order (empty for a bundle not
    /// built from files), so a store can record the rules it applies.
    pub sources: Vec<String>,
}

/// `[[achievement]]`
#[derive(Debug, Clone, PartialEq)]
pub struct AchievementRule {
    /// `id`: required, unique in the bundle, `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// `name`: required, non-empty.
    pub name: String,
    /// `version`: default 1, at least 1. Progress is kept per version: a
    /// new version starts from nothing.
    pub version: u32,
    /// `on`: event types (exact CloudEvents `type`s), at least one; each
    /// non-empty, without whitespace, listed once. Required for every
    /// measure except `sequence`, which takes its types from its steps and
    /// refuses `on` (empty here). [`AchievementRule::event_types`] lists
    /// the types a rule looks at whatever its measure.
    pub on: Vec<String>,
    /// `when`: CEL predicate over `event` (its attributes `id`, `source`,
    /// `type`, `subject`, `time`), `data` and `profile` (the customer's
    /// profile, an empty map when there is none); optional (absent: every
    /// event of the `on` types matches). Non-empty, at most 16 KiB,
    /// compiled once at load without error. Refused with `sequence`, whose
    /// steps carry their own.
    pub when: Option<String>,
    /// `measure`: required; its kind brings its own keys (see [`Measure`]).
    pub measure: Measure,
    /// `window`: required.
    pub window: Window,
    /// `lateness`: how long after a window instance ends (by the site's
    /// event-time watermark) events for it are still counted; later ones
    /// are counted as late and ignored. Default 30 s
    /// ([`crate::defaults::RULE_LATENESS`]); zero allowed; at most 7 days.
    pub lateness: Duration,
    /// `scope`: whose progress the events build; default `customer`.
    pub scope: Scope,
    /// `limits`: anti-cheat limits; default none.
    pub limits: Limits,
    /// `sources`: an allow-list of CloudEvents `source`s whose events
    /// count; events from any other source are counted as limited and
    /// ignored. A trailing `*` matches any suffix (`"beacon/*"`); `*`
    /// elsewhere is an error. Default `None`: every source counts. When
    /// written, at least one entry, each non-empty and listed once.
    pub sources: Option<Vec<String>>,
    /// `referral`: credit someone other than the subject; default none.
    pub referral: Option<Referral>,
    /// `tiers`: at least one; `at` strictly ascending (strictly
    /// descending for `min`) and positive.
    pub tiers: Vec<Tier>,
    /// Where the rule was defined, for messages: the rule file (absolute)
    /// and the 1-based line of its `[[achievement]]` header.
    pub file: PathBuf,
    pub line: usize,
}

impl AchievementRule {
    /// Every event type the rule looks at: `on`, or for a `sequence` the
    /// types of all its steps (each once, in step order).
    pub fn event_types(&self) -> Vec<&str> {
        let mut types: Vec<&str> = self.on.iter().map(String::as_str).collect();
        if let Measure::Sequence { steps, .. } = &self.measure {
            for step in steps {
                for kind in &step.on {
                    if !types.contains(&kind.as_str()) {
                        types.push(kind);
                    }
                }
            }
        }
        types
    }
}

/// `measure`, with the keys each kind brings. CEL expressions below see
/// the same variables as `when`, compile once at load, and when one fails
/// at run time (or yields the wrong type) the event is counted as a
/// predicate error and changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Measure {
    /// `count`: each matching event adds 1.
    Count,
    /// `sum`: each matching event adds `value` (required), a CEL
    /// expression yielding a number.
    Sum { value: String },
    /// `distinct`: the number of different results of `key` (required), a
    /// CEL expression yielding a string, number or bool (`data.zone`).
    /// Counted up to the rule's highest tier.
    Distinct { key: String },
    /// `max`: the largest `value` (required, CEL number) seen.
    Max { value: String },
    /// `min`: the smallest `value` (required, CEL number) seen; a tier is
    /// reached when the value is at or below its `at`, so tiers go from
    /// the easiest (largest `at`) down.
    Min { value: String },
    /// `streak`: the number of consecutive instances of `every` (required)
    /// in which at least one matching event fell. `allow_gaps` (default
    /// 0, at most [`crate::defaults::STREAK_MAX_GAPS`]): up to this many
    /// instances in a row may be missed without breaking the streak (they
    /// do not add to it). Needs `window = "lifetime"`.
    Streak { every: Every, allow_gaps: u32 },
    /// `sequence`: `steps` (required, 1 to
    /// [`crate::defaults::SEQUENCE_MAX_STEPS`]) completed in order within
    /// one window instance; the value is the number of completed runs.
    /// `within` (optional, greater than zero): the last step must come at
    /// most this long after the first, else the run starts over.
    Sequence {
        steps: Vec<Step>,
        within: Option<Duration>,
    },
}

impl Measure {
    /// The name written in `measure`.
    pub fn name(&self) -> &'static str {
        match self {
            Measure::Count => "count",
            Measure::Sum { .. } => "sum",
            Measure::Distinct { .. } => "distinct",
            Measure::Max { .. } => "max",
            Measure::Min { .. } => "min",
            Measure::Streak { .. } => "streak",
            Measure::Sequence { .. } => "sequence",
        }
    }

    /// True when the measure's value is a number of things (events,
    /// keys, instances, runs), so tiers are whole numbers.
    pub fn counts(&self) -> bool {
        matches!(
            self,
            Measure::Count
                | Measure::Distinct { .. }
                | Measure::Streak { .. }
                | Measure::Sequence { .. }
        )
    }
}

/// The instances a `streak` is counted over (`every`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    /// `period`: the venue's periods (matches, concerts), in the order
    /// they started.
    Period,
    /// `day`: local days in the site's time zone.
    Day,
}

/// One of a `sequence`'s `steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// `on`: event types, at least one; same rules as the rule's `on`.
    pub on: Vec<String>,
    /// `when`: optional CEL predicate, same variables as the rule's.
    pub when: Option<String>,
}

/// `window`: over which span of event time progress accumulates. Tiers
/// can be earned again in each new instance; awards name the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// `lifetime`: one instance forever, named `lifetime`.
    Lifetime,
    /// `period`: the venue period (a match, a concert) opened and closed
    /// by `venue.period.started` / `venue.period.ended` events carrying
    /// `data.period`; instances are named `period:<id>`. Events outside
    /// every period do not count.
    Period,
    /// `day`: local days in the site's time zone, named `YYYY-MM-DD`.
    Day,
    /// `rolling:<duration>`: the value is what the last `duration` of
    /// event time holds (kept in buckets of 1/60 of the duration). An
    /// instance runs from an event that finds the window empty until the
    /// window empties again, and is named `rolling:<start>` (RFC 3339).
    /// Only with `count` and `sum`.
    Rolling(Duration),
    /// `tumbling:<duration>`: consecutive fixed spans aligned to the Unix
    /// epoch, named `<start>/<duration>` (start in RFC 3339).
    Tumbling(Duration),
}

impl Window {
    /// True when the window has instances that close (everything but
    /// `lifetime`), so late events can exist.
    pub fn closes(&self) -> bool {
        !matches!(self, Window::Lifetime)
    }
}

/// `scope`: whose progress the events build.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// `customer` (default): each customer's own events.
    Customer,
    /// `group`: the events of every customer for whom `group_by`
    /// (required; a CEL expression, usually over `profile`, yielding a
    /// string or number) gives the same result build one shared value.
    /// When it reaches a tier, each member whose own contribution reached
    /// `min_contribution` is awarded. Only with `count`, `sum` and
    /// `distinct`.
    Group {
        group_by: String,
        min_contribution: f64,
    },
    /// `venue`: like `group` with one group, everyone at the site.
    Venue { min_contribution: f64 },
}

impl Scope {
    /// `min_contribution` of a shared scope: default 1
    /// ([`crate::defaults::MIN_CONTRIBUTION`]), greater than 0. A
    /// member's contribution is their own events' share: the number of
    /// their events that counted, or for `sum` the sum of their values.
    pub fn min_contribution(&self) -> Option<f64> {
        match self {
            Scope::Customer => None,
            Scope::Group {
                min_contribution, ..
            }
            | Scope::Venue { min_contribution } => Some(*min_contribution),
        }
    }
}

/// `limits = { max_value, max_per_customer }`
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    /// `max_value`: an event whose `value` is above this does not count
    /// and is counted as limited. Only with `sum`, `max` and `min`;
    /// finite and greater than 0. Default `None`: no bound.
    pub max_value: Option<f64>,
    /// `max_per_customer`: at most this many counting events per customer
    /// within a rolling span, written `"<n>/<duration>"` (`"20/1h"`);
    /// further ones are counted as limited. `n` from 1 to
    /// [`crate::defaults::RATE_MAX_COUNT`]. Default `None`: no cap.
    pub max_per_customer: Option<Rate>,
}

/// `referral = { credit, max_per_referrer }`: the event credits someone
/// else, e.g. the friend who shared an offer, never the subject itself
/// (a self-referral is counted as limited). Only with `scope = "customer"`
/// and the measures `count` and `sum`.
#[derive(Debug, Clone, PartialEq)]
pub struct Referral {
    /// `credit`: required; CEL expression yielding the credited
    /// customer's id as a string (`data.referrer`).
    pub credit: String,
    /// `max_per_referrer`: at most this many credits per referrer within
    /// a rolling span (`"5/1d"`); further ones are counted as limited.
    /// `n` from 1 to [`crate::defaults::RATE_MAX_COUNT`]. Default `None`.
    pub max_per_referrer: Option<Rate>,
}

/// One entry of `tiers`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// `at`: the measure value that reaches this tier; an integer or a
    /// float, greater than 0, a whole number for the measures that count
    /// (`count`, `distinct`, `streak`, `sequence`).
    pub at: f64,
    /// `badge`: optional, non-empty.
    pub badge: Option<String>,
    /// `points`: category → integer amount (BTreeMap for a stable order);
    /// default none. Categories follow the id rule `[A-Za-z0-9._-]{1,64}`.
    pub points: BTreeMap<String, i64>,
    /// `voucher`: optional; a voucher handed out with the tier.
    pub voucher: Option<Voucher>,
}

/// Where a tier's voucher comes from: `voucher = { pool = "<id>" }` or
/// `voucher = { template = "<text>" }` (exactly one of the two).
#[derive(Debug, Clone, PartialEq)]
pub enum Voucher {
    /// A code taken from the `[[voucher_pool]]` with this id (defined in
    /// any rule file of the bundle; [`crate::load_rules`] checks it
    /// exists). A pool running dry is a counted condition, not an error.
    Pool(String),
    /// A code made from a template: `{customer}` (the customer id),
    /// `{rule}` (the rule id), `{tier}` (1-based tier) and `{n}` (a number
    /// unique per rule and tier) are replaced; `{{` and `}}` stand for
    /// braces. Non-empty, at most 256 bytes, no other placeholders.
    Template(String),
}

/// `[[voucher_pool]]` in a rule file: a list of prepared voucher codes.
#[derive(Debug, Clone, PartialEq)]
pub struct VoucherPool {
    /// `id`: required, unique in the bundle, `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// `codes`: required; a text file with one code per line (blank lines
    /// and lines starting with `#` are skipped), relative to the rule
    /// file's folder; stored absolute. [`crate::load_rules`] checks it is
    /// a readable file with at least one code.
    pub codes: PathBuf,
    /// Where the pool was defined: the rule file (absolute) and the
    /// 1-based line of its `[[voucher_pool]]` header.
    pub file: PathBuf,
    pub line: usize,
}

// ---------------------------------------------------------------------
// Next best action: `[[offer]]` in rule files and the site's `[nba]`
// policy. Both are read by `offers.rs`; the defaults live in
// [`crate::nba_defaults`].
// ---------------------------------------------------------------------

/// `[nba]` in the site config: the policy every offer of the site shares.
/// The section is optional; when it is absent every default applies.
#[derive(Debug, Clone, PartialEq)]
pub struct NbaPolicy {
    /// `max_per_customer`: at most this many offers shown to one customer
    /// within a rolling window, across all offers, written `"<n>/<window>"`;
    /// default `"3/1h"`. `n` at least 1.
    pub max_per_customer: Rate,
    /// `quiet_after_accept`: no offer for this long after the customer
    /// accepted one; default 10 min; zero allowed (no quiet time).
    pub quiet_after_accept: Duration,
    /// `top_k`: how many offers one trigger may show one customer; default
    /// 1, from 1 to 16.
    pub top_k: u32,
    /// `control_share`: the share of customers held out as the control
    /// group (they get no offers; what they would have got is recorded);
    /// default 0.05; from 0 (no control group) up to, not including, 1.
    pub control_share: f64,
    /// `control_salt`: mixed into the hash that places a customer in the
    /// control group; default `None`, which means the site id. Changing it
    /// draws a new control group.
    pub control_salt: Option<String>,
    /// `on_expiry`: what an expired offer teaches the learner; default
    /// `ignore`.
    pub on_expiry: OnExpiry,
    /// `prior = { alpha, beta }`: the Beta prior of every offer's
    /// propensity before anything was learned; default 1 and 1 (uniform);
    /// both finite and greater than 0.
    pub prior: BetaPrior,
    /// `exploration`: the share of decisions that pick among the eligible
    /// offers at random instead of by score, so a weak-looking offer keeps
    /// being tried; default 0.05; from 0 up to, not including, 1.
    pub exploration: f64,
    /// `segment`: CEL over `profile` giving the learner segment as a
    /// string; default `None`: one segment, `all`. An offer's own
    /// `segment` overrides it. Non-empty, compiled once at load.
    pub segment: Option<String>,
}

/// What an expiry teaches the learner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExpiry {
    /// `ignore`: an expired offer counts as ignored (a failure).
    Ignore,
    /// `neutral`: an expiry teaches nothing.
    Neutral,
}

/// A Beta distribution's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BetaPrior {
    /// `alpha`: default 1; finite, greater than 0.
    pub alpha: f64,
    /// `beta`: default 1; finite, greater than 0.
    pub beta: f64,
}

/// A frequency cap, written `"<n>/<window>"` (`"1/10m"`: once per ten
/// minutes). The window is rolling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// At least 1.
    pub count: u32,
    /// Greater than zero.
    pub per: Duration,
}

/// `[[offer]]` in a rule file.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// `id`: required, unique among the bundle's offers,
    /// `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// `version`: default 1, at least 1. Learned propensities and records
    /// are kept per version: bump it when the offer changes meaning.
    pub version: u32,
    /// `on`: trigger event types, at least one; each non-empty, without
    /// whitespace, listed once.
    pub on: Vec<String>,
    /// `audience`: CEL predicate over `profile`, `progress`, `event` and
    /// `data` (the trigger); default `None`: every customer.
    pub audience: Option<String>,
    /// `consent`: required; the consent purpose the customer must have
    /// granted (an id, e.g. `marketing`). No offer goes out unchecked.
    pub consent: String,
    /// `value`: required; business value of an accept, finite and greater
    /// than 0.
    pub value: f64,
    /// `weight`: CEL over the same variables as `audience`, giving a
    /// number that multiplies the score; default `None`: 1.
    pub weight: Option<String>,
    /// `channel`: default `app`.
    pub channel: Channel,
    /// `expires_after`: required, greater than zero; how long a shown
    /// offer waits for an answer before it expires.
    pub expires_after: Duration,
    /// `payload`: what the app shows, passed through as JSON; default
    /// empty. Strings, numbers, booleans, arrays and tables (no dates).
    pub payload: BTreeMap<String, PayloadValue>,
    /// `escalate`: default `None`: the payload never changes.
    pub escalate: Option<Escalate>,
    /// `contact`: per-customer limits of this offer; every key optional.
    pub contact: Contact,
    /// `conversion`: the event that counts as a conversion for uplift;
    /// default `None`: conversions are not measured for this offer.
    pub conversion: Option<Conversion>,
    /// `reward = { points = { category = amount } }`: credited on accept;
    /// default none.
    pub reward: BTreeMap<String, i64>,
    /// `referral = { points = { category = amount } }`: credited to a
    /// customer who shared the offer when the friend accepts it while the
    /// shared instance is still open; default none.
    pub referral: BTreeMap<String, i64>,
    /// `segment`: CEL over `profile`; overrides `nba.segment` for this
    /// offer; default `None`.
    pub segment: Option<String>,
    /// Where the offer was defined: the rule file (absolute) and the
    /// 1-based line of its `[[offer]]` header.
    pub file: PathBuf,
    pub line: usize,
}

/// `channel`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `app`: published to the venue app and listed for pull.
    App,
}

/// A `payload` value, kept as written.
#[derive(Debug, Clone, PartialEq)]
pub enum PayloadValue {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Array(Vec<PayloadValue>),
    Table(BTreeMap<String, PayloadValue>),
}

/// A number in `escalate.add` / `escalate.max`, kept as written so an
/// integer payload field stays an integer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Integer(i64),
    Float(f64),
}

impl Amount {
    pub fn as_f64(self) -> f64 {
        match self {
            Amount::Integer(i) => i as f64,
            Amount::Float(f) => f,
        }
    }
}

/// `escalate = { on, when, add, max }`: while an instance is open, each
/// matching event raises payload fields by `add`, never beyond `max`.
#[derive(Debug, Clone, PartialEq)]
pub struct Escalate {
    /// `on`: event types, at least one (same rules as the offer's `on`).
    pub on: Vec<String>,
    /// `when`: CEL predicate over `profile`, `event` and `data`; default
    /// `None`: every event of the `on` types.
    pub when: Option<String>,
    /// `add`: payload field → amount, at least one; each field a top-level
    /// number in `payload`, each amount greater than 0.
    pub add: BTreeMap<String, Amount>,
    /// `max`: payload field → cap, one for every `add` field and no other;
    /// at least the field's value in `payload`.
    pub max: BTreeMap<String, Amount>,
}

/// `contact = { max, cooldown, stop_after_ignores }`
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Contact {
    /// `max`: at most this often per customer (`"1/10m"`); default `None`:
    /// only the site-wide cap applies.
    pub max: Option<Rate>,
    /// `cooldown`: after an instance closes (answered or expired), wait
    /// this long before showing the offer to that customer again; default
    /// zero.
    pub cooldown: Duration,
    /// `stop_after_ignores`: after this many ignores in a row (dismissed
    /// or expired, no accept between), the customer is not shown the offer
    /// again; default `None`: never stop. At least 1.
    pub stop_after_ignores: Option<u32>,
}

/// `conversion = { on, when, window }`
#[derive(Debug, Clone, PartialEq)]
pub struct Conversion {
    /// `on`: event types, at least one (e.g. `["shop.purchase"]`).
    pub on: Vec<String>,
    /// `when`: CEL predicate over `profile`, `event` and `data` telling
    /// whether the event converts this offer (e.g. the SKU matches);
    /// default `None`: every event of the `on` types.
    pub when: Option<String>,
    /// `window`: a conversion counts when it happens this long after the
    /// decision at most; default 24 h; greater than zero.
    pub window: Duration,
}
