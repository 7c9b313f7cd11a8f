//! Eligibility: which of a trigger's offers a customer may get, and the
//! segment and weight each is scored with.
//!
//! It is the costly part of a decision (up to three CEL evaluations per
//! offer), and a venue-wide trigger asks it for every present fan. Most
//! offers read only a few profile fields (`profile.team == data.team`),
//! so fans alike in those fields get the same answer for the same
//! trigger: [`Memo`] keys answers by the values of those fields and
//! evaluates once per kind of fan instead of once per fan.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::catalog::{Catalog, DEFAULT_SEGMENT};
use super::expr::{self, ExprError};
use crate::store::customers;

/// One eligible offer.
#[derive(Debug, Clone, PartialEq)]
pub struct Eligible {
    /// Index into the catalog's offers.
    pub offer: usize,
    pub segment: String,
    pub weight: f64,
}

/// An expression that failed for this customer; the offer was skipped
/// (or, for `segment`, scored in the default segment).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub offer: usize,
    pub field: &'static str,
    pub error: ExprError,
}

/// The answer for one customer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Eligibility {
    pub offers: Vec<Eligible>,
    pub failures: Vec<Failure>,
}

/// Evaluates consent, `audience`, `weight` and `segment` of the
/// `triggered` offers for one customer; `scope` holds the trigger and the
/// customer.
pub fn evaluate(
    catalog: &Catalog,
    scope: &cel::Context<'_, '_>,
    profile: &Map<String, Value>,
    triggered: &[usize],
) -> Eligibility {
    let mut answer = Eligibility::default();
    let mut failures = Vec::new();
    let fail = |offer, field, error| Failure {
        offer,
        field,
        error,
    };
    for &i in triggered {
        let c = &catalog.offers[i];
        if !customers::opted_in(profile, &c.offer.consent) {
            continue;
        }
        if let Some(a) = &c.audience {
            match a.eval_bool(scope) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    failures.push(fail(i, "audience", e));
                    continue;
                }
            }
        }
        let weight = match &c.weight {
            None => 1.0,
            Some(w) => match w.eval_f64(scope) {
                Ok(w) => w,
                Err(e) => {
                    failures.push(fail(i, "weight", e));
                    continue;
                }
            },
        };
        let segment = match &c.segment {
            None => DEFAULT_SEGMENT.to_owned(),
            Some(s) => s.eval_string(scope).unwrap_or_else(|e| {
                failures.push(fail(i, "segment", e));
                DEFAULT_SEGMENT.to_owned()
            }),
        };
        answer.offers.push(Eligible {
            offer: i,
            segment,
            weight,
        });
    }
    answer.failures = failures;
    answer
}

/// Stands in for an answer that is always there (see [`Memo::get`]).
static NOTHING: Eligibility = Eligibility {
    offers: Vec::new(),
    failures: Vec::new(),
};

/// Answers of one venue-wide trigger, by the values of the profile fields
/// that decide them.
pub struct Memo<'c> {
    fields: &'c [String],
    answers: HashMap<Vec<u8>, Eligibility>,
    key: Vec<u8>,
}

