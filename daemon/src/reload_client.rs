//! `touchline reload --config <file>`: asks the running daemon to reload
//! its rules.
//!
//! The bundle is validated here first, so an operator sees file/line
//! errors at the terminal and a broken bundle never reaches the daemon.
//! The daemon is then asked over its `[admin]` listener, which answers
//! with what changed or why it refused; without one, SIGHUP goes to the
//! pid in the data directory's pid file and the outcome is in the
//! daemon's log.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::admin::RELOAD_PATH;
use crate::cli::EX_USAGE;
use crate::reload::ReloadReport;
use crate::status::{connect_addr, describe};

/// Compiling a large bundle takes a moment; the answer waits for it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit 0 when reloaded (or signalled), 64 when the bundle is invalid,
/// 1 when no daemon could be reached.
pub fn run(config: &Path) -> ExitCode {
    let site = match edge_config::load_site_config(config) {
        Ok(site) => site,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match edge_config::load_rules(&site) {
        Ok(rules) => eprintln!(
            "{}: {} rule(s) valid",
            config.display(),
            rules.achievements.len()
        ),
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("not reloaded: the running daemon keeps its rules");
            return ExitCode::from(EX_USAGE);
        }
    }
    if let Some(admin) = &site.admin {
        match ask(connect_addr(admin.listen)) {
            Ok(Answer::Reloaded(report)) => {
                print_report(&report);
                return ExitCode::SUCCESS;
            }
            Ok(Answer::Refused(detail)) => {
                eprintln!("the daemon refused the reload and keeps its rules:\n{detail}");
                return ExitCode::from(EX_USAGE);
            }
            Err(e) => eprintln!("admin listener: {e}; falling back to SIGHUP"),
        }
    }
    signal(&site.site.data_dir)
}

enum Answer {
    Reloaded(ReloadReport),
    Refused(String),
}

fn ask(addr: std::net::SocketAddr) -> Result<Answer, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let url = format!("http://{addr}{RELOAD_PATH}");
        let response = client.post(&url).send().await.map_err(describe)?;
        let status = response.status();
        let body = response.text().await.map_err(describe)?;
        if status.is_success() {
            serde_json::from_str(&body)
                .map(Answer::Reloaded)
                .map_err(|e| format!("{url} did not answer a reload report: {e}"))
        } else if status.is_client_error() {
            let detail = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(String::from))
                .unwrap_or(body);
            Ok(Answer::Refused(detail))
        } else {
            Err(format!("{url} answered {status}: {body}"))
        }
    })
}

fn print_report(r: &ReloadReport) {
    println!("reloaded: {} rule(s) active", r.rules.len());
    for (label, items) in [
        ("added", &r.added),
        ("removed", &r.removed),
        ("new version (progress starts fresh)", &r.new_versions),
        ("changed without a version bump", &r.changed_in_place),
    ] {
        if !items.is_empty() {
            println!("  {label}: {}", items.join(", "));
        }
    }
    if !r.restart_needed.is_empty() {
        println!(
            "  changed sections needing a restart: {}",
            r.restart_needed.join(", ")
        );
    }
}

fn signal(data_dir: &Path) -> ExitCode {
    let Some(pid) = crate::instance::running_pid(data_dir) else {
        eprintln!(
            "no touchline is running on data directory {}",
            data_dir.display()
        );
        return ExitCode::FAILURE;
    };
    match std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
    {
        Ok(s) if s.success() => {
            println!("sent SIGHUP to pid {pid}; the daemon's log tells the outcome");
            ExitCode::SUCCESS
        }
        Ok(s) => {
            eprintln!("kill -HUP {pid} failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot run kill: {e}");
            ExitCode::FAILURE
        }
    }
}
