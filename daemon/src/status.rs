//! `touchline status --config <file>`: a site summary for a person at a
//! terminal.
//!
//! The running daemon knows the most (live counters, uplink state), so the
//! command first asks its `[admin]` listener for `GET /v1/status`. When
//! nothing answers there, the daemon is taken to be stopped and what
//! survives a stop is read from disk instead: the outbox from the store
//! (safe while another process has it open) and the rule versions from
//! the rule files. The output says which of the two it shows.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use edge_config::SiteConfig;

use crate::admin::{StatusReport, STATUS_PATH};
use crate::cli::EX_USAGE;
use crate::store::OutboxSummary;

/// How long to wait for the daemon to accept the connection …
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// … and to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the command; exit 0, 64 for an invalid config (or rule files when
/// they had to be read), 1 when the store cannot be read.
pub fn run(config: &Path) -> ExitCode {
    let site = match edge_config::load_site_config(config) {
        Ok(site) => site,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let why_offline = match &site.admin {
        Some(admin) => {
            let addr = connect_addr(admin.listen);
            match fetch(addr) {
                Ok(report) if report.site == site.site.id => {
                    print!("{}", render_live(&report, addr));
                    return ExitCode::SUCCESS;
                }
                Ok(report) => format!(
                    "the daemon answering at {addr} runs site `{}`, not `{}`",
                    report.site, site.site.id
                ),
                Err(e) => format!("no answer from the admin listener at {addr}: {e}"),
            }
        }
        None => "no [admin] section in the config, so the daemon cannot be asked".to_string(),
    };
    offline(&site, &why_offline)
}

/// Where to reach a listener bound to `listen`: a wildcard address is
/// reached over loopback.
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /v1/status` from the daemon at `addr`.
fn fetch(addr: SocketAddr) -> Result<StatusReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let url = format!("http://{addr}{STATUS_PATH}");
        let response = client.get(&url).send().await.map_err(describe)?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("{url} answered {status}"));
        }
        response
            .json::<StatusReport>()
            .await
            .map_err(|e| format!("{url} did not answer a Touchline status: {e}"))
    })
}

/// reqwest's own text says "error sending request for url (…)"; the
/// cause underneath (connection refused, timed out) is what helps.
pub(crate) fn describe(e: reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// The summary from disk, for a daemon that did not answer.
fn offline(site: &SiteConfig, why: &str) -> ExitCode {
    let data_dir = &site.site.data_dir;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "site {}: daemon not running; read from the store in {}",
        site.site.id,
        data_dir.display()
    );
    let _ = writeln!(out, "  ({why})");
    let mut code = ExitCode::SUCCESS;
    match crate::store::read_outbox_summary(data_dir, site.store.map_size) {
        Ok(Some(summary)) => {
            out += &render_outbox_offline(&summary, site.outbox.max_bytes);
        }
        Ok(None) => {
            let _ = writeln!(out, "outbox   no store there yet (the daemon never ran)");
        }
        Err(e) => {
            eprintln!("touchline status: {e}");
            code = ExitCode::FAILURE;
        }
    }
    match edge_config::load_rules(site) {
        Ok(rules) if rules.achievements.is_empty() => {
            let _ = writeln!(out, "rules    none configured");
        }
        Ok(rules) => {
            for (i, rule) in rules.achievements.iter().enumerate() {
                let head = if i == 0 { "rules" } else { "" };
                let _ = writeln!(
                    out,
                    "{head:<8} {} v{} (from {})",
                    rule.id,
                    rule.version,
                    rule.file.display()
                );
            }
        }
        Err(errors) => {
            print!("{out}");
            eprintln!("{errors}");
            return ExitCode::from(EX_USAGE);
        }
    }
    let _ = writeln!(
        out,
        "counters are kept in memory by the running daemon: none while it is stopped"
    );
    print!("{out}");
    code
}

fn render_outbox_offline(s: &OutboxSummary, max_bytes: u64) -> String {
    let mut out = format!(
        "outbox   {} record(s), {} of {}",
        s.records,
        format_bytes(s.bytes),
        format_bytes(max_bytes)
    );
    if let (Some(seq), Some(at)) = (s.oldest_seq, s.oldest_at_ms) {
        let age = crate::clock::now_ms().saturating_sub(at).max(0) as f64 / 1000.0;
        let _ = write!(
            out,
            "; oldest seq {seq}, {} old (event time {})",
            format_seconds(age),
            crate::clock::format_ms(at)
        );
    }
    let _ = writeln!(out, "; next seq {}", s.next_seq);
    // Records leave the outbox only when acknowledged or dropped, so
    // everything below the oldest one left that way.
    let through = s.oldest_seq.unwrap_or(s.next_seq).saturating_sub(1);
    if s.dropped_through > 0 {
        let _ = writeln!(
            out,
            "         acknowledged or dropped through seq {through} (dropped through seq {})",
            s.dropped_through
        );
    } else {
        let _ = writeln!(out, "         acknowledged through seq {through}");
    }
    out
}

/// The report of a running daemon, for a terminal.
pub fn render_live(r: &StatusReport, addr: SocketAddr) -> String {
    let mut out = String::new();
    let ready = if r.ready { "ready" } else { "NOT ready" };
    let _ = writeln!(
        out,
        "site {}: daemon running (touchline {}, up {}, {ready}; asked {addr})",
        r.site,
        r.version,
        format_seconds(r.uptime_seconds)
    );
    for (check, why) in &r.not_ready {
        let _ = writeln!(out, "  not ready: {check}: {why}");
    }
    let e = &r.events;
    let _ = writeln!(
        out,
        "events   received {}, accepted {}, duplicate {}, rejected {}, back-pressure {}",
        e.received, e.accepted, e.duplicates, e.rejected, e.backpressure
    );
    let reasons: Vec<String> = e
        .rejected_by_reason
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    if !reasons.is_empty() {
        let _ = writeln!(out, "         rejected by reason: {}", reasons.join(", "));
    }
    let s = &r.store;
    let _ = write!(
        out,
        "store    commits {}, storage errors {}, refused as map-full {}",
        s.commits, s.storage_errors, s.map_full_events
    );
    for (name, map) in &s.maps {
        let share = if map.size_bytes == 0 {
            0.0
        } else {
            map.used_bytes as f64 * 100.0 / map.size_bytes as f64
        };
        let _ = write!(
            out,
            "; {name} map {} of {} ({share:.0} %)",
            format_bytes(map.used_bytes),
            format_bytes(map.size_bytes)
        );
    }
    out.push('\n');
    let o = &r.outbox;
    let _ = write!(
        out,
        "outbox   {} record(s), {} of {}",
        o.records,
        format_bytes(o.bytes),
        format_bytes(o.max_bytes)
    );
    if let (Some(seq), Some(age)) = (o.oldest_seq, o.oldest_age_seconds) {
        let _ = write!(out, "; oldest seq {seq}, {} old", format_seconds(age));
    }
    let _ = writeln!(out, "; next seq {}", o.next_seq);
    if o.records_dropped > 0 || o.dropped_through > 0 {
        let _ = writeln!(
            out,
            "         dropped {} record(s) (drop-oldest), through seq {}",
            o.records_dropped, o.dropped_through
        );
    }
    if let Some(e) = &o.read_error {
        let _ = writeln!(out, "         cannot read the store: {e}");
    }
    let u = &r.uplink;
    if u.configured {
        let state = if u.connected {
            "connected"
        } else {
            "DISCONNECTED"
        };
        let _ = writeln!(
            out,
            "uplink   {state}; last acknowledged seq {}; sent {}, acknowledged {}, reconnects {}, refusals {}",
            u.last_acked_seq, u.records_sent, u.records_acked, u.reconnects, u.refusals
        );
    } else {
        let _ = writeln!(out, "uplink   not configured: records stay in the outbox");
    }
    let m = &r.mqtt;
    if m.configured {
        let state = if m.connected {
            "connected"
        } else {
            "DISCONNECTED"
        };
        let _ = writeln!(
            out,
            "mqtt     {state}; connects {}, connection errors {}",
            m.connects, m.connection_errors
        );
    } else {
        let _ = writeln!(out, "mqtt     not configured");
    }
    if r.rules.is_empty() {
        let _ = writeln!(out, "rules    none loaded");
    }
    for (i, rule) in r.rules.iter().enumerate() {
        let head = if i == 0 { "rules" } else { "" };
        let _ = writeln!(
            out,
            "{head:<8} {} v{}: matches {}, awards {}, predicate errors {}",
            rule.id, rule.version, rule.matches, rule.awards, rule.predicate_errors
        );
    }
    out
}

/// Bytes with a binary unit, one decimal above 1 KiB.
fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `3.2s`, `4m 05s`, `2h 03m 04s`, `3d 02h 01m`.
fn format_seconds(s: f64) -> String {
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let total = s as u64;
    let (d, h, m, sec) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    if d > 0 {
        format!("{d}d {h:02}h {m:02}m")
    } else if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else {
        format!("{m}m {sec:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_are_reached_over_loopback() {
        let v4: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let v6: SocketAddr = "[::]:9464".parse().unwrap();
        let fixed: SocketAddr = "10.0.0.5:9464".parse().unwrap();
        assert_eq!(connect_addr(v4).to_string(), "127.0.0.1:9464");
        assert_eq!(connect_addr(v6).to_string(), "[::1]:9464");
        assert_eq!(connect_addr(fixed), fixed);
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1 << 30), "1.0 GiB");
        assert_eq!(format_seconds(3.24), "3.2s");
        assert_eq!(format_seconds(245.0), "4m 05s");
        assert_eq!(format_seconds(7384.0), "2h 03m 04s");
        assert_eq!(format_seconds(3.0 * 86_400.0 + 7260.0), "3d 02h 01m");
    }

    #[test]
    fn offline_outbox_names_what_was_acknowledged() {
        let s = OutboxSummary {
            records: 2,
            bytes: 300,
            oldest_seq: Some(41),
            oldest_at_ms: Some(crate::clock::now_ms()),
            next_seq: 43,
            dropped_through: 0,
        };
        let text = render_outbox_offline(&s, 1 << 30);
        assert!(text.contains("2 record(s), 300 B of 1.0 GiB"), "{text}");
        assert!(text.contains("acknowledged through seq 40"), "{text}");
        let empty = OutboxSummary {
            records: 0,
            bytes: 0,
            oldest_seq: None,
            oldest_at_ms: None,
            next_seq: 43,
            dropped_through: 0,
        };
        assert!(render_outbox_offline(&empty, 1).contains("acknowledged through seq 42"));
    }
}
