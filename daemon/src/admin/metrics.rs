//! `GET /metrics`: the Prometheus text exposition format, version 0.0.4.
//!
//! Rendered by hand at scrape time from the counters the stages already
//! keep (relaxed atomics), so there is one set of numbers for logs,
//! `touchline status` and Prometheus, and the hot path pays nothing for
//! being observed. The format is small: `# HELP` and `# TYPE` per family,
//! then `name{label="value"} number` lines.

use std::fmt::Write as _;

use crate::ingest::RejectReason;
use crate::store::HistogramSnapshot;

use super::{Observed, Sample};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Text under construction. Writing to a `String` cannot fail, so the
/// `fmt::Result`s are dropped.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help);
        self.sample(name, &[], value as f64);
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            cumulative += count;
            self.sample(&bucket, &[("le", &format_value(*bound))], cumulative as f64);
        }
        let total = h.count();
        self.sample(&bucket, &[("le", "+Inf")], total as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], total as f64);
    }
}

fn bool_value(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Go's `strconv.ParseFloat` syntax, which Prometheus parses: `+Inf`,
/// `-Inf`, `NaN`, and plain decimals (Rust never prints an exponent).
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        v.to_string()
    }
}

/// Label values escape `\`, `"` and line feeds.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text escapes `\` and line feeds.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The whole exposition for one sample.
/// Reads one per-rule counter.
type RuleCounter = fn(&crate::engine::RuleStats) -> u64;

