//! Venue-wide fan-outs that outlive the transaction of their trigger.
//!
//! A venue-wide trigger (a goal, a missed chance) decides an offer for
//! every present fan. Decided in one transaction, 100,000 fans hold the
//! store's only writer for about a second, and every other event in the
//! venue (the cheers that follow the goal) waits that long for its
//! commit. So a fan-out decides a bounded chunk of fans per transaction:
//! the trigger's own transaction decides the first chunk and, when fans
//! remain, stores a job with the trigger and a cursor (the presence key
//! of the last fan decided). The writer then runs one chunk per turn of
//! its loop, between groups of other commands, each chunk committing its
//! decisions together with the advanced cursor. A crash resumes at the
//! cursor, so each fan is decided once.

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::nba::state::StateError;

/// Fans decided per transaction.
pub(crate) const CHUNK: usize = 4_096;

pub(crate) const DB_FANOUTS: &str = "nba_fanouts";

/// A fan-out still to finish: the trigger and where it got to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Job {
    /// Orders jobs: the first trigger finishes first.
    pub seq: u64,
    pub trigger: Event,
    /// Presence key of the last fan decided.
    pub after: Vec<u8>,
}

/// The stored form: the event's `data` as JSON text (postcard cannot
/// hold a self-describing JSON value).
#[derive(Serialize, Deserialize)]
struct JobV1 {
    id: String,
    source: String,
    kind: String,
    time_ms: i64,
    data: String,
    after: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
enum StoredJob {
    V1(JobV1),
}

/// Why a stored job could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("stored fan-out job {seq} has unreadable data: {source}")]
    Data { seq: u64, source: serde_json::Error },
}

fn encode(job: &Job) -> Result<Vec<u8>, StateError> {
    let t = &job.trigger;
    let stored = StoredJob::V1(JobV1 {
        id: t.id.clone(),
        source: t.source.clone(),
        kind: t.kind.clone(),
        time_ms: t.time_ms,
        data: t.data.to_string(),
        after: job.after.clone(),
    });
    postcard::to_allocvec(&stored).map_err(StateError::Encode)
}

fn decode(seq: u64, bytes: &[u8]) -> Result<Job, JobError> {
    let StoredJob::V1(j) = postcard::from_bytes(bytes).map_err(StateError::Decode)?;
    let data = serde_json::from_str(&j.data).map_err(|source| JobError::Data { seq, source })?;
    Ok(Job {
        seq,
        trigger: Event {
            id: j.id,
            source: j.source,
            kind: j.kind,
            subject: None,
            time_ms: j.time_ms,
            data,
        },
        after: j.after,
    })
}

/// The job table: sequence (8 bytes BE) → versioned job.
#[derive(Clone, Copy)]
pub(crate) struct Jobs {
    db: Database<Bytes, Bytes>,
}

impl Jobs {
    pub(crate) fn new(db: Database<Bytes, Bytes>) -> Jobs {
        Jobs { db }
    }

    /// The oldest unfinished job, by its sequence, or why it cannot be
    /// read (the caller drops it rather than retrying it forever).
    pub(crate) fn first(&self, txn: &RoTxn) -> heed::Result<Option<(u64, Result<Job, JobError>)>> {
        Ok(self.db.first(txn)?.map(|(k, v)| {
            let seq = seq_of(k);
            (seq, decode(seq, v))
        }))
    }

    /// The sequence a new job gets: after every stored one.
    pub(crate) fn next_seq(&self, txn: &RoTxn) -> heed::Result<u64> {
        Ok(self
            .db
            .last(txn)?
            .map_or(1, |(k, _)| seq_of(k).saturating_add(1)))
    }

    /// Stores the job (new, or its advanced cursor).
    pub(crate) fn put(&self, txn: &mut RwTxn, job: &Job) -> Result<(), JobError> {
        self.db.put(txn, &job.seq.to_be_bytes(), &encode(job)?)?;
        Ok(())
    }

    /// The job is done, or dropped.
    pub(crate) fn finish(&self, txn: &mut RwTxn, seq: u64) -> heed::Result<()> {
        self.db.delete(txn, &seq.to_be_bytes())?;
        Ok(())
    }
}

/// A job key's sequence (keys are written by [`Jobs::put`] only).
fn seq_of(key: &[u8]) -> u64 {
    <[u8; 8]>::try_from(key).map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_job_round_trips_with_its_data() {
        let job = Job {
            seq: 7,
            trigger: Event {
                id: "goal-1".into(),
                source: "feed".into(),
                kind: "match.goal".into(),
                subject: None,
                time_ms: 1_750_000_000_000,
                data: json!({ "team": "A", "minute": 85, "nested": [1, { "x": null }] }),
            },
            after: b"\x00\x05fan-9".to_vec(),
        };
        let bytes = encode(&job).unwrap_or_default();
        assert_eq!(bytes.first(), Some(&0), "version byte first");
        match decode(7, &bytes) {
            Ok(back) => assert_eq!(back, job),
            Err(e) => panic!("{e}"),
        }
        assert!(decode(7, &bytes[..bytes.len() - 1]).is_err());
    }
}
