//! Rewards: what each customer has earned, and leaderboards over it.
//!
//! Every award credits its points and badge to the customer's ledger in
//! the commit that creates the award, so the ledger and the outbox never
//! disagree. Leaderboards rank customers by points of one category within
//! a board window: `lifetime` and `day:<YYYY-MM-DD>` (UTC date of the
//! award). Two indexes serve them: `scores` (board, customer → points) to
//! find a customer's entry, and `ranking` (board, descending points,
//! customer → ()) so LMDB's key order is rank order. A rank is the number
//! of entries before the customer's key; counting is a cursor walk over
//! the board's prefix, which costs a few milliseconds per 100,000
//! participants and needs no second structure to keep consistent.

use heed::types::{Bytes, Unit};
use heed::{Database, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use touchline_proto::AchievementAwarded;

/// Board window covering everything.
pub const LIFETIME: &str = "lifetime";

/// The ledger databases.
#[derive(Clone, Copy)]
pub(crate) struct RewardDbs {
    /// customer key → versioned postcard [`Ledger`].
    pub ledgers: Database<Bytes, Bytes>,
    /// board ‖ customer → points (i64 BE).
    pub scores: Database<Bytes, Bytes>,
    /// board ‖ descending points ‖ customer → ().
    pub ranking: Database<Bytes, Unit>,
}

/// A customer's rewards, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Lifetime points by category, in category order.
    pub points: Vec<(String, i64)>,
    /// Badges in award order, with the award's event time (ms).
    pub badges: Vec<(String, i64)>,
    /// Voucher codes handed out with tiers, in award order.
    pub vouchers: Vec<VoucherEntry>,
}

/// A voucher code and the award it came with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoucherEntry {
    pub code: String,
    pub achievement: String,
    pub tier: u32,
    pub at_ms: i64,
}

/// The ledger as first stored, before vouchers.
#[derive(Serialize, Deserialize)]
struct LedgerV1 {
    points: Vec<(String, i64)>,
    badges: Vec<(String, i64)>,
}

/// Variants are only appended: older ledgers still decode.
#[derive(Serialize, Deserialize)]
enum StoredLedger {
    V1(LedgerV1),
    V2(Ledger),
}

/// Credits one award to `customer`'s ledger and boards.
pub(crate) fn credit(
    dbs: RewardDbs,
    txn: &mut RwTxn,
    customer: &str,
    award: &AchievementAwarded,
    voucher: Option<&str>,
    at_ms: i64,
) -> Result<(), RewardError> {
    let voucher = voucher.map(|code| VoucherEntry {
        code: code.to_string(),
        achievement: award.achievement.clone(),
        tier: award.tier,
        at_ms,
    });
    credit_ledger(
        dbs,
        txn,
        customer,
        &award.points,
        award.badge.as_deref(),
        voucher,
        at_ms,
    )
}

/// Credits points that are not an achievement's (an accepted offer's
/// reward, a referral) to `customer`'s ledger and boards.
pub(crate) fn credit_points(
    dbs: RewardDbs,
    txn: &mut RwTxn,
    customer: &str,
    points: &[(String, i64)],
    at_ms: i64,
) -> Result<(), RewardError> {
    credit_ledger(dbs, txn, customer, points, None, None, at_ms)
}

fn credit_ledger(
    dbs: RewardDbs,
    txn: &mut RwTxn,
    customer: &str,
    points: &[(String, i64)],
    badge: Option<&str>,
    voucher: Option<VoucherEntry>,
    at_ms: i64,
) -> Result<(), RewardError> {
    if points.is_empty() && badge.is_none() && voucher.is_none() {
        return Ok(());
    }
    let key = customer_key(customer);
    let mut ledger = read_ledger(dbs.ledgers, txn, &key)?.unwrap_or_default();
    for (category, amount) in points {
        match ledger.points.binary_search_by(|(c, _)| c.cmp(category)) {
            Ok(i) => ledger.points[i].1 = ledger.points[i].1.saturating_add(*amount),
            Err(i) => ledger.points.insert(i, (category.clone(), *amount)),
        }
        for window in [LIFETIME.to_string(), day_window(at_ms)] {
            add_score(dbs, txn, category, &window, customer, *amount)?;
        }
    }
    if let Some(badge) = badge {
        ledger.badges.push((badge.to_owned(), at_ms));
    }
    if let Some(entry) = voucher {
        ledger.vouchers.push(entry);
    }
    let bytes = postcard::to_allocvec(&StoredLedger::V2(ledger))
        .map_err(|e| RewardError::Corrupt(e.to_string()))?;
    dbs.ledgers.put(txn, &key, &bytes)?;
    Ok(())
}

