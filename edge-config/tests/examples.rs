//! The example config and rules shipped in `config/` stay valid.

use std::path::PathBuf;

use edge_config::{load_rules, load_site_config, Measure, SyncMode, WhenFull, Window};

fn example(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(rel)
}

#[test]
fn example_site_config_and_rules_load() {
    let site = load_site_config(&example("site.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(site.site.id, "arena-01");
    assert_eq!(site.site.rules, ["rules/*.toml"]);

    let mqtt = site.ingest.mqtt.as_ref().expect("mqtt section");
    assert_eq!((mqtt.host.as_str(), mqtt.port), ("127.0.0.1", 1883));
    let http = site.ingest.http.as_ref().expect("http section");
    assert_eq!(http.listen.to_string(), "127.0.0.1:8088");
    let uplink = site.uplink.as_ref().expect("uplink section");
    assert_eq!(uplink.central.to_string(), "127.0.0.1:4433");
    assert!(uplink.ca.ends_with("certs/ca.pem"));
    assert!(uplink.cert.ends_with("certs/arena-01.pem"));
    assert!(uplink.key.ends_with("certs/arena-01.key"));

    // The example writes every default out; it must agree with the code.
    assert_eq!(site.ingest.validation, Default::default());
    assert_eq!(site.store, Default::default());
    assert_eq!(site.outbox, Default::default());
    assert_eq!(site.store.sync, SyncMode::Full);
    assert_eq!(site.outbox.when_full, WhenFull::Block);

    let rules = load_rules(&site).unwrap_or_else(|e| panic!("{e}"));
    let files: Vec<PathBuf> = rules
        .files
        .iter()
        .map(|f| f.canonicalize().unwrap())
        .collect();
    assert_eq!(
        files,
        [
            example("rules/cheer.toml").canonicalize().unwrap(),
            example("rules/offers.toml").canonicalize().unwrap(),
            example("rules/stadium.toml").canonicalize().unwrap()
        ]
    );
    // The example [nba] section writes every default out too.
    assert_eq!(site.nba, Default::default());
    let offers: Vec<&str> = rules.offers.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(offers, ["team-a-jersey", "team-a-scarf"]);
    let ids: Vec<&str> = rules.achievements.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "cheer-leader",
            "check-in",
            "explorer",
            "early-bird",
            "loyal",
            "section-roar",
            "big-spender",
            "recruiter",
            "roar-burst",
            "daily-fan"
        ]
    );
    // The stadium file shows every measure the engine keeps.
    let measures: Vec<&str> = rules.achievements[2..]
        .iter()
        .map(|r| r.measure.name())
        .collect();
    assert_eq!(
        measures,
        ["distinct", "sequence", "streak", "count", "sum", "count", "count", "streak"]
    );
    assert_eq!(rules.voucher_pools.len(), 1);
    let cheer = &rules.achievements[0];
    assert_eq!(cheer.on, ["fan.cheer"]);
    assert_eq!(cheer.when.as_deref(), Some("data.intensity >= 2"));
    assert_eq!(cheer.measure, Measure::Count);
    assert_eq!(cheer.window, Window::Lifetime);
    let ats: Vec<f64> = cheer.tiers.iter().map(|t| t.at).collect();
    assert_eq!(ats, [10.0, 50.0]);
    let checkin = &rules.achievements[1];
    assert_eq!(checkin.on, ["venue.checkin"]);
    let ats: Vec<f64> = checkin.tiers.iter().map(|t| t.at).collect();
    assert_eq!(ats, [1.0, 5.0]);
}
