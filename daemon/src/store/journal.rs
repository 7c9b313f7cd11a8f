//! The journal: the events the engine applied since the last checkpoint.
//!
//! Why: in `journal` mode the engine's state changes stay in memory
//! (`hot.rs`) until a checkpoint, so what makes them durable is the
//! events that caused them, appended here in the same commit as their
//! dedup keys and outbox records. After a crash, the store replays the
//! journal through the engine with its outputs discarded (they were
//! committed the first time) and arrives at the state the crash lost.
//!
//! Replay is exact because an entry holds everything the engine read from
//! outside its own state: the event, the writer's clock for it, and the
//! profiles it was given or read (a later profile change must not leak
//! into an earlier event). A checkpoint empties the journal; so does an
//! erasure, which checkpoints first, so no entry outlives the customer
//! it names.

use std::borrow::Cow;

use heed::types::Bytes;
use heed::{Database, RwTxn};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::codec::BeU64;
use crate::engine::table::Profile;
use crate::event::Event;

/// The stored format of entries; the first byte of each value.
const FORMAT: u8 = 1;

/// One applied event and what the engine read to apply it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The writer's clock for the event's transaction.
    pub now_ms: i64,
    pub event: Event,
    /// The subject's profile as it was passed to the engine.
    pub profile: Option<Profile>,
    /// Other customers' profiles the engine read (referrals), in order.
    pub read: Vec<(String, Option<Profile>)>,
}

/// The stored form: JSON values as text, since postcard cannot carry
/// `serde_json::Value` itself.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    now_ms: i64,
    id: Cow<'a, str>,
    source: Cow<'a, str>,
    kind: Cow<'a, str>,
    subject: Option<Cow<'a, str>>,
    time_ms: i64,
    data: Cow<'a, str>,
    profile: Option<Cow<'a, str>>,
    read: Vec<(Cow<'a, str>, Option<String>)>,
}

/// Why an entry could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JournalError {
    #[error("journal entry {seq} has unknown format {format}")]
    Format { seq: u64, format: u8 },
    #[error("journal entry {seq} is unreadable: {detail}")]
    Corrupt { seq: u64, detail: String },
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
}

fn profile_text(p: &Profile) -> Result<String, String> {
    serde_json::to_string(p).map_err(|e| e.to_string())
}

fn profile_of(text: &str) -> Result<Profile, String> {
    match serde_json::from_str(text).map_err(|e| e.to_string())? {
        Value::Object(map) => Ok(map),
        _ => Err("profile is not an object".into()),
    }
}

/// Each event's `data` as an entry stores it. The store's submitters
/// call this on their own threads so the writer, which appends every
/// entry, does not spend its time rendering JSON.
pub(crate) fn render_data(events: &[Event]) -> Vec<String> {
    // A `Value` always renders; an empty text would only make the writer
    // render that event itself.
    events
        .iter()
        .map(|e| serde_json::to_string(&e.data).unwrap_or_default())
        .collect()
}

/// Encodes one entry into `buf` (cleared first). `data_text` is the
/// event's data as [`render_data`] renders it; `None` (or empty) renders
/// it here.
pub(crate) fn encode(
    now_ms: i64,
    e: &Event,
    data_text: Option<&str>,
    profile: Option<&str>,
    read: &[(String, Option<Profile>)],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let stored = Stored {
        now_ms,
        id: Cow::Borrowed(&e.id),
        source: Cow::Borrowed(&e.source),
        kind: Cow::Borrowed(&e.kind),
        subject: e.subject.as_deref().map(Cow::Borrowed),
        time_ms: e.time_ms,
        // `to_string` writes straight into the text; `Value`'s `Display`
        // goes through the formatting machinery (8,000 instructions an
        // event, nearly half of an append, in the engine bench).
        data: match data_text.filter(|t| !t.is_empty()) {
            Some(text) => Cow::Borrowed(text),
            None => Cow::Owned(serde_json::to_string(&e.data).map_err(|err| err.to_string())?),
        },
        profile: profile.map(Cow::Borrowed),
        read: read
            .iter()
            .map(|(c, p)| {
                Ok((
                    Cow::Borrowed(c.as_str()),
                    p.as_ref().map(profile_text).transpose()?,
                ))
            })
            .collect::<Result<_, String>>()?,
    };
    buf.clear();
    buf.push(FORMAT);
    let encoded = postcard::to_extend(&stored, std::mem::take(buf)).map_err(|e| e.to_string())?;
    *buf = encoded;
    Ok(())
}

