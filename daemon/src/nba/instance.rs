//! An offer instance: one offer shown to one customer, open ("in limbo")
//! until it is answered or expires.
//!
//! The instance is what gets persisted, published and listed: it carries
//! its own id (the app answers with it, and it is the dedup key of
//! at-least-once publication), its expiry as event time (so the timer
//! survives restarts: an instance found past its expiry on start is
//! expired then) and the payload as it currently stands after escalations.
//! It stays stored after it closes, until its expiry, because a friend's
//! accept within its life still credits the customer who shared it.

use std::collections::BTreeMap;

use edge_config::{Offer, PayloadValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{millis, Outcome};

/// Friends one instance remembers; further shares are counted but not
/// tracked for referral, which keeps the record small.
pub const MAX_SHARES: usize = 32;

/// One shown offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferInstance {
    /// Unique on the site (see [`instance_id`]).
    pub id: String,
    pub customer: String,
    pub offer: String,
    pub version: u32,
    /// Learner segment the decision used; the outcome teaches that arm.
    pub segment: String,
    /// Event type that triggered the decision.
    pub trigger: String,
    /// propensity × value × weight at decision time.
    pub score: f64,
    pub decided_ms: i64,
    pub expires_ms: i64,
    /// The payload as JSON text: postcard is not self-describing, so a
    /// JSON value cannot be stored as one.
    pub payload: String,
    /// Escalation steps applied so far.
    pub escalations: u32,
    /// Friends it was shared with, for the referral reward.
    pub shared_with: Vec<String>,
    /// How and when it closed; `None` while open.
    pub closed: Option<Closed>,
}

/// How an instance closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    pub outcome: Outcome,
    pub at_ms: i64,
}

/// The instance id for the site's `counter`-th instance: unique per site
/// as long as the counter is persisted with the instances it numbers.
/// The counter is zero-padded so ids sort in the order they were given
/// (up to 10^12 of them): instances and their timers are keyed by id,
/// and keys in order are appended to those tables rather than inserted.
pub fn instance_id(site: &str, counter: u64) -> String {
    format!("{site}.{counter:012}")
}

/// An offer's configured payload as the JSON text instances store.
pub fn payload_text(offer: &Offer) -> String {
    Value::Object(payload_json(&offer.payload)).to_string()
}

/// An offer's configured payload as JSON, the form the app receives.
pub fn payload_json(payload: &BTreeMap<String, PayloadValue>) -> Map<String, Value> {
    payload
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect()
}

fn value_json(value: &PayloadValue) -> Value {
    match value {
        PayloadValue::String(s) => Value::String(s.clone()),
        PayloadValue::Integer(i) => Value::from(*i),
        // The config reader refuses non-finite numbers; null is only a
        // guard.
        PayloadValue::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        PayloadValue::Boolean(b) => Value::Bool(*b),
        PayloadValue::Array(items) => Value::Array(items.iter().map(value_json).collect()),
        PayloadValue::Table(t) => Value::Object(payload_json(t)),
    }
}

