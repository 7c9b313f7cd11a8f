//! Counters the writer publishes for status, metrics and tests.
//!
//! Plain atomics updated after each commit: readers never take a lock and
//! never see effects of a transaction that was rolled back. Counters count
//! since the process started; `outbox_*`, `next_seq` and `dropped_through`
//! mirror the persisted values.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct StoreStats {
    pub(crate) events_committed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) records_appended: AtomicU64,
    pub(crate) records_acked: AtomicU64,
    pub(crate) records_dropped: AtomicU64,
    pub(crate) outbox_records: AtomicU64,
    pub(crate) outbox_bytes: AtomicU64,
    pub(crate) next_seq: AtomicU64,
    pub(crate) dropped_through: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) last_commit_events: AtomicU64,
    pub(crate) map_full_events: AtomicU64,
    pub(crate) outbox_full_refusals: AtomicU64,
    pub(crate) storage_errors: AtomicU64,
    pub(crate) dead_letters_stored: AtomicU64,
    pub(crate) dead_letters_dropped: AtomicU64,
    pub(crate) dedup_expired: AtomicU64,
}

macro_rules! getters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        impl StoreStats {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> u64 {
                    self.$name.load(Ordering::Relaxed)
                }
            )*
        }
    };
}

getters! {
    /// Events committed (not counting duplicates).
    events_committed,
    /// Events dropped as duplicates of one seen within the retention.
    duplicates,
    /// Outbox records created (awards, …).
    records_appended,
    /// Outbox records deleted after the central side acknowledged them.
    records_acked,
    /// Outbox records dropped by the `drop-oldest` policy.
    records_dropped,
    /// Records in the outbox now.
    outbox_records,
    /// Encoded bytes in the outbox now.
    outbox_bytes,
    /// Sequence the next record will get.
    next_seq,
    /// Highest sequence dropped by `drop-oldest`; 0 when none.
    dropped_through,
    /// Write transactions committed.
    commits,
    /// Events in the most recent commit.
    last_commit_events,
    /// Events refused because the LMDB map was full.
    map_full_events,
    /// Submissions refused because the outbox was full (policy `block`).
    outbox_full_refusals,
    /// Write transactions that failed for another reason.
    storage_errors,
    /// Dead-letter samples stored.
    dead_letters_stored,
    /// Dead-letter samples not stored (queue busy or store failure).
    dead_letters_dropped,
    /// Dedup keys removed after their retention.
    dedup_expired,
}

impl StoreStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn set(counter: &AtomicU64, v: u64) {
        counter.store(v, Ordering::Relaxed);
    }
}
