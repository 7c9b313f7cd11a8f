//! Per-rule statistics for the central platform: a `RuleStats` record per
//! rule and interval (every minute by default) with the counts of that
//! interval.
//!
//! The engine keeps cumulative counters; this turns them into deltas
//! against what was last reported, so each interval is reported once and
//! the central side can sum them. A rules reload replaces the counters:
//! the writer flushes the old engine's deltas first, then starts from zero
//! with the new one. Quiet rules (no change) send nothing.

use std::collections::HashMap;
use std::time::Duration;

use touchline_proto::{RecordBody, RuleStats};

use crate::engine::EngineStats;

/// Default reporting interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// Cumulative counters of one rule at the last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reported {
    matched: u64,
    awards: u64,
    late: u64,
    limited: u64,
}

/// What one interval produced, pending its commit.
pub(crate) struct Report {
    pub records: Vec<RecordBody>,
    last: HashMap<(String, u32), Reported>,
    pub to_ms: i64,
}

#[derive(Debug)]
pub(crate) struct Reporter {
    interval_ms: i64,
    /// Start of the interval being counted (ms since the epoch).
    from_ms: i64,
    last: HashMap<(String, u32), Reported>,
}

impl Reporter {
    pub(crate) fn new(interval: Duration, now_ms: i64) -> Reporter {
        Reporter {
            interval_ms: i64::try_from(interval.as_millis())
                .unwrap_or(i64::MAX)
                .max(1),
            from_ms: now_ms,
            last: HashMap::new(),
        }
    }

    pub(crate) fn due(&self, now_ms: i64) -> bool {
        now_ms.saturating_sub(self.from_ms) >= self.interval_ms
    }

    /// The records for the interval ending at `now_ms`. Nothing changes
    /// until [`Reporter::reported`] confirms they were committed, so a
    /// failed commit reports the same counts again next time.
    pub(crate) fn collect(&self, stats: &EngineStats, now_ms: i64) -> Report {
        let mut records = Vec::new();
        let mut last = HashMap::with_capacity(stats.rules().len());
        for rule in stats.rules() {
            let key = (rule.id().to_string(), rule.version());
            let now = Reported {
                matched: rule.matched(),
                awards: rule.awards(),
                late: rule.late(),
                limited: rule.limited(),
            };
            let before = self.last.get(&key).copied().unwrap_or_default();
            if now != before {
                records.push(RecordBody::RuleStats(RuleStats {
                    rule: key.0.clone(),
                    version: key.1,
                    from_ms: self.from_ms,
                    to_ms: now_ms,
                    matched: now.matched.saturating_sub(before.matched),
                    awards: now.awards.saturating_sub(before.awards),
                    late: now.late.saturating_sub(before.late),
                    limited: now.limited.saturating_sub(before.limited),
                }));
            }
            last.insert(key, now);
        }
        Report {
            records,
            last,
            to_ms: now_ms,
        }
    }

    /// The report's records are committed: its counts are the baseline.
    pub(crate) fn reported(&mut self, report: Report) {
        self.last = report.last;
        self.from_ms = report.to_ms;
    }

    /// New rules: their counters start at zero.
    pub(crate) fn forget_counters(&mut self) {
        self.last.clear();
    }
}
