//! Anti-cheat limits: source allow-lists and per-customer rates
//! (`max_per_customer`, `max_per_referrer`).
//!
//! A rate keeps the event times of the customer's latest counting events
//! for the rule (at most `n`, so at most 1000 × 8 bytes) in the customer's
//! own key space, where erasure finds it. Times are event times, so a
//! replayed batch is limited the way the live events were.

use super::state::{self, StoredState};
use super::table::StateTable;
use super::window::duration_ms;
use edge_config::Rate;

/// True when `source` is allowed by the rule's `sources` (absent: all).
pub fn source_allowed(sources: Option<&[String]>, source: &str) -> bool {
    let Some(sources) = sources else {
        return true;
    };
    sources
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => source.starts_with(prefix),
            None => pattern == source,
        })
}

/// A rate check whose write is deferred until every check of the event
/// passed, so an event refused by one limit uses up no other.
pub(crate) struct Admitted {
    key: Vec<u8>,
    times: Vec<i64>,
}

/// Checks `rate` at `time_ms` against the history under `key` (see
/// [`state::rate_key`]): `Ok(Some(_))` when the event may count (call
/// [`record`] if it does), `Ok(None)` when it is over.
pub(crate) fn check(
    table: &dyn StateTable,
    key: Vec<u8>,
    rate: &Rate,
    time_ms: i64,
) -> Result<Option<Admitted>, heed::Error> {
    let mut times = match table.get(&key)? {
        Some(bytes) => match state::decode(bytes) {
            Ok(StoredState::Rate(times)) => times,
            // Unreadable history limits nothing; it is rewritten below.
            _ => Vec::new(),
        },
        None => Vec::new(),
    };
    let from = time_ms.saturating_sub(duration_ms(rate.per));
    let within = times.iter().filter(|&&t| t > from && t <= time_ms).count();
    if within >= rate.count as usize {
        return Ok(None);
    }
    let at = times.partition_point(|&t| t <= time_ms);
    times.insert(at, time_ms);
    // Keep only what a later check can still need: the latest `n`.
    let excess = times.len().saturating_sub(rate.count as usize);
    times.drain(..excess);
    Ok(Some(Admitted { key, times }))
}

/// Stores an admitted event's rate history.
pub(crate) fn record(
    table: &mut dyn StateTable,
    value: &mut Vec<u8>,
    admitted: Admitted,
) -> Result<(), heed::Error> {
    state::encode(&StoredState::Rate(admitted.times), value)
        .map_err(|e| heed::Error::Encoding(Box::new(e)))?;
    table.put(&admitted.key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_match_exactly_or_by_prefix() {
        let allow = vec!["app/*".to_string(), "gate-1".to_string()];
        assert!(source_allowed(None, "anything"));
        assert!(source_allowed(Some(&allow), "app/ios"));
        assert!(source_allowed(Some(&allow), "gate-1"));
        assert!(!source_allowed(Some(&allow), "gate-10"));
        assert!(!source_allowed(Some(&allow), "ap"));
    }
}
