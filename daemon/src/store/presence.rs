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
use super::keys::{head, split_first, KeyBuf};
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
    /// Fans whose mark in `known` is unwritten, so that a write-back does
    /// not scan every fan of the run (up to a million) to find them.
    /// Every such fan is listed; an erased fan may stay listed after its
    /// mark is gone (and be listed twice when seen again), and the next
    /// write-back drops what no longer has an unwritten mark.
    unwritten: Vec<String>,
    /// Fans of `known` the open transaction wrote back, with the time
    /// LMDB holds for them now: unwritten again if it does not commit,
    /// settled at that time if it does.
    written: Vec<(String, i64)>,
    /// The last write-back's changes, emptied: a write-back's worth of
    /// fans, kept so the next one does not allocate it anew.
    changes: Vec<Change>,
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
        let mut changes = std::mem::take(&mut self.changes);
        for customer in std::mem::take(&mut self.unwritten) {
            let Some(mark) = self.known.get_mut(&customer) else {
                continue;
            };
            let Some(time) = mark.seen.filter(|_| mark.unwritten) else {
                continue;
            };
            if self.open.contains_key(&customer) {
                // Written from the open layer below; listed still, in
                // case the transaction does not commit.
                self.unwritten.push(customer);
                continue;
            }
            // Taken off the list: a second listing of the fan is skipped.
            mark.unwritten = false;
            changes.push(Change {
                settled: mark.settled,
                ..Change::of(key, customer, time)
            });
        }
        for (customer, mark) in &mut self.open {
            if let (true, Some(time)) = (mark.unwritten, mark.seen) {
                changes.push(Change {
                    settled: mark.settled,
                    open: true,
                    ..Change::of(key, customer.clone(), time)
                });
            }
            mark.unwritten = false;
        }
        let stored = match put_all_later(db, txn, &mut changes) {
            Ok(stored) => stored,
            Err(e) => {
                // The transaction is abandoned: `known`'s fans wait for
                // the next write-back, the open layer goes with it.
                for change in changes.drain(..).filter(|c| !c.open) {
                    self.relist(change.customer);
                }
                self.changes = changes;
                return Err(e);
            }
        };
        for change in changes.drain(..) {
            if change.open {
                // The open layer goes with the transaction if it does not
                // commit, so it may know what LMDB holds at once.
                if let Some(mark) = self.open.get_mut(&change.customer) {
                    mark.seen = Some(change.time);
                    mark.settled = true;
                }
            } else {
                self.written.push((change.customer, change.time));
            }
        }
        self.changes = changes;
        Ok(stored)
    }

    /// `customer`'s mark in `known` is unwritten again.
    fn relist(&mut self, customer: String) {
        if let Some(mark) = self.known.get_mut(&customer) {
            if !mark.unwritten {
                mark.unwritten = true;
                self.unwritten.push(customer);
            }
        }
    }

    fn rollback(&mut self) {
        self.open.clear();
        for (customer, _) in std::mem::take(&mut self.written) {
            self.relist(customer);
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
                    let listed = self.known.get(&customer).is_some_and(|m| m.unwritten);
                    if mark.unwritten && !listed {
                        self.unwritten.push(customer.clone());
                    }
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

    /// Whether a write-back may have something to write: true too while
    /// an erased fan is still listed, until a write-back drops it.
    fn pending(&self) -> bool {
        !self.open.is_empty() || !self.unwritten.is_empty()
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
        .map(|(customer, &time)| Change::of(&mut key, customer.clone(), time))
        .collect();
    put_all_later(db, txn, &mut changes)?;
    Ok(())
}

/// A fan's time to write back.
struct Change {
    /// What the changes are sorted by first (see [`head`]).
    head: u128,
    key: Vec<u8>,
    /// The time to store; the later stored one when that won.
    time: i64,
    /// LMDB holds no later time: its value need not be read.
    settled: bool,
    customer: String,
    /// From the open transaction's layer.
    open: bool,
    /// Whether LMDB lacks this time (it holds none, or an earlier one):
    /// the read decides, the put follows.
    store: bool,
}

impl Change {
    /// `customer` seen at `time`, not known to be settled, from the
    /// committed layer.
    fn of(buf: &mut KeyBuf, customer: String, time: i64) -> Change {
        let key = buf.start(&customer).finish(MAX_KEY).to_vec();
        Change {
            head: head(&key),
            key,
            time,
            settled: false,
            customer,
            open: false,
            store: true,
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
    changes.sort_unstable_by(|a, b| a.head.cmp(&b.head).then_with(|| a.key.cmp(&b.key)));
    // All the reads first, then the puts through one cursor.
    for change in changes.iter_mut() {
        let stored = match change.settled {
            true => None,
            false => db.get(txn, &change.key)?.and_then(decode),
        };
        if let Some(stored) = stored.filter(|&stored| stored >= change.time) {
            change.time = stored;
            change.store = false;
        }
    }
    let mut puts = SortedPuts::new(db, txn)?;
    let mut stored = 0;
    for change in changes.iter().filter(|c| c.store) {
        puts.put(&change.key, &change.time.to_be_bytes())?;
        stored += 1;
    }
    Ok(stored)
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
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

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

    /// One step of [`held_presence_matches_a_model`], in a transaction
    /// of its own that commits or not.
    #[derive(Debug, Clone)]
    enum Step {
        /// A fan seen at `T` plus this many refresh intervals.
        Touch(usize, i64),
        Erase(usize),
        WriteBack,
        /// A fan seen, then a write-back, in one transaction: the fan is
        /// in the open layer when it is written.
        TouchAndWriteBack(usize, i64),
    }

    fn step() -> impl Strategy<Value = (Step, bool)> {
        let fan = 0usize..4;
        let at = 0i64..8;
        let step = prop_oneof![
            4 => (fan.clone(), at.clone()).prop_map(|(f, a)| Step::Touch(f, a)),
            1 => fan.clone().prop_map(Step::Erase),
            2 => Just(Step::WriteBack),
            2 => (fan, at).prop_map(|(f, a)| Step::TouchAndWriteBack(f, a)),
        ];
        (step, prop::bool::weighted(0.8))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Under any mix of touches, erasures and write-backs, committed
        /// or not, each committed write-back leaves LMDB holding exactly
        /// each fan's latest time since the fan was last erased, and
        /// stores what changed, no more. Fails when a fan waiting to be
        /// written is lost (off the list of unwritten fans after a
        /// rollback, or while it was in the open layer), or is written
        /// twice.
        #[test]
        fn held_presence_matches_a_model(steps in prop::collection::vec(step(), 1..40)) {
            let (_dir, env, db) = store();
            let mut p = Presence::new(db, true);
            let fans = ["fan-a", "fan-b", "fan-c", "fan-d"];
            // The model: the held time of each fan, those not written
            // back since their last refresh, and LMDB's times.
            let mut held: BTreeMap<usize, i64> = BTreeMap::new();
            let mut dirty: BTreeSet<usize> = BTreeSet::new();
            let mut lmdb: BTreeMap<usize, i64> = BTreeMap::new();
            for (step, commit) in steps {
                let (mut h, mut d, mut l) = (held.clone(), dirty.clone(), lmdb.clone());
                let touch = |p: &mut Presence, t: &mut RwTxn, f: usize, a: i64| {
                    p.touch(t, fans[f], T + a * REFRESH_MS).unwrap();
                };
                // The model's touch: a refresh only when a refresh
                // interval has passed.
                let mut refresh = |f: usize, a: i64| {
                    let at = T + a * REFRESH_MS;
                    if h.get(&f).is_none_or(|&last| at - last >= REFRESH_MS) {
                        h.insert(f, at);
                        d.insert(f);
                    }
                };
                match step {
                    Step::Touch(f, a) | Step::TouchAndWriteBack(f, a) => refresh(f, a),
                    Step::Erase(f) => {
                        h.remove(&f);
                        d.remove(&f);
                        l.remove(&f);
                    }
                    Step::WriteBack => {}
                }
                let mut puts = None;
                txn(&env, &mut p, commit, |p, t| match step {
                    Step::Touch(f, a) => touch(p, t, f, a),
                    Step::Erase(f) => p.erase(t, fans[f]).unwrap(),
                    Step::WriteBack => puts = Some(p.write_back(t).unwrap()),
                    Step::TouchAndWriteBack(f, a) => {
                        touch(p, t, f, a);
                        puts = Some(p.write_back(t).unwrap());
                    }
                });
                if puts.is_some() {
                    let expected = d.iter().filter(|f| l.get(f) != h.get(f)).count();
                    prop_assert_eq!(puts, Some(expected));
                    for f in std::mem::take(&mut d) {
                        l.insert(f, h[&f]);
                    }
                }
                if commit {
                    (held, dirty, lmdb) = (h, d, l);
                }
                if !dirty.is_empty() {
                    prop_assert!(p.held(), "a fan waits to be written: {:?}", dirty);
                }
                for (f, fan) in fans.iter().enumerate() {
                    prop_assert_eq!(stored(&env, db, fan), lmdb.get(&f).copied(), "{}", fan);
                }
            }
            // Two write-backs: the second finds nothing left, and leaves
            // no stale listing behind.
            written_back(&env, &mut p);
            prop_assert_eq!(written_back(&env, &mut p), 0);
            prop_assert!(!p.held());
            for (f, fan) in fans.iter().enumerate() {
                prop_assert_eq!(stored(&env, db, fan), held.get(&f).copied(), "{}", fan);
            }
        }
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
