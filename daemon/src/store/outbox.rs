//! The outbox: records waiting for the central platform's acknowledgement.
//!
//! Records are appended in the same transaction as the events that produced
//! them, under a per-site sequence that only grows (it survives acks,
//! drops and restarts, so the central side can deduplicate by it). The byte
//! total is kept in [`Meta`] in the same transaction, so the bound is
//! checked without scanning.
//!
//! The central side knows a site by its id, not by its store. A store
//! that starts over under a known id (the disk replaced, the data
//! directory wiped, a backup restored) would number its records from
//! where it stands, and the central side would take them for records it
//! already holds. [`welcome`] compares the central side's mark with what
//! this store could have sent and, where the mark is beyond it, moves the
//! store's numbering after the mark ([`Meta::seq_offset`]): the store keeps
//! its own sequence, and only what goes on the wire is renumbered.

use heed::{RoTxn, RwTxn, WithoutTls};
use touchline_proto::{Record, RecordBody};

use super::codec::BeU64;
use super::env::Dbs;
use super::meta::Meta;
use heed::types::Bytes;
use heed::Database;

/// Reused encode buffer for appends.
#[derive(Default)]
pub(crate) struct Outbox {
    buf: Vec<u8>,
}

impl Outbox {
    /// Appends one record with the next sequence number and returns it.
    pub(crate) fn append(
        &mut self,
        dbs: &Dbs,
        txn: &mut RwTxn,
        meta: &mut Meta,
        site: &str,
        at_ms: i64,
        body: RecordBody,
    ) -> heed::Result<u64> {
        let seq = meta.next_seq;
        let record = Record {
            site: site.to_owned(),
            seq,
            at_ms,
            body,
        };
        self.buf.clear();
        let buf = std::mem::take(&mut self.buf);
        self.buf =
            postcard::to_extend(&record, buf).map_err(|e| heed::Error::Encoding(Box::new(e)))?;
        super::append::put(dbs.outbox, txn, &seq, &self.buf)?;
        meta.next_seq = seq + 1;
        meta.outbox_bytes += self.buf.len() as u64;
        meta.outbox_records += 1;
        Ok(seq)
    }
}

/// Why a store's records were renumbered for the central side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebaseCause {
    /// The store had never been welcomed, yet the central side held
    /// records of the site: another store's. Everything this store holds
    /// goes after them.
    NewStore,
    /// The central side held sequences beyond any this store numbered:
    /// the store is a restored backup or a copy. The records it held
    /// when it was opened are taken to have been sent by the store it was
    /// copied from; the ones it made since go after the mark.
    StoreBehind,
}

/// A renumbering decided at a Welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebase {
    pub cause: RebaseCause,
    /// The central side's mark the store's records now follow.
    pub central_mark: u64,
    /// The new difference between the central side's numbers and the
    /// store's.
    pub offset: u64,
    /// Records the store held that go out after the mark.
    pub queued: u64,
    /// Records the store held that were deleted as the central side's
    /// ([`RebaseCause::StoreBehind`] only).
    pub superseded: u64,
}

/// The offset the store's numbering needs once the central side says it
/// holds the site's records up to `central_mark`, or `None` when the
/// numbering is right. `first_queued` is the store's oldest record in the
/// outbox (`next_seq` when it is empty).
pub(crate) fn rebase_offset(
    meta: &Meta,
    first_queued: u64,
    central_mark: u64,
) -> Option<(u64, RebaseCause)> {
    if !meta.joined {
        // Nothing the central side holds came from this store, so its
        // oldest record must follow the mark.
        let before_first = first_queued.saturating_sub(1);
        (central_mark > meta.central_seq(before_first))
            .then(|| (central_mark - before_first, RebaseCause::NewStore))
    } else {
        // In one store's history the central side can only be behind it;
        // ahead means another history, which shares this store's past up
        // to where the copy was taken: at the latest when it was opened
        // after its last session.
        let highest = meta.central_seq(meta.next_seq.saturating_sub(1));
        let shared = meta.opened_at_seq.saturating_sub(1);
        (central_mark > highest).then(|| (central_mark - shared, RebaseCause::StoreBehind))
    }
}

/// Takes the central side's Welcome: renumbers when the mark is beyond
/// what this store could have sent (see [`rebase_offset`]), records that
/// the store has joined, and deletes what the central side holds.
pub(crate) fn welcome(
    dbs: &Dbs,
    txn: &mut RwTxn,
    meta: &mut Meta,
    central_mark: u64,
) -> heed::Result<(u64, Option<Rebase>)> {
    let first_queued = dbs.outbox.first(txn)?.map_or(meta.next_seq, |(seq, _)| seq);
    let decided = rebase_offset(meta, first_queued, central_mark);
    let records_before = meta.outbox_records;
    if let Some((offset, _)) = decided {
        meta.seq_offset = offset;
    }
    meta.joined = true;
    meta.joined_since_open = true;
    let acked = ack(dbs, txn, meta, meta.local_seq(central_mark))?;
    let rebase = decided.map(|(offset, cause)| Rebase {
        cause,
        central_mark,
        offset,
        queued: records_before.saturating_sub(acked),
        superseded: acked,
    });
    Ok((acked, rebase))
}

