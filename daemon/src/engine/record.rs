//! One customer's rule states, kept together in one stored value.
//!
//! An event counts for several of its subject's rules at once (every rule
//! on its type). Kept one value per (rule, window instance), each of those
//! was a table search on read and again on write — in LMDB a B-tree descent
//! and a page copy each, most of the engine's time. Kept together, an
//! event reads its subject's states once, and writes them once.
//!
//! The record is also where a fan's closed windows are forgotten: an
//! instance whose end plus the rule's lateness the watermark has passed
//! can never change again (any event for it is late), so its state is
//! dropped when the record is next written. A record holds the fan's open
//! windows and lifetime rules, not their history.
//!
//! Layout (all integers big-endian), a tag byte then entries:
//! `u16 slot length ‖ slot ‖ i64 end ‖ i64 lateness ‖ u32 value length ‖ value`
//! where the slot names (rule, version, window instance) and the value is
//! a [`super::state::StoredState`] encoding. `end` is the instance's end
//! in event time, `i64::MAX` when it has none (lifetime, rolling) or is
//! not known yet (an open period: resolved from the registry once the
//! period has ended). Shared-goal shares, rate histories and period
//! activity stay in keys of their own: they are indexed or scanned apart.

use super::table::StateTable;
use super::window::{self, Periods};
use crate::store::keys::KeyBuf;

/// First byte of a record. Chosen past the variants of
/// [`super::state::StoredState`], so a record never decodes as one.
const TAG: u8 = 0x40;

/// The key of a customer's record: the customer's key prefix itself, so
/// it sorts first among the customer's keys (erasure finds it by prefix)
/// and meets no other key (they all extend the prefix).
pub(crate) fn key<'b>(buf: &'b mut KeyBuf, customer: &str) -> &'b [u8] {
    buf.start(customer).finish(usize::MAX)
}

/// The slot of a rule's state in a window instance.
pub(crate) fn slot(buf: &mut Vec<u8>, rule: &str, version: u32, window: &str) {
    buf.clear();
    buf.push(u8::try_from(rule.len()).unwrap_or(u8::MAX));
    buf.extend_from_slice(rule.as_bytes());
    buf.extend_from_slice(&version.to_be_bytes());
    buf.extend_from_slice(window.as_bytes());
}

/// The window instance a slot names (slots this module built).
fn slot_window(slot: &[u8]) -> &[u8] {
    let rule = slot.first().copied().unwrap_or(0) as usize;
    slot.get(1 + rule + 4..).unwrap_or(&[])
}

/// When an instance's state may be forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expiry {
    /// The instance's end in event time; `None` when it has none or it is
    /// not known yet.
    pub end_ms: Option<i64>,
    pub lateness_ms: i64,
}

/// One entry, as parsed in place.
struct Entry {
    /// Byte offset of the entry in the record.
    at: usize,
    slot: std::ops::Range<usize>,
    end_ms: i64,
    lateness_ms: i64,
    value: std::ops::Range<usize>,
}

impl Entry {
    fn len(&self) -> usize {
        self.value.end - self.at
    }
}

/// Walks a record's entries; stops at the first that does not parse (a
/// truncated record loses its tail, never reads past it).
fn entries(bytes: &[u8]) -> impl Iterator<Item = Entry> + '_ {
    let mut at = usize::from(bytes.first() == Some(&TAG));
    if at == 0 {
        at = bytes.len();
    }
    std::iter::from_fn(move || {
        let start = at;
        let n = u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as usize;
        let slot = at + 2..at + 2 + n;
        let mut p = slot.end;
        let end_ms = i64::from_be_bytes(bytes.get(p..p + 8)?.try_into().ok()?);
        let lateness_ms = i64::from_be_bytes(bytes.get(p + 8..p + 16)?.try_into().ok()?);
        p += 16;
        let v = u32::from_be_bytes(bytes.get(p..p + 4)?.try_into().ok()?) as usize;
        let value = p + 4..p + 4 + v;
        if value.end > bytes.len() {
            return None;
        }
        at = value.end;
        Some(Entry {
            at: start,
            slot,
            end_ms,
            lateness_ms,
            value,
        })
    })
}

/// The value in `slot` of a stored record (for readers outside the
/// engine's transaction: progress queries).
pub(crate) fn find<'r>(record: &'r [u8], slot: &[u8]) -> Option<&'r [u8]> {
    entries(record)
        .find(|e| &record[e.slot.clone()] == slot)
        .map(|e| &record[e.value])
}

