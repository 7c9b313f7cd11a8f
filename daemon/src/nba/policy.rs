//! Contact policy: whether an offer may be shown to a customer now.
//!
//! Fans should get offers that are relevant, not spam: each offer has its
//! own frequency cap, cooldown and a limit on how often it may be ignored,
//! and the site caps offers per customer and keeps quiet after an accept.
//! The state behind these checks is small, per customer and per (customer,
//! offer), and persisted by the caller; the answer is either "allowed" or
//! the first reason that stops it, with a stable name for statistics.
//!
//! Times are event-time milliseconds. Events can arrive out of order, so
//! the recorded times are kept sorted and a late event is judged against
//! the window around its own time.

use edge_config::{Contact, NbaPolicy, Rate};
use serde::{Deserialize, Serialize};

use super::millis;
use super::Outcome;

/// Why an offer was not shown. The order is the order of the checks and
/// the order reasons appear in statistics; new reasons are appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Suppression {
    /// The customer accepted an offer less than `nba.quiet_after_accept`
    /// ago.
    QuietAfterAccept,
    /// The customer reached `nba.max_per_customer`.
    CustomerCap,
    /// The customer ignored this offer `contact.stop_after_ignores` times
    /// in a row.
    StoppedAfterIgnores,
    /// An instance of this offer is still open for the customer.
    AlreadyOpen,
    /// The last instance closed less than `contact.cooldown` ago.
    Cooldown,
    /// The customer reached this offer's `contact.max`.
    OfferCap,
}

impl Suppression {
    /// Every reason, in order.
    pub const ALL: [Suppression; 6] = [
        Suppression::QuietAfterAccept,
        Suppression::CustomerCap,
        Suppression::StoppedAfterIgnores,
        Suppression::AlreadyOpen,
        Suppression::Cooldown,
        Suppression::OfferCap,
    ];

    /// The name in statistics and metrics; never changes.
    pub const fn name(self) -> &'static str {
        match self {
            Suppression::QuietAfterAccept => "quiet_after_accept",
            Suppression::CustomerCap => "customer_cap",
            Suppression::StoppedAfterIgnores => "stopped_after_ignores",
            Suppression::AlreadyOpen => "already_open",
            Suppression::Cooldown => "cooldown",
            Suppression::OfferCap => "offer_cap",
        }
    }

    /// Position in [`Suppression::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A cap in event-time milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub count: u32,
    pub per_ms: i64,
}

impl From<Rate> for Cap {
    fn from(rate: Rate) -> Cap {
        Cap {
            count: rate.count,
            per_ms: millis(rate.per),
        }
    }
}

/// The site-wide limits, from `[nba]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteLimits {
    pub per_customer: Cap,
    pub quiet_after_accept_ms: i64,
}

impl SiteLimits {
    pub fn from_policy(policy: &NbaPolicy) -> SiteLimits {
        SiteLimits {
            per_customer: policy.max_per_customer.into(),
            quiet_after_accept_ms: millis(policy.quiet_after_accept),
        }
    }
}

/// One offer's limits, from its `contact` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OfferLimits {
    pub max: Option<Cap>,
    pub cooldown_ms: i64,
    pub stop_after_ignores: Option<u32>,
}

impl OfferLimits {
    pub fn from_contact(contact: &Contact) -> OfferLimits {
        OfferLimits {
            max: contact.max.map(Cap::from),
            cooldown_ms: millis(contact.cooldown),
            stop_after_ignores: contact.stop_after_ignores,
        }
    }
}

/// What the site-wide limits remember about one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerContact {
    /// When offers were shown, sorted; only those that can still count
    /// against the cap are kept (at most its count, none older than its
    /// window). A cap raised by a reload therefore starts from what was
    /// kept, which can only let more through, never fewer.
    pub shown_ms: Vec<i64>,
    /// The latest accept of any offer.
    pub last_accept_ms: Option<i64>,
}

/// What one offer's limits remember about one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferContact {
    /// When this offer was shown, sorted and trimmed like
    /// [`CustomerContact::shown_ms`].
    pub shown_ms: Vec<i64>,
    /// While an instance is open: when it expires.
    pub open_until_ms: Option<i64>,
    /// When the latest instance closed (answered or expired).
    pub closed_ms: Option<i64>,
    /// Ignores (dismissed or expired) since the last accept.
    pub ignores_in_row: u32,
}