impl OfferInstance {
    /// A new open instance of `offer`, decided at `decided_ms`.
    /// An instance of `offer` showing `payload` (the offer's payload as
    /// JSON text, see [`payload_text`], which the caller keeps per offer
    /// rather than per decision).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        offer: &Offer,
        payload: String,
        id: String,
        customer: &str,
        segment: &str,
        trigger: &str,
        score: f64,
        decided_ms: i64,
    ) -> OfferInstance {
        OfferInstance {
            id,
            customer: customer.to_owned(),
            offer: offer.id.clone(),
            version: offer.version,
            segment: segment.to_owned(),
            trigger: trigger.to_owned(),
            score,
            decided_ms,
            expires_ms: decided_ms.saturating_add(millis(offer.expires_after)),
            payload,
            escalations: 0,
            shared_with: Vec::new(),
            closed: None,
        }
    }

    /// The current payload; an error only if the stored text was damaged.
    pub fn payload(&self) -> Result<Map<String, Value>, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    /// Stores an escalated payload.
    pub fn set_payload(&mut self, payload: &Map<String, Value>) {
        // A map of JSON values always serializes.
        self.payload = serde_json::to_string(payload).unwrap_or_else(|_| self.payload.clone());
        self.escalations = self.escalations.saturating_add(1);
    }

    /// Open at `now_ms`: not closed and not past its expiry.
    pub fn is_open(&self, now_ms: i64) -> bool {
        self.closed.is_none() && now_ms < self.expires_ms
    }

    /// Closes with `outcome` if it is a closing one and the instance is
    /// still open; false otherwise (an answer after expiry, a second
    /// answer), so an instance closes exactly once.
    pub fn close(&mut self, outcome: Outcome, at_ms: i64) -> bool {
        if !outcome.closes() || self.closed.is_some() {
            return false;
        }
        if outcome != Outcome::Expired && at_ms >= self.expires_ms {
            return false;
        }
        self.closed = Some(Closed { outcome, at_ms });
        true
    }

    /// The expiry timer fired at `now_ms`: closes an instance nobody
    /// answered. True when it expired now.
    pub fn expire_if_due(&mut self, now_ms: i64) -> bool {
        now_ms >= self.expires_ms && self.close(Outcome::Expired, self.expires_ms)
    }

    /// Remembers a share with `friend` (at most [`MAX_SHARES`], each once,
    /// never the customer themself).
    pub fn record_share(&mut self, friend: &str, at_ms: i64) -> bool {
        if at_ms >= self.expires_ms
            || friend == self.customer
            || self.shared_with.len() >= MAX_SHARES
            || self.shared_with.iter().any(|f| f == friend)
        {
            return false;
        }
        self.shared_with.push(friend.to_owned());
        true
    }

    /// Whether `friend` accepting the same offer at `at_ms` earns this
    /// instance's customer the referral reward: shared with them, and
    /// within this instance's life. The caller removes the friend after
    /// crediting, so a reward is paid once.
    pub fn referral_due(&self, friend: &str, at_ms: i64) -> bool {
        at_ms < self.expires_ms && self.shared_with.iter().any(|f| f == friend)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use edge_config::{Channel, Contact};
    use serde_json::json;

    fn jersey() -> Offer {
        Offer {
            id: "team-a-jersey".to_owned(),
            version: 2,
            on: vec!["match.chance_missed".to_owned()],
            audience: None,
            consent: "marketing".to_owned(),
            value: 25.0,
            weight: None,
            channel: Channel::App,
            expires_after: Duration::from_secs(300),
            payload: BTreeMap::from([
                (
                    "title".to_owned(),
                    PayloadValue::String("Team A jersey -10%".to_owned()),
                ),
                ("discount".to_owned(), PayloadValue::Integer(10)),
                (
                    "extra".to_owned(),
                    PayloadValue::Array(vec![
                        PayloadValue::Float(0.5),
                        PayloadValue::Boolean(true),
                        PayloadValue::Table(BTreeMap::from([(
                            "k".to_owned(),
                            PayloadValue::String("v".to_owned()),
                        )])),
                    ]),
                ),
            ]),
            escalate: None,
            contact: Contact::default(),
            conversion: None,
            reward: BTreeMap::new(),
            referral: BTreeMap::new(),
            segment: None,
            file: "/srv/rules/offers.toml".into(),
            line: 1,
        }
    }

    fn open() -> OfferInstance {
        OfferInstance::open(
            &jersey(),
            payload_text(&jersey()),
            instance_id("arena-01", 7),
            "fan-1",
            "all",
            "match.chance_missed",
            3.75,
            1_000,
        )
    }

    #[test]
    fn ids_sort_in_the_order_they_were_given() {
        let ids: Vec<String> = [7, 9, 10, 99, 100, 85_435, 999_999_999_999]
            .iter()
            .map(|&n| instance_id("arena-01", n))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(ids[0], "arena-01.000000000007");
    }

    #[test]
    fn an_instance_carries_the_offer_and_its_payload() {
        let i = open();
        assert_eq!(i.id, "arena-01.000000000007");
        assert_eq!((i.offer.as_str(), i.version), ("team-a-jersey", 2));
        assert_eq!(i.expires_ms, 301_000);
        assert_eq!(
            Value::Object(i.payload().unwrap_or_default()),
            json!({
                "title": "Team A jersey -10%",
                "discount": 10,
                "extra": [0.5, true, { "k": "v" }]
            })
        );
        assert!(i.is_open(300_999));
        assert!(!i.is_open(301_000));
    }

    #[test]
    fn an_instance_closes_exactly_once() {
        let mut i = open();
        assert!(!i.close(Outcome::Clicked, 2_000));
        assert!(i.close(Outcome::Accepted, 2_000));
        assert!(!i.close(Outcome::Dismissed, 3_000));
        assert!(!i.expire_if_due(400_000));
        assert_eq!(i.closed.map(|c| c.outcome), Some(Outcome::Accepted));

        let mut late = open();
        // An answer after the expiry is too late; the timer closes it.
        assert!(!late.close(Outcome::Accepted, 301_000));
        assert!(!late.expire_if_due(300_999));
        assert!(late.expire_if_due(900_000));
        assert_eq!(
            late.closed,
            Some(Closed {
                outcome: Outcome::Expired,
                at_ms: 301_000
            })
        );
        assert!(!late.expire_if_due(900_001));
    }

    #[test]
    fn shares_are_tracked_for_referrals_within_the_life() {
        let mut i = open();
        assert!(i.record_share("friend", 2_000));
        assert!(!i.record_share("friend", 2_001));
        assert!(!i.record_share("fan-1", 2_001));
        // The sharer's own accept does not end the referral window.
        i.close(Outcome::Accepted, 3_000);
        assert!(i.referral_due("friend", 200_000));
        assert!(!i.referral_due("friend", 301_000));
        assert!(!i.referral_due("stranger", 200_000));
        for n in 0..100 {
            i.record_share(&format!("f{n}"), 4_000);
        }
        assert_eq!(i.shared_with.len(), MAX_SHARES);
    }

    #[test]
    fn escalated_payloads_are_stored() {
        let mut i = open();
        let mut p = i.payload().unwrap_or_default();
        p.insert("discount".to_owned(), json!(15));
        i.set_payload(&p);
        assert_eq!(i.escalations, 1);
        assert_eq!(i.payload().unwrap_or_default()["discount"], json!(15));
    }
}
