//! The engine against a reference model: random event streams, with
//! duplicates, shuffles within the rules' lateness and restarts of the
//! store between chunks, must produce exactly the awards a small, obviously
//! correct model computes from the deduplicated, time-ordered stream.
//!
//! The rules cover the order-independent measures (count, sum, distinct,
//! max), calendar windows (lifetime, day, tumbling) and a group goal; for
//! them, any arrival order within the lateness yields the same awards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proptest::prelude::*;
use serde_json::json;
use touchline::engine::pseudonym::DEFAULT_KEY_FILE;
use touchline::engine::Pseudonymizer;
use touchline::event::Event;
use touchline::store::{Store, StoreHandle, StoreOptions, WriterThread};
use touchline_proto::RecordBody;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const CUSTOMERS: usize = 5;
/// How far an event may arrive out of order (below every rule's lateness).
const MAX_SHUFFLE: i64 = 5 * MIN;

const RULES: &str = r#"
[[achievement]]
id = "count"
name = "Count"
on = ["x"]
measure = "count"
window = "lifetime"
tiers = [ { at = 2 }, { at = 5 } ]

[[achievement]]
id = "sum"
name = "Sum per hour"
on = ["x"]
measure = "sum"
value = "data.v"
window = "tumbling:1h"
lateness = "10m"
tiers = [ { at = 10 }, { at = 25 } ]

[[achievement]]
id = "zones"
name = "Zones per day"
on = ["x"]
measure = "distinct"
key = "data.zone"
window = "day"
lateness = "10m"
tiers = [ { at = 2 }, { at = 3 } ]

[[achievement]]
id = "peak"
name = "Peak"
on = ["x"]
measure = "max"
value = "data.v"
window = "lifetime"
tiers = [ { at = 5 }, { at = 8 } ]

[[achievement]]
id = "high"
name = "High per half hour"
on = ["x"]
when = "data.v >= 3"
measure = "count"
window = "tumbling:30m"
lateness = "10m"
tiers = [ { at = 2 } ]

[[achievement]]
id = "team"
name = "Team hour"
on = ["x"]
measure = "count"
scope = "group"
group_by = "data.team"
min_contribution = 2
window = "tumbling:1h"
lateness = "10m"
tiers = [ { at = 4 } ]
"#;

#[derive(Debug, Clone)]
struct Ev {
    id: usize,
    customer: usize,
    time_ms: i64,
    v: i64,
    zone: u8,
}

fn team(customer: usize) -> &'static str {
    if customer.is_multiple_of(2) {
        "red"
    } else {
        "blue"
    }
}

