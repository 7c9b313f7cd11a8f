//! The pipeline benchmark: one command, four figures, measured in one run
//! on this machine with real peers.
//!
//! 1. HTTP batch ingest → awards committed: events/s.
//! 2. MQTT QoS 1 through Mosquitto: the daemon's drain rate of a queued
//!    backlog divided by a bare rumqttc subscriber's that only acks, same
//!    broker, same backlog, measured side by side.
//! 3. Event published on MQTT → award durable at the central sink, at a
//!    steady 5,000 events/s: p50 and p99.
//! 4. Resident memory of the daemon process holding 100,000 customers'
//!    state.
//!
//! `cargo bench -p touchline --bench pipeline` (add `-- --quick` for a
//! smaller run, `-- --rule-state journal` for the store holding rule
//! state between checkpoints instead of the daemon's default, `direct`,
//! which writes it per event; `-- --ids random` for event ids like UUIDs
//! instead of counters). Absolute numbers on a shared machine are
//! noisy; the ratio in (2) is the figure to compare across machines.

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use touchline::app::Daemon;
use touchline_proto::Record;
use touchline_tests::mosquitto::Mosquitto;
use touchline_tests::process::ChildProcess;

const SITE: &str = "bench-arena";

const RULES: &str = r#"
[[achievement]]
id = "cheer-leader"
name = "Cheer Leader"
on = ["fan.cheer"]
when = "data.intensity >= 2"
measure = "count"
window = "lifetime"
tiers = [ { at = 10, badge = "cheer-bronze", points = { xp = 50 } },
          { at = 50, badge = "cheer-silver", points = { xp = 200 } } ]

[[achievement]]
id = "first-cheer"
name = "First cheer"
on = ["fan.cheer"]
measure = "count"
window = "lifetime"
tiers = [ { at = 1, badge = "first-cheer", points = { xp = 1 } } ]

[[achievement]]
id = "regular"
name = "Regular"
on = ["venue.checkin"]
measure = "count"
window = "lifetime"
tiers = [ { at = 5, badge = "regular" } ]
"#;

struct Scale {
    http_events: usize,
    mqtt_backlog: usize,
    latency_seconds: u64,
    customers: usize,
}

/// `--rule-state journal|direct`: the store's `rule_state` in every part
/// (set once, first thing in `main`).
static RULE_STATE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The daemon's default `rule_state`.
const DEFAULT_RULE_STATE: &str = "direct";

/// Whether event ids are random (`--ids random`, like UUIDs) rather than
/// counted in order.
static RANDOM_IDS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn rule_state() -> &'static str {
    RULE_STATE.get().copied().unwrap_or(DEFAULT_RULE_STATE)
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let _ = RULE_STATE.set(support::flag_value(
        "--rule-state",
        &["journal", "direct"],
        DEFAULT_RULE_STATE,
    )?);
    let _ = RANDOM_IDS
        .set(support::flag_value("--ids", &["sequential", "random"], "sequential")? == "random");
    let scale = if quick {
        Scale {
            http_events: 100_000,
            mqtt_backlog: 10_000,
            latency_seconds: 3,
            customers: 20_000,
        }
    } else {
        Scale {
            http_events: 600_000,
            mqtt_backlog: 50_000,
            latency_seconds: 10,
            customers: 100_000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!(
            "touchline pipeline benchmark ({}, rule_state {})",
            if quick { "quick" } else { "full" },
            rule_state()
        );
        println!(
            "machine: {} cores",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        http_ingest(scale.http_events).await?;
        mqtt_ratio(scale.mqtt_backlog).await?;
        latency(scale.latency_seconds).await?;
        memory(scale.customers).await?;
        Ok(())
    })
}

