//! Duplicate detection by (`source`, `id`) within a retention period.
//!
//! Publishers retry (MQTT redelivery, HTTP clients after a timeout), so the
//! same event may arrive several times; only its first arrival may count.
//! `dedup` maps the key to its first-seen time; `dedup_expiry` orders the
//! same keys by that time so old ones can be swept a bounded number at a
//! time, inside the writer's normal commits.
//!
//! Every event writes an expiry entry, keyed by arrival time and a number
//! and holding the dedup key as its value. Arrival times here never go
//! back (a clock stepped back keeps the last time until it catches up)
//! and the number counts up within one time, so entries come in key
//! order and are appended without searching the tree, across restarts
//! too. Earlier versions keyed an entry by arrival time and dedup key,
//! with an empty value; the sweep and the replay read both layouts.
//!
//! The dedup keys themselves come in no order (publishers' ids are
//! mostly random, UUIDs), so each one written to LMDB dirties a leaf page
//! anywhere in the table, and a commit of a few thousand events copied
//! and synced a few thousand of them. So they are held in memory and
//! written back in key order, on the checkpoint interval and key bound,
//! and not by the writer: the `dedup` table lives in the write-back
//! environment (`writeback.rs`), whose own thread writes a frozen copy
//! of the held keys while the writer goes on reading through it. What
//! makes a held key durable is its expiry entry, which each commit still
//! appends: the write-back environment records, with the keys, the
//! expiry entry up to which every key is written, and opening the store
//! puts the keys of the entries after it back.
//!
//! Swept keys are removed by the same thread, and their expiry entries
//! only once it has committed the removal: a crash in between leaves the
//! entries, and the next sweep removes the keys again.

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn};
use tracing::warn;

use super::append;
use super::env::{Dbs, MapUsage};
use super::hot::{Changes, HotState};
use super::keys::KeyBuf;
use super::ratelimit::{LogLimiter, RetryPause};
use super::sorted::SortedPuts;
use super::stats::StoreStats;
use super::writeback::{decode_time, Batch, Outcome, WriteBack, WriteBackDbs};

/// The `meta` key of the expiry entry up to which every dedup key was
/// in the store's own `dedup` table (16 bytes): stores of the version
/// before the write-back environment. Absent in stores older still,
/// which held no keys.
const KEY_WRITTEN_THROUGH: &str = "dedup_written_through";

/// Natural dedup keys above this are hashed, so that `time ‖ key` in the
/// expiry index stays below LMDB's 511-byte key limit.
const MAX_DEDUP_KEY: usize = 256;

/// At most one warning per this interval about write-backs that failed.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Duplicate detection: the keys held since the last hand-over, the ones
/// handed over, and reused buffers.
pub(crate) struct Dedup {
    key: KeyBuf,
    /// The last expiry entry appended (arrival time, number), in the open
    /// transaction and as committed.
    last: (u64, u64),
    last_committed: (u64, u64),
    sweep_keys: Vec<u8>,
    /// Per expired entry: where its dedup key is in `sweep_keys`, and
    /// its arrival time (`None` for an entry not written by us).
    sweep_offsets: Vec<(std::ops::Range<usize>, Option<u64>)>,
    /// The last expired entry's own key.
    sweep_last: Vec<u8>,
    held: Held,
    /// The `dedup` table and the thread that writes it.
    table: WriteBack,
    /// The map of the last batch written, emptied, for the next one.
    spare: Changes,
    stats: Arc<StoreStats>,
    failure_log: LogLimiter,
    /// After a batch that did not commit (a full map), the next try
    /// waits: it would fail again at once, and every write-back of the
    /// writer's would wait for it.
    retry: RetryPause,
}

/// What is not in the `dedup` table yet.
struct Held {
    /// Dedup key → first-seen time (8 bytes, big-endian, as in `dedup`),
    /// or `None` for a held key swept.
    keys: HotState,
    /// Handed to the write-back thread; read until it has committed.
    /// Kept after a batch that failed, and handed over again.
    frozen: Option<Frozen>,
    /// Swept keys the table may hold: the open transaction's, then the
    /// committed ones not handed over yet.
    removals_open: Vec<(Box<[u8]>, u64)>,
    removals: Vec<(Box<[u8]>, u64)>,
    /// The last expiry entry swept, in the open transaction and as
    /// committed; the sweep goes on after it.
    swept_open: Option<Vec<u8>>,
    swept: Option<Vec<u8>>,
    /// Expiry entries up to this one may be deleted: the removal of
    /// their keys has committed in the table.
    deletable: Option<Vec<u8>>,
    /// The open transaction deleted them.
    deleting: bool,
    /// A hand-over is due when the open transaction commits.
    due: bool,
}

/// A batch handed over, as the writer keeps it.
struct Frozen {
    keys: Arc<Changes>,
    removals: Arc<Vec<(Box<[u8]>, u64)>>,
    through: [u8; 16],
    /// The sweep's position when it was frozen.
    swept: Option<Vec<u8>>,
}

