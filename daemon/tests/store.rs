//! The store and engine seed against a real LMDB environment in a temp
//! dir: exactly-once awards, dedup and its expiry, outbox bounds, map-full
//! handling, sequence numbers across restarts, predicates, dead letters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_config::{
    AchievementRule, Http, Ingest, Measure, Outbox, RuleBundle, Site, SiteConfig,
    Store as StoreCfg, SyncMode, Tier, Validation, WhenFull, Window,
};
use serde_json::json;
use touchline::engine::pseudonym::DEFAULT_KEY_FILE;
use touchline::engine::Pseudonymizer;
use touchline::event::{DeadLetter, Event, EventOutcome, SubmitError};
use touchline::store::{
    read_dead_letters, read_outbox_summary, Store, StoreError, StoreHandle, StoreOptions,
    WriterThread,
};
use touchline_proto::{Record, RecordBody};

const T0: i64 = 1_750_000_000_000;

fn site(dir: &Path) -> SiteConfig {
    SiteConfig {
        source: dir.join("touchline.toml"),
        site: Site {
            id: "arena-test".into(),
            data_dir: dir.join("data"),
            rules: vec![],
            timezone: Default::default(),
        },
        ingest: Ingest {
            mqtt: None,
            http: Some(Http {
                listen: "127.0.0.1:0".parse().unwrap(),
                max_body: 16 << 20,
            }),
            validation: Validation {
                max_event_size: 64 << 10,
                max_future_skew: Duration::from_secs(300),
                max_age: Duration::from_secs(7 * 86400),
                dedup_retention: Duration::from_secs(86400),
                venue_types: vec!["venue.*".into(), "match.*".into()],
                dlq_max: 1000,
            },
        },
        store: StoreCfg {
            map_size: 64 << 20,
            commit_max_events: 4096,
            commit_max_delay: Duration::from_millis(2),
            sync: SyncMode::NoMetaSync,
            ..StoreCfg::default()
        },
        uplink: None,
        outbox: Outbox {
            max_bytes: 1 << 30,
            when_full: WhenFull::Block,
        },
        admin: None,
        nba: Default::default(),
    }
}

fn rule(id: &str, on: &str, when: Option<&str>, tiers: &[f64]) -> AchievementRule {
    AchievementRule {
        id: id.into(),
        name: id.into(),
        version: 1,
        on: vec![on.into()],
        when: when.map(Into::into),
        measure: Measure::Count,
        window: Window::Lifetime,
        lateness: Duration::from_secs(30),
        scope: edge_config::Scope::Customer,
        limits: Default::default(),
        sources: None,
        referral: None,
        tiers: tiers
            .iter()
            .enumerate()
            .map(|(i, at)| Tier {
                at: *at,
                badge: Some(format!("{id}-{}", i + 1)),
                points: BTreeMap::from([
                    ("xp".to_string(), 10 * (i as i64 + 1)),
                    ("coins".to_string(), 1),
                ]),
                voucher: None,
            })
            .collect(),
        file: PathBuf::from("rules/test.toml"),
        line: 1,
    }
}

fn bundle(rules: Vec<AchievementRule>) -> RuleBundle {
    RuleBundle {
        achievements: rules,
        offers: Vec::new(),
        voucher_pools: Vec::new(),
        timezone: Default::default(),
        files: vec![PathBuf::from("rules/test.toml")],
        sources: Vec::new(),
    }
}

/// `rules` plus the offers of `toml` (as if read from `rules/offers.toml`).
fn with_offers(rules: Vec<AchievementRule>, toml: &str) -> RuleBundle {
    let mut bundle = bundle(rules);
    bundle.offers = edge_config::parse_offers(toml, Path::new("rules/offers.toml")).unwrap();
    bundle
}

fn ev(id: &str, kind: &str, subject: Option<&str>, data: serde_json::Value) -> Event {
    Event {
        id: id.into(),
        source: "test".into(),
        kind: kind.into(),
        subject: subject.map(Into::into),
        time_ms: T0 + id.len() as i64,
        data,
    }
}

/// `fan`'s profile event opting in to marketing (offers need it).
fn consenting(fan: &str) -> Event {
    let consent = json!({ "consent": { "marketing": true } });
    ev(&format!("p-{fan}"), "customer.profile", Some(fan), consent)
}

fn cheer(id: &str, fan: &str) -> Event {
    ev(id, "fan.cheer", Some(fan), json!({"intensity": 3}))
}

fn open(cfg: &SiteConfig, rules: &RuleBundle) -> (StoreHandle, WriterThread) {
    Store::open(cfg, rules).expect("store opens")
}

fn open_with_clock(
    cfg: &SiteConfig,
    rules: &RuleBundle,
    clock: Arc<AtomicI64>,
) -> (StoreHandle, WriterThread) {
    let options = StoreOptions {
        clock: Some(Arc::new(move || clock.load(Ordering::SeqCst))),
        ..Default::default()
    };
    Store::open_with(cfg, rules, options).expect("store opens")
}

async fn close(handle: StoreHandle, writer: WriterThread) {
    handle.shutdown().await;
    drop(handle);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .unwrap()
        .expect("writer did not panic");
}

async fn all_records(handle: &StoreHandle) -> Vec<Record> {
    handle
        .read_outbox(0, usize::MAX, usize::MAX)
        .await
        .unwrap()
        .0
}

fn pseudonym(cfg: &SiteConfig, customer: &str) -> String {
    let key = std::fs::read(cfg.site.data_dir.join(DEFAULT_KEY_FILE)).unwrap();
    Pseudonymizer::keyed(&key).pseudonym(customer)
}

