//! Faults under load: `kill -9` of the daemon, an uplink outage, a broker
//! restart and a PostgreSQL sink. Each ends with the same question: does
//! the central side hold every expected award exactly once?

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::Value;
use touchline_tests::mosquitto::Mosquitto;

async fn wait_for_awards(central_dir: &std::path::Path, expected: usize, within: Duration) -> bool {
    let dir = central_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        touchline_tests::wait_until(within, || {
            awards_at_central(&central_records(&dir))
                .values()
                .sum::<usize>()
                >= expected
        })
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_load_loses_and_duplicates_nothing() {
    kill_9_under_load("direct").await;
}

/// The same in `journal` mode, where each restart replays the events
/// applied since the last checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_journal_mode_replays_and_loses_and_duplicates_nothing() {
    kill_9_under_load("journal").await;
}

async fn kill_9_under_load(rule_state: &str) {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central = Central::start(
        &certs,
        &dir.path().join("central"),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let http_port = touchline_tests::free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            central: Some(central.addr),
            store: format!("rule_state = \"{rule_state}\"\ncheckpoint_interval = \"2s\"\n"),
            ..Default::default()
        },
    );
    let log = dir.path().join("daemon.log");
    let spawn = || spawn_touchline_run(&config, http_port, &log);
    let mut daemon = spawn();

    // The load: a fixed set of events posted by a client that retries each
    // batch until it is answered 202, while the daemon keeps dying.
    let events = workload(20_000, 400);
    let expected = expected_awards(&events);
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    let done = Arc::new(AtomicBool::new(false));
    let loader = {
        let events = events.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let result = post_all(&client, &url, &events, 200, Duration::from_secs(180)).await;
            done.store(true, Ordering::SeqCst);
            result
        })
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut kills = 0;
    while kills < 5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        daemon.kill9().expect("kill -9");
        kills += 1;
        daemon = spawn();
    }
    let retries = loader
        .await
        .unwrap()
        .expect("all events eventually accepted");
    assert!(done.load(Ordering::SeqCst));
    assert!(
        retries > 0,
        "the kills should have interrupted some requests"
    );

    assert!(
        wait_for_awards(&central.dir, expected.len(), Duration::from_secs(60)).await,
        "not every award arrived; daemon log:\n{}",
        daemon.log_text()
    );
    let records = central_records(&central.dir);
    assert_eq!(
        awards_at_central(&records),
        expected,
        "awards lost or duplicated"
    );
    assert_sequences_unique(&records);
    if rule_state == "journal" {
        assert!(
            daemon
                .log_text()
                .contains("journal replayed after an unclean stop"),
            "no restart replayed the journal"
        );
    }
    let status = daemon
        .terminate(Duration::from_secs(20))
        .expect("clean exit");
    assert!(status.success(), "SIGTERM exit: {status}");
    central.stop().await;
}

/// A site posting over HTTP to a real central receiver (JSONL sink) over
/// QUIC, both in `dir`.
struct SiteWithCentral {
    certs: std::path::PathBuf,
    central_dir: std::path::PathBuf,
    central: Central,
    daemon: touchline::app::Daemon,
    url: String,
}

