//! The stadium scenario's achievements end to end: CloudEvents over HTTP
//! into the real daemon, awards over QUIC into the real central receiver.
//!
//! One daemon, one event history spread over three match days, and one
//! rule per kind of progress the engine keeps (distinct, sequence, streaks
//! over periods and days, group goals, sums with limits, referrals, rolling
//! and tumbling windows, max), each with fans who must and fans who must
//! not reach the tier.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use touchline_tests::wait_until;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

const RULES: &str = r#"
[[voucher_pool]]
id = "jersey"
codes = "jersey.txt"

[[achievement]]
id = "explorer"
name = "Explorer"
on = ["venue.zone.entered"]
measure = "distinct"
key = "data.zone"
window = "period"
tiers = [ { at = 5, badge = "explorer", points = { xp = 100 } } ]

[[achievement]]
id = "early-bird"
name = "Early bird"
measure = "sequence"
window = "period"
within = "2h"
steps = [ { on = ["ticket.scanned"] }, { on = ["concession.purchase"] }, { on = ["fan.cheer"] } ]
tiers = [ { at = 1, badge = "early-bird", points = { coins = 20 } } ]

[[achievement]]
id = "loyal"
name = "Loyal"
on = ["ticket.scanned"]
measure = "streak"
every = "period"
window = "lifetime"
tiers = [ { at = 3, badge = "loyal", points = { xp = 300 } } ]

[[achievement]]
id = "section-roar"
name = "Section roar"
on = ["fan.cheer"]
measure = "count"
scope = "group"
group_by = "profile.section"
min_contribution = 1
window = "period"
tiers = [ { at = 5, badge = "section-roar", points = { xp = 150 } } ]

[[achievement]]
id = "big-spender"
name = "Big spender"
on = ["concession.purchase"]
measure = "sum"
value = "data.amount"
limits = { max_value = 500.0, max_per_customer = "3/1h" }
window = "period"
tiers = [ { at = 100.0, badge = "spender", points = { coins = 10 } } ]

[[achievement]]
id = "recruiter"
name = "Recruiter"
on = ["shop.purchase"]
measure = "count"
referral = { credit = "data.referrer", max_per_referrer = "5/1d" }
window = "lifetime"
tiers = [ { at = 2, badge = "recruiter", points = { xp = 100 } } ]

[[achievement]]
id = "roar-burst"
name = "Roar burst"
on = ["fan.roar"]
measure = "count"
window = "rolling:10m"
sources = ["app/*"]
tiers = [ { at = 3, badge = "roar-burst", voucher = { template = "ROAR-{customer}-{n}" } } ]

[[achievement]]
id = "daily-fan"
name = "Daily fan"
on = ["app.opened"]
measure = "streak"
every = "day"
allow_gaps = 1
window = "lifetime"
tiers = [ { at = 3, badge = "daily-fan", points = { xp = 50 }, voucher = { pool = "jersey" } } ]

[[achievement]]
id = "quarter-hour"
name = "Busy quarter"
on = ["app.tapped"]
measure = "count"
window = "tumbling:15m"
tiers = [ { at = 2, badge = "busy" } ]

[[achievement]]
id = "loudest"
name = "Loudest"
on = ["fan.decibels"]
measure = "max"
value = "data.db"
window = "lifetime"
tiers = [ { at = 100, badge = "loud" }, { at = 120, badge = "deafening" } ]
"#;

struct History {
    base: i64,
    events: Vec<Value>,
}

impl History {
    fn add(&mut self, kind: &str, subject: Option<&str>, at: i64, data: Value) {
        self.add_from("e2e/app", kind, subject, at, data);
    }

    fn add_from(&mut self, source: &str, kind: &str, subject: Option<&str>, at: i64, data: Value) {
        let n = self.events.len();
        let mut e = json!({
            "specversion": "1.0",
            "id": format!("ev-{n}"),
            "source": source,
            "type": kind,
            "time": rfc3339(self.base + at),
            "data": data,
        });
        if let Some(s) = subject {
            e["subject"] = json!(s);
        }
        self.events.push(e);
    }

