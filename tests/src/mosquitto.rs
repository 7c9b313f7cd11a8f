//! A throwaway Mosquitto broker for tests.
//!
//! Persistence is on, with its database in the broker's temp dir, so a
//! `restart` behaves like a real broker restart: persistent sessions and
//! their queued and in-flight QoS 1 messages survive it. The broker listens
//! on a free loopback port only, keeps that port across restarts, and is
//! stopped when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::process::ChildProcess;

/// Where `mosquitto` is looked for besides `PATH` (Debian installs it in
/// `/usr/sbin`, which is not on a normal user's `PATH`).
const EXTRA_DIRS: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/sbin"];

/// How long the broker may take to listen, or to exit on SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running Mosquitto 2 broker on 127.0.0.1:`port`.
pub struct Mosquitto {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<ChildProcess>,
}

impl Mosquitto {
    /// Starts a broker with the defaults below. Fails with a clear message
    /// when Mosquitto is not installed.
    pub fn start() -> anyhow::Result<Mosquitto> {
        Mosquitto::start_with("")
    }

    /// Starts a broker; `extra_conf` lines are appended to the generated
    /// configuration (later settings win in Mosquitto).
    pub fn start_with(extra_conf: &str) -> anyhow::Result<Mosquitto> {
        let bin = find_mosquitto()?;
        let dir = tempfile::Builder::new()
            .prefix("touchline-mosquitto")
            .tempdir()
            .context("creating a temp dir")?;
        let port = crate::free_port()?;
        let conf = config(port, dir.path(), running_as_root(), extra_conf);
        std::fs::write(dir.path().join("mosquitto.conf"), conf)
            .context("writing mosquitto.conf")?;
        let mut broker = Mosquitto {
            port,
            bin,
            dir,
            child: None,
        };
        broker.launch()?;
        Ok(broker)
    }

    /// `mqtt://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log and output so far (all restarts), for failure
    /// messages.
    pub fn log_text(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name));
        format!(
            "{}{}",
            read("mosquitto.log").unwrap_or_default(),
            read("mosquitto.out").unwrap_or_default()
        )
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// Stops the broker gracefully (SIGTERM: it writes its persistence
    /// database before exiting), falling back to SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.terminate(STOP_TIMEOUT).is_err() {
                let _ = child.kill9();
            }
        }
    }

    /// Stops the broker the way a crash would (SIGKILL): whatever it had
    /// not yet written to its persistence database is gone.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill9()?;
        }
        Ok(())
    }

    /// Stops the broker (if running) and starts it again on the same port
    /// with the same persistence database.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch()
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.path().join("mosquitto.conf");
        let conf = conf.to_str().context("temp dir path is not UTF-8")?;
        let output = self.dir.path().join("mosquitto.out");
        let mut child = ChildProcess::spawn(&self.bin, &["-c", conf], &output)?;
        // The port was free a moment ago, and a restart reuses it; poll
        // until the broker accepts connections, or notice that it died.
        let listening = crate::wait_until(START_TIMEOUT, || {
            !child.is_running() || crate::wait_for_port(self.port, Duration::ZERO).is_ok()
        });
        if !child.is_running() {
            bail!(
                "mosquitto exited during startup on port {}:\n{}",
                self.port,
                self.log_text()
            );
        }
        if !listening {
            bail!(
                "mosquitto does not listen on port {} after {START_TIMEOUT:?}:\n{}",
                self.port,
                self.log_text()
            );
        }
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(port: u16, dir: &Path, as_root: bool, extra: &str) -> String {
    let mut conf = format!(
        "# Generated for a test: loopback only, anonymous, persistent.\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {dir}/\n\
         log_dest file {dir}/mosquitto.log\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n\
         connection_messages true\n\
         # Room for load tests: un-acked messages per client, and messages\n\
         # queued for a persistent session while its client is away or busy.\n\
         max_inflight_messages 1000\n\
         max_queued_messages 1000000\n\
         max_queued_bytes 0\n",
        dir = dir.display()
    );
    if as_root {
        // As root, Mosquitto switches to the `mosquitto` user by default
        // and could no longer write its database in our temp dir.
        conf.push_str("user root\n");
    }
    conf.push_str(extra);
    conf.push('\n');
    conf
}

fn find_mosquitto() -> anyhow::Result<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let extra = EXTRA_DIRS.iter().map(PathBuf::from);
    path_dirs
        .into_iter()
        .chain(extra)
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file())
        .context(
            "mosquitto is not installed (not on PATH nor in /usr/sbin): install the `mosquitto` \
             package (apt-get install mosquitto); CI installs it",
        )
}

fn running_as_root() -> bool {
    // `id -u` avoids an unsafe libc call for something this simple.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
