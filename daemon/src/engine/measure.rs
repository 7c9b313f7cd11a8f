//! Measures: how a counting event moves a rule's value.
//!
//! Each `Measure` kind has a state variant here and one arm in each
//! function below. The engine has already decided that the event counts
//! (type, `when`, sources, window, lateness, limits) and evaluated the
//! rule's expression (`value` or `key`) into an [`Input`]; what is left is
//! pure arithmetic on the persisted state, which keeps this file easy to
//! test. Variants are only ever appended (postcard encodes the index).

use edge_config::{Every, Measure};
use serde::{Deserialize, Serialize};

/// Keys of a `distinct` measure longer than this are kept as a hash.
const MAX_DISTINCT_KEY: usize = 128;

/// The persisted state of one measure for one (customer, rule, window).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MeasureState {
    /// `count`: counting events seen.
    Count(u64),
    /// `sum`: the sum of their values.
    Sum(f64),
    /// `distinct`: the different keys seen, sorted, at most as many as the
    /// highest tier needs.
    Distinct(Vec<String>),
    /// `max` / `min`: the extreme value seen.
    Extreme(Option<f64>),
    /// `streak`: the last counting instance (day number or period
    /// ordinal) and the length of the run ending there.
    Streak { last: Option<i64>, len: u64 },
    /// `sequence`: the next step to complete, the event time of the run's
    /// first step, and the runs completed.
    Sequence { next: u32, start_ms: i64, runs: u64 },
    /// `rolling` count or sum: per-bucket totals (bucket = 1/60 of the
    /// span), the run's start, and the latest event time seen.
    Rolling {
        buckets: Vec<(i64, f64)>,
        start_ms: i64,
        latest_ms: i64,
    },
    /// A member's own share of a `group` or `venue` goal: the number of
    /// their counting events, or the sum of their values.
    Share(f64),
}

/// What the engine evaluated for the event, by measure.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `count`, `streak`: nothing to evaluate.
    Unit,
    /// `sum`, `max`, `min`: the event's `value`.
    Number(f64),
    /// `distinct`: the event's `key`.
    Key(String),
    /// `sequence`: which steps the event satisfies (step index order);
    /// evaluated lazily by the caller, so passed as a closure result.
    Steps { first: bool, next: bool },
}

impl MeasureState {
    /// The state before any event.
    pub fn initial(measure: &Measure, rolling: bool) -> MeasureState {
        if rolling {
            return MeasureState::Rolling {
                buckets: Vec::new(),
                start_ms: 0,
                latest_ms: i64::MIN,
            };
        }
        match measure {
            Measure::Count => MeasureState::Count(0),
            Measure::Sum { .. } => MeasureState::Sum(0.0),
            Measure::Distinct { .. } => MeasureState::Distinct(Vec::new()),
            Measure::Max { .. } | Measure::Min { .. } => MeasureState::Extreme(None),
            Measure::Streak { .. } => MeasureState::Streak { last: None, len: 0 },
            Measure::Sequence { .. } => MeasureState::Sequence {
                next: 0,
                start_ms: 0,
                runs: 0,
            },
        }
    }

    /// True when this state was produced by `measure` (a rule edited
    /// without a version bump may disagree with its stored state).
    pub fn fits(&self, measure: &Measure, rolling: bool) -> bool {
        if rolling {
            return matches!(self, MeasureState::Rolling { .. });
        }
        matches!(
            (self, measure),
            (MeasureState::Count(_), Measure::Count)
                | (MeasureState::Sum(_), Measure::Sum { .. })
                | (MeasureState::Distinct(_), Measure::Distinct { .. })
                | (
                    MeasureState::Extreme(_),
                    Measure::Max { .. } | Measure::Min { .. }
                )
                | (MeasureState::Streak { .. }, Measure::Streak { .. })
                | (MeasureState::Sequence { .. }, Measure::Sequence { .. })
        )
    }

    /// The measure's current value, compared against tier thresholds.
    pub fn value(&self) -> f64 {
        match self {
            MeasureState::Count(n) => *n as f64,
            MeasureState::Sum(s) | MeasureState::Share(s) => *s,
            MeasureState::Distinct(keys) => keys.len() as f64,
            MeasureState::Extreme(v) => v.unwrap_or(0.0),
            MeasureState::Streak { len, .. } => *len as f64,
            MeasureState::Sequence { runs, .. } => *runs as f64,
            MeasureState::Rolling { buckets, .. } => buckets.iter().map(|(_, v)| v).sum(),
        }
    }

    /// True when the state holds no value yet (an `Extreme` before its
    /// first event has no value to compare with `min` tiers).
    pub fn is_empty(&self) -> bool {
        matches!(self, MeasureState::Extreme(None))
    }

