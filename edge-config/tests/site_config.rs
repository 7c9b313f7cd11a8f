//! Site config parsing: defaults, every documented check, and that each
//! error names file, line, column and field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_config::{
    load_site_config, parse_site_config, ConfigErrors, Diagnostic, Outbox, RuleStateMode,
    SiteConfig, Store, SyncMode, Validation, WhenFull,
};

const PATH: &str = "/etc/touchline/site.toml";

const MIN: &str = r#"[site]
id = "arena-01"
data_dir = "data"
"#;

fn parse(text: &str) -> Result<SiteConfig, ConfigErrors> {
    parse_site_config(text, Path::new(PATH))
}

fn ok(text: &str) -> SiteConfig {
    parse(text).unwrap_or_else(|e| panic!("config should be valid, got:\n{e}"))
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match parse(text) {
        Ok(config) => panic!("config should be invalid, parsed as {config:#?}"),
        Err(e) => {
            assert!(!e.0.is_empty());
            e.0
        }
    }
}

/// The diagnostic at `line` on `field` whose message contains `needle`;
/// also checks the file name and the display format.
#[track_caller]
fn expect_error(text: &str, line: usize, field: &str, needle: &str) -> Diagnostic {
    let errs = errors(text);
    let found = errs
        .iter()
        .find(|d| d.line == line && d.field == field && d.message.contains(needle));
    let Some(found) = found else {
        panic!(
            "no error at line {line} on `{field}` containing {needle:?}; got:\n{}",
            ConfigErrors(errs)
        );
    };
    assert_eq!(found.file, Path::new(PATH));
    assert!(found.column >= 1);
    assert_eq!(
        found.to_string(),
        format!("{PATH}:{line}:{}: {field}: {}", found.column, found.message)
    );
    found.clone()
}

#[track_caller]
fn expect_only_error(text: &str, line: usize, field: &str, needle: &str) -> Diagnostic {
    let found = expect_error(text, line, field, needle);
    let errs = errors(text);
    assert_eq!(
        errs.len(),
        1,
        "expected one error, got:\n{}",
        ConfigErrors(errs)
    );
    found
}

#[test]
fn minimal_config_gets_every_default() {
    let c = ok(MIN);
    assert_eq!(c.source, Path::new(PATH));
    assert_eq!(c.site.id, "arena-01");
    assert_eq!(c.site.data_dir, Path::new("/etc/touchline/data"));
    assert!(c.site.rules.is_empty());
    assert_eq!(c.ingest.mqtt, None);
    assert_eq!(c.ingest.http, None);
    assert_eq!(c.uplink, None);
    // The documented values, spelled out rather than taken from the code.
    assert_eq!(
        c.ingest.validation,
        Validation {
            max_event_size: 64 * 1024,
            max_future_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(7 * 86_400),
            dedup_retention: Duration::from_secs(86_400),
            venue_types: vec!["venue.*".to_owned(), "match.*".to_owned()],
            dlq_max: 1000,
        }
    );
    assert_eq!(
        c.store,
        Store {
            map_size: 4 << 30,
            commit_max_events: 4096,
            commit_max_delay: Duration::ZERO,
            sync: SyncMode::Full,
            rule_state: RuleStateMode::Direct,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_max_keys: 200_000,
            checkpoint_max_events: 500_000,
        }
    );
    assert_eq!(
        c.outbox,
        Outbox {
            max_bytes: 1 << 30,
            when_full: WhenFull::Block,
        }
    );
    assert_eq!(c.ingest.validation, Validation::default());
    assert_eq!(c.store, Store::default());
    assert_eq!(c.outbox, Outbox::default());
}

