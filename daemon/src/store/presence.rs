//! Where each fan was last seen: the index a venue-wide moment (a
//! fan-out) scans to find who is at the venue.
//!
//! Every tracked event with a subject touches it, so it is written for
//! nearly every new fan. Written straight to LMDB, those writes land on
//! leaf pages spread over the whole table (fans arrive in no key order):
//! a commit of a few thousand events dirtied, copied and synced most of
//! the table's pages, and that was the largest single cost of the
//! pipeline in `journal` mode.
//!
//! So in `journal` mode presence is held like the engine's state: noted
//! in memory, written back in key order with each checkpoint (in the
//! checkpoint's transaction, which also empties the journal), and rebuilt
//! from the journal by the replay after an unclean stop (every journaled
//! event is a tracked one, and each touched presence). A fan-out writes
//! what is held back before it scans, in the fan-out's transaction, so it
//! sees every fan as before. In `direct` mode nothing is held: each touch that
//! matters writes at once, as the rest of that mode's state does.

use std::ops::Bound;

use heed::types::Bytes;
use heed::{Database, RwTxn};
use rustc_hash::FxHashMap;

use super::committed::Committed;
use super::keys::{split_first, KeyBuf};
use super::sorted::SortedPuts;

/// Presence is rewritten only when older than this, so a fan costs one
/// write per ten minutes, not one per event. A fan's stored presence is
/// then at most this much older than their last event: next to the
/// 6-hour window a fan-out looks back over, they may leave it up to 3 %
/// early.
const REFRESH_MS: i64 = 600_000;

/// Customers remembered as committed (about 100 bytes each).
const CACHE_MAX: usize = 1_000_000;

/// LMDB's key limit.
const MAX_KEY: usize = 511;

/// The presence table and what the writer knows of it.
pub(crate) struct Presence {
    /// customer → last seen (ms, 8 bytes BE).
    db: Database<Bytes, Bytes>,
    mode: Mode,
    key: KeyBuf,
}

enum Mode {
    /// `direct`: each write goes to LMDB at once; the times remembered as
    /// committed save the reads that decide a refresh.
    Direct(Committed<i64>),
    /// `journal`: held until written back.
    Held(Held),
}

/// Presence as the writer holds it in `journal` mode, in two layers like
/// its other in-memory state: a transaction that does not commit leaves
/// no trace.
#[derive(Default)]
struct Held {
    /// Fans seen this run, as committed.
    known: FxHashMap<String, Mark>,
    /// The open transaction's changes.
    open: FxHashMap<String, Mark>,
    /// Fans of `known` the open transaction wrote back, with the time
    /// LMDB holds for them now: unwritten again if it does not commit,
    /// settled at that time if it does.
    written: Vec<(String, i64)>,
}

/// What is known of a fan's presence.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// When last seen; `None` once erased.
    seen: Option<i64>,
    /// Whether LMDB still lacks it.
    unwritten: bool,
    /// Whether LMDB is known to hold no later time than `seen` (this run
    /// wrote it, or read it back). A write-back then need not read what
    /// LMDB holds: only this stage writes presence, and `seen` only grows.
    settled: bool,
}

impl Held {
    /// The fan's mark, unless they are unknown or erased.
    fn get(&self, customer: &str) -> Option<&Mark> {
        self.open
            .get(customer)
            .or_else(|| self.known.get(customer))
            .filter(|m| m.seen.is_some())
    }

    fn set(&mut self, customer: &str, mark: Mark) {
        match self.open.get_mut(customer) {
            Some(m) => *m = mark,
            None => {
                self.open.insert(customer.to_owned(), mark);
            }
        }
    }

