//! The next-best-action benchmark: the daemon in process on a real LMDB
//! store on disk (`store.sync = "full"`), publishing to a real Mosquitto on
//! loopback, with a venue-app subscriber on every customer's offers topic.
//! "Published" below means received by that subscriber through the broker.
//!
//! 1. One venue-wide trigger fanning out to N present customers with 20
//!    offers: time from submission until every decision, instance, timer,
//!    outbox record and MQTT publication is committed (the last chunk of
//!    the fan-out), and until the subscriber has every offer message;
//!    also the trigger's own answer (its first chunk) and the commit time
//!    of a fan's event sent while the fan-out goes on.
//! 2. Per-customer triggers at a steady 1,000/s: trigger submitted → offer
//!    message at the subscriber, p50 and p99 (and → committed).
//! 3. For scale: a bare rumqttc publisher sending as many QoS 1 messages
//!    of the same size as the fan-out showed, through the same broker to
//!    the same subscriber: what the broker and one subscriber take.
//!
//! `cargo bench -p touchline --bench nba` (add `-- --quick` for 20,000
//! customers instead of 100,000, `-- --sync no-meta-sync` or `none` for a
//! store that syncs less than the default `full`).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::mpsc;
use touchline::app::Daemon;
use touchline::event::Event;
use touchline_tests::mosquitto::Mosquitto;

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
        time_ms: touchline::clock::now_ms(),
        data,
    }
}

/// An offer message at the subscriber: the customer (from the topic),
/// when it arrived, its payload size.
type Arrival = (String, Instant, usize);

