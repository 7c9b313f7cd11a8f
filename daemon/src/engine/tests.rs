//! The engine on its own, over an in-process table: cases that need a
//! particular mix of rules on one event type.

use std::path::{Path, PathBuf};

use edge_config::RuleBundle;
use serde_json::json;
use touchline_proto::RecordBody;

use super::table::MemoryTable;
use super::{Engine, Output, Pseudonymizer};
use crate::event::Event;

const T0: i64 = 1_750_000_000_000;

fn bundle(rules: &str) -> RuleBundle {
    RuleBundle {
        achievements: edge_config::parse_rules(rules, Path::new("rules/test.toml")).unwrap(),
        offers: Vec::new(),
        voucher_pools: Vec::new(),
        timezone: Default::default(),
        files: vec![PathBuf::from("rules/test.toml")],
    }
}

fn purchase(id: &str, buyer: &str, referrer: &str, at: i64) -> Event {
    Event {
        id: id.into(),
        source: "shop".into(),
        kind: "shop.purchase".into(),
        subject: Some(buyer.into()),
        time_ms: T0 + at,
        data: json!({ "referrer": referrer }),
    }
}

/// (customer, rule) of every award `events` earn, in order.
fn awards(rules: &str, events: &[Event]) -> Vec<(String, String)> {
    let mut engine = Engine::new(&bundle(rules), Pseudonymizer::raw()).unwrap();
    let mut table = MemoryTable::new();
    let mut out = Output::default();
    let mut awarded = Vec::new();
    for e in events {
        engine.begin();
        engine
            .apply(&mut table, e, None, T0 + 60_000, &mut out)
            .unwrap();
        engine.flush(&mut table).unwrap();
        engine.committed();
        out.progress.clear();
        for r in out.records.drain(..) {
            if let RecordBody::AchievementAwarded(a) = r.body {
                awarded.push((a.customer, a.achievement));
            }
        }
    }
    awarded
}

#[test]
fn a_referral_after_the_buyers_own_rule_credits_the_referrer() {
    // The buyer's own rule runs first and opens the buyer's record; the
    // referral that follows on the same event must reach the referrer's.
    let rules = r#"
[[achievement]]
id = "shopper"
name = "Shopper"
on = ["shop.purchase"]
measure = "count"
window = "lifetime"
tiers = [ { at = 1, badge = "shopper" } ]

[[achievement]]
id = "recruiter"
name = "Recruiter"
on = ["shop.purchase"]
measure = "count"
referral = { credit = "data.referrer" }
window = "lifetime"
tiers = [ { at = 2, badge = "recruiter" } ]
"#;
    let events = [
        purchase("e1", "buyer-1", "scout", 1),
        purchase("e2", "buyer-2", "scout", 2),
        purchase("e3", "buyer-1", "buyer-2", 3),
    ];
    let got = awards(rules, &events);
    let got: Vec<(&str, &str)> = got.iter().map(|(c, r)| (c.as_str(), r.as_str())).collect();
    assert_eq!(
        got,
        [
            ("buyer-1", "shopper"),
            ("buyer-2", "shopper"),
            ("scout", "recruiter")
        ]
    );
}