/// Whether the offer may be shown at `now_ms`; else the first reason
/// against it, customer-wide reasons first.
pub fn check(
    site: &SiteLimits,
    customer: &CustomerContact,
    limits: &OfferLimits,
    offer: &OfferContact,
    now_ms: i64,
) -> Result<(), Suppression> {
    if let Some(accepted) = customer.last_accept_ms {
        if now_ms >= accepted && now_ms - accepted < site.quiet_after_accept_ms {
            return Err(Suppression::QuietAfterAccept);
        }
    }
    if !below_cap(&customer.shown_ms, site.per_customer, now_ms) {
        return Err(Suppression::CustomerCap);
    }
    if let Some(stop) = limits.stop_after_ignores {
        if offer.ignores_in_row >= stop {
            return Err(Suppression::StoppedAfterIgnores);
        }
    }
    if offer.open_until_ms.is_some_and(|until| now_ms < until) {
        return Err(Suppression::AlreadyOpen);
    }
    if let Some(closed) = offer.closed_ms {
        if now_ms >= closed && now_ms - closed < limits.cooldown_ms {
            return Err(Suppression::Cooldown);
        }
    }
    if let Some(max) = limits.max {
        if !below_cap(&offer.shown_ms, max, now_ms) {
            return Err(Suppression::OfferCap);
        }
    }
    Ok(())
}

impl CustomerContact {
    /// An offer was shown (or, for a control customer, would have been).
    pub fn record_shown(&mut self, site: &SiteLimits, now_ms: i64) {
        record(&mut self.shown_ms, site.per_customer, now_ms);
    }

    /// The customer accepted an offer: the quiet time starts.
    pub fn record_accept(&mut self, now_ms: i64) {
        self.last_accept_ms = Some(self.last_accept_ms.map_or(now_ms, |t| t.max(now_ms)));
    }
}

impl OfferContact {
    /// An instance was shown (or decided for a control customer); it is
    /// open until `expires_ms`.
    pub fn record_shown(&mut self, limits: &OfferLimits, now_ms: i64, expires_ms: i64) {
        if let Some(max) = limits.max {
            record(&mut self.shown_ms, max, now_ms);
        }
        self.open_until_ms = Some(expires_ms);
    }

    /// Something happened to the open instance. Only closing outcomes
    /// change the contact state; an accept forgives earlier ignores.
    pub fn record_outcome(&mut self, outcome: Outcome, now_ms: i64) {
        if !outcome.closes() {
            return;
        }
        self.open_until_ms = None;
        self.closed_ms = Some(self.closed_ms.map_or(now_ms, |t| t.max(now_ms)));
        if outcome.is_ignore() {
            self.ignores_in_row = self.ignores_in_row.saturating_add(1);
        } else {
            self.ignores_in_row = 0;
        }
    }
}

/// Whether fewer than `cap.count` of `times` fall within the window
/// ending at `now_ms`. Times after `now_ms` (recorded from later events)
/// count as well: they are just as recent.
fn below_cap(times: &[i64], cap: Cap, now_ms: i64) -> bool {
    let from = now_ms.saturating_sub(cap.per_ms);
    let recent = times.len() - times.partition_point(|&t| t <= from);
    recent < cap.count as usize
}