impl Entry {
    pub(crate) fn decode(seq: u64, bytes: &[u8]) -> Result<Entry, JournalError> {
        let corrupt = |detail: String| JournalError::Corrupt { seq, detail };
        match bytes.first() {
            Some(&FORMAT) => {}
            Some(&format) => return Err(JournalError::Format { seq, format }),
            None => return Err(corrupt("empty".into())),
        }
        let s: Stored = postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(e.to_string()))?;
        let data = serde_json::from_str(&s.data).map_err(|e| corrupt(e.to_string()))?;
        let profile = s
            .profile
            .as_deref()
            .map(profile_of)
            .transpose()
            .map_err(corrupt)?;
        let mut read = Vec::with_capacity(s.read.len());
        for (customer, p) in s.read {
            read.push((
                customer.into_owned(),
                p.as_deref().map(profile_of).transpose().map_err(corrupt)?,
            ));
        }
        Ok(Entry {
            now_ms: s.now_ms,
            event: Event {
                id: s.id.into_owned(),
                source: s.source.into_owned(),
                kind: s.kind.into_owned(),
                subject: s.subject.map(Cow::into_owned),
                time_ms: s.time_ms,
                data,
            },
            profile,
            read,
        })
    }
}

/// An entry read back with its sequence, or why it could not be.
pub(crate) type Numbered = (u64, Result<Entry, JournalError>);

/// The journal table and its sequence, with the open transaction's
/// appends counted apart from the committed ones.
pub(crate) struct Journal {
    db: Database<BeU64, Bytes>,
    /// As of the last commit.
    committed_next: u64,
    committed_entries: u64,
    /// As the open transaction left them.
    next: u64,
    entries: u64,
    buf: Vec<u8>,
}

impl Journal {
    /// The journal as stored: entries left by a run that ended without a
    /// checkpoint are counted, to be replayed.
    pub(crate) fn open(db: Database<BeU64, Bytes>, txn: &RwTxn) -> heed::Result<Journal> {
        let entries = db.len(txn)?;
        let next = db.last(txn)?.map_or(1, |(seq, _)| seq + 1);
        Ok(Journal {
            db,
            committed_next: next,
            committed_entries: entries,
            next,
            entries,
            buf: Vec::new(),
        })
    }

    pub(crate) fn begin(&mut self) {
        self.next = self.committed_next;
        self.entries = self.committed_entries;
    }

    pub(crate) fn commit(&mut self) {
        self.committed_next = self.next;
        self.committed_entries = self.entries;
    }

    /// Entries not yet reflected by a checkpoint, including the open
    /// transaction's.
    pub(crate) fn entries(&self) -> u64 {
        self.entries
    }

    /// Appends the entry for one applied event.
    pub(crate) fn append(
        &mut self,
        txn: &mut RwTxn,
        now_ms: i64,
        event: &Event,
        data_text: Option<&str>,
        profile: Option<&str>,
        read: &[(String, Option<Profile>)],
    ) -> Result<(), JournalError> {
        encode(now_ms, event, data_text, profile, read, &mut self.buf).map_err(|e| {
            JournalError::Corrupt {
                seq: self.next,
                detail: e,
            }
        })?;
        super::append::put(self.db, txn, &self.next, &self.buf)?;
        self.next += 1;
        self.entries += 1;
        Ok(())
    }