fn award(record: &Record) -> &touchline_proto::AchievementAwarded {
    match &record.body {
        RecordBody::AchievementAwarded(a) => a,
        other => panic!("expected an award, got {}", other.kind()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awards_each_tier_exactly_once_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[3.0, 5.0])]);

    let (h, w) = open(&cfg, &rules);
    let events: Vec<Event> = (0..4).map(|i| cheer(&format!("a{i}"), "fan-1")).collect();
    let outcomes = h.submit(events).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            EventOutcome::Committed { records: 0 },
            EventOutcome::Committed { records: 0 },
            EventOutcome::Committed { records: 1 },
            EventOutcome::Committed { records: 0 },
        ]
    );
    let records = all_records(&h).await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.site, "arena-test");
    assert_eq!(r.seq, 1);
    assert_eq!(r.at_ms, T0 + 2);
    let a = award(r);
    assert_eq!(a.customer, pseudonym(&cfg, "fan-1"));
    assert_ne!(a.customer, "fan-1");
    assert_eq!(a.achievement, "cheer");
    assert_eq!(a.version, 1);
    assert_eq!(a.tier, 1);
    assert_eq!(a.badge.as_deref(), Some("cheer-1"));
    assert_eq!(
        a.points,
        vec![("coins".to_string(), 1), ("xp".to_string(), 10)]
    );
    assert_eq!(a.window, "lifetime");
    assert_eq!(a.value, 3.0);
    close(h, w).await;

    // After a restart the count goes on from 4: tier 2 at the 5th event,
    // and nothing more however many follow.
    let (h, w) = open(&cfg, &rules);
    let events: Vec<Event> = (0..20).map(|i| cheer(&format!("b{i}"), "fan-1")).collect();
    let outcomes = h.submit(events).await.unwrap();
    let produced: u32 = outcomes
        .iter()
        .map(|o| match o {
            EventOutcome::Committed { records } => *records,
            EventOutcome::Duplicate => panic!("unexpected duplicate"),
        })
        .sum();
    assert_eq!(produced, 1);
    assert_eq!(outcomes[0], EventOutcome::Committed { records: 1 });
    let records = all_records(&h).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].seq, 2);
    assert_eq!(award(&records[1]).tier, 2);
    assert_eq!(award(&records[1]).value, 5.0);
    assert_eq!(h.stats().records_appended(), 1);
    assert_eq!(h.stats().events_committed(), 20);
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_within_and_across_submissions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[2.0])]);
    let (h, w) = open(&cfg, &rules);

    let mut other_source = cheer("e1", "fan-1");
    other_source.source = "elsewhere".into();
    let outcomes = h
        .submit(vec![
            cheer("e1", "fan-1"),
            cheer("e1", "fan-1"),
            other_source,
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            EventOutcome::Committed { records: 0 },
            EventOutcome::Duplicate,
            EventOutcome::Committed { records: 1 },
        ]
    );
    let outcomes = h
        .submit(vec![cheer("e1", "fan-1"), cheer("e2", "fan-1")])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            EventOutcome::Duplicate,
            EventOutcome::Committed { records: 0 }
        ]
    );

    // Long ids are hashed into the key, and still deduplicated.
    let long = "x".repeat(2000);
    let outcomes = h
        .submit(vec![cheer(&long, "fan-2"), cheer(&long, "fan-2")])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            EventOutcome::Committed { records: 0 },
            EventOutcome::Duplicate
        ]
    );

    let stats = h.stats();
    assert_eq!(stats.duplicates(), 3);
    assert_eq!(stats.events_committed(), 4);
    // A duplicate did not count towards the rule: fan-1 has 3 events, one award.
    assert_eq!(all_records(&h).await.len(), 1);
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_keys_expire_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.ingest.validation.dedup_retention = Duration::from_secs(1);
    let rules = bundle(vec![]);
    let clock = Arc::new(AtomicI64::new(T0));
    let (h, w) = open_with_clock(&cfg, &rules, clock.clone());

    let batch = vec![cheer("a", "f"), cheer("b", "f"), cheer("c", "f")];
    assert!(h
        .submit(batch)
        .await
        .unwrap()
        .iter()
        .all(|o| *o != EventOutcome::Duplicate));

    clock.store(T0 + 999, Ordering::SeqCst);
    assert_eq!(
        h.submit(vec![cheer("a", "f")]).await.unwrap(),
        vec![EventOutcome::Duplicate]
    );
    assert_eq!(h.stats().dedup_expired(), 0);

    // Past the retention: the next commit sweeps the three old keys, and
    // "a" is new again.
    clock.store(T0 + 5000, Ordering::SeqCst);
    assert_eq!(
        h.submit(vec![cheer("d", "f")]).await.unwrap(),
        vec![EventOutcome::Committed { records: 0 }]
    );
    assert_eq!(h.stats().dedup_expired(), 3);
    assert_eq!(
        h.submit(vec![cheer("a", "f")]).await.unwrap(),
        vec![EventOutcome::Committed { records: 0 }]
    );
    assert_eq!(
        h.submit(vec![cheer("a", "f")]).await.unwrap(),
        vec![EventOutcome::Duplicate]
    );

    // With no traffic the writer sweeps on its own.
    clock.store(T0 + 60_000, Ordering::SeqCst);
    let stats = h.stats();
    assert!(
        touchline_tests::wait_until(Duration::from_secs(10), || stats.dedup_expired() == 5),
        "idle sweep removed {} keys",
        stats.dedup_expired()
    );
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_refuses_when_full_and_recovers_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.outbox.max_bytes = 1;
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]);
    let (h, w) = open(&cfg, &rules);

    assert_eq!(
        h.submit(vec![cheer("e1", "fan-1")]).await.unwrap(),
        vec![EventOutcome::Committed { records: 1 }]
    );
    assert!(h.stats().outbox_bytes() >= 1);
    assert_eq!(
        h.submit(vec![cheer("e2", "fan-2")]).await,
        Err(SubmitError::OutboxFull)
    );
    assert_eq!(
        h.submit(vec![cheer("e2", "fan-2")]).await,
        Err(SubmitError::OutboxFull)
    );
    assert_eq!(h.stats().outbox_full_refusals(), 2);

    h.ack_outbox(1).await.unwrap();
    assert_eq!(h.stats().outbox_records(), 0);
    assert_eq!(h.stats().outbox_bytes(), 0);
    assert_eq!(h.stats().records_acked(), 1);
    // Nothing of the refused submission was applied: not a duplicate now.
    assert_eq!(
        h.submit(vec![cheer("e2", "fan-2")]).await.unwrap(),
        vec![EventOutcome::Committed { records: 1 }]
    );
    let records = all_records(&h).await;
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
    close(h, w).await;
}

/// The outbox bytes of the record one cheer gives under `rules` (one
/// tier at 1), measured on the store, which is left empty.
async fn one_record_bytes(cfg: &SiteConfig, rules: &RuleBundle) -> u64 {
    let (h, w) = open(cfg, rules);
    h.submit(vec![cheer("probe", "fan-0")]).await.unwrap();
    let one = h.stats().outbox_bytes();
    h.ack_outbox(u64::MAX).await.unwrap();
    close(h, w).await;
    one
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_drops_counts_and_advances_dropped_through() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.outbox.when_full = WhenFull::DropOldest;
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]);

    let one = one_record_bytes(&cfg, &rules).await;

    cfg.outbox.max_bytes = one * 2 + one / 2;
    let (h, w) = open(&cfg, &rules);
    for i in 1..=5 {
        let outcomes = h
            .submit(vec![cheer(&format!("e{i}"), &format!("fan-{i}"))])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![EventOutcome::Committed { records: 1 }]);
    }
    let stats = h.stats();
    assert!(stats.outbox_bytes() <= cfg.outbox.max_bytes);
    assert_eq!(stats.outbox_records(), 2);
    assert_eq!(stats.records_dropped(), 3);
    let (records, dropped_through) = h.read_outbox(0, 100, usize::MAX).await.unwrap();
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert_eq!(dropped_through, 4);
    assert_eq!(stats.dropped_through(), 4);
    close(h, w).await;
}

