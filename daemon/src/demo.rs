//! `touchline demo`: the whole pipeline, end to end, on this one machine.
//!
//! It exists so that the first command a newcomer runs shows the real
//! thing, not a simulation: a development PKI, an in-process central
//! receiver writing JSONL over real QUIC with mutual TLS, the daemon started
//! from a real config file, and a generator posting synthetic stadium
//! traffic (with some duplicates and some bad events) over real HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::app::Daemon;
use crate::clock::{format_ms, now_ms};

const SITE: &str = "demo-arena";

/// Rules the demo loads; the same shape operators write.
const DEMO_RULES: &str = include_str!("demo_rules.toml");

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long the generator sends traffic.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Number of distinct fans in the venue.
    #[arg(long, default_value_t = 5_000)]
    pub fans: u32,
    /// Target events per second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u32,
    /// Keep the demo's files (config, store, central JSONL) in this folder
    /// instead of a temporary one.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

/// What the generator sent.
#[derive(Debug, Default)]
struct Sent {
    events: u64,
    duplicates: u64,
    invalid: u64,
    refused_batches: u64,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp;
    let dir: PathBuf = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary folder")?;
            temp.path().to_path_buf()
        }
    };

    let certs = dir.join("certs");
    crate::certs::write_dev_certs(&certs, &[SITE.to_string()], &[])
        .context("writing development certificates")?;

    // The central receiver, in process, on a loopback port of its choosing.
    let central_dir = dir.join("central");
    let sink = touchline_central::JsonlSink::open(&central_dir)
        .with_context(|| format!("opening the JSONL sink in {}", central_dir.display()))?;
    let server_config = touchline_central::tls::server_config(
        &certs.join("central.pem"),
        &certs.join("central.key"),
        &certs.join("ca.pem"),
    )
    .context("building the central TLS config")?;
    let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)
        .context("binding the central endpoint")?;
    let central_addr = endpoint.local_addr()?;
    let stop_central = CancellationToken::new();
    let central = {
        let stop = stop_central.clone();
        tokio::spawn(touchline_central::serve(
            endpoint,
            Arc::new(sink),
            async move { stop.cancelled().await },
        ))
    };

    // The daemon, from a config file like any site's.
    let config_path = write_site_config(&dir, central_addr)?;
    let site = edge_config::load_site_config(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rules = edge_config::load_rules(&site).map_err(|e| anyhow::anyhow!("{e}"))?;
    let daemon = Daemon::start(site, rules).await?;
    let Some(http) = daemon.http_addr() else {
        bail!("the demo config has no HTTP ingest");
    };

    println!(
        "touchline demo: site {SITE}, {} fans, ~{} events/s for {} s",
        args.fans, args.rate, args.seconds
    );
    println!("  files:   {}", dir.display());
    println!("  ingest:  http://{http}/v1/events");
    println!(
        "  central: quic://{central_addr} (mTLS) → {}",
        central_dir.display()
    );

    let started = Instant::now();
    let sent = generate(http, &args).await?;
    let sending = started.elapsed();

    // Let the uplink deliver everything committed.
    let store_stats = daemon.store().stats();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store_stats.outbox_records() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = store_stats.outbox_records() == 0;
    let delivered = count_lines(&central_dir.join(format!("{SITE}.jsonl")))?;

    let ingest = daemon.ingest_stats().snapshot();
    let uplink = daemon.uplink_state().clone();
    daemon.shutdown(Duration::from_secs(2)).await;
    stop_central.cancel();
    let _ = central.await;

    println!();
    println!("sent      {} events in {:.1} s ({} duplicates and {} invalid on purpose, {} batches refused with 503)",
        sent.events, sending.as_secs_f64(), sent.duplicates, sent.invalid, sent.refused_batches);
    println!(
        "ingest    {} received, {} committed, {} duplicates dropped, {} rejected",
        ingest.received,
        ingest.accepted,
        ingest.duplicates,
        ingest.rejected_total()
    );
    for reason in crate::ingest::RejectReason::ALL {
        let n = ingest.rejected_for(reason);
        if n > 0 {
            println!("            rejected {}: {n}", reason.label());
        }
    }
    println!(
        "engine    {} award records created",
        store_stats.records_appended()
    );
    println!(
        "uplink    {} records acknowledged by the central receiver, {} reconnects",
        uplink.records_acked(),
        uplink.reconnects()
    );
    println!(
        "central   {delivered} records in {}",
        central_dir.join(format!("{SITE}.jsonl")).display()
    );
    if let Some(example) = first_line(&central_dir.join(format!("{SITE}.jsonl")))? {
        println!("          e.g. {example}");
    }
    println!(
        "dead letters: touchline dlq --config {}",
        config_path.display()
    );
    if !drained {
        bail!("the outbox did not drain within 30 s");
    }
    if delivered != store_stats.records_appended() {
        bail!(
            "central holds {delivered} records but the engine created {}",
            store_stats.records_appended()
        );
    }
    println!(
        "every award reached the central receiver exactly once (finished {})",
        format_ms(now_ms())
    );
    Ok(())
}

