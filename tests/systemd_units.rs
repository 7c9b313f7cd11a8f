//! The systemd units in `systemd/`: they parse, they keep the service
//! contract the daemon relies on, and their hardening does not regress.
//!
//! `systemd-analyze security --offline=true <file>` scores a unit file
//! without installing it. Each unit must score "OK" (at most 2.9) and at
//! most its recorded baseline in `systemd/exposure-baseline.txt`; lowering
//! a number there after tightening a unit is welcome, raising one needs a
//! reason. Without `systemd-analyze` on the machine the tests print why
//! and skip (`scripts/test` installs it).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use clap::Parser;
use touchline::cli::{Cli, Command as Cmd};

/// The highest overall exposure `systemd-analyze` still rates "OK".
const MAX_OK_EXPOSURE: f64 = 2.9;

const UNITS: [&str; 2] = ["touchline.service", "touchline-central.service"];

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the daemon crate sits in the workspace")
        .join("systemd")
}

/// Runs `systemd-analyze` with `args`; `None` (after saying so) when it is
/// not installed.
fn systemd_analyze(args: &[&str]) -> Option<Output> {
    match Command::new("systemd-analyze").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // Straight to the process's stderr: the test harness captures
            // `eprintln!` of passing tests, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: systemd-analyze is not installed (Debian package `systemd`; scripts/test installs it)"
            );
            None
        }
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `touchline.service 1.1` lines; `#` starts a comment.
fn baseline() -> BTreeMap<String, f64> {
    let path = systemd_dir().join("exposure-baseline.txt");
    let content = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut units = BTreeMap::new();
    for (n, line) in content.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [unit, level] = fields[..] else {
            panic!("{}:{}: expected `<unit> <exposure>`", path.display(), n + 1);
        };
        let level: f64 = level
            .parse()
            .unwrap_or_else(|e| panic!("{}:{}: {level}: {e}", path.display(), n + 1));
        units.insert(unit.to_string(), level);
    }
    units
}

/// The number and rating from the line
/// `→ Overall exposure level for touchline.service: 1.1 OK 🙂`.
fn overall_exposure(unit: &str, stdout: &str) -> (f64, String) {
    let marker = format!("Overall exposure level for {unit}:");
    let line = stdout
        .lines()
        .find(|l| l.contains(&marker))
        .unwrap_or_else(|| panic!("no `{marker}` line in:\n{stdout}"));
    let rest = &line[line.find(&marker).unwrap() + marker.len()..];
    let mut words = rest.split_whitespace();
    let level = words
        .next()
        .and_then(|w| w.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure number in `{line}`"));
    let rating = words.next().unwrap_or_default().to_string();
    (level, rating)
}

#[test]
fn every_unit_has_a_baseline_and_every_baseline_a_unit() {
    let baseline = baseline();
    let mut on_disk: Vec<String> = std::fs::read_dir(systemd_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".service"))
        .collect();
    on_disk.sort();
    let recorded: Vec<String> = baseline.keys().cloned().collect();
    assert_eq!(
        on_disk, recorded,
        "systemd/exposure-baseline.txt must list exactly the units in systemd/"
    );
    let mut expected: Vec<String> = UNITS.iter().map(|u| u.to_string()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "the units this test knows about");
}

#[test]
fn exposure_is_ok_and_not_above_the_baseline() {
    let baseline = baseline();
    for unit in UNITS {
        let path = systemd_dir().join(unit);
        let path_arg = path.to_str().unwrap();
        let Some(out) = systemd_analyze(&["security", "--offline=true", "--no-pager", path_arg])
        else {
            return;
        };
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "systemd-analyze security {unit} failed: {}\n{stdout}\n{stderr}",
            out.status
        );
        // Unknown or malformed settings are only warnings to systemd (the
        // line is ignored), which would silently drop a protection.
        assert!(
            !stderr.contains(unit),
            "systemd-analyze warns about {unit}:\n{stderr}"
        );
        let (level, rating) = overall_exposure(unit, &stdout);
        let recorded = baseline[unit];
        println!("{unit}: exposure {level} {rating} (baseline {recorded})");
        assert_eq!(rating, "OK", "{unit}: exposure {level} rated {rating}");
        assert!(
            level <= MAX_OK_EXPOSURE,
            "{unit}: exposure {level} above {MAX_OK_EXPOSURE}"
        );
        assert!(
            level <= recorded,
            "{unit}: exposure {level} is above the recorded baseline {recorded} \
             (systemd/exposure-baseline.txt); see which protection was lost:\n{stdout}"
        );
    }
}