/// Drop-oldest gives records up, but never an erasure: the central side
/// must still delete what it holds of the customer. The erasure goes
/// back at the end of the outbox with a new sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_erasure_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.outbox.when_full = WhenFull::DropOldest;
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]);
    let one = one_record_bytes(&cfg, &rules).await;

    cfg.outbox.max_bytes = one * 3;
    let (h, w) = open(&cfg, &rules);
    h.submit(vec![cheer("e1", "fan-1")]).await.unwrap();
    h.submit(vec![ev(
        "x1",
        "customer.erased",
        Some("fan-gone"),
        json!({}),
    )])
    .await
    .unwrap();
    let erasure_seq = all_records(&h).await.last().map(|r| r.seq).unwrap();
    for i in 2..=6 {
        h.submit(vec![cheer(&format!("e{i}"), &format!("fan-{i}"))])
            .await
            .unwrap();
    }
    let stats = h.stats();
    let (records, dropped_through) = h.read_outbox(0, 100, usize::MAX).await.unwrap();
    assert!(
        dropped_through >= erasure_seq,
        "the erasure's first place was in the dropped range"
    );
    let erasures: Vec<&Record> = records
        .iter()
        .filter(|r| matches!(r.body, RecordBody::CustomerErased(_)))
        .collect();
    assert_eq!(erasures.len(), 1, "{records:?}");
    let RecordBody::CustomerErased(kept) = &erasures[0].body else {
        unreachable!()
    };
    assert_eq!(kept.customer, pseudonym(&cfg, "fan-gone"));
    assert!(erasures[0].seq > dropped_through);
    // Only awards were given up; the outbox holds the rest in order.
    assert_eq!(stats.records_dropped() + records.len() as u64, 7);
    assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_full_is_refused_not_fatal_and_acks_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.store.map_size = 512 << 10;
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]);
    let (h, w) = open(&cfg, &rules);

    let pad = "p".repeat(200);
    let mut accepted = 0usize;
    let mut store_full = false;
    for round in 0..500 {
        let events: Vec<Event> = (0..50)
            .map(|i| {
                cheer(
                    &format!("{pad}-{round}-{i}"),
                    &format!("{pad}-fan-{round}-{i}"),
                )
            })
            .collect();
        match h.submit(events).await {
            Ok(outcomes) => accepted += outcomes.len(),
            Err(SubmitError::StoreFull) => {
                store_full = true;
                break;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(store_full, "map never filled after {accepted} events");
    assert!(accepted > 0);
    let stats = h.stats();
    assert_eq!(stats.map_full_events(), 50);
    // Everything accepted is there; nothing of the refused batch is.
    assert_eq!(stats.outbox_records() as usize, accepted);
    let (first, _) = h.read_outbox(0, 10, usize::MAX).await.unwrap();
    assert_eq!(first.len(), 10);

    // Fill what is left with single events until those are refused too.
    let mut singles_refused = false;
    for i in 0..2000 {
        let e = cheer(
            &format!("{pad}-single-{i}"),
            &format!("{pad}-fan-single-{i}"),
        );
        match h.submit(vec![e]).await {
            Ok(_) => accepted += 1,
            Err(SubmitError::StoreFull) => {
                singles_refused = true;
                break;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(singles_refused);
    assert_eq!(stats.outbox_records() as usize, accepted);

    // Acks still commit, and the space they free takes new events again.
    h.ack_outbox(u64::MAX).await.unwrap();
    assert_eq!(stats.outbox_records(), 0);
    assert_eq!(stats.outbox_bytes(), 0);
    let e = cheer(&format!("{pad}-after"), &format!("{pad}-fan-after"));
    assert_eq!(
        h.submit(vec![e]).await,
        Ok(vec![EventOutcome::Committed { records: 1 }])
    );
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_strictly_increase_across_acks_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0, 2.0])]);
    let mut seen = Vec::new();
    for round in 0..3 {
        let (h, w) = open(&cfg, &rules);
        let events: Vec<Event> = (0..4)
            .flat_map(|i| {
                let fan = format!("fan-{round}-{i}");
                [
                    cheer(&format!("{fan}-x"), &fan),
                    cheer(&format!("{fan}-y"), &fan),
                ]
            })
            .collect();
        h.submit(events).await.unwrap();
        let records = all_records(&h).await;
        assert_eq!(records.len(), 8);
        seen.extend(records.iter().map(|r| r.seq));
        // Ack everything: the next round must still not reuse numbers.
        h.ack_outbox(records.last().unwrap().seq).await.unwrap();
        assert_eq!(h.stats().outbox_records(), 0);
        close(h, w).await;
    }
    assert_eq!(seen, (1..=24).collect::<Vec<u64>>());

    let summary = read_outbox_summary(&cfg.site.data_dir, cfg.store.map_size)
        .unwrap()
        .unwrap();
    assert_eq!(summary.next_seq, 25);
    assert_eq!(summary.records, 0);
    assert_eq!(summary.oldest_seq, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_predicate_filters_and_runtime_errors_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![
        rule("loud", "fan.cheer", Some("data.intensity >= 2"), &[2.0]),
        rule("any", "fan.cheer", None, &[5.0]),
        rule(
            "home",
            "fan.cheer",
            Some("event.subject == 'fan-1' && data.team == 'home'"),
            &[1.0],
        ),
    ]);
    let (h, w) = open(&cfg, &rules);
    let events = vec![
        ev(
            "e1",
            "fan.cheer",
            Some("fan-1"),
            json!({"intensity": 1, "team": "home"}),
        ),
        ev("e2", "fan.cheer", Some("fan-1"), json!({"intensity": 2})),
        ev(
            "e3",
            "fan.cheer",
            Some("fan-1"),
            json!({"intensity": "high"}),
        ),
        ev("e4", "fan.cheer", Some("fan-1"), json!({})),
        ev("e5", "fan.cheer", Some("fan-1"), json!({"intensity": 7.5})),
        // Other types and venue-wide events meet no customer rule.
        ev("e6", "fan.wave", Some("fan-1"), json!({"intensity": 9})),
        ev("e7", "fan.cheer", None, json!({"intensity": 9})),
    ];
    let outcomes = h.submit(events).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            EventOutcome::Committed { records: 1 }, // home
            EventOutcome::Committed { records: 0 },
            EventOutcome::Committed { records: 0 },
            EventOutcome::Committed { records: 0 },
            EventOutcome::Committed { records: 2 }, // loud (2nd match) + any (5th event)
            EventOutcome::Committed { records: 0 },
            EventOutcome::Committed { records: 0 },
        ]
    );
    let es = h.engine_stats();
    let loud = es.rule("loud").unwrap();
    assert_eq!(loud.matched(), 2);
    assert_eq!(loud.predicate_errors(), 2); // "high" >= 2 and a missing field
    assert_eq!(es.rule("any").unwrap().matched(), 5);
    // `data.team` is missing in most events: errors, never matches.
    assert_eq!(es.rule("home").unwrap().matched(), 1);
    let records = all_records(&h).await;
    let ids: Vec<(&str, u32)> = records
        .iter()
        .map(|r| (award(r).achievement.as_str(), award(r).tier))
        .collect();
    assert_eq!(ids, vec![("home", 1), ("loud", 1), ("any", 1)]);
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_bounded_and_readable_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.ingest.validation.dlq_max = 3;
    let rules = bundle(vec![]);
    let (h, w) = open(&cfg, &rules);
    for i in 0..5 {
        h.dead_letter(vec![DeadLetter {
            at_ms: T0 + i,
            origin: "http:127.0.0.1:1".into(),
            reason: "bad_json".into(),
            detail: format!("sample {i}"),
            sample: "é".repeat(1000),
        }])
        .await;
    }
    // Commands are applied in order: once this commits, so have they.
    h.submit(vec![cheer("e1", "f")]).await.unwrap();
    assert_eq!(h.stats().dead_letters_stored(), 5);
    assert_eq!(
        read_dead_letters(&cfg.site.data_dir, cfg.store.map_size, 10)
            .unwrap_err()
            .to_string(),
        StoreError::AlreadyOpen {
            path: cfg.site.data_dir.clone()
        }
        .to_string(),
        "same-process readers are refused cleanly"
    );
    close(h, w).await;

    let samples = read_dead_letters(&cfg.site.data_dir, cfg.store.map_size, 10).unwrap();
    let details: Vec<&str> = samples.iter().map(|s| s.detail.as_str()).collect();
    assert_eq!(details, vec!["sample 2", "sample 3", "sample 4"]);
    assert!(samples.iter().all(|s| s.sample.len() <= 1024));
    let newest = read_dead_letters(&cfg.site.data_dir, cfg.store.map_size, 1).unwrap();
    assert_eq!(newest[0].detail, "sample 4");

    let empty = tempfile::tempdir().unwrap();
    assert!(read_dead_letters(empty.path(), 1 << 20, 10)
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_consent_stops_tracking_until_given_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[2.0, 4.0])]);
    let (h, w) = open(&cfg, &rules);
    let profile = |id: &str, data| ev(id, "customer.profile", Some("fan-1"), data);

    h.submit(vec![
        profile(
            "p1",
            json!({"section": "101", "consent": {"gamification": false}}),
        ),
        cheer("c1", "fan-1"),
        cheer("c2", "fan-1"),
        cheer("c3", "fan-1"),
    ])
    .await
    .unwrap();
    assert!(all_records(&h).await.is_empty(), "no award without consent");
    // The profile event that withdraws consent is itself not tracked.
    assert_eq!(h.stats().events_not_tracked(), 4);
    assert_eq!(
        h.stats().events_committed(),
        4,
        "still deduplicated and committed"
    );

    // Consent again: counting starts from what was tracked (nothing).
    h.submit(vec![
        profile("p2", json!({"consent": {"gamification": true}})),
        cheer("c4", "fan-1"),
    ])
    .await
    .unwrap();
    assert!(
        all_records(&h).await.is_empty(),
        "one tracked cheer is below tier 1"
    );
    h.submit(vec![cheer("c5", "fan-1")]).await.unwrap();
    let records = all_records(&h).await;
    assert_eq!(records.len(), 1);
    assert_eq!(award(&records[0]).tier, 1);
    close(h, w).await;
}

