//! Arbitration: which of a customer's eligible offers to show.
//!
//! Every candidate scores propensity × value × weight: how likely an
//! accept is, what an accept is worth, and how much the moment favours
//! the offer. Candidates are admitted best first through the contact
//! policy until `top_k` got through, so an offer the policy suppresses
//! lets the next best one through instead of leaving the customer with
//! nothing. An exploring decision admits in random order instead.
//!
//! The policy is a closure so the caller can update its contact state as
//! each winner is admitted: a site-wide cap reached by the first winner
//! then stops the second.

use rand::seq::SliceRandom;
use rand::Rng;

use super::policy::Suppression;

/// One eligible offer (audience and consent already passed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Learned acceptance probability (a Thompson draw), 0..=1.
    pub propensity: f64,
    /// The offer's `value`.
    pub value: f64,
    /// The offer's `weight` for this trigger; 1 without one.
    pub weight: f64,
}

impl Candidate {
    pub fn score(&self) -> f64 {
        self.propensity * self.value * self.weight
    }
}

/// An admitted candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Winner {
    /// Index into the candidates.
    pub index: usize,
    pub score: f64,
}

/// What became of the candidates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Arbitration {
    /// Admitted, best first (in the order they were admitted).
    pub winners: Vec<Winner>,
    /// Refused by the contact policy, in the order they were tried.
    pub suppressed: Vec<(usize, Suppression)>,
    /// Candidates whose score is not a finite number ≥ 0 (a weight
    /// expression gave nonsense); never shown, for the caller to count.
    pub invalid: Vec<usize>,
    /// Whether the order was random (an exploring decision).
    pub explored: bool,
}

/// Admits up to `top_k` candidates in descending score; ties go to the
/// earlier candidate (config order), so equal inputs decide the same.
/// Candidates scoring 0 (a weight of 0 means "not at this moment") are
/// passed over. `admit` is asked in that order and only until `top_k`
/// were admitted.
pub fn arbitrate<F>(candidates: &[Candidate], top_k: usize, admit: F) -> Arbitration
where
    F: FnMut(usize) -> Result<(), Suppression>,
{
    let (mut left, invalid) = valid(candidates);
    // Selection, not a full sort: with top-K of 1 the best is usually
    // admitted at once. `left` stays in index order, so the first of
    // equal scores wins.
    let next = || {
        let mut best: Option<(usize, f64)> = None;
        for (at, &i) in left.iter().enumerate() {
            let score = candidates[i].score();
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((at, score));
            }
        }
        best.map(|(at, _)| left.remove(at))
    };
    admit_in_order(candidates, next, invalid, top_k, false, admit)
}

/// Like [`arbitrate`] but in uniformly random order: the exploration
/// floor's decisions, which give every eligible offer the same chance.
pub fn explore<R, F>(candidates: &[Candidate], top_k: usize, rng: &mut R, admit: F) -> Arbitration
where
    R: Rng + ?Sized,
    F: FnMut(usize) -> Result<(), Suppression>,
{
    let (mut order, invalid) = valid(candidates);
    order.shuffle(rng);
    let mut order = order.into_iter();
    admit_in_order(candidates, || order.next(), invalid, top_k, true, admit)
}

/// Indexes of candidates with a positive finite score, and of those whose
/// score is not a finite number ≥ 0.
fn valid(candidates: &[Candidate]) -> (Vec<usize>, Vec<usize>) {
    let mut order = Vec::with_capacity(candidates.len());
    let mut invalid = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let score = c.score();
        if !score.is_finite() || score < 0.0 {
            invalid.push(i);
        } else if score > 0.0 {
            order.push(i);
        }
    }
    (order, invalid)
}

