//! Counters the writer publishes for status, metrics and tests.
//!
//! Plain atomics updated after each commit: readers never take a lock and
//! never see effects of a transaction that was rolled back. Counters count
//! since the process started; `outbox_*`, `next_seq` and `dropped_through`
//! mirror the persisted values. The commit histograms are fixed-bucket
//! atomics too, so the writer never waits for a scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::env::MapUsage;

/// Upper bounds of `commit_duration` buckets, in µs (0.1 ms … 5 s): a
/// commit is one or two fsyncs, so most land in the low milliseconds.
const COMMIT_DURATION_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// Upper bounds of `commit_events` buckets (events per commit), up to
/// the largest useful `store.commit_max_events`.
const COMMIT_EVENTS_BOUNDS: &[u64] = &[
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384,
];

#[derive(Debug)]
pub struct StoreStats {
    /// When these stats were made; the heartbeat counts from here.
    born: Instant,
    /// Milliseconds after `born` at which the writer loop last turned.
    heartbeat_ms: AtomicU64,
    /// Duration of each write transaction that committed, from its start
    /// (applying events included) to the durable commit.
    pub(crate) commit_duration: Histogram,
    /// Events (duplicates included) per commit that carried events.
    pub(crate) commit_events: Histogram,
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
    pub(crate) events_not_tracked: AtomicU64,
    pub(crate) publications_queued: AtomicU64,
    pub(crate) publications_acked: AtomicU64,
    pub(crate) erasures: AtomicU64,
    pub(crate) dead_letters_erased: AtomicU64,
    pub(crate) publications_erased: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    pub(crate) checkpoint_keys: AtomicU64,
    pub(crate) journal_entries: AtomicU64,
    pub(crate) journal_replayed: AtomicU64,
    pub(crate) dedup_batches: AtomicU64,
    pub(crate) dedup_batch_keys: AtomicU64,
    pub(crate) writeback_wait_us: AtomicU64,
    pub(crate) map_size_bytes: AtomicU64,
    pub(crate) map_used_bytes: AtomicU64,
    pub(crate) writeback_map_size_bytes: AtomicU64,
    pub(crate) writeback_map_used_bytes: AtomicU64,
}

