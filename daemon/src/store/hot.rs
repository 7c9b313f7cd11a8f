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
//! One map holds every change since the last checkpoint, and an undo
//! log keeps the engine's transactional view: the first change the open
//! transaction makes to a key notes what the map held for it before, a
//! transaction that rolls back puts those back, and one that commits
//! just forgets them. A checkpoint moves the map aside until its
//! transaction commits, so a checkpoint that fails to commit loses
//! nothing. (Two layers, the open transaction's changes over the
//! committed ones, cost a second hash probe on every read and a rehash
//! of every key the transaction changed at its commit.)

use std::collections::BTreeMap;
use std::ops::Range;

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn};
use rustc_hash::FxHashMap;

use super::customers;
use super::keys::{head, KeyBuf};
use super::sorted::SortedPuts;
use crate::engine::table::{Entry, Profile, StateRead, StateTable};
use crate::engine::ApplyError;

/// A key's change since the last checkpoint.
#[derive(Debug)]
struct Slot {
    /// `None` when the key was deleted.
    value: Option<Vec<u8>>,
    /// The transaction that changed it last.
    txn: u64,
}

type Changes = FxHashMap<Box<[u8]>, Slot>;

/// What the open transaction's first change to a key replaced.
#[derive(Debug)]
struct Undo {
    /// The key, in [`HotState::undo_keys`].
    key: Range<usize>,
    /// The slot's value before, or `None` when there was no slot.
    before: Option<Option<Vec<u8>>>,
}

/// The engine's changes not yet written back to LMDB.
#[derive(Debug, Default)]
pub(crate) struct HotState {
    changes: Changes,
    /// The open transaction's number; a slot changed by an earlier one
    /// has its old value noted before it is changed.
    txn: u64,
    undo: Vec<Undo>,
    /// The undo log's keys, one after the other (no allocation per key).
    undo_keys: Vec<u8>,
    /// `changes` as it was when a checkpoint in the open transaction
    /// wrote it, and the undo log's length then.
    stash: Option<(Changes, usize)>,
}

impl HotState {
    /// Starts a transaction; whatever an unfinished one changed is undone.
    pub(crate) fn begin(&mut self) {
        if let Some((written, mark)) = self.stash.take() {
            // Changes after the checkpoint were made to a map that is
            // dropped now; the log before it refers to the written one.
            self.changes = written;
            self.undo.truncate(mark);
        }
        for undo in self.undo.drain(..).rev() {
            let key = &self.undo_keys[undo.key];
            match undo.before {
                None => {
                    self.changes.remove(key);
                }
                Some(value) => match self.changes.get_mut(key) {
                    Some(slot) => slot.value = value,
                    None => {
                        self.changes.insert(key.into(), Slot { value, txn: 0 });
                    }
                },
            }
        }
        self.undo_keys.clear();
        self.txn += 1;
    }

    /// The transaction committed: its changes stand, or, after a
    /// checkpoint, the changes it wrote are gone for good.
    pub(crate) fn commit(&mut self) {
        if let Some((mut written, _)) = self.stash.take() {
            // The checkpoint's changes are in LMDB now. Their map, grown
            // to a checkpoint's worth of keys, takes the next ones: a
            // fresh one would grow through every doubling again, on
            // memory the allocator may have handed back to the kernel.
            written.clear();
            written.extend(self.changes.drain());
            self.changes = written;
        }
        self.undo.clear();
        self.undo_keys.clear();
    }

    /// Keys changed since the last checkpoint, committed or not.
    pub(crate) fn keys(&self) -> usize {
        self.changes.len()
    }

    /// The value of `key` as the open transaction sees it: `Some(None)`
    /// when it was deleted, `None` when LMDB has the answer.
    pub(crate) fn lookup(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.changes.get(key).map(|slot| slot.value.as_deref())
    }

    /// Sets `key` in the open transaction.
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        let txn = self.txn;
        let before = match self.changes.get_mut(key) {
            Some(slot) if slot.txn == txn => {
                match &mut slot.value {
                    Some(held) => {
                        held.clear();
                        held.extend_from_slice(value);
                    }
                    deleted => *deleted = Some(value.to_vec()),
                }
                return;
            }
            Some(slot) => {
                slot.txn = txn;
                Some(slot.value.replace(value.to_vec()))
            }
            None => {
                let slot = Slot {
                    value: Some(value.to_vec()),
                    txn,
                };
                self.changes.insert(key.into(), slot);
                None
            }
        };
        self.note_undo(key, before);
    }

    /// Deletes `key` in the open transaction.
    pub(crate) fn delete(&mut self, key: &[u8]) {
        let txn = self.txn;
        let before = match self.changes.get_mut(key) {
            Some(slot) if slot.txn == txn => {
                slot.value = None;
                return;
            }
            Some(slot) => {
                slot.txn = txn;
                Some(slot.value.take())
            }
            None => {
                self.changes.insert(key.into(), Slot { value: None, txn });
                None
            }
        };
        self.note_undo(key, before);
    }

    fn note_undo(&mut self, key: &[u8], before: Option<Option<Vec<u8>>>) {
        let start = self.undo_keys.len();
        self.undo_keys.extend_from_slice(key);
        self.undo.push(Undo {
            key: start..self.undo_keys.len(),
            before,
        });
    }

    /// Writes every change back to `db` in key order, in the open
    /// transaction. Until that transaction commits, the changes are kept
    /// aside to be restored if it rolls back.
    pub(crate) fn write_back(
        &mut self,
        txn: &mut RwTxn,
        db: Database<Bytes, Bytes>,
    ) -> heed::Result<usize> {
        let mut sorted: Vec<_> = self
            .changes
            .iter()
            .map(|(k, slot)| (head(k), &**k, slot.value.as_deref()))
            .collect();
        // Keys are unique, so an unstable sort puts them in key order.
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let written = sorted.len();
        // Deletions (erasures) are rare: they follow the puts, which go
        // through one cursor.
        let mut deleted = Vec::new();
        let mut puts = SortedPuts::new(db, txn)?;
        for (_, key, value) in sorted {
            match value {
                Some(value) => puts.put(key, value)?,
                None => deleted.push(key),
            }
        }
        drop(puts);
        for key in deleted {
            db.delete(txn, key)?;
        }
        let changes = std::mem::take(&mut self.changes);
        // A second checkpoint in one transaction wrote only what changed
        // since the first; the first one's map is what a rollback
        // restores.
        if self.stash.is_none() {
            self.stash = Some((changes, self.undo.len()));
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
        for (k, slot) in self.hot.changes.iter() {
            if k.starts_with(prefix) {
                match &slot.value {
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
    use crate::store::env::{open_env, sync_flags};
    use edge_config::SyncMode;

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

    /// The two-layer semantics, written plainly: what LMDB and the
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
        fn the_undo_log_matches_a_model_of_committed_and_open_changes(
            ops in proptest::collection::vec(op(), 1..120)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let env = open_env(dir.path(), 1 << 20, sync_flags(SyncMode::None)).unwrap();
            let mut txn = env.write_txn().unwrap();
            let db: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("s")).unwrap();
            txn.commit().unwrap();
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
                proptest::prop_assert_eq!(hot.keys(), open.changes.len());
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

    #[test]
    fn changes_overlay_lmdb_roll_back_and_write_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let env = open_env(dir.path(), 1 << 20, sync_flags(SyncMode::None)).unwrap();
        let mut txn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("s")).unwrap();
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