/// Asks `admit` about candidates in the order `next` gives them until
/// `top_k` got through.
fn admit_in_order<N, F>(
    candidates: &[Candidate],
    mut next: N,
    invalid: Vec<usize>,
    top_k: usize,
    explored: bool,
    mut admit: F,
) -> Arbitration
where
    N: FnMut() -> Option<usize>,
    F: FnMut(usize) -> Result<(), Suppression>,
{
    let mut out = Arbitration {
        invalid,
        explored,
        ..Arbitration::default()
    };
    while out.winners.len() < top_k {
        let Some(index) = next() else { break };
        match admit(index) {
            Ok(()) => out.winners.push(Winner {
                index,
                score: candidates[index].score(),
            }),
            Err(reason) => out.suppressed.push((index, reason)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn c(propensity: f64, value: f64, weight: f64) -> Candidate {
        Candidate {
            propensity,
            value,
            weight,
        }
    }

    fn winners(a: &Arbitration) -> Vec<usize> {
        a.winners.iter().map(|w| w.index).collect()
    }

    #[test]
    fn the_best_score_wins() {
        // 0.1 × 25 × 1.5 = 3.75 beats 0.5 × 5 × 1 = 2.5 beats 0.3 × 5 = 1.5.
        let cs = [c(0.3, 5.0, 1.0), c(0.1, 25.0, 1.5), c(0.5, 5.0, 1.0)];
        let a = arbitrate(&cs, 1, |_| Ok(()));
        assert_eq!(winners(&a), [1]);
        assert!((a.winners[0].score - 3.75).abs() < 1e-12);
        assert!(!a.explored);
        let a = arbitrate(&cs, 2, |_| Ok(()));
        assert_eq!(winners(&a), [1, 2]);
        let a = arbitrate(&cs, 5, |_| Ok(()));
        assert_eq!(winners(&a), [1, 2, 0]);
    }

    #[test]
    fn a_suppressed_offer_lets_the_next_best_through() {
        let cs = [c(0.3, 5.0, 1.0), c(0.1, 25.0, 1.5), c(0.5, 5.0, 1.0)];
        let mut asked = Vec::new();
        let a = arbitrate(&cs, 1, |i| {
            asked.push(i);
            if i == 1 {
                Err(Suppression::StoppedAfterIgnores)
            } else {
                Ok(())
            }
        });
        assert_eq!(winners(&a), [2]);
        assert_eq!(a.suppressed, [(1, Suppression::StoppedAfterIgnores)]);
        // Nobody is asked once the winners are found.
        assert_eq!(asked, [1, 2]);
    }

    #[test]
    fn the_policy_sees_earlier_winners() {
        // A site cap of one offer: the closure counts what it admitted.
        let cs = [c(0.9, 1.0, 1.0), c(0.8, 1.0, 1.0), c(0.7, 1.0, 1.0)];
        let mut shown = 0;
        let a = arbitrate(&cs, 3, |_| {
            if shown >= 1 {
                return Err(Suppression::CustomerCap);
            }
            shown += 1;
            Ok(())
        });
        assert_eq!(winners(&a), [0]);
        assert_eq!(
            a.suppressed,
            [(1, Suppression::CustomerCap), (2, Suppression::CustomerCap)]
        );
    }

    #[test]
    fn ties_go_to_config_order_and_nonsense_is_set_aside() {
        let cs = [
            c(0.5, 2.0, 1.0),
            c(0.5, 1.0, 2.0),
            c(0.5, 1.0, f64::NAN),
            c(0.5, 1.0, -1.0),
            c(0.5, 1.0, 0.0),
            c(0.5, 1.0, f64::INFINITY),
        ];
        let a = arbitrate(&cs, 6, |_| Ok(()));
        assert_eq!(winners(&a), [0, 1]);
        assert_eq!(a.invalid, [2, 3, 5]);
        let none = arbitrate(&[], 1, |_| Ok(()));
        assert!(none.winners.is_empty() && none.suppressed.is_empty());
    }

    #[test]
    fn exploring_gives_every_offer_a_fair_chance() {
        let cs = [c(0.9, 100.0, 1.0), c(0.01, 1.0, 1.0), c(0.01, 1.0, 1.0)];
        let mut rng = StdRng::seed_from_u64(9);
        let mut wins = [0usize; 3];
        for _ in 0..30_000 {
            let a = explore(&cs, 1, &mut rng, |_| Ok(()));
            assert!(a.explored);
            wins[a.winners[0].index] += 1;
        }
        for w in wins {
            assert!((9_500..=10_500).contains(&w), "{wins:?}");
        }
        // Suppression still applies while exploring.
        let a = explore(&cs, 3, &mut rng, |i| {
            if i == 0 {
                Err(Suppression::Cooldown)
            } else {
                Ok(())
            }
        });
        let mut got = winners(&a);
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
        assert_eq!(a.suppressed, [(0, Suppression::Cooldown)]);
    }
}