#[test]
fn optional_sections_with_only_required_keys_get_defaults() {
    let c = ok(&format!(
        r#"{MIN}
[ingest.mqtt]
url = "mqtt://broker.local"
client_id = "tl"
topics = ["venue/+/events"]

[ingest.http]
listen = "127.0.0.1:8088"

[uplink]
central = "10.0.0.1:4433"
ca = "certs/ca.pem"
cert = "certs/site.pem"
key = "/secure/site.key"
"#
    ));
    let mqtt = c.ingest.mqtt.expect("mqtt");
    assert_eq!(mqtt.host, "broker.local");
    assert_eq!(mqtt.port, 1883);
    assert_eq!(mqtt.client_id, "tl");
    assert_eq!(mqtt.topics, ["venue/+/events"]);
    assert_eq!(mqtt.max_packet_size, 256 * 1024);
    assert_eq!(mqtt.keep_alive, Duration::from_secs(30));
    assert_eq!(mqtt.reconnect_min, Duration::from_millis(100));
    assert_eq!(mqtt.reconnect_max, Duration::from_secs(30));
    assert_eq!(mqtt.inflight, 1000);

    let http = c.ingest.http.expect("http");
    assert_eq!(http.listen, "127.0.0.1:8088".parse::<SocketAddr>().unwrap());
    assert_eq!(http.max_body, 16 << 20);

    let up = c.uplink.expect("uplink");
    assert_eq!(up.central, "10.0.0.1:4433".parse::<SocketAddr>().unwrap());
    assert_eq!(up.server_name, "localhost");
    assert_eq!(up.ca, Path::new("/etc/touchline/certs/ca.pem"));
    assert_eq!(up.cert, Path::new("/etc/touchline/certs/site.pem"));
    assert_eq!(up.key, Path::new("/secure/site.key"));
    assert_eq!(up.batch_max_records, 2000);
    assert_eq!(up.batch_max_bytes, 1 << 20);
    assert_eq!(up.keep_alive, Duration::from_secs(5));
    assert_eq!(up.idle_timeout, Duration::from_secs(30));
    assert_eq!(up.reconnect_min, Duration::from_millis(200));
    assert_eq!(up.reconnect_max, Duration::from_secs(30));
    assert!(up.pseudonymize);
    assert_eq!(up.pseudonym_key, None);
}

