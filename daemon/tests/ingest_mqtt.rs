//! MQTT ingest against a real Mosquitto on a free loopback port: QoS 1
//! events are committed and then acknowledged, bad messages never block
//! good ones, a refusing store holds acks without losing anything, and a
//! broker restart mid-stream loses nothing.
//!
//! "Acknowledged" is checked from the broker's side: after a run ends, a
//! new run with the same client id gets a fresh sentinel and nothing else,
//! so the broker had no un-acked message left for the session.
//!
//! The store is an in-memory `EventSink` that dedups by (source, id) like
//! the real one, so a redelivered message commits once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use touchline::event::{DeadLetter, Event, EventOutcome, SubmitError};
use touchline::ingest::{mqtt, EventSink, IngestStats, MqttError, RejectReason};
use touchline_tests::mosquitto::Mosquitto;

/// The store stand-in: commits in memory, dedups by (source, id), refuses
/// with `OutboxFull` while `refuse` is set, and takes `delay_ms` per
/// submission to stand in for commit latency.
#[derive(Clone, Default)]
struct MemorySink {
    inner: Arc<SinkInner>,
}

#[derive(Default)]
struct SinkInner {
    state: Mutex<SinkState>,
    refuse: AtomicBool,
    refusals: AtomicU64,
    delay_ms: AtomicU64,
}

#[derive(Default)]
struct SinkState {
    seen: HashSet<(String, String)>,
    committed: Vec<Event>,
    duplicates: u64,
    dead: Vec<DeadLetter>,
}

impl MemorySink {
    /// Committed ids, probes left out.
    fn ids(&self) -> Vec<String> {
        let state = self.inner.state.lock().unwrap();
        state
            .committed
            .iter()
            .filter(|e| !e.id.starts_with("probe-"))
            .map(|e| e.id.clone())
            .collect()
    }

    fn count(&self) -> usize {
        self.ids().len()
    }

    fn has(&self, id: &str) -> bool {
        let state = self.inner.state.lock().unwrap();
        state.committed.iter().any(|e| e.id == id)
    }

    fn has_probe(&self) -> bool {
        let state = self.inner.state.lock().unwrap();
        state.committed.iter().any(|e| e.id.starts_with("probe-"))
    }
}

impl EventSink for MemorySink {
    async fn submit(&self, events: Vec<Event>) -> Result<Vec<EventOutcome>, SubmitError> {
        if self.inner.refuse.load(Ordering::SeqCst) {
            self.inner.refusals.fetch_add(1, Ordering::SeqCst);
            return Err(SubmitError::OutboxFull);
        }
        let delay = self.inner.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mut state = self.inner.state.lock().unwrap();
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            if state.seen.insert((event.source.clone(), event.id.clone())) {
                state.committed.push(event);
                outcomes.push(EventOutcome::Committed { records: 0 });
            } else {
                state.duplicates += 1;
                outcomes.push(EventOutcome::Duplicate);
            }
        }
        Ok(outcomes)
    }

    async fn dead_letter(&self, samples: Vec<DeadLetter>) {
        let mut state = self.inner.state.lock().unwrap();
        state.dead.extend(samples);
        let excess = state.dead.len().saturating_sub(1000);
        state.dead.drain(..excess);
    }
}

fn validation() -> edge_config::Validation {
    edge_config::Validation {
        max_event_size: 4 * 1024,
        max_future_skew: Duration::from_secs(300),
        max_age: Duration::from_secs(7 * 24 * 3600),
        dedup_retention: Duration::from_secs(24 * 3600),
        venue_types: vec!["venue.*".into(), "match.*".into()],
        dlq_max: 1000,
    }
}

fn mqtt_config(port: u16, client_id: &str) -> edge_config::Mqtt {
    edge_config::Mqtt {
        host: "127.0.0.1".into(),
        port,
        client_id: client_id.into(),
        topics: vec!["test/+/events".into()],
        max_packet_size: 256 * 1024,
        keep_alive: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        inflight: 1000,
    }
}

