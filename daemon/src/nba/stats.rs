//! Outcome statistics per offer, and the uplift against the control
//! group.
//!
//! CVM teams judge an offer by how it performed (shown, accepted,
//! ignored, suppressed and why) and, above all, by whether offering it
//! changed behaviour: the conversion rate of customers who were offered it
//! against control customers who would have been. Counters are kept per
//! reporting interval (they leave as one `offer_stats` record per offer
//! and minute) and added into running totals, from which the uplift is
//! computed: per-interval rates mix decisions and conversions from
//! different minutes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use touchline_proto::OfferStats;

use super::policy::Suppression;
use super::Outcome;

/// One offer's counters over some span of time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferCounters {
    /// Decisions that picked the offer: `shown` + `control`.
    pub decided: u64,
    /// Instances shown to treated customers.
    pub shown: u64,
    pub accepted: u64,
    pub dismissed: u64,
    pub clicked: u64,
    pub shared: u64,
    pub expired: u64,
    /// Suppressed decisions, indexed by [`Suppression::index`]; shorter
    /// when the later reasons never happened.
    pub suppressed: Vec<u64>,
    /// Control customers who would have been shown the offer.
    pub control: u64,
    /// Conversions after a treated decision, and after a control one.
    pub converted_treated: u64,
    pub converted_control: u64,
}

/// Which side of the experiment a decision was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Group {
    Treated,
    Control,
}

impl OfferCounters {
    /// The offer won a decision; `group` says whether it was shown.
    pub fn record_decision(&mut self, group: Group) {
        self.decided += 1;
        match group {
            Group::Treated => self.shown += 1,
            Group::Control => self.control += 1,
        }
    }

    pub fn record_suppressed(&mut self, reason: Suppression) {
        let i = reason.index();
        if self.suppressed.len() <= i {
            self.suppressed.resize(i + 1, 0);
        }
        self.suppressed[i] += 1;
    }

    /// An instance's outcome; conversions go through
    /// [`OfferCounters::record_conversion`], which knows the group.
    pub fn record_outcome(&mut self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Accepted => &mut self.accepted,
            Outcome::Dismissed => &mut self.dismissed,
            Outcome::Clicked => &mut self.clicked,
            Outcome::Shared => &mut self.shared,
            Outcome::Expired => &mut self.expired,
            Outcome::Converted => return,
        };
        *counter += 1;
    }

    pub fn record_conversion(&mut self, group: Group) {
        match group {
            Group::Treated => self.converted_treated += 1,
            Group::Control => self.converted_control += 1,
        }
    }

    pub fn suppressed_by(&self, reason: Suppression) -> u64 {
        self.suppressed.get(reason.index()).copied().unwrap_or(0)
    }

    /// Nothing happened: no record is worth sending.
    pub fn is_empty(&self) -> bool {
        // Destructured so a new counter cannot be forgotten here.
        let OfferCounters {
            decided,
            shown,
            accepted,
            dismissed,
            clicked,
            shared,
            expired,
            suppressed,
            control,
            converted_treated,
            converted_control,
        } = self;
        [
            decided,
            shown,
            accepted,
            dismissed,
            clicked,
            shared,
            expired,
            control,
            converted_treated,
            converted_control,
        ]
        .into_iter()
        .chain(suppressed)
        .all(|&n| n == 0)
    }

    /// Adds `other` into these counters.
    pub fn add(&mut self, other: &OfferCounters) {
        self.decided += other.decided;
        self.shown += other.shown;
        self.accepted += other.accepted;
        self.dismissed += other.dismissed;
        self.clicked += other.clicked;
        self.shared += other.shared;
        self.expired += other.expired;
        if self.suppressed.len() < other.suppressed.len() {
            self.suppressed.resize(other.suppressed.len(), 0);
        }
        for (mine, theirs) in self.suppressed.iter_mut().zip(&other.suppressed) {
            *mine += theirs;
        }
        self.control += other.control;
        self.converted_treated += other.converted_treated;
        self.converted_control += other.converted_control;
    }

    /// The uplift so far; `None` until both groups have decisions.
    pub fn uplift(&self) -> Option<Uplift> {
        Uplift::compute(
            self.shown,
            self.converted_treated,
            self.control,
            self.converted_control,
        )
    }

    /// The `offer_stats` record for these counters over `from_ms..to_ms`.
    /// Suppression reasons that never happened are left out.
    pub fn to_record(&self, offer: &str, version: u32, from_ms: i64, to_ms: i64) -> OfferStats {
        OfferStats {
            offer: offer.to_owned(),
            version,
            from_ms,
            to_ms,
            decided: self.decided,
            shown: self.shown,
            accepted: self.accepted,
            dismissed: self.dismissed,
            expired: self.expired,
            suppressed: Suppression::ALL
                .iter()
                .filter_map(|&r| {
                    let n = self.suppressed_by(r);
                    (n > 0).then(|| (r.name().to_owned(), n))
                })
                .collect(),
            control: self.control,
            converted_treated: self.converted_treated,
            converted_control: self.converted_control,
        }
    }
}

