//! Shared pieces of the end-to-end tests: a central receiver on loopback,
//! site configs, the rules under test and the awards they must produce.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SITE: &str = "arena-e2e";

/// The seed rule shape with small tiers, so a modest load reaches them.
pub const RULES: &str = r#"
[[achievement]]
id = "cheer-leader"
name = "Cheer Leader"
on = ["fan.cheer"]
when = "data.intensity >= 2"
measure = "count"
window = "lifetime"
tiers = [ { at = 3, badge = "cheer-bronze", points = { xp = 50 } },
          { at = 10, badge = "cheer-silver", points = { xp = 200 } },
          { at = 25, badge = "cheer-gold", points = { xp = 500 } } ]
"#;

/// Tier thresholds of [`RULES`], in order.
pub const TIERS: [u64; 3] = [3, 10, 25];

/// The binary under test.
pub fn touchline_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_touchline"))
}

/// Loads `config` and its rules and starts the daemon in this process.
pub async fn start_daemon(config: &Path) -> touchline::app::Daemon {
    let site = edge_config::load_site_config(config).expect("valid config");
    let rules = edge_config::load_rules(&site).expect("valid rules");
    touchline::app::Daemon::start(site, rules)
        .await
        .expect("daemon starts")
}

/// The events URL of a daemon started in this process.
pub fn events_url(daemon: &touchline::app::Daemon) -> String {
    format!(
        "http://{}/v1/events",
        daemon.http_addr().expect("HTTP ingest")
    )
}

/// `touchline run --config <config>` as a child process (its output in
/// `log`), once it listens on `http_port`.
pub fn spawn_touchline_run(
    config: &Path,
    http_port: u16,
    log: &Path,
) -> touchline_tests::process::ChildProcess {
    let config = config.to_string_lossy();
    let child = touchline_tests::process::ChildProcess::spawn(
        &touchline_bin(),
        &["run", "--config", &config],
        log,
    )
    .expect("daemon process");
    touchline_tests::wait_for_port(http_port, Duration::from_secs(20)).expect("daemon listens");
    child
}

/// Development certificates for [`SITE`] in `dir/certs`.
pub fn write_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    touchline::certs::write_dev_certs(&certs, &[SITE.to_string()], &[]).expect("dev certs");
    certs
}

/// A central receiver (JSONL sink) running in this process.
pub struct Central {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Central {
    /// Starts on `addr` (port 0 for any) with its JSONL files in `dir`.
    pub async fn start(certs: &Path, dir: &Path, addr: SocketAddr) -> Central {
        let sink = touchline_central::JsonlSink::open(dir).expect("jsonl sink");
        Self::start_with(certs, Arc::new(sink), dir, addr).await
    }

    pub async fn start_with<S>(certs: &Path, sink: Arc<S>, dir: &Path, addr: SocketAddr) -> Central
    where
        S: touchline_central::Sink + 'static,
    {
        let config = touchline_central::tls::server_config(
            &certs.join("central.pem"),
            &certs.join("central.key"),
            &certs.join("ca.pem"),
        )
        .expect("central tls");
        // A just-freed UDP port can take a moment to be reusable.
        let mut endpoint = None;
        for _ in 0..100 {
            match quinn::Endpoint::server(config.clone(), addr) {
                Ok(e) => {
                    endpoint = Some(e);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let endpoint = endpoint.expect("central endpoint");
        let addr = endpoint.local_addr().expect("central addr");
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ =
                    touchline_central::serve(endpoint, sink, async move { stop.cancelled().await })
                        .await;
            })
        };
        Central {
            addr,
            dir: dir.to_path_buf(),
            stop,
            task,
        }
    }