fn event(base: i64, e: &Ev) -> Event {
    Event {
        id: format!("e{}", e.id),
        source: "model".into(),
        kind: "x".into(),
        subject: Some(format!("c{}", e.customer)),
        time_ms: base + e.time_ms,
        data: json!({ "v": e.v, "zone": format!("z{}", e.zone), "team": team(e.customer) }),
    }
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn day(ms: i64) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

fn span(ms: i64, width: i64, name: &str) -> String {
    format!("{}/{name}", rfc3339(ms.div_euclid(width) * width))
}

type Award = (String, String, String, u32);

/// The awards the rules must make for `events` (deduplicated by id).
fn model(base: i64, events: &[Ev]) -> BTreeSet<Award> {
    let mut seen = BTreeSet::new();
    let mut unique: Vec<&Ev> = events.iter().filter(|e| seen.insert(e.id)).collect();
    unique.sort_by_key(|e| (e.time_ms, e.id));
    let mut out = BTreeSet::new();
    let mut tiers = |c: &str, rule: &str, window: String, value: f64, ats: &[f64]| {
        for (i, at) in ats.iter().enumerate() {
            if value >= *at {
                out.insert((
                    c.to_string(),
                    rule.to_string(),
                    window.clone(),
                    i as u32 + 1,
                ));
            }
        }
    };
    let mut count: BTreeMap<usize, f64> = BTreeMap::new();
    let mut sum: BTreeMap<(usize, String), f64> = BTreeMap::new();
    let mut zones: BTreeMap<(usize, String), BTreeSet<u8>> = BTreeMap::new();
    let mut peak: BTreeMap<usize, f64> = BTreeMap::new();
    let mut high: BTreeMap<(usize, String), f64> = BTreeMap::new();
    let mut teams: BTreeMap<(&str, String), f64> = BTreeMap::new();
    let mut shares: BTreeMap<(usize, String), f64> = BTreeMap::new();
    for e in unique {
        let t = base + e.time_ms;
        *count.entry(e.customer).or_default() += 1.0;
        *sum.entry((e.customer, span(t, HOUR, "1h"))).or_default() += e.v as f64;
        zones
            .entry((e.customer, day(t)))
            .or_default()
            .insert(e.zone);
        let p = peak.entry(e.customer).or_insert(f64::MIN);
        *p = p.max(e.v as f64);
        if e.v >= 3 {
            *high
                .entry((e.customer, span(t, 30 * MIN, "30m")))
                .or_default() += 1.0;
        }
        *teams
            .entry((team(e.customer), span(t, HOUR, "1h")))
            .or_default() += 1.0;
        *shares.entry((e.customer, span(t, HOUR, "1h"))).or_default() += 1.0;
    }
    let name = |c: usize| format!("c{c}");
    for (c, v) in count {
        tiers(&name(c), "count", "lifetime".into(), v, &[2.0, 5.0]);
    }
    for ((c, w), v) in sum {
        tiers(&name(c), "sum", w, v, &[10.0, 25.0]);
    }
    for ((c, w), z) in zones {
        tiers(&name(c), "zones", w, z.len() as f64, &[2.0, 3.0]);
    }
    for (c, v) in peak {
        tiers(&name(c), "peak", "lifetime".into(), v, &[5.0, 8.0]);
    }
    for ((c, w), v) in high {
        tiers(&name(c), "high", w, v, &[2.0]);
    }
    for ((c, w), share) in shares {
        let goal = teams.get(&(team(c), w.clone())).copied().unwrap_or(0.0);
        if share >= 2.0 && goal >= 4.0 {
            out.insert((name(c), "team".into(), w, 1));
        }
    }
    out
}

/// Opens the store; `crash_at_stop` makes its stop leave the journal
/// unreplayed, as `kill -9` would.
fn open(dir: &Path, crash_at_stop: bool) -> (StoreHandle, WriterThread) {
    let site = edge_config::load_site_config(&dir.join("site.toml")).expect("site config");
    let rules = edge_config::load_rules(&site).expect("rules");
    let options = StoreOptions {
        skip_final_checkpoint: crash_at_stop,
        ..StoreOptions::default()
    };
    Store::open_with(&site, &rules, options).expect("store opens")
}

async fn close(handle: StoreHandle, writer: WriterThread) {
    handle.shutdown().await;
    drop(handle);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .unwrap()
        .expect("writer did not panic");
}

/// Sends `stream` in `chunks` submissions, restarting the store between
/// them (cleanly, or as after a crash when the chunk says so), and
/// returns the awards in the outbox.
async fn run(dir: &Path, base: i64, stream: &[Ev], chunks: &[(usize, bool)]) -> BTreeSet<Award> {
    let mut rest = stream;
    let mut crash = chunks.first().is_some_and(|c| c.1);
    let (mut handle, mut writer) = open(dir, crash);
    for (i, &(n, _)) in chunks.iter().enumerate() {
        let (now, later) = rest.split_at(n.min(rest.len()));
        rest = later;
        let events: Vec<Event> = now.iter().map(|e| event(base, e)).collect();
        for batch in events.chunks(7) {
            handle.submit(batch.to_vec()).await.expect("committed");
        }
        close(handle, writer).await;
        crash = chunks.get(i + 1).is_some_and(|c| c.1);
        (handle, writer) = open(dir, crash);
    }
    let events: Vec<Event> = rest.iter().map(|e| event(base, e)).collect();
    if !events.is_empty() {
        handle.submit(events).await.expect("committed");
    }
    let key = std::fs::read(dir.join("data").join(DEFAULT_KEY_FILE)).unwrap();
    let names: BTreeMap<String, String> = (0..CUSTOMERS)
        .map(|c| {
            let id = format!("c{c}");
            (Pseudonymizer::keyed(&key).pseudonym(&id), id)
        })
        .collect();
    let (records, _) = handle.read_outbox(0, usize::MAX, usize::MAX).await.unwrap();
    close(handle, writer).await;
    records
        .into_iter()
        .filter_map(|r| match r.body {
            RecordBody::AchievementAwarded(a) => Some((
                names.get(&a.customer).cloned().unwrap_or(a.customer),
                a.achievement,
                a.window,
                a.tier,
            )),
            _ => None,
        })
        .collect()
}

fn streams() -> impl Strategy<Value = (Vec<Ev>, Vec<(usize, bool)>)> {
    let raw = prop::collection::vec(
        (
            0..CUSTOMERS,
            0i64..30 * MIN,
            0i64..10,
            0u8..4,
            0i64..MAX_SHUFFLE,
        ),
        1..90,
    );
    (
        raw,
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        prop::collection::vec((0usize..90, any::<bool>()), 0..3),
    )
        .prop_map(|(raw, dups, restarts)| {
            // Event times ascend by random steps (crossing hour, half-hour
            // and day boundaries); arrival order is time plus a jitter
            // below the lateness.
            let mut t = 23 * HOUR;
            let mut events: Vec<(i64, Ev)> = raw
                .into_iter()
                .enumerate()
                .map(|(id, (customer, step, v, zone, jitter))| {
                    t += step;
                    (
                        t + jitter,
                        Ev {
                            id,
                            customer,
                            time_ms: t,
                            v,
                            zone,
                        },
                    )
                })
                .collect();
            events.sort_by_key(|(arrival, e)| (*arrival, e.id));
            let mut stream: Vec<Ev> = events.into_iter().map(|(_, e)| e).collect();
            // Redeliveries: copies of earlier events, later in the stream.
            for d in dups {
                let original = stream[d.index(stream.len())].clone();
                stream.push(original);
            }
            let mut restarts = restarts;
            restarts.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for (r, crash) in restarts {
                let r = r.min(stream.len());
                chunks.push((r - last.min(r), crash));
                last = last.max(r);
            }
            (stream, chunks)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn awards_match_the_reference_model((stream, chunks) in streams(), journal in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/model.toml"), RULES).unwrap();
        // In journal mode a checkpoint falls every few submissions, so a
        // crash leaves part of the state written back and part journaled.
        let state = if journal {
            "rule_state = \"journal\"\ncheckpoint_max_events = 10\n"
        } else {
            "rule_state = \"direct\"\n"
        };
        std::fs::write(
            dir.path().join("site.toml"),
            format!(
                "[site]\nid = \"model\"\ndata_dir = \"data\"\nrules = [\"rules/*.toml\"]\n\n\
                 [store]\nmap_size = \"64MiB\"\nsync = \"none\"\n{state}\n[outbox]\nmax_bytes = \"32MiB\"\n"
            ),
        )
        .unwrap();
        // Three days back at midnight UTC: days and spans are predictable
        // and the watermark (capped at the wall clock) is never the cap.
        let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let base = (now - 3 * DAY).div_euclid(DAY) * DAY;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(run(dir.path(), base, &stream, &chunks));
        let want = model(base, &stream);
        prop_assert_eq!(got, want);
    }
}