/// Conversion rates of treated and control customers and their
/// difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Uplift {
    /// Conversions per treated decision.
    pub treated_rate: f64,
    /// Conversions per control decision.
    pub control_rate: f64,
    /// `treated_rate - control_rate`: extra conversions per offer shown.
    pub absolute: f64,
    /// `absolute / control_rate`; `None` while control never converted.
    pub relative: Option<f64>,
    /// Standard error of `absolute` (two independent proportions), so a
    /// reader can tell an effect from noise: roughly, |absolute| above
    /// twice this is unlikely to be chance.
    pub standard_error: f64,
}

impl Uplift {
    /// From decision and conversion counts; `None` when either group has
    /// no decisions. Rates are capped at 1 (a conversion is counted once
    /// per decision, so only inconsistent input can exceed it).
    pub fn compute(
        treated: u64,
        treated_converted: u64,
        control: u64,
        control_converted: u64,
    ) -> Option<Uplift> {
        if treated == 0 || control == 0 {
            return None;
        }
        let rate = |conv: u64, n: u64| (conv as f64 / n as f64).min(1.0);
        let (t, c) = (
            rate(treated_converted, treated),
            rate(control_converted, control),
        );
        let variance = t * (1.0 - t) / treated as f64 + c * (1.0 - c) / control as f64;
        Some(Uplift {
            treated_rate: t,
            control_rate: c,
            absolute: t - c,
            relative: (c > 0.0).then(|| (t - c) / c),
            standard_error: variance.sqrt(),
        })
    }
}

/// The link between a decision and a later conversion, kept per
/// (customer, offer) so each decision converts at most once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    pub decided_ms: i64,
    pub group: Group,
    pub converted: bool,
    /// The decision's instance id (the would-have-been instance for a
    /// control customer), so the central side can join the conversion to
    /// the decision it follows. Empty for decisions stored before
    /// attributions kept it.
    pub instance: String,
}

impl Attribution {
    pub fn new(decided_ms: i64, group: Group, instance: String) -> Attribution {
        Attribution {
            decided_ms,
            group,
            converted: false,
            instance,
        }
    }

    /// A conversion event at `at_ms`: counts for the decision's group if
    /// it falls within `window_ms` after the decision and the decision
    /// has not converted yet.
    pub fn convert(&mut self, at_ms: i64, window_ms: i64) -> Option<Group> {
        let within = at_ms >= self.decided_ms && at_ms - self.decided_ms <= window_ms;
        if self.converted || !within {
            return None;
        }
        self.converted = true;
        Some(self.group)
    }
}

/// The site's counters: the open interval per (offer, version) and the
/// totals of every closed one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsBook {
    from_ms: i64,
    interval: BTreeMap<String, BTreeMap<u32, OfferCounters>>,
    totals: BTreeMap<String, BTreeMap<u32, OfferCounters>>,
}

impl StatsBook {
    /// A book whose first interval starts at `from_ms`.
    pub fn new(from_ms: i64) -> StatsBook {
        StatsBook {
            from_ms,
            ..StatsBook::default()
        }
    }

    /// Updates the open interval's counters of one offer version.
    pub fn update(&mut self, offer: &str, version: u32, f: impl FnOnce(&mut OfferCounters)) {
        // Look up by borrowed name first: the offer id is only copied the
        // first time it is counted in an interval.
        if let Some(versions) = self.interval.get_mut(offer) {
            f(versions.entry(version).or_default());
            return;
        }
        f(self
            .interval
            .entry(offer.to_owned())
            .or_default()
            .entry(version)
            .or_default());
    }

    /// Closes the interval at `to_ms`: one record per offer version that
    /// saw anything, in offer order; the counters move into the totals.
    pub fn close_interval(&mut self, to_ms: i64) -> Vec<OfferStats> {
        let mut records = Vec::new();
        for (offer, versions) in std::mem::take(&mut self.interval) {
            for (version, counters) in versions {
                if counters.is_empty() {
                    continue;
                }
                records.push(counters.to_record(&offer, version, self.from_ms, to_ms));
                self.totals
                    .entry(offer.clone())
                    .or_default()
                    .entry(version)
                    .or_default()
                    .add(&counters);
            }
        }
        self.from_ms = to_ms;
        records
    }

    /// Everything counted for an offer version in closed intervals.
    pub fn totals(&self, offer: &str, version: u32) -> Option<&OfferCounters> {
        self.totals.get(offer).and_then(|v| v.get(&version))
    }

