//! The next-best-action benchmark: what a decision costs inside the
//! store's writer, measured in process on a real LMDB store on disk
//! (`store.sync = "full"`).
//!
//! 1. One venue-wide trigger fanning out to N present customers with 20
//!    offers: time from submission until every decision, instance, timer,
//!    outbox record and MQTT publication is committed (the submission's
//!    answer). Publishing to the broker afterwards is not included.
//! 2. Per-customer triggers at a steady 1,000/s: submission → commit
//!    latency, p50 and p99 (decision committed, publication queued).
//!
//! `cargo bench -p touchline --bench nba` (add `-- --quick` for 20,000
//! customers instead of 100,000).

use std::time::{Duration, Instant};

use serde_json::json;
use touchline::event::Event;
use touchline::store::Store;

const SITE: &str = "bench-arena";

fn offers() -> String {
    let mut s = String::new();
    for i in 0..20 {
        s += &format!(
            "[[offer]]\nid = \"offer-{i}\"\non = [\"match.chance_missed\"]\n\
             audience = \"profile.team == data.team\"\nconsent = \"marketing\"\n\
             value = {}\nexpires_after = \"5m\"\npayload = {{ title = \"Offer {i}\", discount = 10 }}\n\n",
            5 + i
        );
    }
    s
}

fn event(id: String, kind: &str, subject: Option<String>, data: serde_json::Value) -> Event {
    Event {
        id,
        source: "bench".into(),
        kind: kind.into(),
        subject,
        time_ms: now_ms(),
        data,
    }
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let customers: usize = if quick { 20_000 } else { 100_000 };
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("rules"))?;
    std::fs::write(dir.path().join("rules/offers.toml"), offers())?;
    // An [ingest.mqtt] section makes the store queue offer publications;
    // nothing connects to it here.
    let config = format!(
        "[site]\nid = \"{SITE}\"\ndata_dir = \"data\"\nrules = [\"rules/*.toml\"]\n\n\
         [store]\nmap_size = \"8GiB\"\n\n[outbox]\nmax_bytes = \"4GiB\"\n\n\
         [ingest.mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nclient_id = \"bench\"\ntopics = [\"x\"]\n\n\
         [nba]\nmax_per_customer = \"100/1h\"\n"
    );
    let path = dir.path().join("site.toml");
    std::fs::write(&path, config)?;
    let site = edge_config::load_site_config(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rules = edge_config::load_rules(&site).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (store, writer) = Store::open(&site, &rules)?;
        // The crowd: every customer present with a profile, 90 % Team A.
        let profiles: Vec<Event> = (0..customers)
            .map(|n| {
                let team = if n % 10 == 0 { "B" } else { "A" };
                event(
                    format!("p-{n}"),
                    "customer.profile",
                    Some(format!("fan-{n}")),
                    json!({ "team": team, "consent": { "marketing": true } }),
                )
            })
            .collect();
        for chunk in profiles.chunks(4096) {
            store
                .submit(chunk.to_vec())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }

        // 1. Fan-out.
        let started = Instant::now();
        store
            .submit(vec![event(
                "chance-1".into(),
                "match.chance_missed",
                None,
                json!({ "team": "A", "minute": 85 }),
            )])
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let fanout = started.elapsed();
        let nba = store.nba_stats();
        let decided = nba.decisions() + nba.control();
        println!(
            "fan-out: 1 venue-wide trigger, {customers} present customers, 20 offers: \
             {decided} decisions ({} shown, {} control) committed with their publications in {} ms",
            nba.decisions(),
            nba.control(),
            fanout.as_millis()
        );

        // 2. Per-customer triggers at 1,000/s for 5 s, each for a customer
        //    without an open offer of that kind (Team B fans, for Team B).
        let mut latencies = Vec::new();
        let mut tasks = Vec::new();
        let tick = Duration::from_millis(1);
        let mut next = Instant::now();
        let n = if quick { 1_000 } else { 5_000 };
        for i in 0..n {
            next += tick;
            tokio::time::sleep_until(next.into()).await;
            let fan = format!("fan-{}", (i * 10) % customers);
            let s = store.clone();
            let e = event(
                format!("c-{i}"),
                "match.chance_missed",
                Some(fan),
                json!({ "team": "B", "minute": 10 }),
            );
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = s.submit(vec![e]).await;
                (t.elapsed(), r.is_ok())
            }));
        }
        for t in tasks {
            let (d, ok) = t.await?;
            if ok {
                latencies.push(d);
            }
        }
        latencies.sort();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "per-customer triggers at 1,000/s ({} of {n} committed): trigger → decision committed \
             and publication queued p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
        store.shutdown().await;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        anyhow::Ok(())
    })
}