    /// Stops accepting and closes every connection.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The records the JSONL sink holds for [`SITE`].
pub fn central_records(dir: &Path) -> Vec<Value> {
    let path = dir.join(format!("{SITE}.jsonl"));
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    // The sink may be appending right now: a last line without its
    // newline is not written yet.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("each JSONL line is JSON"))
        .collect()
}

/// Options for [`write_site_config`].
#[derive(Default, Clone)]
pub struct SiteOptions {
    pub http_port: Option<u16>,
    pub mqtt_port: Option<u16>,
    pub central: Option<SocketAddr>,
    /// Lines for the `[store]` table.
    pub store: String,
    /// Lines added to the `[uplink]` table (with `central`).
    pub uplink: String,
    pub extra: String,
}

/// Writes `dir/site.toml` and `dir/rules/e2e.toml`; returns the config path.
pub fn write_site_config(dir: &Path, opts: &SiteOptions) -> PathBuf {
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules/e2e.toml"), RULES).unwrap();
    let mut text = format!(
        "[site]\nid = \"{SITE}\"\ndata_dir = \"data\"\nrules = [\"rules/*.toml\"]\n\n\
         [store]\nmap_size = \"512MiB\"\n{}\n[outbox]\nmax_bytes = \"256MiB\"\n\n",
        opts.store
    );
    if let Some(port) = opts.http_port {
        text += &format!("[ingest.http]\nlisten = \"127.0.0.1:{port}\"\n\n");
    }
    if let Some(port) = opts.mqtt_port {
        text += &format!(
            "[ingest.mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"touchline-{SITE}\"\n\
             topics = [\"venue/+/events\"]\nreconnect_min = \"50ms\"\nreconnect_max = \"1s\"\n\n"
        );
    }
    if let Some(central) = opts.central {
        text += &format!(
            "[uplink]\ncentral = \"{central}\"\nserver_name = \"localhost\"\nca = \"certs/ca.pem\"\n\
             cert = \"certs/{SITE}.pem\"\nkey = \"certs/{SITE}.key\"\npseudonymize = false\n\
             reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n{}\n",
            opts.uplink
        );
    }
    text += &opts.extra;
    let path = dir.join("site.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A cheer from `fan`; `n` makes the id unique.
pub fn cheer(n: u64, fan: u32, intensity: u32) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("cheer-{n}"),
        "source": "e2e/app",
        "type": "fan.cheer",
        "subject": format!("fan-{fan}"),
        "data": { "intensity": intensity },
    })
}

/// A deterministic workload: `events` cheers spread over `fans` fans, with
/// intensities 1..=3 (so the rule's `when` filters some out).
pub fn workload(events: u64, fans: u32) -> Vec<Value> {
    (0..events)
        .map(|n| {
            let fan = ((n * 7919) % u64::from(fans)) as u32;
            // Independent of the fan, so every fan has some cheers that
            // the rule's `when` filters out.
            let intensity = ((n.wrapping_mul(2_654_435_761) >> 11) % 3) as u32 + 1;
            cheer(n, fan, intensity)
        })
        .collect()
}

/// (customer, tier) → 1 for every award `events` must produce under [`RULES`].
pub fn expected_awards(events: &[Value]) -> BTreeMap<(String, u64), usize> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        if e["data"]["intensity"].as_u64().unwrap_or(0) >= 2 {
            *counts
                .entry(e["subject"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let mut out = BTreeMap::new();
    for (customer, n) in counts {
        for (i, at) in TIERS.iter().enumerate() {
            if n >= *at {
                out.insert((customer.clone(), i as u64 + 1), 1);
            }
        }
    }
    out
}

/// (customer, tier) → how many times the central sink holds that award.
pub fn awards_at_central(records: &[Value]) -> BTreeMap<(String, u64), usize> {
    let mut out = BTreeMap::new();
    for r in records {
        if r["kind"] == "achievement_awarded" && r["achievement"] == "cheer-leader" {
            let key = (
                r["customer"].as_str().unwrap_or_default().to_string(),
                r["tier"].as_u64().unwrap_or_default(),
            );
            *out.entry(key).or_default() += 1;
        }
    }
    out
}

/// Sequence numbers must be unique and ascending in the sink.
pub fn assert_sequences_unique(records: &[Value]) {
    let mut last = 0;
    for r in records {
        let seq = r["seq"].as_u64().expect("seq");
        assert!(
            seq > last,
            "sequence {seq} after {last}: duplicate or reordered"
        );
        last = seq;
    }
}

/// Posts `events` in batches of `batch`, retrying each batch until it is
/// answered 202 (the client side of at-least-once). Gives up after
/// `deadline`.
pub async fn post_all(
    client: &reqwest::Client,
    url: &str,
    events: &[Value],
    batch: usize,
    deadline: Duration,
) -> anyhow::Result<u64> {
    let until = tokio::time::Instant::now() + deadline;
    let mut retries = 0;
    for chunk in events.chunks(batch) {
        let body = Value::Array(chunk.to_vec()).to_string();
        loop {
            if tokio::time::Instant::now() > until {
                anyhow::bail!("gave up posting after {deadline:?}");
            }
            let sent = client
                .post(url)
                .header("content-type", "application/cloudevents-batch+json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status() == reqwest::StatusCode::ACCEPTED => break,
                _ => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    Ok(retries)
}

/// A venue-app stand-in on the broker at `port`: subscribes (QoS 1,
/// persistent session, so messages published while it reconnects are
/// kept) to `touchline/<SITE>/customers/+/<channel>` and keeps every
/// message as (topic, JSON payload). The retry pause only spaces out
/// reconnects while the broker is down.
pub fn subscribe_app(
    port: u16,
    client_id: &str,
    channel: &str,
) -> Arc<Mutex<Vec<(String, Value)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false);
    let topic = format!("touchline/{SITE}/customers/+/{channel}");
    tokio::spawn(async move {
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    out.lock().unwrap().push((p.topic.clone(), v));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    seen
}
