//! Duplicate detection by (`source`, `id`) within a retention period.
//!
//! Publishers retry (MQTT redelivery, HTTP clients after a timeout), so the
//! same event may arrive several times; only its first arrival may count.
//! `dedup` maps the key to its first-seen time; `dedup_expiry` orders the
//! same keys by that time so old ones can be swept a bounded number at a
//! time, inside the writer's normal commits.
//!
//! Every event writes an expiry entry, keyed by arrival time and a running
//! number and holding the dedup key as its value: keyed so, entries come
//! in key order and are appended without searching the tree. A clock
//! step back or a number reused after a restart only costs the search
//! again. Earlier versions keyed an entry by arrival time and dedup key,
//! with an empty value, which put a commit's events (they share one
//! arrival time) in random order; the sweep reads both layouts.
//!
//! The dedup keys themselves come in no order (publishers' ids are
//! mostly random, UUIDs), so each one written to LMDB dirties a leaf page
//! anywhere in the table, and a commit of a few thousand events copied
//! and synced a few thousand of them. So they are held in memory
//! instead, like the rules' state in `journal` mode, and written back in
//! key order: with each checkpoint in `journal` mode, in `direct` mode
//! by the writer on the same interval and bound (in the commit that
//! comes due). What makes a held key durable is its expiry
//! entry, which each commit still appends: the `meta` table records the
//! expiry entry up to which every key is in `dedup`, and opening the
//! store puts the keys of the entries after it back (see [`Dedup::open`]).
//! An entry that does not land after that mark (the clock stepped back
//! past it) has its key written at once, as in `direct` mode.

use std::ops::Bound;

use heed::types::Bytes;
use heed::{Database, RwTxn};

use super::append;
use super::env::Dbs;
use super::hot::HotState;
use super::keys::KeyBuf;
use super::sorted::SortedPuts;

/// The `meta` key of the expiry entry up to which every dedup key is in
/// the `dedup` table (16 bytes); absent in stores of earlier versions,
/// which held none.
const KEY_WRITTEN_THROUGH: &str = "dedup_written_through";

/// Natural dedup keys above this are hashed, so that `time ‖ key` in the
/// expiry index stays below LMDB's 511-byte key limit.
const MAX_DEDUP_KEY: usize = 256;

/// Duplicate detection: the keys held since the last write-back, and
/// reused buffers.
pub(crate) struct Dedup {
    key: KeyBuf,
    /// The number of the last expiry entry written; restarts at zero.
    number: u64,
    sweep_keys: Vec<u8>,
    /// Per expired entry: where its dedup key is in `sweep_keys`, and
    /// its arrival time (`None` for an entry not written by us).
    sweep_offsets: Vec<(std::ops::Range<usize>, Option<u64>)>,
    /// The last expired entry's own key.
    sweep_last: Vec<u8>,
    /// The keys not yet in the `dedup` table.
    held: Held,
}

/// Dedup keys held in memory between checkpoints.
struct Held {
    /// Dedup key → first-seen time (8 bytes, big-endian, as in `dedup`).
    keys: HotState,
    /// Every expiry entry up to this one has its key in `dedup`.
    through: [u8; 16],
    /// The mark a write-back in the open transaction moved it to.
    through_open: Option<[u8; 16]>,
}

impl Dedup {
    /// Opens dedup at the store's open, in its transaction: puts back the
    /// keys a run held when it stopped uncleanly (every expiry entry after
    /// the recorded mark), then holds keys from now on. Returns the keys
    /// put back.
    pub(crate) fn open(dbs: &Dbs, txn: &mut RwTxn) -> heed::Result<(Dedup, usize)> {
        let restored = match dbs.meta.get(txn, KEY_WRITTEN_THROUGH)? {
            Some(mark) => {
                let mark = mark.to_vec();
                restore_after(dbs, txn, &mark)?
            }
            None => 0,
        };
        let through = last_expiry(dbs, txn)?;
        dbs.meta.put(txn, KEY_WRITTEN_THROUGH, &through)?;
        let dedup = Dedup {
            key: KeyBuf::default(),
            number: 0,
            sweep_keys: Vec::new(),
            sweep_offsets: Vec::new(),
            sweep_last: Vec::new(),
            held: Held {
                keys: HotState::default(),
                through,
                through_open: None,
            },
        };
        Ok((dedup, restored))
    }

