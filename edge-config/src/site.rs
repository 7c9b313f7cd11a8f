//! The site config file: from TOML text to a validated [`SiteConfig`].
//!
//! Each section has one reader that takes every key (applying its
//! default) before checking anything, so one run reports every problem.
//! Where a value must fit another section's (the MQTT packet limit must
//! hold an event, the LMDB map must hold the outbox), the other value is
//! read first and handed over with its place, and the error lands on
//! whichever of the two the operator actually wrote.

use std::net::{Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;

use crate::defaults;
use crate::diagnostic::{ConfigErrors, Diags, Invalid, Source};
use crate::model::{
    Admin, Http, Ingest, Mqtt, Outbox, RuleStateMode, Site, SiteConfig, Store, SyncMode, TimeZone,
    Uplink, Validation, WhenFull,
};
use crate::offers;
use crate::paths;
use crate::reader::{self, Dur, Id, NonEmpty, PositiveDur, Setting, Size, StrList, Table};
use crate::units::{format_duration, format_size};

/// Largest MQTT packet the protocol can express (MQTT 3.1.1 §2.2.3).
const MQTT_PACKET_LIMIT: u64 = 268_435_455;
/// MQTT strings carry a 16-bit length.
const MQTT_STRING_LIMIT: usize = 65_535;
/// MQTT keep-alive is a 16-bit number of seconds.
const MQTT_KEEP_ALIVE_LIMIT: Duration = Duration::from_secs(65_535);
/// A batch travels as one protocol frame: leave room for the envelope.
const UPLINK_BATCH_BYTES_LIMIT: u64 = (touchline_proto::MAX_FRAME_LEN / 2) as u64;

/// Reads and validates the site config file at `path`.
pub fn load_site_config(path: &Path) -> Result<SiteConfig, ConfigErrors> {
    let text = paths::read_text(path)?;
    parse_site_config(&text, path)
}

/// Validates site config `text` that was read from `path`; relative paths
/// in it resolve against the folder of `path`.
pub fn parse_site_config(text: &str, path: &Path) -> Result<SiteConfig, ConfigErrors> {
    let src = Source::new(path, text);
    let mut d = Diags::new(&src);
    let result = reader::parse(&mut d).and_then(|doc| read_config(&mut d, &doc, path));
    d.conclude(result)
}

/// A value with its field path and place, for checks of how values in
/// different keys or sections relate.
struct Place<T> {
    value: T,
    field: String,
    span: Range<usize>,
    written: bool,
}

impl<T: Copy> Place<T> {
    fn of(table: &Table<'_, '_>, key: &str, setting: &Setting<T>) -> Place<T> {
        Place {
            value: setting.value,
            field: table.field(key),
            span: table.span_of(setting),
            written: setting.span.is_some(),
        }
    }

    /// `field (value)` for messages, noting when the value is a default.
    fn describe(&self, show: impl Fn(T) -> String) -> String {
        let note = if self.written { "" } else { ", the default" };
        format!("{} ({}{note})", self.field, show(self.value))
    }
}

/// Reports that two values don't fit together, on the one the operator
/// wrote: `first` unless only `second` was written.
fn conflict<A, B>(d: &mut Diags<'_, '_>, first: &Place<A>, second: &Place<B>, message: String) {
    let (span, field) = if first.written || !second.written {
        (&first.span, &first.field)
    } else {
        (&second.span, &second.field)
    };
    d.error(span.clone(), field, message);
}

/// `limit` must hold an event of `ingest.validation.max_event_size`;
/// false when reported.
fn check_holds_event(d: &mut Diags<'_, '_>, limit: &Place<u64>, event: &Place<u64>) -> bool {
    if limit.value >= event.value {
        return true;
    }
    let message = format!(
        "{} must be at least {}, or events that pass validation could not arrive",
        limit.describe(format_size),
        event.describe(format_size),
    );
    conflict(d, limit, event, message);
    false
}

fn read_config(
    d: &mut Diags<'_, '_>,
    doc: &toml::Spanned<DeTable<'_>>,
    path: &Path,
) -> Result<SiteConfig, Invalid> {
    let base = paths::base_of(path);
    let empty = DeTable::new();
    let mut root = Table::root(doc);

    let site = match root.table(d, "site") {
        Ok(Some(t)) => read_site(d, t, &base),
        Ok(None) => Err(d.error(
            root.span(),
            "site",
            "required table [site] is missing; it needs at least `id` and `data_dir`",
        )),
        Err(e) => Err(e),
    };

    let ingest = section(&mut root, d, "ingest", &empty).and_then(|t| read_ingest(d, t, &empty));
    let outbox = section(&mut root, d, "outbox", &empty).and_then(|t| read_outbox(d, t));
    let outbox_bytes = outbox.as_ref().ok().map(|(_, p)| p);
    let store = section(&mut root, d, "store", &empty).and_then(|t| read_store(d, t, outbox_bytes));
    let uplink = root
        .table(d, "uplink")
        .and_then(|t| t.map(|t| read_uplink(d, t, &base)).transpose());
    let admin = root
        .table(d, "admin")
        .and_then(|t| t.map(|t| read_admin(d, t)).transpose());
    let nba = section(&mut root, d, "nba", &empty).and_then(|t| offers::read_nba(d, t));
    root.finish(d);

    Ok(SiteConfig {
        source: paths::absolute(path),
        site: site?,
        ingest: ingest?,
        store: store?,
        uplink: uplink?,
        outbox: outbox?.0,
        admin: admin?,
        nba: nba?,
    })
}

/// Table `key` of `parent`, or an empty one standing in for it so the
/// defaults apply.
fn section<'t, 'i>(
    parent: &mut Table<'t, 'i>,
    d: &mut Diags<'_, '_>,
    key: &'static str,
    empty: &'t DeTable<'i>,
) -> Result<Table<'t, 'i>, Invalid> {
    match parent.table(d, key)? {
        Some(t) => Ok(t),
        None => Ok(Table::absent(parent.field(key), parent.span(), empty)),
    }
}

/// `[ingest]`: the validation limits first, because the MQTT and HTTP
/// limits must be able to carry an event that passes them.
fn read_ingest<'t, 'i>(
    d: &mut Diags<'_, '_>,
    mut t: Table<'t, 'i>,
    empty: &'t DeTable<'i>,
) -> Result<Ingest, Invalid> {
    let validation = section(&mut t, d, "validation", empty).and_then(|t| read_validation(d, t));
    let event_size = validation.as_ref().ok().map(|(_, place)| place);
    let mqtt = t
        .table(d, "mqtt")
        .and_then(|t| t.map(|t| read_mqtt(d, t, event_size)).transpose());
    let http = t
        .table(d, "http")
        .and_then(|t| t.map(|t| read_http(d, t, event_size)).transpose());
    t.finish(d);
    Ok(Ingest {
        mqtt: mqtt?,
        http: http?,
        validation: validation?.0,
    })
}

fn read_site(d: &mut Diags<'_, '_>, mut t: Table<'_, '_>, base: &Path) -> Result<Site, Invalid> {
    let id = t.req::<Id>(d, "id");
    let data_dir = t.req::<NonEmpty>(d, "data_dir");
    let rules = t.or::<StrList>(d, "rules", Vec::new());
    let timezone = t.opt::<String>(d, "timezone").and_then(|zone| match zone {
        None => Ok(defaults::TIMEZONE),
        Some(zone) => TimeZone::parse(&zone.value)
            .map_err(|e| d.error(t.span_of(&zone), &t.field("timezone"), e)),
    });
    let mut rules_ok = true;
    if let Ok(rules) = &rules {
        for (i, pattern) in rules.value.iter().enumerate() {
            let field = format!("{}[{i}]", t.field("rules"));
            let span = t.span_of(pattern);
            if pattern.value.trim().is_empty() {
                d.error(span, &field, "must not be empty");
                rules_ok = false;
            } else if let Err(e) = glob::Pattern::new(&pattern.value) {
                d.error(
                    span,
                    &field,
                    format!("invalid glob pattern `{}`: {}", pattern.value, e.msg),
                );
                rules_ok = false;
            }
        }
    }
    t.finish(d);
    let rules = rules?;
    if !rules_ok {
        return Err(Invalid);
    }
    Ok(Site {
        id: id?.value,
        data_dir: paths::resolve(base, Path::new(&data_dir?.value)),
        rules: rules.value.into_iter().map(|s| s.value).collect(),
        timezone: timezone?,
    })
}

fn read_mqtt(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    event_size: Option<&Place<u64>>,
) -> Result<Mqtt, Invalid> {
    let url = t.req::<String>(d, "url");
    let client_id = t.req::<NonEmpty>(d, "client_id");
    let topics = t.req::<StrList>(d, "topics");
    let max_packet_size = t.or::<Size>(d, "max_packet_size", defaults::MQTT_MAX_PACKET_SIZE);
    let keep_alive = t.or::<PositiveDur>(d, "keep_alive", defaults::MQTT_KEEP_ALIVE);
    let reconnect_min = t.or::<PositiveDur>(d, "reconnect_min", defaults::MQTT_RECONNECT_MIN);
    let reconnect_max = t.or::<PositiveDur>(d, "reconnect_max", defaults::MQTT_RECONNECT_MAX);
    let inflight = t.or::<u16>(d, "inflight", defaults::MQTT_INFLIGHT);
    t.finish(d);
    let mut ok = true;

    let address = url.and_then(|url| {
        parse_mqtt_url(&url.value).map_err(|e| d.error(t.span_of(&url), &t.field("url"), e))
    });
    if let Ok(id) = &client_id {
        if id.value.len() > MQTT_STRING_LIMIT {
            d.error(
                t.span_of(id),
                &t.field("client_id"),
                format!("longer than MQTT allows ({MQTT_STRING_LIMIT} bytes)"),
            );
            ok = false;
        }
    }
    if let Ok(topics) = &topics {
        if topics.value.is_empty() {
            d.error(
                t.span_of(topics),
                &t.field("topics"),
                "at least one topic filter is needed, e.g. [\"venue/+/events\"]",
            );
            ok = false;
        }
        for (i, topic) in topics.value.iter().enumerate() {
            if let Err(e) = check_topic_filter(&topic.value) {
                d.error(t.span_of(topic), &format!("{}[{i}]", t.field("topics")), e);
                ok = false;
            }
        }
    }
    if let Ok(size) = &max_packet_size {
        if size.value > MQTT_PACKET_LIMIT {
            d.error(
                t.span_of(size),
                &t.field("max_packet_size"),
                format!(
                    "{} is larger than any MQTT packet can be ({MQTT_PACKET_LIMIT} bytes)",
                    format_size(size.value)
                ),
            );
            ok = false;
        } else if let Some(event) = event_size {
            ok &= check_holds_event(d, &Place::of(&t, "max_packet_size", size), event);
        }
    }
    if let Ok(keep_alive) = &keep_alive {
        let v = keep_alive.value;
        if v.subsec_nanos() != 0 || v > MQTT_KEEP_ALIVE_LIMIT {
            d.error(
                t.span_of(keep_alive),
                &t.field("keep_alive"),
                format!(
                    "MQTT keep-alive is whole seconds from 1s to {}s; got {}",
                    MQTT_KEEP_ALIVE_LIMIT.as_secs(),
                    format_duration(v)
                ),
            );
            ok = false;
        }
    }
    ok &= check_backoff(d, &t, &reconnect_min, &reconnect_max);
    if let Ok(inflight) = &inflight {
        if inflight.value == 0 {
            d.error(
                t.span_of(inflight),
                &t.field("inflight"),
                "must be at least 1",
            );
            ok = false;
        }
    }

    let (host, port) = address?;
    let mqtt = Mqtt {
        host,
        port,
        client_id: client_id?.value,
        topics: topics?.value.into_iter().map(|s| s.value).collect(),
        max_packet_size: to_usize(d, &t, "max_packet_size", max_packet_size?)?,
        keep_alive: keep_alive?.value,
        reconnect_min: reconnect_min?.value,
        reconnect_max: reconnect_max?.value,
        inflight: inflight?.value,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(mqtt)
}

/// `mqtt://host[:port]` → host and port. IPv6 hosts go in brackets.
fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "`{url}` is not an MQTT URL; write mqtt://host:port, e.g. \"mqtt://127.0.0.1:1883\""
        ));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "mqtt" => {}
        "mqtts" | "ssl" | "tls" => {
            return Err(format!(
                "scheme `{scheme}://` (MQTT over TLS) is not supported; use mqtt://host:port to a broker on the site network"
            ))
        }
        "ws" | "wss" => {
            return Err(format!(
                "scheme `{scheme}://` (MQTT over WebSocket) is not supported; use mqtt://host:port"
            ))
        }
        _ => {
            return Err(format!(
                "unsupported scheme `{scheme}://`; the only supported one is mqtt://host:port"
            ))
        }
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "`{url}`: only mqtt://host:port is supported (no user, path or query)"
        ));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(format!("`{url}`: missing `]` after the IPv6 address"));
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("`{url}`: `{host}` is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(format!("`{url}`: expected `:port` after `]`")),
            },
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            Some(_) => {
                return Err(format!(
                    "`{url}`: put IPv6 addresses in brackets, e.g. mqtt://[::1]:1883"
                ))
            }
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!("`{url}`: `{host}` is not a host name or address"));
    }
    let port = match port {
        None => defaults::MQTT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(format!(
                    "`{url}`: port `{p}` is not a number from 1 to 65535"
                ))
            }
        },
    };
    Ok((host.to_owned(), port))
}

