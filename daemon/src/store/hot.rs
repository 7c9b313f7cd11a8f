//! Rule state between checkpoints, held in memory by the writer.
//!
//! Why: in `direct` mode every event writes its customer's state record
//! into LMDB, which dirties one B-tree page per event; each commit then
//! copies and fsyncs all of them, and the writer spends its time in page
//! copies and the disk. In `journal` mode (`[store] rule_state`) the
//! engine's writes land here instead, the events that caused them go to
//! the journal (`journal.rs`) in the same commit, and a checkpoint writes
//! everything changed since the last one back to LMDB in key order, once
//! per key, in one transaction that also empties the journal. A customer
//! seen many times between checkpoints is written once.
//!
//! Two layers keep the engine's transactional view: `open` holds what the
//! current transaction wrote, `committed` what earlier transactions since
//! the last checkpoint wrote. A transaction that rolls back drops `open`;
//! one that checkpoints moves `committed` aside until it commits, so a
//! checkpoint that fails to commit loses nothing.

use std::collections::BTreeMap;

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn};
use rustc_hash::FxHashMap;

use super::customers;
use super::keys::KeyBuf;
use super::sorted::{self, Order};
use crate::engine::table::{Entry, Profile, StateRead, StateTable};
use crate::engine::ApplyError;

/// A key's value since the last checkpoint; `None` when it was deleted.
pub(crate) type Changes = FxHashMap<Box<[u8]>, Option<Vec<u8>>>;

/// The engine's changes not yet written back to LMDB.
#[derive(Debug, Default)]
pub(crate) struct HotState {
    committed: Changes,
    open: Changes,
    /// `committed` as it was before a checkpoint in the open transaction.
    stash: Option<Changes>,
    /// The last write-back's sort buffer, empty (see
    /// [`sorted::write_in_order`]).
    spare: Vec<Order<'static>>,
}

impl HotState {
    /// Starts a transaction; whatever an unfinished one left is dropped.
    pub(crate) fn begin(&mut self) {
        if let Some(stash) = self.stash.take() {
            self.committed = stash;
        }
        self.open.clear();
    }

    /// The transaction committed: its changes join the committed ones,
    /// or, after a checkpoint, the committed ones are gone for good.
    pub(crate) fn commit(&mut self) {
        if let Some(mut written) = self.stash.take() {
            // The checkpoint's changes are in LMDB now. Their map, grown
            // to a checkpoint's worth of keys, takes the next ones: a
            // fresh one would grow through every doubling again, on
            // memory the allocator may have handed back to the kernel.
            written.clear();
            if self.committed.is_empty() {
                self.committed = written;
            }
        }
        if self.committed.is_empty() && self.committed.capacity() < self.open.len() {
            std::mem::swap(&mut self.committed, &mut self.open);
        } else {
            self.committed.extend(self.open.drain());
        }
    }

    /// Keys changed since the last checkpoint, committed or not.
    pub(crate) fn keys(&self) -> usize {
        self.committed.len() + self.open.len()
    }

    /// The value of `key` as the open transaction sees it: `Some(None)`
    /// when it was deleted here, `None` when LMDB has the answer.
    pub(crate) fn lookup(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.open
            .get(key)
            .or_else(|| self.committed.get(key))
            .map(Option::as_deref)
    }

    /// Sets `key` in the open transaction.
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        match self.open.get_mut(key) {
            Some(Some(held)) => {
                held.clear();
                held.extend_from_slice(value);
            }
            Some(slot) => *slot = Some(value.to_vec()),
            None => {
                self.open.insert(key.into(), Some(value.to_vec()));
            }
        }
    }

    /// Deletes `key` in the open transaction.
    pub(crate) fn delete(&mut self, key: &[u8]) {
        self.open.insert(key.into(), None);
    }

    /// Takes every committed change out, to be written back by someone
    /// else, and leaves `empty` in its place: an emptied map of an
    /// earlier write-back, which keeps its capacity, so the next changes
    /// do not grow a new map through every doubling. Between
    /// transactions only (nothing open).
    pub(crate) fn take_committed(&mut self, empty: Changes) -> Changes {
        debug_assert!(self.open.is_empty() && self.stash.is_none() && empty.is_empty());
        std::mem::replace(&mut self.committed, empty)
    }

    /// Writes every change back to `db` in key order, in the open
    /// transaction. Until that transaction commits, the committed changes
    /// are kept aside to be restored if it rolls back; a write-back that
    /// fails leaves them where they were.
    pub(crate) fn write_back(
        &mut self,
        txn: &mut RwTxn,
        db: Database<Bytes, Bytes>,
    ) -> heed::Result<usize> {
        let open = &self.open;
        // The open transaction's change to a key replaces the committed
        // one: a key in both is written once, with its open value.
        let changes = self
            .committed
            .iter()
            .filter(|(k, _)| !open.contains_key(&**k))
            .chain(open.iter())
            .map(|(k, v)| (&**k, v.as_deref()));
        let written = sorted::write_in_order(db, txn, changes, &mut self.spare)?;
        let committed = std::mem::take(&mut self.committed);
        self.open.clear();
        // A second checkpoint in one transaction finds `committed` empty;
        // the first one's stash is what a rollback restores.
        if self.stash.is_none() {
            self.stash = Some(committed);
        }
        Ok(written)
    }
}