    /// Starts a transaction; whatever an unfinished one held is dropped.
    pub(crate) fn begin(&mut self) {
        self.held.keys.begin();
        self.held.through_open = None;
    }

    /// The open transaction committed.
    pub(crate) fn commit(&mut self) {
        let held = &mut self.held;
        held.keys.commit();
        if let Some(through) = held.through_open.take() {
            held.through = through;
        }
    }

    /// Keys held, not yet in the `dedup` table.
    pub(crate) fn held_keys(&self) -> usize {
        self.held.keys.keys()
    }

    /// Writes the held keys back, in key order, in the open transaction,
    /// and moves the mark past every expiry entry.
    pub(crate) fn write_back(&mut self, dbs: &Dbs, txn: &mut RwTxn) -> heed::Result<usize> {
        let held = &mut self.held;
        let through = last_expiry(dbs, txn)?;
        let written = held.keys.write_back(txn, bytes(dbs))?;
        dbs.meta.put(txn, KEY_WRITTEN_THROUGH, &through)?;
        held.through_open = Some(through);
        Ok(written)
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
        let now = clamp_time(now_ms);
        // A key past its retention but not swept yet is not a duplicate.
        let within =
            |first_seen: u64| (now as i128) - (first_seen as i128) < i128::from(retention_ms);
        let first_seen = match self.held.keys.lookup(key) {
            Some(value) => value.and_then(decode_time),
            None => dbs.dedup.get(txn, key)?,
        };
        if first_seen.is_some_and(within) {
            return Ok(true);
        }
        // A number already used at this time (a clock step back, a
        // restart) takes the next one.
        let expiry = loop {
            self.number = self.number.wrapping_add(1);
            let mut expiry = [0u8; 16];
            expiry[..8].copy_from_slice(&now.to_be_bytes());
            expiry[8..].copy_from_slice(&self.number.to_be_bytes());
            if append::put_new(dbs.dedup_expiry, txn, &expiry, key)? {
                break expiry;
            }
        };
        // Opening the store puts back only the keys of entries after the
        // mark.
        if expiry > self.held.through {
            self.held.keys.put(key, &now.to_be_bytes());
        } else {
            dbs.dedup.put(txn, key, &now)?;
        }
        Ok(false)
    }

    /// Removes at most `budget` keys first seen before `now_ms -
    /// retention_ms`. Returns how many were removed and whether more
    /// expired keys remain.
    pub(crate) fn sweep(
        &mut self,
        dbs: &Dbs,
        txn: &mut RwTxn,
        now_ms: i64,
        retention_ms: i64,
        budget: usize,
    ) -> heed::Result<(usize, bool)> {
        let cutoff = clamp_time(now_ms.saturating_sub(retention_ms));
        self.sweep_keys.clear();
        self.sweep_offsets.clear();
        let mut more = false;
        for entry in dbs.dedup_expiry.iter(txn)? {
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
            // Only remove the dedup entry if it is the one this expiry entry
            // was written for; a key re-seen after expiry has a newer time.
            if let Some(value) = self.held.keys.lookup(key) {
                if value.and_then(decode_time) == Some(time) {
                    self.held.keys.delete(key);
                }
                continue;
            }
            if dbs.dedup.get(txn, key)? == Some(time) {
                dbs.dedup.delete(txn, key)?;
            }
        }
        let removed = self.sweep_offsets.len();
        dbs.dedup_expiry.delete_range(
            txn,
            &(
                Bound::Unbounded,
                Bound::Included(self.sweep_last.as_slice()),
            ),
        )?;
        Ok((removed, more))
    }
}

