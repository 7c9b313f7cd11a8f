//! The write-back environment, and the thread that writes it.
//!
//! Why: LMDB lets one transaction write an environment at a time, so
//! whatever the writer thread writes back from memory inside its own
//! transactions is time taken from applying events. Tables that only
//! ever receive write-backs can live in an environment of their own,
//! written by a thread of its own on the second core while the writer
//! goes on. The dedup keys are the first such table (`dedup.rs`): the
//! writer hands over a frozen copy of the keys it held, reads through
//! that copy until the thread reports the commit, then reads the table
//! itself through a read transaction begun after it.
//!
//! The environment sits in `writeback/` inside the data directory, with
//! the store's map size and sync mode. Its `meta` table records, in the
//! same commit as the keys, how far the store's expiry entries are
//! written back, which is what opening the store replays from.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use heed::types::{Bytes, Str};
use heed::{Database, EnvFlags, RoTxn, RwTxn, WithoutTls};
use tracing::warn;

use super::env::{map_usage, open_env, LmdbEnv, MapUsage};
use super::hot::Changes;
use super::sorted::{self, Order};

/// The environment's directory, inside the store's.
pub(crate) const DIR: &str = "writeback";

/// The writing thread's name (as the profilers and `ps` show it).
const THREAD: &str = "store-writeback";

/// How long closing waits for readers of the environment to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

const DB_META: &str = "meta";
const DB_DEDUP: &str = "dedup";

/// The `meta` key of the expiry entry up to which every dedup key is in
/// this environment's `dedup` table (16 bytes).
const KEY_DEDUP_THROUGH: &str = "dedup_written_through";

/// The environment's tables.
#[derive(Clone, Copy)]
pub(crate) struct WriteBackDbs {
    /// `meta`: string key → value (the dedup mark).
    pub meta: Database<Str, Bytes>,
    /// `dedup`: dedup key → first-seen time (8 bytes, big-endian).
    pub dedup: Database<Bytes, Bytes>,
}

impl WriteBackDbs {
    /// The expiry entry up to which every dedup key is written back, if
    /// any write-back recorded one.
    pub(crate) fn dedup_through(&self, txn: &RoTxn) -> heed::Result<Option<[u8; 16]>> {
        Ok(self
            .meta
            .get(txn, KEY_DEDUP_THROUGH)?
            .and_then(|v| <[u8; 16]>::try_from(v).ok()))
    }

    pub(crate) fn set_dedup_through(
        &self,
        txn: &mut RwTxn,
        through: &[u8; 16],
    ) -> heed::Result<()> {
        self.meta.put(txn, KEY_DEDUP_THROUGH, through)
    }
}

/// One hand-over: dedup keys frozen at a commit, the swept keys to
/// remove, and the mark they bring the table to.
pub(crate) struct Batch {
    /// Dedup key → first-seen time, or `None` for a held key swept.
    pub keys: Arc<Changes>,
    /// Keys to remove if they still hold this first-seen time (swept
    /// while in the table or in an earlier batch).
    pub removals: Arc<Vec<(Box<[u8]>, u64)>>,
    /// Every expiry entry up to this one has its key written once the
    /// batch commits.
    pub through: [u8; 16],
}

/// What became of a batch: the keys written, or why it did not commit.
pub(crate) type Outcome = Result<usize, String>;

/// The writer's side of the environment: hands batches to the thread,
/// hears back, and reads the table.
pub(crate) struct WriteBack {
    /// `None` once closed.
    env: Option<LmdbEnv>,
    dbs: WriteBackDbs,
    batches: Option<Sender<Batch>>,
    outcomes: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
    /// A batch was sent and its outcome not heard yet.
    in_flight: bool,
    /// Begun after the last batch the writer heard of committed; dropped
    /// when the next one commits, so it never pins more than one batch's
    /// pages.
    read: Option<RoTxn<'static, WithoutTls>>,
}