/// Deletes every record with a sequence up to `through`; returns how many.
pub(crate) fn ack(dbs: &Dbs, txn: &mut RwTxn, meta: &mut Meta, through: u64) -> heed::Result<u64> {
    let (count, bytes) = span(dbs.outbox, txn, through)?;
    if count > 0 {
        dbs.outbox.delete_range(txn, &(..=through))?;
        meta.outbox_records = meta.outbox_records.saturating_sub(count);
        meta.outbox_bytes = meta.outbox_bytes.saturating_sub(bytes);
    }
    Ok(count)
}

/// What [`Outbox::drop_oldest`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Records given up on.
    pub records: u64,
    /// Erasure records in the dropped range, appended again.
    pub erasures_kept: u64,
}

impl Outbox {
    /// Drops the oldest records until the outbox holds at most
    /// `max_bytes`, and declares them a gap (`dropped_through`).
    ///
    /// Erasure records are not given up: the central side must still
    /// delete what it holds of the customer, so each one in the dropped
    /// range is appended again with a new sequence. That puts it after
    /// any record the customer made since, which the central side then
    /// deletes with the rest. An outbox of nothing but erasure records is
    /// left over its bound.
    pub(crate) fn drop_oldest(
        &mut self,
        dbs: &Dbs,
        txn: &mut RwTxn,
        meta: &mut Meta,
        max_bytes: u64,
    ) -> heed::Result<Option<Dropped>> {
        if meta.outbox_bytes <= max_bytes {
            return Ok(None);
        }
        let excess = meta.outbox_bytes - max_bytes;
        let (mut freed, mut removed_bytes) = (0u64, 0u64);
        let (mut given_up, mut removed) = (0u64, 0u64);
        let mut last = 0u64;
        let mut erasures = Vec::new();
        for entry in dbs.outbox.iter(txn)? {
            let (seq, value) = entry?;
            removed_bytes += value.len() as u64;
            removed += 1;
            last = seq;
            match postcard::from_bytes::<Record>(value) {
                Ok(record) if matches!(record.body, RecordBody::CustomerErased(_)) => {
                    erasures.push(record);
                }
                _ => {
                    freed += value.len() as u64;
                    given_up += 1;
                    if freed >= excess {
                        break;
                    }
                }
            }
        }
        if given_up == 0 {
            return Ok(None);
        }
        dbs.outbox.delete_range(txn, &(..=last))?;
        meta.outbox_records = meta.outbox_records.saturating_sub(removed);
        meta.outbox_bytes = meta.outbox_bytes.saturating_sub(removed_bytes);
        meta.dropped_through = meta.dropped_through.max(last);
        let erasures_kept = erasures.len() as u64;
        for record in erasures {
            self.append(dbs, txn, meta, &record.site, record.at_ms, record.body)?;
        }
        Ok(Some(Dropped {
            records: given_up,
            erasures_kept,
        }))
    }
}

/// Counts records and bytes with a sequence up to `through`.
fn span(
    db: Database<BeU64, Bytes>,
    txn: &RoTxn<WithoutTls>,
    through: u64,
) -> heed::Result<(u64, u64)> {
    let mut count = 0u64;
    let mut bytes = 0u64;
    for entry in db.range(txn, &(..=through))? {
        let (_, value) = entry?;
        count += 1;
        bytes += value.len() as u64;
    }
    Ok((count, bytes))
}

/// Why a read of the outbox failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
    #[error("outbox record {seq} is unreadable: {source}")]
    Decode { seq: u64, source: postcard::Error },
}

/// Records after `after`, in order, at most `max_records` and about
/// `max_bytes` (always at least one record when any is there, so a record
/// larger than `max_bytes` cannot stall the uplink).
pub(crate) fn read(
    db: Database<BeU64, Bytes>,
    txn: &RoTxn<WithoutTls>,
    after: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<Record>, ReadError> {
    let mut records = Vec::new();
    if max_records == 0 || after == u64::MAX {
        return Ok(records);
    }
    let mut bytes = 0usize;
    for entry in db.range(txn, &((after + 1)..))? {
        let (seq, value) = entry?;
        if !records.is_empty() && bytes + value.len() > max_bytes {
            break;
        }
        let record: Record =
            postcard::from_bytes(value).map_err(|source| ReadError::Decode { seq, source })?;
        bytes += value.len();
        records.push(record);
        if records.len() >= max_records {
            break;
        }
    }
    Ok(records)
}

/// A snapshot of the outbox for status output, numbered as the central
/// side numbers it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxSummary {
    /// Records waiting for acknowledgement.
    pub records: u64,
    /// Their encoded size in bytes.
    pub bytes: u64,
    /// Sequence of the oldest waiting record.
    pub oldest_seq: Option<u64>,
    /// Event time of the oldest waiting record (ms since the epoch); its age
    /// is how far behind the central platform is.
    pub oldest_at_ms: Option<i64>,
    /// Sequence the next record will get.
    pub next_seq: u64,
    /// Highest sequence dropped by `drop-oldest`; 0 when none.
    pub dropped_through: u64,
}

