//! Log rate limiting for conditions that can repeat thousands of times a
//! second (map full, outbox drops, predicate errors): the first occurrence
//! is logged at once, then at most one line per interval carrying how many
//! were suppressed.

use std::time::{Duration, Instant};

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
