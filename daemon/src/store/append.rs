//! Appending to tables whose keys grow.
//!
//! The outbox, the publication queue, the journal, offer instances and
//! their expiry timers, and dedup expiry entries are written in key order
//! almost always. LMDB's plain put searches the tree and splits a full
//! page in the middle, so such a table ends up with half-empty pages:
//! twice the pages to copy, write and sync. An append skips the search
//! and starts a fresh page instead, leaving the full one full. When a key
//! does not sort after the last one (a clock step, a counter gaining a
//! digit), LMDB refuses the append before changing anything and the
//! ordinary put takes over.

use heed::{BytesEncode, Database, MdbError, PutFlags, RwTxn};

/// Puts `key` → `value`, as an append when `key` sorts after every key
/// already in `db`.
pub(crate) fn put<'a, KC, DC>(
    db: Database<KC, DC>,
    txn: &mut RwTxn,
    key: &'a KC::EItem,
    value: &'a DC::EItem,
) -> heed::Result<()>
where
    KC: BytesEncode<'a>,
    DC: BytesEncode<'a>,
{
    append_or(db, txn, key, value, PutFlags::empty())
}

/// [`put`] for a key that must not replace another: false, and nothing
/// written, when `key` is already in `db`.
pub(crate) fn put_new<'a, KC, DC>(
    db: Database<KC, DC>,
    txn: &mut RwTxn,
    key: &'a KC::EItem,
    value: &'a DC::EItem,
) -> heed::Result<bool>
where
    KC: BytesEncode<'a>,
    DC: BytesEncode<'a>,
{
    match append_or(db, txn, key, value, PutFlags::NO_OVERWRITE) {
        Ok(()) => Ok(true),
        Err(heed::Error::Mdb(MdbError::KeyExist)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// An append, or when LMDB refuses it (the key does not sort last), a
/// put with `fallback`'s flags.
fn append_or<'a, KC, DC>(
    db: Database<KC, DC>,
    txn: &mut RwTxn,
    key: &'a KC::EItem,
    value: &'a DC::EItem,
    fallback: PutFlags,
) -> heed::Result<()>
where
    KC: BytesEncode<'a>,
    DC: BytesEncode<'a>,
{
    match db.put_with_flags(txn, PutFlags::APPEND, key, value) {
        Err(heed::Error::Mdb(MdbError::KeyExist)) => db.put_with_flags(txn, fallback, key, value),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use heed::types::Bytes;

    use super::*;

    #[test]
    fn keys_out_of_order_still_land_and_the_transaction_commits() {
        let dir = tempfile::tempdir().unwrap();
        let env =
            super::super::env::open_env(dir.path(), 1 << 24, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("t")).unwrap();
        for k in [b"b", b"c", b"a", b"d", b"c"] {
            put(db, &mut txn, k.as_slice(), k.as_slice()).unwrap();
        }
        txn.commit().unwrap();

        let txn = env.read_txn().unwrap();
        let keys: Vec<Vec<u8>> = db
            .iter(&txn)
            .unwrap()
            .map(|e| e.unwrap().0.to_vec())
            .collect();
        assert_eq!(keys, [b"a", b"b", b"c", b"d"]);
    }

    #[test]
    fn a_new_key_never_replaces_one_already_there() {
        let dir = tempfile::tempdir().unwrap();
        let env =
            super::super::env::open_env(dir.path(), 1 << 24, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("t")).unwrap();
        // Last, out of order, and already there (last and not last).
        let writes: [(&[u8], &[u8], bool); 5] = [
            (b"b", b"1", true),
            (b"a", b"2", true),
            (b"b", b"3", false),
            (b"c", b"4", true),
            (b"a", b"5", false),
        ];
        for (k, v, new) in writes {
            assert_eq!(put_new(db, &mut txn, k, v).unwrap(), new, "{k:?}");
        }
        let entries: Vec<(Vec<u8>, Vec<u8>)> = db
            .iter(&txn)
            .unwrap()
            .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = [(b"a", b"2"), (b"b", b"1"), (b"c", b"4")]
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(entries, want);
    }
}
