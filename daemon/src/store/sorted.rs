//! Writing many keys in key order through one LMDB cursor.
//!
//! A checkpoint writes back every key changed since the last one (tens of
//! thousands at full load), sorted, so most keys land on the same leaf
//! page as the key before. `Database::put` opens a fresh cursor for each
//! call, and each fresh cursor searches from the root: a binary search per
//! level, and a look-up of each page in the transaction's dirty list. A
//! cursor that stays on the leaf it last wrote checks that leaf's first
//! and last keys before anything else, and when the next key falls
//! between them, it searches only that leaf.
//!
//! heed writes through a cursor only in `unsafe` functions (see
//! [`SortedPuts::put`]), so this module is one of the two places the
//! daemon allows `unsafe` (the other is the environment's open).

use heed::types::Bytes;
use heed::{Database, PutFlags, RwIter, RwTxn};

use super::keys::head;

/// Puts in ascending key order through one cursor, for as long as it
/// lives; the transaction is borrowed meanwhile.
pub(crate) struct SortedPuts<'t> {
    cursor: RwIter<'t, Bytes, Bytes>,
    #[cfg(debug_assertions)]
    last: Option<Vec<u8>>,
}

impl<'t> SortedPuts<'t> {
    pub(crate) fn new(db: Database<Bytes, Bytes>, txn: &'t mut RwTxn) -> heed::Result<Self> {
        Ok(SortedPuts {
            // Never advanced: the cursor only ever moves by the puts.
            cursor: db.iter_mut(txn)?,
            #[cfg(debug_assertions)]
            last: None,
        })
    }

    /// Puts `key` → `value`, replacing what is there. Keys must come in
    /// ascending order (debug builds check); one out of order would still
    /// be written correctly, only after a search from the root.
    #[allow(unsafe_code)]
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) -> heed::Result<()> {
        #[cfg(debug_assertions)]
        {
            debug_assert!(
                self.last.as_deref().is_none_or(|last| last < key),
                "sorted puts out of order"
            );
            self.last = Some(key.to_vec());
        }
        // SAFETY: heed marks cursor writes unsafe because a write may move
        // or free the pages that earlier reads through the same
        // transaction returned slices into. Nothing here holds such a
        // slice: `key` and `value` are the caller's memory, the cursor
        // is never advanced (so it never hands out a slice), and the
        // transaction stays mutably borrowed, so no other read can run,
        // for as long as this value lives. Without `CURRENT` in the flags
        // LMDB positions the cursor on `key` itself, so no key can be
        // written over another one.
        unsafe {
            self.cursor
                .put_current_with_options::<Bytes>(PutFlags::empty(), key, value)
        }
    }
}

/// One key of a write-back as it is sorted: its [`head`] (compared
/// first), the key, and its value (`None` deletes it).
pub(crate) type Order<'a> = (u128, &'a [u8], Option<&'a [u8]>);

/// Writes `changes` (key, value; `None` deletes the key) to `db` in key
/// order: the puts through one cursor, then the deletions, which are
/// rare (erasures, swept keys). Keys must be unique. `buffer` is the sort
/// buffer kept between write-backs (see [`spare`]). Returns how many
/// changes were written.
pub(crate) fn write_in_order<'a>(
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn,
    changes: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    buffer: &mut Vec<Order<'static>>,
) -> heed::Result<usize> {
    let mut order: Vec<Order<'a>> = std::mem::take(buffer);
    order.extend(changes.map(|(key, value)| (head(key), key, value)));
    // Keys are unique, so an unstable sort puts them in key order.
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    let mut deleted = Vec::new();
    let mut puts = SortedPuts::new(db, txn)?;
    for &(_, key, value) in &order {
        match value {
            Some(value) => puts.put(key, value)?,
            None => deleted.push(key),
        }
    }
    drop(puts);
    for key in deleted {
        db.delete(txn, key)?;
    }
    let written = order.len();
    *buffer = spare(order);
    Ok(written)
}

