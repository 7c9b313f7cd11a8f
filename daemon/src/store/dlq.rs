//! The dead-letter store: a bounded sample of rejected input.
//!
//! Operators need to see *why* input was rejected without the daemon
//! logging every bad event; a fixed number of samples is kept, the oldest
//! evicted first, and `touchline dlq` reads them from another process.

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn, WithoutTls};

use super::codec::{BeU64, Postcard};
use super::env::Dbs;
use super::meta::Meta;
use crate::event::DeadLetter;

/// Longest sample kept, in bytes; ingest already cuts samples to this.
const MAX_SAMPLE: usize = 1024;

/// Stores one sample and evicts the oldest ones beyond `max`.
pub(crate) fn put(
    dbs: &Dbs,
    txn: &mut RwTxn,
    meta: &mut Meta,
    sample: &DeadLetter,
    max: usize,
) -> heed::Result<()> {
    if max == 0 {
        return Ok(());
    }
    let key = meta.dlq_next;
    meta.dlq_next += 1;
    if sample.sample.len() > MAX_SAMPLE {
        let mut cut = sample.clone();
        let mut end = MAX_SAMPLE;
        while !cut.sample.is_char_boundary(end) {
            end -= 1;
        }
        cut.sample.truncate(end);
        dbs.dead_letters.put(txn, &key, &cut)?;
    } else {
        dbs.dead_letters.put(txn, &key, sample)?;
    }
    let mut len = dbs.dead_letters.len(txn)?;
    while len > max as u64 {
        let raw = dbs.dead_letters.remap_data_type::<Bytes>();
        let Some((oldest, _)) = raw.first(txn)? else {
            break;
        };
        raw.delete(txn, &oldest)?;
        len -= 1;
    }
    Ok(())
}

/// The newest `limit` samples, oldest first. Undecodable samples are
/// skipped: they are diagnostics, not data.
pub(crate) fn read(
    db: Database<BeU64, Postcard<DeadLetter>>,
    txn: &RoTxn<WithoutTls>,
    limit: usize,
) -> heed::Result<Vec<DeadLetter>> {
    let mut out = Vec::with_capacity(limit.min(1024));
    for entry in db.rev_iter(txn)? {
        if out.len() >= limit {
            break;
        }
        match entry {
            Ok((_, sample)) => out.push(sample),
            Err(heed::Error::Decoding(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    out.reverse();
    Ok(out)
}

/// Deletes every sample whose input or detail mentions `text` (a
/// customer being erased). May delete a little more than needed, never
/// less. Undecodable samples cannot be checked and are left; they
/// age out like every sample.
pub(crate) fn erase_mentions(dbs: &Dbs, txn: &mut RwTxn, text: &str) -> heed::Result<u64> {
    let mut doomed = Vec::new();
    for entry in dbs.dead_letters.iter(txn)? {
        match entry {
            Ok((key, sample)) => {
                if sample.sample.contains(text) || sample.detail.contains(text) {
                    doomed.push(key);
                }
            }
            Err(heed::Error::Decoding(_)) => {}
            Err(e) => return Err(e),
        }
    }
    for key in &doomed {
        dbs.dead_letters.delete(txn, key)?;
    }
    Ok(doomed.len() as u64)
}
