//! The stadium scenario's next best action end to end, through the real
//! binary, a real Mosquitto and the real central receiver: a missed
//! chance offers the jersey to consenting Team A fans (control-group fans
//! are only recorded, others get nothing), a goal escalates the open
//! offers, an accept credits reward points, a friend's accept of a shared
//! offer credits the sharer, three dismissals stop an offer so the next
//! best one is shown, and unanswered offers expire, each exactly once,
//! with every decision and outcome at the central side.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use touchline::nba::control::ControlGroup;
use touchline_tests::mosquitto::Mosquitto;
use touchline_tests::process::ChildProcess;
use touchline_tests::{free_port, wait_for_port, wait_until};

/// The scenario's offers: the jersey beats the scarf on value, both for
/// fans of the team named by the trigger.
const OFFERS: &str = r#"
[[offer]]
id = "team-jersey"
on = ["match.chance_missed"]
audience = "profile.team == data.team"
consent = "marketing"
value = 25.0
weight = "data.minute > 80 ? 1.5 : 1.0"
expires_after = "12s"
payload = { title = "Team jersey -10%", discount = 10 }
escalate = { on = ["match.goal"], when = "data.team == profile.team", add = { discount = 5 }, max = { discount = 25 } }
contact = { stop_after_ignores = 3 }
reward = { points = { xp = 20 } }
referral = { points = { referral = 50 } }

[[offer]]
id = "team-scarf"
on = ["match.chance_missed"]
audience = "profile.team == data.team"
consent = "marketing"
value = 10
expires_after = "12s"
payload = { title = "Team scarf" }
"#;

/// No exploration and a confident prior, so the jersey's value decides;
/// a quarter of the fans are held out.
const NBA: &str = "[nba]\nmax_per_customer = \"100/1h\"\nquiet_after_accept = \"0s\"\n\
                   control_share = 0.25\ncontrol_salt = \"e2e\"\nexploration = 0\n\
                   prior = { alpha = 50, beta = 50 }\n";

fn event(id: &str, kind: &str, subject: Option<&str>, data: Value) -> Value {
    let mut e = json!({
        "specversion": "1.0",
        "id": id,
        "source": "e2e/nba",
        "type": kind,
        "data": data,
    });
    if let Some(s) = subject {
        e["subject"] = json!(s);
    }
    e
}

/// Messages of `kind` seen so far: customer → payloads in arrival order.
fn messages(seen: &Mutex<Vec<(String, Value)>>, kind: &str) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (topic, v) in seen.lock().unwrap().iter() {
        let customer = v["customer"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            topic,
            &format!("touchline/{SITE}/customers/{customer}/offers")
        );
        if v["kind"] == kind {
            out.entry(customer).or_default().push(v.clone());
        }
    }
    out
}

async fn wait(within: Duration, mut check: impl FnMut() -> bool + Send + 'static) -> bool {
    tokio::task::spawn_blocking(move || wait_until(within, &mut check))
        .await
        .unwrap()
}