impl Frozen {
    fn batch(&self) -> Batch {
        Batch {
            keys: self.keys.clone(),
            removals: self.removals.clone(),
            through: self.through,
        }
    }
}

impl Dedup {
    /// Opens dedup at the store's open, in its transaction: moves the
    /// keys a store of the version before kept in its own environment to
    /// `table`, puts back the keys a run held when it stopped uncleanly
    /// (every expiry entry after the table's mark), then holds keys from
    /// now on. Returns the keys put back.
    pub(crate) fn open(
        dbs: &Dbs,
        txn: &mut RwTxn,
        mut table: WriteBack,
        stats: Arc<StoreStats>,
    ) -> heed::Result<(Dedup, usize)> {
        let last = last_expiry(dbs, txn)?;
        let old_mark = dbs.meta.get(txn, KEY_WRITTEN_THROUGH)?.map(<[u8]>::to_vec);
        let old_keys = !dbs.dedup.is_empty(txn)?;
        let moving = old_keys || old_mark.is_some();
        let restored = {
            let main: &RoTxn = txn;
            table.write_now(|wtxn, wdbs| {
                let mark = if moving {
                    move_keys(dbs, main, wtxn, wdbs)?;
                    // Without a mark, every key was in the table.
                    Some(old_mark.clone().unwrap_or_else(|| last.to_vec()))
                } else {
                    // Without one here either (a new store, or a lost
                    // write-back environment), every entry is replayed.
                    wdbs.dedup_through(wtxn)?.map(Vec::from)
                };
                let restored = restore_after(dbs, main, wtxn, wdbs, mark.as_deref())?;
                wdbs.set_dedup_through(wtxn, &last)?;
                Ok(restored)
            })?
        };
        if moving {
            // Only once the keys are in the write-back environment: a
            // crash before this commits moves them again.
            dbs.dedup.clear(txn)?;
            dbs.meta.delete(txn, KEY_WRITTEN_THROUGH)?;
        }
        let last = split_entry(&last);
        let dedup = Dedup {
            key: KeyBuf::default(),
            last,
            last_committed: last,
            sweep_keys: Vec::new(),
            sweep_offsets: Vec::new(),
            sweep_last: Vec::new(),
            held: Held {
                keys: HotState::default(),
                frozen: None,
                removals_open: Vec::new(),
                removals: Vec::new(),
                swept_open: None,
                swept: None,
                deletable: None,
                deleting: false,
                due: false,
            },
            table,
            spare: Changes::default(),
            stats,
            failure_log: LogLimiter::new(LOG_INTERVAL),
            retry: RetryPause::new(),
        };
        Ok((dedup, restored))
    }

    /// Starts a transaction; whatever an unfinished one held is dropped.
    /// Hears whether the batch handed over has committed meanwhile.
    pub(crate) fn begin(&mut self) {
        let held = &mut self.held;
        held.keys.begin();
        held.removals_open.clear();
        held.swept_open = None;
        held.deleting = false;
        held.due = false;
        self.last = self.last_committed;
        if let Some(outcome) = self.table.try_outcome() {
            self.heard(outcome);
        }
    }

    /// The open transaction committed; hands the held keys over when a
    /// write-back was asked for in it.
    pub(crate) fn commit(&mut self) {
        let held = &mut self.held;
        held.keys.commit();
        self.last_committed = self.last;
        held.removals.append(&mut held.removals_open);
        if let Some(swept) = held.swept_open.take() {
            held.swept = Some(swept);
        }
        if std::mem::take(&mut held.deleting) {
            held.deletable = None;
        }
        if std::mem::take(&mut held.due) {
            self.hand_over();
        }
    }

    /// Keys a write-back would hand over now: none while a batch that
    /// did not commit waits for its next try. They must not make the
    /// writer's write-backs due meanwhile (holding them is all that can
    /// be done), and nothing needs writing back for them.
    pub(crate) fn keys_to_write_back(&self) -> usize {
        if self.held.frozen.is_some() && self.retry.waiting() {
            0
        } else {
            self.held_keys()
        }
    }

    /// Keys not in the `dedup` table yet and not on their way there.
    pub(crate) fn held_keys(&self) -> usize {
        let waiting = match &self.held.frozen {
            Some(f) if !self.table.in_flight() => f.keys.len(),
            _ => 0,
        };
        self.held.keys.keys() + waiting
    }

    /// Asks for the held keys to be handed to the write-back thread when
    /// the open transaction commits (with what it holds itself).
    pub(crate) fn write_back(&mut self) {
        self.held.due = true;
    }

    /// How full the write-back environment's map is, while it is open.
    pub(crate) fn map_usage(&self) -> Option<MapUsage> {
        self.table.map_usage()
    }