fn push_entry(out: &mut Vec<u8>, slot: &[u8], end_ms: i64, lateness_ms: i64, value: &[u8]) {
    out.extend_from_slice(&u16::try_from(slot.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&slot[..slot.len().min(u16::MAX as usize)]);
    out.extend_from_slice(&end_ms.to_be_bytes());
    out.extend_from_slice(&lateness_ms.to_be_bytes());
    out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(value);
}

/// A record read for the event being applied.
#[derive(Debug, Default)]
struct Open {
    customer: String,
    bytes: Vec<u8>,
    dirty: bool,
}

/// The records of the customers the current event touches (its subject,
/// and a referral's credited customer), written back once at its end.
#[derive(Default)]
pub(crate) struct Records {
    open: Vec<Open>,
    /// Buffers of records written back, reused.
    spare: Vec<Vec<u8>>,
    key: KeyBuf,
    scratch: Vec<u8>,
}

impl Records {
    fn index(&mut self, table: &dyn StateTable, customer: &str) -> Result<usize, heed::Error> {
        if let Some(i) = self.open.iter().position(|o| o.customer == customer) {
            return Ok(i);
        }
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        match table.get(key(&mut self.key, customer))? {
            Some(stored) if stored.first() == Some(&TAG) => bytes.extend_from_slice(stored),
            _ => bytes.push(TAG),
        }
        self.open.push(Open {
            customer: customer.to_owned(),
            bytes,
            dirty: false,
        });
        Ok(self.open.len() - 1)
    }

    /// The value in `slot` of `customer`'s record.
    pub(crate) fn get(
        &mut self,
        table: &dyn StateTable,
        customer: &str,
        slot: &[u8],
    ) -> Result<Option<&[u8]>, heed::Error> {
        let i = self.index(table, customer)?;
        let bytes = &self.open[i].bytes;
        Ok(find(bytes, slot))
    }

    /// Sets `slot` of `customer`'s record (read first by [`Records::get`]
    /// or read now).
    pub(crate) fn put(
        &mut self,
        table: &dyn StateTable,
        customer: &str,
        slot: &[u8],
        expiry: Expiry,
        value: &[u8],
    ) -> Result<(), heed::Error> {
        let i = self.index(table, customer)?;
        let open = &mut self.open[i];
        open.dirty = true;
        let end_ms = expiry.end_ms.unwrap_or(i64::MAX);
        let found = entries(&open.bytes).find(|e| open.bytes[e.slot.clone()] == *slot);
        let entry = &mut self.scratch;
        entry.clear();
        push_entry(entry, slot, end_ms, expiry.lateness_ms, value);
        match found {
            Some(e) if e.len() == entry.len() => {
                open.bytes[e.at..e.value.end].copy_from_slice(entry);
            }
            Some(e) => {
                open.bytes.splice(e.at..e.value.end, entry.iter().copied());
            }
            None => open.bytes.extend_from_slice(entry),
        }
        Ok(())
    }

    /// Writes back every record the event changed, leaving out instances
    /// the watermark has closed for good; forgets the records read.
    pub(crate) fn write_back(
        &mut self,
        table: &mut dyn StateTable,
        watermark_ms: i64,
        periods: &Periods,
    ) -> Result<(), heed::Error> {
        while let Some(mut open) = self.open.pop() {
            if open.dirty {
                prune(&mut open.bytes, &mut self.scratch, watermark_ms, periods);
                let key = key(&mut self.key, &open.customer);
                if open.bytes.len() > 1 {
                    table.put(key, &open.bytes)?;
                } else {
                    table.delete(key)?;
                }
            }
            self.spare.push(std::mem::take(&mut open.bytes));
        }
        Ok(())
    }

    /// Forgets records read but not written (the transaction is rolled
    /// back, or a new one begins).
    pub(crate) fn clear(&mut self) {
        self.open.clear();
    }
}

/// Removes the entries of instances that ended more than their lateness
/// before the watermark; resolves the end of periods that have ended.
fn prune(bytes: &mut Vec<u8>, out: &mut Vec<u8>, watermark_ms: i64, periods: &Periods) {
    let over = |e: &Entry, end_ms: i64| {
        end_ms != i64::MAX && watermark_ms > end_ms.saturating_add(e.lateness_ms)
    };
    // Most writes change nothing here: look before copying the record.
    let stale = entries(bytes).any(|e| {
        let end_ms = resolved_end(bytes, &e, periods);
        end_ms != e.end_ms || over(&e, end_ms)
    });
    if !stale {
        return;
    }
    out.clear();
    out.push(TAG);
    for e in entries(bytes) {
        let end_ms = resolved_end(bytes, &e, periods);
        if !over(&e, end_ms) {
            let (slot, value) = (&bytes[e.slot.clone()], &bytes[e.value.clone()]);
            push_entry(out, slot, end_ms, e.lateness_ms, value);
        }
    }
    std::mem::swap(bytes, out);
}

/// The entry's end, or its period's once the period has ended.
fn resolved_end(bytes: &[u8], e: &Entry, periods: &Periods) -> i64 {
    if e.end_ms != i64::MAX {
        return e.end_ms;
    }
    // Called for every entry on every write: no text decoding.
    window::period_id_bytes(slot_window(&bytes[e.slot.clone()]))
        .and_then(|id| periods.list.iter().find(|p| p.id.as_bytes() == id))
        .and_then(|p| p.end_ms)
        .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::table::MemoryTable;

    fn slot_of(rule: &str, window: &str) -> Vec<u8> {
        let mut s = Vec::new();
        slot(&mut s, rule, 1, window);
        s
    }

    const NEVER: Expiry = Expiry {
        end_ms: None,
        lateness_ms: 0,
    };

    #[test]
    fn entries_are_set_replaced_and_found() {
        let mut table = MemoryTable::new();
        let mut r = Records::default();
        let a = slot_of("a", "lifetime");
        let b = slot_of("b", "day:2026-11-23");
        assert_eq!(r.get(&table, "c1", &a).unwrap(), None);
        r.put(&table, "c1", &a, NEVER, b"one").unwrap();
        r.put(&table, "c1", &b, NEVER, b"two").unwrap();
        // Same length in place, another length spliced.
        r.put(&table, "c1", &a, NEVER, b"ONE").unwrap();
        r.put(&table, "c1", &b, NEVER, b"three").unwrap();
        r.put(&table, "c2", &a, NEVER, b"other").unwrap();
        r.write_back(&mut table, 0, &Periods::default()).unwrap();

        let mut kb = KeyBuf::default();
        let stored = table.get(key(&mut kb, "c1")).unwrap().unwrap().to_vec();
        assert_eq!(find(&stored, &a), Some(&b"ONE"[..]));
        assert_eq!(find(&stored, &b), Some(&b"three"[..]));
        assert_eq!(r.get(&table, "c2", &a).unwrap(), Some(&b"other"[..]));
        assert_eq!(r.get(&table, "c2", &b).unwrap(), None);
        // A truncated record yields what parses and nothing past its end.
        assert_eq!(find(&stored[..stored.len() - 1], &b), None);
        assert_eq!(find(&stored[..stored.len() - 1], &a), Some(&b"ONE"[..]));
        // The record key is the customer's prefix, so erasure's scan finds it.
        assert_eq!(table.prefixed(b"\x00\x02c1").unwrap().len(), 1);
    }

    #[test]
    fn closed_instances_are_forgotten_on_write() {
        let mut table = MemoryTable::new();
        let mut r = Records::default();
        let day = slot_of("d", "day:2026-11-23");
        let life = slot_of("l", "lifetime");
        let period = slot_of("p", "period:m1");
        let ends = |end| Expiry {
            end_ms: Some(end),
            lateness_ms: 100,
        };
        r.put(&table, "c", &day, ends(1_000), b"d").unwrap();
        r.put(&table, "c", &life, NEVER, b"l").unwrap();
        r.put(
            &table,
            "c",
            &period,
            Expiry {
                end_ms: None,
                lateness_ms: 100,
            },
            b"p",
        )
        .unwrap();
        // Within the lateness nothing goes.
        r.write_back(&mut table, 1_100, &Periods::default())
            .unwrap();
        let mut kb = KeyBuf::default();
        let stored =
            |t: &MemoryTable, kb: &mut KeyBuf| t.get(key(kb, "c")).unwrap().unwrap().to_vec();
        assert!(find(&stored(&table, &mut kb), &day).is_some());

        // Past it the day goes; the period stays while it is open.
        r.put(&table, "c", &life, NEVER, b"L").unwrap();
        let mut periods = Periods::default();
        periods.open("m1", 0);
        r.write_back(&mut table, 1_101, &periods).unwrap();
        let s = stored(&table, &mut kb);
        assert_eq!(find(&s, &day), None);
        assert_eq!(find(&s, &life), Some(&b"L"[..]));
        assert!(find(&s, &period).is_some());

        // Once the period has ended (and its lateness passed) it goes too.
        periods.close("m1", 2_000);
        r.put(&table, "c", &life, NEVER, b"L").unwrap();
        r.write_back(&mut table, 2_050, &periods).unwrap();
        assert!(find(&stored(&table, &mut kb), &period).is_some());
        r.put(&table, "c", &life, NEVER, b"L").unwrap();
        r.write_back(&mut table, 2_101, &periods).unwrap();
        let s = stored(&table, &mut kb);
        assert_eq!(find(&s, &period), None);
        assert_eq!(find(&s, &life), Some(&b"L"[..]));
    }
}