/// `systemd-analyze verify` loads the unit as systemd would. It also
/// insists that every `Exec*=` binary exists, and the units name the
/// installed paths (`/usr/bin/touchline`), so the check runs on a copy
/// whose `/usr/bin/` points at stand-in executables.
#[test]
fn units_parse() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for name in ["touchline", "touchline-central"] {
        let stub = bin.join(name);
        std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin_prefix = format!("{}/", bin.display());
    for unit in UNITS {
        let original = std::fs::read_to_string(systemd_dir().join(unit)).unwrap();
        let copy = dir.path().join(unit);
        std::fs::write(&copy, original.replace("/usr/bin/", &bin_prefix)).unwrap();
        let Some(out) = systemd_analyze(&[
            "verify",
            "--man=no",
            "--recursive-errors=no",
            copy.to_str().unwrap(),
        ]) else {
            return;
        };
        let stderr = text(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains(unit),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            out.status
        );
    }
}

/// `[Service]` settings as (key, value) pairs in file order.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let content = std::fs::read_to_string(systemd_dir().join(unit)).unwrap();
    let mut section = "";
    let mut settings = Vec::new();
    for line in content.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            if let Some((k, v)) = line.split_once('=') {
                settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    settings
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A systemd time span such as `45s`, `5min` or `1min 30s`.
fn span(value: &str) -> Duration {
    if let Ok(out) = Command::new("systemd-analyze")
        .args(["timespan", value])
        .output()
    {
        let stdout = text(&out.stdout);
        if let Some(us) = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("μs:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Duration::from_micros(us);
        }
        panic!("systemd-analyze cannot read the time span `{value}`:\n{stdout}");
    }
    // Without systemd-analyze: plain seconds, the form the units use.
    value
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or_else(|| panic!("cannot read the time span `{value}`"))
}

/// A command line from the unit as the daemon's own argument parser sees
/// it: a renamed flag or subcommand fails here, not at a site.
fn parse_command_line(key: &str, line: &str) -> Cmd {
    Cli::try_parse_from(line.split_whitespace())
        .unwrap_or_else(|e| panic!("{key}={line} is not a valid touchline command line:\n{e}"))
        .command
}

/// How long a stop takes besides the uplink's `--drain` grace, at worst:
/// MQTT acks and unsubscribes (its drain timeout, 5 s) and disconnects
/// (2 s), admitted HTTP requests get up to 10 s to commit (`app.rs`,
/// `ingest/mqtt.rs`). The writer's last commit comes on top.
const STOP_BESIDES_DRAIN: Duration = Duration::from_secs(17);

/// What the daemon's lifecycle code relies on, which a security score
/// would not notice going missing.
#[test]
fn daemon_unit_keeps_the_service_contract() {
    let s = service_settings("touchline.service");
    let get = |key: &str| setting(&s, key).unwrap_or_else(|| panic!("{key}= is not set"));
    // READY=1, STATUS= and WATCHDOG=1 come from the main process only.
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("NotifyAccess"), "main");
    assert_eq!(get("Restart"), "on-failure");
    // The daemon exits 64 on an invalid config: no restart loop.
    assert!(get("RestartPreventExitStatus")
        .split_whitespace()
        .any(|code| code == "64"));

    let Cmd::Run { config, drain } = parse_command_line("ExecStart", get("ExecStart")) else {
        panic!("ExecStart= does not run `touchline run`");
    };
    assert_eq!(config, Path::new("/etc/touchline/site.toml"));
    // Reload goes through `touchline reload` on the same config, which
    // validates before it asks the daemon.
    let Cmd::Reload { config: reloaded } = parse_command_line("ExecReload", get("ExecReload"))
    else {
        panic!("ExecReload= does not run `touchline reload`");
    };
    assert_eq!(reloaded, config);
    // The config lives in ConfigurationDirectory=.
    assert_eq!(
        Path::new("/etc").join(get("ConfigurationDirectory")),
        config.parent().unwrap()
    );

    // SIGTERM is the signal that drains; the stop timeout must cover the
    // whole drain with room to spare, or systemd SIGKILLs a daemon that is
    // still committing.
    assert_eq!(get("KillSignal"), "SIGTERM");
    let stop = span(get("TimeoutStopSec"));
    let needed = drain + STOP_BESIDES_DRAIN;
    assert!(
        stop >= needed + Duration::from_secs(10),
        "TimeoutStopSec={} leaves no room after a worst-case stop of {needed:?} (--drain {drain:?})",
        get("TimeoutStopSec")
    );

    // The daemon pings every quarter interval and withholds pings once the
    // writer is silent for half of it; one large group commit may take a
    // few seconds, which must not look like a hang.
    let watchdog = span(get("WatchdogSec"));
    assert!(
        watchdog >= Duration::from_secs(10),
        "WatchdogSec={} is too short for a slow commit",
        get("WatchdogSec")
    );

    // The package's postinst creates this user and owns the state with it.
    assert_eq!(get("User"), "touchline");
    assert_eq!(get("StateDirectory"), "touchline");
    // sd_notify goes over AF_UNIX.
    assert!(get("RestrictAddressFamilies")
        .split_whitespace()
        .any(|f| f == "AF_UNIX"));
}