    /// Writes every unwritten time to `db` in key order; returns the
    /// fans whose stored presence changed.
    fn write_back(
        &mut self,
        txn: &mut RwTxn,
        db: Database<Bytes, Bytes>,
        key: &mut KeyBuf,
    ) -> heed::Result<usize> {
        let mut changes = Vec::new();
        for (customer, mark) in &self.known {
            if !mark.unwritten || self.open.contains_key(customer) {
                continue;
            }
            if let Some(time) = mark.seen {
                changes.push(Change::new(key, customer, time, mark.settled, false));
            }
        }
        for (customer, mark) in &mut self.open {
            if let (true, Some(time)) = (mark.unwritten, mark.seen) {
                changes.push(Change::new(key, customer, time, mark.settled, true));
            }
            mark.unwritten = false;
        }
        let stored = put_all_later(db, txn, &mut changes)?;
        for change in changes {
            if change.open {
                // The open layer goes with the transaction if it does not
                // commit, so it may know what LMDB holds at once.
                if let Some(mark) = self.open.get_mut(&change.customer) {
                    mark.seen = Some(change.time);
                    mark.settled = true;
                }
            } else {
                if let Some(mark) = self.known.get_mut(&change.customer) {
                    mark.unwritten = false;
                }
                self.written.push((change.customer, change.time));
            }
        }
        Ok(stored)
    }

    fn rollback(&mut self) {
        self.open.clear();
        for (customer, _) in self.written.drain(..) {
            if let Some(mark) = self.known.get_mut(&customer) {
                mark.unwritten = true;
            }
        }
    }

    fn committed(&mut self) {
        for (customer, time) in self.written.drain(..) {
            if let Some(mark) = self.known.get_mut(&customer) {
                mark.seen = Some(time);
                mark.settled = true;
            }
        }
        for (customer, mark) in self.open.drain() {
            match mark.seen {
                Some(_) => {
                    self.known.insert(customer, mark);
                }
                None => {
                    self.known.remove(&customer);
                }
            }
        }
        // Forgetting a written fan is safe: the write-back keeps the later
        // of a new time and the stored one.
        if self.known.len() > CACHE_MAX {
            self.known.retain(|_, m| m.unwritten);
        }
    }

    fn pending(&self) -> bool {
        !self.open.is_empty() || self.known.values().any(|m| m.unwritten)
    }
}

impl Presence {
    /// The table, held in memory between checkpoints when `hold` (the
    /// store's `journal` mode).
    pub(crate) fn new(db: Database<Bytes, Bytes>, hold: bool) -> Presence {
        Presence {
            db,
            mode: match hold {
                true => Mode::Held(Held::default()),
                false => Mode::Direct(Committed::new(CACHE_MAX)),
            },
            key: KeyBuf::default(),
        }
    }

    /// `customer` was seen at `at_ms` (event time).
    pub(crate) fn touch(
        &mut self,
        txn: &mut RwTxn,
        customer: &str,
        at_ms: i64,
    ) -> heed::Result<()> {
        match &mut self.mode {
            Mode::Held(held) => {
                let last = held.get(customer).copied();
                let last_seen = last.and_then(|m| m.seen);
                if last_seen.is_some_and(|t| at_ms - t < REFRESH_MS) {
                    return Ok(());
                }
                // What LMDB holds is not read here: the write-back keeps
                // the later of the two.
                let seen = Some(last_seen.map_or(at_ms, |t| t.max(at_ms)));
                held.set(
                    customer,
                    Mark {
                        seen,
                        unwritten: true,
                        settled: last.is_some_and(|m| m.settled),
                    },
                );
            }
            Mode::Direct(committed) => {
                // A remembered time is the stored one: only this stage
                // writes presence, and erasure forgets it.
                let known = committed.get(customer).copied();
                if known.is_some_and(|t| at_ms - t < REFRESH_MS) {
                    return Ok(());
                }
                let key = self.key.start(customer).finish(MAX_KEY);
                let last = match known {
                    Some(t) => Some(t),
                    None => self.db.get(txn, key)?.and_then(decode),
                };
                let stored = match last {
                    Some(t) if at_ms - t < REFRESH_MS => t,
                    _ => {
                        let t = last.map_or(at_ms, |t| t.max(at_ms));
                        self.db.put(txn, key, &t.to_be_bytes())?;
                        t
                    }
                };
                committed.note(customer, stored);
            }
        }
        Ok(())
    }

    /// Deletes `customer`'s presence.
    pub(crate) fn erase(&mut self, txn: &mut RwTxn, customer: &str) -> heed::Result<()> {
        let key = self.key.start(customer).finish(MAX_KEY);
        self.db.delete(txn, key)?;
        match &mut self.mode {
            Mode::Held(held) => held.set(
                customer,
                Mark {
                    seen: None,
                    unwritten: false,
                    settled: false,
                },
            ),
            Mode::Direct(committed) => committed.forget(customer),
        }
        Ok(())
    }

