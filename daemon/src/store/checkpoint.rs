//! `journal` mode's bookkeeping: when a checkpoint is due, how one is
//! written, and the replay that recovers what a crash left unwritten.
//!
//! The writer owns one [`Deferred`]: the engine's unwritten changes
//! (`hot.rs`) and the journal of the events behind them (`journal.rs`).
//! Both follow the writer's transactions (begin, commit, or a rollback by
//! the next begin), so what is in memory always matches what committed.

use std::time::{Duration, Instant};

use edge_config::Store as StoreConfig;
use heed::RwTxn;
use rustc_hash::FxHashMap;
use tracing::{info, warn};

use super::engine_table::LmdbTable;
use super::env::{Dbs, LmdbEnv};
use super::hot::{HotState, HotTable, Profiles};
use super::journal::{Journal, JournalError};
use super::keys::KeyBuf;
use super::ratelimit::RetryPause;
use crate::engine::table::{Entry, Profile, StateTable};
use crate::engine::{ApplyError, Engine, Output};
use crate::event::Event;

/// When a checkpoint is due (see `[store]` in the README).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub interval: Duration,
    pub max_keys: usize,
    pub max_events: u64,
}

impl Policy {
    pub(crate) fn from_config(store: &StoreConfig) -> Policy {
        Policy {
            interval: store.checkpoint_interval,
            max_keys: store.checkpoint_max_keys.max(1),
            max_events: u64::try_from(store.checkpoint_max_events.max(1)).unwrap_or(u64::MAX),
        }
    }
}

/// When what the writer holds in memory (the deferred state, presence,
/// dedup keys) is next to be written back: past the policy's bounds, or
/// its interval after the last write-back that committed. One schedule
/// for all of it, since every write-back writes all of it.
pub(crate) struct Schedule {
    policy: Policy,
    last: Instant,
    /// The open transaction wrote everything back.
    wrote_back: bool,
    /// After a write-back that did not commit, none is due for a while:
    /// one that cannot commit (a full map above all) fails again at
    /// once, and tried before every group it would take the writer's
    /// time and, riding in the groups' transactions, take down with it
    /// the acks that free space.
    retry: RetryPause,
}

impl Schedule {
    pub(crate) fn new(policy: Policy) -> Schedule {
        Schedule {
            policy,
            last: Instant::now(),
            wrote_back: false,
            retry: RetryPause::new(),
        }
    }

    /// Whether a write-back is due with `keys` held (state and dedup
    /// keys) and `events` journaled since the last one. Never while a
    /// failed one is put off, whatever the bounds: holding more is all
    /// the writer can do until it commits.
    pub(crate) fn due(&self, keys: usize, events: u64) -> bool {
        if self.retry.waiting() {
            return false;
        }
        keys >= self.policy.max_keys
            || events >= self.policy.max_events
            || ((keys > 0 || events > 0) && self.last.elapsed() >= self.policy.interval)
    }

    pub(crate) fn begin(&mut self) {
        self.wrote_back = false;
    }

    /// The open transaction wrote everything held back.
    pub(crate) fn wrote_back(&mut self) {
        self.wrote_back = true;
    }

    pub(crate) fn commit(&mut self) {
        if std::mem::take(&mut self.wrote_back) {
            self.last = Instant::now();
            self.retry.succeeded();
        }
    }

    /// A write-back did not commit: the next is put off, longer after
    /// each failure in a row. Returns for how long.
    pub(crate) fn failed(&mut self) -> Duration {
        self.retry.failed()
    }
}

/// Engine state held back from LMDB until the next checkpoint.
pub(crate) struct Deferred {
    pub hot: HotState,
    pub journal: Journal,
    /// Profiles the engine read while applying the current event.
    read: Vec<(String, Option<Profile>)>,
}

/// Why a checkpoint or the journaling of an event failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeferredError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
}

impl Deferred {
    pub(crate) fn new(journal: Journal) -> Deferred {
        Deferred {
            hot: HotState::default(),
            journal,
            read: Vec::new(),
        }
    }

