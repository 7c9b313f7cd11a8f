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

/// Deletes every sample whose input, detail or origin (an MQTT topic
/// can name the customer) mentions `text` (a customer being erased), as
/// it is or as JSON escapes it in the input. May delete a little more
/// than needed, never less. Undecodable samples cannot be checked and
/// are left; they age out like every sample.
pub(crate) fn erase_mentions(dbs: &Dbs, txn: &mut RwTxn, text: &str) -> heed::Result<u64> {
    // `"a\"b"` → `a\"b`: how the id reads inside a JSON string.
    let escaped = serde_json::to_string(text).unwrap_or_default();
    let escaped = escaped
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .filter(|s| *s != text);
    let mut doomed = Vec::new();
    for entry in dbs.dead_letters.iter(txn)? {
        match entry {
            Ok((key, sample)) => {
                let mentions = |t: &str| {
                    sample.sample.contains(t)
                        || sample.detail.contains(t)
                        || sample.origin.contains(t)
                };
                if mentions(text) || escaped.is_some_and(mentions) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::env::open_env;

    fn letter(sample: &str) -> DeadLetter {
        DeadLetter {
            at_ms: 0,
            origin: "http:127.0.0.1:1".into(),
            reason: "bad_time".into(),
            detail: "time is not RFC 3339".into(),
            sample: sample.into(),
        }
    }

    /// An id with characters JSON escapes is found as the input spells
    /// it, escaped.
    #[test]
    fn an_id_is_found_as_json_escapes_it() {
        let dir = tempfile::tempdir().unwrap();
        let env = open_env(dir.path(), 1 << 20, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let dbs = Dbs::create(&env, &mut txn).unwrap();
        let mut meta = Meta::default();
        put(
            &dbs,
            &mut txn,
            &mut meta,
            &letter(r#"{"subject":"fan\"1"}"#),
            10,
        )
        .unwrap();
        put(
            &dbs,
            &mut txn,
            &mut meta,
            &letter(r#"{"subject":"fan-2"}"#),
            10,
        )
        .unwrap();
        assert_eq!(erase_mentions(&dbs, &mut txn, "fan\"1").unwrap(), 1);
        assert_eq!(dbs.dead_letters.len(&txn).unwrap(), 1);
        assert_eq!(erase_mentions(&dbs, &mut txn, "fan-2").unwrap(), 1);
    }
}