/// Puts back the key of every expiry entry after `mark` that `dedup`
/// lacks (or holds with an earlier time), in key order.
fn restore_after(dbs: &Dbs, txn: &mut RwTxn, mark: &[u8]) -> heed::Result<usize> {
    let mut keys: Vec<(Vec<u8>, u64)> = Vec::new();
    for entry in dbs
        .dedup_expiry
        .range(txn, &(Bound::Excluded(mark), Bound::Unbounded))?
    {
        let (ekey, value) = entry?;
        let Some(time) = expiry_time(ekey) else {
            continue;
        };
        let key = if value.is_empty() { &ekey[8..] } else { value };
        keys.push((key.to_vec(), time));
    }
    // A key seen twice keeps its later time: the first of its run.
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keys.dedup_by(|next, kept| next.0 == kept.0);
    let mut missing = Vec::with_capacity(keys.len());
    for (key, time) in &keys {
        if dbs.dedup.get(txn, key)?.is_none_or(|stored| stored < *time) {
            missing.push((key, *time));
        }
    }
    let mut puts = SortedPuts::new(bytes(dbs), txn)?;
    for (key, time) in &missing {
        puts.put(key, &time.to_be_bytes())?;
    }
    Ok(missing.len())
}

/// The last expiry entry's key, or all zeros for an empty table.
fn last_expiry(dbs: &Dbs, txn: &RwTxn) -> heed::Result<[u8; 16]> {
    let mut mark = [0u8; 16];
    if let Some((ekey, _)) = dbs.dedup_expiry.last(txn)? {
        // Entries of the earlier layout are longer: their first 16 bytes
        // sort them as well.
        let n = ekey.len().min(16);
        mark[..n].copy_from_slice(&ekey[..n]);
    }
    Ok(mark)
}

/// The `dedup` table with its values as bytes, as the held keys keep them.
fn bytes(dbs: &Dbs) -> Database<Bytes, Bytes> {
    dbs.dedup.remap_types::<Bytes, Bytes>()
}