    pub(crate) fn begin(&mut self) {
        self.hot.begin();
        self.journal.begin();
        self.read.clear();
    }

    pub(crate) fn commit(&mut self) {
        self.hot.commit();
        self.journal.commit();
    }

    /// Whether anything waits for a checkpoint.
    pub(crate) fn pending(&self) -> bool {
        self.journal.entries() > 0 || self.hot.keys() > 0
    }

    /// The engine's table for the open transaction; profile reads are
    /// noted for the current event's journal entry.
    pub(crate) fn table<'a, 't, 'e>(
        &'a mut self,
        txn: &'t mut RwTxn<'e>,
        dbs: &Dbs,
    ) -> HotTable<'a, 't, 'e> {
        HotTable {
            hot: &mut self.hot,
            txn,
            db: dbs.rule_state,
            profiles: Profiles::Live {
                db: dbs.profiles,
                read: &mut self.read,
            },
            key: KeyBuf::default(),
        }
    }

    /// Journals the event just applied, with the profiles it was given
    /// and read; `data_text` is its data as [`super::journal::render_data`]
    /// rendered it, when the submitter did.
    pub(crate) fn journal(
        &mut self,
        txn: &mut RwTxn,
        now_ms: i64,
        event: &Event,
        data_text: Option<&str>,
        profile: Option<&str>,
    ) -> Result<(), DeferredError> {
        self.journal
            .append(txn, now_ms, event, data_text, profile, &self.read)?;
        self.read.clear();
        Ok(())
    }

    /// Writes every unwritten change to LMDB and empties the journal, in
    /// the open transaction. Returns the keys written.
    pub(crate) fn checkpoint(&mut self, txn: &mut RwTxn, dbs: &Dbs) -> heed::Result<usize> {
        let written = self.hot.write_back(txn, dbs.rule_state)?;
        self.journal.clear(txn)?;
        Ok(written)
    }
}

/// Entries read per batch while replaying.
const REPLAY_BATCH: usize = 4_096;

/// Replays what a run that ended without a checkpoint left in the
/// journal, with `engine` (built from the rules the store opens with; its
/// outputs are discarded: they committed the first time), then
/// checkpoints. Returns the entries replayed.
///
/// An entry that cannot be decoded is skipped with a log line: the
/// events around it still replay, and nothing else can be done with it.
pub(crate) fn replay(
    env: &LmdbEnv,
    dbs: &Dbs,
    deferred: &mut Deferred,
    mut engine: Engine,
) -> Result<u64, ReplayError> {
    if deferred.journal.entries() == 0 {
        return Ok(0);
    }
    let started = Instant::now();
    let mut txn = env.write_txn()?;
    deferred.begin();
    engine.begin();
    let mut out = Output::default();
    let mut replayed = 0u64;
    let mut skipped = 0u64;
    // Where each fan was last seen, which the run held in memory: every
    // journaled event touched the subject's presence.
    let mut seen: FxHashMap<String, i64> = FxHashMap::default();
    let mut after = 0u64;
    loop {
        let batch = deferred.journal.read(&txn, after, REPLAY_BATCH)?;
        let Some(&(last, _)) = batch.last() else {
            break;
        };
        after = last;
        for (_, entry) in batch {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warn!(error = %e, "journal entry skipped in replay");
                    skipped += 1;
                    continue;
                }
            };
            let mut table = HotTable {
                hot: &mut deferred.hot,
                txn: &mut txn,
                db: dbs.rule_state,
                profiles: Profiles::Replay(&entry.read),
                key: KeyBuf::default(),
            };
            engine.apply(
                &mut table,
                &entry.event,
                entry.profile.as_ref(),
                entry.now_ms,
                &mut out,
            )?;
            out.records.clear();
            out.progress.clear();
            if let Some(customer) = &entry.event.subject {
                let t = seen.entry(customer.clone()).or_insert(entry.event.time_ms);
                *t = (*t).max(entry.event.time_ms);
            }
            replayed += 1;
        }
    }
    engine.flush(&mut HotTable {
        hot: &mut deferred.hot,
        txn: &mut txn,
        db: dbs.rule_state,
        profiles: Profiles::Replay(&[]),
        key: KeyBuf::default(),
    })?;
    let written = deferred.checkpoint(&mut txn, dbs)?;
    super::presence::restore(dbs.nba.presence, &mut txn, &seen)?;
    txn.commit()?;
    deferred.commit();
    info!(
        replayed,
        skipped,
        keys_written = written,
        ms = started.elapsed().as_millis() as u64,
        "journal replayed after an unclean stop"
    );
    Ok(replayed)
}