/// MQTT ingest under test, running in its own task.
struct Daemon {
    stats: Arc<IngestStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), MqttError>>,
}

impl Daemon {
    fn start(port: u16, client_id: &str, sink: &MemorySink) -> Daemon {
        let stats = Arc::new(IngestStats::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mqtt::run(
            mqtt_config(port, client_id),
            validation(),
            sink.clone(),
            Arc::clone(&stats),
            async move {
                let _ = stopped.await;
            },
        ));
        Daemon {
            stats,
            stop: Some(stop),
            task,
        }
    }

    /// Graceful shutdown: commits in hand are acked, then DISCONNECT.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("MQTT ingest did not stop within 15 s");
        assert_eq!(result.unwrap(), Ok(()));
        assert!(!self.stats.snapshot().mqtt_connected);
    }
}

/// A test publisher: persistent session and QoS 1, so what it published
/// reaches the broker even across a broker restart.
struct Publisher {
    client: AsyncClient,
    task: JoinHandle<()>,
    acked: Arc<AtomicU64>,
}

impl Publisher {
    fn start(port: u16, client_id: &str) -> Publisher {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1024 * 1024, 1024 * 1024)
            .set_inflight(200);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let acked = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&acked);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    // Reconnect backoff, not synchronisation.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Publisher {
            client,
            task,
            acked,
        }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn event(id: &str, customer: usize) -> Vec<u8> {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "test/app",
        "type": "fan.cheer",
        "subject": format!("c-{customer}"),
        "data": {"intensity": 2},
    })
    .to_string()
    .into_bytes()
}

fn topic(i: usize) -> String {
    format!("test/{}/events", i % 7)
}

/// Polls `check` every 20 ms until it holds or `within` passes.
async fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes venue-wide probes until one arrives: the subscription is in
/// place (messages published before it would not be kept for us).
async fn wait_subscribed(publisher: &Publisher, sink: &MemorySink) {
    for k in 0..100 {
        let probe = json!({"specversion": "1.0", "id": format!("probe-{k}"),
                           "source": "test/probe", "type": "venue.probe"});
        publisher
            .publish("test/probe/events", probe.to_string().into_bytes())
            .await;
        if wait_until(Duration::from_millis(200), || sink.has_probe()).await {
            return;
        }
    }
    panic!("the subscription never delivered a probe");
}

async fn start_broker() -> Mosquitto {
    tokio::task::spawn_blocking(Mosquitto::start)
        .await
        .unwrap()
        .expect("starting mosquitto")
}