/// The writer remembers profiles between events; a profile change in a
/// transaction that rolls back must be forgotten with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_change_in_a_refused_batch_is_never_seen() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.store.map_size = 512 << 10;
    let rules = bundle(vec![
        rule("cheer", "fan.cheer", None, &[2.0]),
        rule("hello", "fan.wave", None, &[1.0]),
    ]);
    let (h, w) = open(&cfg, &rules);
    let profile = |id: &str, data| ev(id, "customer.profile", Some("fan-1"), data);
    let consent = |given: bool| json!({"consent": {"gamification": given}});
    h.submit(vec![profile("p-yes", consent(true)), cheer("c1", "fan-1")])
        .await
        .unwrap();

    // A full map refuses a batch withdrawing fan-1's consent with the
    // wave it carries.
    fill_with_waves(&h).await;
    assert_eq!(
        h.submit(vec![profile("p-no", consent(false)), wave("refused")])
            .await,
        Err(SubmitError::StoreFull)
    );
    let not_tracked = h.stats().events_not_tracked();

    // Room again; fan-1's consent is what the last commit left: given.
    h.ack_outbox(u64::MAX).await.unwrap();
    h.submit(vec![cheer("c2", "fan-1")]).await.unwrap();
    assert_eq!(h.stats().events_not_tracked(), not_tracked);
    let records = all_records(&h).await;
    let cheers: Vec<_> = records
        .iter()
        .filter(
            |r| matches!(&r.body, RecordBody::AchievementAwarded(a) if a.achievement == "cheer"),
        )
        .collect();
    assert_eq!(cheers.len(), 1, "fan-1's second cheer reaches the tier");
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_deletes_every_trace_and_tells_the_central_side() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![
        rule("cheer", "fan.cheer", None, &[2.0, 4.0]),
        // Counts only for a fan whose profile names a team.
        rule("team-wave", "fan.wave", Some("has(profile.team)"), &[1.0]),
    ]);
    let (h, w) = open(&cfg, &rules);
    h.dead_letter(vec![
        DeadLetter {
            at_ms: T0,
            origin: "http:127.0.0.1:1".into(),
            reason: "bad_time".into(),
            detail: "time is not RFC 3339".into(),
            sample: r#"{"subject":"fan-erase","time":"yesterday"}"#.into(),
        },
        // Named only by the topic it came on.
        DeadLetter {
            at_ms: T0,
            origin: "mqtt:venue/fans/fan-erase/events".into(),
            reason: "invalid_json".into(),
            detail: "invalid JSON".into(),
            sample: "{".into(),
        },
        DeadLetter {
            at_ms: T0,
            origin: "mqtt:venue/fans/fan-keep/events".into(),
            reason: "invalid_json".into(),
            detail: "invalid JSON".into(),
            sample: "{".into(),
        },
    ])
    .await;
    h.submit(vec![
        ev(
            "p1",
            "customer.profile",
            Some("fan-erase"),
            json!({"team": "A"}),
        ),
        cheer("c1", "fan-erase"),
        cheer("c2", "fan-erase"),
        cheer("c3", "fan-erase"),
        cheer("k1", "fan-keep"),
    ])
    .await
    .unwrap();
    assert_eq!(all_records(&h).await.len(), 1, "tier 1 for fan-erase");

    h.submit(vec![ev(
        "x1",
        "customer.erased",
        Some("fan-erase"),
        json!({}),
    )])
    .await
    .unwrap();
    let records = all_records(&h).await;
    let RecordBody::CustomerErased(erased) = &records[1].body else {
        panic!("expected an erasure record, got {:?}", records[1].body);
    };
    assert_eq!(erased.customer, pseudonym(&cfg, "fan-erase"));
    assert_eq!(h.stats().erasures(), 1);
    assert_eq!(
        h.stats().dead_letters_erased(),
        2,
        "the sample and the topic"
    );

    // State is gone: the customer starts from zero and earns tier 1 again;
    // the other customer keeps their progress (one more cheer reaches 2).
    // The profile is gone too: a wave does not count.
    h.submit(vec![
        cheer("c4", "fan-erase"),
        cheer("c5", "fan-erase"),
        cheer("k2", "fan-keep"),
        ev("w1", "fan.wave", Some("fan-erase"), json!({})),
    ])
    .await
    .unwrap();
    let records = all_records(&h).await;
    let tiers: Vec<(String, u32)> = records[2..]
        .iter()
        .map(|r| (award(r).customer.clone(), award(r).tier))
        .collect();
    assert_eq!(
        tiers,
        vec![
            (pseudonym(&cfg, "fan-erase"), 1),
            (pseudonym(&cfg, "fan-keep"), 1)
        ]
    );
    close(h, w).await;
    let samples = read_dead_letters(&cfg.site.data_dir, cfg.store.map_size, 10).unwrap();
    let origins: Vec<&str> = samples.iter().map(|s| s.origin.as_str()).collect();
    assert_eq!(
        origins,
        ["mqtt:venue/fans/fan-keep/events"],
        "the samples naming the customer are gone, the other fan's stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_and_leaderboards_respect_opt_in_and_erasure() {
    use touchline::store::boards::BoardQuery;
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    // Tiers at 1, 2, 3 credit xp 10, 20, 30 and one coin each.
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[1.0, 2.0, 3.0])]);
    let (h, w) = open(&cfg, &rules);
    let mut events = vec![
        ev(
            "pa",
            "customer.profile",
            Some("a"),
            json!({"leaderboard_opt_in": true}),
        ),
        ev(
            "pb",
            "customer.profile",
            Some("b"),
            json!({"leaderboard_opt_in": true, "display_name": "Bee"}),
        ),
    ];
    for (fan, n) in [("a", 3), ("b", 2), ("c", 1), ("d", 2)] {
        for i in 0..n {
            events.push(cheer(&format!("{fan}{i}"), fan));
        }
    }
    h.submit(events).await.unwrap();

    let a = h.rewards("a").await.unwrap();
    assert_eq!(a.points["xp"], json!(60));
    assert_eq!(a.points["coins"], json!(3));
    assert_eq!(a.badges.len(), 3);
    assert!(h.rewards("nobody").await.unwrap().points.is_empty());

    let query = |customer: &str| BoardQuery {
        category: "xp".into(),
        window: "lifetime".into(),
        customer: Some(customer.into()),
        around: 1,
        top: 10,
    };
    let board = h.leaderboard(query("d")).await.unwrap();
    let top: Vec<(u64, &str, i64)> = board
        .top
        .iter()
        .map(|r| (r.rank, r.name.as_str(), r.points))
        .collect();
    assert_eq!(top, vec![(1, "a", 60), (2, "Bee", 30)], "opted-in only");
    assert_eq!(board.participants, Some(4));
    let me = board.standing.unwrap();
    assert_eq!((me.rank, me.points), (2, 30), "ties share a rank");
    assert_eq!(me.percentile, 75.0);
    assert_eq!(me.above.len(), 1);
    assert_eq!(me.above[0].name, "Bee");
    assert_eq!(me.below.len(), 1);
    let c_name = &me.below[0].name;
    assert!(c_name.starts_with("fan-") && c_name.len() == 14, "{c_name}");
    // Stable: the same pseudonym on the next query.
    let again = h.leaderboard(query("d")).await.unwrap();
    assert_eq!(&again.standing.unwrap().below[0].name, c_name);

    let day = touchline::store::rewards::day_window(T0);
    let by_day = h
        .leaderboard(BoardQuery {
            window: day,
            ..query("c")
        })
        .await
        .unwrap();
    assert_eq!(by_day.standing.unwrap().rank, 4);

    h.submit(vec![ev("xa", "customer.erased", Some("a"), json!({}))])
        .await
        .unwrap();
    let board = h.leaderboard(query("b")).await.unwrap();
    assert_eq!(board.top[0].name, "Bee");
    assert_eq!(board.top[0].rank, 1);
    assert_eq!(board.participants, Some(3));
    assert!(h.rewards("a").await.unwrap().points.is_empty());
    close(h, w).await;
}

/// Polls the outbox until `pred` holds for its records (bounded).
async fn wait_for_records(h: &StoreHandle, pred: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = all_records(h).await;
        if pred(&records) || tokio::time::Instant::now() > until {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rule_stats(records: &[Record]) -> Vec<touchline_proto::RuleStats> {
    records
        .iter()
        .filter_map(|r| match &r.body {
            RecordBody::RuleStats(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_stats_report_each_interval_once_and_flush_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[2.0])]);
    let clock = Arc::new(AtomicI64::new(T0));
    let c = clock.clone();
    let options = StoreOptions {
        clock: Some(Arc::new(move || c.load(Ordering::SeqCst))),
        rule_stats_interval: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let (h, w) = Store::open_with(&cfg, &rules, options).unwrap();
    h.submit((0..3).map(|i| cheer(&format!("c{i}"), "fan-1")).collect())
        .await
        .unwrap();
    assert!(rule_stats(&all_records(&h).await).is_empty(), "not due yet");

    clock.fetch_add(61_000, Ordering::SeqCst);
    let records = wait_for_records(&h, |r| !rule_stats(r).is_empty()).await;
    let stats = rule_stats(&records);
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].matched, stats[0].awards), (3, 1));
    assert_eq!((stats[0].from_ms, stats[0].to_ms), (T0, T0 + 61_000));

    // A quiet interval reports nothing.
    clock.fetch_add(61_000, Ordering::SeqCst);
    h.submit(vec![cheer("c9", "fan-2")]).await.unwrap();
    // One more event under version 1, then a reload flushes it at once.
    let mut v2 = rules.clone();
    v2.achievements[0].version = 2;
    h.replace_rules(&v2).await.unwrap();
    let records = wait_for_records(&h, |r| rule_stats(r).len() >= 2).await;
    let stats = rule_stats(&records);
    assert_eq!(stats.len(), 2, "{stats:?}");
    assert_eq!(
        (stats[1].version, stats[1].matched, stats[1].awards),
        (1, 1, 0)
    );
    close(h, w).await;
}