    /// Empties the journal: a checkpoint in this transaction reflects it.
    pub(crate) fn clear(&mut self, txn: &mut RwTxn) -> heed::Result<()> {
        self.db.clear(txn)?;
        self.entries = 0;
        Ok(())
    }

    /// Up to `max` entries after `after`, in order, as (sequence, entry).
    pub(crate) fn read(
        &self,
        txn: &RwTxn,
        after: u64,
        max: usize,
    ) -> Result<Vec<Numbered>, heed::Error> {
        let mut out = Vec::new();
        let start = after.saturating_add(1);
        for item in self.db.range(txn, &(start..))?.take(max) {
            let (seq, bytes) = item?;
            out.push((seq, Entry::decode(seq, bytes)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_round_trip_with_profiles_and_reject_other_formats() {
        let profile = json!({"section": "S1", "consent": {"gamification": true}});
        let entry = Entry {
            now_ms: 1_700_000_000_123,
            event: Event {
                id: "e1".into(),
                source: "app/ios".into(),
                kind: "shop.purchase".into(),
                subject: Some("fan-1".into()),
                time_ms: 1_700_000_000_000,
                data: json!({"amount": 12.5, "referrer": "fan-2", "tags": [1, "x", null]}),
            },
            profile: profile.as_object().cloned(),
            read: vec![
                ("fan-2".into(), None),
                ("fan-3".into(), profile.as_object().cloned()),
            ],
        };
        let mut buf = Vec::new();
        let text = profile.to_string();
        encode(
            entry.now_ms,
            &entry.event,
            None,
            Some(&text),
            &entry.read,
            &mut buf,
        )
        .unwrap();
        assert_eq!(Entry::decode(7, &buf).unwrap(), entry);
        // Data the submitter rendered makes the same entry.
        let rendered = render_data(std::slice::from_ref(&entry.event));
        let mut from_rendered = Vec::new();
        encode(
            entry.now_ms,
            &entry.event,
            rendered.first().map(String::as_str),
            Some(&text),
            &entry.read,
            &mut from_rendered,
        )
        .unwrap();
        assert_eq!(from_rendered, buf);
        buf[0] = 9;
        assert!(matches!(
            Entry::decode(7, &buf),
            Err(JournalError::Format { seq: 7, format: 9 })
        ));
        assert!(matches!(
            Entry::decode(8, &[FORMAT, 0xff]),
            Err(JournalError::Corrupt { seq: 8, .. })
        ));
    }

    proptest::proptest! {
        /// Any finite number in an event's data or a profile reads back as
        /// the very number the engine applied: a replay that saw a
        /// neighbour of it could cross a tier or a limit the original did
        /// not.
        #[test]
        fn numbers_read_back_exactly(
            bits in proptest::collection::vec(proptest::prelude::any::<u64>(), 1..20),
        ) {
            let numbers: Vec<f64> = bits
                .into_iter()
                .map(f64::from_bits)
                .filter(|x| x.is_finite())
                .collect();
            let data = json!({ "values": numbers });
            let profile = json!({ "score": numbers.first().copied().unwrap_or(0.0) });
            let event = Event {
                id: "e".into(),
                source: "s".into(),
                kind: "k".into(),
                subject: Some("c".into()),
                time_ms: 1,
                data: data.clone(),
            };
            let mut buf = Vec::new();
            let text = profile.to_string();
            let rendered = render_data(std::slice::from_ref(&event));
            encode(1, &event, rendered.first().map(String::as_str), Some(&text), &[], &mut buf)
                .unwrap();
            let entry = Entry::decode(1, &buf).unwrap();
            let back: Vec<u64> = entry.event.data["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap().to_bits())
                .collect();
            let sent: Vec<u64> = numbers.iter().map(|x| x.to_bits()).collect();
            proptest::prop_assert_eq!(back, sent);
            proptest::prop_assert_eq!(
                entry.profile.unwrap()["score"].as_f64().map(f64::to_bits),
                profile["score"].as_f64().map(f64::to_bits)
            );
        }
    }
}