/// Inserts `now_ms` in order and drops what can no longer count.
fn record(times: &mut Vec<i64>, cap: Cap, now_ms: i64) {
    let at = times.partition_point(|&t| t <= now_ms);
    times.insert(at, now_ms);
    let newest = times.last().copied().unwrap_or(now_ms);
    let stale = times.partition_point(|&t| t <= newest.saturating_sub(cap.per_ms));
    let over = times.len().saturating_sub(cap.count as usize);
    times.drain(..stale.max(over));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn site() -> SiteLimits {
        SiteLimits {
            per_customer: Cap {
                count: 3,
                per_ms: 60 * MIN,
            },
            quiet_after_accept_ms: 10 * MIN,
        }
    }

    /// The issue's `contact = { max = "1/10m", cooldown = "15m",
    /// stop_after_ignores = 3 }`.
    fn jersey() -> OfferLimits {
        OfferLimits {
            max: Some(Cap {
                count: 1,
                per_ms: 10 * MIN,
            }),
            cooldown_ms: 15 * MIN,
            stop_after_ignores: Some(3),
        }
    }

    #[test]
    fn names_are_stable_and_in_order() {
        let names: Vec<&str> = Suppression::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "quiet_after_accept",
                "customer_cap",
                "stopped_after_ignores",
                "already_open",
                "cooldown",
                "offer_cap"
            ]
        );
        for (i, s) in Suppression::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }

    #[test]
    fn a_fresh_customer_may_be_shown_anything() {
        let c = CustomerContact::default();
        let o = OfferContact::default();
        assert_eq!(check(&site(), &c, &jersey(), &o, 0), Ok(()));
    }

    #[test]
    fn open_then_cooldown_then_offer_cap() {
        let (s, l) = (site(), jersey());
        let mut c = CustomerContact::default();
        let mut o = OfferContact::default();
        let t0 = 1_000 * MIN;
        c.record_shown(&s, t0);
        o.record_shown(&l, t0, t0 + 5 * MIN);
        assert_eq!(
            check(&s, &c, &l, &o, t0 + MIN),
            Err(Suppression::AlreadyOpen)
        );
        // Dismissed after 2 minutes: the cooldown runs from there.
        o.record_outcome(Outcome::Dismissed, t0 + 2 * MIN);
        assert_eq!(
            check(&s, &c, &l, &o, t0 + 3 * MIN),
            Err(Suppression::Cooldown)
        );
        assert_eq!(check(&s, &c, &l, &o, t0 + 17 * MIN), Ok(()));
        // Without a cooldown the "1/10m" cap is what stops it.
        let no_cooldown = OfferLimits {
            cooldown_ms: 0,
            ..l
        };
        assert_eq!(
            check(&s, &c, &no_cooldown, &o, t0 + 3 * MIN),
            Err(Suppression::OfferCap)
        );
        assert_eq!(check(&s, &c, &no_cooldown, &o, t0 + 10 * MIN + 1), Ok(()));
    }

    #[test]
    fn three_ignores_stop_the_offer_and_an_accept_forgives() {
        let (s, l) = (site(), jersey());
        let c = CustomerContact::default();
        let mut o = OfferContact::default();
        let mut t = 0;
        for outcome in [Outcome::Dismissed, Outcome::Expired] {
            o.record_shown(&l, t, t + 5 * MIN);
            o.record_outcome(outcome, t + 5 * MIN);
            t += 60 * MIN;
        }
        assert_eq!(o.ignores_in_row, 2);
        assert_eq!(check(&s, &c, &l, &o, t), Ok(()));
        // Clicks and shares leave the instance open and count nothing.
        o.record_shown(&l, t, t + 5 * MIN);
        o.record_outcome(Outcome::Clicked, t + MIN);
        o.record_outcome(Outcome::Shared, t + MIN);
        assert_eq!(o.open_until_ms, Some(t + 5 * MIN));
        o.record_outcome(Outcome::Expired, t + 5 * MIN);
        assert_eq!(
            check(&s, &c, &l, &o, t + 600 * MIN),
            Err(Suppression::StoppedAfterIgnores)
        );

        let mut forgiven = OfferContact {
            ignores_in_row: 2,
            ..OfferContact::default()
        };
        forgiven.record_outcome(Outcome::Accepted, t);
        assert_eq!(forgiven.ignores_in_row, 0);
    }

    #[test]
    fn site_cap_and_quiet_time_apply_across_offers() {
        let s = site();
        let l = OfferLimits::default();
        let o = OfferContact::default();
        let mut c = CustomerContact::default();
        for i in 0..3 {
            c.record_shown(&s, i * MIN);
        }
        assert_eq!(
            check(&s, &c, &l, &o, 3 * MIN),
            Err(Suppression::CustomerCap)
        );
        // The oldest leaves the one-hour window.
        assert_eq!(check(&s, &c, &l, &o, 60 * MIN + 1), Ok(()));
        assert!(c.shown_ms.len() <= 3);

        c.record_accept(100 * MIN);
        assert_eq!(
            check(&s, &c, &l, &o, 105 * MIN),
            Err(Suppression::QuietAfterAccept)
        );
        assert_eq!(check(&s, &c, &l, &o, 110 * MIN), Ok(()));
        // The quiet time names itself first even when the cap is also hit.
        for i in 0..3 {
            c.record_shown(&s, 101 * MIN + i);
        }
        assert_eq!(
            check(&s, &c, &l, &o, 102 * MIN),
            Err(Suppression::QuietAfterAccept)
        );
    }

    #[test]
    fn late_events_are_judged_in_their_own_window() {
        let s = site();
        let mut c = CustomerContact::default();
        c.record_shown(&s, 50 * MIN);
        c.record_shown(&s, 10 * MIN);
        c.record_shown(&s, 30 * MIN);
        assert_eq!(c.shown_ms, [10 * MIN, 30 * MIN, 50 * MIN]);
        let l = OfferLimits::default();
        let o = OfferContact::default();
        assert_eq!(
            check(&s, &c, &l, &o, 55 * MIN),
            Err(Suppression::CustomerCap)
        );
        // Trimming keeps only what the newest time's window can count.
        c.record_shown(&s, 200 * MIN);
        assert_eq!(c.shown_ms, [200 * MIN]);
    }

    #[test]
    fn limits_come_from_the_config() {
        let policy = NbaPolicy::default();
        let s = SiteLimits::from_policy(&policy);
        assert_eq!(
            s.per_customer,
            Cap {
                count: 3,
                per_ms: 60 * MIN
            }
        );
        assert_eq!(s.quiet_after_accept_ms, 10 * MIN);
        let contact = Contact {
            max: Some(Rate {
                count: 1,
                per: std::time::Duration::from_secs(600),
            }),
            cooldown: std::time::Duration::from_secs(900),
            stop_after_ignores: Some(3),
        };
        assert_eq!(OfferLimits::from_contact(&contact), jersey());
    }
}