/// Run by `dead_letters_readable_while_another_process_writes` in a
/// child process; does nothing on its own.
#[test]
#[ignore = "helper run in a child process"]
fn dlq_reader_child() {
    let Ok(dir) = std::env::var("TOUCHLINE_TEST_DLQ_DIR") else {
        return;
    };
    let samples = read_dead_letters(Path::new(&dir), 64 << 20, 100).unwrap();
    let summary = read_outbox_summary(Path::new(&dir), 64 << 20)
        .unwrap()
        .unwrap();
    println!(
        "child-read dead_letters={} outbox_records={} next_seq={}",
        samples.len(),
        summary.records,
        summary.next_seq
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_readable_while_another_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]);
    let (h, w) = open(&cfg, &rules);
    h.dead_letter(vec![DeadLetter {
        at_ms: T0,
        origin: "mqtt:venue/a/events".into(),
        reason: "missing_subject".into(),
        detail: "subject is required for fan.cheer".into(),
        sample: "{}".into(),
    }])
    .await;
    h.submit(vec![cheer("e1", "fan-1")]).await.unwrap();

    let exe = std::env::current_exe().unwrap();
    let data_dir = cfg.site.data_dir.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args([
                "--exact",
                "dlq_reader_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TOUCHLINE_TEST_DLQ_DIR", data_dir)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("child-read dead_letters=1 outbox_records=1 next_seq=2"),
        "child saw: {stdout}"
    );
    // The writer is unaffected by the reader.
    h.submit(vec![cheer("e2", "fan-2")]).await.unwrap();
    close(h, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_share_commits_and_notify() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.store.commit_max_delay = Duration::from_millis(50);
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]);
    let (h, w) = open(&cfg, &rules);
    let notify = h.outbox_changed();
    let notified = tokio::spawn(async move { notify.notified().await });

    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                h.submit(vec![cheer(&format!("e{i}"), &format!("fan-{i}"))])
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(
            t.await.unwrap().unwrap(),
            vec![EventOutcome::Committed { records: 1 }]
        );
    }
    tokio::time::timeout(Duration::from_secs(10), notified)
        .await
        .expect("outbox_changed notified")
        .unwrap();
    let stats = h.stats();
    assert_eq!(stats.events_committed(), 40);
    assert!(
        stats.commits() <= 20,
        "{} commits for 40 submissions",
        stats.commits()
    );

    // Reads honour both limits, and return at least one record.
    let (r, _) = h.read_outbox(0, 5, usize::MAX).await.unwrap();
    assert_eq!(
        r.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let (r, _) = h.read_outbox(5, 100, 1).await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].seq, 6);
    let (r, _) = h.read_outbox(40, 100, usize::MAX).await.unwrap();
    assert!(r.is_empty());
    let summary = h.outbox_summary().await.unwrap();
    assert_eq!(summary.records, 40);
    assert_eq!(summary.oldest_seq, Some(1));
    assert_eq!(summary.next_seq, 41);

    close(h.clone(), w).await;
    assert_eq!(
        h.submit(vec![cheer("late", "f")]).await,
        Err(SubmitError::Closed)
    );
    assert!(matches!(h.ack_outbox(1).await, Err(StoreError::Closed)));
    assert!(matches!(
        h.read_outbox(0, 1, 1).await,
        Err(StoreError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_belongs_to_one_site() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let rules = bundle(vec![]);
    let (h, w) = open(&cfg, &rules);
    assert!(matches!(
        Store::open(&cfg, &rules),
        Err(StoreError::AlreadyOpen { .. })
    ));
    close(h, w).await;

    let mut other = cfg.clone();
    other.site.id = "another-site".into();
    assert!(matches!(
        Store::open(&other, &rules),
        Err(StoreError::SiteMismatch { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_ids_when_pseudonymization_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.uplink = Some(edge_config::Uplink {
        central: "127.0.0.1:4433".parse().unwrap(),
        server_name: "localhost".into(),
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("site.pem"),
        key: dir.path().join("site.key"),
        batch_max_records: 2000,
        batch_max_bytes: 1 << 20,
        request_timeout: Duration::from_secs(30),
        keep_alive: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(30),
        pseudonymize: false,
        pseudonym_key: None,
    });
    let rules = bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]);
    let (h, w) = open(&cfg, &rules);
    h.submit(vec![cheer("e1", "fan-1")]).await.unwrap();
    let records = all_records(&h).await;
    assert_eq!(award(&records[0]).customer, "fan-1");
    assert!(!cfg.site.data_dir.join(DEFAULT_KEY_FILE).exists());
    close(h, w).await;
}

/// Writer throughput, for profiling rather than as a check: run with
/// `cargo test --release -p touchline --test store -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly in release mode"]
async fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.store.sync = SyncMode::Full;
    cfg.store.map_size = 1 << 30;
    let rules = bundle(vec![
        rule(
            "loud",
            "fan.cheer",
            Some("data.intensity >= 2"),
            &[10.0, 50.0, 200.0],
        ),
        rule("regular", "venue.checkin", None, &[1.0, 5.0]),
        rule("foodie", "concession.purchase", None, &[3.0]),
    ]);
    let (h, w) = open(&cfg, &rules);
    const EVENTS: usize = 200_000;
    const BATCH: usize = 1000;
    const CLIENTS: usize = 8;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let h = h.clone();
            tokio::spawn(async move {
                for b in 0..EVENTS / BATCH / CLIENTS {
                    let events: Vec<Event> = (0..BATCH)
                        .map(|i| {
                            let n = (c * 1_000_000 + b * BATCH + i) as u64;
                            let kind = [
                                "fan.cheer",
                                "fan.cheer",
                                "venue.checkin",
                                "concession.purchase",
                            ][(n % 4) as usize];
                            Event {
                                id: format!("evt-{n}"),
                                source: "bench".into(),
                                kind: kind.into(),
                                subject: Some(format!("fan-{}", n % 20_000)),
                                time_ms: T0 + n as i64,
                                data: json!({"intensity": n % 4, "section": "A12"}),
                            }
                        })
                        .collect();
                    h.submit(events).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let stats = h.stats();
    println!(
        "{} events in {:.2?}: {:.0} events/s, {} commits, {} records",
        stats.events_committed(),
        elapsed,
        stats.events_committed() as f64 / elapsed.as_secs_f64(),
        stats.commits(),
        stats.records_appended()
    );
    close(h, w).await;
}

/// Offer expressions read a fan's achievement progress: `progress.<rule>`
/// is the rule's value in the instance the trigger falls in, read from
/// the state the same transaction has just updated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_audiences_read_achievement_progress() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.nba.control_share = 0.0;
    let rules = with_offers(
        vec![rule("cheers", "fan.cheer", None, &[10.0])],
        r#"
[[offer]]
id = "almost-there"
on = ["match.chance_missed"]
audience = "progress.cheers >= 2.0 && progress.cheers < 10.0"
consent = "marketing"
value = 5.0
expires_after = "5m"
payload = { title = "Two more cheers" }
"#,
    );
    let (h, w) = open(&cfg, &rules);
    let fans = [("fan-1", 3), ("fan-2", 1), ("fan-3", 10), ("fan-4", 0)];
    let mut events = Vec::new();
    for (fan, cheers) in fans {
        events.push(consenting(fan));
        for i in 0..cheers {
            events.push(cheer(&format!("c-{fan}-{i}"), fan));
        }
        let chance = json!({ "team": "A" });
        events.push(ev(
            &format!("t-{fan}"),
            "match.chance_missed",
            Some(fan),
            chance,
        ));
    }
    h.submit(events).await.unwrap();

    let decided: Vec<String> = all_records(&h)
        .await
        .into_iter()
        .filter_map(|r| match r.body {
            RecordBody::OfferDecision(d) => Some(d.customer),
            _ => None,
        })
        .collect();
    // fan-2 has too little, fan-3 reached the tier, fan-4 never cheered.
    assert_eq!(decided, vec![pseudonym(&cfg, "fan-1")]);
    close(h, w).await;
}

/// A conversion names the decision it follows: its outcome record carries
/// the decision's instance id (treated and control alike), once per
/// decision, and a purchase without a decision converts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversions_name_the_decision_they_follow() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.nba.control_share = 0.5;
    let rules = with_offers(
        Vec::new(),
        r#"
[[offer]]
id = "jersey"
on = ["match.chance_missed"]
consent = "marketing"
value = 5.0
expires_after = "5m"
payload = { title = "Jersey" }
conversion = { on = ["shop.purchase"], window = "1h" }
"#,
    );
    // Decisions are stamped with the store's clock; conversions count
    // only after them.
    let (h, w) = open_with_clock(&cfg, &rules, Arc::new(AtomicI64::new(T0)));
    let fans: Vec<String> = (0..12).map(|i| format!("fan-{i}")).collect();
    let mut events = Vec::new();
    for fan in &fans {
        events.push(consenting(fan));
        events.push(ev(
            &format!("t-{fan}"),
            "match.chance_missed",
            Some(fan),
            json!({}),
        ));
    }
    h.submit(events).await.unwrap();
    let mut purchases = vec![ev(
        "buy-stranger",
        "shop.purchase",
        Some("stranger"),
        json!({}),
    )];
    for fan in &fans {
        for n in 0..2 {
            purchases.push(ev(
                &format!("buy-{n}-{fan}"),
                "shop.purchase",
                Some(fan),
                json!({}),
            ));
        }
    }
    h.submit(purchases).await.unwrap();

    let records = all_records(&h).await;
    let decisions: BTreeMap<String, (String, bool)> = records
        .iter()
        .filter_map(|r| match &r.body {
            RecordBody::OfferDecision(d) => {
                Some((d.customer.clone(), (d.instance.clone(), d.control)))
            }
            _ => None,
        })
        .collect();
    assert_eq!(decisions.len(), fans.len(), "one decision per fan");
    let mut converted: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for r in &records {
        if let RecordBody::OfferOutcome(o) = &r.body {
            if o.outcome.starts_with("converted") {
                converted
                    .entry(o.customer.clone())
                    .or_default()
                    .push((o.instance.clone(), o.outcome.clone()));
            }
        }
    }
    assert!(!converted.contains_key(&pseudonym(&cfg, "stranger")));
    assert_eq!(converted.len(), fans.len(), "every decided fan converted");
    let mut groups = (0, 0);
    for (customer, (instance, control)) in &decisions {
        let expected = if *control {
            groups.1 += 1;
            "converted_control"
        } else {
            groups.0 += 1;
            "converted"
        };
        assert!(!instance.is_empty());
        assert_eq!(
            converted.get(customer),
            Some(&vec![(instance.clone(), expected.to_owned())]),
            "{customer}: one conversion, naming its decision"
        );
    }
    assert!(groups.0 > 0 && groups.1 > 0, "both groups seen: {groups:?}");
    close(h, w).await;
}

/// Rule states are kept per version, so a rule file reverted to an
/// earlier version resumes that version's progress: a tier it awarded is
/// not awarded again, and the newer version counts apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverted_rule_version_resumes_without_awarding_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path());
    let v1 = bundle(vec![rule("cheer", "fan.cheer", None, &[2.0, 4.0])]);
    let mut v2 = v1.clone();
    v2.achievements[0].version = 2;
    let (h, w) = open(&cfg, &v1);
    let awards = |records: &[Record]| -> Vec<(u32, u32)> {
        records
            .iter()
            .filter(|r| matches!(r.body, RecordBody::AchievementAwarded(_)))
            .map(|r| (award(r).version, award(r).tier))
            .collect()
    };
    h.submit((0..3).map(|i| cheer(&format!("a{i}"), "fan-1")).collect())
        .await
        .unwrap();
    assert_eq!(awards(&all_records(&h).await), vec![(1, 1)]);

    h.replace_rules(&v2).await.unwrap();
    h.submit((0..2).map(|i| cheer(&format!("b{i}"), "fan-1")).collect())
        .await
        .unwrap();
    assert_eq!(awards(&all_records(&h).await), vec![(1, 1), (2, 1)]);

    // Back to version 1: its count goes on from 3, so tier 1 stays
    // awarded and the next event reaches tier 2.
    h.replace_rules(&v1).await.unwrap();
    h.submit(vec![cheer("c0", "fan-1")]).await.unwrap();
    assert_eq!(awards(&all_records(&h).await), vec![(1, 1), (2, 1), (1, 2)]);
    close(h, w).await;
}

/// One offer, decided for every present fan who opted in to marketing
/// when a goal is scored.
fn goal_scarf() -> RuleBundle {
    with_offers(
        Vec::new(),
        r#"
[[offer]]
id = "goal-scarf"
on = ["match.goal"]
consent = "marketing"
value = 5.0
expires_after = "1h"
payload = { title = "Goal! Scarf -20%" }
"#,
    )
}

/// The customers of the offer decisions among `records`, in order.
fn decided_customers(records: &[Record]) -> Vec<&str> {
    records
        .iter()
        .filter_map(|r| match &r.body {
            RecordBody::OfferDecision(d) => Some(d.customer.as_str()),
            _ => None,
        })
        .collect()
}

/// A venue-wide trigger decides present fans a chunk per transaction: its
/// own commit holds the first chunk only, other commands commit between
/// chunks, and a store closed mid-fan-out resumes at its cursor when
/// reopened. Every fan is decided exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_venue_wide_fan_out_goes_in_chunks_and_resumes_after_a_restart() {
    const FANS: usize = 2_000;
    const CHUNK: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.nba.control_share = 0.0;
    let rules = goal_scarf();
    let options = || StoreOptions {
        clock: Some(Arc::new(|| T0)),
        fanout_chunk: Some(CHUNK),
        ..Default::default()
    };
    let (h, w) = Store::open_with(&cfg, &rules, options()).unwrap();
    let profiles: Vec<Event> = (0..FANS).map(|i| consenting(&format!("fan-{i}"))).collect();
    h.submit(profiles).await.unwrap();
    let goal = ev("goal-1", "match.goal", None, json!({ "team": "A" }));
    assert_eq!(
        h.submit(vec![goal]).await,
        Ok(vec![EventOutcome::Committed {
            records: CHUNK as u32
        }]),
        "the trigger's own commit decides the first chunk"
    );
    close(h, w).await;
    let summary = read_outbox_summary(&cfg.site.data_dir, cfg.store.map_size)
        .unwrap()
        .unwrap();
    assert!(
        summary.records < FANS as u64,
        "closed mid-fan-out: {} records",
        summary.records
    );

    let (h, w) = Store::open_with(&cfg, &rules, options()).unwrap();
    let stats = h.nba_stats();
    assert!(stats.fanouts_open() > 0, "the fan-out is still open");
    // An event between chunks commits while the fan-out goes on.
    assert_eq!(
        h.submit(vec![cheer("cheer-1", "fan-1")]).await,
        Ok(vec![EventOutcome::Committed { records: 0 }])
    );
    assert!(
        stats.fanouts_open() > 0,
        "answered before the fan-out ended"
    );
    let records = wait_for_records(&h, |r| {
        r.iter()
            .filter(|r| matches!(r.body, RecordBody::OfferDecision(_)))
            .count()
            >= FANS
    })
    .await;
    let decided = decided_customers(&records);
    let distinct: std::collections::BTreeSet<&str> = decided.iter().copied().collect();
    assert_eq!((decided.len(), distinct.len()), (FANS, FANS));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stats.fanouts_open() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.fanouts_open(), 0);
    close(h, w).await;
}

/// In `journal` mode presence is held in memory between checkpoints. A
/// venue-wide trigger still reaches every fan seen: those whose presence
/// a crash lost (the replay rebuilds it from the journal) and those seen
/// since, whose presence is still held when the trigger comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_reaches_fans_whose_presence_was_held_or_lost_in_a_crash() {
    const FANS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = journal_site(dir.path());
    cfg.nba.control_share = 0.0;
    let rules = goal_scarf();
    let options = |crash: bool| StoreOptions {
        clock: Some(Arc::new(|| T0)),
        skip_final_checkpoint: crash,
        ..Default::default()
    };
    let fans = |range: std::ops::Range<usize>| -> Vec<Event> {
        range.map(|i| consenting(&format!("fan-{i}"))).collect()
    };

    // Seen, then a stop without a checkpoint: their presence was only
    // ever in memory and in the journal.
    let (h, w) = Store::open_with(&cfg, &rules, options(true)).unwrap();
    h.submit(fans(0..FANS)).await.unwrap();
    close(h, w).await;

    let (h, w) = Store::open_with(&cfg, &rules, options(false)).unwrap();
    assert_eq!(h.stats().journal_replayed(), FANS as u64);
    // Seen after the restart: held until the trigger's scan.
    h.submit(fans(FANS..2 * FANS)).await.unwrap();
    let goal = ev("goal-1", "match.goal", None, json!({ "team": "A" }));
    h.submit(vec![goal]).await.unwrap();
    let records = wait_for_records(&h, |r| {
        r.iter()
            .filter(|r| matches!(r.body, RecordBody::OfferDecision(_)))
            .count()
            >= 2 * FANS
    })
    .await;
    let decided: std::collections::BTreeSet<&str> =
        decided_customers(&records).into_iter().collect();
    assert_eq!(decided.len(), 2 * FANS, "every fan seen is decided once");
    close(h, w).await;
}

