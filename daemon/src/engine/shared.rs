//! Shared goals: `scope = "group"` (one value per `group_by` result, e.g.
//! a stand section) and `scope = "venue"` (one value for the whole site).
//!
//! The goal's value lives in the site key space, one record per (rule,
//! version, window instance, group). Each member keeps their own share in
//! their key space, plus an entry in the goal's member index, so that when
//! the goal reaches a tier every member whose share reached
//! `min_contribution` can be found and awarded. A member whose share
//! reaches `min_contribution` after the goal reached a tier is awarded
//! then, while the window instance is open. Either way each member gets
//! each tier once per instance (the member record counts their tiers).
//!
//! A member whose group changes within an instance (a fan moving to
//! another section) starts over in the new group; their awards from the
//! old one stay.

use sha2::{Digest, Sha256};

use super::measure::Input;
use super::state::{self, MemberState, StoredState};
use super::table::StateTable;
use super::{
    award, read_state, write_state, ApplyError, CompiledRule, Ctx, Output, RuleError, RuleLogs,
    Step, Work,
};
use edge_config::Scope;

/// Applies a counting event to its shared goal; returns the awards made.
pub(crate) fn update(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    ctx: &Ctx<'_, '_, '_>,
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    out: &mut Output,
    step: Step<'_>,
) -> Result<u64, RuleError> {
    let rule = &c.rule;
    let group = match (&rule.scope, &c.group_by) {
        (Scope::Group { .. }, Some(expr)) => bounded(expr.key(ctx.vars)?),
        _ => String::new(),
    };
    let min = rule.scope.min_contribution().unwrap_or(1.0);
    let window: &str = &step.place.name;
    let time_ms = ctx.event.time_ms;
    let customer = ctx.customer;

    let member_key = state::key(work.key, customer, &rule.id, rule.version, window).to_vec();
    let mut member = read_member(c, table, &member_key)?;
    let mut joined = false;
    let stale = member.as_ref().is_some_and(|m| m.group != group);
    if stale {
        if let Some(old) = &member {
            table.delete(&old.index)?;
        }
    }
    if member.is_none() || stale {
        let index = state::member_index_key(&rule.id, rule.version, window, &group, customer);
        member = Some(MemberState {
            share: 0.0,
            tiers_awarded: 0,
            group: group.clone(),
            index,
        });
        joined = true;
    }
    let Some(mut member) = member else {
        return Ok(0);
    };
    member.share += match step.input {
        Input::Number(v) => v,
        _ => 1.0,
    };
    if joined {
        table.put(&member.index, &[])?;
    }

    let goal_key = state::group_key(work.key, &rule.id, rule.version, window, &group).to_vec();
    let mut goal = read_state(c, logs, table, &goal_key, time_ms)?;
    let reached_before = goal.tiers_awarded;
    let counted = goal
        .measure
        .observe(&rule.measure, &step.input, time_ms, step.ordinal, c.cap);
    if let Some(value) = counted {
        goal.updated_ms = time_ms;
        while c.reached(goal.tiers_awarded as usize, value) {
            goal.tiers_awarded += 1;
        }
    }
    let reached = Reached {
        tiers: goal.tiers_awarded,
        value: goal.measure.value(),
        window,
        time_ms,
    };
    if counted.is_some() {
        write_state(table, work.value, &goal_key, StoredState::V1(goal))?;
        if reached.tiers > reached_before {
            write_member(table, work, &member_key, member)?;
            return award_members(c, logs, work, table, out, &group, &reached, min);
        }
    }
    let mut awarded = 0;
    if member.share >= min {
        awarded = catch_up(c, logs, work, table, out, customer, &mut member, &reached)?;
    }
    write_member(table, work, &member_key, member)?;
    Ok(awarded)
}

/// Where a goal stands after an event: the tiers it reached and its value.
struct Reached<'w> {
    tiers: u32,
    value: f64,
    window: &'w str,
    time_ms: i64,
}

/// Awards a member the goal's tiers they do not have yet; returns how
/// many.
#[allow(clippy::too_many_arguments)]
fn catch_up(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    out: &mut Output,
    customer: &str,
    member: &mut MemberState,
    goal: &Reached<'_>,
) -> Result<u64, RuleError> {
    let mut awarded = 0u64;
    while member.tiers_awarded < goal.tiers {
        award(
            c,
            logs,
            work,
            table,
            out,
            customer,
            member.tiers_awarded as usize,
            goal.window,
            goal.value,
            goal.time_ms,
        )?;
        member.tiers_awarded += 1;
        awarded += 1;
    }
    Ok(awarded)
}

/// The goal reached new tiers: every member with enough share gets them.
#[allow(clippy::too_many_arguments)]
fn award_members(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    out: &mut Output,
    group: &str,
    goal: &Reached<'_>,
    min: f64,
) -> Result<u64, RuleError> {
    let rule = &c.rule;
    let prefix = state::member_index_key(&rule.id, rule.version, goal.window, group, "");
    let mut members = Vec::new();
    for (k, _) in table.prefixed(&prefix)? {
        if let Ok(id) = std::str::from_utf8(&k[prefix.len()..]) {
            members.push(id.to_string());
        }
    }
    let mut awarded = 0u64;
    for id in members {
        let key = state::key(work.key, &id, &rule.id, rule.version, goal.window).to_vec();
        let Some(mut member) = read_member(c, table, &key)? else {
            continue;
        };
        if member.share < min || member.tiers_awarded >= goal.tiers {
            continue;
        }
        awarded += catch_up(c, logs, work, table, out, &id, &mut member, goal)?;
        write_member(table, work, &key, member)?;
    }
    Ok(awarded)
}

fn read_member(
    c: &CompiledRule,
    table: &dyn StateTable,
    key: &[u8],
) -> Result<Option<MemberState>, ApplyError> {
    match table.get(key)? {
        Some(bytes) => match state::decode(bytes) {
            Ok(StoredState::Member(m)) => Ok(Some(m)),
            // A customer-scope record under the same id and version: the
            // rule's scope was edited without a version bump.
            Ok(_) => Ok(None),
            Err(source) => Err(ApplyError::Corrupt {
                rule: c.rule.id.clone(),
                source,
            }),
        },
        None => Ok(None),
    }
}

fn write_member(
    table: &mut dyn StateTable,
    work: &mut Work<'_>,
    key: &[u8],
    member: MemberState,
) -> Result<(), ApplyError> {
    write_state(table, work.value, key, StoredState::Member(member))
}

/// Group names are free text from profiles; long ones are kept hashed so
/// the member index keys stay within LMDB's limit.
fn bounded(group: String) -> String {
    if group.len() <= state::MAX_GROUP_NAME && !group.contains('\0') {
        return group;
    }
    let digest = Sha256::digest(group.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("#{hex}")
}
