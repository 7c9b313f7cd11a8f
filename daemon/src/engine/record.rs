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

/// The bytes between an entry's slot and its value: end, lateness and
/// the value's length.
const FIXED: usize = 8 + 8 + 4;

/// Spare capacity a record is read into: a few new entries.
const HEADROOM: usize = 256;

/// The key of a customer's record: the customer's key prefix itself, so
/// it sorts first among the customer's keys (erasure finds it by prefix)
/// and meets no other key (they all extend the prefix).
pub(crate) fn key<'b>(buf: &'b mut KeyBuf, customer: &str) -> &'b [u8] {
    buf.start(customer).finish(usize::MAX)
}

/// The slot of a rule's state in a window instance.
pub(crate) fn slot(buf: &mut Vec<u8>, rule: &str, version: u32, window: &str) {
    buf.clear();
    push_slot_prefix(buf, rule, version);
    buf.extend_from_slice(window.as_bytes());
}

/// What every slot of a rule starts with: built once per compiled rule,
/// so the slot of each update is that and the window (see
/// [`slot_from`]).
pub(crate) fn slot_prefix(rule: &str, version: u32) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(1 + rule.len() + 4);
    push_slot_prefix(&mut buf, rule, version);
    buf.into_boxed_slice()
}

/// The slot of a rule's state in a window instance, from the rule's
/// [`slot_prefix`]: the same bytes as [`slot`].
pub(crate) fn slot_from(buf: &mut Vec<u8>, prefix: &[u8], window: &str) {
    buf.clear();
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(window.as_bytes());
}

fn push_slot_prefix(buf: &mut Vec<u8>, rule: &str, version: u32) {
    buf.push(u8::try_from(rule.len()).unwrap_or(u8::MAX));
    buf.extend_from_slice(rule.as_bytes());
    buf.extend_from_slice(&version.to_be_bytes());
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
    slot: std::ops::Range<usize>,
    end_ms: i64,
    lateness_ms: i64,
    value: std::ops::Range<usize>,
}

/// The entry that starts at `at`, if one parses there.
fn entry_at(bytes: &[u8], at: usize) -> Option<Entry> {
    let (n, value_end) = bounds(bytes, at)?;
    let slot = at + 2..at + 2 + n;
    let p = slot.end;
    let end_ms = i64::from_be_bytes(bytes.get(p..p + 8)?.try_into().ok()?);
    let lateness_ms = i64::from_be_bytes(bytes.get(p + 8..p + 16)?.try_into().ok()?);
    Some(Entry {
        slot,
        end_ms,
        lateness_ms,
        value: p + FIXED..value_end,
    })
}

/// The value in `slot` of a stored record (for readers outside the
/// engine's transaction: progress queries).
pub(crate) fn find<'r>(record: &'r [u8], slot: &[u8]) -> Option<&'r [u8]> {
    locate(record, slot)
        .ok()
        .map(|p| &record[p.value_start()..p.value_end])
}

/// Where `slot`'s entry is in a record or, when it has none, where its
/// entries that parse end: a new entry goes there, after the last entry
/// a search can reach. Every rule an event counts for looks up its
/// slot, so this reads only the lengths it needs to step from entry to
/// entry, and stops at the first entry that does not parse.
fn locate(bytes: &[u8], slot: &[u8]) -> Result<Place, usize> {
    if bytes.first() != Some(&TAG) {
        return Err(0);
    }
    let mut at = 1;
    loop {
        let Some((n, value_end)) = bounds(bytes, at) else {
            return Err(at);
        };
        let slot_end = at + 2 + n;
        if n == slot.len() && same_slot(&bytes[at + 2..slot_end], slot) {
            return Ok(Place {
                at,
                slot_end,
                value_end,
            });
        }
        at = value_end;
    }
}

/// The slot length and end of the entry at `at`, if one parses there.
fn bounds(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    let n = u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as usize;
    let len_at = at + 2 + n + 16;
    let v = u32::from_be_bytes(bytes.get(len_at..len_at + 4)?.try_into().ok()?) as usize;
    let value_end = len_at + 4 + v;
    (value_end <= bytes.len()).then_some((n, value_end))
}

