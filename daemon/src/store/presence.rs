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
//! what is held before it scans, in its own transaction, so it sees every
//! fan as before. In `direct` mode nothing is held: each touch that
//! matters writes at once, as the rest of that mode's state does.

use std::ops::Bound;

use heed::types::Bytes;
use heed::{Database, RwTxn};
use rustc_hash::FxHashMap;

use super::committed::Committed;
use super::keys::{split_first, KeyBuf};

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
    /// Times as committed (written back or held), so that a refresh is
    /// decided without a read.
    seen: Committed<i64>,
    /// `journal` mode: what is not written back yet.
    held: Option<Held>,
    key: KeyBuf,
}

/// Presence changes not yet in LMDB, in two layers like the writer's
/// other in-memory state: a transaction that does not commit leaves no
/// trace.
#[derive(Default)]
struct Held {
    /// Changes committed but not written back. `None`: erased.
    committed: FxHashMap<String, Option<i64>>,
    /// The open transaction's changes.
    open: FxHashMap<String, Option<i64>>,
    /// Committed changes the open transaction wrote back: they return to
    /// `committed` when it does not commit.
    written: FxHashMap<String, Option<i64>>,
}

impl Held {
    fn get(&self, customer: &str) -> Option<Option<i64>> {
        self.open
            .get(customer)
            .or_else(|| self.committed.get(customer))
            .copied()
    }

    fn is_empty(&self) -> bool {
        self.committed.is_empty() && self.open.is_empty()
    }
}

impl Presence {
    /// The table, held in memory between checkpoints when `hold` (the
    /// store's `journal` mode).
    pub(crate) fn new(db: Database<Bytes, Bytes>, hold: bool) -> Presence {
        Presence {
            db,
            seen: Committed::new(CACHE_MAX),
            held: hold.then(Held::default),
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
        let known = self.seen.get(customer).copied();
        if known.is_some_and(|t| at_ms - t < REFRESH_MS) {
            return Ok(());
        }
        if let Some(held) = &mut self.held {
            let last = known.or_else(|| held.get(customer).flatten());
            if let Some(t) = last.filter(|t| at_ms - t < REFRESH_MS) {
                self.seen.note(customer, t);
                return Ok(());
            }
            // What LMDB holds is not read here: the write-back keeps the
            // later of the two.
            let t = last.map_or(at_ms, |t| t.max(at_ms));
            held.open.insert(customer.to_owned(), Some(t));
            self.seen.note(customer, t);
            return Ok(());
        }
        let key = self.key.start(customer).finish(MAX_KEY);
        // A remembered time is the stored one: only this stage writes
        // presence, and erasure forgets it.
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
        self.seen.note(customer, stored);
        Ok(())
    }

    /// Deletes `customer`'s presence.
    pub(crate) fn erase(&mut self, txn: &mut RwTxn, customer: &str) -> heed::Result<()> {
        let key = self.key.start(customer).finish(MAX_KEY);
        self.db.delete(txn, key)?;
        self.seen.forget(customer);
        if let Some(held) = &mut self.held {
            held.open.insert(customer.to_owned(), None);
        }
        Ok(())
    }

    /// Writes back what is held, in key order, in the open transaction.
    /// Returns the fans whose stored presence changed.
    pub(crate) fn write_back(&mut self, txn: &mut RwTxn) -> heed::Result<usize> {
        let Some(held) = &mut self.held else {
            return Ok(0);
        };
        if held.is_empty() {
            return Ok(0);
        }
        let mut changes: Vec<(Vec<u8>, Option<i64>)> = held
            .committed
            .iter()
            .filter(|(c, _)| !held.open.contains_key(*c))
            .chain(held.open.iter())
            .map(|(c, t)| (self.key.start(c).finish(MAX_KEY).to_vec(), *t))
            .collect();
        changes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut written = 0;
        for (key, t) in &changes {
            // Erased ones were deleted from LMDB by `erase` already.
            if let Some(t) = *t {
                written += put_later(self.db, txn, key, t)?;
            }
        }
        held.written.extend(held.committed.drain());
        held.open.clear();
        Ok(written)
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
        self.seen.rollback();
        if let Some(held) = &mut self.held {
            held.open.clear();
            for (c, t) in held.written.drain() {
                held.committed.entry(c).or_insert(t);
            }
        }
    }

    /// The open transaction committed.
    pub(crate) fn committed(&mut self) {
        self.seen.committed();
        if let Some(held) = &mut self.held {
            held.written.clear();
            held.committed.extend(held.open.drain());
        }
    }

    /// Whether anything waits to be written back.
    pub(crate) fn held(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.is_empty())
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
    let mut changes: Vec<(Vec<u8>, i64)> = seen
        .iter()
        .map(|(c, t)| (key.start(c).finish(MAX_KEY).to_vec(), *t))
        .collect();
    changes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (key, t) in changes {
        put_later(db, txn, &key, t)?;
    }
    Ok(())
}

/// Stores `t` unless what is stored is as late already: a fan's presence
/// never moves back. Returns the puts made (0 or 1).
fn put_later(
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn,
    key: &[u8],
    t: i64,
) -> heed::Result<usize> {
    if db.get(txn, key)?.and_then(decode).is_some_and(|s| s >= t) {
        return Ok(0);
    }
    db.put(txn, key, &t.to_be_bytes())?;
    Ok(1)
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

    #[test]
    fn held_presence_reaches_lmdb_only_when_written_back() {
        let (_dir, env, db) = store();
        let mut p = Presence::new(db, true);
        txn(&env, &mut p, true, |p, t| p.touch(t, "fan-1", T).unwrap());
        assert_eq!(stored(&env, db, "fan-1"), None, "held, not written");
        assert!(p.held());

        // A write-back that does not commit leaves it held.
        txn(&env, &mut p, false, |p, t| {
            assert_eq!(p.write_back(t).unwrap(), 1);
        });
        assert_eq!(stored(&env, db, "fan-1"), None);
        assert!(p.held(), "a rolled-back write-back keeps what it wrote");

        txn(&env, &mut p, true, |p, t| {
            assert_eq!(p.write_back(t).unwrap(), 1);
        });
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
        txn(&env, &mut p, true, |p, t| {
            p.write_back(t).unwrap();
        });
        assert_eq!(stored(&env, db, "fan-1"), Some(T));

        txn(&env, &mut p, true, |p, t| {
            p.touch(t, "fan-1", T + HOUR).unwrap()
        });
        txn(&env, &mut p, true, |p, t| {
            p.write_back(t).unwrap();
        });
        assert_eq!(stored(&env, db, "fan-1"), Some(T + HOUR));
    }

    #[test]
    fn the_write_back_never_moves_presence_back() {
        let (_dir, env, db) = store();
        let mut direct = Presence::new(db, false);
        txn(&env, &mut direct, true, |p, t| {
            p.touch(t, "fan-1", T + HOUR).unwrap()
        });
        assert_eq!(
            stored(&env, db, "fan-1"),
            Some(T + HOUR),
            "direct writes at once"
        );

        // A held presence that knows nothing of the stored one (a restart)
        // sees an older event of the same fan.
        let mut held = Presence::new(db, true);
        txn(&env, &mut held, true, |p, t| {
            p.touch(t, "fan-1", T).unwrap()
        });
        txn(&env, &mut held, true, |p, t| {
            assert_eq!(p.write_back(t).unwrap(), 0, "nothing later to store");
        });
        assert_eq!(stored(&env, db, "fan-1"), Some(T + HOUR));
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
        txn(&env, &mut p, true, |p, t| {
            p.touch(t, "fan-1", T + HOUR).unwrap()
        });
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