async fn site_with_central(dir: &std::path::Path) -> SiteWithCentral {
    let certs = write_certs(dir);
    let central_dir = dir.join("central");
    let central = Central::start(&certs, &central_dir, "127.0.0.1:0".parse().unwrap()).await;
    let config = write_site_config(
        dir,
        &SiteOptions {
            http_port: Some(0),
            central: Some(central.addr),
            ..Default::default()
        },
    );
    let daemon = start_daemon(&config).await;
    let url = events_url(&daemon);
    SiteWithCentral {
        certs,
        central_dir,
        central,
        daemon,
        url,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_outage_queues_records_and_delivers_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let SiteWithCentral {
        certs,
        central_dir,
        central,
        daemon,
        url,
    } = site_with_central(dir.path()).await;
    let central_addr = central.addr;
    let client = reqwest::Client::new();
    let events = workload(12_000, 300);
    let expected = expected_awards(&events);
    // Tiers are reached throughout: the first tier before the outage, the
    // second mostly during it, the third after it.
    let (first, rest) = events.split_at(2_000);
    let (during, after) = rest.split_at(6_000);

    post_all(&client, &url, first, 250, Duration::from_secs(60))
        .await
        .unwrap();
    central.stop().await;
    post_all(&client, &url, during, 250, Duration::from_secs(60))
        .await
        .unwrap();
    // Nothing can leave while the central side is down: the outbox holds it.
    let queued = daemon.store().stats().outbox_records();
    assert!(queued > 0, "records should queue during the outage");
    let central = Central::start(&certs, &central_dir, central_addr).await;
    post_all(&client, &url, after, 250, Duration::from_secs(60))
        .await
        .unwrap();

    assert!(
        wait_for_awards(&central_dir, expected.len(), Duration::from_secs(60)).await,
        "not every award arrived after the outage"
    );
    let records = central_records(&central_dir);
    assert_eq!(awards_at_central(&records), expected);
    assert_sequences_unique(&records);
    assert!(daemon.uplink_state().reconnects() >= 1);
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
}

/// Waits until the outbox is empty and the central side holds the site's
/// last record.
async fn all_delivered(stats: &Arc<touchline::store::StoreStats>, central_dir: &Path) -> bool {
    let (stats, dir) = (stats.clone(), central_dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        touchline_tests::wait_until(Duration::from_secs(60), || {
            let last = central_records(&dir)
                .iter()
                .filter_map(|r| r["seq"].as_u64())
                .max();
            stats.outbox_records() == 0 && last == Some(stats.next_seq() - 1)
        })
    })
    .await
    .unwrap()
}

/// The central side's sequences are exactly 1, 2, … with nothing missing.
fn assert_sequences_contiguous(records: &[Value]) {
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "sequences with a hole or a repeat");
}

