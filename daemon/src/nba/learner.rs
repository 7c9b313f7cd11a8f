//! Propensity learning: how likely each offer is to be accepted, per
//! learner segment, learned online from what customers do.
//!
//! Each (offer, version, segment) is a Beta-Bernoulli arm: accepts are
//! successes, ignores failures, and the posterior is the configured prior
//! plus those counts. Decisions use Thompson sampling (one posterior draw
//! per candidate), which explores uncertain offers on its own and settles
//! on the best as evidence grows. The exploration floor keeps a share of
//! decisions random on top, so an offer that started badly is still tried
//! when the crowd or the match changes.
//!
//! Only counts are stored, so a reload that changes the prior applies it
//! to everything learned so far. A new offer version starts from the
//! prior: it may mean something else.

use std::collections::BTreeMap;

use edge_config::{BetaPrior, NbaPolicy, OnExpiry};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::sampling;
use super::Outcome;

/// What one learner arm has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arm {
    pub successes: u64,
    pub failures: u64,
}

/// Names an arm without owning the strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArmRef<'a> {
    pub offer: &'a str,
    pub version: u32,
    pub segment: &'a str,
}

/// What an outcome teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lesson {
    Success,
    Failure,
}

impl Lesson {
    /// An accept is a success; a dismissal a failure; an expiry a failure
    /// unless the site set `on_expiry = "neutral"`. Clicks, shares and
    /// conversions teach nothing here: the arm learns acceptance.
    pub fn from_outcome(outcome: Outcome, on_expiry: OnExpiry) -> Option<Lesson> {
        match outcome {
            Outcome::Accepted => Some(Lesson::Success),
            Outcome::Dismissed => Some(Lesson::Failure),
            Outcome::Expired => match on_expiry {
                OnExpiry::Ignore => Some(Lesson::Failure),
                OnExpiry::Neutral => None,
            },
            Outcome::Clicked | Outcome::Shared | Outcome::Converted => None,
        }
    }
}

/// Every arm of the site, with the policy that reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Learner {
    prior: BetaPrior,
    exploration: f64,
    /// offer → version → segment → arm. Nested so lookups take borrowed
    /// strings (no allocation per decision) and iteration is ordered.
    arms: BTreeMap<String, BTreeMap<u32, BTreeMap<String, Arm>>>,
}

impl Learner {
    /// An empty learner; `exploration` is clamped to 0..=1.
    pub fn new(prior: BetaPrior, exploration: f64) -> Learner {
        let mut learner = Learner {
            prior,
            exploration: 0.0,
            arms: BTreeMap::new(),
        };
        learner.set_policy(prior, exploration);
        learner
    }

    pub fn from_policy(policy: &NbaPolicy) -> Learner {
        Learner::new(policy.prior, policy.exploration)
    }

    /// A reload changed the prior or the floor; what was learned stays.
    pub fn set_policy(&mut self, prior: BetaPrior, exploration: f64) {
        self.prior = prior;
        self.exploration = if exploration.is_nan() {
            0.0
        } else {
            exploration.clamp(0.0, 1.0)
        };
    }

    /// The arm's counts (zero when nothing was learned yet).
    pub fn arm(&self, key: ArmRef<'_>) -> Arm {
        self.arms
            .get(key.offer)
            .and_then(|v| v.get(&key.version))
            .and_then(|s| s.get(key.segment))
            .copied()
            .unwrap_or_default()
    }

    /// Sets an arm's counts, e.g. when loading them from the store.
    pub fn insert(&mut self, key: ArmRef<'_>, arm: Arm) {
        *self.slot(key) = arm;
    }

    /// Updates the arm and returns its new counts, for the caller to
    /// persist in the same transaction.
    pub fn learn(&mut self, key: ArmRef<'_>, lesson: Lesson) -> Arm {
        let arm = self.slot(key);
        match lesson {
            Lesson::Success => arm.successes = arm.successes.saturating_add(1),
            Lesson::Failure => arm.failures = arm.failures.saturating_add(1),
        }
        *arm
    }

    /// A Thompson draw of the arm's propensity.
    pub fn sample<R: Rng + ?Sized>(&self, key: ArmRef<'_>, rng: &mut R) -> f64 {
        let (a, b) = self.posterior(key);
        sampling::beta(rng, a, b)
    }

    /// The posterior mean, for reports.
    pub fn mean(&self, key: ArmRef<'_>) -> f64 {
        let (a, b) = self.posterior(key);
        a / (a + b)
    }

    /// Whether this decision explores (picks at random among the eligible
    /// offers) rather than ranking by score; true for an `exploration`
    /// share of decisions.
    pub fn explores<R: Rng + ?Sized>(&self, rng: &mut R) -> bool {
        self.exploration > 0.0 && rng.random::<f64>() < self.exploration
    }

