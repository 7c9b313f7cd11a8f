//! The next-best-action core learns which offer works: a simulated crowd
//! accepts offer X 30 % of the time and offer Y 5 %, both worth the same.
//! Driven through control group, learner, arbiter, contact policy and
//! statistics exactly as the writer will drive them, with a fixed seed,
//! the arbiter must settle on X for most decisions while still trying Y,
//! and the learned state must survive being stored and read back.

use std::collections::HashMap;

use edge_config::{BetaPrior, OnExpiry};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use touchline::nba::arbiter::{self, Candidate};
use touchline::nba::control::ControlGroup;
use touchline::nba::learner::{Arm, ArmRef, Learner, Lesson};
use touchline::nba::policy::{self, Cap, CustomerContact, OfferContact, OfferLimits, SiteLimits};
use touchline::nba::state::Persist;
use touchline::nba::stats::{Attribution, Group, StatsBook};
use touchline::nba::Outcome;

const DECISIONS: usize = 5_000;
const LAST: usize = 1_000;
const FANS: u64 = 20_000;
const SECOND: i64 = 1_000;
const EXPLORATION: f64 = 0.05;

/// The two offers: id and the simulated acceptance rate.
const OFFERS: [(&str, f64); 2] = [("x", 0.30), ("y", 0.05)];
const VALUE: f64 = 10.0;
/// Purchases happen anyway; an accepted offer always leads to one.
const BASE_CONVERSION: f64 = 0.02;

struct Simulation {
    rng: StdRng,
    learner: Learner,
    control: ControlGroup,
    site: SiteLimits,
    limits: OfferLimits,
    customers: HashMap<String, CustomerContact>,
    contacts: HashMap<(String, usize), OfferContact>,
    stats: StatsBook,
    /// Winning offer index of every treated or control decision, in order.
    picks: Vec<usize>,
    explored: usize,
}

impl Simulation {
    fn new(seed: u64) -> Simulation {
        Simulation {
            rng: StdRng::seed_from_u64(seed),
            learner: Learner::new(
                BetaPrior {
                    alpha: 1.0,
                    beta: 1.0,
                },
                EXPLORATION,
            ),
            control: ControlGroup::new("arena-test", 0.05),
            site: SiteLimits {
                per_customer: Cap {
                    count: 3,
                    per_ms: 3_600 * SECOND,
                },
                quiet_after_accept_ms: 600 * SECOND,
            },
            limits: OfferLimits {
                max: Some(Cap {
                    count: 1,
                    per_ms: 600 * SECOND,
                }),
                cooldown_ms: 900 * SECOND,
                stop_after_ignores: Some(3),
            },
            customers: HashMap::new(),
            contacts: HashMap::new(),
            stats: StatsBook::new(0),
            picks: Vec::new(),
            explored: 0,
        }
    }

