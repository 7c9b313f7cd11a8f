//! Rate limiting for conditions that can repeat thousands of times a
//! second (map full, outbox drops, predicate errors): the first occurrence
//! is logged at once, then at most one line per interval carrying how many
//! were suppressed. And the pause before trying again something that
//! failed and would fail again at once (a write-back into a full map).

use std::time::{Duration, Instant};

use crate::backoff::Backoff;

pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) const fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub(crate) fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Puts off the next try of something that failed: 1 s after the first
/// failure, doubling with each failure in a row up to 30 s, until one
/// succeeds.
#[derive(Debug)]
pub(crate) struct RetryPause {
    until: Option<Instant>,
    steps: Backoff,
}

impl RetryPause {
    pub(crate) fn new() -> Self {
        RetryPause {
            until: None,
            steps: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
        }
    }

    /// Whether a try now would come too soon.
    pub(crate) fn waiting(&self) -> bool {
        self.until.is_some_and(|at| Instant::now() < at)
    }

    /// A try failed: the next waits. Returns for how long.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.steps.next_step();
        self.until = Some(Instant::now() + wait);
        wait
    }

    /// A try succeeded: the next failure waits the first pause again.
    pub(crate) fn succeeded(&mut self) {
        self.until = None;
        self.steps.reset();
    }

    /// Ends the pause now (tests).
    #[cfg(test)]
    pub(crate) fn end(&mut self) {
        self.until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_passes_then_suppresses() {
        let mut l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
        l.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(l.check(), Some(2));
    }
}