/// MQTT 3.1.1 §4.7: `+` and `#` fill a whole level, `#` only at the end.
fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("topic filter must not be empty".to_owned());
    }
    if filter.len() > MQTT_STRING_LIMIT {
        return Err(format!(
            "topic filter is longer than MQTT allows ({MQTT_STRING_LIMIT} bytes)"
        ));
    }
    if filter.contains('\0') {
        return Err("topic filter must not contain NUL".to_owned());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "invalid topic filter `{filter}`: `#` must be a whole level and the last one"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "invalid topic filter `{filter}`: `+` must be a whole level"
            ));
        }
    }
    Ok(())
}

fn read_http(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    event_size: Option<&Place<u64>>,
) -> Result<Http, Invalid> {
    let listen = t.req::<SocketAddr>(d, "listen");
    let max_body = t.or::<Size>(d, "max_body", defaults::HTTP_MAX_BODY);
    t.finish(d);
    if let (Ok(body), Some(event)) = (&max_body, event_size) {
        if !check_holds_event(d, &Place::of(&t, "max_body", body), event) {
            return Err(Invalid);
        }
    }
    Ok(Http {
        listen: listen?.value,
        max_body: to_usize(d, &t, "max_body", max_body?)?,
    })
}

/// `[ingest.validation]`, and the place of `max_event_size` for the
/// sections whose limits must hold an event.
fn read_validation(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
) -> Result<(Validation, Place<u64>), Invalid> {
    let max_event_size = t.or::<Size>(d, "max_event_size", defaults::MAX_EVENT_SIZE);
    let max_future_skew = t.or::<Dur>(d, "max_future_skew", defaults::MAX_FUTURE_SKEW);
    let max_age = t.or::<PositiveDur>(d, "max_age", defaults::MAX_AGE);
    let dedup_retention = t.or::<PositiveDur>(d, "dedup_retention", defaults::DEDUP_RETENTION);
    let venue_types = t.or::<StrList>(
        d,
        "venue_types",
        defaults::VENUE_TYPES
            .iter()
            .map(|s| Setting::defaulted((*s).to_owned()))
            .collect(),
    );
    let dlq_max = t.or::<usize>(d, "dlq_max", defaults::DLQ_MAX);
    t.finish(d);

    let mut ok = true;
    if let Ok(types) = &venue_types {
        for (i, pattern) in types.value.iter().enumerate() {
            let star = pattern.value.find('*');
            let problem = if pattern.value.trim().is_empty() {
                Some("must not be empty".to_owned())
            } else if star.is_some_and(|at| at + 1 != pattern.value.len()) {
                Some(format!(
                    "`{}`: `*` is only allowed at the end (it matches any suffix)",
                    pattern.value
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                d.error(
                    t.span_of(pattern),
                    &format!("{}[{i}]", t.field("venue_types")),
                    problem,
                );
                ok = false;
            }
        }
    }
    let max_event_size = max_event_size?;
    let place = Place::of(&t, "max_event_size", &max_event_size);
    let validation = Validation {
        max_event_size: to_usize(d, &t, "max_event_size", max_event_size)?,
        max_future_skew: max_future_skew?.value,
        max_age: max_age?.value,
        dedup_retention: dedup_retention?.value,
        venue_types: venue_types?.value.into_iter().map(|s| s.value).collect(),
        dlq_max: dlq_max?.value,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok((validation, place))
}

fn read_store(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    outbox_bytes: Option<&Place<u64>>,
) -> Result<Store, Invalid> {
    let map_size = t.or::<Size>(d, "map_size", defaults::MAP_SIZE);
    let commit_max_events = t.or::<usize>(d, "commit_max_events", defaults::COMMIT_MAX_EVENTS);
    let commit_max_delay = t.or::<Dur>(d, "commit_max_delay", defaults::COMMIT_MAX_DELAY);
    let sync = t.choice(
        d,
        "sync",
        "sync mode",
        &[
            ("full", SyncMode::Full),
            ("no-meta-sync", SyncMode::NoMetaSync),
            ("none", SyncMode::None),
        ],
        Some(defaults::SYNC),
    );
    let rule_state = t.choice(
        d,
        "rule_state",
        "rule state mode",
        &[
            ("journal", RuleStateMode::Journal),
            ("direct", RuleStateMode::Direct),
        ],
        Some(defaults::RULE_STATE),
    );
    let checkpoint_interval =
        t.or::<PositiveDur>(d, "checkpoint_interval", defaults::CHECKPOINT_INTERVAL);
    let checkpoint_max_keys =
        t.or::<usize>(d, "checkpoint_max_keys", defaults::CHECKPOINT_MAX_KEYS);
    let checkpoint_max_events =
        t.or::<usize>(d, "checkpoint_max_events", defaults::CHECKPOINT_MAX_EVENTS);
    t.finish(d);

    let mut ok = true;
    for (name, value) in [
        ("commit_max_events", &commit_max_events),
        ("checkpoint_max_keys", &checkpoint_max_keys),
        ("checkpoint_max_events", &checkpoint_max_events),
    ] {
        if let Ok(v) = value {
            if v.value == 0 {
                d.error(t.span_of(v), &t.field(name), "must be at least 1");
                ok = false;
            }
        }
    }
    if let (Ok(map), Some(outbox)) = (&map_size, outbox_bytes) {
        if map.value <= outbox.value {
            let map = Place::of(&t, "map_size", map);
            let message = format!(
                "{} must be larger than {}: the outbox lives in the store next to the customer state",
                map.describe(format_size),
                outbox.describe(format_size),
            );
            conflict(d, &map, outbox, message);
            ok = false;
        }
    }
    let store = Store {
        map_size: to_usize(d, &t, "map_size", map_size?)?,
        commit_max_events: commit_max_events?.value,
        commit_max_delay: commit_max_delay?.value,
        sync: sync?.value,
        rule_state: rule_state?.value,
        checkpoint_interval: checkpoint_interval?.value,
        checkpoint_max_keys: checkpoint_max_keys?.value,
        checkpoint_max_events: checkpoint_max_events?.value,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(store)
}

fn read_uplink(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    base: &Path,
) -> Result<Uplink, Invalid> {
    let central = t.req::<SocketAddr>(d, "central");
    let server_name = t.or::<NonEmpty>(d, "server_name", defaults::UPLINK_SERVER_NAME.to_owned());
    let ca = t.req::<NonEmpty>(d, "ca");
    let cert = t.req::<NonEmpty>(d, "cert");
    let key = t.req::<NonEmpty>(d, "key");
    let batch_max_records =
        t.or::<usize>(d, "batch_max_records", defaults::UPLINK_BATCH_MAX_RECORDS);
    let batch_max_bytes = t.or::<Size>(d, "batch_max_bytes", defaults::UPLINK_BATCH_MAX_BYTES);
    let request_timeout =
        t.or::<PositiveDur>(d, "request_timeout", defaults::UPLINK_REQUEST_TIMEOUT);
    let keep_alive = t.or::<PositiveDur>(d, "keep_alive", defaults::UPLINK_KEEP_ALIVE);
    let idle_timeout = t.or::<PositiveDur>(d, "idle_timeout", defaults::UPLINK_IDLE_TIMEOUT);
    let reconnect_min = t.or::<PositiveDur>(d, "reconnect_min", defaults::UPLINK_RECONNECT_MIN);
    let reconnect_max = t.or::<PositiveDur>(d, "reconnect_max", defaults::UPLINK_RECONNECT_MAX);
    let pseudonymize = t.or::<bool>(d, "pseudonymize", defaults::UPLINK_PSEUDONYMIZE);
    let pseudonym_key = t.opt::<NonEmpty>(d, "pseudonym_key");
    t.finish(d);

    let mut ok = true;
    if let Ok(records) = &batch_max_records {
        if records.value == 0 {
            d.error(
                t.span_of(records),
                &t.field("batch_max_records"),
                "must be at least 1",
            );
            ok = false;
        }
    }
    if let Ok(bytes) = &batch_max_bytes {
        if bytes.value > UPLINK_BATCH_BYTES_LIMIT {
            d.error(
                t.span_of(bytes),
                &t.field("batch_max_bytes"),
                format!(
                    "{} is more than a protocol frame can carry; at most {}",
                    format_size(bytes.value),
                    format_size(UPLINK_BATCH_BYTES_LIMIT)
                ),
            );
            ok = false;
        }
    }
    if let (Ok(keep_alive), Ok(idle)) = (&keep_alive, &idle_timeout) {
        if keep_alive.value >= idle.value {
            let a = Place::of(&t, "keep_alive", keep_alive);
            let b = Place::of(&t, "idle_timeout", idle);
            let message = format!(
                "{} must be below {}, or idle connections close before a keep-alive is sent",
                a.describe(format_duration),
                b.describe(format_duration),
            );
            conflict(d, &a, &b, message);
            ok = false;
        }
    }
    ok &= check_backoff(d, &t, &reconnect_min, &reconnect_max);

    let path = |s: Setting<String>| paths::resolve(base, Path::new(&s.value));
    let pseudonym_key: Option<PathBuf> = pseudonym_key?.map(path);
    let uplink = Uplink {
        central: central?.value,
        server_name: server_name?.value,
        ca: path(ca?),
        cert: path(cert?),
        key: path(key?),
        batch_max_records: batch_max_records?.value,
        batch_max_bytes: to_usize(d, &t, "batch_max_bytes", batch_max_bytes?)?,
        request_timeout: request_timeout?.value,
        keep_alive: keep_alive?.value,
        idle_timeout: idle_timeout?.value,
        reconnect_min: reconnect_min?.value,
        reconnect_max: reconnect_max?.value,
        pseudonymize: pseudonymize?.value,
        pseudonym_key,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(uplink)
}

fn read_admin(d: &mut Diags<'_, '_>, mut t: Table<'_, '_>) -> Result<Admin, Invalid> {
    let listen = t.req::<SocketAddr>(d, "listen");
    t.finish(d);
    Ok(Admin {
        listen: listen?.value,
    })
}

fn read_outbox(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
) -> Result<(Outbox, Place<u64>), Invalid> {
    let max_bytes = t.or::<Size>(d, "max_bytes", defaults::OUTBOX_MAX_BYTES);
    let when_full = t.choice(
        d,
        "when_full",
        "when_full policy",
        &[
            ("block", WhenFull::Block),
            ("drop-oldest", WhenFull::DropOldest),
        ],
        Some(defaults::OUTBOX_WHEN_FULL),
    );
    t.finish(d);
    let max_bytes = max_bytes?;
    let place = Place::of(&t, "max_bytes", &max_bytes);
    Ok((
        Outbox {
            max_bytes: max_bytes.value,
            when_full: when_full?.value,
        },
        place,
    ))
}

/// `reconnect_min <= reconnect_max`; false when reported.
fn check_backoff(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    min: &Result<Setting<Duration>, Invalid>,
    max: &Result<Setting<Duration>, Invalid>,
) -> bool {
    let (Ok(min), Ok(max)) = (min, max) else {
        return true;
    };
    if min.value <= max.value {
        return true;
    }
    let a = Place::of(t, "reconnect_min", min);
    let b = Place::of(t, "reconnect_max", max);
    let message = format!(
        "{} must not exceed {}",
        a.describe(format_duration),
        b.describe(format_duration),
    );
    conflict(d, &a, &b, message);
    false
}

fn to_usize(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    key: &str,
    setting: Setting<u64>,
) -> Result<usize, Invalid> {
    usize::try_from(setting.value).map_err(|_| {
        d.error(
            t.span_of(&setting),
            &t.field(key),
            "too large for this machine's address space",
        )
    })
}