/// Slot equality for slots of one length. Slots of different rules
/// mostly differ within their first eight bytes (the rule's id), and a
/// record holds many slots of one length, so those bytes are compared
/// in one step before the general comparison.
fn same_slot(a: &[u8], b: &[u8]) -> bool {
    match (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        (Some(x), Some(y)) => x == y && a[8..] == b[8..],
        _ => a == b,
    }
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

/// Where [`Records::get`] last looked, so the [`Records::put`] that
/// follows for the same slot (a rule's read, then its write) does not
/// search the record again.
#[derive(Debug, Clone, Copy)]
struct Looked {
    open: usize,
    /// The entry's place, or where a new one goes (see [`locate`]).
    entry: Result<Place, usize>,
}

/// An entry's byte ranges in a record.
#[derive(Debug, Clone, Copy)]
struct Place {
    at: usize,
    slot_end: usize,
    value_end: usize,
}

impl Place {
    fn value_start(&self) -> usize {
        self.slot_end + FIXED
    }
}

/// The records of the customers the current event touches (its subject,
/// and a referral's credited customer), written back once at its end.
#[derive(Default)]
pub(crate) struct Records {
    /// The first `used` are the event's; the rest keep their buffers for
    /// the next events.
    open: Vec<Open>,
    used: usize,
    key: KeyBuf,
    scratch: Vec<u8>,
    looked: Option<Looked>,
    /// The slot of the last look.
    looked_slot: Vec<u8>,
}

/// A record opened for the current event by [`Records::open`]; it names
/// that record until the event's records are written back or cleared.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rec(usize);

impl Records {
    /// `customer`'s record, read from `table` on the event's first use.
    pub(crate) fn open(
        &mut self,
        table: &dyn StateTable,
        customer: &str,
    ) -> Result<Rec, heed::Error> {
        if let Some(i) = self.open[..self.used]
            .iter()
            .position(|o| o.customer == customer)
        {
            return Ok(Rec(i));
        }
        let stored = match table.get(key(&mut self.key, customer))? {
            Some(stored) if stored.first() == Some(&TAG) => stored,
            _ => &[TAG][..],
        };
        if self.used == self.open.len() {
            self.open.push(Open::default());
        }
        let open = &mut self.open[self.used];
        open.customer.clear();
        open.customer.push_str(customer);
        open.dirty = false;
        // Room for the entries the event may add, so they do not regrow it.
        let room = stored.len() + HEADROOM;
        if open.bytes.capacity() < room {
            open.bytes = Vec::with_capacity(room);
        }
        open.bytes.clear();
        open.bytes.extend_from_slice(stored);
        self.used += 1;
        Ok(Rec(self.used - 1))
    }

    /// The value in `slot` of an open record.
    pub(crate) fn get(&mut self, rec: Rec, slot: &[u8]) -> Option<&[u8]> {
        let i = rec.0;
        let bytes = &self.open[i].bytes;
        let found = locate(bytes, slot);
        self.looked_slot.clear();
        self.looked_slot.extend_from_slice(slot);
        self.looked = Some(Looked {
            open: i,
            entry: found,
        });
        found.ok().map(|p| &bytes[p.value_start()..p.value_end])
    }

    /// Sets `slot` of an open record (usually read first by
    /// [`Records::get`]).
    pub(crate) fn put(&mut self, rec: Rec, slot: &[u8], expiry: Expiry, value: &[u8]) {
        let looked = self.looked.take();
        let i = rec.0;
        let open = &mut self.open[i];
        open.dirty = true;
        let end_ms = expiry.end_ms.unwrap_or(i64::MAX);
        // The last look holds when it was for this slot of this record:
        // only a put changes a record, and a put forgets the look.
        let place = match looked {
            Some(l) if l.open == i && self.looked_slot == slot => l.entry,
            _ => locate(&open.bytes, slot),
        };
        match place {
            // Same length: the entry is rewritten where it is.
            Ok(p) if p.value_end - p.slot_end == FIXED + value.len() => {
                let tail = &mut open.bytes[p.slot_end..p.value_end];
                tail[..8].copy_from_slice(&end_ms.to_be_bytes());
                tail[8..16].copy_from_slice(&expiry.lateness_ms.to_be_bytes());
                tail[FIXED..].copy_from_slice(value);
            }
            Ok(p) => {
                let entry = &mut self.scratch;
                entry.clear();
                push_entry(entry, slot, end_ms, expiry.lateness_ms, value);
                open.bytes.splice(p.at..p.value_end, entry.iter().copied());
            }
            Err(end) => {
                // Past a tail that does not parse, no search would find
                // the entry: it replaces the tail.
                open.bytes.truncate(end.max(1));
                push_entry(&mut open.bytes, slot, end_ms, expiry.lateness_ms, value);
            }
        }
    }

    /// Writes back every record the event changed, leaving out instances
    /// the watermark has closed for good; forgets the records read.
    pub(crate) fn write_back(
        &mut self,
        table: &mut dyn StateTable,
        watermark_ms: i64,
        periods: &Periods,
    ) -> Result<(), heed::Error> {
        let used = std::mem::take(&mut self.used);
        self.looked = None;
        for open in &mut self.open[..used] {
            if !open.dirty {
                continue;
            }
            prune(&mut open.bytes, watermark_ms, periods);
            let key = key(&mut self.key, &open.customer);
            if open.bytes.len() > 1 {
                table.put(key, &open.bytes)?;
            } else {
                table.delete(key)?;
            }
        }
        Ok(())
    }

    /// Forgets records read but not written (the transaction is rolled
    /// back, or a new one begins).
    pub(crate) fn clear(&mut self) {
        self.looked = None;
        self.used = 0;
    }
}

/// Removes the entries of instances that ended more than their lateness
/// before the watermark; resolves the end of periods that have ended.
/// In place, in one pass: most writes change nothing here, and the
/// entries that stay are moved down over the ones that go.
fn prune(bytes: &mut Vec<u8>, watermark_ms: i64, periods: &Periods) {
    // Open ends resolve only once some period has ended.
    let ended = periods.list.iter().any(|p| p.end_ms.is_some());
    let mut at = usize::from(bytes.first() == Some(&TAG));
    if at == 0 {
        return;
    }
    // Entries before `kept` are final; `at` is the next one to look at.
    let mut kept = at;
    while let Some(e) = entry_at(bytes, at) {
        let next = e.value.end;
        let end_ms = if ended {
            resolved_end(bytes, &e, periods)
        } else {
            e.end_ms
        };
        let over = end_ms != i64::MAX && watermark_ms > end_ms.saturating_add(e.lateness_ms);
        if !over {
            if kept != at {
                bytes.copy_within(at..next, kept);
            }
            if end_ms != e.end_ms {
                let end_at = kept + (e.slot.end - at);
                bytes[end_at..end_at + 8].copy_from_slice(&end_ms.to_be_bytes());
            }
            kept += next - at;
        }
        at = next;
    }
    // A tail that does not parse is dropped: no search reaches past it.
    bytes.truncate(kept);
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

    /// Walks a record's entries; stops at the first that does not parse (a
    /// truncated record loses its tail, never reads past it).
    fn entries(bytes: &[u8]) -> impl Iterator<Item = Entry> + '_ {
        let mut at = usize::from(bytes.first() == Some(&TAG));
        if at == 0 {
            at = bytes.len();
        }
        std::iter::from_fn(move || {
            let e = entry_at(bytes, at)?;
            at = e.value.end;
            Some(e)
        })
    }

    fn slot_of(rule: &str, window: &str) -> Vec<u8> {
        let mut s = Vec::new();
        slot(&mut s, rule, 1, window);
        s
    }

    const NEVER: Expiry = Expiry {
        end_ms: None,
        lateness_ms: 0,
    };

    /// Opens `customer`'s record and reads `slot`, as a rule does.
    fn get<'r>(
        r: &'r mut Records,
        table: &MemoryTable,
        customer: &str,
        slot: &[u8],
    ) -> Result<Option<&'r [u8]>, heed::Error> {
        let rec = r.open(table, customer)?;
        Ok(r.get(rec, slot))
    }

    /// Opens `customer`'s record and sets `slot`, as a rule does.
    fn put(
        r: &mut Records,
        table: &MemoryTable,
        customer: &str,
        slot: &[u8],
        expiry: Expiry,
        value: &[u8],
    ) -> Result<(), heed::Error> {
        let rec = r.open(table, customer)?;
        r.put(rec, slot, expiry, value);
        Ok(())
    }

    #[test]
    fn entries_are_set_replaced_and_found() {
        let mut table = MemoryTable::new();
        let mut r = Records::default();
        let a = slot_of("a", "lifetime");
        let b = slot_of("b", "day:2026-11-23");
        assert_eq!(get(&mut r, &table, "c1", &a).unwrap(), None);
        put(&mut r, &table, "c1", &a, NEVER, b"one").unwrap();
        put(&mut r, &table, "c1", &b, NEVER, b"two").unwrap();
        // Same length in place, another length spliced.
        put(&mut r, &table, "c1", &a, NEVER, b"ONE").unwrap();
        put(&mut r, &table, "c1", &b, NEVER, b"three").unwrap();
        put(&mut r, &table, "c2", &a, NEVER, b"other").unwrap();
        r.write_back(&mut table, 0, &Periods::default()).unwrap();

        let mut kb = KeyBuf::default();
        let stored = table.get(key(&mut kb, "c1")).unwrap().unwrap().to_vec();
        assert_eq!(find(&stored, &a), Some(&b"ONE"[..]));
        assert_eq!(find(&stored, &b), Some(&b"three"[..]));
        assert_eq!(get(&mut r, &table, "c2", &a).unwrap(), Some(&b"other"[..]));
        assert_eq!(get(&mut r, &table, "c2", &b).unwrap(), None);
        // A truncated record yields what parses and nothing past its end.
        assert_eq!(find(&stored[..stored.len() - 1], &b), None);
        assert_eq!(find(&stored[..stored.len() - 1], &a), Some(&b"ONE"[..]));
        // The record key is the customer's prefix, so erasure's scan finds it.
        assert_eq!(table.prefixed(b"\x00\x02c1").unwrap().len(), 1);
    }

    #[test]
    fn a_put_after_another_slot_was_read_finds_its_own_entry() {
        let mut table = MemoryTable::new();
        let mut r = Records::default();
        let (a, b, c) = (
            slot_of("a", "lifetime"),
            slot_of("b", "lifetime"),
            slot_of("c", "lifetime"),
        );
        put(&mut r, &table, "x", &a, NEVER, b"a1").unwrap();
        put(&mut r, &table, "x", &b, NEVER, b"b1").unwrap();
        // Looked for a missing slot, then wrote two others: neither may be
        // appended as if it were the missing one.
        assert_eq!(get(&mut r, &table, "x", &c).unwrap(), None);
        put(&mut r, &table, "x", &b, NEVER, b"b2").unwrap();
        put(&mut r, &table, "x", &a, NEVER, b"a-longer").unwrap();
        // Found one slot, then wrote another before it.
        assert_eq!(get(&mut r, &table, "x", &b).unwrap(), Some(&b"b2"[..]));
        put(&mut r, &table, "x", &a, NEVER, b"a3").unwrap();
        put(&mut r, &table, "x", &b, NEVER, b"b-longer").unwrap();
        assert_eq!(get(&mut r, &table, "x", &c).unwrap(), None);
        put(&mut r, &table, "x", &c, NEVER, b"c1").unwrap();
        r.write_back(&mut table, 0, &Periods::default()).unwrap();
        let mut kb = KeyBuf::default();
        let stored = table.get(key(&mut kb, "x")).unwrap().unwrap().to_vec();
        assert_eq!(entries(&stored).count(), 3);
        assert_eq!(find(&stored, &a), Some(&b"a3"[..]));
        assert_eq!(find(&stored, &b), Some(&b"b-longer"[..]));
        assert_eq!(find(&stored, &c), Some(&b"c1"[..]));
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
        put(&mut r, &table, "c", &day, ends(1_000), b"d").unwrap();
        put(&mut r, &table, "c", &life, NEVER, b"l").unwrap();
        put(
            &mut r,
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
        put(&mut r, &table, "c", &life, NEVER, b"L").unwrap();
        let mut periods = Periods::default();
        periods.open("m1", 0);
        r.write_back(&mut table, 1_101, &periods).unwrap();
        let s = stored(&table, &mut kb);
        assert_eq!(find(&s, &day), None);
        assert_eq!(find(&s, &life), Some(&b"L"[..]));
        assert!(find(&s, &period).is_some());

        // Once the period has ended (and its lateness passed) it goes too.
        periods.close("m1", 2_000);
        put(&mut r, &table, "c", &life, NEVER, b"L").unwrap();
        r.write_back(&mut table, 2_050, &periods).unwrap();
        assert!(find(&stored(&table, &mut kb), &period).is_some());
        put(&mut r, &table, "c", &life, NEVER, b"L").unwrap();
        r.write_back(&mut table, 2_101, &periods).unwrap();
        let s = stored(&table, &mut kb);
        assert_eq!(find(&s, &period), None);
        assert_eq!(find(&s, &life), Some(&b"L"[..]));
    }

    #[test]
    fn pruning_moves_what_stays_over_what_goes_and_resolves_period_ends() {
        let mut table = MemoryTable::new();
        let mut r = Records::default();
        let (a, p, l, b) = (
            slot_of("a", "day:2026-11-23"),
            slot_of("p", "period:m1"),
            slot_of("l", "lifetime"),
            slot_of("b", "day:2026-11-24"),
        );
        let ends = |end| Expiry {
            end_ms: Some(end),
            lateness_ms: 100,
        };
        let open = Expiry {
            end_ms: None,
            lateness_ms: 100,
        };
        put(&mut r, &table, "c", &a, ends(1_000), b"a").unwrap();
        put(&mut r, &table, "c", &p, open, b"period").unwrap();
        put(&mut r, &table, "c", &b, ends(1_050), b"b").unwrap();
        put(&mut r, &table, "c", &l, NEVER, b"life").unwrap();
        r.write_back(&mut table, 0, &Periods::default()).unwrap();

        // Two entries go; the period's end is written where it lands.
        let mut periods = Periods::default();
        periods.open("m1", 0);
        periods.close("m1", 5_000);
        put(&mut r, &table, "c", &l, NEVER, b"LIFE").unwrap();
        r.write_back(&mut table, 1_151, &periods).unwrap();
        let mut kb = KeyBuf::default();
        let stored = table.get(key(&mut kb, "c")).unwrap().unwrap().to_vec();
        let kept: Vec<(Vec<u8>, i64, Vec<u8>)> = entries(&stored)
            .map(|e| (stored[e.slot].to_vec(), e.end_ms, stored[e.value].to_vec()))
            .collect();
        assert_eq!(
            kept,
            vec![
                (p.clone(), 5_000, b"period".to_vec()),
                (l.clone(), i64::MAX, b"LIFE".to_vec()),
            ]
        );
        // A slot built from the rule's prefix is the same slot.
        let mut from = Vec::new();
        slot_from(&mut from, &slot_prefix("p", 1), "period:m1");
        assert_eq!(from, p);
    }

    #[test]
    fn a_tail_that_does_not_parse_is_dropped_and_new_entries_take_its_place() {
        let mut table = MemoryTable::new();
        let mut kb = KeyBuf::default();
        let a = slot_of("a", "lifetime");
        let mut bytes = vec![TAG];
        push_entry(&mut bytes, &a, i64::MAX, 0, b"one");
        let whole = bytes.len();
        // Half an entry: a slot length and nothing after it.
        bytes.extend_from_slice(&[0, 9, 1]);
        table.put(key(&mut kb, "c"), &bytes).unwrap();
        let mut r = Records::default();
        put(&mut r, &table, "c", &a, NEVER, b"two").unwrap();
        r.write_back(&mut table, 0, &Periods::default()).unwrap();
        let stored = table.get(key(&mut kb, "c")).unwrap().unwrap().to_vec();
        assert_eq!(stored.len(), whole);
        assert_eq!(find(&stored, &a), Some(&b"two"[..]));

        // A new entry takes the tail's place, so it can be found again.
        bytes.truncate(whole);
        bytes.extend_from_slice(&[0, 9, 1]);
        table.put(key(&mut kb, "c"), &bytes).unwrap();
        let b = slot_of("b", "lifetime");
        put(&mut r, &table, "c", &b, NEVER, b"new").unwrap();
        r.write_back(&mut table, 0, &Periods::default()).unwrap();
        let stored = table.get(key(&mut kb, "c")).unwrap().unwrap().to_vec();
        assert_eq!(find(&stored, &a), Some(&b"one"[..]));
        assert_eq!(find(&stored, &b), Some(&b"new"[..]));
    }

    proptest::proptest! {
        /// Within one event, reads see every earlier write to the record,
        /// whether it rewrote an entry in place, spliced one of another
        /// length (moving every later entry) or appended one; the record
        /// written back holds the same.
        #[test]
        fn an_open_record_reads_what_was_written_to_it(
            ops in proptest::collection::vec((0usize..6, 0usize..40, proptest::bool::ANY), 1..60),
        ) {
            let mut table = MemoryTable::new();
            let mut kb = KeyBuf::default();
            let slots: Vec<Vec<u8>> = (0..6)
                .map(|k| slot_of(&format!("rule-{}", k % 3), &format!("w{}", k / 3)))
                .collect();
            let mut model: Vec<Option<Vec<u8>>> = vec![None; slots.len()];
            let mut r = Records::default();
            for (step, (k, len, read_first)) in ops.into_iter().enumerate() {
                // A new event every tenth write: the record is read again.
                if step % 10 == 0 {
                    r.write_back(&mut table, 0, &Periods::default()).unwrap();
                }
                let value = vec![u8::try_from(step % 251).unwrap(); len];
                let rec = r.open(&table, "c").unwrap();
                if read_first {
                    proptest::prop_assert_eq!(r.get(rec, &slots[k]), model[k].as_deref());
                }
                r.put(rec, &slots[k], NEVER, &value);
                model[k] = Some(value);
                for (j, slot) in slots.iter().enumerate() {
                    proptest::prop_assert_eq!(r.get(rec, slot), model[j].as_deref());
                }
            }
            r.write_back(&mut table, 0, &Periods::default()).unwrap();
            let stored = table.get(key(&mut kb, "c")).unwrap().unwrap().to_vec();
            for (j, slot) in slots.iter().enumerate() {
                proptest::prop_assert_eq!(find(&stored, slot), model[j].as_deref());
            }
        }
    }
}