impl<'c> Memo<'c> {
    /// A memo for one trigger; `fields` from
    /// [`Catalog::deciding_fields`].
    pub fn new(fields: &'c [String]) -> Memo<'c> {
        Memo {
            fields,
            answers: HashMap::new(),
            key: Vec::new(),
        }
    }

    /// The answer for `profile`: remembered when a fan with the same
    /// deciding fields was asked before, else computed by `evaluate`
    /// (given the customer's scope) and remembered.
    pub fn get(
        &mut self,
        event_scope: &cel::Context<'_, '_>,
        profile: &Map<String, Value>,
        evaluate: impl FnOnce(&cel::Context<'_, '_>) -> Eligibility,
    ) -> &Eligibility {
        self.key.clear();
        for field in self.fields {
            // Each value as JSON, or a byte no JSON text starts with when
            // absent; JSON texts never contain a raw 0x1f, so the
            // separator keeps keys unambiguous.
            match profile.get(field) {
                Some(v) => {
                    // Writing JSON into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut self.key, v);
                }
                None => self.key.push(0x00),
            }
            self.key.push(0x1f);
        }
        if !self.answers.contains_key(&self.key) {
            // The memo serves only offers that read profile fields alone,
            // so no progress.
            let no_progress = Map::new();
            let scope = expr::customer_scope(event_scope, profile, &no_progress);
            self.answers.insert(self.key.clone(), evaluate(&scope));
        }
        self.answers.get(&self.key).unwrap_or(&NOTHING)
    }

    /// Distinct kinds of fan seen so far.
    pub fn kinds(&self) -> usize {
        self.answers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use edge_config::{parse_offers, NbaPolicy};
    use serde_json::json;

    fn catalog() -> Catalog {
        let offers = parse_offers(
            "[[offer]]\nid = \"home\"\non = [\"match.chance_missed\"]\nconsent = \"marketing\"\n\
             value = 1.0\nexpires_after = \"5m\"\naudience = \"profile.team == data.team\"\n\
             weight = \"has(profile.tier) && profile.tier == 'gold' ? 2.0 : 1.0\"\n\n\
             [[offer]]\nid = \"away\"\non = [\"match.chance_missed\"]\nconsent = \"marketing\"\n\
             value = 1.0\nexpires_after = \"5m\"\naudience = \"profile.team != data.team\"\n",
            std::path::Path::new("offers.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Catalog::new(&offers, &NbaPolicy::default(), "arena").unwrap_or_else(|e| panic!("{e}"))
    }

    fn profile(v: serde_json::Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn fans_alike_in_the_deciding_fields_share_one_evaluation() {
        let catalog = catalog();
        let fields = catalog
            .deciding_fields("match.chance_missed")
            .unwrap_or_else(|| panic!("only profile fields are read"));
        assert_eq!(fields, ["consent", "team", "tier"]);
        let event = Event {
            id: "t".into(),
            source: "venue".into(),
            kind: "match.chance_missed".into(),
            subject: None,
            time_ms: 0,
            data: json!({ "team": "A" }),
        };
        let scope = expr::event_scope(&catalog.root, &event);
        let triggered = catalog.triggered_by("match.chance_missed");
        let fans = [
            json!({ "team": "A", "name": "x", "consent": { "marketing": true } }),
            json!({ "team": "A", "name": "y", "consent": { "marketing": true } }),
            json!({ "team": "A", "tier": "gold", "consent": { "marketing": true } }),
            json!({ "team": "B", "consent": { "marketing": true } }),
            json!({ "team": "A", "consent": { "marketing": false } }),
            json!({ "consent": { "marketing": true } }),
        ];
        let mut memo = Memo::new(fields);
        let mut evaluations = 0;
        for fan in fans {
            let p = profile(fan);
            let none = Map::new();
            let direct = evaluate(
                &catalog,
                &expr::customer_scope(&scope, &p, &none),
                &p,
                triggered,
            );
            let remembered = memo
                .get(&scope, &p, |s| {
                    evaluations += 1;
                    evaluate(&catalog, s, &p, triggered)
                })
                .clone();
            assert_eq!(remembered, direct, "{p:?}");
        }
        // The first two differ only in `name`, which no offer reads.
        assert_eq!(evaluations, 5);
        assert_eq!(memo.kinds(), 5);
    }

    #[test]
    fn an_offer_reading_the_whole_profile_turns_the_memo_off() {
        let offers = parse_offers(
            "[[offer]]\nid = \"any\"\non = [\"match.goal\"]\nconsent = \"marketing\"\n\
             value = 1.0\nexpires_after = \"5m\"\naudience = \"size(profile) > 1\"\n",
            std::path::Path::new("offers.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let catalog =
            Catalog::new(&offers, &NbaPolicy::default(), "arena").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(catalog.deciding_fields("match.goal"), None);
    }
}