/// A venue app subscribed to every customer's offers: each message's
/// customer (from the topic) and arrival time.
async fn subscriber(port: u16) -> anyhow::Result<mpsc::UnboundedReceiver<Arrival>> {
    let mut opts = MqttOptions::new("bench-venue-app", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    client
        .subscribe(
            format!("touchline/{SITE}/customers/+/offers"),
            QoS::AtLeastOnce,
        )
        .await?;
    tokio::spawn(async move {
        // The client lives as long as its event loop.
        let _client = client;
        let mut subscribed = Some(subscribed_tx);
        while let Ok(ev) = eventloop.poll().await {
            match ev {
                MqttEvent::Incoming(Packet::SubAck(_)) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                MqttEvent::Incoming(Packet::Publish(p)) => {
                    let customer = p.topic.split('/').nth(3).unwrap_or_default().to_string();
                    if tx
                        .send((customer, Instant::now(), p.payload.len()))
                        .is_err()
                    {
                        return;
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .context("no SUBACK from the broker")??;
    Ok(rx)
}

/// Waits for `n` messages, handing each to `each`; returns the arrival of
/// the last one and the largest payload.
async fn receive(
    rx: &mut mpsc::UnboundedReceiver<Arrival>,
    n: u64,
    within: Duration,
    mut each: impl FnMut(&str, Instant) -> anyhow::Result<()>,
) -> anyhow::Result<(Instant, usize)> {
    let deadline = Instant::now() + within;
    let mut last = Instant::now();
    let mut largest = 0;
    for got in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((customer, at, size))) => {
                each(&customer, at)?;
                last = at;
                largest = largest.max(size);
            }
            _ => bail!("{got} of {n} offer messages arrived within {within:?}"),
        }
    }
    Ok((last, largest))
}

/// For `receive` when only the count matters.
fn any(_: &str, _: Instant) -> anyhow::Result<()> {
    Ok(())
}

/// A bare publisher: `n` QoS 1 messages of `size` bytes to customers'
/// offer topics, as fast as rumqttc takes them; returns the time until
/// the subscriber has them all.
async fn bare_publish(
    port: u16,
    rx: &mut mpsc::UnboundedReceiver<Arrival>,
    n: u64,
    size: usize,
) -> anyhow::Result<Duration> {
    let mut opts = MqttOptions::new("bench-bare-publisher", "127.0.0.1", port);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let payload = vec![b'x'; size];
    let started = Instant::now();
    for i in 0..n {
        client
            .publish(
                format!("touchline/{SITE}/customers/fan-{i}/offers"),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await?;
    }
    let (last, _) = receive(rx, n, Duration::from_secs(120), any).await?;
    poller.abort();
    Ok(last.duration_since(started))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--sync <mode>`: the store's durability (default `full`), to see
    // what the disk's fdatasyncs cost the per-customer latency.
    let sync = match args.iter().position(|a| a == "--sync") {
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some(mode @ ("full" | "no-meta-sync" | "none")) => mode.to_string(),
            other => bail!("--sync wants full, no-meta-sync or none, not {other:?}"),
        },
        None => "full".to_string(),
    };
    let customers: usize = if quick { 20_000 } else { 100_000 };
    println!("touchline next-best-action benchmark, store.sync = {sync}");
    let broker = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("rules"))?;
    std::fs::write(dir.path().join("rules/offers.toml"), offers())?;
    let config = format!(
        "[site]\nid = \"{SITE}\"\ndata_dir = \"data\"\nrules = [\"rules/*.toml\"]\n\n\
         [store]\nmap_size = \"8GiB\"\nsync = \"{sync}\"\n\n[outbox]\nmax_bytes = \"4GiB\"\n\n\
         [ingest.mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"bench-daemon\"\ntopics = [\"bench/none\"]\n\n\
         [nba]\nmax_per_customer = \"100/1h\"\n",
        broker.port
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
        let mut messages = subscriber(broker.port).await?;
        let daemon = Daemon::start(site, rules).await?;
        let store = daemon.store().clone();
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
        support::submit_committed(&store, profiles, 4096).await?;
        // One offer end to end first: the publisher is connected and the
        // path is warm. Team B fans see none of the fan-out's offers.
        let nba = store.nba_stats();
        let mut warm = 0;
        while nba.decisions() == 0 && warm < 50 {
            let fan = format!("fan-{}", warm * 10);
            let data = json!({ "team": "B", "minute": 1 });
            let trigger = event(format!("w-{warm}"), "match.chance_missed", Some(fan), data);
            support::submit_committed(&store, vec![trigger], 1).await?;
            warm += 1;
        }
        if nba.decisions() == 0 {
            bail!("no warm-up trigger of {warm} led to an offer");
        }
        receive(&mut messages, nba.decisions(), Duration::from_secs(30), any).await?;

        // 1. Fan-out.
        let shown_before = nba.decisions();
        let control_before = nba.control();
        let started = Instant::now();
        support::submit_committed(
            &store,
            vec![event(
                "chance-1".into(),
                "match.chance_missed",
                None,
                json!({ "team": "A", "minute": 85 }),
            )],
            1,
        )
        .await?;
        // The trigger's answer covers its first chunk of fans; the rest
        // follow a chunk per turn of the writer, and a fan's own event
        // waits at most one chunk.
        let answered = started.elapsed();
        let cheer_sent = Instant::now();
        let cheer = event(
            "cheer-during-fan-out".into(),
            "fan.cheer",
            Some("fan-1".into()),
            json!({}),
        );
        support::submit_committed(&store, vec![cheer], 1).await?;
        let cheer_committed = cheer_sent.elapsed();
        let open_at_cheer = nba.fanouts_open();
        let deadline = Instant::now() + Duration::from_secs(120);
        while nba.fanouts_open() > 0 {
            if Instant::now() > deadline {
                bail!("the fan-out did not finish within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let committed = started.elapsed();
        let shown = nba.decisions() - shown_before;
        let (last, offer_size) =
            receive(&mut messages, shown, Duration::from_secs(120), any).await?;
        let published = last.duration_since(started);
        let fanout_shown = shown;
        println!(
            "fan-out: 1 venue-wide trigger, {customers} present customers, 20 offers: \
             {} decisions ({shown} shown, {} control): all committed with their publications in {} ms, \
             every offer message at the subscriber in {} ms; the trigger answered (first chunk) in {:.1} ms, \
             a fan's event sent then committed in {:.1} ms{}",
            shown + nba.control() - control_before,
            nba.control() - control_before,
            committed.as_millis(),
            published.as_millis(),
            answered.as_secs_f64() * 1e3,
            cheer_committed.as_secs_f64() * 1e3,
            if open_at_cheer > 0 {
                " (during the fan-out)"
            } else {
                " (after the fan-out had ended)"
            },
        );

        // 2. Per-customer triggers at 1,000/s, each for a Team B fan
        //    without an open offer of that kind (the warm-up used the
        //    first `warm`).
        let n = if quick { 1_000 } else { 5_000 };
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
        let shown_before = nba.decisions();
        let commits_before = store.stats().commit_duration();
        let mut tasks = Vec::new();
        let tick = Duration::from_millis(1);
        let mut next = Instant::now();
        for i in 0..n {
            next += tick;
            tokio::time::sleep_until(next.into()).await;
            let fan = format!("fan-{}", ((warm + i) * 10) % customers);
            let e = event(
                format!("c-{i}"),
                "match.chance_missed",
                Some(fan.clone()),
                json!({ "team": "B", "minute": 10 }),
            );
            let s = store.clone();
            let sent = sent.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                if let Ok(mut map) = sent.lock() {
                    map.insert(fan, t);
                }
                let r = s.submit(vec![e]).await;
                (t.elapsed(), r.is_ok())
            }));
        }
        let mut commits = Vec::new();
        for t in tasks {
            let (d, ok) = t.await?;
            if ok {
                commits.push(d);
            }
        }
        let shown = nba.decisions() - shown_before;
        // How much of a trigger's time is the commit itself (start of the
        // write transaction to durable), and how many commits it shares.
        let commits_after = store.stats().commit_duration();
        let transactions = commits_after.count() - commits_before.count();
        let mean_commit_ms =
            (commits_after.sum - commits_before.sum) * 1e3 / transactions.max(1) as f64;
        let mut delivered = Vec::new();
        receive(&mut messages, shown, Duration::from_secs(30), |customer, at| {
            let sent_at = sent.lock().ok().and_then(|m| m.get(customer).copied());
            match sent_at {
                Some(t) => delivered.push(at.duration_since(t)),
                None => bail!("an offer for {customer}, who had no trigger"),
            }
            Ok(())
        })
        .await?;
        commits.sort();
        delivered.sort();
        println!(
            "per-customer triggers at 1,000/s ({n} triggers, {} committed, {shown} offers shown, the rest control): \
             trigger → offer message at the subscriber p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             trigger → committed p50 {:.2} ms, p99 {:.2} ms; \
             {transactions} write transactions meanwhile ({:.2} per trigger), {mean_commit_ms:.2} ms each on average",
            commits.len(),
            percentile(&delivered, 0.50),
            percentile(&delivered, 0.99),
            percentile(&delivered, 1.0),
            percentile(&commits, 0.50),
            percentile(&commits, 0.99),
            transactions as f64 / n as f64,
        );
        daemon.shutdown(Duration::from_millis(100)).await;

        // 3. The broker and the subscriber alone, for scale.
        let bare = bare_publish(broker.port, &mut messages, fanout_shown, offer_size).await?;
        println!(
            "bare rumqttc publisher, same broker and subscriber: {fanout_shown} QoS 1 messages of {offer_size} bytes \
             at the subscriber in {} ms (the daemon's fan-out: {} ms after its commit)",
            bare.as_millis(),
            published.saturating_sub(committed).as_millis()
        );
        anyhow::Ok(())
    })
}
