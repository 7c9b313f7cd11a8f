//! Persisted engine state and its keys.
//!
//! Values are postcard wrapped in a top-level enum whose variants are only
//! ever appended, so old records still decode. Keys come in two spaces:
//!
//! - customer keys start with the customer (`len16 ‖ id`), so one prefix
//!   scan finds everything kept about a customer (erasure relies on it):
//!   rule state per (rule, version, window instance), rate-limit history,
//!   group membership and period activity;
//! - site keys start with an empty customer (`0x0000`; subjects are never
//!   empty): the watermark, the period registry, voucher counters, shared
//!   (group and venue) rule state and the indexes that list a group's
//!   members and a period's active customers.
//!
//! Index keys that name a customer are also stored in the customer's own
//! record ([`MemberState::index`], [`Activity::index`]) so erasing the
//! customer can delete them without scanning the site space.

use serde::{Deserialize, Serialize};

use super::measure::MeasureState;
use super::window::Periods;
use crate::store::keys::KeyBuf;

/// Natural keys longer than this are hashed (LMDB limit: 511 bytes).
const MAX_STATE_KEY: usize = 400;
/// Index keys must stay natural (they are scanned by prefix): their parts
/// are bounded (customer 256, rule 64, window and group below) so they fit.
const MAX_INDEX_KEY: usize = 511;
/// Group names longer than this are kept as a hash in keys.
pub const MAX_GROUP_NAME: usize = 100;

/// Versioned envelope of customer-space and shared rule records.
#[derive(Debug, Serialize, Deserialize)]
pub enum StoredState {
    V1(RuleState),
    /// Event times of the latest counting events (a rate limit's history),
    /// oldest first.
    Rate(Vec<i64>),
    /// A customer's part in a shared goal.
    Member(MemberState),
    /// What a customer earned during a period (for its summary).
    Activity(Activity),
}

/// Envelope of site-wide singletons.
#[derive(Debug, Serialize, Deserialize)]
pub enum StoredGlobal {
    /// The highest event time accepted so far (capped at the wall clock).
    Watermark(i64),
    Periods(Periods),
    /// A counter: voucher codes handed out from a pool, or template
    /// numbers used by a (rule, tier).
    Counter(u64),
}

/// One rule's progress for one customer (or group) in one window instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub measure: MeasureState,
    /// Tiers awarded so far. Tiers are strictly ordered, so the awarded
    /// ones are always a prefix and a count says which: each tier is
    /// awarded exactly once per window instance.
    pub tiers_awarded: u32,
    /// Event time of the first and latest events that changed the state.
    pub first_ms: i64,
    pub updated_ms: i64,
}

impl RuleState {
    pub fn new(measure: MeasureState, time_ms: i64) -> RuleState {
        RuleState {
            measure,
            tiers_awarded: 0,
            first_ms: time_ms,
            updated_ms: time_ms,
        }
    }
}

/// A member's share of a group or venue goal in one window instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    /// The member's own contribution (events, or the sum of their values).
    pub share: f64,
    /// The goal's tiers awarded to this member.
    pub tiers_awarded: u32,
    /// The group (empty for `venue`).
    pub group: String,
    /// The key of this member's entry in the goal's member index.
    pub index: Vec<u8>,
}

/// A customer's rewards within one period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub points: Vec<(String, i64)>,
    pub badges: Vec<String>,
    /// The key of this customer's entry in the period's activity index.
    pub index: Vec<u8>,
}

/// The key of a customer's rule state:
/// `len16(customer) ‖ customer ‖ len8(rule) ‖ rule ‖ version ‖ window`.
pub(crate) fn key<'b>(
    buf: &'b mut KeyBuf,
    customer: &str,
    rule: &str,
    version: u32,
    window: &str,
) -> &'b [u8] {
    buf.start(customer)
        .short(rule)
        .u32(version)
        .rest(window)
        .finish(MAX_STATE_KEY)
}

/// The key of a customer's rate history for a rule (`what`: `rate` or
/// `referral`). Window names never start with a NUL, so these keys do not
/// meet state keys.
pub(crate) fn rate_key<'b>(
    buf: &'b mut KeyBuf,
    customer: &str,
    rule: &str,
    version: u32,
    what: &str,
) -> &'b [u8] {
    buf.start(customer)
        .short(rule)
        .u32(version)
        .rest("\0")
        .rest(what)
        .finish(MAX_STATE_KEY)
}

/// The key of a customer's activity record in a period.
pub(crate) fn activity_key<'b>(buf: &'b mut KeyBuf, customer: &str, period: &str) -> &'b [u8] {
    buf.start(customer)
        .short("")
        .rest(period)
        .finish(MAX_STATE_KEY)
}

/// A site-wide singleton's key.
pub(crate) fn global_key<'b>(buf: &'b mut KeyBuf, name: &str) -> &'b [u8] {
    buf.start("").short("").rest(name).finish(MAX_STATE_KEY)
}