/// The site config the package installs is valid as installed (next to
/// the packaged rules), and its data directory is the unit's
/// StateDirectory=, the only path the unit may write.
#[test]
fn packaged_site_config_matches_the_unit() {
    let root = systemd_dir().parent().unwrap().to_path_buf();
    let etc = tempfile::tempdir().unwrap();
    std::fs::create_dir(etc.path().join("rules")).unwrap();
    std::fs::copy(
        root.join("packaging/site.toml"),
        etc.path().join("site.toml"),
    )
    .unwrap();
    std::fs::copy(
        root.join("config/rules/cheer.toml"),
        etc.path().join("rules/cheer.toml"),
    )
    .unwrap();
    let site = edge_config::load_site_config(&etc.path().join("site.toml"))
        .unwrap_or_else(|e| panic!("packaging/site.toml:\n{e}"));
    let rules = edge_config::load_rules(&site)
        .unwrap_or_else(|e| panic!("packaging/site.toml with the packaged rules:\n{e}"));
    assert!(!rules.achievements.is_empty());

    let s = service_settings("touchline.service");
    let state = setting(&s, "StateDirectory").expect("StateDirectory= is set");
    assert_eq!(site.site.data_dir, Path::new("/var/lib").join(state));
}

/// The receiver reads its TLS files from the credentials directory and
/// writes only to its state directory.
#[test]
fn central_unit_names_what_it_loads() {
    let s = service_settings("touchline-central.service");
    let get = |key: &str| setting(&s, key).unwrap_or_else(|| panic!("{key}= is not set"));
    let credentials: Vec<&str> = s
        .iter()
        .filter(|(k, _)| k == "LoadCredential")
        .filter_map(|(_, v)| v.split_once(':').map(|(name, _)| name))
        .collect();
    let exec = get("ExecStart");
    let used: Vec<&str> = exec
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("%d/"))
        .collect();
    assert_eq!(used.len(), 3, "certificate, key and client CA: {exec}");
    for name in &used {
        assert!(
            credentials.contains(name),
            "ExecStart= reads %d/{name} but no LoadCredential={name}:... provides it"
        );
    }
    let sink = exec
        .split_whitespace()
        .skip_while(|arg| *arg != "--sink")
        .nth(1)
        .expect("ExecStart= names a --sink");
    assert_eq!(
        sink.strip_prefix("jsonl:").map(Path::new),
        Some(Path::new("/var/lib").join(get("StateDirectory")).as_path())
    );
    assert_eq!(get("KillSignal"), "SIGTERM");
    assert_eq!(get("RestartPreventExitStatus"), "64");
}
