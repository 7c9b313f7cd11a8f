//! Duplicate detection by (`source`, `id`) within a retention period.
//!
//! Publishers retry (MQTT redelivery, HTTP clients after a timeout), so the
//! same event may arrive several times; only its first arrival may count.
//! `dedup` maps the key to its first-seen time; `dedup_expiry` orders the
//! same keys by that time so old ones can be swept a bounded number at a
//! time, inside the writer's normal commits.

use std::ops::Bound;

use heed::RwTxn;

use super::env::Dbs;
use super::keys::KeyBuf;

/// Natural dedup keys above this are hashed, so that `time ‖ key` in the
/// expiry index stays below LMDB's 511-byte key limit.
const MAX_DEDUP_KEY: usize = 256;

/// Reused buffers for dedup keys.
#[derive(Default)]
pub(crate) struct Dedup {
    key: KeyBuf,
    expiry_key: Vec<u8>,
    sweep_keys: Vec<u8>,
    sweep_offsets: Vec<(usize, usize, u64)>,
}

impl Dedup {
    /// Records the event's key unless it was seen within `retention_ms`;
    /// returns true for a duplicate. `now_ms` is the arrival time at the
    /// writer, so the retention is measured on our clock, not the
    /// publisher's.
    pub(crate) fn check_and_insert(
        &mut self,
        dbs: &Dbs,
        txn: &mut RwTxn,
        source: &str,
        id: &str,
        now_ms: i64,
        retention_ms: i64,
    ) -> heed::Result<bool> {
        let key = self.key.start(source).rest(id).finish(MAX_DEDUP_KEY);
        let now = clamp_time(now_ms);
        // One B-tree descent for a new key (the common case): insert
        // unless present, and learn what was there.
        if let Some(first_seen) = dbs.dedup.get_or_put(txn, key, &now)? {
            // A key past its retention but not swept yet is not a duplicate.
            if (now as i128) - (first_seen as i128) < i128::from(retention_ms) {
                return Ok(true);
            }
            dbs.dedup.put(txn, key, &now)?;
        }
        self.expiry_key.clear();
        self.expiry_key.extend_from_slice(&now.to_be_bytes());
        self.expiry_key.extend_from_slice(key);
        dbs.dedup_expiry.put(txn, &self.expiry_key, &())?;
        Ok(false)
    }

    /// Removes at most `budget` keys first seen before `now_ms -
    /// retention_ms`. Returns how many were removed and whether more
    /// expired keys remain.
    pub(crate) fn sweep(
        &mut self,
        dbs: &Dbs,
        txn: &mut RwTxn,
        now_ms: i64,
        retention_ms: i64,
        budget: usize,
    ) -> heed::Result<(usize, bool)> {
        let cutoff = clamp_time(now_ms.saturating_sub(retention_ms));
        self.sweep_keys.clear();
        self.sweep_offsets.clear();
        let mut more = false;
        for entry in dbs.dedup_expiry.iter(txn)? {
            let (ekey, ()) = entry?;
            let Some(time) = expiry_time(ekey) else {
                // Not written by us; drop it with the rest of the range.
                self.sweep_offsets
                    .push((self.sweep_keys.len(), 0, u64::MAX));
                self.sweep_keys.extend_from_slice(ekey);
                continue;
            };
            if time >= cutoff {
                break;
            }
            if self.sweep_offsets.len() == budget {
                more = true;
                break;
            }
            let start = self.sweep_keys.len();
            self.sweep_keys.extend_from_slice(ekey);
            self.sweep_offsets.push((start, ekey.len(), time));
        }
        let Some(&(last_start, _, _)) = self.sweep_offsets.last() else {
            return Ok((0, false));
        };
        let last_key = &self.sweep_keys[last_start..];
        for &(start, len, time) in &self.sweep_offsets {
            if len < 8 {
                continue;
            }
            let key = &self.sweep_keys[start + 8..start + len];
            // Only remove the dedup entry if it is the one this expiry entry
            // was written for; a key re-seen after expiry has a newer time.
            if dbs.dedup.get(txn, key)? == Some(time) {
                dbs.dedup.delete(txn, key)?;
            }
        }
        let removed = self.sweep_offsets.len();
        dbs.dedup_expiry
            .delete_range(txn, &(Bound::Unbounded, Bound::Included(last_key)))?;
        Ok((removed, more))
    }
}

fn clamp_time(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

fn expiry_time(ekey: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = ekey.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}
