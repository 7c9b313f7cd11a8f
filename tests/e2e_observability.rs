//! What an operator sees: `/metrics` counts what really happened,
//! `/healthz` and `/readyz` answer, `touchline status` reads the running
//! daemon and then the store once it is stopped, and every metric the
//! Grafana dashboard queries exists.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use touchline_tests::process::ChildProcess;
use touchline_tests::{free_port, wait_for_port};

/// One scrape, parsed: `name{labels}` → value, and the declared types.
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    panic!("malformed TYPE line: {line}");
                };
                types.insert(name.to_string(), kind.to_string());
            } else if line.starts_with('#') || line.is_empty() {
                continue;
            } else {
                let (series, value) = line.rsplit_once(' ').expect("sample has a value");
                let value: f64 = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
                };
                let name = series.split('{').next().unwrap();
                let family = family_of(name, &types);
                assert!(
                    types.contains_key(&family),
                    "sample {name} before its # TYPE"
                );
                samples.insert(series.to_string(), value);
            }
        }
        Scrape { samples, types }
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series}"))
    }
}

/// The family a sample belongs to (histograms add suffixes).
fn family_of(name: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).map(String::as_str) == Some("histogram") {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("request");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

async fn scrape(admin: &str) -> Scrape {
    let (code, text) = get(&format!("{admin}/metrics")).await;
    assert_eq!(code, 200);
    Scrape::parse(&text)
}

fn status_command(config: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(touchline_bin())
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_probes_status_and_dashboard_tell_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central = Central::start(
        &certs,
        &dir.path().join("central"),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let http_port = free_port().unwrap();
    let admin_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            central: Some(central.addr),
            extra: format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"),
            ..Default::default()
        },
    );
    let mut daemon = ChildProcess::spawn(
        &touchline_bin(),
        &["run", "--config", config.to_str().unwrap()],
        &dir.path().join("touchline.log"),
    )
    .unwrap();
    wait_for_port(admin_port, Duration::from_secs(20)).unwrap();
    wait_for_port(http_port, Duration::from_secs(20)).unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");

    assert_eq!(get(&format!("{admin}/healthz")).await.0, 200);
    let (code, body) = get(&format!("{admin}/readyz")).await;
    assert_eq!(code, 200, "{body}");

    // 40 valid cheers of intensity 3 for one fan (3 tiers: 3, 10, 25),
    // 5 of them sent twice, and 2 invalid events.
    let events: Vec<Value> = (0..40).map(|n| cheer(n, 1, 3)).collect();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    post_all(&client, &url, &events, 10, Duration::from_secs(30))
        .await
        .unwrap();
    post_all(&client, &url, &events[..5], 5, Duration::from_secs(30))
        .await
        .unwrap();
    let bad = json!([{ "specversion": "1.0", "id": "x", "source": "s" },
                     { "specversion": "0.3", "id": "y", "source": "s", "type": "t" }]);
    let r = client
        .post(&url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(bad.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error() || r.status().as_u16() == 202);

    // Wait until the uplink has delivered the three awards.
    let mut m = scrape(&admin).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while m.get("touchline_uplink_records_acked_total") < 3.0 {
        assert!(tokio::time::Instant::now() < until, "awards not acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape(&admin).await;
    }
    assert_eq!(m.get("touchline_events_received_total"), 47.0);
    assert_eq!(m.get("touchline_events_accepted_total"), 40.0);
    assert_eq!(m.get("touchline_events_duplicate_total"), 5.0);
    let rejected: f64 = m
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with("touchline_events_rejected_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(rejected, 2.0);
    assert_eq!(
        m.get("touchline_rule_awards_total{rule=\"cheer-leader\",version=\"1\"}"),
        3.0
    );
    assert_eq!(
        m.get("touchline_rule_matches_total{rule=\"cheer-leader\",version=\"1\"}"),
        40.0
    );
    assert_eq!(m.get("touchline_uplink_connected"), 1.0);
    assert_eq!(m.get("touchline_outbox_records"), 0.0);
    assert_eq!(m.get("touchline_uplink_records_acked_total"), 3.0);
    assert_eq!(m.get("touchline_ready"), 1.0);
    // Histograms: cumulative buckets ending in +Inf equal to the count.
    for h in [
        "touchline_store_commit_duration_seconds",
        "touchline_store_commit_events",
    ] {
        assert_eq!(m.types.get(h).map(String::as_str), Some("histogram"));
        let count = m.get(&format!("{h}_count"));
        assert!(count >= 1.0, "{h} observed nothing");
        assert_eq!(m.get(&format!("{h}_bucket{{le=\"+Inf\"}}")), count);
        let buckets: Vec<f64> = m
            .samples
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{h}_bucket{{")))
            .map(|(_, v)| *v)
            .collect();
        assert!(buckets.iter().all(|b| *b <= count));
    }
    // Events per commit: 45 non-rejected events over all event commits.
    assert_eq!(m.get("touchline_store_commit_events_sum"), 45.0);

    // The 40 new events' dedup keys reach the write-back environment
    // within a checkpoint interval or two, each written once.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while m.get("touchline_store_dedup_writeback_keys_total") < 40.0 {
        assert!(
            tokio::time::Instant::now() < until,
            "dedup keys not written back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape(&admin).await;
    }
    assert_eq!(m.get("touchline_store_dedup_writeback_keys_total"), 40.0);
    assert!(m.get("touchline_store_dedup_writeback_batches_total") >= 1.0);
    assert_eq!(
        m.types
            .get("touchline_store_writeback_wait_seconds_total")
            .map(String::as_str),
        Some("counter")
    );

    // Both LMDB environments report their map: a size, and a high-water
    // mark that the store's tables and the keys written back have raised
    // above nothing, within the size.
    for environment in ["store", "writeback"] {
        let size = m.get(&format!(
            "touchline_store_map_size_bytes{{environment=\"{environment}\"}}"
        ));
        let used = m.get(&format!(
            "touchline_store_map_used_bytes{{environment=\"{environment}\"}}"
        ));
        assert!(size >= 1024.0 * 1024.0, "{environment}: map size {size}");
        assert!(
            used > 0.0 && used <= size,
            "{environment}: {used} of {size}"
        );
    }
    assert_eq!(
        m.types
            .get("touchline_store_map_used_bytes")
            .map(String::as_str),
        Some("gauge")
    );

    // Every metric the dashboard queries is exposed.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../grafana/touchline.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("touchline_") {
                    queried.insert(family_of(word, &m.types));
                }
            }
        }
    }
    assert!(queried.len() >= 15, "dashboard queries {queried:?}");
    for name in &queried {
        assert!(
            m.types.contains_key(name),
            "dashboard queries unknown {name}"
        );
    }

    // `touchline status` from the running daemon, then from the store.
    let (ok, text) = status_command(&config);
    assert!(ok, "{text}");
    assert!(
        text.contains(SITE) && text.contains("cheer-leader"),
        "{text}"
    );
    assert!(!text.contains("not running"), "{text}");
    let store_line = text
        .lines()
        .find(|l| l.starts_with("store "))
        .unwrap_or_else(|| panic!("no store line in {text}"));
    assert!(
        store_line.contains("; store map ") && store_line.contains("; writeback map "),
        "{store_line}"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    let (ok, text) = status_command(&config);
    assert!(ok, "{text}");
    assert!(text.contains("not running"), "{text}");
    central.stop().await;
}
