//! Persisted per-(customer, rule, version, window instance) state.
//!
//! The value is postcard wrapped in a top-level version enum, so a later
//! format is a new variant and old records still decode. The key starts
//! with the customer so one customer's state is contiguous (profiles later
//! read it with a prefix scan).

use serde::{Deserialize, Serialize};

use super::measure::MeasureState;
use crate::store::keys::KeyBuf;

/// Natural keys longer than this are hashed (LMDB limit: 511 bytes).
const MAX_STATE_KEY: usize = 400;

/// Versioned envelope; the discriminant is the format version.
#[derive(Debug, Serialize, Deserialize)]
pub enum StoredState {
    V1(RuleState),
}

/// One rule's progress for one customer in one window instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub measure: MeasureState,
    /// Tiers awarded so far. Tiers are strictly ascending, so the awarded
    /// ones are always a prefix and a count says which: each tier is
    /// awarded exactly once.
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

/// Builds the key `len16(customer) ‖ customer ‖ len8(rule) ‖ rule ‖
/// version(BE u32) ‖ window instance`.
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

pub(crate) fn decode(bytes: &[u8]) -> Result<RuleState, postcard::Error> {
    match postcard::from_bytes::<StoredState>(bytes)? {
        StoredState::V1(state) => Ok(state),
    }
}

/// Encodes into `buf` (cleared first) and hands the state back.
pub(crate) fn encode(state: RuleState, buf: &mut Vec<u8>) -> Result<RuleState, postcard::Error> {
    buf.clear();
    let stored = StoredState::V1(state);
    let out = postcard::to_extend(&stored, std::mem::take(buf))?;
    *buf = out;
    let StoredState::V1(state) = stored;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_key_layout() {
        let mut buf = Vec::new();
        let state = RuleState::new(MeasureState::Count(3), 1000);
        let state = encode(state, &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap(), state);
        // Version byte first.
        assert_eq!(buf[0], 0);

        let mut kb = KeyBuf::default();
        let k = key(&mut kb, "c1", "r", 2, "lifetime").to_vec();
        assert_eq!(&k[..4], b"\x00\x02c1");
        assert_eq!(&k[4..6], b"\x01r");
        assert_eq!(&k[6..10], &2u32.to_be_bytes());
        assert_eq!(&k[10..], b"lifetime");

        let long = "c".repeat(1000);
        assert_eq!(key(&mut kb, &long, "r", 1, "lifetime").len(), 33);
    }
}