/// `key`'s value as the writer sees it: the change `hot` holds for it,
/// when there is one, else LMDB's value in `txn`.
pub(crate) fn read_through<'a>(
    hot: Option<&'a HotState>,
    txn: &'a RoTxn,
    db: Database<Bytes, Bytes>,
    key: &[u8],
) -> heed::Result<Option<&'a [u8]>> {
    match hot.and_then(|h| h.lookup(key)) {
        Some(value) => Ok(value),
        None => db.get(txn, key),
    }
}

/// Reads the engine's state as the writer sees it: its unwritten changes
/// over a read transaction (progress queries in `journal` mode; offers
/// reading progress).
pub(crate) struct Snapshot<'a> {
    pub txn: &'a RoTxn<'a>,
    pub db: Database<Bytes, Bytes>,
    pub hot: Option<&'a HotState>,
}

impl StateRead for Snapshot<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, heed::Error> {
        read_through(self.hot, self.txn, self.db, key)
    }
}

/// Where the engine's profile reads come from.
pub(crate) enum Profiles<'a> {
    /// The profiles table; every read is noted for the journal.
    Live {
        db: Database<Bytes, Bytes>,
        read: &'a mut Vec<(String, Option<Profile>)>,
    },
    /// A journal entry's notes, as they were read when it was written.
    Replay(&'a [(String, Option<Profile>)]),
}

/// The engine's table in `journal` mode: its writes go to [`HotState`],
/// its reads see them over the writer's transaction.
pub(crate) struct HotTable<'a, 't, 'e> {
    pub hot: &'a mut HotState,
    pub txn: &'t mut RwTxn<'e>,
    pub db: Database<Bytes, Bytes>,
    pub profiles: Profiles<'a>,
    pub key: KeyBuf,
}