pub(crate) fn summary(
    db: Option<Database<BeU64, Bytes>>,
    txn: &RoTxn<WithoutTls>,
    meta: &Meta,
) -> Result<OutboxSummary, ReadError> {
    let mut oldest_seq = None;
    let mut oldest_at_ms = None;
    if let Some(db) = db {
        if let Some((seq, value)) = db.first(txn)? {
            let record: Record =
                postcard::from_bytes(value).map_err(|source| ReadError::Decode { seq, source })?;
            oldest_seq = Some(meta.central_seq(seq));
            oldest_at_ms = Some(record.at_ms);
        }
    }
    Ok(OutboxSummary {
        records: meta.outbox_records,
        bytes: meta.outbox_bytes,
        oldest_seq,
        oldest_at_ms,
        next_seq: meta.central_seq(meta.next_seq),
        dropped_through: meta.central_dropped_through(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A store opened at `next_seq` after its last session.
    fn store(joined: bool, seq_offset: u64, next_seq: u64) -> Meta {
        Meta {
            joined,
            seq_offset,
            next_seq,
            opened_at_seq: next_seq,
            ..Meta::default()
        }
    }

    #[test]
    fn a_new_store_under_a_known_site_follows_the_central_mark() {
        // Nothing queued yet.
        let meta = store(false, 0, 1);
        assert_eq!(
            rebase_offset(&meta, 1, 50),
            Some((50, RebaseCause::NewStore))
        );
        // Records 1..=80 queued before the first session: all are new.
        let meta = store(false, 0, 81);
        assert_eq!(
            rebase_offset(&meta, 1, 50),
            Some((50, RebaseCause::NewStore))
        );
    }

    #[test]
    fn a_new_store_needs_nothing_when_its_records_already_follow_the_mark() {
        // Records up to 100 were dropped before the first session.
        let meta = store(false, 0, 121);
        assert_eq!(rebase_offset(&meta, 101, 50), None);
        assert_eq!(rebase_offset(&store(false, 0, 9), 1, 0), None);
    }

    #[test]
    fn a_joined_store_is_left_alone_while_the_mark_is_within_its_history() {
        let meta = store(true, 0, 1001);
        for mark in [0, 10, 999, 1000] {
            assert_eq!(rebase_offset(&meta, 900, mark), None, "mark {mark}");
        }
        // Sessions before the first format recorded joining count as joined.
        assert_eq!(rebase_offset(&store(true, 0, 1), 1, 0), None);
    }

    #[test]
    fn a_store_behind_the_central_mark_continues_after_it() {
        let meta = store(true, 0, 1001);
        assert_eq!(
            rebase_offset(&meta, 900, 1500),
            Some((500, RebaseCause::StoreBehind))
        );
        // Already renumbered once: the offset grows by what it is behind.
        let meta = store(true, 50, 1001);
        assert_eq!(
            rebase_offset(&meta, 900, 1500),
            Some((500, RebaseCause::StoreBehind))
        );
        // Records made since the copy was opened are its own: they go
        // after the mark, not in with what the original sent.
        let meta = Meta {
            next_seq: 1021,
            ..store(true, 0, 1001)
        };
        assert_eq!(
            rebase_offset(&meta, 900, 1500),
            Some((500, RebaseCause::StoreBehind))
        );
    }

    proptest! {
        /// Whatever the central mark, the store's next record goes out
        /// after it; a new store's queued records all do; and a store
        /// whose history holds the mark is never renumbered.
        #[test]
        fn after_a_welcome_nothing_goes_out_under_a_held_number(
            joined in any::<bool>(),
            seq_offset in 0u64..1_000,
            next_seq in 1u64..10_000,
            queued_back in 0u64..10_000,
            made_since_open in 0u64..10_000,
            mark in 0u64..20_000,
        ) {
            let seq_offset = if joined { seq_offset } else { 0 };
            let first_queued = next_seq - queued_back.min(next_seq - 1);
            let opened_at_seq = next_seq - made_since_open.min(next_seq - 1);
            let mut meta = Meta { opened_at_seq, ..store(joined, seq_offset, next_seq) };
            let decided = rebase_offset(&meta, first_queued, mark);
            let highest = meta.central_seq(next_seq - 1);
            if let Some((offset, _)) = decided {
                meta.seq_offset = offset;
            }
            prop_assert!(meta.central_seq(next_seq) > mark);
            if !joined {
                prop_assert!(meta.central_seq(first_queued) > mark);
            } else if mark <= highest {
                prop_assert_eq!(decided, None);
            } else {
                // A copy's own records follow the mark; the shared past
                // falls at or below it.
                prop_assert_eq!(meta.central_seq(opened_at_seq), mark + 1);
            }
        }
    }
}