impl WriteBack {
    /// Opens (creating it when missing) the environment in `store_dir`
    /// and starts its thread.
    pub(crate) fn open(
        store_dir: &Path,
        map_size: usize,
        flags: EnvFlags,
    ) -> heed::Result<WriteBack> {
        let dir = store_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(heed::Error::Io)?;
        let env = open_env(&dir, map_size, flags)?;
        let mut txn = env.write_txn()?;
        let dbs = WriteBackDbs {
            meta: env.create_database(&mut txn, Some(DB_META))?,
            dedup: env.create_database(&mut txn, Some(DB_DEDUP))?,
        };
        txn.commit()?;
        let (batches, batch_rx) = mpsc::channel();
        let (outcome_tx, outcomes) = mpsc::channel();
        let thread_env = env.clone();
        let thread = std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || run(thread_env, dbs, batch_rx, outcome_tx))
            .map_err(heed::Error::Io)?;
        Ok(WriteBack {
            env: Some(env),
            dbs,
            batches: Some(batches),
            outcomes,
            thread: Some(thread),
            in_flight: false,
            read: None,
        })
    }

    /// The keys in the `dedup` table, for tests.
    #[cfg(test)]
    pub(crate) fn dedup_len(&self) -> u64 {
        let txn = self.env().unwrap().read_txn().unwrap();
        self.dbs.dedup.len(&txn).unwrap()
    }

    /// Runs `work` in a write transaction of the writer's own and commits
    /// it; only while no batch is in flight (opening the store).
    pub(crate) fn write_now<R>(
        &mut self,
        work: impl FnOnce(&mut RwTxn, WriteBackDbs) -> heed::Result<R>,
    ) -> heed::Result<R> {
        debug_assert!(!self.in_flight);
        self.read = None;
        let mut txn = self.env()?.write_txn()?;
        let result = work(&mut txn, self.dbs)?;
        txn.commit()?;
        Ok(result)
    }

    /// `key`'s first-seen time in the table, as of the last batch heard
    /// of.
    pub(crate) fn dedup_time(&mut self, key: &[u8]) -> heed::Result<Option<u64>> {
        let txn = match self.read {
            Some(ref txn) => txn,
            None => {
                let txn = self.env()?.clone().static_read_txn()?;
                self.read.insert(txn)
            }
        };
        Ok(self.dbs.dedup.get(txn, key)?.and_then(decode_time))
    }

    fn env(&self) -> heed::Result<&LmdbEnv> {
        self.env.as_ref().ok_or_else(|| {
            heed::Error::Io(std::io::Error::other(
                "the write-back environment is closed",
            ))
        })
    }

    /// How full the environment's map is, while it is open.
    pub(crate) fn map_usage(&self) -> Option<MapUsage> {
        self.env.as_ref().map(map_usage)
    }

    pub(crate) fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Hands `batch` to the thread. A thread that is gone (it panicked)
    /// is reported at once as a batch that did not commit.
    pub(crate) fn send(&mut self, batch: Batch) -> Result<(), String> {
        debug_assert!(!self.in_flight);
        let sent = match &self.batches {
            Some(tx) => tx.send(batch).is_ok(),
            None => false,
        };
        if !sent {
            return Err("the write-back thread has stopped".into());
        }
        self.in_flight = true;
        Ok(())
    }

    /// The outcome of the batch in flight, if it has come.
    pub(crate) fn try_outcome(&mut self) -> Option<Outcome> {
        if !self.in_flight {
            return None;
        }
        match self.outcomes.try_recv() {
            Ok(outcome) => Some(self.heard(outcome)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(self.heard(Err("the write-back thread has stopped".into())))
            }
        }
    }

    /// Waits for the outcome of the batch in flight, if any.
    pub(crate) fn wait_outcome(&mut self) -> Option<Outcome> {
        if !self.in_flight {
            return None;
        }
        let outcome = self
            .outcomes
            .recv()
            .unwrap_or_else(|_| Err("the write-back thread has stopped".into()));
        Some(self.heard(outcome))
    }

    fn heard(&mut self, outcome: Outcome) -> Outcome {
        self.in_flight = false;
        if outcome.is_ok() {
            // Reads from now on must see what the batch wrote.
            self.read = None;
        }
        outcome
    }

    /// Stops the thread once the batch in flight is written, and closes
    /// the environment.
    pub(crate) fn close(&mut self) {
        self.read = None;
        self.batches = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the write-back thread panicked");
            }
        }
        if let Some(env) = self.env.take() {
            if !env.prepare_for_closing().wait_timeout(CLOSE_WAIT) {
                warn!("write-back environment still in use after {CLOSE_WAIT:?}");
            }
        }
    }
}

/// The thread's body: writes each batch in a transaction of its own and
/// reports the outcome, until the writer hangs up.
fn run(env: LmdbEnv, dbs: WriteBackDbs, batches: Receiver<Batch>, outcomes: Sender<Outcome>) {
    let mut buffer: Vec<Order<'static>> = Vec::new();
    for batch in batches {
        let outcome = write(&env, dbs, &batch, &mut buffer).map_err(|e| e.to_string());
        // The writer may reuse the keys' map once this copy is gone.
        drop(batch);
        if outcomes.send(outcome).is_err() {
            break;
        }
    }
}

/// Writes one batch: the keys in key order, then the removals, then the
/// mark. Returns the keys written.
fn write(
    env: &LmdbEnv,
    dbs: WriteBackDbs,
    batch: &Batch,
    buffer: &mut Vec<Order<'static>>,
) -> heed::Result<usize> {
    let mut txn = env.write_txn()?;
    let keys = batch.keys.iter().map(|(k, v)| (&**k, v.as_deref()));
    let written = sorted::write_in_order(dbs.dedup, &mut txn, keys, buffer)?;
    for (key, time) in batch.removals.iter() {
        // A key seen again since has a later time, and stays.
        if dbs.dedup.get(&txn, key)?.and_then(decode_time) == Some(*time) {
            dbs.dedup.delete(&mut txn, key)?;
        }
    }
    dbs.set_dedup_through(&mut txn, &batch.through)?;
    txn.commit()?;
    Ok(written)
}

pub(crate) fn decode_time(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}