/// Deletes the customer's ledger and board entries (erasure).
pub(crate) fn erase(dbs: RewardDbs, txn: &mut RwTxn, customer: &str) -> Result<(), RewardError> {
    let key = customer_key(customer);
    let Some(ledger) = read_ledger(dbs.ledgers, txn, &key)? else {
        return Ok(());
    };
    dbs.ledgers.delete(txn, &key)?;
    // Every board the customer may be on: lifetime and each day with an
    // entry. Days are found through the scores index per category.
    for (category, _) in &ledger.points {
        let prefix = category_prefix(category);
        let mut doomed = Vec::new();
        for entry in dbs.scores.prefix_iter(txn, &prefix)? {
            let (k, v) = entry?;
            if k.ends_with(&key) && parse_board(k).is_some_and(|(_, _, c)| c == key) {
                doomed.push((k.to_vec(), decode_points(v)));
            }
        }
        for (score_key, points) in doomed {
            if let Some((cat, window, _)) = parse_board(&score_key) {
                let rank_key = ranking_key(&cat, &window, points, customer);
                dbs.ranking.delete(txn, &rank_key)?;
            }
            dbs.scores.delete(txn, &score_key)?;
        }
    }
    Ok(())
}

/// A customer's ledger, read-only.
pub(crate) fn ledger(
    dbs: RewardDbs,
    txn: &RoTxn,
    customer: &str,
) -> Result<Option<Ledger>, RewardError> {
    read_ledger(dbs.ledgers, txn, &customer_key(customer))
}

/// One row of a leaderboard, before privacy is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// 1-based; equal points share the rank of the first of them.
    pub rank: u64,
    pub customer: String,
    pub points: i64,
}

/// The top `k` of a board.
pub(crate) fn top(
    dbs: RewardDbs,
    txn: &RoTxn,
    category: &str,
    window: &str,
    k: usize,
    mut keep: impl FnMut(&str) -> bool,
) -> Result<Vec<Entry>, RewardError> {
    let prefix = board_prefix(category, window);
    let mut out = Vec::new();
    let mut position = 0u64;
    let mut rank = 0u64;
    let mut last = None;
    for entry in dbs.ranking.prefix_iter(txn, &prefix)? {
        if out.len() >= k {
            break;
        }
        let (key, ()) = entry?;
        let Some((points, customer)) = parse_ranking(&key[prefix.len()..]) else {
            continue;
        };
        position += 1;
        if last != Some(points) {
            rank = position;
            last = Some(points);
        }
        if keep(&customer) {
            out.push(Entry {
                rank,
                customer,
                points,
            });
        }
    }
    Ok(out)
}

/// Where one customer stands on a board.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub me: Entry,
    /// Participants on the board.
    pub total: u64,
    /// Up to `around` entries ranked just above, best first.
    pub above: Vec<Entry>,
    /// Up to `around` entries ranked just below, best first.
    pub below: Vec<Entry>,
}

/// The customer's rank and neighbours; `None` when not on the board.
pub(crate) fn standing(
    dbs: RewardDbs,
    txn: &RoTxn,
    category: &str,
    window: &str,
    customer: &str,
    around: usize,
) -> Result<Option<Standing>, RewardError> {
    let score_key = score_key(category, window, customer);
    let Some(points) = dbs.scores.get(txn, &score_key)?.map(decode_points) else {
        return Ok(None);
    };
    let prefix = board_prefix(category, window);
    let mut window_rows: std::collections::VecDeque<Entry> = Default::default();
    let mut me = None;
    let mut below = Vec::new();
    let mut total = 0u64;
    let mut rank = 0u64;
    let mut last = None;
    for entry in dbs.ranking.prefix_iter(txn, &prefix)? {
        let (key, ()) = entry?;
        let Some((p, c)) = parse_ranking(&key[prefix.len()..]) else {
            continue;
        };
        total += 1;
        if last != Some(p) {
            rank = total;
            last = Some(p);
        }
        let row = Entry {
            rank,
            customer: c,
            points: p,
        };
        if me.is_none() {
            if row.customer == customer && row.points == points {
                me = Some(row);
            } else {
                window_rows.push_back(row);
                if window_rows.len() > around {
                    window_rows.pop_front();
                }
            }
        } else if below.len() < around {
            below.push(row);
        }
    }
    Ok(me.map(|me| Standing {
        me,
        total,
        above: window_rows.into_iter().collect(),
        below,
    }))
}

/// Why a reward operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("{0}")]
    Lmdb(#[from] heed::Error),
    #[error("stored rewards are unreadable: {0}")]
    Corrupt(String),
}