    /// Applies one counting event at `time_ms` (its instance's `ordinal`
    /// for streaks). Returns the new value, or `None` when the event did
    /// not change it.
    ///
    /// `cap` bounds `distinct` (the highest tier: more keys change no
    /// award). `within_ms` is a sequence's `within`.
    pub fn observe(
        &mut self,
        measure: &Measure,
        input: &Input,
        time_ms: i64,
        ordinal: i64,
        cap: usize,
    ) -> Option<f64> {
        match (self, measure, input) {
            (MeasureState::Count(n), _, _) => {
                *n = n.saturating_add(1);
                Some(*n as f64)
            }
            (MeasureState::Sum(s), _, Input::Number(v)) => {
                *s += v;
                Some(*s)
            }
            (MeasureState::Distinct(keys), _, Input::Key(key)) => {
                let key = distinct_key(key);
                match keys.binary_search(&key) {
                    Ok(_) => None,
                    Err(_) if keys.len() >= cap => None,
                    Err(at) => {
                        keys.insert(at, key);
                        Some(keys.len() as f64)
                    }
                }
            }
            (MeasureState::Extreme(current), Measure::Max { .. }, Input::Number(v)) => {
                if current.is_some_and(|c| c >= *v) {
                    return None;
                }
                *current = Some(*v);
                Some(*v)
            }
            (MeasureState::Extreme(current), Measure::Min { .. }, Input::Number(v)) => {
                if current.is_some_and(|c| c <= *v) {
                    return None;
                }
                *current = Some(*v);
                Some(*v)
            }
            (MeasureState::Streak { last, len }, Measure::Streak { allow_gaps, .. }, _) => {
                match *last {
                    // The instance already counted, or an earlier one
                    // arriving late: the run ending at `last` is unchanged.
                    Some(l) if ordinal <= l => None,
                    Some(l) if ordinal - l - 1 <= i64::from(*allow_gaps) => {
                        *last = Some(ordinal);
                        *len = len.saturating_add(1);
                        Some(*len as f64)
                    }
                    _ => {
                        *last = Some(ordinal);
                        *len = 1;
                        Some(1.0)
                    }
                }
            }
            (
                MeasureState::Sequence {
                    next,
                    start_ms,
                    runs,
                },
                Measure::Sequence { steps, within },
                Input::Steps { first, next: fits },
            ) => {
                let expired = *next > 0
                    && within.is_some_and(|w| {
                        time_ms.saturating_sub(*start_ms) > super::window::duration_ms(w)
                    });
                if expired {
                    *next = 0;
                }
                let advanced = if *next > 0 && *fits {
                    *next += 1;
                    true
                } else if *first {
                    // A first step restarts the run (or starts it).
                    *next = 1;
                    *start_ms = time_ms;
                    true
                } else {
                    false
                };
                if advanced && *next as usize >= steps.len() {
                    *next = 0;
                    *runs = runs.saturating_add(1);
                    return Some(*runs as f64);
                }
                // Progress inside a run changes the state, not the value.
                if advanced || expired {
                    Some(*runs as f64)
                } else {
                    None
                }
            }
            (MeasureState::Share(s), _, input) => {
                *s += match input {
                    Input::Number(v) => *v,
                    _ => 1.0,
                };
                Some(*s)
            }
            _ => None,
        }
    }
}

/// Applies an event to a rolling window's buckets. Returns the window's
/// new value and whether the event started a new run (the window was
/// empty). `None`: the event is older than what the window still holds.
pub fn observe_rolling(
    state: &mut MeasureState,
    amount: f64,
    time_ms: i64,
    span_ms: i64,
) -> Option<(f64, bool)> {
    let MeasureState::Rolling {
        buckets,
        start_ms,
        latest_ms,
    } = state
    else {
        return None;
    };
    let bucket = time_ms.div_euclid(bucket_width(span_ms));
    let newest = (*latest_ms).max(time_ms);
    let oldest_kept = oldest_bucket(newest, span_ms);
    if bucket < oldest_kept {
        return None;
    }
    buckets.retain(|(b, _)| *b >= oldest_kept);
    let fresh = buckets.is_empty();
    if fresh {
        *start_ms = time_ms;
    }
    match buckets.binary_search_by_key(&bucket, |(b, _)| *b) {
        Ok(i) => buckets[i].1 += amount,
        Err(i) => buckets.insert(i, (bucket, amount)),
    }
    *latest_ms = newest;
    Some((buckets.iter().map(|(_, v)| v).sum(), fresh))
}

/// A rolling window keeps its events in 60 buckets of this width.
fn bucket_width(span_ms: i64) -> i64 {
    (span_ms / 60).max(1)
}

/// The oldest bucket a rolling window of `span_ms` still holds when its
/// newest event is at `newest_ms`: buckets whose whole span lies before
/// `newest - span` are gone.
pub fn oldest_bucket(newest_ms: i64, span_ms: i64) -> i64 {
    newest_ms
        .saturating_sub(span_ms)
        .div_euclid(bucket_width(span_ms))
        + 1
}

/// The streak kind of a measure, if it is one.
pub fn every(measure: &Measure) -> Option<Every> {
    match measure {
        Measure::Streak { every, .. } => Some(*every),
        _ => None,
    }
}

