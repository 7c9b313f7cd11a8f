//! The engine on its own, over an in-process table: cases that need a
//! particular mix of rules on one event type.

use std::path::{Path, PathBuf};

use edge_config::RuleBundle;
use serde_json::json;
use touchline_proto::{AchievementAwarded, RecordBody};

use super::table::MemoryTable;
use super::{Engine, Output, ProgressNote, Pseudonymizer};
use crate::event::Event;

const T0: i64 = 1_750_000_000_000;

fn bundle(rules: &str) -> RuleBundle {
    RuleBundle {
        achievements: edge_config::parse_rules(rules, Path::new("rules/test.toml")).unwrap(),
        offers: Vec::new(),
        voucher_pools: Vec::new(),
        timezone: Default::default(),
        files: vec![PathBuf::from("rules/test.toml")],
        sources: Vec::new(),
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

/// Every progress note and award `events` make, one commit per event.
fn run(rules: &str, events: &[Event]) -> (Vec<ProgressNote>, Vec<AchievementAwarded>) {
    let mut engine = Engine::new(&bundle(rules), Pseudonymizer::raw()).unwrap();
    let mut table = MemoryTable::new();
    let mut out = Output::default();
    let (mut notes, mut awarded) = (Vec::new(), Vec::new());
    for e in events {
        engine.begin();
        engine
            .apply(&mut table, e, None, T0 + 60_000, &mut out)
            .unwrap();
        engine.flush(&mut table).unwrap();
        engine.committed();
        notes.append(&mut out.progress);
        for r in out.records.drain(..) {
            if let RecordBody::AchievementAwarded(a) = r.body {
                awarded.push(a);
            }
        }
    }
    (notes, awarded)
}

/// (customer, rule) of every award `events` earn, in order.
fn awards(rules: &str, events: &[Event]) -> Vec<(String, String)> {
    let (_, awarded) = run(rules, events);
    awarded
        .into_iter()
        .map(|a| (a.customer, a.achievement))
        .collect()
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

#[test]
fn progress_notes_and_awards_name_the_same_rolling_instance() {
    // Notes name a rolling instance by its start, written only when
    // shown; the award of that instance must carry the same name.
    let rules = r#"
[[achievement]]
id = "busy"
name = "Busy"
on = ["shop.purchase"]
measure = "count"
window = "rolling:10m"
tiers = [ { at = 4, badge = "busy" } ]

[[achievement]]
id = "steady"
name = "Steady"
on = ["shop.purchase"]
measure = "count"
window = "lifetime"
tiers = [ { at = 4, badge = "steady" } ]
"#;
    let events: Vec<Event> = (1..=4)
        .map(|k| purchase(&format!("e{k}"), "fan-1", "", k * 1_000))
        .collect();
    let (notes, awarded) = run(rules, &events);
    let notes: Vec<(String, u8, String)> = notes
        .into_iter()
        .map(|n| (n.rule.to_string(), n.percent, n.window.to_string()))
        .collect();
    let award_windows: Vec<(String, String)> = awarded
        .into_iter()
        .map(|a| (a.achievement, a.window))
        .collect();
    let rolling = super::window::rolling_name(T0 + 1_000);
    let expected: Vec<(String, u8, String)> = [25, 50, 75]
        .into_iter()
        .flat_map(|p| {
            [
                ("busy".to_string(), p, rolling.clone()),
                ("steady".to_string(), p, "lifetime".to_string()),
            ]
        })
        .collect();
    assert_eq!(notes, expected);
    assert_eq!(
        award_windows,
        [
            ("busy".to_string(), rolling),
            ("steady".to_string(), "lifetime".to_string())
        ]
    );
}