#[test]
fn every_key_can_be_set() {
    let c = ok(r##"
[site]
id = "Arena_01.north-2"
data_dir = "/var/lib/touchline"
rules = ["rules/*.toml", "/opt/rules/**/*.toml"]

[ingest.mqtt]
url = "mqtt://[::1]:11883/"
client_id = "touchline-arena-01"
topics = ["venue/+/events", "fans/#", "#"]
max_packet_size = "1MiB"
keep_alive = "1m"
reconnect_min = "1s"
reconnect_max = "1s"
inflight = 65535

[ingest.http]
listen = "[::]:80"
max_body = 1048576

[ingest.validation]
max_event_size = "1 MiB"
max_future_skew = "0s"
max_age = "30d"
dedup_retention = "48h"
venue_types = ["match.*", "stadium.open", "*"]
dlq_max = 0

[store]
map_size = "16GiB"
commit_max_events = 1
commit_max_delay = "0ms"
sync = "no-meta-sync"
rule_state = "journal"
checkpoint_interval = "1m"
checkpoint_max_keys = 7
checkpoint_max_events = 9

[uplink]
central = "[2001:db8::1]:4433"
server_name = "central.example"
ca = "./certs/ca.pem"
cert = "../shared/site.pem"
key = "site.key"
batch_max_records = 1
batch_max_bytes = "8MiB"
keep_alive = "999ms"
idle_timeout = "1s"
reconnect_min = "1ms"
reconnect_max = "1h"
pseudonymize = false
pseudonym_key = "keys/pseudonym.key"

[outbox]
max_bytes = "2GiB"
when_full = "drop-oldest"
"##);
    assert_eq!(c.site.id, "Arena_01.north-2");
    assert_eq!(c.site.data_dir, Path::new("/var/lib/touchline"));
    assert_eq!(c.site.rules, ["rules/*.toml", "/opt/rules/**/*.toml"]);
    let mqtt = c.ingest.mqtt.unwrap();
    assert_eq!((mqtt.host.as_str(), mqtt.port), ("::1", 11883));
    assert_eq!(mqtt.max_packet_size, 1 << 20);
    assert_eq!(mqtt.keep_alive, Duration::from_secs(60));
    assert_eq!(mqtt.inflight, 65535);
    let http = c.ingest.http.unwrap();
    assert_eq!(http.listen.port(), 80);
    assert_eq!(http.max_body, 1 << 20);
    let v = &c.ingest.validation;
    assert_eq!(v.max_event_size, 1 << 20);
    assert_eq!(v.max_future_skew, Duration::ZERO);
    assert_eq!(v.max_age, Duration::from_secs(30 * 86_400));
    assert_eq!(v.dedup_retention, Duration::from_secs(48 * 3600));
    assert_eq!(v.venue_types, ["match.*", "stadium.open", "*"]);
    assert_eq!(v.dlq_max, 0);
    assert_eq!(c.store.map_size, 16 << 30);
    assert_eq!(c.store.commit_max_events, 1);
    assert_eq!(c.store.commit_max_delay, Duration::ZERO);
    assert_eq!(c.store.sync, SyncMode::NoMetaSync);
    assert_eq!(c.store.rule_state, RuleStateMode::Journal);
    assert_eq!(c.store.checkpoint_interval, Duration::from_secs(60));
    assert_eq!(c.store.checkpoint_max_keys, 7);
    assert_eq!(c.store.checkpoint_max_events, 9);
    let up = c.uplink.unwrap();
    assert_eq!(up.central.port(), 4433);
    assert_eq!(up.server_name, "central.example");
    assert_eq!(up.ca, Path::new("/etc/touchline/certs/ca.pem"));
    assert_eq!(up.cert, Path::new("/etc/touchline/../shared/site.pem"));
    assert_eq!(up.key, Path::new("/etc/touchline/site.key"));
    assert_eq!(up.batch_max_bytes, 8 << 20);
    assert_eq!(up.keep_alive, Duration::from_millis(999));
    assert!(!up.pseudonymize);
    assert_eq!(
        up.pseudonym_key.as_deref(),
        Some(Path::new("/etc/touchline/keys/pseudonym.key"))
    );
    assert_eq!(c.outbox.max_bytes, 2 << 30);
    assert_eq!(c.outbox.when_full, WhenFull::DropOldest);
    assert_eq!(c.store.sync, SyncMode::NoMetaSync);

    for (sync, mode) in [("full", SyncMode::Full), ("none", SyncMode::None)] {
        let c = ok(&format!("{MIN}[store]\nsync = \"{sync}\"\n"));
        assert_eq!(c.store.sync, mode);
    }
}

#[test]
fn relative_config_path_resolves_against_the_working_directory() {
    let c = parse_site_config(MIN, Path::new("conf/site.toml")).expect("valid");
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(c.source, cwd.join("conf/site.toml"));
    assert_eq!(c.site.data_dir, cwd.join("conf/data"));
    assert!(c.source.is_absolute());
}

#[test]
fn site_section_checks() {
    expect_only_error("", 1, "site", "required table [site] is missing");
    expect_only_error(
        "[site]\ndata_dir = \"d\"\n",
        1,
        "site.id",
        "required key is missing",
    );
    expect_only_error(
        "[site]\nid = \"a\"\n",
        1,
        "site.data_dir",
        "required key is missing",
    );
    let d = expect_only_error(
        "[site]\nid = \"arena 01\"\ndata_dir = \"d\"\n",
        2,
        "site.id",
        "contains ' '",
    );
    assert_eq!(d.column, 6);
    expect_only_error(
        &format!("[site]\nid = \"{}\"\ndata_dir = \"d\"\n", "a".repeat(65)),
        2,
        "site.id",
        "longer than 64",
    );
    ok(&format!(
        "[site]\nid = \"{}\"\ndata_dir = \"d\"\n",
        "a".repeat(64)
    ));
    expect_only_error(
        "[site]\nid = \"\"\ndata_dir = \"d\"\n",
        2,
        "site.id",
        "empty",
    );
    expect_only_error(
        "[site]\nid = \"a\"\ndata_dir = \"\"\n",
        3,
        "site.data_dir",
        "empty",
    );
    expect_only_error(
        &format!("{MIN}rules = [\"rules/[.toml\"]\n"),
        4,
        "site.rules[0]",
        "invalid glob pattern",
    );
    expect_only_error(
        &format!("{MIN}rules = [\"a.toml\", \"\"]\n"),
        4,
        "site.rules[1]",
        "empty",
    );
    expect_only_error(
        &format!("{MIN}rules = [\"a.toml\", 3]\n"),
        4,
        "site.rules[1]",
        "expected a string, found integer",
    );
}

const MQTT: &str = r#"[site]
id = "arena-01"
data_dir = "data"

[ingest.mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "touchline"
topics = ["venue/+/events"]
"#;

#[test]
fn mqtt_url_forms() {
    let url = |u: &str| {
        let text = MQTT.replace("mqtt://127.0.0.1:1883", u);
        parse(&text).map(|c| {
            let m = c.ingest.mqtt.unwrap();
            (m.host, m.port)
        })
    };
    assert_eq!(url("mqtt://127.0.0.1:1883"), Ok(("127.0.0.1".into(), 1883)));
    assert_eq!(url("mqtt://broker"), Ok(("broker".into(), 1883)));
    assert_eq!(url("MQTT://broker:2000/"), Ok(("broker".into(), 2000)));
    assert_eq!(url("mqtt://[::1]"), Ok(("::1".into(), 1883)));
    assert_eq!(url("mqtt://[fe80::1]:1"), Ok(("fe80::1".into(), 1)));

    for (bad, needle) in [
        ("mqtts://broker:8883", "MQTT over TLS) is not supported"),
        ("ws://broker", "WebSocket) is not supported"),
        ("http://broker:1883", "unsupported scheme `http://`"),
        ("tcp://broker:1883", "unsupported scheme `tcp://`"),
        ("127.0.0.1:1883", "not an MQTT URL"),
        ("mqtt://", "names no host"),
        ("mqtt://:1883", "names no host"),
        ("mqtt://broker:0", "port `0`"),
        ("mqtt://broker:65536", "port `65536`"),
        ("mqtt://broker:x", "port `x`"),
        ("mqtt://user@broker", "no user, path or query"),
        ("mqtt://broker/topic", "no user, path or query"),
        ("mqtt://::1:1883", "brackets"),
        ("mqtt://[::1", "missing `]`"),
        ("mqtt://[nope]:1", "not an IPv6 address"),
        ("mqtt://bro ker", "not a host name"),
    ] {
        let d = expect_only_error(
            &MQTT.replace("mqtt://127.0.0.1:1883", bad),
            6,
            "ingest.mqtt.url",
            needle,
        );
        assert_eq!(d.column, 7, "{bad}");
    }
}

#[test]
fn mqtt_section_checks() {
    ok(MQTT);
    expect_only_error(
        &MQTT.replace("client_id = \"touchline\"", "client_id = \"\""),
        7,
        "ingest.mqtt.client_id",
        "must not be empty",
    );
    expect_only_error(
        &MQTT.replace("client_id = \"touchline\"\n", ""),
        5,
        "ingest.mqtt.client_id",
        "required key is missing",
    );
    expect_only_error(
        &MQTT.replace("[\"venue/+/events\"]", "[]"),
        8,
        "ingest.mqtt.topics",
        "at least one topic filter",
    );
    expect_only_error(
        &MQTT.replace("topics = [\"venue/+/events\"]\n", ""),
        5,
        "ingest.mqtt.topics",
        "required key is missing",
    );
    for (bad, needle) in [
        (
            "venue/#/events",
            "`#` must be a whole level and the last one",
        ),
        ("venue#", "`#` must be a whole level"),
        ("venue/a+/events", "`+` must be a whole level"),
        ("", "must not be empty"),
    ] {
        expect_only_error(
            &MQTT.replace("[\"venue/+/events\"]", &format!("[\"ok/+\", \"{bad}\"]")),
            8,
            "ingest.mqtt.topics[1]",
            needle,
        );
    }
    expect_only_error(
        &format!("{MQTT}inflight = 0\n"),
        9,
        "ingest.mqtt.inflight",
        "at least 1",
    );
    expect_only_error(
        &format!("{MQTT}inflight = 70000\n"),
        9,
        "ingest.mqtt.inflight",
        "70000 is out of range; expected 0 to 65535",
    );
    expect_only_error(
        &format!("{MQTT}keep_alive = \"1500ms\"\n"),
        9,
        "ingest.mqtt.keep_alive",
        "whole seconds",
    );
    expect_only_error(
        &format!("{MQTT}keep_alive = \"1d\"\n"),
        9,
        "ingest.mqtt.keep_alive",
        "whole seconds from 1s to 65535s",
    );
    expect_only_error(
        &format!("{MQTT}keep_alive = \"0s\"\n"),
        9,
        "ingest.mqtt.keep_alive",
        "greater than zero",
    );
    expect_only_error(
        &format!("{MQTT}max_packet_size = \"512MiB\"\n"),
        9,
        "ingest.mqtt.max_packet_size",
        "larger than any MQTT packet",
    );
}

#[test]
fn reconnect_bounds_must_be_ordered() {
    let d = expect_only_error(
        &format!("{MQTT}reconnect_min = \"1m\"\nreconnect_max = \"10s\"\n"),
        9,
        "ingest.mqtt.reconnect_min",
        "ingest.mqtt.reconnect_min (1m) must not exceed ingest.mqtt.reconnect_max (10s)",
    );
    assert_eq!(d.column, 17);
    // Only the maximum written: the error goes where the operator wrote.
    expect_only_error(
        &format!("{MQTT}reconnect_max = \"50ms\"\n"),
        9,
        "ingest.mqtt.reconnect_max",
        "(100ms, the default) must not exceed ingest.mqtt.reconnect_max (50ms)",
    );
    expect_only_error(
        &format!("{UPLINK}reconnect_min = \"31s\"\n"),
        10,
        "uplink.reconnect_min",
        "uplink.reconnect_min (31s) must not exceed uplink.reconnect_max (30s, the default)",
    );
}

#[test]
fn packet_and_body_limits_must_hold_an_event() {
    expect_only_error(
        &format!("{MQTT}max_packet_size = \"32KiB\"\n"),
        9,
        "ingest.mqtt.max_packet_size",
        "ingest.mqtt.max_packet_size (32KiB) must be at least ingest.validation.max_event_size (64KiB, the default)",
    );
    // Only the event size written: that is where the error goes.
    expect_only_error(
        &format!("{MQTT}\n[ingest.validation]\nmax_event_size = \"1MiB\"\n"),
        11,
        "ingest.validation.max_event_size",
        "ingest.mqtt.max_packet_size (256KiB, the default) must be at least ingest.validation.max_event_size (1MiB)",
    );
    expect_only_error(
        &format!("{MIN}[ingest.http]\nlisten = \"127.0.0.1:1\"\nmax_body = \"1KiB\"\n"),
        6,
        "ingest.http.max_body",
        "must be at least ingest.validation.max_event_size",
    );
}

#[test]
fn http_section_checks() {
    expect_only_error(
        &format!("{MIN}[ingest.http]\nlisten = \"localhost:8088\"\n"),
        5,
        "ingest.http.listen",
        "`localhost:8088` is not a socket address",
    );
    expect_only_error(
        &format!("{MIN}[ingest.http]\nmax_body = \"1MiB\"\n"),
        4,
        "ingest.http.listen",
        "required key is missing; add `listen = ...` to [ingest.http]",
    );
}

#[test]
fn validation_section_checks() {
    let v = |body: &str| format!("{MIN}[ingest.validation]\n{body}\n");
    expect_only_error(
        &v("venue_types = [\"venue.*\", \"a*b\"]"),
        5,
        "ingest.validation.venue_types[1]",
        "`*` is only allowed at the end",
    );
    expect_only_error(
        &v("venue_types = [\"\"]"),
        5,
        "ingest.validation.venue_types[0]",
        "empty",
    );
    expect_only_error(
        &v("max_event_size = 0"),
        5,
        "ingest.validation.max_event_size",
        "greater than zero",
    );
    expect_only_error(
        &v("max_event_size = -5"),
        5,
        "ingest.validation.max_event_size",
        "negative",
    );
    expect_only_error(
        &v("max_age = \"0d\""),
        5,
        "ingest.validation.max_age",
        "greater than zero",
    );
    expect_only_error(
        &v("dedup_retention = \"1 week\""),
        5,
        "ingest.validation.dedup_retention",
        "unknown duration unit `week`",
    );
    expect_only_error(
        &v("dlq_max = -1"),
        5,
        "ingest.validation.dlq_max",
        "out of range",
    );
}

#[test]
fn store_and_outbox_checks() {
    expect_only_error(
        &format!("{MIN}[store]\nmap_size = \"1GiB\"\n"),
        5,
        "store.map_size",
        "store.map_size (1GiB) must be larger than outbox.max_bytes (1GiB, the default)",
    );
    expect_only_error(
        &format!("{MIN}[outbox]\nmax_bytes = \"8GiB\"\n"),
        5,
        "outbox.max_bytes",
        "store.map_size (4GiB, the default) must be larger than outbox.max_bytes (8GiB)",
    );
    ok(&format!(
        "{MIN}[outbox]\nmax_bytes = \"8GiB\"\n[store]\nmap_size = \"9GiB\"\n"
    ));
    expect_only_error(
        &format!("{MIN}[store]\ncommit_max_events = 0\n"),
        5,
        "store.commit_max_events",
        "at least 1",
    );
    expect_only_error(
        &format!("{MIN}[store]\ncheckpoint_max_keys = 0\n"),
        5,
        "store.checkpoint_max_keys",
        "at least 1",
    );
    expect_only_error(
        &format!("{MIN}[store]\nrule_state = \"lazy\"\n"),
        5,
        "store.rule_state",
        "unknown rule state mode `lazy`; supported: `journal`, `direct`",
    );
    expect_only_error(
        &format!("{MIN}[store]\ncheckpoint_interval = \"0s\"\n"),
        5,
        "store.checkpoint_interval",
        "greater than zero",
    );
    let d = expect_only_error(
        &format!("{MIN}[store]\nsync = \"sometimes\"\n"),
        5,
        "store.sync",
        "unknown sync mode `sometimes`; supported: `full`, `no-meta-sync`, `none`",
    );
    assert_eq!(d.column, 8);
    expect_only_error(
        &format!("{MIN}[outbox]\nwhen_full = \"drop\"\n"),
        5,
        "outbox.when_full",
        "unknown when_full policy `drop`; supported: `block`, `drop-oldest`",
    );
    expect_only_error(
        &format!("{MIN}[outbox]\nmax_bytes = \"1GB\"\n"),
        5,
        "outbox.max_bytes",
        "unknown size unit `GB`",
    );
}

const UPLINK: &str = r#"[site]
id = "arena-01"
data_dir = "data"

[uplink]
central = "127.0.0.1:4433"
ca = "certs/ca.pem"
cert = "certs/arena-01.pem"
key = "certs/arena-01.key"
"#;

#[test]
fn uplink_section_checks() {
    ok(UPLINK);
    let errs = errors(&format!("{MIN}\n[uplink]\ncentral = \"127.0.0.1:4433\"\n"));
    let fields: Vec<&str> = errs.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(fields, ["uplink.ca", "uplink.cert", "uplink.key"]);
    assert!(errs.iter().all(|d| d.line == 5 && d.column == 1));

    expect_only_error(
        &format!("{UPLINK}keep_alive = \"30s\"\n"),
        10,
        "uplink.keep_alive",
        "uplink.keep_alive (30s) must be below uplink.idle_timeout (30s, the default)",
    );
    expect_only_error(
        &format!("{UPLINK}idle_timeout = \"5s\"\n"),
        10,
        "uplink.idle_timeout",
        "uplink.keep_alive (5s, the default) must be below uplink.idle_timeout (5s)",
    );
    expect_only_error(
        &format!("{UPLINK}batch_max_records = 0\n"),
        10,
        "uplink.batch_max_records",
        "at least 1",
    );
    expect_only_error(
        &format!("{UPLINK}batch_max_bytes = \"64MiB\"\n"),
        10,
        "uplink.batch_max_bytes",
        "more than a protocol frame can carry",
    );
    expect_only_error(
        &UPLINK.replace("127.0.0.1:4433", "central.example:4433"),
        6,
        "uplink.central",
        "not a socket address",
    );
    expect_only_error(
        &format!("{UPLINK}server_name = \"\"\n"),
        10,
        "uplink.server_name",
        "empty",
    );
    expect_only_error(
        &format!("{UPLINK}pseudonymize = \"yes\"\n"),
        10,
        "uplink.pseudonymize",
        "expected true or false, found string",
    );
}

#[test]
fn wrong_types_name_what_was_expected() {
    expect_only_error(
        &format!("{MQTT}inflight = \"many\"\n"),
        9,
        "ingest.mqtt.inflight",
        "expected an integer, found string",
    );
    expect_only_error(
        &MQTT.replace("[\"venue/+/events\"]", "\"venue/+/events\""),
        8,
        "ingest.mqtt.topics",
        "expected an array of strings, found string",
    );
    expect_only_error(
        &format!("{MQTT}keep_alive = 30\n"),
        9,
        "ingest.mqtt.keep_alive",
        "a duration needs a unit: write \"30s\"",
    );
    expect_only_error(
        &format!("{MQTT}max_packet_size = true\n"),
        9,
        "ingest.mqtt.max_packet_size",
        "expected a size such as \"64KiB\" or a number of bytes, found boolean",
    );
    expect_only_error(
        "site = \"arena\"\n",
        1,
        "site",
        "expected a table, found string",
    );
    expect_only_error(
        &format!("ingest = 1\n{MIN}"),
        1,
        "ingest",
        "expected a table, found integer",
    );
    expect_only_error(
        &format!("{MIN}[[store]]\n"),
        4,
        "store",
        "expected a table, found array",
    );
}

#[test]
fn unknown_keys_are_errors() {
    let d = expect_error(
        &MQTT.replace("url =", "urll ="),
        6,
        "ingest.mqtt.urll",
        "unknown key `urll` in [ingest.mqtt]; expected one of: url, client_id, topics,",
    );
    assert_eq!(d.column, 1);
    // The missing `url` is reported too.
    let errs = errors(&MQTT.replace("url =", "urll ="));
    assert_eq!(errs.len(), 2, "{}", ConfigErrors(errs.clone()));
    expect_error(
        &MQTT.replace("url =", "urll ="),
        5,
        "ingest.mqtt.url",
        "required key is missing",
    );

    expect_only_error(
        &format!("{MIN}[metrics]\nlisten = \"x\"\n"),
        4,
        "metrics",
        "unknown key `metrics` at the top level; expected one of: site, ingest, outbox, store, uplink",
    );
    expect_only_error(
        &format!("{MIN}colour = \"blue\"\n"),
        4,
        "site.colour",
        "unknown key `colour` in [site]",
    );
    expect_only_error(
        &format!("{MIN}[ingest.kafka]\n"),
        4,
        "ingest.kafka",
        "unknown key `kafka` in [ingest]",
    );
    // Dotted keys are keys too.
    expect_only_error(
        &format!("{MIN}[store]\nsync.mode = \"full\"\n"),
        5,
        "store.sync",
        "expected a string, found table",
    );
}

#[test]
fn syntax_errors_point_at_the_spot() {
    let errs = errors("[site]\nid = \"arena\ndata_dir = \"d\"\n");
    let first = &errs[0];
    assert_eq!(first.line, 2, "{}", ConfigErrors(errs.clone()));
    assert_eq!(first.field, "site.id");
    assert!(
        first.message.starts_with("invalid TOML: "),
        "{}",
        first.message
    );

    let d = expect_error(
        "[site]\nid = \"a\"\nid = \"b\"\ndata_dir = \"d\"\n",
        3,
        "site.id",
        "duplicate key",
    );
    assert_eq!(d.column, 1);

    expect_error("[site\nid = \"a\"\n", 1, "syntax", "invalid TOML");
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let text = r#"[site]
id = "bad id"
data_dir = "data"

[ingest.mqtt]
url = "mqtts://broker"
client_id = ""
topics = []
nonsense = 1

[store]
sync = "always"

[outbox]
when_full = "panic"
"#;
    let errs = errors(text);
    let got: Vec<(usize, &str)> = errs.iter().map(|d| (d.line, d.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (2, "site.id"),
            (6, "ingest.mqtt.url"),
            (7, "ingest.mqtt.client_id"),
            (8, "ingest.mqtt.topics"),
            (9, "ingest.mqtt.nonsense"),
            (12, "store.sync"),
            (15, "outbox.when_full"),
        ],
        "{}",
        ConfigErrors(errs.clone())
    );
    // Display: one line per diagnostic.
    let shown = ConfigErrors(errs).to_string();
    assert_eq!(shown.lines().count(), 7);
    assert!(
        shown.starts_with(&format!("{PATH}:2:6: site.id: ")),
        "{shown}"
    );
}

#[test]
fn load_reports_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let err = load_site_config(&missing).expect_err("missing file");
    assert_eq!(err.0.len(), 1);
    let d = &err.0[0];
    assert_eq!((d.line, d.column, d.field.as_str()), (1, 1, "file"));
    assert_eq!(d.file, missing);
    assert!(d.message.starts_with("cannot read: "), "{}", d.message);

    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, b"[site]\nid = \"\xff\"\n").unwrap();
    let err = load_site_config(&binary).expect_err("not UTF-8");
    assert!(err.0[0].message.contains("not UTF-8"), "{err}");

    let err = load_site_config(Path::new("/dev/zero")).expect_err("endless");
    assert!(err.0[0].message.contains("larger than 16MiB"), "{err}");

    let good = dir.path().join("site.toml");
    std::fs::write(&good, MIN).unwrap();
    let c = load_site_config(&good).expect("valid");
    assert_eq!(c.source, good);
    assert_eq!(c.site.data_dir, dir.path().join("data"));
    let _: PathBuf = c.source;
}
