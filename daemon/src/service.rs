//! `touchline run` as a system service: signals, readiness, watchdog,
//! status and the orderly stop.
//!
//! The daemon itself ([`crate::app::Daemon`]) knows nothing about how it
//! is supervised; this is where it meets the init system. Signals are
//! claimed before anything starts, so an early SIGHUP reloads instead of
//! killing (its default action) and an early SIGTERM still drains.
//! READY=1 goes out only when the readiness checks pass (store open, rules
//! loaded, every configured ingest source up); until then STATUS says
//! what is awaited.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_config::{RuleBundle, SiteConfig};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info};

use crate::app::Daemon;
use crate::notify::{self, Notifier};

/// How often STATUS= is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How often readiness is re-checked while starting.
const READY_POLL: Duration = Duration::from_millis(200);

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

enum Wake {
    Stop(&'static str),
    Reload,
}

impl Signals {
    fn claim() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Wake {
        tokio::select! {
            _ = self.term.recv() => Wake::Stop("SIGTERM"),
            _ = self.int.recv() => Wake::Stop("SIGINT"),
            _ = self.hup.recv() => Wake::Reload,
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then drains for up to `drain`.
/// Exit 0 after an orderly stop, 1 when the daemon cannot start.
pub async fn run(site: SiteConfig, rules: RuleBundle, drain: Duration) -> ExitCode {
    let mut signals = match Signals::claim() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let notifier = Notifier::from_env().map(Arc::new);
    let tell = |f: &dyn Fn(&Notifier)| {
        if let Some(n) = &notifier {
            f(n)
        }
    };
    tell(&|n| n.status("starting: opening the store"));
    let daemon = match Daemon::start(site, rules).await {
        Ok(d) => d,
        Err(e) => {
            error!("cannot start: {e}");
            tell(&|n| n.status(&format!("failed to start: {e}")));
            return ExitCode::FAILURE;
        }
    };

    // Readiness first; a stop request while waiting is honoured.
    let mut reported: Option<String> = None;
    loop {
        let readiness = daemon.observed().readiness().await;
        if readiness.ready() {
            break;
        }
        let waiting: Vec<String> = readiness
            .failing()
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        let line = format!("starting: waiting for {}", waiting.join(", "));
        if reported.as_deref() != Some(line.as_str()) {
            info!("{line}");
            tell(&|n| n.status(&line));
            reported = Some(line);
        }
        tokio::select! {
            () = tokio::time::sleep(READY_POLL) => {}
            wake = signals.next() => match wake {
                Wake::Stop(why) => return stop(daemon, &notifier, why, drain).await,
                Wake::Reload => { let _ = daemon.reloader().reload().await; }
            },
        }
    }
    let mut summary = Summary::new(&daemon);
    let line = summary.line(&daemon);
    tell(&|n| n.ready(&line));
    info!("touchline ready");

    let _watchdog = match (&notifier, notify::watchdog_interval()) {
        (Some(n), Some(interval)) => {
            info!(interval = ?interval, "systemd watchdog enabled");
            Some(AbortOnDrop(tokio::spawn(notify::watchdog_loop(
                n.clone(),
                daemon.store().stats(),
                interval,
            ))))
        }
        _ => None,
    };

    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    status_tick.tick().await;
    loop {
        tokio::select! {
            _ = status_tick.tick() => {
                let line = summary.line(&daemon);
                tell(&|n| n.status(&line));
            }
            wake = signals.next() => match wake {
                Wake::Stop(why) => return stop(daemon, &notifier, why, drain).await,
                Wake::Reload => {
                    info!("SIGHUP: reloading rules");
                    tell(&|n| n.status("reloading rules"));
                    // The reloader logs the outcome, refusal included.
                    let _ = daemon.reloader().reload().await;
                    let line = summary.line(&daemon);
                    tell(&|n| n.status(&line));
                }
            },
        }
    }
}

async fn stop(
    daemon: Daemon,
    notifier: &Option<Arc<Notifier>>,
    why: &str,
    drain: Duration,
) -> ExitCode {
    info!("{why}: stopping (drain grace {drain:?})");
    if let Some(n) = notifier {
        n.stopping(&format!(
            "stopping: draining for up to {}s",
            drain.as_secs()
        ));
    }
    daemon.shutdown(drain).await;
    ExitCode::SUCCESS
}

/// Aborts the task when the service loop ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Builds the one-line STATUS: throughput since the last line, outbox
/// depth and the uplink's state.
struct Summary {
    at: Instant,
    events: u64,
}

impl Summary {
    fn new(daemon: &Daemon) -> Summary {
        Summary {
            at: Instant::now(),
            events: daemon.store().stats().events_committed(),
        }
    }

    fn line(&mut self, daemon: &Daemon) -> String {
        let stats = daemon.store().stats();
        let events = stats.events_committed();
        let secs = self.at.elapsed().as_secs_f64().max(0.001);
        let rate = events.saturating_sub(self.events) as f64 / secs;
        self.at = Instant::now();
        self.events = events;
        let up = daemon.uplink_state();
        let uplink = if !daemon.uplink_configured() {
            "no uplink configured".to_string()
        } else if up.connected() {
            format!("uplink connected, acked #{}", up.last_acked())
        } else {
            "uplink down".to_string()
        };
        format!(
            "{rate:.0} events/s, outbox {} records ({} KiB), {uplink}",
            stats.outbox_records(),
            stats.outbox_bytes().div_ceil(1024),
        )
    }
}