    /// Forgets arms of offers (or versions) no longer loaded, after a
    /// reload; the caller deletes their stored counts.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, u32) -> bool) {
        self.arms.retain(|offer, versions| {
            versions.retain(|&version, _| keep(offer, version));
            !versions.is_empty()
        });
    }

    /// Every arm, ordered by offer, version and segment.
    pub fn arms(&self) -> impl Iterator<Item = (ArmRef<'_>, Arm)> + '_ {
        self.arms.iter().flat_map(|(offer, versions)| {
            versions.iter().flat_map(move |(&version, segments)| {
                segments.iter().map(move |(segment, &arm)| {
                    (
                        ArmRef {
                            offer,
                            version,
                            segment,
                        },
                        arm,
                    )
                })
            })
        })
    }

    fn posterior(&self, key: ArmRef<'_>) -> (f64, f64) {
        let arm = self.arm(key);
        (
            self.prior.alpha + arm.successes as f64,
            self.prior.beta + arm.failures as f64,
        )
    }

    fn slot(&mut self, key: ArmRef<'_>) -> &mut Arm {
        self.arms
            .entry(key.offer.to_owned())
            .or_default()
            .entry(key.version)
            .or_default()
            .entry(key.segment.to_owned())
            .or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const UNIFORM: BetaPrior = BetaPrior {
        alpha: 1.0,
        beta: 1.0,
    };

    fn key<'a>(offer: &'a str, segment: &'a str) -> ArmRef<'a> {
        ArmRef {
            offer,
            version: 1,
            segment,
        }
    }

    #[test]
    fn lessons_follow_the_expiry_policy() {
        use Outcome::*;
        let ignore = OnExpiry::Ignore;
        let neutral = OnExpiry::Neutral;
        assert_eq!(
            Lesson::from_outcome(Accepted, ignore),
            Some(Lesson::Success)
        );
        assert_eq!(
            Lesson::from_outcome(Dismissed, neutral),
            Some(Lesson::Failure)
        );
        assert_eq!(Lesson::from_outcome(Expired, ignore), Some(Lesson::Failure));
        assert_eq!(Lesson::from_outcome(Expired, neutral), None);
        for o in [Clicked, Shared, Converted] {
            assert_eq!(Lesson::from_outcome(o, ignore), None);
        }
    }

    #[test]
    fn arms_are_per_offer_version_and_segment() {
        let mut l = Learner::new(UNIFORM, 0.0);
        assert_eq!(l.arm(key("x", "all")), Arm::default());
        assert_eq!(l.mean(key("x", "all")), 0.5);
        l.learn(key("x", "gold"), Lesson::Success);
        let arm = l.learn(key("x", "gold"), Lesson::Failure);
        assert_eq!(
            arm,
            Arm {
                successes: 1,
                failures: 1
            }
        );
        l.learn(key("x", "all"), Lesson::Failure);
        let v2 = ArmRef {
            version: 2,
            ..key("x", "gold")
        };
        assert_eq!(l.arm(v2), Arm::default());
        assert_eq!(l.mean(key("x", "all")), 1.0 / 3.0);

        let listed: Vec<(String, u32, String)> = l
            .arms()
            .map(|(k, _)| (k.offer.to_owned(), k.version, k.segment.to_owned()))
            .collect();
        assert_eq!(
            listed,
            [
                ("x".to_owned(), 1, "all".to_owned()),
                ("x".to_owned(), 1, "gold".to_owned())
            ]
        );
        l.insert(
            v2,
            Arm {
                successes: 5,
                failures: 0,
            },
        );
        l.retain(|offer, version| offer == "x" && version == 2);
        assert_eq!(l.arms().count(), 1);
        assert_eq!(l.arm(v2).successes, 5);
    }

    #[test]
    fn thompson_draws_follow_the_evidence() {
        let mut l = Learner::new(UNIFORM, 0.0);
        for _ in 0..300 {
            l.learn(key("good", "all"), Lesson::Success);
            l.learn(key("bad", "all"), Lesson::Failure);
        }
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..1000 {
            assert!(l.sample(key("good", "all"), &mut rng) > 0.9);
            assert!(l.sample(key("bad", "all"), &mut rng) < 0.1);
        }
    }

    #[test]
    fn the_prior_shapes_the_start_and_a_reload_keeps_counts() {
        let mut l = Learner::new(
            BetaPrior {
                alpha: 1.0,
                beta: 9.0,
            },
            0.0,
        );
        assert!((l.mean(key("x", "all")) - 0.1).abs() < 1e-12);
        l.learn(key("x", "all"), Lesson::Success);
        l.set_policy(UNIFORM, 0.2);
        assert_eq!(l.mean(key("x", "all")), 2.0 / 3.0);
    }

    #[test]
    fn exploration_share() {
        let mut rng = StdRng::seed_from_u64(5);
        let l = Learner::new(UNIFORM, 0.05);
        let n = (0..100_000).filter(|_| l.explores(&mut rng)).count();
        assert!((4_700..=5_300).contains(&n), "{n}");
        let never = Learner::new(UNIFORM, 0.0);
        assert!((0..1000).all(|_| !never.explores(&mut rng)));
        assert!(!Learner::new(UNIFORM, f64::NAN).explores(&mut rng));
    }
}