fn decode_time(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
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

    const DAY: i64 = 86_400_000;

    fn store() -> (tempfile::TempDir, LmdbEnv, Dbs) {
        let dir = tempfile::tempdir().unwrap();
        let env = open_env(dir.path(), 1 << 24, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let dbs = Dbs::create(&env, &mut txn).unwrap();
        txn.commit().unwrap();
        (dir, env, dbs)
    }

    fn seen(dedup: &mut Dedup, dbs: &Dbs, txn: &mut RwTxn, id: &str, now_ms: i64) -> bool {
        dedup
            .check_and_insert(dbs, txn, "src", id, now_ms, DAY)
            .unwrap()
    }

    fn counts(env: &LmdbEnv, dbs: &Dbs) -> (u64, u64) {
        let txn = env.read_txn().unwrap();
        (
            dbs.dedup.len(&txn).unwrap(),
            dbs.dedup_expiry.len(&txn).unwrap(),
        )
    }

    #[test]
    fn every_key_gets_its_own_expiry_entry_when_the_clock_steps_back_or_numbers_restart() {
        let (_dir, env, dbs) = store();
        let t = 1_750_000_000_000;
        let mut dedup = held(&env, &dbs);
        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        // Appended in order, then a clock step back, then a "restart"
        // (numbers from zero again) at times already used.
        for (i, now) in [t, t, t + 5, t - 100, t - 100].into_iter().enumerate() {
            assert!(!seen(&mut dedup, &dbs, &mut txn, &format!("a{i}"), now));
        }
        dedup.write_back(&dbs, &mut txn).unwrap();
        let (mut restarted, _) = Dedup::open(&dbs, &mut txn).unwrap();
        for (i, now) in [t, t - 100, t + 5].into_iter().enumerate() {
            assert!(!seen(&mut restarted, &dbs, &mut txn, &format!("b{i}"), now));
        }
        assert!(seen(&mut restarted, &dbs, &mut txn, "a3", t + 6));
        restarted.write_back(&dbs, &mut txn).unwrap();
        txn.commit().unwrap();
        dedup.commit();
        restarted.commit();
        assert_eq!(counts(&env, &dbs), (8, 8));

        // A day later every one of them expires, each with its dedup key.
        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        let (removed, more) = dedup
            .sweep(&dbs, &mut txn, t + 5 + DAY + 1, DAY, 100)
            .unwrap();
        txn.commit().unwrap();
        dedup.commit();
        assert_eq!((removed, more), (8, false));
        assert_eq!(counts(&env, &dbs), (0, 0));
    }

    #[test]
    fn expiry_entries_in_the_earlier_layout_are_swept_with_their_keys() {
        let (_dir, env, dbs) = store();
        let t: i64 = 1_750_000_000_000;
        let mut dedup = held(&env, &dbs);
        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        // Written by an earlier version: time ‖ dedup key → empty.
        let mut kb = KeyBuf::default();
        let old = kb.start("src").rest("old").finish(MAX_DEDUP_KEY).to_vec();
        dbs.dedup.put(&mut txn, &old, &(t as u64)).unwrap();
        let mut ekey = (t as u64).to_be_bytes().to_vec();
        ekey.extend_from_slice(&old);
        dbs.dedup_expiry.put(&mut txn, &ekey, &[]).unwrap();
        // And one in today's layout, a little later.
        assert!(!seen(&mut dedup, &dbs, &mut txn, "new", t + 10));
        assert!(seen(&mut dedup, &dbs, &mut txn, "old", t + 20));
        txn.commit().unwrap();
        dedup.commit();

        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        // Only the earlier one has expired.
        let (removed, _) = dedup.sweep(&dbs, &mut txn, t + DAY + 5, DAY, 100).unwrap();
        assert_eq!(removed, 1);
        assert!(!seen(&mut dedup, &dbs, &mut txn, "old", t + DAY + 5));
        assert!(seen(&mut dedup, &dbs, &mut txn, "new", t + DAY + 5));
        txn.commit().unwrap();
    }

    fn held(env: &LmdbEnv, dbs: &Dbs) -> Dedup {
        let mut txn = env.write_txn().unwrap();
        let (dedup, _) = Dedup::open(dbs, &mut txn).unwrap();
        txn.commit().unwrap();
        dedup
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

    /// A committed transaction that sees `id` at `now_ms` (and writes the
    /// held keys back when `write_back`); whether `id` was a duplicate.
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
                dedup.write_back(dbs, txn).unwrap();
            }
            duplicate
        })
    }

    /// Keys are held until a write-back writes them to LMDB,
    /// duplicates are found among them meanwhile, and a transaction that
    /// rolls back leaves none of its keys behind.
    #[test]
    fn held_keys_find_duplicates_roll_back_and_are_written_back() {
        let (_dir, env, dbs) = store();
        let t = 1_750_000_000_000;
        let mut dedup = held(&env, &dbs);

        committed(&mut dedup, &env, |dedup, txn| {
            assert!(!seen(dedup, &dbs, txn, "a", t));
            assert!(seen(dedup, &dbs, txn, "a", t), "within the transaction");
        });
        assert_eq!(counts(&env, &dbs), (0, 1), "held, its expiry entry written");

        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        assert!(
            seen(&mut dedup, &dbs, &mut txn, "a", t + 1),
            "across commits"
        );
        assert!(!seen(&mut dedup, &dbs, &mut txn, "b", t + 1));
        drop(txn);
        dedup.begin();
        assert_eq!(dedup.held_keys(), 1, "the rolled-back key is gone");

        committed(&mut dedup, &env, |dedup, txn| {
            assert!(!seen(dedup, &dbs, txn, "b", t + 2), "b was rolled back");
            assert_eq!(dedup.write_back(&dbs, txn).unwrap(), 2);
        });
        assert_eq!(dedup.held_keys(), 0);
        assert_eq!(counts(&env, &dbs), (2, 2));
        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        assert!(
            seen(&mut dedup, &dbs, &mut txn, "a", t + 3),
            "found in LMDB now"
        );
        assert!(seen(&mut dedup, &dbs, &mut txn, "b", t + 3));
    }

    /// Held keys whose commits landed but whose checkpoint never came (a
    /// crash) are put back when the store opens again, from their expiry
    /// entries; a key seen again later keeps its later time.
    #[test]
    fn keys_held_at_a_crash_are_put_back_at_open() {
        let (_dir, env, dbs) = store();
        let t = 1_750_000_000_000;
        let mut dedup = held(&env, &dbs);
        let store = (&env, &dbs);
        assert!(!commit_seen(&mut dedup, store, "early", t, true));
        for (i, id) in ["x", "y", "z"].into_iter().enumerate() {
            assert!(!commit_seen(
                &mut dedup,
                store,
                id,
                t + 10 + i as i64,
                false
            ));
        }
        // Past its retention, "early" is seen again and held anew.
        assert!(!commit_seen(&mut dedup, store, "early", t + DAY + 1, false));
        assert_eq!(counts(&env, &dbs), (1, 5));
        drop(dedup);

        let mut txn = env.write_txn().unwrap();
        let (mut dedup, restored) = Dedup::open(&dbs, &mut txn).unwrap();
        txn.commit().unwrap();
        assert_eq!(restored, 4);
        assert_eq!(counts(&env, &dbs), (4, 5));
        let mut txn = env.write_txn().unwrap();
        dedup.begin();
        for id in ["x", "y", "z"] {
            assert!(seen(&mut dedup, &dbs, &mut txn, id, t + 20), "{id}");
        }
        assert!(
            seen(&mut dedup, &dbs, &mut txn, "early", t + DAY + 2),
            "its later time was put back, not the first"
        );
        drop(txn);
        // Nothing is put back twice.
        let mut txn = env.write_txn().unwrap();
        assert_eq!(Dedup::open(&dbs, &mut txn).unwrap().1, 0);
    }

    /// A key whose expiry entry does not land after the mark (the clock
    /// stepped back past the last checkpoint) would not be put back
    /// after a crash, so it is written at once.
    #[test]
    fn a_clock_step_back_past_the_mark_writes_the_key_at_once() {
        let (_dir, env, dbs) = store();
        let t = 1_750_000_000_000;
        let mut dedup = held(&env, &dbs);
        assert!(!commit_seen(&mut dedup, (&env, &dbs), "a", t, true));

        committed(&mut dedup, &env, |dedup, txn| {
            assert!(!seen(dedup, &dbs, txn, "back", t - 1_000));
            assert!(!seen(dedup, &dbs, txn, "ahead", t + 1_000));
        });
        assert_eq!(dedup.held_keys(), 1, "only the key after the mark is held");
        assert_eq!(counts(&env, &dbs), (2, 3));
    }

    /// An expired key still held is swept from memory, so the checkpoint
    /// does not write a key whose expiry entry is gone.
    #[test]
    fn a_held_key_that_expires_is_swept_before_it_is_written() {
        let (_dir, env, dbs) = store();
        let t = 1_750_000_000_000;
        let mut dedup = held(&env, &dbs);
        assert!(!commit_seen(&mut dedup, (&env, &dbs), "a", t, false));
        committed(&mut dedup, &env, |dedup, txn| {
            let (removed, _) = dedup.sweep(&dbs, txn, t + DAY + 1, DAY, 10).unwrap();
            assert_eq!(removed, 1);
            dedup.write_back(&dbs, txn).unwrap();
        });
        assert_eq!(counts(&env, &dbs), (0, 0));
    }
}
