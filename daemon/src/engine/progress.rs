//! A customer's progress per rule, for the venue app
//! (`GET /v1/customers/<id>/progress`).
//!
//! Read-only: it reads the same records the engine writes, through a
//! [`StateRead`] (a read transaction, with the writer's changes not yet
//! written back laid over it in `journal` mode), for each rule's current
//! window instance — the lifetime,
//! today (site time zone), the current tumbling span, the latest period,
//! the running rolling window — with what remains to the next tier and the
//! rewards of the tiers already reached in that instance.

use edge_config::{AchievementRule, Measure, RuleBundle, Scope, Window};
use serde::Serialize;
use serde_json::{Map, Value};

use super::measure::MeasureState;
use super::record;
use super::state::{self, StoredGlobal, StoredState};
use super::table::StateRead;
use super::window::{self, Periods};
use crate::store::keys::KeyBuf;

/// One rule's progress for one customer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleView {
    pub rule: String,
    pub name: String,
    pub version: u32,
    pub measure: &'static str,
    /// The window instance shown (`None` for a `period` rule while no
    /// period was ever announced).
    pub window: Option<String>,
    /// The measure's value (for group and venue goals: the goal's value).
    pub value: f64,
    /// For group and venue goals: the customer's own share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
    pub tiers_reached: u32,
    /// The next tier (1-based) and its threshold; `None` when every tier
    /// is reached.
    pub next_tier: Option<u32>,
    pub next_at: Option<f64>,
    /// How far the value still is from `next_at`.
    pub remaining: Option<f64>,
    /// Badges and points of the tiers reached in this instance.
    pub rewards: Vec<Value>,
}

/// Every rule's progress for `customer` at `now_ms`, in bundle order.
pub fn query(
    bundle: &RuleBundle,
    db: &dyn StateRead,
    customer: &str,
    now_ms: i64,
) -> Result<Vec<RuleView>, heed::Error> {
    let mut key = KeyBuf::default();
    let periods = match db.get(state::global_key(&mut key, "periods"))? {
        Some(bytes) => match state::decode_global(bytes) {
            Ok(StoredGlobal::Periods(p)) => p,
            _ => Periods::default(),
        },
        None => Periods::default(),
    };
    // Customer-scope states are all in the customer's record.
    let states = db.get(record::key(&mut key, customer))?;
    let mut slot = Vec::new();
    let mut views = Vec::with_capacity(bundle.achievements.len());
    for rule in &bundle.achievements {
        let instance = current_instance(rule, bundle, &periods, now_ms);
        let mut view = RuleView {
            rule: rule.id.clone(),
            name: rule.name.clone(),
            version: rule.version,
            measure: rule.measure.name(),
            window: instance.clone(),
            value: 0.0,
            share: None,
            tiers_reached: 0,
            next_tier: None,
            next_at: None,
            remaining: None,
            rewards: Vec::new(),
        };
        if let Some(instance) = &instance {
            let stored = if matches!(rule.scope, Scope::Customer) {
                record::slot(&mut slot, &rule.id, rule.version, instance);
                states.and_then(|r| record::find(r, &slot))
            } else {
                let k = state::key(&mut key, customer, &rule.id, rule.version, instance);
                db.get(k)?
            };
            match stored.map(state::decode) {
                Some(Ok(StoredState::V1(s))) => {
                    view.value = value_at(&s.measure, now_ms, rule);
                    if let MeasureState::Rolling { start_ms, .. } = &s.measure {
                        view.window = Some(window::rolling_name(*start_ms));
                    }
                    view.tiers_reached = s.tiers_awarded;
                }
                Some(Ok(StoredState::Member(m))) => {
                    view.share = Some(m.share);
                    view.tiers_reached = m.tiers_awarded;
                    let g = state::group_key(&mut key, &rule.id, rule.version, instance, &m.group)
                        .to_vec();
                    if let Some(Ok(StoredState::V1(goal))) = db.get(&g)?.map(state::decode) {
                        view.value = goal.measure.value();
                    }
                }
                _ => {
                    if !matches!(rule.scope, Scope::Customer) {
                        view.share = Some(0.0);
                    }
                }
            }
        }
        let reached = view.tiers_reached as usize;
        if let Some(next) = rule.tiers.get(reached) {
            view.next_tier = u32::try_from(reached + 1).ok();
            view.next_at = Some(next.at);
            view.remaining = Some(if matches!(rule.measure, Measure::Min { .. }) {
                if view.tiers_reached == 0 && view.value == 0.0 {
                    next.at
                } else {
                    (view.value - next.at).max(0.0)
                }
            } else {
                (next.at - view.value).max(0.0)
            });
        }
        view.rewards = rule.tiers[..reached.min(rule.tiers.len())]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let points: Map<String, Value> = t
                    .points
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(*v)))
                    .collect();
                serde_json::json!({ "tier": i + 1, "badge": t.badge, "points": points })
            })
            .collect();
        views.push(view);
    }
    Ok(views)
}

/// The instance a rule's progress is shown for.
fn current_instance(
    rule: &AchievementRule,
    bundle: &RuleBundle,
    periods: &Periods,
    now_ms: i64,
) -> Option<String> {
    match rule.window {
        Window::Period => periods.latest().map(|p| window::period_name(&p.id)),
        Window::Rolling(_) => Some(window::ROLLING_KEY.to_string()),
        w => window::place(&w, bundle.timezone, periods, now_ms).map(|p| p.name.to_string()),
    }
}

/// A stored measure's value as of `at_ms`: a rolling window's sum of what
/// is still in it, any other measure's value.
pub(crate) fn value_at(measure: &MeasureState, at_ms: i64, rule: &AchievementRule) -> f64 {
    match measure {
        MeasureState::Rolling { latest_ms, .. } => {
            rolling_value(measure, at_ms.max(*latest_ms), rule)
        }
        m => m.value(),
    }
}

/// A rolling window's value as of `now_ms` (buckets that slid out of the
/// window no longer count).
fn rolling_value(measure: &MeasureState, now_ms: i64, rule: &AchievementRule) -> f64 {
    let (MeasureState::Rolling { buckets, .. }, Window::Rolling(span)) = (measure, rule.window)
    else {
        return 0.0;
    };
    let oldest_kept = super::measure::oldest_bucket(now_ms, window::duration_ms(span));
    buckets
        .iter()
        .filter(|(b, _)| *b >= oldest_kept)
        .map(|(_, v)| v)
        .sum()
}