/// `customer`'s entry in a period's activity index; with `""`, the
/// prefix every entry of the period starts with.
pub(crate) fn activity_index_key(period: &str, customer: &str) -> Vec<u8> {
    let mut buf = KeyBuf::with_capacity(16 + period.len() + customer.len());
    buf.start("")
        .short("")
        .rest("active\0")
        .rest(period)
        .rest("\0");
    index_entry(buf, customer)
}

/// An index's prefix (hashed when too long) and then the member's id,
/// built at its final size: a customer's first event in a period (or in
/// a group goal) builds one.
fn index_entry(prefix: KeyBuf, member: &str) -> Vec<u8> {
    let mut key = prefix.into_key(MAX_INDEX_KEY);
    key.extend_from_slice(member.as_bytes());
    key
}

/// The shared state key of a group goal.
pub(crate) fn group_key<'b>(
    buf: &'b mut KeyBuf,
    rule: &str,
    version: u32,
    window: &str,
    group: &str,
) -> &'b [u8] {
    buf.start("")
        .short(rule)
        .u32(version)
        .rest("g\0")
        .rest(window)
        .rest("\0")
        .rest(group)
        .finish(MAX_STATE_KEY)
}

/// `customer`'s entry in a group goal's member index; with `""`, the
/// prefix every member's entry starts with.
pub(crate) fn member_index_key(
    rule: &str,
    version: u32,
    window: &str,
    group: &str,
    customer: &str,
) -> Vec<u8> {
    let mut buf =
        KeyBuf::with_capacity(32 + rule.len() + window.len() + group.len() + customer.len());
    buf.start("")
        .short(rule)
        .u32(version)
        .rest("m\0")
        .rest(window)
        .rest("\0")
        .rest(group)
        .rest("\0");
    index_entry(buf, customer)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<StoredState, postcard::Error> {
    postcard::from_bytes::<StoredState>(bytes)
}

/// Encodes a customer's rule state as `StoredState::V1` into `buf`
/// (cleared first), without wrapping it: the state is still the
/// caller's, and a state is encoded on every update.
pub(crate) fn encode_rule(state: &RuleState, buf: &mut Vec<u8>) {
    buf.clear();
    wire::rule_state(state, buf);
}

/// Encodes into `buf` (cleared first).
pub(crate) fn encode(state: &StoredState, buf: &mut Vec<u8>) -> Result<(), postcard::Error> {
    buf.clear();
    match state {
        StoredState::V1(rule) => {
            wire::rule_state(rule, buf);
            Ok(())
        }
        other => postcard::serialize_with_flavor(other, Append(buf)),
    }
}

/// Postcard's output straight into a borrowed `Vec`, where postcard's
/// general `Extend` output goes through an iterator per byte.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A rule state in postcard's wire format, written directly.
///
/// Every rule state an event changes is encoded again, and serde's
/// general path costs several times the bytes it writes. The bytes are
/// postcard's own (a property test holds the two to the same output), so
/// [`decode`] and every stored record are unaffected. The matches are
/// exhaustive: a new measure variant does not compile until it is
/// written here too.
mod wire {
    use super::{MeasureState, RuleState};

    /// `StoredState::V1`'s variant index.
    const V1: u8 = 0;

    pub(super) fn rule_state(s: &RuleState, out: &mut Vec<u8>) {
        out.push(V1);
        match &s.measure {
            MeasureState::Count(n) => {
                out.push(0);
                unsigned(out, *n);
            }
            MeasureState::Sum(v) => {
                out.push(1);
                float(out, *v);
            }
            MeasureState::Distinct(keys) => {
                out.push(2);
                unsigned(out, keys.len() as u64);
                for key in keys {
                    unsigned(out, key.len() as u64);
                    out.extend_from_slice(key.as_bytes());
                }
            }
            MeasureState::Extreme(v) => {
                out.push(3);
                option(out, *v, float);
            }
            MeasureState::Streak { last, len } => {
                out.push(4);
                option(out, *last, signed);
                unsigned(out, *len);
            }
            MeasureState::Sequence {
                next,
                start_ms,
                runs,
            } => {
                out.push(5);
                unsigned(out, u64::from(*next));
                signed(out, *start_ms);
                unsigned(out, *runs);
            }
            MeasureState::Rolling {
                buckets,
                start_ms,
                latest_ms,
            } => {
                out.push(6);
                unsigned(out, buckets.len() as u64);
                for (at, v) in buckets {
                    signed(out, *at);
                    float(out, *v);
                }
                signed(out, *start_ms);
                signed(out, *latest_ms);
            }
            MeasureState::Share(v) => {
                out.push(7);
                float(out, *v);
            }
        }
        unsigned(out, u64::from(s.tiers_awarded));
        signed(out, s.first_ms);
        signed(out, s.updated_ms);
    }

    /// Seven bits per byte, low first; the high bit says more follow.
    fn unsigned(out: &mut Vec<u8>, mut n: u64) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    /// Zigzag, so small negative numbers stay short.
    fn signed(out: &mut Vec<u8>, n: i64) {
        unsigned(out, ((n << 1) ^ (n >> 63)) as u64);
    }

    /// A tag byte, 0 for none, 1 followed by the value.
    fn option<T>(out: &mut Vec<u8>, v: Option<T>, write: fn(&mut Vec<u8>, T)) {
        match v {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                write(out, v);
            }
        }
    }

    fn float(out: &mut Vec<u8>, v: f64) {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn decode_global(bytes: &[u8]) -> Result<StoredGlobal, postcard::Error> {
    postcard::from_bytes::<StoredGlobal>(bytes)
}

pub(crate) fn encode_global(value: &StoredGlobal) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn measure() -> impl Strategy<Value = MeasureState> {
        let float = prop_oneof![
            any::<f64>(),
            Just(0.0),
            Just(-0.0),
            Just(f64::NAN),
            Just(f64::INFINITY)
        ];
        prop_oneof![
            any::<u64>().prop_map(MeasureState::Count),
            float.clone().prop_map(MeasureState::Sum),
            proptest::collection::vec(".{0,40}", 0..20).prop_map(MeasureState::Distinct),
            proptest::option::of(float.clone()).prop_map(MeasureState::Extreme),
            (proptest::option::of(any::<i64>()), any::<u64>())
                .prop_map(|(last, len)| MeasureState::Streak { last, len }),
            (any::<u32>(), any::<i64>(), any::<u64>()).prop_map(|(next, start_ms, runs)| {
                MeasureState::Sequence {
                    next,
                    start_ms,
                    runs,
                }
            }),
            (
                proptest::collection::vec((any::<i64>(), float.clone()), 0..70),
                any::<i64>(),
                any::<i64>()
            )
                .prop_map(|(buckets, start_ms, latest_ms)| MeasureState::Rolling {
                    buckets,
                    start_ms,
                    latest_ms,
                }),
            float.prop_map(MeasureState::Share),
        ]
    }

    proptest! {
        #[test]
        fn rule_states_are_written_as_postcard_writes_them(
            measure in measure(),
            tiers_awarded in any::<u32>(),
            first_ms in any::<i64>(),
            updated_ms in any::<i64>(),
        ) {
            let rule = RuleState { measure, tiers_awarded, first_ms, updated_ms };
            let mut direct = vec![1; 2];
            encode_rule(&rule, &mut direct);
            let state = StoredState::V1(rule);
            let mut buf = vec![9; 5];
            encode(&state, &mut buf).unwrap();
            prop_assert_eq!(&buf, &postcard::to_allocvec(&state).unwrap());
            prop_assert_eq!(&direct, &buf);
        }
    }

    #[test]
    fn a_large_state_encodes_as_postcard_and_decodes_back() {
        let keys: Vec<String> = (0..500).map(|i| format!("zone-{i}")).collect();
        let state = StoredState::V1(RuleState::new(MeasureState::Distinct(keys.clone()), 1));
        let mut buf = vec![7; 3];
        encode(&state, &mut buf).unwrap();
        assert_eq!(buf, postcard::to_allocvec(&state).unwrap());
        match decode(&buf).unwrap() {
            StoredState::V1(s) => assert_eq!(s.measure, MeasureState::Distinct(keys)),
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn round_trip_and_key_layout() {
        let mut buf = Vec::new();
        let state = StoredState::V1(RuleState::new(MeasureState::Count(3), 1000));
        encode(&state, &mut buf).unwrap();
        // Version byte first: records written before the other variants
        // existed still decode.
        assert_eq!(buf[0], 0);
        match decode(&buf).unwrap() {
            StoredState::V1(s) => assert_eq!(s.measure, MeasureState::Count(3)),
            other => panic!("{other:?}"),
        }

        let mut kb = KeyBuf::default();
        let k = key(&mut kb, "c1", "r", 2, "lifetime").to_vec();
        assert_eq!(&k[..4], b"\x00\x02c1");
        assert_eq!(&k[4..6], b"\x01r");
        assert_eq!(&k[6..10], &2u32.to_be_bytes());
        assert_eq!(&k[10..], b"lifetime");

        let long = "c".repeat(1000);
        assert_eq!(key(&mut kb, &long, "r", 1, "lifetime").len(), 33);

        // Site keys never share a prefix with a customer's keys.
        let site = global_key(&mut kb, "watermark").to_vec();
        assert!(site.starts_with(b"\x00\x00"));
        assert!(!k.starts_with(b"\x00\x00"));
        // A member index entry extends the group's prefix.
        let prefix = member_index_key("r", 1, "period:m1", "101", "");
        assert!(prefix.starts_with(b"\x00\x00\x01r"));
        let entry = member_index_key("r", 1, "period:m1", "101", "fan-7");
        assert_eq!(entry, [&prefix[..], b"fan-7"].concat());
        // Also when the prefix is too long and hashed.
        let period = "p".repeat(600);
        let prefix = activity_index_key(&period, "");
        assert_eq!(prefix.len(), 33);
        let entry = activity_index_key(&period, "fan-7");
        assert_eq!(entry, [&prefix[..], b"fan-7"].concat());
    }
}