/// Runs ingest again under the same client id with a fresh store and
/// checks that the broker redelivers nothing before a new sentinel: every
/// message of the earlier runs was acknowledged.
async fn assert_all_acked(broker: &Mosquitto, client_id: &str, publisher: &Publisher) {
    let sink = MemorySink::default();
    let daemon = Daemon::start(broker.port, client_id, &sink);
    let stats = Arc::clone(&daemon.stats);
    assert!(
        wait_until(Duration::from_secs(10), || stats.snapshot().mqtt_connected).await,
        "{}",
        broker.log_text()
    );
    // The session (and its subscription) survived; the sentinel queues
    // behind anything the broker still had to redeliver.
    publisher
        .publish("test/0/events", event("sentinel", 0))
        .await;
    assert!(
        wait_until(Duration::from_secs(10), || sink.has("sentinel")).await,
        "sentinel not delivered: {:?}",
        stats.snapshot()
    );
    assert_eq!(
        sink.ids(),
        ["sentinel"],
        "the broker redelivered messages of the earlier run: they were not acked"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_events_are_committed_then_acked() {
    let broker = start_broker().await;
    let sink = MemorySink::default();
    let daemon = Daemon::start(broker.port, "touchline-basic", &sink);
    let publisher = Publisher::start(broker.port, "publisher-basic");
    wait_subscribed(&publisher, &sink).await;

    const N: usize = 2_000;
    for i in 0..N {
        publisher
            .publish(&topic(i), event(&format!("e-{i}"), i % 50))
            .await;
    }
    assert!(
        wait_until(Duration::from_secs(30), || sink.count() == N).await,
        "committed {} of {N}: {:?}",
        sink.count(),
        daemon.stats.snapshot()
    );
    let ids: HashSet<String> = sink.ids().into_iter().collect();
    assert_eq!(ids.len(), N);
    assert!((0..N).all(|i| ids.contains(&format!("e-{i}"))));
    let s = daemon.stats.snapshot();
    assert!(s.mqtt_connected);
    assert_eq!(s.mqtt_connects, 1);
    assert_eq!(s.rejected_total(), 0);
    assert_eq!(s.duplicates, 0);
    assert_eq!(s.accepted, s.received);

    daemon.stop().await;
    assert_all_acked(&broker, "touchline-basic", &publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_do_not_block_valid_ones() {
    let broker = start_broker().await;
    let sink = MemorySink::default();
    let daemon = Daemon::start(broker.port, "touchline-invalid", &sink);
    let publisher = Publisher::start(broker.port, "publisher-invalid");
    wait_subscribed(&publisher, &sink).await;

    let mut invalid_utf8 =
        br#"{"specversion":"1.0","id":"u","source":"s","type":"fan.cheer","subject":""#.to_vec();
    invalid_utf8.extend_from_slice(b"\xff\"}");
    let oversized = json!({"specversion": "1.0", "id": "big", "source": "s",
                           "type": "venue.x", "data": "x".repeat(10_000)});
    let far_future = json!({"specversion": "1.0", "id": "f", "source": "s",
                            "type": "venue.x", "time": "2999-01-01T00:00:00Z"});
    let bad: Vec<(Vec<u8>, RejectReason)> = vec![
        (b"garbage".to_vec(), RejectReason::InvalidJson),
        (
            br#"{"specversion":"1.0","id":"#.to_vec(),
            RejectReason::InvalidJson,
        ),
        (Vec::new(), RejectReason::InvalidJson),
        (invalid_utf8, RejectReason::InvalidUtf8),
        (
            br#"{"specversion":"1.0","id":"n","source":"s","type":"fan.cheer"}"#.to_vec(),
            RejectReason::MissingSubject,
        ),
        (
            br#"{"specversion":"1.0","id":7,"source":"s","type":"venue.x"}"#.to_vec(),
            RejectReason::WrongType,
        ),
        (
            far_future.to_string().into_bytes(),
            RejectReason::TimeInFuture,
        ),
        (oversized.to_string().into_bytes(), RejectReason::TooLarge),
    ];
    const ROUNDS: usize = 40;
    for round in 0..ROUNDS {
        for (k, (payload, _)) in bad.iter().enumerate() {
            let i = round * bad.len() + k;
            publisher
                .publish(&topic(i), event(&format!("v-{i}"), i))
                .await;
            publisher.publish(&topic(i), payload.clone()).await;
        }
    }
    let valid = ROUNDS * bad.len();
    let total = (valid * 2) as u64;
    let stats = Arc::clone(&daemon.stats);
    assert!(
        wait_until(Duration::from_secs(30), || sink.count() == valid
            && stats.snapshot().received >= total)
        .await,
        "committed {} of {valid}: {:?}",
        sink.count(),
        stats.snapshot()
    );
    let s = stats.snapshot();
    for (_, reason) in &bad {
        let per_payload = bad.iter().filter(|(_, r)| r == reason).count();
        assert_eq!(
            s.rejected_for(*reason),
            (ROUNDS * per_payload) as u64,
            "{reason}: {s:?}"
        );
    }
    assert_eq!(s.rejected_total(), valid as u64);
    {
        let state = sink.inner.state.lock().unwrap();
        assert!(!state.dead.is_empty());
        assert!(state
            .dead
            .iter()
            .all(|d| d.origin.starts_with("mqtt:test/")));
        assert!(state.dead.len() as u64 <= s.rejected_total());
    }

    daemon.stop().await;
    assert_all_acked(&broker, "touchline-invalid", &publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_store_holds_acks_and_loses_nothing() {
    let broker = start_broker().await;
    let sink = MemorySink::default();
    let daemon = Daemon::start(broker.port, "touchline-refuse", &sink);
    let publisher = Publisher::start(broker.port, "publisher-refuse");
    wait_subscribed(&publisher, &sink).await;

    sink.inner.refuse.store(true, Ordering::SeqCst);
    const N: usize = 500;
    let acked = Arc::clone(&publisher.acked);
    let acked_before = acked.load(Ordering::SeqCst) as usize;
    for i in 0..N {
        publisher
            .publish(&topic(i), event(&format!("r-{i}"), i))
            .await;
    }
    // Everything reached the broker; the store keeps refusing for a while.
    assert!(
        wait_until(Duration::from_secs(20), || {
            acked.load(Ordering::SeqCst) as usize >= acked_before + N
        })
        .await
    );
    let refusals = &sink.inner.refusals;
    assert!(
        wait_until(Duration::from_secs(20), || refusals.load(Ordering::SeqCst)
            >= 5)
        .await
    );
    assert_eq!(sink.count(), 0);
    assert!(daemon.stats.snapshot().backpressure >= 5);

    sink.inner.refuse.store(false, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(30), || sink.count() == N).await,
        "committed {} of {N}: {:?}",
        sink.count(),
        daemon.stats.snapshot()
    );
    let ids: HashSet<String> = sink.ids().into_iter().collect();
    assert!((0..N).all(|i| ids.contains(&format!("r-{i}"))));
    // Held, not dropped: the connection stayed up the whole time.
    let s = daemon.stats.snapshot();
    assert_eq!(s.mqtt_connects, 1, "{s:?}");

    daemon.stop().await;
    assert_all_acked(&broker, "touchline-refuse", &publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let broker = Arc::new(Mutex::new(start_broker().await));
    let port = broker.lock().unwrap().port;
    let sink = MemorySink::default();
    // Commit latency keeps messages in flight when the broker goes down.
    sink.inner.delay_ms.store(5, Ordering::SeqCst);
    let daemon = Daemon::start(port, "touchline-restart", &sink);
    let publisher = Arc::new(Publisher::start(port, "publisher-restart"));
    wait_subscribed(&publisher, &sink).await;

    const N: usize = 3_000;
    let load = {
        let publisher = Arc::clone(&publisher);
        tokio::spawn(async move {
            for i in 0..N {
                publisher
                    .publish(&topic(i), event(&format!("m-{i}"), i))
                    .await;
                if i % 100 == 99 {
                    // Spread the load so the restart lands mid-stream.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    assert!(wait_until(Duration::from_secs(30), || sink.count() >= 500).await);
    let restarted = {
        let broker = Arc::clone(&broker);
        tokio::task::spawn_blocking(move || broker.lock().unwrap().restart())
    };
    restarted.await.unwrap().expect("restarting mosquitto");
    tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("publishing did not finish within 60 s")
        .unwrap();

    let stats = Arc::clone(&daemon.stats);
    assert!(
        wait_until(Duration::from_secs(60), || sink.count() == N).await,
        "committed {} of {N}: {:?}\n{}",
        sink.count(),
        stats.snapshot(),
        broker.lock().unwrap().log_text()
    );
    let ids = sink.ids();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), N, "each event exactly once after dedup");
    assert!((0..N).all(|i| unique.contains(&format!("m-{i}"))));
    let s = stats.snapshot();
    assert!(s.mqtt_connects >= 2, "no reconnect seen: {s:?}");
    assert!(s.mqtt_connection_errors >= 1, "{s:?}");
    eprintln!(
        "broker restart: {} duplicates dropped, {} stale acks skipped",
        s.duplicates, s.mqtt_stale_acks
    );

    daemon.stop().await;
    let broker = Arc::try_unwrap(broker)
        .ok()
        .expect("the restart task is done")
        .into_inner()
        .unwrap();
    assert_all_acked(&broker, "touchline-restart", &publisher).await;
}
