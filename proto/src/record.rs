//! Records: the condensed facts a site forwards to the central platform.
//!
//! A record is immutable once it has a sequence number. Its JSON form is the
//! one the reference receiver writes to JSONL and PostgreSQL, so it is
//! defined here, next to the binary form, to keep the two from drifting.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// One record with its identity: site, per-site sequence and event time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Site id, equal to the one in the site's client certificate.
    pub site: String,
    /// Per-site sequence number, strictly increasing from 1, never reused.
    pub seq: u64,
    /// Event time of the event that produced the record, milliseconds since
    /// the Unix epoch (UTC).
    pub at_ms: i64,
    pub body: RecordBody,
}

/// What happened. Append new variants at the end only (see crate docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RecordBody {
    AchievementAwarded(AchievementAwarded),
    PeriodSummary(PeriodSummary),
    RuleStats(RuleStats),
    CustomerErased(CustomerErased),
    OfferDecision(OfferDecision),
    OfferOutcome(OfferOutcome),
    OfferStats(OfferStats),
}

/// A customer reached one tier of an achievement rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AchievementAwarded {
    /// Customer id as it leaves the site (a keyed pseudonym unless the site
    /// is configured to send raw ids).
    pub customer: String,
    /// Rule id.
    pub achievement: String,
    /// Rule version that produced the award.
    pub version: u32,
    /// Tier reached, 1-based in the rule's tier order.
    pub tier: u32,
    pub badge: Option<String>,
    /// Points credited, by category, in category order.
    pub points: Vec<(String, i64)>,
    /// Window instance the award belongs to (`"lifetime"` for lifetime rules).
    pub window: String,
    /// The value of the rule's measure when the tier was reached.
    pub value: f64,
}

/// One customer's condensed standing at the end of a venue period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeriodSummary {
    /// Customer id as it leaves the site (pseudonym unless configured off).
    pub customer: String,
    /// The period (`data.period` of `venue.period.started`).
    pub period: String,
    /// Points credited in the period, by category, in category order.
    pub points: Vec<(String, i64)>,
    /// Badges awarded in the period, in award order.
    pub badges: Vec<String>,
    /// Rules with progress in the period but without their last tier.
    pub progress: Vec<RuleProgress>,
}

/// Progress of one unfinished rule, inside a [`PeriodSummary`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleProgress {
    pub rule: String,
    pub version: u32,
    /// The measure's value at the period end.
    pub value: f64,
    /// Threshold of the next tier not yet reached.
    pub next_at: f64,
}

/// Per-rule counters over one reporting interval (every minute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleStats {
    pub rule: String,
    pub version: u32,
    /// Interval covered, ms since the Unix epoch: `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Events that met the rule's type and `when`.
    pub matched: u64,
    pub awards: u64,
    /// Events behind the watermark by more than the rule's lateness.
    pub late: u64,
    /// Events refused by the rule's limits (rate, `max_value`, sources).
    pub limited: u64,
}

/// Every trace of a customer was deleted at the site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerErased {
    /// The customer as previously sent (pseudonym unless configured off),
    /// so the central side can erase its copies too.
    pub customer: String,
}

/// The next-best-action decision for one customer on one trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferDecision {
    pub customer: String,
    pub offer: String,
    pub version: u32,
    /// Unique id of the offer instance (or of the would-have-been instance
    /// for a control customer).
    pub instance: String,
    /// Event type that triggered the decision.
    pub trigger: String,
    /// propensity × value × weight at decision time.
    pub score: f64,
    /// True for a control-group customer: nothing was shown.
    pub control: bool,
    /// Learner segment the propensity came from.
    pub segment: String,
    /// When the instance expires, ms since the Unix epoch.
    pub expires_ms: i64,
}

/// How an offer instance ended (or changed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferOutcome {
    pub customer: String,
    pub offer: String,
    pub version: u32,
    pub instance: String,
    /// `accepted`, `dismissed`, `clicked`, `shared`, `expired` or
    /// `converted`.
    pub outcome: String,
}

/// Per-offer counters over one reporting interval (every minute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferStats {
    pub offer: String,
    pub version: u32,
    pub from_ms: i64,
    pub to_ms: i64,
    pub decided: u64,
    pub shown: u64,
    pub accepted: u64,
    pub dismissed: u64,
    pub expired: u64,
    /// Suppressed decisions by reason, in reason order.
    pub suppressed: Vec<(String, u64)>,
    /// Control-group customers who would have been offered.
    pub control: u64,
    /// Conversions among treated and control customers.
    pub converted_treated: u64,
    pub converted_control: u64,
}

