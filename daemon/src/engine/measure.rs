//! Measures: how matching events move a rule's value.
//!
//! Each `Measure` kind has a state variant here and one arm in each
//! function below; adding `sum`, `distinct`, `streak` or `sequence` means
//! appending a variant (postcard-safe: variants are only ever appended) and
//! its arms, without touching tier or window handling.

use edge_config::Measure;
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// The persisted state of one measure for one (customer, rule, window).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MeasureState {
    /// `count`: matching events seen.
    Count(u64),
}

impl MeasureState {
    /// The state before any event.
    pub fn initial(measure: &Measure) -> MeasureState {
        match measure {
            Measure::Count => MeasureState::Count(0),
        }
    }

    /// True when this state was produced by `measure` (a rule edited
    /// without a version bump may disagree with its stored state).
    pub fn fits(&self, measure: &Measure) -> bool {
        matches!((self, measure), (MeasureState::Count(_), Measure::Count))
    }

    /// Applies one matching event. Returns the new value, or `None` when the
    /// event did not change it (no state write, no tier check).
    pub fn observe(&mut self, measure: &Measure, _event: &Event) -> Option<f64> {
        match (self, measure) {
            (MeasureState::Count(n), Measure::Count) => {
                *n = n.saturating_add(1);
                Some(*n as f64)
            }
        }
    }

    /// The measure's current value, compared against tier thresholds.
    pub fn value(&self) -> f64 {
        match self {
            MeasureState::Count(n) => *n as f64,
        }
    }
}
