//! Store-wide counters that must survive restarts: the next record
//! sequence, how far records were dropped, the outbox totals.
//!
//! They live in one small postcard value written in the same transaction
//! as the changes they count, so they can never disagree with the data
//! after a crash.

use heed::types::{Bytes, Str};
use heed::{Database, RoTxn, RwTxn, WithoutTls};
use serde::{Deserialize, Serialize};

const KEY_COUNTERS: &str = "counters";
const KEY_SITE: &str = "site";

/// The persisted counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// Sequence the next outbox record gets; starts at 1, never reused.
    pub next_seq: u64,
    /// Highest sequence given up on by `drop-oldest`; 0 when none.
    pub dropped_through: u64,
    /// Sum of the encoded sizes of the records in the outbox.
    pub outbox_bytes: u64,
    /// Records in the outbox.
    pub outbox_records: u64,
    /// Key the next dead letter gets.
    pub dlq_next: u64,
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            next_seq: 1,
            dropped_through: 0,
            outbox_bytes: 0,
            outbox_records: 0,
            dlq_next: 1,
        }
    }
}

/// Versioned wrapper: the discriminant is the format version.
#[derive(Serialize, Deserialize)]
enum Stored {
    V1(Meta),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MetaError {
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
    #[error("store metadata is unreadable ({0}); written by a newer Touchline?")]
    Format(postcard::Error),
}

/// Reads the counters; defaults for a fresh store.
pub(crate) fn load(
    db: Database<Str, Bytes>,
    txn: &RoTxn<WithoutTls>,
) -> Result<Option<Meta>, MetaError> {
    match db.get(txn, KEY_COUNTERS)? {
        None => Ok(None),
        Some(bytes) => match postcard::from_bytes::<Stored>(bytes) {
            Ok(Stored::V1(meta)) => Ok(Some(meta)),
            Err(e) => Err(MetaError::Format(e)),
        },
    }
}

pub(crate) fn save(db: Database<Str, Bytes>, txn: &mut RwTxn, meta: &Meta) -> heed::Result<()> {
    let bytes = postcard::to_allocvec(&Stored::V1(*meta))
        .map_err(|e| heed::Error::Encoding(Box::new(e)))?;
    db.put(txn, KEY_COUNTERS, &bytes)
}

/// The site id the store was created for, if recorded.
pub(crate) fn site(
    db: Database<Str, Bytes>,
    txn: &RoTxn<WithoutTls>,
) -> heed::Result<Option<String>> {
    Ok(db
        .get(txn, KEY_SITE)?
        .map(|b| String::from_utf8_lossy(b).into_owned()))
}

pub(crate) fn set_site(db: Database<Str, Bytes>, txn: &mut RwTxn, site: &str) -> heed::Result<()> {
    db.put(txn, KEY_SITE, site.as_bytes())
}
