//! The outbox: records waiting for the central platform's acknowledgement.
//!
//! Records are appended in the same transaction as the events that produced
//! them, under a per-site sequence that only grows (it survives acks,
//! drops and restarts, so the central side can deduplicate by it). The byte
//! total is kept in [`Meta`] in the same transaction, so the bound is
//! checked without scanning.

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

/// Drops the oldest records until the outbox holds at most `max_bytes`.
/// Returns how many were dropped and the highest dropped sequence.
pub(crate) fn drop_oldest(
    dbs: &Dbs,
    txn: &mut RwTxn,
    meta: &mut Meta,
    max_bytes: u64,
) -> heed::Result<Option<(u64, u64)>> {
    if meta.outbox_bytes <= max_bytes {
        return Ok(None);
    }
    let excess = meta.outbox_bytes - max_bytes;
    let mut freed = 0u64;
    let mut count = 0u64;
    let mut last = 0u64;
    for entry in dbs.outbox.iter(txn)? {
        let (seq, value) = entry?;
        freed += value.len() as u64;
        count += 1;
        last = seq;
        if freed >= excess {
            break;
        }
    }
    if count == 0 {
        return Ok(None);
    }
    dbs.outbox.delete_range(txn, &(..=last))?;
    meta.outbox_records = meta.outbox_records.saturating_sub(count);
    meta.outbox_bytes = meta.outbox_bytes.saturating_sub(freed);
    meta.dropped_through = meta.dropped_through.max(last);
    Ok(Some((count, last)))
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

/// A snapshot of the outbox for status output.
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
            oldest_seq = Some(seq);
            oldest_at_ms = Some(record.at_ms);
        }
    }
    Ok(OutboxSummary {
        records: meta.outbox_records,
        bytes: meta.outbox_bytes,
        oldest_seq,
        oldest_at_ms,
        next_seq: meta.next_seq,
        dropped_through: meta.dropped_through,
    })
}