    /// Sets the totals of an offer version, e.g. when loading them from
    /// the store.
    pub fn set_totals(&mut self, offer: &str, version: u32, counters: OfferCounters) {
        self.totals
            .entry(offer.to_owned())
            .or_default()
            .insert(version, counters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_decisions_outcomes_and_suppressions() {
        let mut c = OfferCounters::default();
        assert!(c.is_empty());
        c.record_decision(Group::Treated);
        c.record_decision(Group::Treated);
        c.record_decision(Group::Control);
        c.record_outcome(Outcome::Accepted);
        c.record_outcome(Outcome::Expired);
        c.record_outcome(Outcome::Clicked);
        c.record_outcome(Outcome::Converted);
        c.record_suppressed(Suppression::Cooldown);
        c.record_suppressed(Suppression::Cooldown);
        c.record_suppressed(Suppression::QuietAfterAccept);
        c.record_conversion(Group::Control);
        assert_eq!((c.decided, c.shown, c.control), (3, 2, 1));
        assert_eq!((c.accepted, c.expired, c.clicked), (1, 1, 1));
        assert_eq!(c.suppressed_by(Suppression::Cooldown), 2);
        assert_eq!(c.suppressed_by(Suppression::OfferCap), 0);
        assert_eq!(c.converted_control, 1);
        assert!(!c.is_empty());

        let r = c.to_record("team-a-jersey", 1, 0, 60_000);
        assert_eq!(r.decided, 3);
        assert_eq!(
            r.suppressed,
            [
                ("quiet_after_accept".to_owned(), 1),
                ("cooldown".to_owned(), 2)
            ]
        );
        assert_eq!((r.from_ms, r.to_ms), (0, 60_000));

        let only_suppressed = OfferCounters {
            suppressed: vec![0, 1],
            ..OfferCounters::default()
        };
        assert!(!only_suppressed.is_empty());
        let zeroes = OfferCounters {
            suppressed: vec![0, 0],
            ..OfferCounters::default()
        };
        assert!(zeroes.is_empty());
    }

    #[test]
    fn uplift_compares_treated_with_control() {
        // 12 % of 1,000 treated converted against 8 % of 500 controls.
        let u = Uplift::compute(1_000, 120, 500, 40).unwrap_or_else(|| panic!("defined"));
        assert!((u.treated_rate - 0.12).abs() < 1e-12);
        assert!((u.control_rate - 0.08).abs() < 1e-12);
        assert!((u.absolute - 0.04).abs() < 1e-12);
        assert!((u.relative.unwrap_or(0.0) - 0.5).abs() < 1e-12);
        let se = (0.12 * 0.88 / 1000.0 + 0.08 * 0.92 / 500.0_f64).sqrt();
        assert!((u.standard_error - se).abs() < 1e-12);

        assert_eq!(Uplift::compute(0, 0, 10, 1), None);
        assert_eq!(Uplift::compute(10, 1, 0, 0), None);
        let no_control_conversions = Uplift::compute(10, 1, 10, 0);
        assert_eq!(no_control_conversions.and_then(|u| u.relative), None);

        let mut c = OfferCounters::default();
        for _ in 0..4 {
            c.record_decision(Group::Treated);
        }
        c.record_decision(Group::Control);
        c.record_conversion(Group::Treated);
        let u = c.uplift().unwrap_or_else(|| panic!("defined"));
        assert_eq!((u.treated_rate, u.control_rate), (0.25, 0.0));
    }

    #[test]
    fn a_decision_converts_once_within_its_window() {
        let mut a = Attribution::new(1_000, Group::Control, "i-1".to_owned());
        assert_eq!(a.convert(999, 10_000), None);
        assert_eq!(a.convert(20_000, 10_000), None);
        assert_eq!(a.convert(11_000, 10_000), Some(Group::Control));
        assert_eq!(a.convert(11_001, 10_000), None);
    }

    #[test]
    fn intervals_close_into_records_and_totals() {
        let mut book = StatsBook::new(0);
        book.update("b", 1, |c| c.record_decision(Group::Treated));
        book.update("a", 2, |c| c.record_decision(Group::Control));
        book.update("a", 2, |c| c.record_suppressed(Suppression::OfferCap));
        book.update("c", 1, |_| {});
        let records = book.close_interval(60_000);
        let names: Vec<(&str, u32)> = records
            .iter()
            .map(|r| (r.offer.as_str(), r.version))
            .collect();
        assert_eq!(names, [("a", 2), ("b", 1)]);
        assert_eq!(records[0].suppressed, [("offer_cap".to_owned(), 1)]);

        book.update("b", 1, |c| c.record_decision(Group::Treated));
        let records = book.close_interval(120_000);
        assert_eq!((records[0].from_ms, records[0].to_ms), (60_000, 120_000));
        assert_eq!(book.totals("b", 1).map(|c| c.shown), Some(2));
        assert!(book.close_interval(180_000).is_empty());

        book.set_totals(
            "z",
            1,
            OfferCounters {
                shown: 9,
                ..OfferCounters::default()
            },
        );
        assert_eq!(book.totals("z", 1).map(|c| c.shown), Some(9));
    }
}