impl RecordBody {
    /// The `kind` string used in JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordBody::AchievementAwarded(_) => "achievement_awarded",
            RecordBody::PeriodSummary(_) => "period_summary",
            RecordBody::RuleStats(_) => "rule_stats",
            RecordBody::CustomerErased(_) => "customer_erased",
            RecordBody::OfferDecision(_) => "offer_decision",
            RecordBody::OfferOutcome(_) => "offer_outcome",
            RecordBody::OfferStats(_) => "offer_stats",
        }
    }

    /// The customer (as sent) the record is about, if any.
    pub fn customer(&self) -> Option<&str> {
        match self {
            RecordBody::AchievementAwarded(a) => Some(&a.customer),
            RecordBody::PeriodSummary(p) => Some(&p.customer),
            RecordBody::CustomerErased(e) => Some(&e.customer),
            RecordBody::OfferDecision(d) => Some(&d.customer),
            RecordBody::OfferOutcome(o) => Some(&o.customer),
            RecordBody::RuleStats(_) | RecordBody::OfferStats(_) => None,
        }
    }
}

/// ms since the Unix epoch as RFC 3339 (UTC); out-of-range → the epoch.
fn rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// `[(name, n)]` as a JSON object, keeping the names as keys.
fn pairs<T: Serialize>(pairs: &[(String, T)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

impl Record {
    /// Event time as RFC 3339 (UTC). Out-of-range times fall back to the
    /// epoch rather than failing: the number is kept in `at_ms` regardless.
    pub fn at_rfc3339(&self) -> String {
        rfc3339(self.at_ms)
    }

    /// The record as one JSON object: `site`, `seq`, `kind`, `at` and the
    /// record's own fields. This is the documented JSONL/PostgreSQL schema.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("site".into(), json!(self.site));
        obj.insert("seq".into(), json!(self.seq));
        obj.insert("kind".into(), json!(self.body.kind()));
        obj.insert("at".into(), json!(self.at_rfc3339()));
        match &self.body {
            RecordBody::AchievementAwarded(a) => {
                obj.insert("customer".into(), json!(a.customer));
                obj.insert("achievement".into(), json!(a.achievement));
                obj.insert("version".into(), json!(a.version));
                obj.insert("tier".into(), json!(a.tier));
                obj.insert("badge".into(), json!(a.badge));
                obj.insert("points".into(), pairs(&a.points));
                obj.insert("window".into(), json!(a.window));
                obj.insert("value".into(), json!(a.value));
            }
            RecordBody::PeriodSummary(p) => {
                obj.insert("customer".into(), json!(p.customer));
                obj.insert("period".into(), json!(p.period));
                obj.insert("points".into(), pairs(&p.points));
                obj.insert("badges".into(), json!(p.badges));
                let progress: Vec<Value> = p
                    .progress
                    .iter()
                    .map(|r| {
                        json!({ "rule": r.rule, "version": r.version,
                                "value": r.value, "next_at": r.next_at })
                    })
                    .collect();
                obj.insert("progress".into(), Value::Array(progress));
            }
            RecordBody::RuleStats(r) => {
                obj.insert("rule".into(), json!(r.rule));
                obj.insert("version".into(), json!(r.version));
                obj.insert("from".into(), json!(rfc3339(r.from_ms)));
                obj.insert("to".into(), json!(rfc3339(r.to_ms)));
                obj.insert("matched".into(), json!(r.matched));
                obj.insert("awards".into(), json!(r.awards));
                obj.insert("late".into(), json!(r.late));
                obj.insert("limited".into(), json!(r.limited));
            }
            RecordBody::CustomerErased(e) => {
                obj.insert("customer".into(), json!(e.customer));
            }
            RecordBody::OfferDecision(d) => {
                obj.insert("customer".into(), json!(d.customer));
                obj.insert("offer".into(), json!(d.offer));
                obj.insert("version".into(), json!(d.version));
                obj.insert("instance".into(), json!(d.instance));
                obj.insert("trigger".into(), json!(d.trigger));
                obj.insert("score".into(), json!(d.score));
                obj.insert("control".into(), json!(d.control));
                obj.insert("segment".into(), json!(d.segment));
                obj.insert("expires".into(), json!(rfc3339(d.expires_ms)));
            }
            RecordBody::OfferOutcome(o) => {
                obj.insert("customer".into(), json!(o.customer));
                obj.insert("offer".into(), json!(o.offer));
                obj.insert("version".into(), json!(o.version));
                obj.insert("instance".into(), json!(o.instance));
                obj.insert("outcome".into(), json!(o.outcome));
            }
            RecordBody::OfferStats(s) => {
                obj.insert("offer".into(), json!(s.offer));
                obj.insert("version".into(), json!(s.version));
                obj.insert("from".into(), json!(rfc3339(s.from_ms)));
                obj.insert("to".into(), json!(rfc3339(s.to_ms)));
                obj.insert("decided".into(), json!(s.decided));
                obj.insert("shown".into(), json!(s.shown));
                obj.insert("accepted".into(), json!(s.accepted));
                obj.insert("dismissed".into(), json!(s.dismissed));
                obj.insert("expired".into(), json!(s.expired));
                obj.insert("suppressed".into(), pairs(&s.suppressed));
                obj.insert("control".into(), json!(s.control));
                obj.insert("converted_treated".into(), json!(s.converted_treated));
                obj.insert("converted_control".into(), json!(s.converted_control));
            }
        }
        Value::Object(obj)
    }

    /// Bytes this record takes in the postcard encoding; used for outbox
    /// accounting and batch sizing.
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).unwrap_or(usize::MAX)
    }
}
