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

impl RecordBody {
    /// The `kind` string used in JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordBody::AchievementAwarded(_) => "achievement_awarded",
        }
    }

    /// The customer (as sent) the record is about, if any.
    pub fn customer(&self) -> Option<&str> {
        match self {
            RecordBody::AchievementAwarded(a) => Some(&a.customer),
        }
    }
}

impl Record {
    /// Event time as RFC 3339 (UTC). Out-of-range times fall back to the
    /// epoch rather than failing: the number is kept in `at_ms` regardless.
    pub fn at_rfc3339(&self) -> String {
        let nanos = i128::from(self.at_ms) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
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
                let points: Map<String, Value> = a
                    .points
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect();
                obj.insert("points".into(), Value::Object(points));
                obj.insert("window".into(), json!(a.window));
                obj.insert("value".into(), json!(a.value));
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
