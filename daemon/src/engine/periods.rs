//! Venue periods (matches, concerts) and the site's event-time watermark.
//!
//! `venue.period.started` / `venue.period.ended` events carrying
//! `data.period` open and close periods; `period` windows and
//! `every = "period"` streaks are placed by them. While a period runs, each
//! tracked customer with an event in it gets an activity record (what they
//! earned in the period) and an entry in the period's activity index; when
//! the period ends, every active customer's `PeriodSummary` goes upstream
//! in the same commit and the activity records are deleted.
//!
//! Summaries are made when the end event is applied: events of the period
//! that arrive later (within the rules' lateness) still count for the
//! rules, but are not in the summary.

use serde_json::Value;
use std::sync::atomic::Ordering;
use touchline_proto::{PeriodSummary, RecordBody, RuleProgress};
use tracing::{info, warn};

use super::record;
use super::state::{self, Activity, StoredGlobal, StoredState};
use super::table::StateTable;
use super::window::{self, Periods, MAX_PERIOD_ID};
use super::{ApplyError, CompiledRule, Emitted, Globals, Output, Work};
use crate::event::Event;
use crate::store::keys::KeyBuf;
use edge_config::{Scope, Window};

/// Event types that open and close periods.
pub const PERIOD_STARTED: &str = "venue.period.started";
pub const PERIOD_ENDED: &str = "venue.period.ended";

const WATERMARK: &str = "watermark";
const PERIODS: &str = "periods";

/// Reads the watermark and period registry (defaults when new).
pub(super) fn load_globals(
    table: &dyn StateTable,
    key: &mut KeyBuf,
) -> Result<Globals, ApplyError> {
    let mut globals = Globals::default();
    for (name, slot) in [(WATERMARK, 0u8), (PERIODS, 1u8)] {
        let k = state::global_key(key, name).to_vec();
        let Some(bytes) = table.get(&k)? else {
            continue;
        };
        match (state::decode_global(bytes), slot) {
            (Ok(StoredGlobal::Watermark(w)), 0) => globals.watermark = w,
            (Ok(StoredGlobal::Periods(p)), 1) => globals.periods = p,
            (Ok(_), _) => {}
            (Err(source), _) => {
                return Err(ApplyError::Corrupt {
                    rule: format!("(site {name})"),
                    source,
                })
            }
        }
    }
    Ok(globals)
}

pub(super) fn save_watermark(
    table: &mut dyn StateTable,
    key: &mut KeyBuf,
    watermark: i64,
) -> Result<(), ApplyError> {
    save(table, key, WATERMARK, &StoredGlobal::Watermark(watermark))
}

pub(super) fn save_periods(
    table: &mut dyn StateTable,
    key: &mut KeyBuf,
    periods: &Periods,
) -> Result<(), ApplyError> {
    save(table, key, PERIODS, &StoredGlobal::Periods(periods.clone()))
}

fn save(
    table: &mut dyn StateTable,
    key: &mut KeyBuf,
    name: &str,
    value: &StoredGlobal,
) -> Result<(), ApplyError> {
    let bytes = state::encode_global(value).map_err(|e| heed::Error::Encoding(Box::new(e)))?;
    table.put(state::global_key(key, name), &bytes)?;
    Ok(())
}

/// Handles a venue-wide event; returns true when the period registry
/// changed.
pub(super) fn venue_event(
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    rules: &[CompiledRule],
    globals: &mut Globals,
    event: &Event,
    out: &mut Output,
) -> Result<bool, ApplyError> {
    let started = event.kind == PERIOD_STARTED;
    if !started && event.kind != PERIOD_ENDED {
        return Ok(false);
    }
    let id = match event.data.get("period") {
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= MAX_PERIOD_ID && !s.chars().any(char::is_control) =>
        {
            s.as_str()
        }
        _ => {
            work.stats
                .period_events_invalid
                .fetch_add(1, Ordering::Relaxed);
            warn!(event = %event.id, kind = %event.kind, "period event without a usable `data.period` (a non-empty string of at most {MAX_PERIOD_ID} bytes, no control characters); ignored");
            return Ok(false);
        }
    };
    if started {
        let new = globals.periods.open(id, event.time_ms);
        if new {
            info!(period = id, "period started");
        }
        return Ok(new);
    }
    if !globals.periods.close(id, event.time_ms) {
        return Ok(false);
    }
    let summaries = summarize(work, table, rules, id, event.time_ms, out)?;
    work.stats
        .period_summaries
        .fetch_add(summaries, Ordering::Relaxed);
    info!(period = id, summaries, "period ended");
    Ok(true)
}

