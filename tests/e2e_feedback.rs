//! Live feedback to the venue app: every tier reached, and every crossing
//! of 25/50/75 % of the next tier, is published on
//! `touchline/<site>/customers/<id>/progress` through a real Mosquitto,
//! at least once, including awards made while the broker was down.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::Value;
use touchline_tests::mosquitto::Mosquitto;
use touchline_tests::{free_port, wait_for_port, wait_until};

/// (customer, tier) → number of messages received for it.
fn tiers(seen: &Mutex<Vec<(String, Value)>>) -> BTreeMap<(String, u64), usize> {
    let mut out = BTreeMap::new();
    for (topic, v) in seen.lock().unwrap().iter() {
        let customer = v["customer"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            topic,
            &format!("touchline/{SITE}/customers/{customer}/progress")
        );
        if v["kind"] == "progress" {
            continue;
        }
        assert_eq!(v["kind"], "tier_reached");
        *out.entry((customer, v["tier"].as_u64().unwrap_or(0)))
            .or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tier_reached_is_published_even_across_a_broker_outage() {
    let mut broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            mqtt_port: Some(broker.port),
            ..Default::default()
        },
    );
    let seen = subscribe_app(broker.port, "e2e-app", "progress");
    let mut daemon = touchline_tests::process::ChildProcess::spawn(
        &touchline_bin(),
        &["run", "--config", config.to_str().unwrap()],
        &dir.path().join("touchline.log"),
    )
    .unwrap();
    wait_for_port(http_port, Duration::from_secs(20)).unwrap();
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    let client = reqwest::Client::new();

    // First half with the broker up.
    let events = workload(600, 20);
    let (first, second) = events.split_at(300);
    post_all(&client, &url, first, 50, Duration::from_secs(30))
        .await
        .unwrap();
    let expected_first = expected_awards(first);
    assert!(
        wait_until(Duration::from_secs(30), || tiers(&seen).len()
            >= expected_first.len()),
        "progress messages missing: got {}, want {}\n{}",
        tiers(&seen).len(),
        expected_first.len(),
        daemon.log_text()
    );

    // Second half while the broker is down: the awards commit, their
    // messages wait in the store and leave once it is back.
    broker.stop();
    post_all(&client, &url, second, 50, Duration::from_secs(30))
        .await
        .unwrap();
    broker.restart().expect("broker restarts");
    let expected = expected_awards(&events);
    assert!(
        wait_until(Duration::from_secs(60), || tiers(&seen).len()
            >= expected.len()),
        "progress messages missing after the outage: got {}, want {}\n{}",
        tiers(&seen).len(),
        expected.len(),
        daemon.log_text()
    );
    let got = tiers(&seen);
    assert_eq!(
        got.keys().collect::<BTreeSet<_>>(),
        expected.keys().collect::<BTreeSet<_>>(),
        "exactly the awarded tiers"
    );
    // Ids name the award, so an app can drop redelivered copies.
    let ids: BTreeSet<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["kind"] == "tier_reached")
        .map(|(_, v)| v["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids.len(), expected.len());
    // Progress notes: every fan who reached tier 2 (10 cheers) passed 75 %
    // of it (7.5) on the way, with no tier reached by that event.
    let notes: BTreeSet<(String, u64, u64)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["kind"] == "progress")
        .map(|(_, v)| {
            (
                v["customer"].as_str().unwrap_or_default().to_string(),
                v["percent"].as_u64().unwrap_or(0),
                v["next_at"].as_f64().unwrap_or(0.0) as u64,
            )
        })
        .collect();
    // The note names its window instance, in the payload and in its id.
    let windows: BTreeSet<(String, bool)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["kind"] == "progress")
        .map(|(_, v)| {
            let window = v["window"].as_str().unwrap_or_default().to_string();
            let in_id = v["id"]
                .as_str()
                .is_some_and(|id| id.contains(&format!(":{window}:")));
            (window, in_id)
        })
        .collect();
    assert_eq!(windows, BTreeSet::from([("lifetime".to_string(), true)]));
    for (customer, tier) in expected.keys() {
        if *tier == 2 {
            assert!(
                notes.contains(&(customer.clone(), 75, TIERS[1])),
                "{customer}: no 75 % note for tier 2 in {notes:?}"
            );
        }
    }
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
}