fn records_of(dir: &Path, kind: &str) -> Vec<Value> {
    central_records(dir)
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stadium_scenario_offers_escalates_rewards_and_expires() {
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central_dir = dir.path().join("central");
    let central = Central::start(&certs, &central_dir, "127.0.0.1:0".parse().unwrap()).await;
    let http_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            mqtt_port: Some(broker.port),
            central: Some(central.addr),
            // This scenario runs in journal mode, so one end-to-end run
            // of the whole daemon covers it next to the direct-mode ones.
            store: "rule_state = \"journal\"\n".into(),
            extra: NBA.to_string(),
            ..Default::default()
        },
    );
    std::fs::write(dir.path().join("rules/offers.toml"), OFFERS).unwrap();
    let seen = subscribe_app(broker.port, "e2e-nba-app", "offers");
    let mut daemon = ChildProcess::spawn(
        &touchline_bin(),
        &["run", "--config", config.to_str().unwrap()],
        &dir.path().join("touchline.log"),
    )
    .unwrap();
    wait_for_port(http_port, Duration::from_secs(20)).unwrap();
    let base = format!("http://127.0.0.1:{http_port}");
    let url = format!("{base}/v1/events");
    let client = reqwest::Client::new();
    let post = |events: Vec<Value>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            post_all(&client, &url, &events, 50, Duration::from_secs(30))
                .await
                .unwrap();
        }
    };

    // The crowd: fans 1–16 support A (fan-1 without marketing consent),
    // 17–20 support B, fan-w supports C, fan-friend has no profile.
    let control = ControlGroup::new("e2e", 0.25);
    let mut profiles = Vec::new();
    for n in 1..=20 {
        let fan = format!("fan-{n}");
        let team = if n <= 16 { "A" } else { "B" };
        let consent = n != 1;
        profiles.push(event(
            &format!("profile-{n}"),
            "customer.profile",
            Some(&fan),
            json!({ "team": team, "consent": { "marketing": consent } }),
        ));
    }
    profiles.push(event(
        "profile-w",
        "customer.profile",
        Some("fan-w"),
        json!({ "team": "C", "consent": { "marketing": true } }),
    ));
    post(profiles).await;
    let team_a: Vec<String> = (2..=16).map(|n| format!("fan-{n}")).collect();
    let treated: BTreeSet<String> = team_a
        .iter()
        .filter(|f| !control.contains(f))
        .cloned()
        .collect();
    let held_out: BTreeSet<String> = team_a
        .iter()
        .filter(|f| control.contains(f))
        .cloned()
        .collect();
    assert!(
        treated.len() >= 3 && !held_out.is_empty(),
        "the salt must split the crowd: {treated:?} / {held_out:?}"
    );
    assert!(!control.contains("fan-w"), "fan-w must be treated");

    // Team A misses a close chance late in the match.
    post(vec![event(
        "chance-1",
        "match.chance_missed",
        None,
        json!({ "team": "A", "minute": 85 }),
    )])
    .await;
    let s = seen.clone();
    let want = treated.clone();
    assert!(
        wait(Duration::from_secs(20), move || messages(&s, "offer")
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
            == want)
        .await,
        "offers went to {:?}, want {treated:?}\n{}",
        messages(&seen, "offer").keys().collect::<Vec<_>>(),
        daemon.log_text()
    );
    let offers = messages(&seen, "offer");
    let instance_of = |fan: &str| -> String { offers[fan][0]["id"].as_str().unwrap().to_string() };
    for (fan, msgs) in &offers {
        let m = &msgs[0];
        assert_eq!(m["offer"], "team-jersey", "{fan}: the best offer wins");
        assert_eq!(m["payload"]["discount"], 10);
    }
    // The pull channel lists the same open instance.
    let fans: Vec<&String> = treated.iter().collect();
    let listed = get_json(&client, &format!("{base}/v1/customers/{}/offers", fans[0])).await;
    assert_eq!(listed["offers"][0]["id"], json!(instance_of(fans[0])));
    let nothing = get_json(&client, &format!("{base}/v1/customers/fan-1/offers")).await;
    assert_eq!(nothing["offers"], json!([]), "no consent, no offer");

    // A Team A goal raises every open jersey offer to 15 %.
    post(vec![event(
        "goal-1",
        "match.goal",
        None,
        json!({ "team": "A" }),
    )])
    .await;
    let s = seen.clone();
    let want = treated.clone();
    assert!(
        wait(Duration::from_secs(20), move || {
            let updates = messages(&s, "offer_updated");
            updates.keys().cloned().collect::<BTreeSet<_>>() == want
                && updates.values().all(|u| u[0]["payload"]["discount"] == 15)
        })
        .await,
        "escalations: {:?}\n{}",
        messages(&seen, "offer_updated"),
        daemon.log_text()
    );

    // One fan buys: reward points. Another shares with a friend who buys:
    // referral points for the sharer.
    let buyer = fans[0].clone();
    let sharer = fans[1].clone();
    post(vec![
        event(
            "accept-1",
            "offer.accepted",
            Some(&buyer),
            json!({ "instance": instance_of(&buyer) }),
        ),
        event(
            "share-1",
            "offer.shared",
            Some(&sharer),
            json!({ "instance": instance_of(&sharer), "friend": "fan-friend" }),
        ),
        event(
            "friend-accept-1",
            "offer.accepted",
            Some("fan-friend"),
            json!({ "instance": instance_of(&sharer) }),
        ),
        // A second accept of the same instance changes nothing.
        event(
            "accept-2",
            "offer.accepted",
            Some(&buyer),
            json!({ "instance": instance_of(&buyer) }),
        ),
    ])
    .await;
    let rewards = get_json(&client, &format!("{base}/v1/customers/{buyer}/rewards")).await;
    assert_eq!(rewards["points"]["xp"], 20, "{rewards}");
    let rewards = get_json(&client, &format!("{base}/v1/customers/{sharer}/rewards")).await;
    assert_eq!(rewards["points"]["referral"], 50, "{rewards}");
    let listed = get_json(&client, &format!("{base}/v1/customers/{buyer}/offers")).await;
    assert_eq!(listed["offers"], json!([]), "an accepted offer is closed");

    // A friend erased after a share leaves no trace in the sharer's offer:
    // the id coming back and accepting earns the sharer nothing.
    let sharer2 = fans[2].clone();
    post(vec![
        event(
            "share-2",
            "offer.shared",
            Some(&sharer2),
            json!({ "instance": instance_of(&sharer2), "friend": "fan-gone" }),
        ),
        event(
            "gone-erased",
            "customer.erased",
            Some("fan-gone"),
            json!({}),
        ),
        event(
            "gone-accept",
            "offer.accepted",
            Some("fan-gone"),
            json!({ "instance": instance_of(&sharer2) }),
        ),
    ])
    .await;
    let rewards = get_json(&client, &format!("{base}/v1/customers/{sharer2}/rewards")).await;
    assert!(rewards["points"].get("referral").is_none(), "{rewards}");

    // fan-w dismisses the jersey three times; the fourth moment shows the
    // next best offer instead.
    for round in 1..=4 {
        post(vec![event(
            &format!("w-chance-{round}"),
            "match.chance_missed",
            Some("fan-w"),
            json!({ "team": "C", "minute": 10 }),
        )])
        .await;
        let s = seen.clone();
        assert!(
            wait(Duration::from_secs(20), move || messages(&s, "offer")
                .get("fan-w")
                .is_some_and(|m| m.len() >= round))
            .await,
            "round {round}\n{}",
            daemon.log_text()
        );
        let shown = messages(&seen, "offer")["fan-w"][round - 1].clone();
        if round <= 3 {
            assert_eq!(shown["offer"], "team-jersey");
            post(vec![event(
                &format!("w-dismiss-{round}"),
                "offer.dismissed",
                Some("fan-w"),
                json!({ "instance": shown["id"] }),
            )])
            .await;
        } else {
            assert_eq!(shown["offer"], "team-scarf", "stopped after 3 ignores");
        }
    }

    // Unanswered offers expire (the sharer's too: sharing is no answer).
    let mut expiring: BTreeSet<String> = treated.clone();
    expiring.remove(&buyer);
    expiring.insert("fan-w".to_string());
    let d = central_dir.clone();
    let want = expiring.clone();
    assert!(
        wait(Duration::from_secs(60), move || records_of(
            &d,
            "offer_outcome"
        )
        .iter()
        .filter(|r| r["outcome"] == "expired")
        .map(|r| r["customer"].as_str().unwrap_or_default().to_string())
        .collect::<BTreeSet<_>>()
            == want)
        .await,
        "expiries at central: {:?}\n{}",
        records_of(&central_dir, "offer_outcome"),
        daemon.log_text()
    );
    let listed = get_json(&client, &format!("{base}/v1/customers/{sharer}/offers")).await;
    assert_eq!(listed["offers"], json!([]), "an expired offer is gone");

    // Central holds every decision and outcome once.
    let records = central_records(&central_dir);
    assert_sequences_unique(&records);
    let decisions = records_of(&central_dir, "offer_decision");
    let decided: BTreeMap<String, Vec<bool>> =
        decisions.iter().fold(BTreeMap::new(), |mut m, r| {
            m.entry(r["customer"].as_str().unwrap().to_string())
                .or_default()
                .push(r["control"].as_bool().unwrap());
            m
        });
    for fan in &treated {
        assert_eq!(decided[fan], [false], "{fan} treated once");
    }
    for fan in &held_out {
        assert_eq!(decided[fan], [true], "{fan} recorded as control");
        assert!(!offers.contains_key(fan), "{fan} is held out");
    }
    assert_eq!(decided["fan-w"], [false, false, false, false]);
    assert!(!decided.contains_key("fan-1"), "no marketing consent");
    for n in 17..=20 {
        assert!(!decided.contains_key(&format!("fan-{n}")), "team B");
    }
    let outcomes = records_of(&central_dir, "offer_outcome");
    let count = |outcome: &str| outcomes.iter().filter(|r| r["outcome"] == outcome).count();
    assert_eq!(count("accepted"), 1);
    assert_eq!(count("dismissed"), 3);
    assert_eq!(count("shared"), 2);
    assert_eq!(
        count("referred"),
        1,
        "not the friend erased after the share"
    );
    assert_eq!(count("expired"), expiring.len(), "each expiry once");
    let instances: BTreeSet<&str> = outcomes
        .iter()
        .filter(|r| r["outcome"] == "expired")
        .map(|r| r["instance"].as_str().unwrap())
        .collect();
    assert_eq!(instances.len(), expiring.len());

    // Stopping queues the last minute's offer statistics; they leave
    // with the next start.
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    let mut daemon = ChildProcess::spawn(
        &touchline_bin(),
        &["run", "--config", config.to_str().unwrap()],
        &dir.path().join("touchline.log"),
    )
    .unwrap();
    let d = central_dir.clone();
    assert!(
        wait(Duration::from_secs(30), move || !records_of(
            &d,
            "offer_stats"
        )
        .is_empty())
        .await,
        "offer statistics\n{}",
        daemon.log_text()
    );
    let stats = records_of(&central_dir, "offer_stats");
    let sum = |offer: &str, field: &str| -> u64 {
        stats
            .iter()
            .filter(|r| r["offer"] == offer)
            .map(|r| r[field].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(sum("team-jersey", "control"), held_out.len() as u64);
    assert_eq!(sum("team-jersey", "shown"), treated.len() as u64 + 3);
    assert_eq!(sum("team-jersey", "accepted"), 1);
    assert_eq!(sum("team-jersey", "dismissed"), 3);
    assert_eq!(sum("team-scarf", "shown"), 1);
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    central.stop().await;
}

/// Three offers expiring 2, 4 and 6 seconds after one moment each.
const TIMED_OFFERS: &str = r#"
[[offer]]
id = "two"
on = ["match.chance_missed"]
consent = "marketing"
value = 1
expires_after = "2s"

[[offer]]
id = "four"
on = ["match.corner"]
consent = "marketing"
value = 1
expires_after = "4s"

[[offer]]
id = "six"
on = ["match.card"]
consent = "marketing"
value = 1
expires_after = "6s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_timers_survive_kill_9_none_lost_none_expired_twice() {
    use rand::{Rng, SeedableRng};

    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central_dir = dir.path().join("central");
    let central = Central::start(&certs, &central_dir, "127.0.0.1:0".parse().unwrap()).await;
    let http_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            central: Some(central.addr),
            extra: "[nba]\ncontrol_share = 0\nmax_per_customer = \"10/1h\"\n".to_string(),
            ..Default::default()
        },
    );
    std::fs::write(dir.path().join("rules/offers.toml"), TIMED_OFFERS).unwrap();
    let log = dir.path().join("touchline.log");
    let spawn = || spawn_touchline_run(&config, http_port, &log);
    let mut daemon = spawn();
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    const FANS: usize = 300;
    let mut events: Vec<Value> = (0..FANS)
        .map(|n| {
            event(
                &format!("profile-{n}"),
                "customer.profile",
                Some(&format!("fan-{n}")),
                json!({ "consent": { "marketing": true } }),
            )
        })
        .collect();
    for kind in ["match.chance_missed", "match.corner", "match.card"] {
        events.push(event(kind, kind, None, json!({})));
    }
    post_all(&client, &url, &events, 100, Duration::from_secs(30))
        .await
        .unwrap();
    let committed = std::time::Instant::now();

    // Kill at random moments while the timers fall due, and once stay
    // down past the last expiry so it happens on start.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7173);
    while committed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        daemon.kill9().expect("kill -9");
        daemon = spawn();
    }
    daemon.kill9().expect("kill -9");
    let down = wait(Duration::from_secs(10), move || {
        committed.elapsed() > Duration::from_secs(7)
    })
    .await;
    assert!(down);
    let mut daemon = spawn();

    let want = 3 * FANS;
    let d = central_dir.clone();
    assert!(
        wait(Duration::from_secs(60), move || records_of(
            &d,
            "offer_outcome"
        )
        .len()
            >= want)
        .await,
        "expiries at central: {} of {want}\n{}",
        records_of(&central_dir, "offer_outcome").len(),
        daemon.log_text()
    );
    let records = central_records(&central_dir);
    assert_sequences_unique(&records);
    let decisions = records_of(&central_dir, "offer_decision");
    let decided: BTreeSet<String> = decisions
        .iter()
        .map(|r| r["instance"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(decisions.len(), want, "one decision per fan and offer");
    assert_eq!(decided.len(), want);
    let pairs: BTreeSet<(String, String)> = decisions
        .iter()
        .map(|r| {
            (
                r["customer"].as_str().unwrap().to_string(),
                r["offer"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(pairs.len(), want);
    let outcomes = records_of(&central_dir, "offer_outcome");
    assert!(outcomes.iter().all(|r| r["outcome"] == "expired"));
    let expired: BTreeMap<String, usize> = outcomes.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r["instance"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    assert!(
        expired.values().all(|&n| n == 1),
        "an instance expired twice"
    );
    assert_eq!(
        expired.keys().cloned().collect::<BTreeSet<_>>(),
        decided,
        "every instance expired, none lost"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    central.stop().await;
}
