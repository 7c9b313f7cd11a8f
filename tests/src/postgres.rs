//! A throwaway PostgreSQL 15 server for tests.
//!
//! PostgreSQL refuses to run as root, and tests here often do, so the
//! cluster lives in a temp dir owned by the `postgres` user and the server
//! tools run through `runuser` when we are root. The server listens on a
//! free loopback port only and is stopped when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running PostgreSQL; connect as user `touchline`, database `postgres`.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    stopped: bool,
}

impl Postgres {
    /// Starts a fresh cluster. Fails with a clear message when PostgreSQL
    /// 15 is not installed (`scripts/test` installs it).
    pub fn start() -> anyhow::Result<Postgres> {
        if !Path::new(BIN).join("initdb").exists() {
            bail!("PostgreSQL 15 is not installed ({BIN}/initdb missing): run scripts/test, which installs it");
        }
        let dir = tempfile::Builder::new()
            .prefix("touchline-pg")
            .tempdir()
            .context("creating a temp dir")?;
        let as_root = running_as_root();
        if as_root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .context("running chown")?;
            if !status.success() {
                bail!("chown of {} to postgres failed", dir.path().display());
            }
        }
        let data = dir.path().join("db");
        run_pg(
            as_root,
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "touchline".as_ref(),
            ],
        )?;
        let port = crate::free_port()?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            dir.path().display()
        );
        let log = dir.path().join("log");
        run_pg(
            as_root,
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        )?;
        let pg = Postgres {
            port,
            dir,
            stopped: false,
        };
        crate::wait_for_port(port, Duration::from_secs(30))?;
        Ok(pg)
    }

    /// A tokio-postgres connection string for this server.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=touchline dbname=postgres",
            self.port
        )
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// Stops the server (fast shutdown). Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let data = self.data_dir();
        let _ = run_pg(
            running_as_root(),
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn running_as_root() -> bool {
    // `id -u` avoids an unsafe libc call for something this simple.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run_pg(as_root: bool, tool: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let path = Path::new(BIN).join(tool);
    let mut cmd = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    cmd.args(args);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
