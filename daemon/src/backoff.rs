//! Exponential backoff for retries: jittered against peers we do not
//! control (the broker, the central receiver, the store under
//! back-pressure), plain for retries of the store's own work.
//!
//! The jitter matters: after a broker restart every site reconnects at
//! once, and without it they would keep colliding in lockstep.

use std::time::Duration;

use rand::Rng;

/// Delays grow ×2 from `min` up to `max`; each delay is drawn uniformly
/// from the upper half of the current step, and never below `min`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            step: min,
        }
    }

    /// The delay before the next attempt, drawn from the upper half of
    /// the current step.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next_step();
        let half = step / 2;
        let span = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rand::rng().random_range(0..=span));
        (half + jitter).max(self.min)
    }

    /// The current step as it is, without jitter, and the next one
    /// doubled: for retries nothing else collides with, where a fixed
    /// schedule reads better in a log.
    pub(crate) fn next_step(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        step
    }

    /// Back to `min`, after a success.
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(min, max);
        let mut last_step = Duration::ZERO;
        for _ in 0..20 {
            let step = b.step;
            let d = b.next_delay();
            assert!(d >= min && d <= max, "{d:?}");
            assert!(d >= step / 2 && d <= step.max(min), "{d:?} vs {step:?}");
            assert!(step >= last_step);
            last_step = step;
        }
        assert_eq!(b.step, max);
        b.reset();
        assert!(b.next_delay() <= min);
    }
}
