//! One daemon per data directory.
//!
//! LMDB itself lets several processes open one environment, so two
//! daemons started on the same `data_dir` would both run: two uplinks
//! sending one outbox and two writers interleaving sequence numbers. An
//! exclusive lock on `<data_dir>/touchline.pid`, held for the daemon's
//! life, refuses the second one. The kernel drops the lock when the
//! process dies however it dies, so a `kill -9` never leaves a stale lock
//! behind; the file stays and names the pid for `touchline reload`.
//! Read-only tools (`status`, `dlq`) do not take the lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Name of the lock and pid file inside the data directory.
pub const PID_FILE: &str = "touchline.pid";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another touchline{} is already running on data directory {dir}; stop it first or use another data_dir",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock on `data_dir` (created if missing) and records this
    /// process's pid in it.
    pub fn acquire(data_dir: &Path) -> Result<InstanceLock, LockError> {
        let path = data_dir.join(PID_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held {
                    dir: data_dir.to_path_buf(),
                    pid,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(InstanceLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid recorded in `data_dir`'s pid file when a daemon holds the lock
/// now; `None` when no daemon runs there.
pub fn running_pid(data_dir: &Path) -> Option<u32> {
    let path = data_dir.join(PID_FILE);
    let mut file = File::open(&path).ok()?;
    match file.try_lock_shared() {
        // We got it, so nobody holds it: the file is left from a stop.
        Ok(()) => None,
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            file.read_to_string(&mut text).ok()?;
            text.trim().parse().ok()
        }
        Err(TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(dir.path()).unwrap();
        assert_eq!(running_pid(dir.path()), Some(std::process::id()));
        match InstanceLock::acquire(dir.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        assert_eq!(running_pid(dir.path()), None);
        InstanceLock::acquire(dir.path()).unwrap();
    }
}