impl StateTable for HotTable<'_, '_, '_> {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, heed::Error> {
        read_through(Some(self.hot), self.txn, self.db, key)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), heed::Error> {
        self.hot.put(key, value);
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), heed::Error> {
        self.hot.delete(key);
        Ok(())
    }

    /// LMDB's entries with the unwritten changes laid over them. The
    /// changes are scanned whole: prefix scans are rare (a goal's members,
    /// a period's summaries) and the changes are bounded by the
    /// checkpoint policy.
    fn prefixed(&self, prefix: &[u8]) -> Result<Vec<Entry>, heed::Error> {
        let mut entries = BTreeMap::new();
        for entry in self.db.prefix_iter(self.txn, prefix)? {
            let (k, v) = entry?;
            entries.insert(k.to_vec(), v.to_vec());
        }
        for layer in [&self.hot.committed, &self.hot.open] {
            for (k, v) in layer.iter().filter(|(k, _)| k.starts_with(prefix)) {
                match v {
                    Some(v) => entries.insert(k.to_vec(), v.clone()),
                    None => entries.remove(&**k),
                };
            }
        }
        Ok(entries.into_iter().collect())
    }

    fn profile(&mut self, customer: &str) -> Result<Option<Profile>, ApplyError> {
        match &mut self.profiles {
            Profiles::Live { db, read } => {
                let profile = customers::load(*db, self.txn, &mut self.key, customer)
                    .map_err(|e| ApplyError::Customer(e.to_string()))?;
                read.push((customer.to_owned(), profile.clone()));
                Ok(profile)
            }
            Profiles::Replay(read) => Ok(read
                .iter()
                .find(|(c, _)| c == customer)
                .and_then(|(_, p)| p.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::env::scratch_table;

    fn table<'a, 't, 'e>(
        hot: &'a mut HotState,
        txn: &'t mut RwTxn<'e>,
        db: Database<Bytes, Bytes>,
        read: &'a mut Vec<(String, Option<Profile>)>,
    ) -> HotTable<'a, 't, 'e> {
        HotTable {
            hot,
            txn,
            db,
            profiles: Profiles::Live { db, read },
            key: KeyBuf::default(),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Delete(u8),
        WriteBack,
        Commit,
        Rollback,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0..8u8, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            2 => (0..8u8).prop_map(Op::Delete),
            1 => Just(Op::WriteBack),
            2 => Just(Op::Commit),
            2 => Just(Op::Rollback),
        ]
    }

    /// What the two layers mean, written plainly: what LMDB and the
    /// changes are as of the last commit, and as the open transaction
    /// sees them.
    #[derive(Default, Clone)]
    struct Model {
        lmdb: BTreeMap<u8, u8>,
        changes: BTreeMap<u8, Option<u8>>,
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any mix of changes, checkpoints, commits and rollbacks reads
        /// back and writes back exactly as the model says.
        #[test]
        fn the_layers_match_a_model_of_committed_and_open_changes(
            ops in proptest::collection::vec(op(), 1..120)
        ) {
            let (_dir, env, db) = scratch_table(1 << 20);
            let mut hot = HotState::default();
            let (mut committed, mut open) = (Model::default(), Model::default());
            let mut txn = env.write_txn().unwrap();
            hot.begin();
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        hot.put(&[k], &[v]);
                        open.changes.insert(k, Some(v));
                    }
                    Op::Delete(k) => {
                        hot.delete(&[k]);
                        open.changes.insert(k, None);
                    }
                    Op::WriteBack => {
                        let written = hot.write_back(&mut txn, db).unwrap();
                        proptest::prop_assert_eq!(written, open.changes.len());
                        for (k, v) in std::mem::take(&mut open.changes) {
                            match v {
                                Some(v) => open.lmdb.insert(k, v),
                                None => open.lmdb.remove(&k),
                            };
                        }
                    }
                    Op::Commit => {
                        txn.commit().unwrap();
                        hot.commit();
                        committed = open.clone();
                        txn = env.write_txn().unwrap();
                        hot.begin();
                    }
                    Op::Rollback => {
                        drop(txn);
                        hot.begin();
                        open = committed.clone();
                        txn = env.write_txn().unwrap();
                    }
                }
                // A key changed in both layers counts twice: the bound a
                // checkpoint is due at never undercounts.
                proptest::prop_assert!(hot.keys() >= open.changes.len());
                for k in 0..8u8 {
                    let expected = match open.changes.get(&k) {
                        Some(v) => *v,
                        None => open.lmdb.get(&k).copied(),
                    };
                    let seen = read_through(Some(&hot), &txn, db, &[k]).unwrap();
                    proptest::prop_assert_eq!(seen, expected.as_ref().map(std::slice::from_ref));
                    proptest::prop_assert_eq!(
                        db.get(&txn, &[k]).unwrap(),
                        open.lmdb.get(&k).map(std::slice::from_ref)
                    );
                }
            }
        }
    }

    /// A checkpoint that cannot write (the map is full) rolls back with
    /// the held changes still held: nothing reads stale LMDB values
    /// afterwards, and a later checkpoint writes them all.
    #[test]
    fn a_write_back_that_fails_keeps_the_changes_held() {
        let (_dir, env, db) = scratch_table(1 << 20);
        let mut hot = HotState::default();
        let value = [7u8; 1000];
        let txn = env.write_txn().unwrap();
        hot.begin();
        for i in 0u32..2_000 {
            hot.put(&i.to_be_bytes(), &value);
        }
        txn.commit().unwrap();
        hot.commit();

        let mut txn = env.write_txn().unwrap();
        hot.begin();
        let failed = hot.write_back(&mut txn, db);
        assert!(failed.is_err_and(|e| super::super::env::is_map_full(&e)));
        drop(txn);
        hot.begin();
        assert_eq!(hot.keys(), 2_000);
        let txn = env.read_txn().unwrap();
        for i in [0u32, 999, 1_999] {
            assert_eq!(
                read_through(Some(&hot), &txn, db, &i.to_be_bytes()).unwrap(),
                Some(&value[..]),
                "key {i}"
            );
        }
    }

    #[test]
    fn changes_overlay_lmdb_roll_back_and_write_back_once() {
        let (_dir, env, db) = scratch_table(1 << 20);
        let mut txn = env.write_txn().unwrap();
        db.put(&mut txn, b"a1", b"lmdb").unwrap();
        db.put(&mut txn, b"a2", b"lmdb").unwrap();
        db.put(&mut txn, b"b", b"lmdb").unwrap();
        txn.commit().unwrap();

        let mut hot = HotState::default();
        let mut read = Vec::new();
        // A committed transaction: a1 changed, a2 deleted, a3 new.
        let mut txn = env.write_txn().unwrap();
        hot.begin();
        let mut t = table(&mut hot, &mut txn, db, &mut read);
        t.put(b"a1", b"one").unwrap();
        t.delete(b"a2").unwrap();
        t.put(b"a3", b"three").unwrap();
        let keys: Vec<Vec<u8>> = t.prefixed(b"a").unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(keys, vec![b"a1".to_vec(), b"a3".to_vec()]);
        drop(txn);
        hot.commit();

        // A transaction that rolls back leaves no trace.
        let mut txn = env.write_txn().unwrap();
        hot.begin();
        let mut t = table(&mut hot, &mut txn, db, &mut read);
        t.put(b"a1", b"lost").unwrap();
        t.put(b"a1", b"lost again").unwrap();
        t.delete(b"a3").unwrap();
        t.put(b"z", b"lost").unwrap();
        t.put(b"z", b"lost again").unwrap();
        drop(txn);
        hot.begin();
        let mut txn = env.write_txn().unwrap();
        let t = table(&mut hot, &mut txn, db, &mut read);
        assert_eq!(t.get(b"a1").unwrap(), Some(&b"one"[..]));
        assert_eq!(t.get(b"z").unwrap(), None);
        assert_eq!(t.get(b"a2").unwrap(), None);
        assert_eq!(t.get(b"a3").unwrap(), Some(&b"three"[..]));
        assert_eq!(t.get(b"b").unwrap(), Some(&b"lmdb"[..]));
        // LMDB itself still has the old values.
        assert_eq!(db.get(&txn, b"a1").unwrap(), Some(&b"lmdb"[..]));
        drop(txn);

        // A checkpoint that rolls back keeps the changes...
        let mut txn = env.write_txn().unwrap();
        hot.begin();
        assert_eq!(hot.write_back(&mut txn, db).unwrap(), 3);
        drop(txn);
        hot.begin();
        assert_eq!(hot.keys(), 3);
        // ...and one that commits writes each once, a key changed again
        // in the open transaction with its open value, and forgets them.
        let mut txn = env.write_txn().unwrap();
        let mut t = table(&mut hot, &mut txn, db, &mut read);
        t.put(b"a1", b"uno").unwrap();
        assert_eq!(hot.write_back(&mut txn, db).unwrap(), 3);
        txn.commit().unwrap();
        hot.commit();
        assert_eq!(hot.keys(), 0);
        let txn = env.read_txn().unwrap();
        assert_eq!(db.get(&txn, b"a1").unwrap(), Some(&b"uno"[..]));
        assert_eq!(db.get(&txn, b"a2").unwrap(), None);
        assert_eq!(db.get(&txn, b"a3").unwrap(), Some(&b"three"[..]));
        assert_eq!(db.get(&txn, b"b").unwrap(), Some(&b"lmdb"[..]));
        drop(txn);

        // The written map takes the next changes, holding only those.
        let mut txn = env.write_txn().unwrap();
        hot.begin();
        let mut t = table(&mut hot, &mut txn, db, &mut read);
        t.put(b"c", b"next").unwrap();
        drop(txn);
        hot.commit();
        assert_eq!(hot.keys(), 1);
        let mut txn = env.write_txn().unwrap();
        hot.begin();
        let t = table(&mut hot, &mut txn, db, &mut read);
        assert_eq!(t.get(b"c").unwrap(), Some(&b"next"[..]));
        assert_eq!(hot.write_back(&mut txn, db).unwrap(), 1);
    }
}