fn write_site_config(dir: &Path, central: std::net::SocketAddr) -> anyhow::Result<PathBuf> {
    let rules_dir = dir.join("rules");
    std::fs::create_dir_all(&rules_dir)?;
    std::fs::write(rules_dir.join("demo.toml"), DEMO_RULES)?;
    let config = format!(
        r#"# Written by `touchline demo`.
[site]
id = "{SITE}"
data_dir = "store"
rules = ["rules/*.toml"]

[ingest.http]
listen = "127.0.0.1:0"

[uplink]
central = "{central}"
server_name = "localhost"
ca = "certs/ca.pem"
cert = "certs/{SITE}.pem"
key = "certs/{SITE}.key"

[outbox]
max_bytes = "256MiB"
when_full = "block"

[store]
map_size = "1GiB"
"#
    );
    let path = dir.join("site.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// Posts batches of synthetic events at about `rate` per second.
async fn generate(http: std::net::SocketAddr, args: &DemoArgs) -> anyhow::Result<Sent> {
    const BATCH: usize = 500;
    let client = reqwest::Client::new();
    let url = format!("http://{http}/v1/events");
    let mut rng = StdRng::seed_from_u64(7);
    let mut sent = Sent::default();
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut next_id: u64 = 0;
    let fans = args.fans.max(1);
    let mut recent: Vec<Value> = Vec::new();
    let zones = ["north", "south", "east", "west", "food-court", "fan-zone"];

    while Instant::now() < until {
        let mut batch = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let roll: f64 = rng.random();
            if roll < 0.01 && !recent.is_empty() {
                // A resend, as a flaky app or gateway would produce.
                let again = recent[rng.random_range(0..recent.len())].clone();
                batch.push(again);
                sent.duplicates += 1;
            } else if roll < 0.015 {
                batch.push(json!({"specversion": "1.0", "id": format!("bad-{next_id}"),
                    "source": "demo/app", "type": "fan.cheer"}));
                next_id += 1;
                sent.invalid += 1;
            } else {
                let fan = rng.random_range(0..fans);
                let ev = match rng.random_range(0..10) {
                    0 => {
                        json!({"specversion": "1.0", "id": format!("e{next_id}"), "source": "demo/gates",
                        "type": "venue.checkin", "subject": format!("fan-{fan}"),
                        "data": {"gate": rng.random_range(1..12)}})
                    }
                    1 => {
                        json!({"specversion": "1.0", "id": format!("e{next_id}"), "source": "demo/pos",
                        "type": "concession.purchase", "subject": format!("fan-{fan}"),
                        "data": {"amount": rng.random_range(3..40), "zone": zones[rng.random_range(0..zones.len())]}})
                    }
                    _ => cheer(next_id, fan, rng.random_range(1..4)),
                };
                if recent.len() < 4096 {
                    recent.push(ev.clone());
                } else {
                    let slot = rng.random_range(0..recent.len());
                    recent[slot] = ev.clone();
                }
                batch.push(ev);
                next_id += 1;
            }
        }
        sent.events += batch.len() as u64;
        let resp = client
            .post(&url)
            .header("content-type", "application/cloudevents-batch+json")
            .body(Value::Array(batch).to_string())
            .send()
            .await
            .context("posting a batch")?;
        if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            sent.refused_batches += 1;
        }
        // Pace to the target rate.
        let due =
            started + Duration::from_secs_f64(sent.events as f64 / f64::from(args.rate.max(1)));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    Ok(sent)
}

fn cheer(id: u64, fan: u32, intensity: u32) -> Value {
    json!({"specversion": "1.0", "id": format!("e{id}"), "source": "demo/app",
        "type": "fan.cheer", "subject": format!("fan-{fan}"), "time": format_ms(now_ms()),
        "data": {"intensity": intensity}})
}

fn count_lines(path: &Path) -> anyhow::Result<u64> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes.iter().filter(|b| **b == b'\n').count() as u64),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn first_line(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().next().map(str::to_string)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