/// A submission that cannot join the writer's queue within its wait is
/// refused as busy and takes no effect: sent again later, it commits as
/// new, not as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_that_finds_the_queue_full_is_refused_as_busy_and_takes_no_effect() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    // Four events in the queue at most (one per commit, four commits).
    cfg.store.commit_max_events = 1;
    cfg.store.sync = SyncMode::Full;
    let (h, w) = open(
        &cfg,
        &bundle(vec![rule("hello", "fan.cheer", None, &[1.0])]),
    );
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                let event = cheer(&format!("c{i}"), &format!("fan-{i}"));
                (i, h.submit_within(vec![event], Duration::ZERO).await)
            })
        })
        .collect();
    let mut busy = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (_, Ok(outcomes)) => {
                assert_eq!(outcomes, vec![EventOutcome::Committed { records: 1 }])
            }
            (i, Err(SubmitError::Busy)) => busy.push(i),
            (i, Err(e)) => panic!("submission {i}: {e}"),
        }
    }
    assert!(
        !busy.is_empty(),
        "200 at once never found four places taken"
    );
    for i in busy {
        let event = cheer(&format!("c{i}"), &format!("fan-{i}"));
        assert_eq!(
            h.submit(vec![event]).await,
            Ok(vec![EventOutcome::Committed { records: 1 }]),
            "submission {i} took effect although refused"
        );
    }
    close(h, w).await;
}