/// Gives `customer` an activity record in `period` unless they have one.
pub(super) fn mark_active(
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    customer: &str,
    period: &str,
) -> Result<(), ApplyError> {
    let key = state::activity_key(work.key, customer, period).to_vec();
    if table.get(&key)?.is_some() {
        return Ok(());
    }
    let activity = new_activity(table, customer, period)?;
    super::write_state(table, work.value, &key, StoredState::Activity(activity))
}

/// A fresh activity record, entered in the period's activity index (the
/// caller writes the record).
fn new_activity(
    table: &mut dyn StateTable,
    customer: &str,
    period: &str,
) -> Result<Activity, ApplyError> {
    let index = state::activity_index_key(period, customer);
    table.put(&index, &[])?;
    Ok(Activity {
        index,
        ..Activity::default()
    })
}

/// Adds an award's points and badge to the customer's activity in the
/// period covering `at_ms` (if any).
pub(super) fn credit_activity(
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    customer: &str,
    at_ms: i64,
    points: &[(String, i64)],
    badge: Option<&str>,
) -> Result<(), ApplyError> {
    let periods = work.periods;
    let Some(period) = period_at(periods, at_ms) else {
        return Ok(());
    };
    if points.is_empty() && badge.is_none() {
        return Ok(());
    }
    let key = state::activity_key(work.key, customer, period).to_vec();
    let mut activity = match table.get(&key)? {
        Some(bytes) => match state::decode(bytes) {
            Ok(StoredState::Activity(a)) => a,
            _ => return Ok(()),
        },
        None => new_activity(table, customer, period)?,
    };
    for (category, amount) in points {
        match activity
            .points
            .binary_search_by(|(c, _)| c.as_str().cmp(category))
        {
            Ok(i) => activity.points[i].1 = activity.points[i].1.saturating_add(*amount),
            Err(i) => activity.points.insert(i, (category.clone(), *amount)),
        }
    }
    if let Some(badge) = badge {
        activity.badges.push(badge.to_string());
    }
    super::write_state(table, work.value, &key, StoredState::Activity(activity))
}

pub(super) fn period_at(periods: &Periods, time_ms: i64) -> Option<&str> {
    periods.covering(time_ms).map(|(_, p)| p.id.as_str())
}

/// Emits every active customer's summary of `period` and deletes the
/// activity records.
fn summarize(
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    rules: &[CompiledRule],
    period: &str,
    at_ms: i64,
    out: &mut Output,
) -> Result<u64, ApplyError> {
    let prefix = state::activity_index_key(period, "");
    let mut customers = Vec::new();
    for (k, _) in table.prefixed(&prefix)? {
        if let Ok(id) = std::str::from_utf8(&k[prefix.len()..]) {
            customers.push(id.to_string());
        }
    }
    let window = window::period_name(period);
    let mut made = 0u64;
    for customer in customers {
        let key = state::activity_key(work.key, &customer, period).to_vec();
        let activity = match table.get(&key)? {
            Some(bytes) => match state::decode(bytes) {
                Ok(StoredState::Activity(a)) => a,
                _ => Activity::default(),
            },
            None => Activity::default(),
        };
        let mut progress = Vec::new();
        let states = table
            .get(record::key(work.key, &customer))?
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        for c in rules {
            let rule = &c.rule;
            if rule.window != Window::Period || !matches!(rule.scope, Scope::Customer) {
                continue;
            }
            record::slot_from(work.slot, &c.slot_prefix, &window);
            let Some(bytes) = record::find(&states, work.slot) else {
                continue;
            };
            let Ok(StoredState::V1(s)) = state::decode(bytes) else {
                continue;
            };
            if let Some(next) = c.tiers.get(s.tiers_awarded as usize) {
                progress.push(RuleProgress {
                    rule: rule.id.clone(),
                    version: rule.version,
                    value: s.measure.value(),
                    next_at: next.at,
                });
            }
        }
        out.records.push(Emitted {
            at_ms,
            body: RecordBody::PeriodSummary(PeriodSummary {
                customer: work.pseudonymizer.pseudonym(&customer),
                period: period.to_string(),
                points: activity.points,
                badges: activity.badges,
                progress,
            }),
            customer: None,
            voucher: None,
        });
        made += 1;
        table.delete(&key)?;
        let mut index = prefix.clone();
        index.extend_from_slice(customer.as_bytes());
        table.delete(&index)?;
    }
    Ok(made)
}