    /// Waits for the batch in flight, then stops the write-back thread
    /// and closes its environment. Keys still held stay for the next
    /// open to put back.
    pub(crate) fn close(&mut self) {
        if let Some(outcome) = self.table.wait_outcome() {
            self.heard(outcome);
        }
        self.table.close();
    }

    /// Hands what committed to the write-back thread: a batch that failed
    /// before goes again first, on its own.
    fn hand_over(&mut self) {
        // One batch at a time: they are written in order.
        if self.table.in_flight() {
            let started = std::time::Instant::now();
            let outcome = self.table.wait_outcome();
            let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            StoreStats::add(&self.stats.writeback_wait_us, waited);
            if let Some(outcome) = outcome {
                self.heard(outcome);
            }
        }
        if self.held.frozen.is_some() && self.retry.waiting() {
            // The batch that did not commit goes again once its pause is
            // over; what was held since stays held behind it.
            return;
        }
        if self.held.frozen.is_none() {
            let keys = self
                .held
                .keys
                .take_committed(std::mem::take(&mut self.spare));
            let removals = std::mem::take(&mut self.held.removals);
            if keys.is_empty() && removals.is_empty() {
                // No entry was appended since the last batch either.
                self.spare = keys;
                return;
            }
            self.held.frozen = Some(Frozen {
                keys: Arc::new(keys),
                removals: Arc::new(removals),
                through: join_entry(self.last_committed),
                swept: self.held.swept.clone(),
            });
        }
        let Some(batch) = self.held.frozen.as_ref().map(Frozen::batch) else {
            return;
        };
        if let Err(e) = self.table.send(batch) {
            self.heard(Err(e));
        }
    }

    fn heard(&mut self, outcome: Outcome) {
        match outcome {
            Ok(written) => {
                self.retry.succeeded();
                StoreStats::add(&self.stats.dedup_batches, 1);
                StoreStats::add(&self.stats.dedup_batch_keys, written as u64);
                let Some(frozen) = self.held.frozen.take() else {
                    return;
                };
                if frozen.swept.is_some() {
                    self.held.deletable = frozen.swept;
                }
                if let Ok(mut keys) = Arc::try_unwrap(frozen.keys) {
                    keys.clear();
                    self.spare = keys;
                }
            }
            Err(e) => {
                StoreStats::add(&self.stats.storage_errors, 1);
                let retry_in = self.retry.failed();
                if let Some(suppressed) = self.failure_log.check() {
                    warn!(
                        error = %e,
                        suppressed,
                        retry_in_ms = retry_in.as_millis() as u64,
                        "dedup keys not written back; they stay in memory and go again \
                         at the first write-back after the pause"
                    );
                }
            }
        }
    }

    /// Records the event's key unless it was seen within `retention_ms`;
    /// returns true for a duplicate. `now_ms` is the arrival time at the
    /// writer, so the retention is measured on our clock, not the
    /// publisher's.
    pub(crate) fn check_and_insert(
        &mut self,
        dbs: &Dbs,
        txn: &mut RwTxn,
        source: &str,
        id: &str,
        now_ms: i64,
        retention_ms: i64,
    ) -> heed::Result<bool> {
        let key = self.key.start(source).rest(id).finish(MAX_DEDUP_KEY);
        // Arrival times never go back: every entry lands after the last.
        let now = clamp_time(now_ms).max(self.last.0);
        // A key past its retention but not swept yet is not a duplicate.
        let within =
            |first_seen: u64| (now as i128) - (first_seen as i128) < i128::from(retention_ms);
        let first_seen = match self.held.keys.lookup(key) {
            Some(value) => value.and_then(decode_time),
            None => match self.held.frozen.as_ref().and_then(|f| f.keys.get(key)) {
                Some(value) => value.as_deref().and_then(decode_time),
                None => self.table.dedup_time(key)?,
            },
        };
        if first_seen.is_some_and(within) {
            return Ok(true);
        }
        let mut entry = next_entry(self.last, now);
        // Taken already only if the store was written by someone else.
        while !append::put_new(dbs.dedup_expiry, txn, &join_entry(entry), key)? {
            entry = next_entry(entry, now);
        }
        self.last = entry;
        self.held.keys.put(key, &entry.0.to_be_bytes());
        Ok(false)
    }