fn write_site(dir: &Path, extra: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("rules"))?;
    std::fs::write(dir.join("rules/bench.toml"), RULES)?;
    let rule_state = rule_state();
    let text = format!(
        "[site]\nid = \"{SITE}\"\ndata_dir = \"data\"\nrules = [\"rules/*.toml\"]\n\n\
         [store]\nmap_size = \"4GiB\"\nrule_state = \"{rule_state}\"\n\n\
         [outbox]\nmax_bytes = \"2GiB\"\n\n{extra}"
    );
    let path = dir.join("site.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn start(config: &Path) -> anyhow::Result<Daemon> {
    let site = edge_config::load_site_config(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rules = edge_config::load_rules(&site).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Daemon::start(site, rules).await?)
}

fn cheer(n: usize, fan: usize, time: Option<&str>) -> Value {
    let id = if RANDOM_IDS.get().copied().unwrap_or(false) {
        support::random_id("b", 0, n as u64)
    } else {
        format!("b{n}")
    };
    let mut e = json!({"specversion": "1.0", "id": id, "source": "bench/app",
        "type": "fan.cheer", "subject": format!("fan-{fan}"),
        "data": {"intensity": n % 3 + 1}});
    if let Some(t) = time {
        e["time"] = json!(t);
    }
    e
}

/// (1) HTTP batches of 1,000 events from 4 concurrent clients.
async fn http_ingest(events: usize) -> anyhow::Result<()> {
    const BATCH: usize = 1_000;
    const CLIENTS: usize = 4;
    let dir = tempfile::tempdir()?;
    let config = write_site(dir.path(), "[ingest.http]\nlisten = \"127.0.0.1:0\"\n")?;
    let daemon = start(&config).await?;
    let url = format!("http://{}/v1/events", daemon.http_addr().context("http")?);
    // Bodies are serialised before the clock starts: we measure the daemon.
    let bodies: Vec<String> = (0..events)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(|c| Value::Array(c.iter().map(|n| cheer(*n, n % 100_000, None)).collect()).to_string())
        .collect();
    let bodies = Arc::new(bodies);
    let started = Instant::now();
    support::post_batches(&url, bodies, CLIENTS).await?;
    let elapsed = started.elapsed();
    let stats = daemon.ingest_stats().snapshot();
    let awards = daemon.store().stats().records_appended();
    daemon.shutdown(Duration::from_millis(100)).await;
    if stats.accepted != events as u64 {
        bail!("committed {} of {events}", stats.accepted);
    }
    println!(
        "1. HTTP batch ingest → committed: {events} events in {:.2} s = {:.0} events/s ({awards} awards; target ≥ 100,000/s)",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

async fn publish_backlog(
    port: u16,
    count: usize,
    first_id: usize,
    topic: &str,
) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new("bench-publisher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_inflight(500);
    let (client, mut eventloop) = AsyncClient::new(opts, 1_000);
    let topic = topic.to_string();
    let publisher = tokio::spawn(async move {
        for n in first_id..first_id + count {
            let payload = cheer(n, n % 10_000, None).to_string();
            if client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return client;
            }
        }
        client
    });
    let mut acked = 0;
    while acked < count {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("publisher: {e}"),
            Err(_) => bail!("publisher stalled at {acked}/{count}"),
        }
    }
    let client = publisher.await?;
    let _ = client.try_disconnect();
    Ok(())
}

/// A bare consumer: persistent session, manual acks, acks each message as
/// soon as it arrives. Returns the time to drain `count` queued messages.
async fn bare_drain(port: u16, count: usize, prepare: bool) -> anyhow::Result<Duration> {
    let mut opts = MqttOptions::new("bench-bare", "127.0.0.1", port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_inflight(1000);
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    if prepare {
        client.subscribe("bench/bare", QoS::AtLeastOnce).await?;
        loop {
            if let MqttEvent::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
                break;
            }
        }
        client.disconnect().await?;
        let _ = eventloop.poll().await;
        return Ok(Duration::ZERO);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let acker = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(p) = rx.recv().await {
                client.ack(&p).await?;
                n += 1;
                if n == count {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    let started = Instant::now();
    let mut got = 0;
    while got < count {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                // Parse like a consumer would, then ack.
                let _: Value = serde_json::from_slice(&p.payload)?;
                got += 1;
                let _ = tx.send(p);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("bare consumer: {e}"),
            Err(_) => bail!("bare consumer stalled at {got}/{count}"),
        }
    }
    // The last acks must be on the wire too.
    let drain = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                break;
            }
        }
    });
    acker.await??;
    let elapsed = started.elapsed();
    drain.abort();
    Ok(elapsed)
}