/// Empties a write-back's sort buffer and keeps its allocation for the
/// next write-back.
///
/// Why: the buffer holds every key written back (tens of thousands, 48
/// bytes each). Allocated anew at each checkpoint, it is fresh memory to
/// the kernel as well (mimalloc hands freed memory back to the kernel
/// after 10 ms by default, its purge delay, well within the checkpoint
/// interval), which the kernel zeroes page by page as the buffer fills.
/// In profiles of full-size pipeline runs that was 1 % of the writer's
/// time, half of it gone with the buffer kept (the
/// rest is the buffer growing over the first checkpoints). Kept, it
/// costs the largest write-back's worth of memory for as long as the
/// store is open.
///
/// The entries borrow the maps being written back, so the buffer cannot
/// be kept with their lifetime; the standard library collects an emptied
/// vector into one of an element of the same layout in place, which
/// turns it into a buffer that borrows nothing. Were that ever to
/// allocate instead, the next write-back would only be as slow as before.
fn spare(mut order: Vec<Order<'_>>) -> Vec<Order<'static>> {
    order.clear();
    order
        .into_iter()
        .map(|(head, _, _)| (head, &[][..], None))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::env::scratch_table;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Whatever the table held before, sorted puts leave it holding
        /// exactly what plain puts would: new keys inserted between old
        /// ones, old keys replaced with longer and shorter values, pages
        /// split along the way, and nothing else touched.
        #[test]
        fn sorted_puts_leave_what_plain_puts_would(
            before in prop::collection::btree_map(
                prop::collection::vec(0u8..4, 1..24), prop::collection::vec(any::<u8>(), 0..300), 0..400),
            puts in prop::collection::btree_map(
                prop::collection::vec(0u8..4, 1..24), prop::collection::vec(any::<u8>(), 0..300), 0..400),
        ) {
            let (_dir, env, db) = scratch_table(1 << 26);
            let mut txn = env.write_txn().unwrap();
            for (k, v) in &before {
                db.put(&mut txn, k, v).unwrap();
            }
            txn.commit().unwrap();

            let mut txn = env.write_txn().unwrap();
            let mut sorted = SortedPuts::new(db, &mut txn).unwrap();
            for (k, v) in &puts {
                sorted.put(k, v).unwrap();
            }
            drop(sorted);
            txn.commit().unwrap();

            let mut expected = before.clone();
            expected.extend(puts.clone());
            let txn = env.read_txn().unwrap();
            let held: BTreeMap<Vec<u8>, Vec<u8>> = db
                .iter(&txn)
                .unwrap()
                .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                .collect();
            prop_assert_eq!(held, expected);
        }
    }

    #[test]
    fn a_spare_buffer_keeps_its_allocation() {
        let keys: Vec<Vec<u8>> = (0u32..1000).map(|i| i.to_be_bytes().to_vec()).collect();
        let order: Vec<Order<'_>> = keys.iter().map(|k| (0, &k[..], None)).collect();
        let capacity = order.capacity();
        let spare = spare(order);
        assert!(spare.is_empty());
        assert_eq!(
            spare.capacity(),
            capacity,
            "the next write-back would allocate its buffer anew"
        );
    }

    #[test]
    fn a_full_map_is_an_error_and_the_transaction_can_still_abort() {
        let (_dir, env, db) = scratch_table(1 << 20);

        let mut txn = env.write_txn().unwrap();
        let mut sorted = SortedPuts::new(db, &mut txn).unwrap();
        let value = vec![7u8; 1000];
        let full = (0u32..10_000).find_map(|i| sorted.put(&i.to_be_bytes(), &value).err());
        assert!(
            matches!(full, Some(heed::Error::Mdb(heed::MdbError::MapFull))),
            "{full:?}"
        );
        drop(sorted);
        txn.abort();
        let txn = env.read_txn().unwrap();
        assert_eq!(
            db.len(&txn).unwrap(),
            0,
            "nothing of the aborted puts stays"
        );
    }
}