macro_rules! getters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        impl StoreStats {
    /// Called by the writer each time its loop turns (at least once a
    /// second while idle).
    pub(crate) fn beat(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the writer loop last turned: stays around a second
    /// while idle or busy, grows without bound when a commit hangs.
    pub fn writer_silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

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
    /// Events of customers whose `consent.gamification` is false: committed
    /// (deduplicated) but applied to no rule.
    events_not_tracked,
    /// MQTT publications (progress, offers) queued in commits.
    publications_queued,
    /// MQTT publications the broker acknowledged (then deleted).
    publications_acked,
    /// Customers erased (`customer.erased`).
    erasures,
    /// Dead-letter samples deleted because they mentioned an erased customer.
    dead_letters_erased,
    /// MQTT publications for an erased customer deleted before they went out.
    publications_erased,
    /// `journal` mode: checkpoints committed (rule state written back).
    checkpoints,
    /// `journal` mode: state keys written back by checkpoints.
    checkpoint_keys,
    /// `journal` mode: events journaled since the last checkpoint now.
    journal_entries,
    /// `journal` mode: events replayed at open after an unclean stop.
    journal_replayed,
    /// Batches of dedup keys the write-back thread committed.
    dedup_batches,
    /// Dedup keys those batches wrote, or deleted (held keys that
    /// expired before they were written back).
    dedup_batch_keys,
    /// Microseconds the writer waited for a batch still in flight when
    /// the next was due.
    writeback_wait_us,
    /// The store's LMDB map size, bytes.
    map_size_bytes,
    /// The store's map used up to its high-water mark, bytes (see
    /// `env::MapUsage`).
    map_used_bytes,
    /// The write-back environment's map size, bytes.
    writeback_map_size_bytes,
    /// The write-back environment's map used up to its high-water mark.
    writeback_map_used_bytes,
}

impl Default for StoreStats {
    fn default() -> Self {
        StoreStats {
            born: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            commit_duration: Histogram::new(COMMIT_DURATION_BOUNDS_US, 1e6),
            commit_events: Histogram::new(COMMIT_EVENTS_BOUNDS, 1.0),
            events_committed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            records_appended: AtomicU64::new(0),
            records_acked: AtomicU64::new(0),
            records_dropped: AtomicU64::new(0),
            outbox_records: AtomicU64::new(0),
            outbox_bytes: AtomicU64::new(0),
            next_seq: AtomicU64::new(0),
            dropped_through: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            last_commit_events: AtomicU64::new(0),
            map_full_events: AtomicU64::new(0),
            outbox_full_refusals: AtomicU64::new(0),
            storage_errors: AtomicU64::new(0),
            dead_letters_stored: AtomicU64::new(0),
            dead_letters_dropped: AtomicU64::new(0),
            dedup_expired: AtomicU64::new(0),
            events_not_tracked: AtomicU64::new(0),
            publications_queued: AtomicU64::new(0),
            publications_acked: AtomicU64::new(0),
            erasures: AtomicU64::new(0),
            dead_letters_erased: AtomicU64::new(0),
            publications_erased: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_keys: AtomicU64::new(0),
            journal_entries: AtomicU64::new(0),
            journal_replayed: AtomicU64::new(0),
            dedup_batches: AtomicU64::new(0),
            dedup_batch_keys: AtomicU64::new(0),
            writeback_wait_us: AtomicU64::new(0),
            map_size_bytes: AtomicU64::new(0),
            map_used_bytes: AtomicU64::new(0),
            writeback_map_size_bytes: AtomicU64::new(0),
            writeback_map_used_bytes: AtomicU64::new(0),
        }
    }
}

impl StoreStats {
    /// How full the two environments' maps are now (the write-back one
    /// left as it was when closed).
    pub(crate) fn set_map_usage(&self, store: MapUsage, writeback: Option<MapUsage>) {
        self.map_size_bytes.store(store.size, Ordering::Relaxed);
        self.map_used_bytes.store(store.used, Ordering::Relaxed);
        if let Some(w) = writeback {
            self.writeback_map_size_bytes
                .store(w.size, Ordering::Relaxed);
            self.writeback_map_used_bytes
                .store(w.used, Ordering::Relaxed);
        }
    }

    /// Write transaction durations (seconds), commits that failed excluded.
    pub fn commit_duration(&self) -> HistogramSnapshot {
        self.commit_duration.snapshot()
    }

    /// Events per commit, for commits that carried events.
    pub fn commit_events(&self) -> HistogramSnapshot {
        self.commit_events.snapshot()
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn set(counter: &AtomicU64, v: u64) {
        counter.store(v, Ordering::Relaxed);
    }
}

/// A histogram with fixed bucket bounds: one relaxed atomic add per
/// bucket hit, no lock, no allocation after construction. Values are
/// recorded as integers in a base unit (µs, events) and scaled to the
/// exposition unit (seconds, events) when read.
#[derive(Debug)]
pub struct Histogram {
    /// Inclusive upper bounds in the base unit, ascending.
    bounds: &'static [u64],
    /// One per bound, plus the overflow (`+Inf`) bucket; not cumulative.
    buckets: Box<[AtomicU64]>,
    /// Sum of observations in the base unit.
    sum: AtomicU64,
    /// Base units per exposition unit. Dividing (rather than multiplying
    /// by the inverse) keeps bounds like 0.0001 exact in the output.
    per_unit: f64,
}

/// A point-in-time copy of a [`Histogram`], in exposition units.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Inclusive upper bounds, ascending (the `le` labels without `+Inf`).
    pub bounds: Vec<f64>,
    /// Observations per bucket, not cumulative; one more than `bounds`
    /// (the last is above every bound).
    pub counts: Vec<u64>,
    /// Sum of the observed values.
    pub sum: f64,
}

impl HistogramSnapshot {
    /// Observations in all buckets.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [u64], per_unit: f64) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            per_unit,
        }
    }

    /// Records `value` (base unit).
    pub(crate) fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Records a duration, for histograms whose base unit is µs.
    pub(crate) fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// The count is the sum of the buckets read, so the two always agree
    /// even while the writer records; the sum may trail by an observation.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self
                .bounds
                .iter()
                .map(|&b| b as f64 / self.per_unit)
                .collect(),
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum.load(Ordering::Relaxed) as f64 / self.per_unit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        static BOUNDS: &[u64] = &[1, 10, 100];
        let h = Histogram::new(BOUNDS, 1.0);
        for v in [0, 1, 2, 10, 11, 100, 101, u64::MAX / 2] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![2, 2, 2, 2]);
        assert_eq!(s.count(), 8);
        assert_eq!(s.bounds, vec![1.0, 10.0, 100.0]);
    }

    #[test]
    fn durations_are_scaled_to_seconds() {
        let stats = StoreStats::default();
        stats
            .commit_duration
            .observe_duration(Duration::from_millis(3));
        let s = stats.commit_duration();
        assert_eq!(s.count(), 1);
        assert!((s.sum - 0.003).abs() < 1e-9, "sum {}", s.sum);
        // 3 ms lies in the (2.5 ms, 5 ms] bucket.
        let idx = s.bounds.iter().position(|&b| b >= 0.003).unwrap();
        assert!((s.bounds[idx] - 0.005).abs() < 1e-12);
        assert_eq!(s.counts[idx], 1);
    }
}
