//! Talking to the service manager: readiness, watchdog and status lines
//! over the `sd_notify` datagram protocol.
//!
//! systemd (`Type=notify`) passes `NOTIFY_SOCKET`, a filesystem path or an
//! abstract socket name starting with `@`; each message is one datagram of
//! `KEY=value` lines. Without the variable every call is a no-op, so the
//! same binary runs under systemd, in a container or at a terminal. The
//! protocol is small enough that a dependency would add more than it saves.
//!
//! The watchdog ping is only sent while the store writer's heartbeat is
//! fresh: a writer stuck in a commit stops the pings, systemd kills and
//! restarts the daemon, and the events it had not acknowledged come back
//! from MQTT or from HTTP clients that got no 202.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::store::StoreStats;

/// A connection to the service manager, when there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; `None` when unset or empty (not under a
    /// service manager). A malformed value is logged and ignored: the
    /// daemon must still run.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str()?.to_owned();
        if path.is_empty() {
            return None;
        }
        match Notifier::connect(&path) {
            Ok(n) => Some(n),
            Err(e) => {
                warn!(socket = %path, error = %e, "NOTIFY_SOCKET unusable; not notifying the service manager");
                None
            }
        }
    }

    fn connect(path: &str) -> io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        let socket = UnixDatagram::unbound()?;
        // A full socket buffer must never stall the daemon.
        socket.set_nonblocking(true)?;
        Ok(Notifier { socket, addr })
    }

    /// Sends one message (`KEY=value` lines). Errors are logged at debug
    /// level: the service manager going away is not the daemon's problem.
    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            debug!(error = %e, "sd_notify send failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// A status must stay on one line: a newline would start a new key.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The watchdog interval systemd expects pings within (`WATCHDOG_USEC`),
/// when it is meant for this process (`WATCHDOG_PID`, if set).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Silence the writer is always allowed: its idle loop turns once a
/// second and one large group commit may take a few.
const WRITER_GRACE: Duration = Duration::from_secs(5);

/// Whether the writer looks alive enough to ping the watchdog: silent for
/// less than half the watchdog interval (at least [`WRITER_GRACE`]). A
/// stuck writer is caught within that bound plus the interval.
pub fn writer_alive(silent_for: Duration, interval: Duration) -> bool {
    silent_for < (interval / 2).max(WRITER_GRACE)
}

/// Pings the watchdog every quarter interval while the writer is alive;
/// runs until dropped.
pub async fn watchdog_loop(notifier: Arc<Notifier>, stats: Arc<StoreStats>, interval: Duration) {
    let mut tick = tokio::time::interval(interval / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        let silent = stats.writer_silent_for();
        if writer_alive(silent, interval) {
            notifier.watchdog();
            warned = false;
        } else if !warned {
            warn!(
                silent_ms = silent.as_millis() as u64,
                "store writer has not turned its loop; withholding the watchdog ping"
            );
            warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_filesystem_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.ready("up\nand running");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "READY=1\nSTATUS=up and running"
        );
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("touchline-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.watchdog();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_silent_writer_withholds_the_ping() {
        let interval = Duration::from_secs(30);
        assert!(writer_alive(Duration::from_millis(1_200), interval));
        assert!(!writer_alive(Duration::from_secs(15), interval));
        assert!(!writer_alive(Duration::from_secs(120), interval));
        // Short intervals still tolerate an idle writer's one-second turns.
        assert!(writer_alive(
            Duration::from_millis(1_500),
            Duration::from_secs(2)
        ));
        assert!(!writer_alive(
            Duration::from_secs(6),
            Duration::from_secs(2)
        ));
    }
}
