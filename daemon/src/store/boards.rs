//! Leaderboard and rewards queries as the venue app sees them: ranks from
//! [`super::rewards`], with privacy applied.
//!
//! A customer appears by name only when their profile says
//! `leaderboard_opt_in = true` (the name is `profile.display_name`, else
//! the customer id); everyone else appears as a stable pseudonym keyed by
//! a site-local secret, so neighbours on a board cannot be looked up. The
//! top list shows opted-in customers only. The asking customer always
//! sees their own standing.

use heed::RoTxn;
use serde::Serialize;
use serde_json::Value;

use super::customers;
use super::env::Dbs;
use super::keys::KeyBuf;
use super::rewards::{self, Entry, RewardDbs, RewardError};
use crate::engine::Pseudonymizer;

/// Most rows a query may ask for, above and below or in the top list.
pub const MAX_ROWS: usize = 100;

/// `GET /v1/leaderboards/<category>` parameters.
#[derive(Debug, Clone)]
pub struct BoardQuery {
    pub category: String,
    /// `lifetime` or `day:<YYYY-MM-DD>`.
    pub window: String,
    /// Whose standing to include.
    pub customer: Option<String>,
    /// Neighbours above and below the customer (at most [`MAX_ROWS`]).
    pub around: usize,
    /// Length of the top list (at most [`MAX_ROWS`]).
    pub top: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub rank: u64,
    /// Display name when opted in, else a pseudonym like `fan-3fa91c02be`.
    pub name: String,
    pub points: i64,
    /// True for the asking customer's own row.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub you: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Standing {
    pub rank: u64,
    pub points: i64,
    /// Share of participants ranked at or below the customer, in percent
    /// (the leader is at 100).
    pub percentile: f64,
    pub above: Vec<Row>,
    pub below: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Board {
    pub category: String,
    pub window: String,
    /// Opted-in customers among the best, best first.
    pub top: Vec<Row>,
    /// Present when a customer was asked for and is on the board.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standing: Option<Standing>,
    /// Participants on the board (known once a customer's standing was
    /// computed, which walks the board).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participants: Option<u64>,
}

/// Answers one board query in a read transaction.
pub(crate) fn board(
    dbs: &Dbs,
    txn: &RoTxn,
    names: &Pseudonymizer,
    q: &BoardQuery,
) -> Result<Board, RewardError> {
    let rdbs = reward_dbs(dbs);
    let mut key = KeyBuf::default();
    let mut opted = |customer: &str| -> Result<Option<String>, RewardError> {
        let profile = customers::load(dbs.profiles, txn, &mut key, customer)
            .map_err(|e| RewardError::Corrupt(e.to_string()))?;
        Ok(profile.and_then(|p| {
            (p.get("leaderboard_opt_in") == Some(&Value::Bool(true))).then(|| {
                p.get("display_name")
                    .and_then(Value::as_str)
                    .unwrap_or(customer)
                    .to_string()
            })
        }))
    };
    // Opt-in is checked per row scanned: the top list skips the others.
    let mut failure = None;
    let top_entries = rewards::top(
        rdbs,
        txn,
        &q.category,
        &q.window,
        q.top.min(MAX_ROWS),
        |c| match opted(c) {
            Ok(name) => name.is_some(),
            Err(e) => {
                failure.get_or_insert(e);
                false
            }
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    let mut row = |e: Entry, you: bool| -> Result<Row, RewardError> {
        let name = match opted(&e.customer)? {
            Some(name) => name,
            None => display_pseudonym(names, &e.customer),
        };
        Ok(Row {
            rank: e.rank,
            name,
            points: e.points,
            you,
        })
    };
    let mut top = Vec::with_capacity(top_entries.len());
    for e in top_entries {
        let you = q.customer.as_deref() == Some(e.customer.as_str());
        top.push(row(e, you)?);
    }
    let mut participants = None;
    let standing = match &q.customer {
        None => None,
        Some(c) => {
            match rewards::standing(rdbs, txn, &q.category, &q.window, c, q.around.min(MAX_ROWS))? {
                None => None,
                Some(s) => {
                    participants = Some(s.total);
                    let percentile = if s.total == 0 {
                        0.0
                    } else {
                        100.0 * (s.total - s.me.rank + 1) as f64 / s.total as f64
                    };
                    let mut above = Vec::new();
                    for e in s.above {
                        above.push(row(e, false)?);
                    }
                    let mut below = Vec::new();
                    for e in s.below {
                        below.push(row(e, false)?);
                    }
                    Some(Standing {
                        rank: s.me.rank,
                        points: s.me.points,
                        percentile,
                        above,
                        below,
                    })
                }
            }
        }
    };
    Ok(Board {
        category: q.category.clone(),
        window: q.window.clone(),
        top,
        standing,
        participants,
    })
}

/// A customer's lifetime rewards.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rewards {
    pub customer: String,
    /// Points by category.
    pub points: serde_json::Map<String, Value>,
    /// Badges in award order, with the RFC 3339 time of the award.
    pub badges: Vec<Value>,
    /// Voucher codes in award order: code, achievement, tier, time.
    pub vouchers: Vec<Value>,
}

pub(crate) fn rewards_of(dbs: &Dbs, txn: &RoTxn, customer: &str) -> Result<Rewards, RewardError> {
    let ledger = rewards::ledger(reward_dbs(dbs), txn, customer)?.unwrap_or_default();
    Ok(Rewards {
        customer: customer.to_string(),
        points: ledger
            .points
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect(),
        badges: ledger
            .badges
            .into_iter()
            .map(|(badge, at_ms)| serde_json::json!({ "badge": badge, "at": rfc3339(at_ms) }))
            .collect(),
        vouchers: ledger
            .vouchers
            .into_iter()
            .map(|v| {
                serde_json::json!({
                    "code": v.code,
                    "achievement": v.achievement,
                    "tier": v.tier,
                    "at": rfc3339(v.at_ms),
                })
            })
            .collect(),
    })
}

fn rfc3339(at_ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

fn display_pseudonym(names: &Pseudonymizer, customer: &str) -> String {
    let p = names.pseudonym(customer);
    format!("fan-{}", &p[..p.len().min(10)])
}

fn reward_dbs(dbs: &Dbs) -> RewardDbs {
    RewardDbs {
        ledgers: dbs.ledgers,
        scores: dbs.scores,
        ranking: dbs.ranking,
    }
}
