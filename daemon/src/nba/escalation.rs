//! Escalation: live changes to an open offer while the moment builds.
//!
//! "Unlock another 5 % for every Team A goal": an offer's `escalate` step
//! raises numeric payload fields by fixed amounts, never beyond their
//! caps, each time a matching event arrives while the instance is open.
//! The config reader already checked that the fields exist, are numbers
//! and start at or below their caps; the payload here comes from the
//! store, so those checks are repeated and a mismatch is an error, not a
//! panic, and changes nothing.

use edge_config::{Amount, Escalate};
use serde_json::{Map, Number, Value};

/// Why an escalation could not be applied; the payload is unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EscalationError {
    #[error("payload field `{0}` is missing")]
    Missing(String),
    #[error("payload field `{0}` is not a number")]
    NotANumber(String),
}

/// One field that changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub field: String,
    pub from: Value,
    pub to: Value,
}

/// Applies `step` to `payload`. Returns the fields that changed: empty
/// when every field is already at its cap, so the caller publishes an
/// update only when there is news. A field without a cap in `step.max`
/// is left alone (the config requires one for every raised field).
pub fn escalate(
    payload: &mut Map<String, Value>,
    step: &Escalate,
) -> Result<Vec<Change>, EscalationError> {
    let mut planned = Vec::with_capacity(step.add.len());
    for (field, &add) in &step.add {
        let Some(&cap) = step.max.get(field) else {
            continue;
        };
        let current = payload
            .get(field)
            .ok_or_else(|| EscalationError::Missing(field.clone()))?;
        let Value::Number(current) = current else {
            return Err(EscalationError::NotANumber(field.clone()));
        };
        if let Some(next) = raised(current, add, cap) {
            planned.push((field, next));
        }
    }
    let mut changes = Vec::with_capacity(planned.len());
    for (field, next) in planned {
        let to = Value::Number(next);
        if let Some(from) = payload.insert(field.clone(), to.clone()) {
            changes.push(Change {
                field: field.clone(),
                from,
                to,
            });
        }
    }
    Ok(changes)
}

/// `current + add`, at most `cap`; `None` when that changes nothing (the
/// field already sits at or above its cap). Integers stay integers when
/// the field, the amount and the cap all are.
fn raised(current: &Number, add: Amount, cap: Amount) -> Option<Number> {
    if let (Some(now), Amount::Integer(add), Amount::Integer(cap)) = (current.as_i64(), add, cap) {
        if now >= cap {
            return None;
        }
        return Some(Number::from(now.saturating_add(add).min(cap)));
    }
    let now = current.as_f64()?;
    let cap = cap.as_f64();
    if now >= cap {
        return None;
    }
    Number::from_f64((now + add.as_f64()).min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(add: &[(&str, Amount)], max: &[(&str, Amount)]) -> Escalate {
        Escalate {
            on: vec!["match.goal".to_owned()],
            when: None,
            add: add.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            max: max.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn goals_raise_the_discount_up_to_the_cap() {
        let s = step(
            &[("discount", Amount::Integer(5))],
            &[("discount", Amount::Integer(25))],
        );
        let mut p = map(json!({ "title": "Team A jersey", "discount": 10 }));
        let mut seen = Vec::new();
        for _ in 0..5 {
            let changes = escalate(&mut p, &s).unwrap_or_default();
            seen.push(changes.len());
            if let Some(c) = changes.first() {
                assert_eq!(c.field, "discount");
            }
        }
        assert_eq!(p["discount"], json!(25));
        assert!(p["discount"].is_i64());
        // 10 → 15 → 20 → 25, then nothing more to say.
        assert_eq!(seen, [1, 1, 1, 0, 0]);
        assert_eq!(p["title"], json!("Team A jersey"));
    }

    #[test]
    fn the_last_step_is_cut_at_the_cap_and_floats_stay_floats() {
        let s = step(
            &[
                ("discount", Amount::Integer(5)),
                ("cashback", Amount::Float(0.5)),
            ],
            &[
                ("discount", Amount::Integer(12)),
                ("cashback", Amount::Float(1.2)),
            ],
        );
        let mut p = map(json!({ "discount": 10, "cashback": 0.5 }));
        let changes = escalate(&mut p, &s).unwrap_or_default();
        assert_eq!(changes.len(), 2);
        assert_eq!(p["discount"], json!(12));
        assert_eq!(p["cashback"], json!(1.0));
        escalate(&mut p, &s).unwrap_or_default();
        assert_eq!(p["cashback"], json!(1.2));
        // An integer field raised by a float amount becomes a float.
        let s = step(
            &[("discount", Amount::Float(2.5))],
            &[("discount", Amount::Integer(20))],
        );
        let mut p = map(json!({ "discount": 10 }));
        escalate(&mut p, &s).unwrap_or_default();
        assert_eq!(p["discount"], json!(12.5));
    }

    #[test]
    fn a_stored_payload_that_no_longer_fits_is_refused_untouched() {
        let s = step(
            &[("a", Amount::Integer(1)), ("b", Amount::Integer(1))],
            &[("a", Amount::Integer(9)), ("b", Amount::Integer(9))],
        );
        let mut p = map(json!({ "a": 1, "b": "two" }));
        let before = p.clone();
        assert_eq!(
            escalate(&mut p, &s),
            Err(EscalationError::NotANumber("b".to_owned()))
        );
        assert_eq!(p, before);
        let mut p = map(json!({ "a": 1 }));
        assert_eq!(
            escalate(&mut p, &s),
            Err(EscalationError::Missing("b".to_owned()))
        );
        assert_eq!(p, map(json!({ "a": 1 })));
        // A field already above its cap stays where it is.
        let mut p = map(json!({ "a": 50, "b": 2 }));
        let changes = escalate(&mut p, &s).unwrap_or_default();
        assert_eq!(changes.len(), 1);
        assert_eq!(p["a"], json!(50));
        assert_eq!(p["b"], json!(3));
    }
}