pub(super) fn render(observed: &Observed, sample: &Sample) -> String {
    let mut x = Exposition::default();
    let ingest = &sample.ingest;
    let store = observed.store.stats();

    x.family(
        "touchline_build_info",
        Kind::Gauge,
        "Always 1; the labels name the running build and site.",
    );
    x.sample(
        "touchline_build_info",
        &[("version", super::VERSION), ("site", &observed.site)],
        1.0,
    );
    x.gauge(
        "touchline_start_time_seconds",
        "Start time of the daemon, seconds since the Unix epoch.",
        observed.started_at_ms as f64 / 1000.0,
    );
    x.gauge(
        "touchline_ready",
        "1 when /readyz answers 200: store open, rules loaded, ingest up, not stopping.",
        bool_value(observed.readiness_of(sample).ready()),
    );

    // Ingest.
    x.counter(
        "touchline_events_received_total",
        "Events that arrived over MQTT or HTTP (a batch counts its elements).",
        ingest.received,
    );
    x.counter(
        "touchline_events_accepted_total",
        "Events committed to the store for the first time.",
        ingest.accepted,
    );
    x.counter(
        "touchline_events_duplicate_total",
        "Events dropped as duplicates of an event seen within the dedup retention.",
        ingest.duplicates,
    );
    x.family(
        "touchline_events_rejected_total",
        Kind::Counter,
        "Events rejected by validation, by reason.",
    );
    for reason in RejectReason::ALL {
        x.sample(
            "touchline_events_rejected_total",
            &[("reason", reason.label())],
            ingest.rejected_for(reason) as f64,
        );
    }
    x.counter(
        "touchline_ingest_backpressure_total",
        "Submissions the store refused for back-pressure (outbox or map full): HTTP 503s, MQTT retries.",
        ingest.backpressure,
    );
    x.counter(
        "touchline_ingest_submit_errors_total",
        "Submissions that failed for another storage reason.",
        ingest.submit_errors,
    );
    x.gauge(
        "touchline_mqtt_connected",
        "1 while the MQTT client holds a broker session (0 when MQTT is not configured).",
        bool_value(ingest.mqtt_connected),
    );
    x.counter(
        "touchline_mqtt_connects_total",
        "Successful MQTT connections, the first one included.",
        ingest.mqtt_connects,
    );
    x.counter(
        "touchline_mqtt_connection_errors_total",
        "MQTT connection losses and failed connection attempts.",
        ingest.mqtt_connection_errors,
    );

    // Store.
    x.counter(
        "touchline_store_commits_total",
        "LMDB write transactions committed.",
        store.commits(),
    );
    x.histogram(
        "touchline_store_commit_duration_seconds",
        "Write transaction duration, from its start (applying events included) to the durable commit.",
        &store.commit_duration(),
    );
    x.histogram(
        "touchline_store_commit_events",
        "Events (duplicates included) per group commit, for commits that carried events.",
        &store.commit_events(),
    );
    x.counter(
        "touchline_store_errors_total",
        "Write transactions that failed for a reason other than a full map.",
        store.storage_errors(),
    );
    x.counter(
        "touchline_store_map_full_events_total",
        "Events refused because the LMDB map was full (raise store.map_size).",
        store.map_full_events(),
    );
    x.counter(
        "touchline_dead_letters_stored_total",
        "Rejected-input samples kept for `touchline dlq`.",
        store.dead_letters_stored(),
    );
    x.counter(
        "touchline_dead_letters_dropped_total",
        "Rejected-input samples not kept (writer busy or store failure).",
        store.dead_letters_dropped(),
    );
    x.counter(
        "touchline_events_not_tracked_total",
        "Events of customers without gamification consent: committed, applied to no rule.",
        store.events_not_tracked(),
    );
    x.counter(
        "touchline_customers_erased_total",
        "customer.erased events applied: every trace of the customer deleted.",
        store.erasures(),
    );

    // Outbox.
    let (outbox, _) = sample.outbox_view(&store);
    x.gauge(
        "touchline_outbox_records",
        "Records waiting for the central platform's acknowledgement.",
        outbox.records as f64,
    );
    x.gauge(
        "touchline_outbox_bytes",
        "Encoded bytes of the records waiting in the outbox.",
        outbox.bytes as f64,
    );
    x.gauge(
        "touchline_outbox_max_bytes",
        "The outbox bound (outbox.max_bytes).",
        observed.outbox_max_bytes as f64,
    );
    if let Some(age) = sample.oldest_age_seconds().or_else(|| {
        // An empty outbox is zero seconds behind; an unreadable one is
        // left out rather than reported as healthy.
        sample.outbox.as_ref().ok().map(|_| 0.0)
    }) {
        x.gauge(
            "touchline_outbox_oldest_age_seconds",
            "Age of the oldest waiting record (from its event time): how far behind the central platform is; 0 when empty.",
            age,
        );
    }
    x.gauge(
        "touchline_outbox_next_seq",
        "Sequence number the next record will get.",
        outbox.next_seq as f64,
    );
    x.counter(
        "touchline_outbox_records_appended_total",
        "Records written to the outbox (awards, ...).",
        store.records_appended(),
    );
    x.counter(
        "touchline_outbox_records_dropped_total",
        "Records dropped by the drop-oldest policy (declared to the central side as a gap).",
        store.records_dropped(),
    );
    x.counter(
        "touchline_outbox_full_refusals_total",
        "Submissions refused because the outbox was full (policy block).",
        store.outbox_full_refusals(),
    );

    // Actions out (MQTT publications).
    let publisher = &observed.publisher;
    x.gauge(
        "touchline_publisher_connected",
        "1 while the publisher holds a broker connection (0 without [ingest.mqtt]).",
        bool_value(publisher.connected()),
    );
    // Next best action.
    let nba = observed.store.nba_stats();
    x.counter(
        "touchline_nba_decisions_total",
        "Offers shown: instances created for treated customers.",
        nba.decisions(),
    );
    x.counter(
        "touchline_nba_control_total",
        "Decisions for control-group customers: recorded, never shown.",
        nba.control(),
    );
    x.family(
        "touchline_nba_suppressed_total",
        Kind::Counter,
        "Offers the contact policy held back, by reason.",
    );
    for reason in crate::nba::policy::Suppression::ALL {
        x.sample(
            "touchline_nba_suppressed_total",
            &[("reason", reason.name())],
            nba.suppressed(reason) as f64,
        );
    }
    x.family(
        "touchline_nba_outcomes_total",
        Kind::Counter,
        "What became of offers: accepted, dismissed, clicked, shared, expired, converted.",
    );
    for outcome in crate::store::nba::OUTCOMES {
        x.sample(
            "touchline_nba_outcomes_total",
            &[("outcome", outcome.as_str())],
            nba.outcomes(outcome) as f64,
        );
    }
    x.counter(
        "touchline_nba_referrals_total",
        "Friends who accepted a shared offer in time: the sharer was credited.",
        nba.referrals(),
    );
    x.counter(
        "touchline_nba_escalations_total",
        "Open offers whose payload an escalation event changed.",
        nba.escalations(),
    );
    x.counter(
        "touchline_nba_bad_answers_total",
        "offer.* events naming no open instance of their customer (ignored).",
        nba.bad_answers(),
    );
    x.counter(
        "touchline_nba_expression_errors_total",
        "Offer expressions (audience, weight, segment, escalate.when, conversion.when) that failed; the offer was skipped.",
        nba.expression_errors(),
    );
    x.counter(
        "touchline_nba_fanout_customers_total",
        "Customers decided for by venue-wide triggers.",
        nba.fanout_customers(),
    );
    x.gauge(
        "touchline_nba_fanouts_open",
        "Venue-wide fan-outs with fans still to decide (a chunk commits per writer turn).",
        nba.fanouts_open() as f64,
    );
    x.counter(
        "touchline_state_checkpoints_total",
        "Checkpoints that wrote the engine's state back to LMDB (rule_state = journal).",
        store.checkpoints(),
    );
    x.counter(
        "touchline_state_checkpoint_keys_total",
        "State keys written back by checkpoints.",
        store.checkpoint_keys(),
    );
    x.gauge(
        "touchline_state_journal_events",
        "Events journaled since the last checkpoint: what a crash now would replay.",
        store.journal_entries() as f64,
    );
    x.counter(
        "touchline_store_dedup_writeback_batches_total",
        "Batches of dedup keys the write-back thread committed to its environment.",
        store.dedup_batches(),
    );
    x.counter(
        "touchline_store_dedup_writeback_keys_total",
        "Dedup keys written by those batches (or deleted: held keys that expired before they were written back).",
        store.dedup_batch_keys(),
    );
    x.family(
        "touchline_store_writeback_wait_seconds_total",
        Kind::Counter,
        "Time the writer waited for a write-back batch still in flight when the next was due.",
    );
    x.sample(
        "touchline_store_writeback_wait_seconds_total",
        &[],
        store.writeback_wait_us() as f64 / 1e6,
    );
    let maps = [
        (
            "touchline_store_map_size_bytes",
            "Size of the LMDB memory map, per environment (store.map_size, rounded up).",
            [store.map_size_bytes(), store.writeback_map_size_bytes()],
        ),
        (
            "touchline_store_map_used_bytes",
            "High-water mark of the LMDB map per environment: bytes up to the highest page a commit has used (freed pages below it are reused first).",
            [store.map_used_bytes(), store.writeback_map_used_bytes()],
        ),
    ];
    for (name, help, values) in maps {
        x.family(name, Kind::Gauge, help);
        for (environment, value) in ["store", "writeback"].into_iter().zip(values) {
            x.sample(name, &[("environment", environment)], value as f64);
        }
    }
    x.counter(
        "touchline_state_journal_replayed_total",
        "Journaled events replayed at start after an unclean stop.",
        store.journal_replayed(),
    );
    x.counter(
        "touchline_publications_queued_total",
        "MQTT messages (progress, offers) queued in commits.",
        store.publications_queued(),
    );
    x.counter(
        "touchline_publications_acked_total",
        "Queued MQTT messages the broker acknowledged (then deleted).",
        store.publications_acked(),
    );
    x.counter(
        "touchline_publisher_sent_total",
        "PUBLISH packets sent (republications after a reconnect included).",
        publisher.published(),
    );
    x.counter(
        "touchline_publisher_reconnects_total",
        "Publisher connection attempts after the first.",
        publisher.reconnects(),
    );

    // Uplink.
    let up = &observed.uplink;
    x.gauge(
        "touchline_uplink_connected",
        "1 while a session with the central receiver is up.",
        bool_value(up.connected()),
    );
    x.counter(
        "touchline_uplink_records_sent_total",
        "Records sent to the central receiver (resends included).",
        up.records_sent(),
    );
    x.counter(
        "touchline_uplink_records_acked_total",
        "Records the central receiver newly acknowledged as durable.",
        up.records_acked(),
    );
    x.counter(
        "touchline_uplink_batches_total",
        "Batches sent to the central receiver.",
        up.batches(),
    );
    x.counter(
        "touchline_uplink_reconnects_total",
        "Uplink sessions lost or failed to start.",
        up.reconnects(),
    );
    x.counter(
        "touchline_uplink_refusals_total",
        "Uplink sessions the central receiver refused.",
        up.refusals(),
    );
    x.counter(
        "touchline_uplink_records_lost_centrally_total",
        "Records the central side had acknowledged and no longer held (declared a gap).",
        up.records_lost_centrally(),
    );
    x.counter(
        "touchline_uplink_batch_timeouts_total",
        "Batches that got no answer within uplink.request_timeout (each halves the next batch).",
        up.batch_timeouts(),
    );
    x.gauge(
        "touchline_uplink_batch_max_bytes",
        "Bytes the next batch may carry: uplink.batch_max_bytes, less after timeouts (0 before the first session).",
        up.batch_bytes() as f64,
    );
    x.counter(
        "touchline_uplink_sequence_rebases_total",
        "Welcomes at which the store's records were renumbered after the central side's mark (a rebuilt or restored site).",
        up.rebases(),
    );
    x.gauge(
        "touchline_uplink_last_acked_seq",
        "Highest sequence the central receiver acknowledged (0 until the first session).",
        up.last_acked() as f64,
    );

    // Rules.
    let engine = observed.store.engine_stats();
    let rules: Vec<_> = engine
        .rules()
        .iter()
        .map(|r| (r, r.version().to_string()))
        .collect();
    let per_rule: [(&str, &str, RuleCounter); 5] = [
        (
            "touchline_rule_matches_total",
            "Events that met the rule (type and `when`).",
            |r| r.matched(),
        ),
        (
            "touchline_rule_awards_total",
            "Tier awards the rule produced.",
            |r| r.awards(),
        ),
        (
            "touchline_rule_predicate_errors_total",
            "Evaluations of the rule's expressions that failed at run time (the event did not count).",
            |r| r.predicate_errors(),
        ),
        (
            "touchline_rule_late_total",
            "Matching events whose window instance had closed (watermark past its end plus the lateness).",
            |r| r.late(),
        ),
        (
            "touchline_rule_limited_total",
            "Matching events refused by the rule's sources, limits or referral rules.",
            |r| r.limited(),
        ),
    ];
    x.counter(
        "touchline_vouchers_dry_total",
        "Tiers awarded without their voucher because the pool had no code left.",
        engine.vouchers_dry(),
    );
    x.counter(
        "touchline_period_summaries_total",
        "PeriodSummary records produced at period ends.",
        engine.period_summaries(),
    );
    x.counter(
        "touchline_period_events_invalid_total",
        "venue.period.* events without a usable data.period (ignored).",
        engine.period_events_invalid(),
    );
    for (name, help, value) in per_rule {
        x.family(name, Kind::Counter, help);
        for (rule, version) in &rules {
            x.sample(
                name,
                &[("rule", rule.id()), ("version", version)],
                value(rule) as f64,
            );
        }
    }
    x.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }

    #[test]
    fn values_use_the_prometheus_float_syntax() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(0.0001), "0.0001");
        assert_eq!(format_value(3.0), "3");
    }

    #[test]
    fn histograms_are_cumulative_and_end_with_inf() {
        let mut x = Exposition::default();
        let h = HistogramSnapshot {
            bounds: vec![0.5, 1.0],
            counts: vec![2, 0, 3],
            sum: 7.5,
        };
        x.histogram("h", "help", &h);
        assert_eq!(
            x.out,
            "# HELP h help\n# TYPE h histogram\n\
             h_bucket{le=\"0.5\"} 2\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 5\n\
             h_sum 7.5\nh_count 5\n"
        );
    }
}
