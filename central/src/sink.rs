//! Sinks: where the central side makes records durable.
//!
//! The acknowledgement a site receives is the sink's promise, so every
//! sink has the same contract: writes are idempotent by (site, seq), and
//! `write` returns only once what it reports is durable. The embedding
//! platform can implement [`Sink`] to store records in its own system.

use std::future::Future;

use touchline_proto::Record;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The storage is unreachable or failed; the site retries later.
    #[error("sink unavailable: {0}")]
    Unavailable(String),
    /// The batch itself is wrong (a record names another site).
    #[error("invalid batch: {0}")]
    Invalid(String),
}

/// Durable storage for records.
///
/// `write` receives records of one site in ascending sequence order. It
/// skips sequences already durable, writes the contiguous run that follows
/// (missing sequences up to `dropped_through` are gaps the site declared),
/// and returns the highest contiguous durable sequence. Calls for one site
/// may come from several connections; implementations serialise them.
pub trait Sink: Send + Sync + 'static {
    /// The highest contiguous durable sequence of `site` (0 when none).
    fn last_durable(&self, site: &str) -> impl Future<Output = Result<u64, SinkError>> + Send;

    /// Makes the contiguous part of `records` durable; see the trait docs.
    fn write(
        &self,
        site: &str,
        dropped_through: u64,
        records: &[Record],
    ) -> impl Future<Output = Result<u64, SinkError>> + Send;
}

/// Which records of a batch extend the durable run of a site.
///
/// Returns the indices to write and the new highest contiguous sequence.
/// Records at or below `last` are duplicates; a record beyond an
/// undeclared gap ends the run (it is written once the gap is filled).
pub fn plan(last: u64, dropped_through: u64, records: &[Record]) -> (Vec<usize>, u64) {
    let mut next = last.max(dropped_through);
    let mut keep = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        if r.seq <= last || r.seq <= next && r.seq <= dropped_through {
            continue;
        }
        if r.seq == next + 1 {
            keep.push(i);
            next = r.seq;
        } else {
            break;
        }
    }
    (keep, next)
}

/// Refuses a batch that names another site.
pub fn check_site(site: &str, records: &[Record]) -> Result<(), SinkError> {
    match records.iter().find(|r| r.site != site) {
        Some(r) => Err(SinkError::Invalid(format!(
            "record {} names site `{}` on a session of `{site}`",
            r.seq, r.site
        ))),
        None => Ok(()),
    }
}

/// A record of site `s` with sequence `seq`, for tests.
#[cfg(test)]
pub(crate) fn test_record(seq: u64) -> Record {
    use touchline_proto::{AchievementAwarded, RecordBody};
    Record {
        site: "s".into(),
        seq,
        at_ms: 0,
        body: RecordBody::AchievementAwarded(AchievementAwarded {
            customer: "c".into(),
            achievement: "a".into(),
            version: 1,
            tier: 1,
            badge: None,
            points: vec![],
            window: "lifetime".into(),
            value: 1.0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        test_record(seq)
    }

    #[test]
    fn duplicates_are_skipped_and_the_run_extends() {
        let batch: Vec<_> = (3..=6).map(rec).collect();
        assert_eq!(plan(4, 0, &batch), (vec![2, 3], 6));
    }

    #[test]
    fn an_undeclared_gap_stops_the_run() {
        let batch = vec![rec(1), rec(2), rec(4)];
        assert_eq!(plan(0, 0, &batch), (vec![0, 1], 2));
    }

    #[test]
    fn a_declared_gap_is_crossed() {
        let batch = vec![rec(8), rec(9)];
        assert_eq!(plan(2, 7, &batch), (vec![0, 1], 9));
        assert_eq!(plan(2, 7, &[]), (vec![], 7));
    }
}