    /// Writes back what is held, in key order, in the open transaction.
    /// Returns the fans whose stored presence changed.
    pub(crate) fn write_back(&mut self, txn: &mut RwTxn) -> heed::Result<usize> {
        match &mut self.mode {
            Mode::Held(held) => held.write_back(txn, self.db, &mut self.key),
            Mode::Direct(_) => Ok(0),
        }
    }

    /// Up to `limit` customers seen within `window_ms` before `at_ms` (or
    /// after it), in key order after `after`, and the key of the last one
    /// when the limit cut the scan short. Writes back what is held first,
    /// so the scan sees every fan.
    pub(crate) fn present(
        &mut self,
        txn: &mut RwTxn,
        at_ms: i64,
        window_ms: i64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> heed::Result<(Vec<String>, Option<Vec<u8>>)> {
        self.write_back(txn)?;
        let from = at_ms.saturating_sub(window_ms);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        for entry in self.db.range(txn, &(start, Bound::Unbounded))? {
            let (k, v) = entry?;
            // Seen after the moment (a late trigger) counts as present too.
            if decode(v).unwrap_or(0) < from {
                continue;
            }
            if let Some(c) = customer_of(k) {
                out.push(c);
                if out.len() >= limit {
                    return Ok((out, Some(k.to_vec())));
                }
            }
        }
        Ok((out, None))
    }

    /// The open transaction did not commit (or a new one starts).
    pub(crate) fn rollback(&mut self) {
        match &mut self.mode {
            Mode::Held(held) => held.rollback(),
            Mode::Direct(committed) => committed.rollback(),
        }
    }

    /// The open transaction committed.
    pub(crate) fn committed(&mut self) {
        match &mut self.mode {
            Mode::Held(held) => held.committed(),
            Mode::Direct(committed) => committed.committed(),
        }
    }

    /// Whether anything waits to be written back.
    pub(crate) fn held(&self) -> bool {
        match &self.mode {
            Mode::Held(held) => held.pending(),
            Mode::Direct(_) => false,
        }
    }
}

/// Rebuilds presence from replayed events (`customer` → the latest event
/// time among them), in the replay's transaction: what a crash lost of
/// the held presence is exactly what the journal still holds.
pub(crate) fn restore(
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn,
    seen: &FxHashMap<String, i64>,
) -> heed::Result<()> {
    let mut key = KeyBuf::default();
    let mut changes: Vec<Change> = seen
        .iter()
        .map(|(c, t)| Change::new(&mut key, c, *t, false, false))
        .collect();
    put_all_later(db, txn, &mut changes)?;
    Ok(())
}

/// A fan's time to write back.
struct Change {
    key: Vec<u8>,
    /// The time to store; the later stored one when that won.
    time: i64,
    /// LMDB holds no later time: its value need not be read.
    settled: bool,
    customer: String,
    /// From the open transaction's layer.
    open: bool,
}

impl Change {
    fn new(key: &mut KeyBuf, customer: &str, time: i64, settled: bool, open: bool) -> Change {
        Change {
            key: key.start(customer).finish(MAX_KEY).to_vec(),
            time,
            settled,
            customer: customer.to_owned(),
            open,
        }
    }
}

/// Stores each change's time unless a time as late is stored already,
/// in key order (neighbouring keys share pages), and leaves in each the
/// time LMDB then holds. Returns the puts made.
fn put_all_later(
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn,
    changes: &mut [Change],
) -> heed::Result<usize> {
    changes.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    // All the reads first, then the puts through one cursor.
    let mut later = Vec::with_capacity(changes.len());
    for (i, change) in changes.iter_mut().enumerate() {
        let stored = match change.settled {
            true => None,
            false => db.get(txn, &change.key)?.and_then(decode),
        };
        match stored {
            Some(stored) if stored >= change.time => change.time = stored,
            _ => later.push(i),
        }
    }
    let mut puts = SortedPuts::new(db, txn)?;
    for &i in &later {
        puts.put(&changes[i].key, &changes[i].time.to_be_bytes())?;
    }
    Ok(later.len())
}

fn decode(v: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(v).ok().map(i64::from_be_bytes)
}

/// The customer a presence key names; `None` for a hashed (over-long)
/// one.
fn customer_of(k: &[u8]) -> Option<String> {
    split_first(k).map(|(c, _)| c.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::env::{open_env, Dbs, LmdbEnv};

    const T: i64 = 1_750_000_000_000;
    const HOUR: i64 = 3_600_000;

    fn store() -> (tempfile::TempDir, LmdbEnv, Database<Bytes, Bytes>) {
        let dir = tempfile::tempdir().unwrap();
        let env = open_env(dir.path(), 1 << 24, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let db = Dbs::create(&env, &mut txn).unwrap().nba.presence;
        txn.commit().unwrap();
        (dir, env, db)
    }

    fn stored(env: &LmdbEnv, db: Database<Bytes, Bytes>, customer: &str) -> Option<i64> {
        let txn = env.read_txn().unwrap();
        let mut key = KeyBuf::default();
        let k = key.start(customer).finish(MAX_KEY);
        db.get(&txn, k).unwrap().and_then(decode)
    }

    /// One transaction of `work`, committed or not.
    fn txn(
        env: &LmdbEnv,
        p: &mut Presence,
        commit: bool,
        work: impl FnOnce(&mut Presence, &mut RwTxn),
    ) {
        let mut txn = env.write_txn().unwrap();
        p.rollback();
        work(p, &mut txn);
        if commit {
            txn.commit().unwrap();
            p.committed();
        } else {
            drop(txn);
            p.rollback();
        }
    }

    /// `fan` seen at `at_ms`, in a transaction that commits.
    fn seen(env: &LmdbEnv, p: &mut Presence, fan: &str, at_ms: i64) {
        txn(env, p, true, |p, t| p.touch(t, fan, at_ms).unwrap());
    }

    /// A write-back that commits; the fans whose presence changed.
    fn written_back(env: &LmdbEnv, p: &mut Presence) -> usize {
        let mut n = 0;
        txn(env, p, true, |p, t| n = p.write_back(t).unwrap());
        n
    }

    #[test]
    fn held_presence_reaches_lmdb_only_when_written_back() {
        let (_dir, env, db) = store();
        let mut p = Presence::new(db, true);
        seen(&env, &mut p, "fan-1", T);
        assert_eq!(stored(&env, db, "fan-1"), None, "held, not written");
        assert!(p.held());

        // A write-back that does not commit leaves it held.
        txn(&env, &mut p, false, |p, t| {
            assert_eq!(p.write_back(t).unwrap(), 1);
        });
        assert_eq!(stored(&env, db, "fan-1"), None);
        assert!(p.held(), "a rolled-back write-back keeps what it wrote");

        assert_eq!(written_back(&env, &mut p), 1);
        assert_eq!(stored(&env, db, "fan-1"), Some(T));
        assert!(!p.held());
    }

    #[test]
    fn a_rolled_back_touch_leaves_nothing_and_a_refresh_waits_ten_minutes() {
        let (_dir, env, db) = store();
        let mut p = Presence::new(db, true);
        txn(&env, &mut p, false, |p, t| p.touch(t, "fan-1", T).unwrap());
        assert!(!p.held(), "the touch rolled back");

        txn(&env, &mut p, true, |p, t| {
            p.touch(t, "fan-1", T).unwrap();
            // Within the refresh interval: the first time stands.
            p.touch(t, "fan-1", T + REFRESH_MS - 1).unwrap();
        });
        written_back(&env, &mut p);
        assert_eq!(stored(&env, db, "fan-1"), Some(T));

        seen(&env, &mut p, "fan-1", T + HOUR);
        written_back(&env, &mut p);
        assert_eq!(stored(&env, db, "fan-1"), Some(T + HOUR));
    }

    #[test]
    fn the_write_back_never_moves_presence_back() {
        let (_dir, env, db) = store();
        let mut direct = Presence::new(db, false);
        seen(&env, &mut direct, "fan-1", T + HOUR);
        assert_eq!(
            stored(&env, db, "fan-1"),
            Some(T + HOUR),
            "direct writes at once"
        );

        // A held presence that knows nothing of the stored one (a restart)
        // sees an older event of the same fan.
        let mut held = Presence::new(db, true);
        seen(&env, &mut held, "fan-1", T);
        assert_eq!(written_back(&env, &mut held), 0, "nothing later to store");
        assert_eq!(stored(&env, db, "fan-1"), Some(T + HOUR));
    }

    #[test]
    fn a_later_stored_time_is_adopted_so_a_settled_fan_never_moves_back() {
        let (_dir, env, db) = store();
        let mut direct = Presence::new(db, false);
        seen(&env, &mut direct, "fan-1", T + HOUR);
        let mut held = Presence::new(db, true);
        seen(&env, &mut held, "fan-1", T);

        // A write-back that reads the later time but does not commit
        // learns nothing.
        txn(&env, &mut held, false, |p, t| {
            assert_eq!(p.write_back(t).unwrap(), 0);
        });
        seen(&env, &mut held, "fan-1", T + 20 * 60_000);
        assert_eq!(written_back(&env, &mut held), 0, "read again: later");
        assert_eq!(stored(&env, db, "fan-1"), Some(T + HOUR));

        // One that commits knows the fan's time is the stored one: an
        // event before it is no refresh, and one past the refresh
        // interval is written without a read.
        seen(&env, &mut held, "fan-1", T + 40 * 60_000);
        assert!(!held.held(), "not past the stored time's refresh");
        seen(&env, &mut held, "fan-1", T + HOUR + 20 * 60_000);
        assert_eq!(written_back(&env, &mut held), 1);
        assert_eq!(stored(&env, db, "fan-1"), Some(T + HOUR + 20 * 60_000));
    }

    #[test]
    fn an_erased_fan_is_not_written_back_nor_found() {
        let (_dir, env, db) = store();
        let mut p = Presence::new(db, true);
        txn(&env, &mut p, true, |p, t| {
            p.touch(t, "fan-1", T).unwrap();
            p.touch(t, "fan-2", T).unwrap();
        });
        txn(&env, &mut p, true, |p, t| p.erase(t, "fan-1").unwrap());
        txn(&env, &mut p, true, |p, t| {
            let (present, next) = p.present(t, T, HOUR, None, 10).unwrap();
            assert_eq!(present, vec!["fan-2".to_owned()]);
            assert_eq!(next, None);
        });
        assert_eq!(stored(&env, db, "fan-1"), None);
        assert_eq!(stored(&env, db, "fan-2"), Some(T));
    }

    #[test]
    fn a_scan_sees_held_fans_in_key_order_and_pages_by_limit() {
        let (_dir, env, db) = store();
        let mut p = Presence::new(db, true);
        txn(&env, &mut p, true, |p, t| {
            for fan in ["fan-c", "fan-a", "fan-b"] {
                p.touch(t, fan, T).unwrap();
            }
            // Seen before the window: not present.
            p.touch(t, "fan-old", T - 2 * HOUR).unwrap();
        });
        let mut cursor = None;
        txn(&env, &mut p, true, |p, t| {
            let (present, next) = p.present(t, T, HOUR, None, 2).unwrap();
            assert_eq!(present, vec!["fan-a".to_owned(), "fan-b".to_owned()]);
            cursor = next;
        });
        txn(&env, &mut p, true, |p, t| {
            // Held again after the first page was written back.
            p.touch(t, "fan-d", T).unwrap();
            let (present, next) = p.present(t, T, HOUR, cursor.as_deref(), 2).unwrap();
            assert_eq!(present, vec!["fan-c".to_owned(), "fan-d".to_owned()]);
            assert!(next.is_some(), "the limit cut the scan");
        });
    }

    #[test]
    fn restore_keeps_the_later_time() {
        let (_dir, env, db) = store();
        let mut p = Presence::new(db, false);
        seen(&env, &mut p, "fan-1", T + HOUR);
        let seen: FxHashMap<String, i64> = [("fan-1".to_owned(), T), ("fan-2".to_owned(), T)]
            .into_iter()
            .collect();
        let mut t = env.write_txn().unwrap();
        restore(db, &mut t, &seen).unwrap();
        t.commit().unwrap();
        assert_eq!(stored(&env, db, "fan-1"), Some(T + HOUR));
        assert_eq!(stored(&env, db, "fan-2"), Some(T));
    }
}
