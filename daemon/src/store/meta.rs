//! Store-wide counters that must survive restarts: the next record
//! sequence, how far records were dropped, the outbox totals, and how the
//! store's sequence numbers map onto the central side's.
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
    /// Added to the store's sequence numbers on the way to the central
    /// side. Non-zero once the central side held sequences of this site
    /// that this store never sent (a rebuilt or restored site; see
    /// [`super::outbox::welcome`]).
    pub seq_offset: u64,
    /// Whether the central side has welcomed this store once. Until then
    /// every sequence the central side holds for the site came from
    /// another store.
    pub joined: bool,
    /// Whether a session has begun since the store was last opened.
    pub joined_since_open: bool,
    /// `next_seq` when the store was opened after its last session: the
    /// records before it may be in another copy of the store (a backup
    /// taken then), the records from it on are this copy's own.
    pub opened_at_seq: u64,
}

impl Meta {
    /// The central side's number for the store's sequence `local`.
    pub fn central_seq(&self, local: u64) -> u64 {
        local.saturating_add(self.seq_offset)
    }

    /// The store's number for the central side's sequence `central`; 0
    /// for sequences before this store's first record.
    pub fn local_seq(&self, central: u64) -> u64 {
        central.saturating_sub(self.seq_offset)
    }

    /// Called once per open: a store opened after a session marks where
    /// its own records begin.
    pub fn opened(&mut self) {
        if self.joined_since_open {
            self.opened_at_seq = self.next_seq;
            self.joined_since_open = false;
        }
    }

    /// `dropped_through` as the central side numbers it; 0 stays "none".
    pub fn central_dropped_through(&self) -> u64 {
        match self.dropped_through {
            0 => 0,
            local => self.central_seq(local),
        }
    }
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            next_seq: 1,
            dropped_through: 0,
            outbox_bytes: 0,
            outbox_records: 0,
            dlq_next: 1,
            seq_offset: 0,
            joined: false,
            joined_since_open: false,
            opened_at_seq: 1,
        }
    }
}

/// The counters as the first format held them.
#[derive(Serialize, Deserialize)]
struct MetaV1 {
    next_seq: u64,
    dropped_through: u64,
    outbox_bytes: u64,
    outbox_records: u64,
    dlq_next: u64,
}

/// Versioned wrapper: the discriminant is the format version.
#[derive(Serialize, Deserialize)]
enum Stored {
    V1(MetaV1),
    V2(Meta),
}

impl From<MetaV1> for Meta {
    /// A store of the first format was written by a release that did not
    /// record joining; it has had its sessions, so it counts as joined.
    fn from(v1: MetaV1) -> Meta {
        Meta {
            next_seq: v1.next_seq,
            dropped_through: v1.dropped_through,
            outbox_bytes: v1.outbox_bytes,
            outbox_records: v1.outbox_records,
            dlq_next: v1.dlq_next,
            seq_offset: 0,
            joined: true,
            joined_since_open: true,
            opened_at_seq: v1.next_seq,
        }
    }
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
            Ok(Stored::V1(meta)) => Ok(Some(meta.into())),
            Ok(Stored::V2(meta)) => Ok(Some(meta)),
            Err(e) => Err(MetaError::Format(e)),
        },
    }
}

pub(crate) fn save(db: Database<Str, Bytes>, txn: &mut RwTxn, meta: &Meta) -> heed::Result<()> {
    let bytes = postcard::to_allocvec(&Stored::V2(*meta))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_the_first_format_read_as_a_joined_store_without_offset() {
        let v1 = MetaV1 {
            next_seq: 42,
            dropped_through: 7,
            outbox_bytes: 900,
            outbox_records: 3,
            dlq_next: 5,
        };
        let bytes = postcard::to_allocvec(&Stored::V1(v1)).unwrap();
        let Stored::V1(read) = postcard::from_bytes::<Stored>(&bytes).unwrap() else {
            panic!("a first-format value reads as the first format");
        };
        let meta = Meta::from(read);
        assert_eq!((meta.next_seq, meta.dropped_through), (42, 7));
        assert_eq!(
            (meta.outbox_bytes, meta.outbox_records, meta.dlq_next),
            (900, 3, 5)
        );
        assert!(meta.joined);
        assert_eq!(meta.seq_offset, 0);
    }

    #[test]
    fn opening_after_a_session_marks_where_the_store_s_own_records_begin() {
        let mut meta = Meta {
            next_seq: 40,
            joined: true,
            joined_since_open: true,
            ..Meta::default()
        };
        meta.opened();
        assert_eq!((meta.opened_at_seq, meta.joined_since_open), (40, false));
        // Reopened before any session: the mark stays where it was.
        meta.next_seq = 90;
        meta.opened();
        assert_eq!(meta.opened_at_seq, 40);
    }

    #[test]
    fn a_fresh_store_has_not_joined() {
        let meta = Meta::default();
        assert!(!meta.joined);
        assert_eq!(meta.central_seq(1), 1);
    }

    #[test]
    fn sequences_translate_both_ways() {
        let meta = Meta {
            seq_offset: 100,
            ..Meta::default()
        };
        assert_eq!(meta.central_seq(1), 101);
        assert_eq!(meta.local_seq(101), 1);
        assert_eq!(meta.local_seq(60), 0, "before the store's first record");
    }
}