    /// Sweeps at most `budget` expiry entries from before `now_ms -
    /// retention_ms`, with their keys. Returns how many were swept and
    /// whether more expired ones remain.
    pub(crate) fn sweep(
        &mut self,
        dbs: &Dbs,
        txn: &mut RwTxn,
        now_ms: i64,
        retention_ms: i64,
        budget: usize,
    ) -> heed::Result<(usize, bool)> {
        let held = &mut self.held;
        // Entries whose keys' removal has committed go first.
        if let Some(through) = &held.deletable {
            dbs.dedup_expiry.delete_range(
                txn,
                &(Bound::Unbounded, Bound::Included(through.as_slice())),
            )?;
            held.deleting = true;
        }
        let cutoff = clamp_time(now_ms.saturating_sub(retention_ms));
        self.sweep_keys.clear();
        self.sweep_offsets.clear();
        let mut more = false;
        let after = held.swept_open.as_ref().or(held.swept.as_ref());
        let range = match after {
            Some(after) => (Bound::Excluded(after.as_slice()), Bound::Unbounded),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        for entry in dbs.dedup_expiry.range(txn, &range)? {
            let (ekey, value) = entry?;
            let time = expiry_time(ekey);
            if time.is_some_and(|t| t >= cutoff) {
                break;
            }
            if self.sweep_offsets.len() == budget {
                more = true;
                break;
            }
            // Not written by us (no time): dropped with the rest of the
            // range, touching no dedup key.
            let key = match time {
                Some(_) if value.is_empty() => &ekey[8..],
                Some(_) => value,
                None => &[][..],
            };
            // A key LMDB cannot take (a damaged entry) was never written
            // either: its entry goes, and no removal fails its batch.
            let time = time.filter(|_| storable(key));
            let start = self.sweep_keys.len();
            self.sweep_keys.extend_from_slice(key);
            self.sweep_offsets
                .push((start..self.sweep_keys.len(), time));
            self.sweep_last.clear();
            self.sweep_last.extend_from_slice(ekey);
        }
        if self.sweep_offsets.is_empty() {
            return Ok((0, false));
        }
        for (range, time) in &self.sweep_offsets {
            let Some(time) = *time else { continue };
            let key = &self.sweep_keys[range.clone()];
            // Only the key this entry was written for goes; a key seen
            // again after it expired has a later time.
            match held.keys.lookup(key) {
                Some(value) => {
                    if value.and_then(decode_time) == Some(time) {
                        held.keys.delete(key);
                    }
                }
                // In the table, or in a batch on its way there.
                None => held.removals_open.push((key.into(), time)),
            }
        }
        held.swept_open = Some(self.sweep_last.clone());
        Ok((self.sweep_offsets.len(), more))
    }

    /// Whether the open transaction changed anything in the store's
    /// environment through [`Dedup::sweep`] (expiry entries deleted).
    pub(crate) fn sweep_wrote(&self) -> bool {
        self.held.deleting
    }
}

/// Moves every key of the store's own `dedup` table (a store of the
/// version before the write-back environment) to `wdbs`, where it lacks
/// or has an earlier time there.
fn move_keys(dbs: &Dbs, main: &RoTxn, wtxn: &mut RwTxn, wdbs: WriteBackDbs) -> heed::Result<usize> {
    let mut keys = Vec::new();
    for entry in bytes(dbs).iter(main)? {
        let (key, value) = entry?;
        let Some(time) = decode_time(value) else {
            continue;
        };
        if wdbs
            .dedup
            .get(wtxn, key)?
            .and_then(decode_time)
            .is_none_or(|there| there < time)
        {
            keys.push((key, time));
        }
    }
    // In key order already: the table's own.
    let mut puts = SortedPuts::new(wdbs.dedup, wtxn)?;
    for (key, time) in &keys {
        puts.put(key, &time.to_be_bytes())?;
    }
    Ok(keys.len())
}

/// Puts back the key of every expiry entry after `mark` (every entry
/// without one) that `wdbs` lacks (or holds with an earlier time), in
/// key order.
/// Whether LMDB can take `key` (1 to 511 bytes). Every key this module
/// writes is (longer natural keys are hashed); a damaged entry's may not.
fn storable(key: &[u8]) -> bool {
    (1..=511).contains(&key.len())
}

fn restore_after(
    dbs: &Dbs,
    main: &RoTxn,
    wtxn: &mut RwTxn,
    wdbs: WriteBackDbs,
    mark: Option<&[u8]>,
) -> heed::Result<usize> {
    let mut keys: Vec<(Vec<u8>, u64)> = Vec::new();
    let after = match mark {
        // LMDB takes no empty key to search by.
        Some(mark) if !mark.is_empty() => Bound::Excluded(mark),
        _ => Bound::Unbounded,
    };
    for entry in dbs.dedup_expiry.range(main, &(after, Bound::Unbounded))? {
        let (ekey, value) = entry?;
        let Some(time) = expiry_time(ekey) else {
            continue;
        };
        let key = if value.is_empty() { &ekey[8..] } else { value };
        if !storable(key) {
            // Only a damaged entry has one; failing here would keep the
            // store from opening.
            warn!(
                entry = ?ekey,
                key_bytes = key.len(),
                "dedup expiry entry with a key LMDB cannot take; skipped"
            );
            continue;
        }
        keys.push((key.to_vec(), time));
    }
    // A key seen twice keeps its later time: the first of its run.
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keys.dedup_by(|next, kept| next.0 == kept.0);
    let mut missing = Vec::with_capacity(keys.len());
    for (key, time) in &keys {
        if wdbs
            .dedup
            .get(wtxn, key)?
            .and_then(decode_time)
            .is_none_or(|stored| stored < *time)
        {
            missing.push((key, *time));
        }
    }
    let mut puts = SortedPuts::new(wdbs.dedup, wtxn)?;
    for (key, time) in &missing {
        puts.put(key, &time.to_be_bytes())?;
    }
    Ok(missing.len())
}

/// The last expiry entry's key, or all zeros for an empty table.
fn last_expiry(dbs: &Dbs, txn: &RoTxn) -> heed::Result<[u8; 16]> {
    let mut mark = [0u8; 16];
    if let Some((ekey, _)) = dbs.dedup_expiry.last(txn)? {
        // Entries of the earlier layout are longer: their first 16 bytes
        // sort them as well.
        let n = ekey.len().min(16);
        mark[..n].copy_from_slice(&ekey[..n]);
    }
    Ok(mark)
}

/// The entry after `last` for an event arriving at `now` (no earlier
/// than `last`'s time).
fn next_entry(last: (u64, u64), now: u64) -> (u64, u64) {
    match last {
        (time, _) if now > time => (now, 0),
        (time, number) => match number.checked_add(1) {
            Some(number) => (time, number),
            None => (time.saturating_add(1), 0),
        },
    }
}

fn join_entry((time, number): (u64, u64)) -> [u8; 16] {
    let mut entry = [0u8; 16];
    entry[..8].copy_from_slice(&time.to_be_bytes());
    entry[8..].copy_from_slice(&number.to_be_bytes());
    entry
}

fn split_entry(entry: &[u8; 16]) -> (u64, u64) {
    let (time, number) = entry.split_at(8);
    let word = |b: &[u8]| <[u8; 8]>::try_from(b).map_or(0, u64::from_be_bytes);
    (word(time), word(number))
}

/// The store's own `dedup` table with its values as bytes.
fn bytes(dbs: &Dbs) -> Database<Bytes, Bytes> {
    dbs.dedup.remap_types::<Bytes, Bytes>()
}

fn clamp_time(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

fn expiry_time(ekey: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = ekey.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::super::env::{open_env, Dbs, LmdbEnv};
    use super::*;
    use std::path::Path;

    const DAY: i64 = 86_400_000;
    const T: i64 = 1_750_000_000_000;

    impl Dedup {
        /// Waits until the batch handed over (if any) is written.
        fn settle(&mut self) {
            if let Some(outcome) = self.table.wait_outcome() {
                self.heard(outcome);
            }
        }
    }

    fn store() -> (tempfile::TempDir, LmdbEnv, Dbs) {
        let dir = tempfile::tempdir().unwrap();
        let env = open_env(dir.path(), 1 << 24, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let dbs = Dbs::create(&env, &mut txn).unwrap();
        txn.commit().unwrap();
        (dir, env, dbs)
    }

    /// Dedup as the store opens it, with a write-back environment of
    /// `map_size` bytes; and the keys it put back.
    fn open_sized(dir: &Path, env: &LmdbEnv, dbs: &Dbs, map_size: usize) -> (Dedup, usize) {
        let table = WriteBack::open(dir, map_size, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let opened = Dedup::open(dbs, &mut txn, table, Arc::new(StoreStats::default())).unwrap();
        txn.commit().unwrap();
        opened
    }

    fn open(dir: &Path, env: &LmdbEnv, dbs: &Dbs) -> Dedup {
        open_sized(dir, env, dbs, 1 << 24).0
    }

    fn seen(dedup: &mut Dedup, dbs: &Dbs, txn: &mut RwTxn, id: &str, now_ms: i64) -> bool {
        dedup
            .check_and_insert(dbs, txn, "src", id, now_ms, DAY)
            .unwrap()
    }

    /// Keys in the write-back environment's table, expiry entries in the
    /// store's.
    fn counts(dedup: &Dedup, env: &LmdbEnv, dbs: &Dbs) -> (u64, u64) {
        let txn = env.read_txn().unwrap();
        (dedup.table.dedup_len(), dbs.dedup_expiry.len(&txn).unwrap())
    }

    /// `work` in a transaction that commits, for LMDB and for `dedup`.
    fn committed<R>(
        dedup: &mut Dedup,
        env: &LmdbEnv,
        work: impl FnOnce(&mut Dedup, &mut RwTxn) -> R,
    ) -> R {
        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        let result = work(dedup, &mut txn);
        txn.commit().unwrap();
        dedup.commit();
        result
    }

    /// A committed transaction that sees `id` at `now_ms` (and hands the
    /// held keys over when `write_back`); whether `id` was a duplicate.
    fn commit_seen(
        dedup: &mut Dedup,
        (env, dbs): (&LmdbEnv, &Dbs),
        id: &str,
        now_ms: i64,
        write_back: bool,
    ) -> bool {
        committed(dedup, env, |dedup, txn| {
            let duplicate = seen(dedup, dbs, txn, id, now_ms);
            if write_back {
                dedup.write_back();
            }
            duplicate
        })
    }

    /// The dedup keys of the expiry entries, in the entries' order.
    fn entry_keys(env: &LmdbEnv, dbs: &Dbs) -> Vec<Vec<u8>> {
        let txn = env.read_txn().unwrap();
        dbs.dedup_expiry
            .iter(&txn)
            .unwrap()
            .map(|e| e.unwrap().1.to_vec())
            .collect()
    }

    fn dedup_key(id: &str) -> Vec<u8> {
        KeyBuf::default()
            .start("src")
            .rest(id)
            .finish(MAX_DEDUP_KEY)
            .to_vec()
    }

    /// A clock stepped back and a restart still append each entry after
    /// the last one, and a day later every key expires with its entry.
    #[test]
    fn entries_follow_each_other_through_clock_steps_and_restarts() {
        let (dir, env, dbs) = store();
        let mut dedup = open(dir.path(), &env, &dbs);
        committed(&mut dedup, &env, |dedup, txn| {
            for (i, now) in [T, T, T + 5, T - 100, T - 100].into_iter().enumerate() {
                assert!(!seen(dedup, &dbs, txn, &format!("a{i}"), now));
            }
            dedup.write_back();
        });
        dedup.close();

        let mut dedup = open(dir.path(), &env, &dbs);
        committed(&mut dedup, &env, |dedup, txn| {
            for (i, now) in [T, T - 100, T + 5].into_iter().enumerate() {
                assert!(!seen(dedup, &dbs, txn, &format!("b{i}"), now));
            }
            assert!(seen(dedup, &dbs, txn, "a3", T + 6));
            dedup.write_back();
        });
        dedup.settle();
        let appended: Vec<Vec<u8>> = ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
            .into_iter()
            .map(dedup_key)
            .collect();
        assert_eq!(entry_keys(&env, &dbs), appended, "entries in arrival order");
        assert_eq!(counts(&dedup, &env, &dbs), (8, 8));

        // A day later every one of them expires, each with its key; the
        // entries go once the removals are written.
        let later = T + 5 + DAY + 1;
        let (swept, more) = committed(&mut dedup, &env, |dedup, txn| {
            let swept = dedup.sweep(&dbs, txn, later, DAY, 100).unwrap();
            dedup.write_back();
            swept
        });
        assert_eq!((swept, more), (8, false));
        dedup.settle();
        assert_eq!(counts(&dedup, &env, &dbs), (0, 8));
        committed(&mut dedup, &env, |dedup, txn| {
            assert_eq!(dedup.sweep(&dbs, txn, later, DAY, 100).unwrap(), (0, false));
        });
        assert_eq!(counts(&dedup, &env, &dbs), (0, 0));
    }

    /// A store of earlier versions kept its keys in its own environment,
    /// some with expiry entries of the first layout: they move to the
    /// write-back environment once, and expire as before.
    #[test]
    fn keys_of_earlier_versions_move_and_expire_with_their_entries() {
        let (dir, env, dbs) = store();
        let old = dedup_key("old");
        let mut txn = env.write_txn().unwrap();
        // time ‖ dedup key → empty, the first layout.
        dbs.dedup.put(&mut txn, &old, &(T as u64)).unwrap();
        let mut ekey = (T as u64).to_be_bytes().to_vec();
        ekey.extend_from_slice(&old);
        dbs.dedup_expiry.put(&mut txn, &ekey, &[]).unwrap();
        // The mark the version before kept, and a key it held past it.
        dbs.meta
            .put(&mut txn, KEY_WRITTEN_THROUGH, &ekey[..16])
            .unwrap();
        let held = dedup_key("held");
        let mut entry = join_entry(((T + 1) as u64, 0)).to_vec();
        dbs.dedup_expiry.put(&mut txn, &entry, &held).unwrap();
        txn.commit().unwrap();

        let (mut dedup, restored) = open_sized(dir.path(), &env, &dbs, 1 << 24);
        assert_eq!(restored, 1, "the held key is put back");
        assert_eq!(counts(&dedup, &env, &dbs), (2, 2));
        {
            let txn = env.read_txn().unwrap();
            assert!(dbs.dedup.is_empty(&txn).unwrap(), "moved out");
            assert!(dbs.meta.get(&txn, KEY_WRITTEN_THROUGH).unwrap().is_none());
        }
        committed(&mut dedup, &env, |dedup, txn| {
            assert!(!seen(dedup, &dbs, txn, "new", T + 10));
            assert!(seen(dedup, &dbs, txn, "old", T + 20));
            assert!(seen(dedup, &dbs, txn, "held", T + 20));
        });
        dedup.close();
        // Opening again moves and puts back nothing.
        let (mut dedup, restored) = open_sized(dir.path(), &env, &dbs, 1 << 24);
        assert_eq!(
            (restored, counts(&dedup, &env, &dbs)),
            (1, (3, 3)),
            "only `new`, held at the stop"
        );

        // Only the first two have expired.
        let later = T + DAY + 5;
        committed(&mut dedup, &env, |dedup, txn| {
            assert_eq!(dedup.sweep(&dbs, txn, later, DAY, 100).unwrap(), (2, false));
            dedup.write_back();
        });
        dedup.settle();
        committed(&mut dedup, &env, |dedup, txn| {
            dedup.sweep(&dbs, txn, later, DAY, 100).unwrap();
            assert!(!seen(dedup, &dbs, txn, "old", later));
            assert!(!seen(dedup, &dbs, txn, "held", later));
            assert!(seen(dedup, &dbs, txn, "new", later));
        });
        entry = entry_keys(&env, &dbs).concat();
        assert_eq!(
            entry,
            [dedup_key("new"), dedup_key("old"), dedup_key("held")].concat()
        );
    }

    /// Keys are held until a write-back hands them over, duplicates are
    /// found among them meanwhile, and a transaction that rolls back
    /// leaves none of its keys behind.
    #[test]
    fn held_keys_find_duplicates_roll_back_and_are_written_back() {
        let (dir, env, dbs) = store();
        let mut dedup = open(dir.path(), &env, &dbs);

        committed(&mut dedup, &env, |dedup, txn| {
            assert!(!seen(dedup, &dbs, txn, "a", T));
            assert!(seen(dedup, &dbs, txn, "a", T), "within the transaction");
        });
        assert_eq!(
            counts(&dedup, &env, &dbs),
            (0, 1),
            "held, its expiry entry written"
        );

        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        assert!(
            seen(&mut dedup, &dbs, &mut txn, "a", T + 1),
            "across commits"
        );
        assert!(!seen(&mut dedup, &dbs, &mut txn, "b", T + 1));
        drop(txn);
        dedup.begin();
        assert_eq!(dedup.held_keys(), 1, "the rolled-back key is gone");

        committed(&mut dedup, &env, |dedup, txn| {
            assert!(!seen(dedup, &dbs, txn, "b", T + 2), "b was rolled back");
            dedup.write_back();
        });
        dedup.settle();
        assert_eq!(dedup.held_keys(), 0);
        assert_eq!(counts(&dedup, &env, &dbs), (2, 2));
        assert_eq!(
            (dedup.stats.dedup_batches(), dedup.stats.dedup_batch_keys()),
            (1, 2),
            "one batch, counted once it committed"
        );
        committed(&mut dedup, &env, |dedup, txn| {
            assert!(seen(dedup, &dbs, txn, "a", T + 3), "found in the table now");
            assert!(seen(dedup, &dbs, txn, "b", T + 3));
        });
    }

    /// While a batch is on its way, and after, its keys are duplicates;
    /// keys held meanwhile go with the next batch.
    #[test]
    fn keys_on_their_way_to_the_table_are_duplicates_all_along() {
        let (dir, env, dbs) = store();
        let mut dedup = open(dir.path(), &env, &dbs);
        let ids: Vec<String> = (0..5_000).map(|i| format!("id-{i}")).collect();
        committed(&mut dedup, &env, |dedup, txn| {
            for id in &ids {
                assert!(!seen(dedup, &dbs, txn, id, T));
            }
            dedup.write_back();
        });
        // Right after the hand-over: in flight or written, found either way.
        committed(&mut dedup, &env, |dedup, txn| {
            for id in &ids {
                assert!(seen(dedup, &dbs, txn, id, T + 1), "{id}");
            }
            assert!(!seen(dedup, &dbs, txn, "late", T + 1));
            dedup.write_back();
        });
        dedup.settle();
        assert_eq!(dedup.held_keys(), 0);
        assert_eq!(counts(&dedup, &env, &dbs), (5_001, 5_001));
        committed(&mut dedup, &env, |dedup, txn| {
            for id in ids.iter().chain([&"late".to_string()]) {
                assert!(seen(dedup, &dbs, txn, id, T + 2), "{id}");
            }
        });
    }

    /// Held keys whose commits landed but which were never written back
    /// (a crash) are put back when the store opens again, from their
    /// expiry entries, a clock stepped back included; a key seen again
    /// later keeps its later time.
    #[test]
    fn keys_held_at_a_crash_are_put_back_at_open() {
        let (dir, env, dbs) = store();
        let mut dedup = open(dir.path(), &env, &dbs);
        let store = (&env, &dbs);
        assert!(!commit_seen(&mut dedup, store, "early", T, true));
        dedup.settle();
        for (id, now) in [("x", T + 10), ("y", T + 11), ("back", T - 1_000)] {
            assert!(!commit_seen(&mut dedup, store, id, now, false));
        }
        // Past its retention, "early" is seen again and held anew.
        assert!(!commit_seen(&mut dedup, store, "early", T + DAY + 1, false));
        assert_eq!(counts(&dedup, &env, &dbs), (1, 5));
        dedup.close();

        let (mut dedup, restored) = open_sized(dir.path(), &env, &dbs, 1 << 24);
        assert_eq!(restored, 4);
        assert_eq!(counts(&dedup, &env, &dbs), (4, 5));
        committed(&mut dedup, &env, |dedup, txn| {
            for id in ["x", "y", "back"] {
                assert!(seen(dedup, &dbs, txn, id, T + 20), "{id}");
            }
            assert!(
                seen(dedup, &dbs, txn, "early", T + DAY + 2),
                "its later time was put back, not the first"
            );
        });
        dedup.close();
        // Nothing is put back twice.
        assert_eq!(open_sized(dir.path(), &env, &dbs, 1 << 24).1, 0);
    }

    /// An expired key still held is swept from memory, so the write-back
    /// does not write a key whose expiry entry is going.
    #[test]
    fn a_held_key_that_expires_is_swept_before_it_is_written() {
        let (dir, env, dbs) = store();
        let mut dedup = open(dir.path(), &env, &dbs);
        assert!(!commit_seen(&mut dedup, (&env, &dbs), "a", T, false));
        committed(&mut dedup, &env, |dedup, txn| {
            assert_eq!(
                dedup.sweep(&dbs, txn, T + DAY + 1, DAY, 10).unwrap(),
                (1, false)
            );
            dedup.write_back();
        });
        dedup.settle();
        assert_eq!(counts(&dedup, &env, &dbs), (0, 1));
        committed(&mut dedup, &env, |dedup, txn| {
            dedup.sweep(&dbs, txn, T + DAY + 1, DAY, 10).unwrap();
        });
        assert_eq!(counts(&dedup, &env, &dbs), (0, 0));
    }

    /// A damaged expiry entry whose key LMDB cannot take (here: a time and
    /// nothing else) neither keeps the store from opening nor fails the
    /// batch that would remove it: the next sweep drops it, and the keys
    /// around it are put back and expire as usual.
    #[test]
    fn a_damaged_expiry_entry_is_skipped_not_fatal() {
        let (dir, env, dbs) = store();
        let mut dedup = open(dir.path(), &env, &dbs);
        assert!(!commit_seen(&mut dedup, (&env, &dbs), "before", T, false));
        drop(dedup);
        let mut txn = env.write_txn().unwrap();
        dbs.dedup_expiry
            .put(&mut txn, &(T as u64 + 1).to_be_bytes(), &[])
            .unwrap();
        txn.commit().unwrap();

        let dir2 = tempfile::tempdir().unwrap();
        let (mut dedup, restored) = open_sized(dir2.path(), &env, &dbs, 1 << 24);
        assert_eq!(restored, 1, "the good key is put back");
        assert!(commit_seen(
            &mut dedup,
            (&env, &dbs),
            "before",
            T + 2,
            false
        ));
        committed(&mut dedup, &env, |dedup, txn| {
            dedup.sweep(&dbs, txn, T + DAY + 10, DAY, 10).unwrap();
            dedup.write_back();
        });
        dedup.settle();
        committed(&mut dedup, &env, |dedup, txn| {
            dedup.sweep(&dbs, txn, T + DAY + 10, DAY, 10).unwrap();
        });
        assert_eq!(counts(&dedup, &env, &dbs), (0, 0), "all swept");
        assert_eq!(
            dedup
                .stats
                .storage_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    /// A batch the write-back environment cannot take (its map is full)
    /// is counted, its keys stay duplicates, and it goes again at the
    /// first write-back after a pause. Meanwhile its keys make no
    /// write-back due, and write-backs do not try it again.
    #[test]
    fn a_batch_that_does_not_commit_stays_held() {
        let (dir, env, dbs) = store();
        let (mut dedup, _) = open_sized(dir.path(), &env, &dbs, 64 * 1024);
        let ids: Vec<String> = (0..4_000)
            .map(|i| format!("a-rather-long-event-id-{i}"))
            .collect();
        let failures = |dedup: &Dedup| {
            dedup
                .stats
                .storage_errors
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        for (round, now) in [T, T + 1, T + 2].into_iter().enumerate() {
            if round == 2 {
                dedup.retry.end();
            }
            committed(&mut dedup, &env, |dedup, txn| {
                for id in &ids {
                    assert_eq!(seen(dedup, &dbs, txn, id, now), round > 0, "{id}");
                }
                dedup.write_back();
            });
            dedup.settle();
            let tries = [1, 1, 2][round];
            assert_eq!(failures(&dedup), tries, "round {round}");
            assert_eq!(dedup.held_keys(), ids.len(), "still waiting");
            assert_eq!(dedup.keys_to_write_back(), 0, "paused");
            assert_eq!(counts(&dedup, &env, &dbs).0, 0);
        }
        // Once the pause is over, the keys make a write-back due again.
        dedup.retry.end();
        assert_eq!(dedup.keys_to_write_back(), ids.len());
    }
}