/// Feedback queued for the broker leaves with the customer's erasure:
/// once erased, nothing goes out under their topics, not even what
/// committed before. Other fans' feedback stays, however alike their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_takes_the_customers_queued_feedback_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    // The store only names topics after the broker's section; it never
    // connects (the publisher does).
    cfg.ingest.mqtt = Some(edge_config::Mqtt {
        host: "127.0.0.1".into(),
        port: 1,
        client_id: "store-test".into(),
        topics: vec!["venue/#".into()],
        max_packet_size: 256 << 10,
        keep_alive: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(30),
        inflight: 100,
    });
    let (h, w) = open(
        &cfg,
        &bundle(vec![rule("hello", "fan.cheer", None, &[1.0, 2.0])]),
    );
    let fans = ["fan/erase", "fan/erase-2", "fan"];
    for (i, fan) in fans.iter().enumerate() {
        h.submit(vec![
            cheer(&format!("a{i}"), fan),
            cheer(&format!("b{i}"), fan),
        ])
        .await
        .unwrap();
    }
    let topics = |list: Vec<(u64, touchline::store::publications::Publication)>| {
        list.into_iter().map(|(_, p)| p.topic).collect::<Vec<_>>()
    };
    let before = topics(h.read_publications(0, 100).await.unwrap());
    let of = |fan: &str| format!("touchline/arena-test/customers/{fan}/progress");
    for fan in ["fan%2Ferase", "fan%2Ferase-2", "fan"] {
        assert!(before.contains(&of(fan)), "{fan} in {before:?}");
    }

    h.submit(vec![ev(
        "x1",
        "customer.erased",
        Some("fan/erase"),
        json!({}),
    )])
    .await
    .unwrap();
    let after = topics(h.read_publications(0, 100).await.unwrap());
    assert!(!after.contains(&of("fan%2Ferase")), "{after:?}");
    let kept: Vec<&String> = before.iter().filter(|t| **t != of("fan%2Ferase")).collect();
    assert_eq!(after.iter().collect::<Vec<_>>(), kept);
    assert_eq!(
        h.stats().publications_erased() as usize,
        before.len() - kept.len()
    );
    close(h, w).await;
}

/// In `journal` mode a checkpoint that does not fit in the map must not
/// take down the transactions that still fit: events, and the acks that
/// free space. (Once the write-back rode in every group while due, and
/// again in the retry of the acks alone, so a due checkpoint that did not
/// fit refused every event and every ack for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_does_not_fit_leaves_events_and_acks_committing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = site(dir.path());
    cfg.store.rule_state = edge_config::RuleStateMode::Journal;
    // Checkpoints by the key bound only (about one per 150 events: a
    // state record and a dedup key each), so each writes back the records
    // of 150 fans, and the one that no longer fits fails while an event's
    // own writes (its journal entry, dedup entry, award) still fit.
    cfg.store.checkpoint_interval = Duration::from_secs(3600);
    cfg.store.checkpoint_max_keys = 300;
    cfg.store.map_size = 2 << 20;
    // One rule awards every cheer (an outbox record each, for the acks);
    // forty more give each fan a record of forty states.
    let mut rules = vec![rule("first", "fan.cheer", None, &[1.0])];
    rules.extend((0..40).map(|i| rule(&format!("many-{i:02}"), "fan.cheer", None, &[1e6])));
    let (h, w) = open(&cfg, &bundle(rules));
    let stats = h.stats();
    let cheer_n = |n: usize| cheer(&format!("cheer-{n}"), &format!("fan-{n}"));
    let mut n = 0;
    // Events until a write-back is counted as failed: the events of that
    // group committed without it.
    while stats.storage_errors() == 0 {
        n += 1;
        assert!(n <= 50_000, "no write-back ever failed to fit");
        match h.submit(vec![cheer_n(n)]).await {
            Ok(outcomes) => assert_eq!(outcomes, vec![EventOutcome::Committed { records: 1 }]),
            Err(e) => panic!("event {n} refused before any write-back failed: {e}"),
        }
    }
    assert!(
        stats.journal_entries() > 0,
        "the journal keeps what is held"
    );
    assert_eq!(stats.map_full_events(), 0);

    // The write-back is put off: events and acks go on committing.
    for _ in 0..10 {
        n += 1;
        assert_eq!(
            h.submit(vec![cheer_n(n)]).await,
            Ok(vec![EventOutcome::Committed { records: 1 }])
        );
    }
    let before = stats.outbox_records();
    let (first, _) = h.read_outbox(0, 5, usize::MAX).await.unwrap();
    assert_eq!(first.len(), 5);
    h.ack_outbox(first[4].seq).await.unwrap();
    assert_eq!(stats.outbox_records(), before - 5);
    close(h, w).await;
}

/// The test site in `journal` mode, with no checkpoint due by time
/// before a test's end.
fn journal_site(dir: &Path) -> SiteConfig {
    let mut cfg = site(dir);
    cfg.store.rule_state = edge_config::RuleStateMode::Journal;
    cfg.store.checkpoint_interval = Duration::from_secs(3600);
    cfg
}

/// Opens with the journal kept at stop, as a crash leaves it.
fn open_to_crash(cfg: &SiteConfig, rules: &RuleBundle) -> (StoreHandle, WriterThread) {
    let options = StoreOptions {
        skip_final_checkpoint: true,
        ..Default::default()
    };
    Store::open_with(cfg, rules, options).expect("store opens")
}

fn tier(fan: &str, tier: &str) -> Event {
    ev(
        &format!("p-{fan}-{tier}"),
        "customer.profile",
        Some(fan),
        json!({ "tier": tier }),
    )
}

/// `rule_state = "journal"`: events applied since the last checkpoint
/// are replayed after a crash, each with the profile it was applied
/// with, not the one stored by then; the replayed state awards exactly
/// the tiers a run without the crash would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_checkpoints_replays_each_event_with_the_profile_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = journal_site(dir.path());
    let gold = "profile.tier == 'gold'";
    let rules = bundle(vec![rule("gold-cheer", "fan.cheer", Some(gold), &[2.0])]);
    let (h, w) = open_to_crash(&cfg, &rules);
    h.submit(vec![tier("fan-1", "gold"), cheer("c1", "fan-1")])
        .await
        .unwrap();
    h.submit(vec![tier("fan-1", "silver")]).await.unwrap();
    assert_eq!(h.stats().journal_entries(), 3);
    assert_eq!(h.stats().checkpoints(), 0);
    close(h, w).await;

    let (h, w) = open(&cfg, &rules);
    assert_eq!(h.stats().journal_replayed(), 3);
    // c1 counted while the fan was gold: one more gold cheer reaches 2.
    h.submit(vec![tier("fan-1", "gold2"), cheer("c2", "fan-1")])
        .await
        .unwrap();
    assert!(all_records(&h).await.is_empty(), "gold2 is not gold");
    h.submit(vec![ev(
        "p-again",
        "customer.profile",
        Some("fan-1"),
        json!({"tier": "gold"}),
    )])
    .await
    .unwrap();
    h.submit(vec![cheer("c3", "fan-1")]).await.unwrap();
    let records = all_records(&h).await;
    assert_eq!(records.len(), 1, "tier 1 once: {records:?}");
    assert_eq!(award(&records[0]).tier, 1);
    // The progress query sees the state the writer holds.
    let progress = h.progress("fan-1").await.unwrap();
    assert_eq!(progress[0].value, 2.0);
    close(h, w).await;
}