    fn period(&mut self, id: &str, start: i64, end: i64, during: impl FnOnce(&mut Self)) {
        self.add("venue.period.started", None, start, json!({ "period": id }));
        during(self);
        self.add("venue.period.ended", None, end, json!({ "period": id }));
    }
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn profile(h: &mut History, fan: &str, section: &str) {
    h.add(
        "customer.profile",
        Some(fan),
        0,
        json!({ "section": section }),
    );
}

/// The scenario's history, in the order it is sent.
fn scenario(base: i64) -> History {
    let mut h = History {
        base,
        events: Vec::new(),
    };
    for (fan, section) in [("s1", "101"), ("s2", "101"), ("s3", "101"), ("s4", "102")] {
        profile(&mut h, fan, section);
    }
    // Match 1: two hours on day 0.
    h.period("m1", HOUR, 3 * HOUR, |h| {
        // explorer: x1 visits five zones (one twice), x2 only four.
        for (i, zone) in ["a", "b", "a", "c", "d", "e"].iter().enumerate() {
            h.add(
                "venue.zone.entered",
                Some("x1"),
                HOUR + i as i64 * MIN,
                json!({ "zone": zone }),
            );
        }
        for (i, zone) in ["a", "b", "c", "d"].iter().enumerate() {
            h.add(
                "venue.zone.entered",
                Some("x2"),
                HOUR + i as i64 * MIN,
                json!({ "zone": zone }),
            );
        }
        // early-bird: q1 in order; q2 in the wrong order; q3 too slowly
        // for `within` (the match is long enough only in this test).
        h.add("ticket.scanned", Some("q1"), HOUR + MIN, json!({}));
        h.add(
            "concession.purchase",
            Some("q1"),
            HOUR + 2 * MIN,
            json!({ "amount": 5 }),
        );
        h.add("fan.cheer", Some("q1"), HOUR + 3 * MIN, json!({}));
        h.add("fan.cheer", Some("q2"), HOUR + MIN, json!({}));
        h.add(
            "concession.purchase",
            Some("q2"),
            HOUR + 2 * MIN,
            json!({ "amount": 5 }),
        );
        h.add("ticket.scanned", Some("q2"), HOUR + 3 * MIN, json!({}));
        h.add("ticket.scanned", Some("q3"), HOUR + MIN, json!({}));
        h.add(
            "concession.purchase",
            Some("q3"),
            HOUR + 2 * MIN,
            json!({ "amount": 5 }),
        );
        h.add(
            "fan.cheer",
            Some("q3"),
            HOUR + 3 * MIN + 2 * HOUR,
            json!({}),
        );
        // section-roar: section 101 cheers 5 times (s1 ×3, s2 ×2); s3 is
        // in the section but silent until after the goal; s4's section
        // cheers only 4 times.
        for (i, fan) in ["s1", "s2", "s1", "s2"].iter().enumerate() {
            h.add(
                "fan.cheer",
                Some(fan),
                HOUR + 10 * MIN + i as i64 * MIN,
                json!({}),
            );
        }
        for i in 0..4 {
            h.add(
                "fan.cheer",
                Some("s4"),
                HOUR + 10 * MIN + i * MIN,
                json!({}),
            );
        }
        h.add("fan.cheer", Some("s1"), HOUR + 20 * MIN, json!({}));
        h.add("fan.cheer", Some("s3"), HOUR + 30 * MIN, json!({}));
        // big-spender: b1 40 + 30 + (600: over max_value) + 50 = 120;
        // b2 spends 5 × 30 within an hour: only 3 count (90).
        for (i, amount) in [40, 30, 600, 50].iter().enumerate() {
            h.add(
                "concession.purchase",
                Some("b1"),
                HOUR + 40 * MIN + i as i64 * MIN,
                json!({ "amount": amount }),
            );
        }
        for i in 0..5 {
            h.add(
                "concession.purchase",
                Some("b2"),
                HOUR + 40 * MIN + i * MIN,
                json!({ "amount": 30 }),
            );
        }
        // loyal: l1 and l2 scan at match 1.
        h.add("ticket.scanned", Some("l1"), HOUR + 5 * MIN, json!({}));
        h.add("ticket.scanned", Some("l2"), HOUR + 5 * MIN, json!({}));
    });
    // Match 2 (day 1): only l1 comes.
    h.period("m2", DAY + HOUR, DAY + 3 * HOUR, |h| {
        h.add("ticket.scanned", Some("l1"), DAY + HOUR + MIN, json!({}));
    });
    // Too late for match 1 (its end plus 30 s lateness is long past the
    // watermark): x2's fifth zone must not count.
    h.add(
        "venue.zone.entered",
        Some("x2"),
        2 * HOUR,
        json!({ "zone": "e" }),
    );
    // Match 3 (day 2): both come; only l1 has three in a row.
    h.period("m3", 2 * DAY + HOUR, 2 * DAY + 3 * HOUR, |h| {
        h.add(
            "ticket.scanned",
            Some("l1"),
            2 * DAY + HOUR + MIN,
            json!({}),
        );
        h.add(
            "ticket.scanned",
            Some("l2"),
            2 * DAY + HOUR + MIN,
            json!({}),
        );
    });
    // recruiter: r1 brought two buyers; r2 only referred themself.
    h.add(
        "shop.purchase",
        Some("buyer-1"),
        2 * DAY + 4 * HOUR,
        json!({ "referrer": "r1" }),
    );
    h.add(
        "shop.purchase",
        Some("buyer-2"),
        2 * DAY + 4 * HOUR + MIN,
        json!({ "referrer": "r1" }),
    );
    h.add(
        "shop.purchase",
        Some("r2"),
        2 * DAY + 4 * HOUR + 2 * MIN,
        json!({ "referrer": "r2" }),
    );
    h.add(
        "shop.purchase",
        Some("r2"),
        2 * DAY + 4 * HOUR + 3 * MIN,
        json!({ "referrer": "r2" }),
    );
    // roar-burst: w1 roars 3 times within 10 minutes from the app; w2
    // roars 3 times but 11 minutes apart; w3 from a kiosk.
    for i in 0..3 {
        h.add_from(
            "app/ios",
            "fan.roar",
            Some("w1"),
            2 * DAY + 5 * HOUR + i * MIN,
            json!({}),
        );
        h.add_from(
            "app/ios",
            "fan.roar",
            Some("w2"),
            2 * DAY + 5 * HOUR + i * 11 * MIN,
            json!({}),
        );
        h.add_from(
            "kiosk/7",
            "fan.roar",
            Some("w3"),
            2 * DAY + 5 * HOUR + i * MIN,
            json!({}),
        );
    }
    // daily-fan: d1 opens the app on days 0, 2 and 3 (one gap allowed);
    // d2 on days 0 and 3.
    for day in [0, 2, 3] {
        h.add("app.opened", Some("d1"), day * DAY + 6 * HOUR, json!({}));
    }
    for day in [0, 3] {
        h.add("app.opened", Some("d2"), day * DAY + 6 * HOUR, json!({}));
    }
    // quarter-hour: t1 taps twice in each of two spans.
    for at in [0, MIN, 15 * MIN, 16 * MIN] {
        h.add("app.tapped", Some("t1"), 3 * DAY + 7 * HOUR + at, json!({}));
    }
    // loudest: a max; lower readings after the peak change nothing.
    for db in [90, 105, 101, 99] {
        h.add(
            "fan.decibels",
            Some("v1"),
            3 * DAY + 8 * HOUR + db * 1000,
            json!({ "db": db }),
        );
    }
    h
}

async fn get_json(client: &reqwest::Client, base_url: &str, path: &str) -> Value {
    client
        .get(format!("{base_url}{path}"))
        .send()
        .await
        .expect("fan API answers")
        .json()
        .await
        .expect("fan API answers JSON")
}

/// (customer, achievement) → windows in which the tier was awarded.
fn awards(records: &[Value]) -> BTreeMap<(String, String), Vec<(String, u64)>> {
    let mut out: BTreeMap<(String, String), Vec<(String, u64)>> = BTreeMap::new();
    for r in records {
        if r["kind"] == "achievement_awarded" {
            out.entry((
                r["customer"].as_str().unwrap().to_string(),
                r["achievement"].as_str().unwrap().to_string(),
            ))
            .or_default()
            .push((
                r["window"].as_str().unwrap().to_string(),
                r["tier"].as_u64().unwrap(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stadium_scenario_awards_exactly_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central_dir = dir.path().join("central");
    let central = Central::start(&certs, &central_dir, "127.0.0.1:0".parse().unwrap()).await;
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(0),
            central: Some(central.addr),
            ..Default::default()
        },
    );
    std::fs::write(dir.path().join("rules/stadium.toml"), RULES).unwrap();
    std::fs::write(
        dir.path().join("rules/jersey.txt"),
        "# jerseys\nJERSEY-001\n",
    )
    .unwrap();
    let daemon = start_daemon(&config).await;
    let base_url = format!("http://{}", daemon.http_addr().unwrap());
    let url = format!("{base_url}/v1/events");
    let client = reqwest::Client::new();

    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    // Five to six days back (max_age is 7 days), at midnight UTC, so days
    // and spans are predictable.
    let base = (now - 5 * DAY).div_euclid(DAY) * DAY;
    let history = scenario(base);
    // In order, a few events per request (the daemon commits each request
    // before answering, so arrival order is history order).
    post_all(&client, &url, &history.events, 7, Duration::from_secs(60))
        .await
        .expect("every event accepted");

    let want: BTreeMap<(String, String), Vec<(String, u64)>> = [
        ("x1", "explorer", vec![("period:m1", 1)]),
        ("q1", "early-bird", vec![("period:m1", 1)]),
        ("l1", "loyal", vec![("lifetime", 1)]),
        ("s1", "section-roar", vec![("period:m1", 1)]),
        ("s2", "section-roar", vec![("period:m1", 1)]),
        ("s3", "section-roar", vec![("period:m1", 1)]),
        ("b1", "big-spender", vec![("period:m1", 1)]),
        ("r1", "recruiter", vec![("lifetime", 1)]),
        ("d1", "daily-fan", vec![("lifetime", 1)]),
        ("v1", "loudest", vec![("lifetime", 1)]),
    ]
    .into_iter()
    .map(|(c, a, w)| {
        (
            (c.to_string(), a.to_string()),
            w.into_iter().map(|(w, t)| (w.to_string(), t)).collect(),
        )
    })
    .collect();
    let roar_window = format!("rolling:{}", rfc3339(base + 2 * DAY + 5 * HOUR));
    let spans = [
        format!("{}/15m", rfc3339(base + 3 * DAY + 7 * HOUR)),
        format!("{}/15m", rfc3339(base + 3 * DAY + 7 * HOUR + 15 * MIN)),
    ];
    let mut want = want;
    want.insert(("w1".into(), "roar-burst".into()), vec![(roar_window, 1)]);
    want.insert(
        ("t1".into(), "quarter-hour".into()),
        spans.iter().map(|s| (s.clone(), 1)).collect(),
    );
    let settled = wait_until(Duration::from_secs(30), || {
        awards(&central_records(&central_dir)) == want
    });
    let records = central_records(&central_dir);
    assert!(
        settled,
        "awards at central differ:\n got {:#?}\nwant {:#?}",
        awards(&records),
        want
    );

    // Per-rule counters: the late zone, the limited purchases, roars and
    // self-referrals.
    let stats = daemon.store().engine_stats();
    assert_eq!(stats.rule("explorer").unwrap().late(), 1);
    assert_eq!(stats.rule("big-spender").unwrap().limited(), 3);
    assert_eq!(stats.rule("roar-burst").unwrap().limited(), 3);
    assert_eq!(stats.rule("recruiter").unwrap().limited(), 2);
    // Fans without a section cannot be grouped: q1, q2 and q3's cheers.
    assert_eq!(stats.rule("section-roar").unwrap().predicate_errors(), 3);
    // (The shared seed rule's `when` reads `data.intensity`, which these
    // cheers lack: its errors are expected and not counted here.)
    let others: u64 = stats
        .rules()
        .iter()
        .filter(|r| r.id() != "section-roar" && r.id() != "cheer-leader")
        .map(|r| r.predicate_errors())
        .sum();
    assert_eq!(others, 0);

    // Period summaries: one per active customer and period, with what
    // they earned in it.
    let summaries: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "period_summary")
        .collect();
    let m1: BTreeSet<&str> = summaries
        .iter()
        .filter(|r| r["period"] == "m1")
        .map(|r| r["customer"].as_str().unwrap())
        .collect();
    for fan in [
        "x1", "x2", "q1", "q2", "q3", "s1", "s2", "s3", "s4", "b1", "b2", "l1", "l2",
    ] {
        assert!(m1.contains(fan), "{fan} has no m1 summary: {m1:?}");
    }
    let x1 = summaries
        .iter()
        .find(|r| r["period"] == "m1" && r["customer"] == "x1")
        .unwrap();
    assert_eq!(x1["badges"], json!(["explorer"]));
    let x2 = summaries
        .iter()
        .find(|r| r["period"] == "m1" && r["customer"] == "x2")
        .unwrap();
    assert_eq!(
        x2["progress"],
        json!([{ "rule": "explorer", "version": 1, "value": 4.0, "next_at": 5.0 }])
    );
    assert_eq!(
        summaries.iter().filter(|r| r["period"] == "m2").count(),
        1,
        "only l1 was at match 2"
    );

    // Vouchers: the pool's one code went to d1, the template made w1's.
    let rewards: Value = get_json(&client, &base_url, "/v1/customers/d1/rewards").await;
    assert_eq!(rewards["vouchers"][0]["code"], "JERSEY-001");
    assert_eq!(rewards["points"]["xp"], 50);
    let rewards: Value = get_json(&client, &base_url, "/v1/customers/w1/rewards").await;
    assert_eq!(rewards["vouchers"][0]["code"], "ROAR-w1-1");
    // The referrer is credited, never the buyer.
    let buyer: Value = get_json(&client, &base_url, "/v1/customers/buyer-1/rewards").await;
    assert_eq!(buyer["points"], json!({}));

    // Progress: l2's loyalty streak was broken (1 of 3); l1 has the tier
    // and no next one.
    let progress: Value = get_json(&client, &base_url, "/v1/customers/l2/progress").await;
    let loyal = progress["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "loyal")
        .unwrap();
    assert_eq!(loyal["value"], 1.0, "{loyal}");
    assert_eq!(loyal["next_at"], 3.0);
    assert_eq!(loyal["remaining"], 2.0);
    assert_eq!(loyal["window"], "lifetime");
    let progress: Value = get_json(&client, &base_url, "/v1/customers/l1/progress").await;
    let loyal = progress["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "loyal")
        .unwrap();
    assert_eq!(loyal["tiers_reached"], 1);
    assert_eq!(loyal["next_tier"], Value::Null);
    assert_eq!(loyal["rewards"][0]["badge"], "loyal");

    daemon.shutdown(Duration::from_secs(5)).await;
    central.stop().await;
}