/// (2) Daemon vs bare subscriber draining the same backlog from Mosquitto.
async fn mqtt_ratio(backlog: usize) -> anyhow::Result<()> {
    let broker = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let config = write_site(
        dir.path(),
        &format!(
            "[ingest.mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"bench-daemon\"\ntopics = [\"bench/daemon\"]\n",
            broker.port
        ),
    )?;
    // Both consumers subscribe with a persistent session, then go away.
    bare_drain(broker.port, 0, true).await?;
    let daemon = start(&config).await?;
    wait(Duration::from_secs(10), || {
        daemon.ingest_stats().snapshot().mqtt_connected
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // SUBACK has no public signal
    daemon.shutdown(Duration::ZERO).await;

    // Rounds alternate the two consumers so machine noise hits both.
    const ROUNDS: usize = 3;
    let mut ratios = Vec::new();
    let mut ours_rates = Vec::new();
    let mut bare_rates = Vec::new();
    for round in 0..ROUNDS {
        // Fresh ids each round: the daemon would drop repeats as duplicates.
        publish_backlog(broker.port, backlog, round * backlog, "bench/bare").await?;
        publish_backlog(broker.port, backlog, round * backlog, "bench/daemon").await?;

        let bare = bare_drain(broker.port, backlog, false).await?;
        // The daemon's time includes its start: store open, broker connect.
        let started = Instant::now();
        let daemon = start(&config).await?;
        wait(Duration::from_secs(120), || {
            daemon.ingest_stats().snapshot().accepted >= backlog as u64
        })
        .await?;
        let ours = started.elapsed();
        daemon.shutdown(Duration::ZERO).await;

        let bare_rate = backlog as f64 / bare.as_secs_f64();
        let our_rate = backlog as f64 / ours.as_secs_f64();
        ratios.push(our_rate / bare_rate);
        ours_rates.push(our_rate);
        bare_rates.push(bare_rate);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let all: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "2. MQTT QoS 1 backlog of {backlog}, {ROUNDS} rounds: daemon {:.0} events/s (committed), bare subscriber {:.0} msgs/s (acked), medians → ratio {:.2} (rounds: {}; target ≥ 0.8)",
        median(&mut ours_rates),
        median(&mut bare_rates),
        median(&mut ratios),
        all.join(", ")
    );
    Ok(())
}

/// A sink that timestamps each record when it has become durable.
struct TimingSink {
    inner: touchline_central::JsonlSink,
    latencies_ms: Mutex<Vec<i64>>,
}

impl touchline_central::Sink for TimingSink {
    fn last_durable(
        &self,
        site: &str,
    ) -> impl Future<Output = Result<u64, touchline_central::SinkError>> + Send {
        self.inner.last_durable(site)
    }

    async fn write(
        &self,
        site: &str,
        dropped_through: u64,
        records: &[Record],
    ) -> Result<u64, touchline_central::SinkError> {
        let through = self.inner.write(site, dropped_through, records).await?;
        let now = touchline::clock::now_ms();
        let mut l = self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner());
        l.extend(records.iter().map(|r| now - r.at_ms));
        Ok(through)
    }
}

/// (3) MQTT at a steady 5,000 events/s, one award per event (each event is
/// a fan's first cheer), latency from publish to durable at the sink.
async fn latency(seconds: u64) -> anyhow::Result<()> {
    const RATE: u64 = 5_000;
    let broker = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    touchline::certs::write_dev_certs(&certs, &[SITE.to_string()], &[])?;
    let sink = Arc::new(TimingSink {
        inner: touchline_central::JsonlSink::open(&dir.path().join("central"))?,
        latencies_ms: Mutex::new(Vec::new()),
    });
    let server = touchline_central::tls::server_config(
        &certs.join("central.pem"),
        &certs.join("central.key"),
        &certs.join("ca.pem"),
    )?;
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse()?)?;
    let central: SocketAddr = endpoint.local_addr()?;
    let stop = CancellationToken::new();
    let serve = {
        let stop = stop.clone();
        let sink = sink.clone();
        tokio::spawn(async move {
            touchline_central::serve(endpoint, sink, async move { stop.cancelled().await }).await
        })
    };
    let config = write_site(
        dir.path(),
        &format!(
            "[ingest.mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"bench-latency\"\ntopics = [\"bench/latency\"]\n\n\
             [uplink]\ncentral = \"{central}\"\nca = \"certs/ca.pem\"\ncert = \"certs/{SITE}.pem\"\nkey = \"certs/{SITE}.key\"\n",
            broker.port
        ),
    )?;
    let daemon = start(&config).await?;
    wait(Duration::from_secs(10), || {
        daemon.ingest_stats().snapshot().mqtt_connected
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // SUBACK has no public signal

    let total = (RATE * seconds) as usize;
    let mut opts = MqttOptions::new("bench-latency-pub", "127.0.0.1", broker.port);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let started = Instant::now();
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / RATE as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let t = touchline::clock::format_ms(touchline::clock::now_ms());
        client
            .publish(
                "bench/latency",
                QoS::AtLeastOnce,
                false,
                cheer(n, n, Some(&t)).to_string(),
            )
            .await?;
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    wait(Duration::from_secs(60), || {
        sink.latencies_ms
            .lock()
            .map(|l| l.len() >= total)
            .unwrap_or(false)
    })
    .await?;
    poller.abort();
    daemon.shutdown(Duration::ZERO).await;
    stop.cancel();
    let _ = serve.await;
    let mut l = sink
        .latencies_ms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    l.sort_unstable();
    let p = |q: f64| l[((l.len() as f64 - 1.0) * q) as usize];
    println!(
        "3. MQTT publish → award durable at central (JSONL, fsync), {total} awards at {achieved:.0} events/s: p50 {} ms, p99 {} ms, max {} ms (target p99 ≤ 50 ms; 1 ms resolution)",
        p(0.5), p(0.99), p(1.0)
    );
    Ok(())
}

/// (4) The daemon as its own process, state for `customers` customers.
async fn memory(customers: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = touchline_tests::free_port()?;
    let config = write_site(
        dir.path(),
        &format!("[ingest.http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )?;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_touchline"));
    let config_arg = config.to_string_lossy().to_string();
    let mut child = ChildProcess::spawn(
        &bin,
        &["run", "--config", &config_arg],
        &dir.path().join("log"),
    )?;
    touchline_tests::wait_for_port(port, Duration::from_secs(20))?;
    let idle = support::rss_kib(&child.pid().to_string())?;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let mut seen = HashSet::new();
    // Two events per customer: every customer has state in two rules.
    for chunk in (0..customers * 2).collect::<Vec<_>>().chunks(1_000) {
        let body = Value::Array(
            chunk
                .iter()
                .map(|n| {
                    seen.insert(n % customers);
                    cheer(*n, n % customers, None)
                })
                .collect(),
        );
        let resp = client
            .post(&url)
            .header("content-type", "application/cloudevents-batch+json")
            .body(body.to_string())
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            bail!("batch answered {}", resp.status());
        }
    }
    let loaded = support::rss_kib(&child.pid().to_string())?;
    child.terminate(Duration::from_secs(20))?;
    println!(
        "4. daemon resident memory: {:.1} MiB idle, {:.1} MiB with {} customers' state ({:.1} MiB anonymous, {:.1} MiB LMDB's mapped pages)",
        idle.total as f64 / 1024.0,
        loaded.total as f64 / 1024.0,
        seen.len(),
        loaded.anon as f64 / 1024.0,
        loaded.file as f64 / 1024.0
    );
    Ok(())
}

async fn wait(within: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !check() {
        if Instant::now() > deadline {
            bail!("condition not met within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
