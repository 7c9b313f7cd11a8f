//! Publications: MQTT messages to the venue (progress feedback, offers)
//! waiting for the broker's PUBACK.
//!
//! They are written in the commit that produced them, so a message is
//! never published for a change that did not commit and never lost for
//! one that did (rumqttc keeps un-acked publishes only in memory). The
//! publisher deletes them once acknowledged; after a crash the ones still
//! here are published again, so delivery is at least once and every
//! payload carries an id for the app to deduplicate.

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};

use super::codec::BeU64;

/// One message for the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
enum Stored {
    V1(Publication),
}

/// Appends under the next number; keys only grow within a process life,
/// and after a restart continue from the highest one left. A number used
/// by a transaction that then failed is simply skipped.
#[derive(Default)]
pub(crate) struct Queue {
    next: Option<u64>,
    /// Encoding buffer, reused.
    buf: Vec<u8>,
}

impl Queue {
    pub(crate) fn push(
        &mut self,
        db: Database<BeU64, Bytes>,
        txn: &mut RwTxn,
        publication: Publication,
    ) -> heed::Result<u64> {
        let seq = match self.next {
            Some(n) => n,
            None => db.last(txn)?.map(|(k, _)| k + 1).unwrap_or(1),
        };
        self.buf.clear();
        self.buf = postcard::to_extend(&Stored::V1(publication), std::mem::take(&mut self.buf))
            .map_err(|e| heed::Error::Encoding(Box::new(e)))?;
        super::append::put(db, txn, &seq, &self.buf)?;
        self.next = Some(seq + 1);
        Ok(seq)
    }
}

/// Up to `max` publications numbered above `after`, in order. An
/// undecodable one is skipped (and deleted by the next ack past it).
pub(crate) fn read(
    db: Database<BeU64, Bytes>,
    txn: &RoTxn,
    after: u64,
    max: usize,
) -> heed::Result<Vec<(u64, Publication)>> {
    let mut out = Vec::new();
    let from = after.saturating_add(1);
    for entry in db.range(txn, &(from..))? {
        if out.len() >= max {
            break;
        }
        let (seq, bytes) = entry?;
        if let Ok(Stored::V1(p)) = postcard::from_bytes::<Stored>(bytes) {
            out.push((seq, p));
        }
    }
    Ok(out)
}

/// Deletes every publication up to `through`; returns how many.
pub(crate) fn ack(db: Database<BeU64, Bytes>, txn: &mut RwTxn, through: u64) -> heed::Result<u64> {
    db.delete_range(txn, &(..=through)).map(|n| n as u64)
}

/// Deletes the publications still waiting for `customer` (their topics
/// are `<prefix>/<customer>/<kind>`): after an erasure nothing may go out
/// naming them, not even what committed before it. Returns how many.
pub(crate) fn erase(
    db: Database<BeU64, Bytes>,
    txn: &mut RwTxn,
    prefix: &str,
    customer: &str,
) -> heed::Result<u64> {
    let theirs = format!("{prefix}/{}/", topic_level(customer));
    let mut doomed = Vec::new();
    for entry in db.iter(txn)? {
        let (seq, bytes) = entry?;
        if let Ok(Stored::V1(p)) = postcard::from_bytes::<Stored>(bytes) {
            if p.topic
                .strip_prefix(&theirs)
                .is_some_and(|kind| !kind.contains('/'))
            {
                doomed.push(seq);
            }
        }
    }
    for seq in &doomed {
        db.delete(txn, seq)?;
    }
    Ok(doomed.len() as u64)
}

/// Pending publications.
pub(crate) fn len(db: Database<BeU64, Bytes>, txn: &RoTxn) -> heed::Result<u64> {
    db.len(txn)
}

/// An MQTT topic level for a customer id: `/`, `+`, `#` and NUL would
/// change the topic's meaning, so they (and `%`) are percent-encoded.
pub fn topic_level(customer: &str) -> String {
    let mut out = String::with_capacity(customer.len());
    for c in customer.chars() {
        match c {
            '/' | '+' | '#' | '\0' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_ids_stay_one_topic_level() {
        assert_eq!(topic_level("fan-1"), "fan-1");
        assert_eq!(topic_level("a/b+#%"), "a%2Fb%2B%23%25");
    }
}