    fn key(offer: usize) -> ArmRef<'static> {
        ArmRef {
            offer: OFFERS[offer].0,
            version: 1,
            segment: "all",
        }
    }

    /// One trigger for one customer at event time `now`, answered at once.
    fn decide(&mut self, now: i64) {
        let fan = format!("fan-{}", self.rng.random_range(0..FANS));
        let group = if self.control.contains(&fan) {
            Group::Control
        } else {
            Group::Treated
        };
        let candidates: Vec<Candidate> = (0..OFFERS.len())
            .map(|i| Candidate {
                propensity: self.learner.sample(Self::key(i), &mut self.rng),
                value: VALUE,
                weight: 1.0,
            })
            .collect();

        let customer = self.customers.entry(fan.clone()).or_default();
        let contacts = &mut self.contacts;
        let (site, limits) = (&self.site, &self.limits);
        let admit = |i: usize| {
            let offer = contacts.entry((fan.clone(), i)).or_default();
            policy::check(site, customer, limits, offer, now)?;
            customer.record_shown(site, now);
            offer.record_shown(limits, now, now + 300 * SECOND);
            Ok(())
        };
        let result = if self.learner.explores(&mut self.rng) {
            arbiter::explore(&candidates, 1, &mut self.rng, admit)
        } else {
            arbiter::arbitrate(&candidates, 1, admit)
        };
        for &(i, reason) in &result.suppressed {
            self.stats
                .update(OFFERS[i].0, 1, |c| c.record_suppressed(reason));
        }
        let Some(winner) = result.winners.first() else {
            return;
        };
        let i = winner.index;
        self.picks.push(i);
        self.explored += usize::from(result.explored);
        self.stats
            .update(OFFERS[i].0, 1, |c| c.record_decision(group));
        let mut attribution =
            Attribution::new(now, group, format!("{}.{}", OFFERS[i].0, self.picks.len()));

        // Control customers see nothing, so only the base rate converts.
        let answered = now + SECOND;
        let accepted = group == Group::Treated && self.rng.random_bool(OFFERS[i].1);
        if group == Group::Treated {
            let outcome = if accepted {
                Outcome::Accepted
            } else {
                Outcome::Dismissed
            };
            if let Some(lesson) = Lesson::from_outcome(outcome, OnExpiry::Ignore) {
                self.learner.learn(Self::key(i), lesson);
            }
            if let Some(offer) = self.contacts.get_mut(&(fan.clone(), i)) {
                offer.record_outcome(outcome, answered);
            }
            if accepted {
                if let Some(customer) = self.customers.get_mut(&fan) {
                    customer.record_accept(answered);
                }
            }
            self.stats
                .update(OFFERS[i].0, 1, |c| c.record_outcome(outcome));
        }
        if accepted || self.rng.random_bool(BASE_CONVERSION) {
            if let Some(g) = attribution.convert(answered + SECOND, 3_600 * SECOND) {
                self.stats
                    .update(OFFERS[i].0, 1, |c| c.record_conversion(g));
            }
        }
    }

    /// Stores every arm and starts a fresh learner from the bytes, as a
    /// restart would.
    fn restart_learner(&mut self) {
        let stored: Vec<(String, u32, String, Vec<u8>)> = self
            .learner
            .arms()
            .map(|(k, arm)| {
                let bytes = arm.to_bytes().unwrap_or_else(|e| panic!("{e}"));
                (k.offer.to_owned(), k.version, k.segment.to_owned(), bytes)
            })
            .collect();
        let mut fresh = Learner::new(
            BetaPrior {
                alpha: 1.0,
                beta: 1.0,
            },
            EXPLORATION,
        );
        for (offer, version, segment, bytes) in &stored {
            let arm = Arm::from_bytes(bytes).unwrap_or_else(|e| panic!("{e}"));
            fresh.insert(
                ArmRef {
                    offer,
                    version: *version,
                    segment,
                },
                arm,
            );
        }
        assert_eq!(fresh, self.learner);
        self.learner = fresh;
    }

    fn run(seed: u64) -> Simulation {
        let mut sim = Simulation::new(seed);
        for n in 0..DECISIONS {
            if n == DECISIONS / 2 {
                sim.restart_learner();
            }
            sim.decide(n as i64 * SECOND);
        }
        sim
    }
}

#[test]
fn the_arbiter_converges_to_the_better_offer_and_keeps_exploring() {
    let sim = Simulation::run(2024);
    // Contact limits suppress a few decisions; nearly all find a winner.
    assert!(
        sim.picks.len() > DECISIONS * 9 / 10,
        "{} decisions had a winner",
        sim.picks.len()
    );
    let last = &sim.picks[sim.picks.len() - LAST..];
    let x = last.iter().filter(|&&i| i == 0).count();
    let y = LAST - x;
    assert!(x > LAST * 8 / 10, "X won {x} of the last {LAST} decisions");
    // Exploring decisions pick Y half the time: 2.5 % of decisions in
    // expectation (25 of 1,000); Thompson draws add a few more.
    assert!(
        (10..=150).contains(&y),
        "Y won {y} of the last {LAST} decisions"
    );
    let explored_share = sim.explored as f64 / sim.picks.len() as f64;
    assert!(
        (0.03..0.07).contains(&explored_share),
        "{explored_share} of decisions explored"
    );

    // The learned propensities are close to the truth where evidence is
    // plentiful, and clearly ordered.
    let mean_x = sim.learner.mean(Simulation::key(0));
    let mean_y = sim.learner.mean(Simulation::key(1));
    assert!((mean_x - 0.30).abs() < 0.03, "X learned {mean_x}");
    assert!(mean_y < 0.15, "Y learned {mean_y}");
}

#[test]
fn offering_the_better_offer_shows_uplift_against_control() {
    let mut sim = Simulation::run(7);
    sim.stats.close_interval(DECISIONS as i64 * SECOND);
    let totals = sim
        .stats
        .totals("x", 1)
        .unwrap_or_else(|| panic!("x has totals"));
    assert!(totals.control > 50, "{totals:?}");
    assert_eq!(totals.decided, totals.shown + totals.control);
    assert_eq!(totals.accepted + totals.dismissed, totals.shown);
    let uplift = totals.uplift().unwrap_or_else(|| panic!("uplift defined"));
    // Treated: 30 % accept and convert, plus the 2 % base; control: 2 %.
    assert!(
        uplift.absolute > 0.2 && uplift.absolute > 3.0 * uplift.standard_error,
        "{uplift:?}"
    );
}

#[test]
fn the_same_seed_makes_the_same_decisions() {
    let a = Simulation::run(99);
    let b = Simulation::run(99);
    assert_eq!(a.picks, b.picks);
    assert_eq!(a.learner, b.learner);
    let c = Simulation::run(100);
    assert_ne!(a.picks, c.picks);
}