/// An erasure's write-back empties the journal, so it must carry what
/// the events before it in the same commit changed site-wide: a period
/// opened just before would otherwise be in neither the state nor the
/// journal after a crash, and no event would count in it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_opened_in_an_erasures_commit_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = journal_site(dir.path());
    let mut per_period = rule("match-cheer", "fan.cheer", None, &[2.0]);
    per_period.window = Window::Period;
    let rules = bundle(vec![per_period]);
    let (h, w) = open_to_crash(&cfg, &rules);
    h.submit(vec![
        ev("ps", "venue.period.started", None, json!({"period": "m1"})),
        ev("x1", "customer.erased", Some("fan-gone"), json!({})),
        cheer("k1", "fan-keep"),
    ])
    .await
    .unwrap();
    assert_eq!(h.stats().checkpoints(), 1, "the erasure checkpointed");
    close(h, w).await;

    let (h, w) = open(&cfg, &rules);
    h.submit(vec![cheer("k2", "fan-keep")]).await.unwrap();
    let windows: Vec<String> = all_records(&h)
        .await
        .iter()
        .filter(|r| matches!(r.body, RecordBody::AchievementAwarded(_)))
        .map(|r| award(r).window.clone())
        .collect();
    assert_eq!(windows, vec!["period:m1"], "both cheers count in m1");
    close(h, w).await;
}

/// An erasure writes the deferred state back and empties the journal in
/// its own commit, so after a crash nothing replays the erased customer's
/// events; what came after the erasure still replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_empties_the_journal_so_a_crash_cannot_bring_the_customer_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = journal_site(dir.path());
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[2.0, 4.0])]);
    let (h, w) = open_to_crash(&cfg, &rules);
    h.submit(vec![
        cheer("g1", "fan-gone"),
        cheer("k1", "fan-keep"),
        cheer("g2", "fan-gone"),
    ])
    .await
    .unwrap();
    h.submit(vec![
        ev("x1", "customer.erased", Some("fan-gone"), json!({})),
        cheer("k2", "fan-keep"),
    ])
    .await
    .unwrap();
    assert_eq!(h.stats().checkpoints(), 1, "the erasure checkpointed");
    assert_eq!(h.stats().journal_entries(), 1, "only k2 is journaled");
    close(h, w).await;

    let (h, w) = open(&cfg, &rules);
    assert_eq!(h.stats().journal_replayed(), 1);
    let value = |views: &[touchline::engine::progress::RuleView]| views[0].value;
    assert_eq!(value(&h.progress("fan-gone").await.unwrap()), 0.0);
    assert_eq!(value(&h.progress("fan-keep").await.unwrap()), 2.0);
    // fan-gone starts over: tier 1 again after two cheers.
    h.submit(vec![cheer("g3", "fan-gone"), cheer("g4", "fan-gone")])
        .await
        .unwrap();
    let gone = pseudonym(&cfg, "fan-gone");
    let tiers: Vec<u32> = all_records(&h)
        .await
        .iter()
        .filter(|r| matches!(&r.body, RecordBody::AchievementAwarded(a) if a.customer == gone))
        .map(|r| award(r).tier)
        .collect();
    assert_eq!(tiers, vec![1, 1], "once before the erasure, once after");
    close(h, w).await;
}

/// A site switched from `journal` to `direct` right after a crash still
/// gets the journaled state back: opening replays it in either mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_left_by_a_crash_is_replayed_when_the_site_reopens_in_direct_mode() {
    let dir = tempfile::tempdir().unwrap();
    let journal = journal_site(dir.path());
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[3.0])]);
    let (h, w) = open_to_crash(&journal, &rules);
    h.submit(vec![cheer("c1", "fan-1"), cheer("c2", "fan-1")])
        .await
        .unwrap();
    assert_eq!(h.stats().journal_entries(), 2);
    close(h, w).await;

    let direct = site(dir.path());
    let (h, w) = open(&direct, &rules);
    assert_eq!(h.stats().journal_replayed(), 2);
    h.submit(vec![cheer("c3", "fan-1")]).await.unwrap();
    let records = all_records(&h).await;
    assert_eq!(records.len(), 1, "the third cheer reaches tier 1");
    assert_eq!(award(&records[0]).tier, 1);
    close(h, w).await;
}

/// Dedup keys are held until the writer writes them back (a checkpoint
/// in `journal` mode, the same interval in `direct` mode); after a crash
/// before that, every event acknowledged before it is still a duplicate
/// when it arrives again, tracked or not, whichever mode the site
/// reopens in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_keys_held_at_a_crash_still_catch_the_retries() {
    let rules = bundle(vec![rule("cheer", "fan.cheer", None, &[3.0])]);
    let events = vec![
        cheer("c1", "fan-1"),
        cheer("c2", "fan-2"),
        // Not tracked: no rule state, no journal entry, a dedup key all
        // the same.
        ev("z1", "venue.zone.opened", None, json!({"zone": "north"})),
    ];
    for journal_first in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal_site(dir.path());
        let mut direct = site(dir.path());
        direct.store.checkpoint_interval = Duration::from_secs(3600);
        let first = if journal_first { &journal } else { &direct };
        let (h, w) = open_to_crash(first, &rules);
        let outcomes = h.submit(events.clone()).await.unwrap();
        assert!(outcomes
            .iter()
            .all(|o| matches!(o, EventOutcome::Committed { .. })));
        assert_eq!(h.stats().checkpoints(), 0);
        close(h, w).await;

        for cfg in [&journal, &direct, &journal] {
            let (h, w) = open(cfg, &rules);
            let again = h.submit(events.clone()).await.unwrap();
            assert_eq!(
                again,
                vec![EventOutcome::Duplicate; 3],
                "first {:?}, now {:?}",
                first.store.rule_state,
                cfg.store.rule_state
            );
            close(h, w).await;
        }
    }
}

/// In `journal` mode the rules change only once the held state is written
/// back; when it cannot be (the map is full), the reload is refused and
/// the old rules (and offers) stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_write_back_the_held_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = journal_site(dir.path());
    // Room for a few thousand small events: their held state is then
    // far more than the few pages left once the map is full.
    cfg.store.map_size = 2 << 20;
    let hello = rule("hello", "fan.wave", None, &[1.0]);
    let rules = bundle(vec![hello.clone()]);
    let (h, w) = open(&cfg, &rules);

    // Each wave also leaves a journal entry and held state.
    fill_with_waves(&h).await;
    assert!(
        h.stats().journal_entries() > 0,
        "state is held, not written back"
    );

    let with_second = bundle(vec![hello, rule("second", "fan.wave", None, &[1.0])]);
    let refused = h.replace_rules(&with_second).await;
    assert!(
        matches!(&refused, Err(StoreError::Write(m)) if m.contains("written back")),
        "got {refused:?}"
    );

    // Room again: a wave still meets only the old rule.
    h.ack_outbox(u64::MAX).await.unwrap();
    assert_eq!(
        h.submit(vec![wave("after")]).await,
        Ok(vec![EventOutcome::Committed { records: 1 }])
    );
    close(h, w).await;
}

/// A wave from `fan` (its id is the fan's), which the tests' `hello`
/// rule awards: each leaves an outbox record.
fn wave(fan: &str) -> Event {
    ev(fan, "fan.wave", Some(fan), json!({}))
}

/// Fills the store's map with waves from new fans until not even a
/// single one fits.
async fn fill_with_waves(h: &StoreHandle) {
    submit_until_full(h, |round| {
        (0..50).map(|i| wave(&format!("w{round}-{i}"))).collect()
    })
    .await;
    submit_until_full(h, |i| vec![wave(&format!("s{i}"))]).await;
}

/// Submits `batch(0)`, `batch(1)`, … until the store refuses one as full.
async fn submit_until_full(h: &StoreHandle, mut batch: impl FnMut(usize) -> Vec<Event>) {
    for n in 0..5000 {
        match h.submit(batch(n)).await {
            Ok(_) => {}
            Err(SubmitError::StoreFull) => return,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    panic!("the map never filled");
}
