//! Per-reason rate limits for the rejection path.
//!
//! Bad input can arrive at line rate; logging or sampling every rejection
//! would turn one misbehaving sender into a log flood or a dead-letter
//! write storm. Each reject reason gets its own window so a flood of one
//! kind never hides the first occurrence of another.

use std::sync::{Mutex, PoisonError};

use super::validate::RejectReason;

/// Allows at most `per_window` occurrences in each window of `window_ms`,
/// and counts what it suppressed in between.
pub(crate) struct Window {
    window_ms: i64,
    per_window: u32,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    window_start_ms: Option<i64>,
    used: u32,
    suppressed: u64,
}

/// The verdict for one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go ahead; `suppressed` occurrences were held back since the last
    /// allowed one.
    Allow {
        suppressed: u64,
    },
    Suppress,
}

impl Window {
    pub(crate) fn new(window_ms: i64, per_window: u32) -> Window {
        Window {
            window_ms: window_ms.max(1),
            per_window: per_window.max(1),
            slot: Mutex::new(Slot::default()),
        }
    }

    pub(crate) fn check(&self, now_ms: i64) -> Verdict {
        // A poisoned slot only means another thread panicked mid-update of
        // two counters; the values are still usable for rate limiting.
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = match slot.window_start_ms {
            None => true,
            Some(start) => now_ms.saturating_sub(start) >= self.window_ms || now_ms < start,
        };
        if expired {
            slot.window_start_ms = Some(now_ms);
            slot.used = 0;
        }
        if slot.used < self.per_window {
            slot.used += 1;
            let suppressed = std::mem::take(&mut slot.suppressed);
            Verdict::Allow { suppressed }
        } else {
            slot.suppressed += 1;
            Verdict::Suppress
        }
    }
}

/// One `Window` per reject reason.
pub(crate) struct ReasonLimiter {
    windows: [Window; RejectReason::COUNT],
}

impl ReasonLimiter {
    pub(crate) fn new(window_ms: i64, per_window: u32) -> ReasonLimiter {
        ReasonLimiter {
            windows: std::array::from_fn(|_| Window::new(window_ms, per_window)),
        }
    }

    pub(crate) fn check(&self, reason: RejectReason, now_ms: i64) -> Verdict {
        self.windows[reason.index()].check(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_window_per_reason_with_suppressed_count() {
        let l = ReasonLimiter::new(10_000, 1);
        let r = RejectReason::InvalidJson;
        assert_eq!(l.check(r, 0), Verdict::Allow { suppressed: 0 });
        assert_eq!(l.check(r, 1), Verdict::Suppress);
        assert_eq!(l.check(r, 9_999), Verdict::Suppress);
        // Another reason has its own window.
        assert_eq!(
            l.check(RejectReason::TooOld, 5),
            Verdict::Allow { suppressed: 0 }
        );
        assert_eq!(l.check(r, 10_000), Verdict::Allow { suppressed: 2 });
        assert_eq!(l.check(r, 10_001), Verdict::Suppress);
    }

    #[test]
    fn burst_per_window() {
        let l = ReasonLimiter::new(1_000, 3);
        let r = RejectReason::TooLarge;
        for _ in 0..3 {
            assert!(matches!(l.check(r, 0), Verdict::Allow { .. }));
        }
        assert_eq!(l.check(r, 10), Verdict::Suppress);
        assert_eq!(l.check(r, 1_000), Verdict::Allow { suppressed: 1 });
    }
}
