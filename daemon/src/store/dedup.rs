//! Duplicate detection by (`source`, `id`) within a retention period.
//!
//! Publishers retry (MQTT redelivery, HTTP clients after a timeout), so the
//! same event may arrive several times; only its first arrival may count.
//! `dedup` maps the key to its first-seen time; `dedup_expiry` orders the
//! same keys by that time so old ones can be swept a bounded number at a
//! time, inside the writer's normal commits.
//!
//! Every event writes an expiry entry, keyed by arrival time and a running
//! number and holding the dedup key as its value: keyed so, entries come
//! in key order and are appended without searching the tree. A clock
//! step back or a number reused after a restart only costs the search
//! again. Earlier versions keyed an entry by arrival time and dedup key,
//! with an empty value, which put a commit's events (they share one
//! arrival time) in random order; the sweep reads both layouts.

use std::ops::Bound;

use heed::RwTxn;

use super::append;
use super::env::Dbs;
use super::keys::KeyBuf;

/// Natural dedup keys above this are hashed, so that `time ‖ key` in the
/// expiry index stays below LMDB's 511-byte key limit.
const MAX_DEDUP_KEY: usize = 256;

/// Reused buffers for dedup keys.
#[derive(Default)]
pub(crate) struct Dedup {
    key: KeyBuf,
    /// The number of the last expiry entry written; restarts at zero.
    number: u64,
    sweep_keys: Vec<u8>,
    /// Per expired entry: where its dedup key is in `sweep_keys`, and
    /// its arrival time (`None` for an entry not written by us).
    sweep_offsets: Vec<(std::ops::Range<usize>, Option<u64>)>,
    /// The last expired entry's own key.
    sweep_last: Vec<u8>,
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
        // A number already used at this time (a clock step back, a
        // restart) takes the next one.
        loop {
            self.number = self.number.wrapping_add(1);
            let mut expiry = [0u8; 16];
            expiry[..8].copy_from_slice(&now.to_be_bytes());
            expiry[8..].copy_from_slice(&self.number.to_be_bytes());
            if append::put_new(dbs.dedup_expiry, txn, &expiry, key)? {
                return Ok(false);
            }
        }
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
            let (ekey, value) = entry?;
            let time = expiry_time(ekey);
            if time.is_some_and(|t| t >= cutoff) {
                break;
            }
            if self.sweep_offsets.len() == budget {
                more = true;
                break;
            }
            // Not written by us (no time): dropped with the rest of the
            // range, touching no dedup key.
            let key = match time {
                Some(_) if value.is_empty() => &ekey[8..],
                Some(_) => value,
                None => &[][..],
            };
            let start = self.sweep_keys.len();
            self.sweep_keys.extend_from_slice(key);
            self.sweep_offsets
                .push((start..self.sweep_keys.len(), time));
            self.sweep_last.clear();
            self.sweep_last.extend_from_slice(ekey);
        }
        if self.sweep_offsets.is_empty() {
            return Ok((0, false));
        }
        for (range, time) in &self.sweep_offsets {
            let Some(time) = *time else { continue };
            let key = &self.sweep_keys[range.clone()];
            // Only remove the dedup entry if it is the one this expiry entry
            // was written for; a key re-seen after expiry has a newer time.
            if dbs.dedup.get(txn, key)? == Some(time) {
                dbs.dedup.delete(txn, key)?;
            }
        }
        let removed = self.sweep_offsets.len();
        dbs.dedup_expiry.delete_range(
            txn,
            &(
                Bound::Unbounded,
                Bound::Included(self.sweep_last.as_slice()),
            ),
        )?;
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

#[cfg(test)]
mod tests {
    use super::super::env::{open_env, Dbs, LmdbEnv};
    use super::*;

    const DAY: i64 = 86_400_000;

    fn store() -> (tempfile::TempDir, LmdbEnv, Dbs) {
        let dir = tempfile::tempdir().unwrap();
        let env = open_env(dir.path(), 1 << 24, heed::EnvFlags::empty()).unwrap();
        let mut txn = env.write_txn().unwrap();
        let dbs = Dbs::create(&env, &mut txn).unwrap();
        txn.commit().unwrap();
        (dir, env, dbs)
    }

    fn seen(dedup: &mut Dedup, dbs: &Dbs, txn: &mut RwTxn, id: &str, now_ms: i64) -> bool {
        dedup
            .check_and_insert(dbs, txn, "src", id, now_ms, DAY)
            .unwrap()
    }

    fn counts(env: &LmdbEnv, dbs: &Dbs) -> (u64, u64) {
        let txn = env.read_txn().unwrap();
        (
            dbs.dedup.len(&txn).unwrap(),
            dbs.dedup_expiry.len(&txn).unwrap(),
        )
    }

    #[test]
    fn every_key_gets_its_own_expiry_entry_when_the_clock_steps_back_or_numbers_restart() {
        let (_dir, env, dbs) = store();
        let t = 1_750_000_000_000;
        let mut txn = env.write_txn().unwrap();
        let mut dedup = Dedup::default();
        // Appended in order, then a clock step back, then a "restart"
        // (numbers from zero again) at times already used.
        for (i, now) in [t, t, t + 5, t - 100, t - 100].into_iter().enumerate() {
            assert!(!seen(&mut dedup, &dbs, &mut txn, &format!("a{i}"), now));
        }
        let mut restarted = Dedup::default();
        for (i, now) in [t, t - 100, t + 5].into_iter().enumerate() {
            assert!(!seen(&mut restarted, &dbs, &mut txn, &format!("b{i}"), now));
        }
        assert!(seen(&mut restarted, &dbs, &mut txn, "a3", t + 6));
        txn.commit().unwrap();
        assert_eq!(counts(&env, &dbs), (8, 8));

        // A day later every one of them expires, each with its dedup key.
        let mut txn = env.write_txn().unwrap();
        let (removed, more) = dedup
            .sweep(&dbs, &mut txn, t + 5 + DAY + 1, DAY, 100)
            .unwrap();
        txn.commit().unwrap();
        assert_eq!((removed, more), (8, false));
        assert_eq!(counts(&env, &dbs), (0, 0));
    }

    #[test]
    fn expiry_entries_in_the_earlier_layout_are_swept_with_their_keys() {
        let (_dir, env, dbs) = store();
        let t: i64 = 1_750_000_000_000;
        let mut txn = env.write_txn().unwrap();
        // Written by an earlier version: time ‖ dedup key → empty.
        let mut kb = KeyBuf::default();
        let old = kb.start("src").rest("old").finish(MAX_DEDUP_KEY).to_vec();
        dbs.dedup.put(&mut txn, &old, &(t as u64)).unwrap();
        let mut ekey = (t as u64).to_be_bytes().to_vec();
        ekey.extend_from_slice(&old);
        dbs.dedup_expiry.put(&mut txn, &ekey, &[]).unwrap();
        // And one in today's layout, a little later.
        let mut dedup = Dedup::default();
        assert!(!seen(&mut dedup, &dbs, &mut txn, "new", t + 10));
        assert!(seen(&mut dedup, &dbs, &mut txn, "old", t + 20));
        txn.commit().unwrap();

        let mut txn = env.write_txn().unwrap();
        // Only the earlier one has expired.
        let (removed, _) = dedup.sweep(&dbs, &mut txn, t + DAY + 5, DAY, 100).unwrap();
        assert_eq!(removed, 1);
        assert!(!seen(&mut dedup, &dbs, &mut txn, "old", t + DAY + 5));
        assert!(seen(&mut dedup, &dbs, &mut txn, "new", t + DAY + 5));
        txn.commit().unwrap();
    }
}
