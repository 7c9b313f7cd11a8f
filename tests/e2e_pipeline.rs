//! The whole path of an event with real peers: Mosquitto → daemon (LMDB)
//! → QUIC with mTLS → central JSONL, and what bad input does to it.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use touchline::ingest::RejectReason;
use touchline_tests::mosquitto::Mosquitto;

/// Publishes every event with QoS 1 and waits for all PUBACKs.
async fn publish_all(port: u16, events: &[Value]) {
    let mut opts = MqttOptions::new("e2e-publisher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let total = events.len();
    let poller = tokio::spawn(async move {
        let mut acked = 0;
        while acked < total {
            match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
                Ok(Ok(MqttEvent::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("publisher connection failed: {e}"),
                Err(_) => panic!("no progress publishing for 30 s ({acked}/{total} acked)"),
            }
        }
    });
    for (i, e) in events.iter().enumerate() {
        client
            .publish(
                format!("venue/gate-{}/events", i % 4),
                QoS::AtLeastOnce,
                false,
                e.to_string(),
            )
            .await
            .expect("publish queued");
    }
    poller.await.expect("all publishes acknowledged");
    let _ = client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_events_become_exactly_one_award_each_at_the_central_sink() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let broker = Mosquitto::start().expect("mosquitto");
    let central = Central::start(
        &certs,
        &dir.path().join("central"),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            mqtt_port: Some(broker.port),
            central: Some(central.addr),
            ..Default::default()
        },
    );
    let daemon = start_daemon(&config).await;
    assert!(
        touchline_tests::wait_until(Duration::from_secs(10), || daemon
            .ingest_stats()
            .snapshot()
            .mqtt_connected),
        "daemon did not connect to the broker"
    );

    let events = workload(2_000, 50);
    let expected = expected_awards(&events);
    publish_all(broker.port, &events).await;
    // Publish a few again: a device resending must not award twice.
    publish_all(broker.port, &events[..100]).await;

    let central_dir = central.dir.clone();
    let delivered = tokio::task::spawn_blocking(move || {
        touchline_tests::wait_until(Duration::from_secs(30), || {
            awards_at_central(&central_records(&central_dir)).len() >= expected.len()
        })
    });
    assert!(
        delivered.await.unwrap(),
        "awards did not reach the central sink"
    );
    let records = central_records(&central.dir);
    assert_eq!(awards_at_central(&records), expected_awards(&events));
    assert_sequences_unique(&records);
    let first = &records[0];
    assert_eq!(first["site"], SITE);
    assert!(first["at"].as_str().unwrap().ends_with('Z'));
    assert!(first["points"]["xp"].as_i64().unwrap() > 0);
    assert_eq!(first["version"], 1);

    assert!(touchline_tests::wait_until(
        Duration::from_secs(10),
        || daemon.ingest_stats().snapshot().duplicates >= 100
    ));
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_counted_and_kept_without_hurting_valid_events() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(0),
            ..Default::default()
        },
    );
    let daemon = start_daemon(&config).await;
    let url = events_url(&daemon);
    let client = reqwest::Client::new();
    let post = |ct: &'static str, body: Vec<u8>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let resp = client
                .post(&url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            (status, body)
        }
    };
    const ONE: &str = "application/cloudevents+json";
    const BATCH: &str = "application/cloudevents-batch+json";

    // Truncated JSON, invalid UTF-8, oversized event: refused one by one.
    let (status, _) = post(
        ONE,
        br#"{"specversion":"1.0","id":"t1","source":"s","ty"#.to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    let mut bad_utf8 =
        br#"{"specversion":"1.0","id":"u1","source":"s","type":"fan.cheer","subject":"fan-"#
            .to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(br#""}"#);
    let (status, _) = post(ONE, bad_utf8).await;
    assert_eq!(status, 400);
    let big = json!({"specversion":"1.0","id":"big","source":"s","type":"fan.cheer","subject":"fan-1",
        "data": {"blob": "x".repeat(70 * 1024)}});
    let (status, _) = post(ONE, big.to_string().into_bytes()).await;
    assert!(
        status == 400 || status == 413,
        "oversized event answered {status}"
    );

    // A batch mixing valid events with every kind of invalid one.
    let far_future = "2999-01-01T00:00:00Z";
    let batch = json!([
        cheer(1, 1, 3),
        {"specversion":"1.0","source":"s","type":"fan.cheer","subject":"fan-1"},
        {"specversion":"1.0","id":"no-subject","source":"s","type":"fan.cheer"},
        {"specversion":"1.0","id":42,"source":"s","type":"fan.cheer","subject":"fan-1"},
        {"specversion":"1.0","id":"future","source":"s","type":"fan.cheer","subject":"fan-1","time":far_future},
        cheer(2, 1, 3),
        cheer(3, 1, 3),
    ]);
    let (status, body) = post(BATCH, batch.to_string().into_bytes()).await;
    assert_eq!(status, 202, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("batch answer is JSON");
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["rejected"], 4, "{answer}");
    let reasons: Vec<&str> = answer["results"]
        .as_array()
        .expect("per-event results")
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        [
            "missing_attribute",
            "missing_subject",
            "wrong_type",
            "time_in_future"
        ]
    );

    // Requests refused whole: a body of another type, an empty batch.
    let (status, body) = post("text/plain", cheer(7, 1, 3).to_string().into_bytes()).await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("unsupported_media_type"), "{body}");
    let (status, body) = post(BATCH, b"[ ]".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("empty_batch"), "{body}");

    // 10,000 copies of one event: one takes effect.
    let dup = cheer(99, 2, 3);
    let copies = Value::Array(vec![dup; 10_000]);
    let (status, _) = post(BATCH, copies.to_string().into_bytes()).await;
    assert_eq!(status, 202);

    // Still serving: a fresh valid event commits.
    let (status, _) = post(ONE, cheer(100, 3, 3).to_string().into_bytes()).await;
    assert_eq!(status, 202);

    let stats = daemon.ingest_stats().snapshot();
    assert_eq!(
        stats.accepted, 5,
        "3 batch events + 1 of the copies + 1 fresh"
    );
    assert_eq!(stats.duplicates, 9_999);
    assert!(stats.rejected_total() >= 9);
    for reason in [RejectReason::UnsupportedMediaType, RejectReason::EmptyBatch] {
        assert_eq!(stats.rejected_for(reason), 1, "{reason}");
    }
    // fan-1 sent three cheers: the first tier is reached exactly once.
    assert_eq!(daemon.store().stats().records_appended(), 1);
    daemon.shutdown(Duration::from_millis(100)).await;

    // The dead-letter store kept samples with reasons, readable by the CLI.
    let out = std::process::Command::new(touchline_bin())
        .args(["dlq", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    for reason in [
        "invalid_json",
        "invalid_utf8",
        "missing_subject",
        "time_in_future",
    ] {
        assert!(listing.contains(reason), "dlq lacks {reason}:\n{listing}");
    }
}

#[test]
fn check_names_file_line_and_field_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_site_config(dir.path(), &SiteOptions::default());
    let ok = std::process::Command::new(touchline_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    std::fs::write(
        dir.path().join("rules/bad.toml"),
        "[[achievement]]\nid = \"x\"\nname = \"X\"\non = [\"a\"]\nmeasure = \"count\"\nwindow = \"lifetime\"\ntiers = [ { at = 5 }, { at = 2 } ]\n",
    )
    .unwrap();
    let bad = std::process::Command::new(touchline_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bad.toml:7"), "{err}");
    assert!(err.contains("tiers"), "{err}");
}