/// Award counts of several store histories (each the whole event stream
/// one store applied): `add` summed, each of `sub` taken out once (a past
/// two histories share, whose awards went out once).
fn awards_of(add: &[&[Value]], sub: &[&[Value]]) -> BTreeMap<(String, u64), usize> {
    let mut out: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for events in add {
        for (key, n) in expected_awards(events) {
            *out.entry(key).or_default() += n;
        }
    }
    for events in sub {
        for (key, n) in expected_awards(events) {
            let left = out.get(&key).copied().unwrap_or(0) - n;
            if left == 0 {
                out.remove(&key);
            } else {
                out.insert(key, left);
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A site rebuilt under its old id (a new disk, a wiped data directory)
/// starts a new store, numbering its records from 1 again. The central
/// side holds the old store's records under those numbers: the new
/// store's records must follow them, not be dropped as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_site_continues_after_the_central_mark_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let SiteWithCentral {
        certs,
        central_dir,
        central,
        daemon,
        url,
    } = site_with_central(dir.path()).await;
    let central_addr = central.addr;
    let client = reqwest::Client::new();
    let events = workload(4_000, 300);
    let (old, new) = events.split_at(2_000);

    post_all(&client, &url, old, 250, Duration::from_secs(60))
        .await
        .unwrap();
    let stats = daemon.store().stats();
    assert!(
        all_delivered(&stats, &central_dir).await,
        "old store's records"
    );
    let old_records = stats.next_seq() - 1;
    daemon.shutdown(Duration::from_secs(2)).await;

    // Rebuilt while the central side is down: the new store queues
    // records before its first session.
    central.stop().await;
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let daemon = start_daemon(&dir.path().join("site.toml")).await;
    let url = events_url(&daemon);
    post_all(&client, &url, new, 250, Duration::from_secs(60))
        .await
        .unwrap();
    let stats = daemon.store().stats();
    let queued = stats.outbox_records();
    assert!(queued > 0, "the new store should hold records");
    let central = Central::start(&certs, &central_dir, central_addr).await;

    assert!(
        all_delivered(&stats, &central_dir).await,
        "the new store's records never all arrived"
    );
    assert_eq!(daemon.uplink_state().rebases(), 1);
    let records = central_records(&central_dir);
    assert_sequences_contiguous(&records);
    assert_eq!(records.len() as u64, old_records + queued);
    assert_eq!(awards_at_central(&records), awards_of(&[old, new], &[]));
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
}

/// A store restored from a backup is behind the central side, which holds
/// what the original sent after the backup. The restored store's queued
/// records are the ones the original sent (same numbers, same content):
/// they are not sent twice, and its new records follow the central mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_a_backup_sends_nothing_twice_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let SiteWithCentral {
        certs,
        central_dir,
        central,
        daemon,
        url,
    } = site_with_central(dir.path()).await;
    let central_addr = central.addr;
    let config = dir.path().join("site.toml");
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");
    let client = reqwest::Client::new();
    let events = workload(8_000, 300);
    let (sent, rest) = events.split_at(2_000);
    let (queued, rest) = rest.split_at(2_000);
    let (original, restored) = rest.split_at(2_000);

    post_all(&client, &url, sent, 250, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(all_delivered(&daemon.store().stats(), &central_dir).await);
    // The backup is taken while records wait for the central side.
    central.stop().await;
    post_all(&client, &url, queued, 250, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(daemon.store().stats().outbox_records() > 0);
    daemon.shutdown(Duration::from_secs(2)).await;
    copy_dir(&data, &backup);

    // The original goes on: it sends what was queued and more.
    let central = Central::start(&certs, &central_dir, central_addr).await;
    let daemon = start_daemon(&config).await;
    let url = events_url(&daemon);
    post_all(&client, &url, original, 250, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(all_delivered(&daemon.store().stats(), &central_dir).await);
    daemon.shutdown(Duration::from_secs(2)).await;

    // Its disk fails; the backup is restored.
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&backup, &data);
    let daemon = start_daemon(&config).await;
    let url = events_url(&daemon);
    post_all(&client, &url, restored, 250, Duration::from_secs(60))
        .await
        .unwrap();
    let stats = daemon.store().stats();
    assert!(
        all_delivered(&stats, &central_dir).await,
        "the restored store's records never all arrived"
    );
    assert_eq!(daemon.uplink_state().rebases(), 1);
    let records = central_records(&central_dir);
    assert_sequences_contiguous(&records);
    // Two histories from one past: the shared part once, each branch's
    // own awards once.
    let past: Vec<Value> = [sent, queued].concat();
    let first: Vec<Value> = [&past, original].concat();
    let second: Vec<Value> = [&past, restored].concat();
    assert_eq!(
        awards_at_central(&records),
        awards_of(&[&first, &second], &[&past])
    );
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
}

/// A central side that loses records it had acknowledged (its file cut
/// short, a backup restored) must not stall the site: the site deleted
/// them on the ack, so it declares them a gap, counts them, and goes on
/// delivering everything after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_side_that_lost_acknowledged_records_gets_a_gap_not_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let SiteWithCentral {
        certs,
        central_dir,
        central,
        daemon,
        url,
    } = site_with_central(dir.path()).await;
    let central_addr = central.addr;
    let client = reqwest::Client::new();
    let events = workload(4_000, 100);
    let (first, after) = events.split_at(2_000);
    let stats = daemon.store().stats();

    post_all(&client, &url, first, 250, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        all_delivered(&stats, &central_dir).await,
        "the first records never all arrived"
    );
    central.stop().await;
    // The central side loses its last three records.
    let file = central_dir.join(format!("{SITE}.jsonl"));
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 3);
    let lost: Vec<u64> = lines[lines.len() - 3..]
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    std::fs::write(&file, lines[..lines.len() - 3].join("\n") + "\n").unwrap();

    let central = Central::start(&certs, &central_dir, central_addr).await;
    post_all(&client, &url, after, 250, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        all_delivered(&stats, &central_dir).await,
        "the site stalled behind the lost records"
    );
    assert_eq!(daemon.uplink_state().records_lost_centrally(), 3);
    let records = central_records(&central_dir);
    assert_sequences_unique(&records);
    let held: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert!(
        lost.iter().all(|s| !held.contains(s)),
        "lost for good: {lost:?}"
    );
    assert_eq!(
        held.len() as u64,
        stats.next_seq() - 1 - 3,
        "everything else, once"
    );
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
}