fn add_score(
    dbs: RewardDbs,
    txn: &mut RwTxn,
    category: &str,
    window: &str,
    customer: &str,
    amount: i64,
) -> Result<(), RewardError> {
    let key = score_key(category, window, customer);
    let old = dbs.scores.get(txn, &key)?.map(decode_points);
    let new = old.unwrap_or(0).saturating_add(amount);
    if let Some(old) = old {
        dbs.ranking
            .delete(txn, &ranking_key(category, window, old, customer))?;
    }
    dbs.scores.put(txn, &key, &new.to_be_bytes())?;
    dbs.ranking
        .put(txn, &ranking_key(category, window, new, customer), &())?;
    Ok(())
}

fn read_ledger(
    db: Database<Bytes, Bytes>,
    txn: &RoTxn,
    key: &[u8],
) -> Result<Option<Ledger>, RewardError> {
    let Some(bytes) = db.get(txn, key)? else {
        return Ok(None);
    };
    match postcard::from_bytes::<StoredLedger>(bytes) {
        Ok(StoredLedger::V1(l)) => Ok(Some(Ledger {
            points: l.points,
            badges: l.badges,
            vouchers: Vec::new(),
        })),
        Ok(StoredLedger::V2(l)) => Ok(Some(l)),
        Err(e) => Err(RewardError::Corrupt(e.to_string())),
    }
}

/// `day:<YYYY-MM-DD>` (UTC) of an event time.
pub fn day_window(at_ms: i64) -> String {
    let date = OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000))
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN);
    format!(
        "day:{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

fn customer_key(customer: &str) -> Vec<u8> {
    let len = u16::try_from(customer.len()).unwrap_or(u16::MAX);
    let mut k = len.to_be_bytes().to_vec();
    k.extend_from_slice(customer.as_bytes());
    k
}

fn push_short(k: &mut Vec<u8>, s: &str) {
    k.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(s.as_bytes());
}

fn category_prefix(category: &str) -> Vec<u8> {
    let mut k = Vec::new();
    push_short(&mut k, category);
    k
}

fn board_prefix(category: &str, window: &str) -> Vec<u8> {
    let mut k = category_prefix(category);
    push_short(&mut k, window);
    k
}

fn score_key(category: &str, window: &str, customer: &str) -> Vec<u8> {
    let mut k = board_prefix(category, window);
    k.extend_from_slice(&customer_key(customer));
    k
}

/// Higher points sort first: the order-preserving u64 of the score,
/// inverted.
fn ranking_key(category: &str, window: &str, points: i64, customer: &str) -> Vec<u8> {
    let mut k = board_prefix(category, window);
    let ordered = (points as u64) ^ (1 << 63);
    k.extend_from_slice(&(!ordered).to_be_bytes());
    k.extend_from_slice(&customer_key(customer));
    k
}

fn parse_ranking(rest: &[u8]) -> Option<(i64, String)> {
    let (score, customer) = rest.split_first_chunk::<8>()?;
    let ordered = !u64::from_be_bytes(*score);
    let points = (ordered ^ (1 << 63)) as i64;
    let (len, name) = customer.split_first_chunk::<2>()?;
    let name = name.get(..usize::from(u16::from_be_bytes(*len)))?;
    Some((points, String::from_utf8_lossy(name).into_owned()))
}

/// (category, window, customer key) of a score key.
fn parse_board(key: &[u8]) -> Option<(String, String, Vec<u8>)> {
    let (&clen, rest) = key.split_first()?;
    let (category, rest) = rest.split_at_checked(usize::from(clen))?;
    let (&wlen, rest) = rest.split_first()?;
    let (window, customer) = rest.split_at_checked(usize::from(wlen))?;
    Some((
        String::from_utf8_lossy(category).into_owned(),
        String::from_utf8_lossy(window).into_owned(),
        customer.to_vec(),
    ))
}

fn decode_points(bytes: &[u8]) -> i64 {
    bytes
        .first_chunk::<8>()
        .map(|b| i64::from_be_bytes(*b))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_keys_sort_by_descending_points() {
        let mut keys: Vec<Vec<u8>> = [5i64, -3, 100, 0, i64::MAX, i64::MIN]
            .iter()
            .map(|p| ranking_key("xp", LIFETIME, *p, "c"))
            .collect();
        keys.sort();
        let prefix = board_prefix("xp", LIFETIME).len();
        let order: Vec<i64> = keys
            .iter()
            .map(|k| parse_ranking(&k[prefix..]).unwrap().0)
            .collect();
        assert_eq!(order, vec![i64::MAX, 100, 5, 0, -3, i64::MIN]);
    }

    #[test]
    fn board_keys_parse_back() {
        let k = score_key("coins", "day:2026-11-23", "fan-7");
        let (c, w, cust) = parse_board(&k).unwrap();
        assert_eq!((c.as_str(), w.as_str()), ("coins", "day:2026-11-23"));
        assert_eq!(cust, customer_key("fan-7"));
        assert_eq!(day_window(0), "day:1970-01-01");
    }
}