fn distinct_key(key: &str) -> String {
    if key.len() <= MAX_DISTINCT_KEY {
        return key.to_string();
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("#{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn streak(gaps: u32) -> Measure {
        Measure::Streak {
            every: Every::Day,
            allow_gaps: gaps,
        }
    }

    #[test]
    fn sums_distincts_and_extremes() {
        let sum = Measure::Sum { value: "v".into() };
        let mut s = MeasureState::initial(&sum, false);
        assert_eq!(s.observe(&sum, &Input::Number(2.5), 0, 0, 0), Some(2.5));
        assert_eq!(s.observe(&sum, &Input::Number(1.0), 0, 0, 0), Some(3.5));

        let d = Measure::Distinct { key: "k".into() };
        let mut s = MeasureState::initial(&d, false);
        assert_eq!(s.observe(&d, &Input::Key("a".into()), 0, 0, 2), Some(1.0));
        assert_eq!(s.observe(&d, &Input::Key("a".into()), 0, 0, 2), None);
        assert_eq!(s.observe(&d, &Input::Key("b".into()), 0, 0, 2), Some(2.0));
        assert_eq!(s.observe(&d, &Input::Key("c".into()), 0, 0, 2), None);

        let max = Measure::Max { value: "v".into() };
        let mut s = MeasureState::initial(&max, false);
        assert!(s.is_empty());
        assert_eq!(s.observe(&max, &Input::Number(3.0), 0, 0, 0), Some(3.0));
        assert_eq!(s.observe(&max, &Input::Number(2.0), 0, 0, 0), None);
        let min = Measure::Min { value: "v".into() };
        let mut s = MeasureState::initial(&min, false);
        assert_eq!(s.observe(&min, &Input::Number(3.0), 0, 0, 0), Some(3.0));
        assert_eq!(s.observe(&min, &Input::Number(4.0), 0, 0, 0), None);
        assert_eq!(s.observe(&min, &Input::Number(1.0), 0, 0, 0), Some(1.0));
    }

    #[test]
    fn streaks_count_consecutive_instances_with_allowed_gaps() {
        let m = streak(0);
        let mut s = MeasureState::initial(&m, false);
        let obs = |s: &mut MeasureState, m: &Measure, o| s.observe(m, &Input::Unit, 0, o, 0);
        assert_eq!(obs(&mut s, &m, 10), Some(1.0));
        assert_eq!(obs(&mut s, &m, 10), None);
        assert_eq!(obs(&mut s, &m, 11), Some(2.0));
        assert_eq!(obs(&mut s, &m, 13), Some(1.0));
        assert_eq!(obs(&mut s, &m, 12), None);

        let m = streak(1);
        let mut s = MeasureState::initial(&m, false);
        assert_eq!(obs(&mut s, &m, 1), Some(1.0));
        assert_eq!(obs(&mut s, &m, 3), Some(2.0));
        assert_eq!(obs(&mut s, &m, 6), Some(1.0));
    }

    #[test]
    fn sequences_complete_in_order_within_the_limit() {
        let m = Measure::Sequence {
            steps: vec![
                edge_config::Step {
                    on: vec!["a".into()],
                    when: None,
                };
                3
            ],
            within: Some(Duration::from_secs(10)),
        };
        let mut s = MeasureState::initial(&m, false);
        let step = |first, next| Input::Steps { first, next };
        assert_eq!(s.observe(&m, &step(false, true), 0, 0, 0), None);
        assert_eq!(s.observe(&m, &step(true, false), 1000, 0, 0), Some(0.0));
        assert_eq!(s.observe(&m, &step(false, true), 2000, 0, 0), Some(0.0));
        assert_eq!(s.observe(&m, &step(false, true), 3000, 0, 0), Some(1.0));
        // Too slow: the run starts over at the next first step.
        assert_eq!(s.observe(&m, &step(true, false), 20_000, 0, 0), Some(1.0));
        assert_eq!(s.observe(&m, &step(false, true), 40_000, 0, 0), Some(1.0));
        assert_eq!(s.observe(&m, &step(false, true), 41_000, 0, 0), None);
    }

    #[test]
    fn rolling_windows_forget_and_restart() {
        let mut s = MeasureState::initial(&Measure::Count, true);
        let span = 60_000;
        assert_eq!(observe_rolling(&mut s, 1.0, 1_000, span), Some((1.0, true)));
        assert_eq!(
            observe_rolling(&mut s, 1.0, 30_000, span),
            Some((2.0, false))
        );
        assert_eq!(
            observe_rolling(&mut s, 1.0, 75_000, span),
            Some((2.0, false))
        );
        // Older than the window now holds.
        assert_eq!(observe_rolling(&mut s, 1.0, 2_000, span), None);
        assert_eq!(
            observe_rolling(&mut s, 1.0, 500_000, span),
            Some((1.0, true))
        );
    }
}