/// Publishes with QoS 1, re-publishing whatever was not acknowledged when
/// the broker goes away (what a real gateway does).
async fn publish_through_restarts(port: u16, events: Vec<Value>) {
    let mut next = 0;
    let mut attempt = 0;
    while next < events.len() {
        attempt += 1;
        assert!(attempt < 200, "publisher made no progress");
        let mut opts = MqttOptions::new(format!("e2e-gateway-{attempt}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_inflight(50);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let chunk_end = (next + 50).min(events.len());
        let chunk: Vec<String> = events[next..chunk_end]
            .iter()
            .map(Value::to_string)
            .collect();
        let publisher = {
            let client = client.clone();
            tokio::spawn(async move {
                for (i, e) in chunk.into_iter().enumerate() {
                    if client
                        .publish(
                            format!("venue/gate-{}/events", i % 3),
                            QoS::AtLeastOnce,
                            false,
                            e,
                        )
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            })
        };
        let mut acked = 0;
        let wanted = chunk_end - next;
        let ok = loop {
            match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                Ok(Ok(MqttEvent::Incoming(Packet::PubAck(_)))) => {
                    acked += 1;
                    if acked == wanted {
                        break true;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break false,
            }
        };
        publisher.abort();
        let _ = client.try_disconnect();
        if ok {
            next = chunk_end;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let mut broker = Mosquitto::start().expect("mosquitto");
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
    assert!(touchline_tests::wait_until(Duration::from_secs(10), || {
        daemon.ingest_stats().snapshot().mqtt_connected
    }));

    let events = workload(6_000, 150);
    let expected = expected_awards(&events);
    let port = broker.port;
    let publisher = tokio::spawn(publish_through_restarts(port, events));
    // Restart the broker twice while the gateway publishes.
    for _ in 0..2 {
        let stats = daemon.ingest_stats().clone();
        let before = stats.snapshot().received;
        let progressed = tokio::task::spawn_blocking(move || {
            touchline_tests::wait_until(Duration::from_secs(30), || {
                stats.snapshot().received > before + 1_000
            })
        })
        .await
        .unwrap();
        assert!(progressed, "no traffic before the restart");
        broker.restart().expect("broker restarts");
    }
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publisher finished in time")
        .unwrap();

    assert!(
        wait_for_awards(&central.dir, expected.len(), Duration::from_secs(60)).await,
        "not every award arrived after broker restarts"
    );
    let records = central_records(&central.dir);
    assert_eq!(awards_at_central(&records), expected);
    assert!(daemon.ingest_stats().snapshot().mqtt_reconnects() >= 2);
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sink_holds_each_award_once_across_central_restarts() {
    if std::env::var("TOUCHLINE_SKIP_PG").as_deref() == Ok("1") {
        eprintln!("skipped: TOUCHLINE_SKIP_PG=1");
        return;
    }
    let pg = touchline_tests::postgres::Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let sink = Arc::new(
        touchline_central::PostgresSink::connect(&pg.url())
            .await
            .expect("sink"),
    );
    let central =
        Central::start_with(&certs, sink, dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let central_addr = central.addr;
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(0),
            central: Some(central_addr),
            ..Default::default()
        },
    );
    let daemon = start_daemon(&config).await;
    let url = events_url(&daemon);
    let client = reqwest::Client::new();
    let events = workload(8_000, 200);
    let expected = expected_awards(&events);
    let (first, second) = events.split_at(4_000);
    post_all(&client, &url, first, 200, Duration::from_secs(60))
        .await
        .unwrap();
    central.stop().await;
    let sink = Arc::new(
        touchline_central::PostgresSink::connect(&pg.url())
            .await
            .expect("sink"),
    );
    let central = Central::start_with(&certs, sink, dir.path(), central_addr).await;
    post_all(&client, &url, second, 200, Duration::from_secs(60))
        .await
        .unwrap();

    let (db, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let want = expected.len() as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let row = db
            .query_one(
                "SELECT count(*) FROM touchline_records WHERE kind = 'achievement_awarded'",
                &[],
            )
            .await
            .unwrap();
        let n: i64 = row.get(0);
        if n >= want || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = db
        .query(
            "SELECT record FROM touchline_records WHERE site = $1 ORDER BY seq",
            &[&SITE],
        )
        .await
        .unwrap();
    let records: Vec<Value> = rows.iter().map(|r| r.get::<_, Value>(0)).collect();
    assert_eq!(awards_at_central(&records), expected);
    assert_sequences_unique(&records);
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
}

/// PostgreSQL cannot store U+0000, which a record can carry in a string
/// from event data (here an offer segment taken from a profile). Such a
/// record must be stored, altered, rather than fail its batch on every
/// retry and stall the site behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sink_stores_a_record_holding_a_nul_instead_of_stalling() {
    if std::env::var("TOUCHLINE_SKIP_PG").as_deref() == Ok("1") {
        eprintln!("skipped: TOUCHLINE_SKIP_PG=1");
        return;
    }
    use touchline_central::Sink;
    use touchline_proto::{CustomerErased, OfferDecision, Record, RecordBody};
    let pg = touchline_tests::postgres::Postgres::start().expect("PostgreSQL");
    let sink = touchline_central::PostgresSink::connect(&pg.url())
        .await
        .expect("sink");
    let record = |seq: u64, body: RecordBody| Record {
        site: SITE.into(),
        seq,
        at_ms: 1_700_000_000_000,
        body,
    };
    let decision = |seq: u64, customer: &str, segment: &str| {
        let body = RecordBody::OfferDecision(OfferDecision {
            customer: customer.into(),
            offer: "half-time-hotdog".into(),
            version: 1,
            instance: format!("i-{seq}"),
            trigger: "fan.cheer".into(),
            score: 0.5,
            control: false,
            segment: segment.into(),
            expires_ms: 1_700_000_600_000,
        });
        record(seq, body)
    };
    let batch = [
        decision(1, "fan-1", "home"),
        decision(2, "fan-1", "a\0b"),
        decision(3, "fan-1", "away"),
        decision(4, "x\0y", "home"),
    ];
    assert_eq!(sink.write(SITE, 0, &batch).await.unwrap(), 4);
    // An erasure of a customer stored altered finds the rows stored for
    // them, and its own write does not fail on the character either.
    let erasure = RecordBody::CustomerErased(CustomerErased {
        customer: "x\0y".into(),
    });
    assert_eq!(sink.write(SITE, 0, &[record(5, erasure)]).await.unwrap(), 5);
    assert_eq!(sink.last_durable(SITE).await.unwrap(), 5);

    let (db, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = db
        .query(
            "SELECT seq, record->>'segment' FROM touchline_records \
             WHERE site = $1 AND kind = 'offer_decision' ORDER BY seq",
            &[&SITE],
        )
        .await
        .unwrap();
    let segments: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        segments,
        [
            (1, "home".to_string()),
            (2, "a\u{FFFD}b".to_string()),
            (3, "away".to_string())
        ],
        "the erased customer's decision is gone"
    );
}

/// After `kill -9` in `journal` mode, the journal replays with the rules
/// that applied it, even when the rule file was edited in place (same id
/// and version) before the restart, or a reload took rules the file no
/// longer holds; the rules on disk apply from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_applies_the_journal_with_the_rules_that_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    let http_port = touchline_tests::free_port().unwrap();
    let admin_port = touchline_tests::free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            store: "rule_state = \"journal\"\ncheckpoint_interval = \"1h\"\n".into(),
            extra: format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"),
            ..Default::default()
        },
    );
    let log = dir.path().join("daemon.log");
    let spawn = || spawn_touchline_run(&config, http_port, &log);
    let base = format!("http://127.0.0.1:{http_port}");
    let client = reqwest::Client::new();
    let value = |client: reqwest::Client, base: String| async move {
        let progress: Value = client
            .get(format!("{base}/v1/customers/fan-1/progress"))
            .send()
            .await
            .expect("fan API answers")
            .json()
            .await
            .expect("progress is JSON");
        progress["rules"]
            .as_array()
            .and_then(|rules| rules.iter().find(|r| r["rule"] == "cheer-leader"))
            .map_or(0.0, |r| r["value"].as_f64().unwrap_or(0.0))
    };
    let url = format!("{base}/v1/events");

    let mut daemon = spawn();
    // Intensity 2 counts under the rule as first written.
    post_all(
        &client,
        &url,
        &[cheer(1, 1, 2), cheer(2, 1, 2)],
        10,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(value(client.clone(), base.clone()).await, 2.0);
    daemon.kill9().expect("kill -9");

    // Edited in place: intensity 2 no longer counts.
    let rules = dir.path().join("rules/e2e.toml");
    let edited = RULES.replace("data.intensity >= 2", "data.intensity >= 3");
    assert_ne!(edited, RULES);
    std::fs::write(&rules, &edited).unwrap();
    let mut daemon = spawn();
    assert_eq!(
        value(client.clone(), base.clone()).await,
        2.0,
        "the replay counted the journal's cheers under other rules; log:\n{}",
        daemon.log_text()
    );
    assert!(daemon
        .log_text()
        .contains("replays with the rules it was applied with"));
    // From here on the edited rule applies: only the intensity-3 cheer
    // counts, and it reaches the first tier (3).
    post_all(
        &client,
        &url,
        &[cheer(3, 1, 2), cheer(4, 1, 3)],
        10,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(value(client.clone(), base.clone()).await, 3.0);

    // A reload takes the first rule back; the file is edited again before
    // a crash. The journal written since the reload replays with the
    // reloaded rules, not with those on disk.
    std::fs::write(&rules, RULES).unwrap();
    let out = std::process::Command::new(touchline_bin())
        .args(["reload", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    post_all(
        &client,
        &url,
        &[cheer(5, 1, 2)],
        10,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(value(client.clone(), base.clone()).await, 4.0);
    daemon.kill9().expect("kill -9");
    std::fs::write(&rules, &edited).unwrap();
    let mut daemon = spawn();
    assert_eq!(
        value(client.clone(), base.clone()).await,
        4.0,
        "the replay did not apply the reloaded rules; log:\n{}",
        daemon.log_text()
    );
    let status = daemon
        .terminate(Duration::from_secs(20))
        .expect("clean exit");
    assert!(status.success(), "SIGTERM exit: {status}");
}

/// A slow link on loopback: a UDP relay that carries what the site sends
/// at `bytes_per_sec`, behind a router's bounded queue (a datagram that
/// would wait more than `MAX_QUEUE` is dropped, as a full queue drops
/// it), and what the peer answers at once.
struct SlowLink {
    addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SlowLink {
    const MAX_QUEUE: Duration = Duration::from_millis(300);

    async fn start(peer: std::net::SocketAddr, bytes_per_sec: f64) -> SlowLink {
        use tokio::net::UdpSocket;
        use tokio::time::Instant;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(peer).await.unwrap();
        let addr = front.local_addr().unwrap();
        let site = Arc::new(std::sync::Mutex::new(None));
        let (paced, mut due) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let upload = {
            let (front, site) = (front.clone(), site.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                let mut free_at = Instant::now();
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *site.lock().unwrap() = Some(from);
                    let now = Instant::now();
                    let start = free_at.max(now);
                    if start - now > Self::MAX_QUEUE {
                        continue;
                    }
                    free_at = start + Duration::from_secs_f64(n as f64 / bytes_per_sec);
                    if paced.send((free_at, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            })
        };
        let pacer = {
            let back = back.clone();
            tokio::spawn(async move {
                while let Some((at, datagram)) = due.recv().await {
                    tokio::time::sleep_until(at).await;
                    let _ = back.send(&datagram).await;
                }
            })
        };
        let download = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *site.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
        SlowLink {
            addr,
            tasks: vec![upload, pacer, download],
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A link too slow to carry a full batch within `uplink.request_timeout`
/// would time out on the same batch for good. Each timeout halves the
/// next batch, so the records still all arrive, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_too_slow_for_a_full_batch_still_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central_dir = dir.path().join("central");
    let central = Central::start(&certs, &central_dir, "127.0.0.1:0".parse().unwrap()).await;
    // 16 KiB/s: a batch of the default size (2,000 records, 1 MiB) takes
    // far longer than the 2 s the site gives it.
    let link = SlowLink::start(central.addr, 16.0 * 1024.0).await;
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(0),
            central: Some(link.addr),
            uplink: "request_timeout = \"2s\"\n".into(),
            ..Default::default()
        },
    );
    let daemon = start_daemon(&config).await;
    let url = events_url(&daemon);
    let client = reqwest::Client::new();
    // 600 awards (three tiers for each of 200 fans), about 130 KB of
    // records, queued before the site's first session gets through.
    let events = workload(8_000, 200);
    let expected = expected_awards(&events);
    assert_eq!(expected.len(), 600);
    post_all(&client, &url, &events, 500, Duration::from_secs(60))
        .await
        .unwrap();

    assert!(
        wait_for_awards(&central_dir, expected.len(), Duration::from_secs(120)).await,
        "not every award crossed the slow link: {} timeouts, next batch {} bytes",
        daemon.uplink_state().batch_timeouts(),
        daemon.uplink_state().batch_bytes()
    );
    let records = central_records(&central_dir);
    assert_eq!(awards_at_central(&records), expected);
    assert_sequences_unique(&records);
    let up = daemon.uplink_state();
    assert!(
        up.batch_timeouts() >= 1,
        "the first batches should time out"
    );
    assert!(up.batch_bytes() < 1 << 20);
    daemon.shutdown(Duration::from_secs(2)).await;
    central.stop().await;
    drop(link);
}