/// Why the replay at open failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplayError {
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Deferred(#[from] DeferredError),
}

/// The direct-mode table, kept here so the writer picks its table in
/// one place.
pub(crate) enum EngineTable<'a, 't, 'e> {
    Direct(LmdbTable<'t, 'e>),
    Deferred(HotTable<'a, 't, 'e>),
}

impl<'a, 't, 'e> EngineTable<'a, 't, 'e> {
    /// The table the engine works on in the open transaction: the
    /// deferred state when there is one, LMDB itself otherwise.
    pub(crate) fn new(
        deferred: &'a mut Option<Deferred>,
        txn: &'t mut RwTxn<'e>,
        dbs: &Dbs,
    ) -> Self {
        match deferred {
            Some(d) => EngineTable::Deferred(d.table(txn, dbs)),
            None => EngineTable::Direct(LmdbTable::new(txn, dbs)),
        }
    }
}

impl StateTable for EngineTable<'_, '_, '_> {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, heed::Error> {
        match self {
            EngineTable::Direct(t) => t.get(key),
            EngineTable::Deferred(t) => t.get(key),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), heed::Error> {
        match self {
            EngineTable::Direct(t) => t.put(key, value),
            EngineTable::Deferred(t) => t.put(key, value),
        }
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), heed::Error> {
        match self {
            EngineTable::Direct(t) => t.delete(key),
            EngineTable::Deferred(t) => t.delete(key),
        }
    }

    fn prefixed(&self, prefix: &[u8]) -> Result<Vec<Entry>, heed::Error> {
        match self {
            EngineTable::Direct(t) => t.prefixed(prefix),
            EngineTable::Deferred(t) => t.prefixed(prefix),
        }
    }

    fn profile(&mut self, customer: &str) -> Result<Option<Profile>, ApplyError> {
        match self {
            EngineTable::Direct(t) => t.profile(customer),
            EngineTable::Deferred(t) => t.profile(customer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_back_is_due_past_either_bound_or_after_the_interval_with_anything_held() {
        let bounds = Policy {
            interval: Duration::from_secs(3600),
            max_keys: 10,
            max_events: 5,
        };
        let s = Schedule::new(bounds);
        assert!(!s.due(9, 4), "under both bounds, within the interval");
        assert!(s.due(10, 0), "the key bound (state and dedup keys)");
        assert!(s.due(0, 5), "the event bound");

        let s = Schedule::new(Policy {
            interval: Duration::ZERO,
            ..bounds
        });
        assert!(s.due(1, 0), "a held key, the interval past");
        assert!(s.due(0, 1), "a journaled event, the interval past");
        assert!(!s.due(0, 0), "nothing held: nothing to write");
    }

    #[test]
    fn a_failed_write_back_is_put_off_longer_each_time_until_one_commits() {
        let mut s = Schedule::new(Policy {
            interval: Duration::ZERO,
            max_keys: 10,
            max_events: 5,
        });
        assert!(s.due(100, 100));
        let waits: Vec<Duration> = (0..7).map(|_| s.failed()).collect();
        assert_eq!(
            waits.iter().map(Duration::as_secs).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 30, 30]
        );
        assert!(!s.due(100, 100), "put off, whatever the bounds");
        // A write-back that commits ends the pause and the doubling.
        s.begin();
        s.wrote_back();
        s.commit();
        assert!(s.due(100, 100));
        assert_eq!(s.failed(), Duration::from_secs(1));
        // A transaction that wrote nothing back changes neither.
        s.begin();
        s.commit();
        assert!(!s.due(100, 100));
        assert_eq!(s.failed(), Duration::from_secs(2));
    }
}
