//! The site's time zone, for windows that follow the local calendar.
//!
//! A `day` window or an `every = "day"` streak means a day as the venue's
//! fans live it, not a UTC day: a match that ends at 23:30 local time must
//! not be split in two because UTC midnight fell inside it. The zone
//! database is compiled in (no `/usr/share/zoneinfo` needed on the edge
//! box), and the engine only ever asks two questions: which local date an
//! instant falls on, and when a local date begins.

use std::fmt;

use chrono::{Duration as ChronoDuration, LocalResult, NaiveDate, TimeZone as _, Utc};
use chrono_tz::Tz;

/// Milliseconds in a day of 24 hours.
const DAY_MS: i64 = 86_400_000;

/// An IANA time zone (`"Europe/London"`, `"UTC"`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(Tz);

impl TimeZone {
    /// Coordinated Universal Time, the default.
    pub const UTC: TimeZone = TimeZone(Tz::UTC);

    /// The zone named `name` in the IANA database (case-sensitive, as
    /// the database spells it).
    pub fn parse(name: &str) -> Result<TimeZone, String> {
        name.parse::<Tz>().map(TimeZone).map_err(|_| {
            format!(
                "unknown time zone `{name}`; use an IANA name such as \"Europe/London\" or \"UTC\""
            )
        })
    }

    /// The IANA name.
    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    /// The local date of the instant `ms` (ms since the Unix epoch), as
    /// days since 1970-01-01 in the local calendar.
    pub fn day_of(&self, ms: i64) -> i64 {
        let Some(utc) = Utc.timestamp_millis_opt(ms).single() else {
            // Outside chrono's range (hundreds of thousands of years):
            // the UTC date is as good as any.
            return ms.div_euclid(DAY_MS);
        };
        let local = utc.with_timezone(&self.0).date_naive();
        local.signed_duration_since(epoch()).num_days()
    }

    /// The first instant (ms since the Unix epoch) whose local date is
    /// `day` (days since 1970-01-01). Where a clock change skips local
    /// midnight, the day begins when the clock resumes.
    pub fn day_start_ms(&self, day: i64) -> i64 {
        let fallback = day.saturating_mul(DAY_MS);
        let Some(date) = epoch().checked_add_signed(ChronoDuration::days(day)) else {
            return fallback;
        };
        let Some(midnight) = date.and_hms_opt(0, 0, 0) else {
            return fallback;
        };
        // Local times skipped by a clock change resolve to nothing; the
        // first minute after the gap that exists starts the day. Gaps
        // are at most a few hours.
        for minutes in 0..24 * 60 {
            let local = midnight + ChronoDuration::minutes(minutes);
            match self.0.from_local_datetime(&local) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                    return t.timestamp_millis();
                }
                LocalResult::None => {}
            }
        }
        fallback
    }
}

impl Default for TimeZone {
    fn default() -> TimeZone {
        TimeZone::UTC
    }
}

impl fmt::Debug for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TimeZone({})", self.name())
    }
}

impl fmt::Display for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-06-01T00:00:00Z
    const JUNE_1: i64 = 1_748_736_000_000;
    const HOUR: i64 = 3_600_000;

    #[test]
    fn names_parse_and_unknown_ones_say_why() {
        assert_eq!(TimeZone::parse("UTC"), Ok(TimeZone::UTC));
        assert_eq!(
            TimeZone::parse("Europe/London").map(|z| z.name()),
            Ok("Europe/London")
        );
        let err = TimeZone::parse("Mars/Olympus").expect_err("unknown");
        assert!(err.contains("unknown time zone `Mars/Olympus`"), "{err}");
    }

    #[test]
    fn local_dates_follow_the_zone() {
        let utc = TimeZone::UTC;
        let june_1 = JUNE_1 / DAY_MS;
        assert_eq!(utc.day_of(JUNE_1), june_1);
        assert_eq!(utc.day_of(JUNE_1 - 1), june_1 - 1);
        // 23:30 in London (BST, UTC+1) on 1 June is 22:30Z.
        let london = TimeZone::parse("Europe/London").unwrap();
        assert_eq!(london.day_of(JUNE_1 + 22 * HOUR + HOUR / 2), june_1);
        assert_eq!(london.day_of(JUNE_1 + 23 * HOUR + HOUR / 2), june_1 + 1);
        assert_eq!(london.day_start_ms(june_1), JUNE_1 - HOUR);
        // New York (EDT, UTC-4).
        let ny = TimeZone::parse("America/New_York").unwrap();
        assert_eq!(ny.day_start_ms(june_1), JUNE_1 + 4 * HOUR);
        assert_eq!(ny.day_of(JUNE_1 + 3 * HOUR), june_1 - 1);
        // Negative instants round down.
        assert_eq!(utc.day_of(-1), -1);
    }

    #[test]
    fn days_around_clock_changes() {
        let london = TimeZone::parse("Europe/London").unwrap();
        // 2025-03-30: clocks go forward at 01:00Z; the day has 23 hours.
        let day = NaiveDate::from_ymd_opt(2025, 3, 30)
            .unwrap()
            .signed_duration_since(epoch())
            .num_days();
        let len = london.day_start_ms(day + 1) - london.day_start_ms(day);
        assert_eq!(len, 23 * HOUR);
        // Santiago skips local midnight when summer time starts
        // (2024-09-08): the day starts at 01:00 local.
        let santiago = TimeZone::parse("America/Santiago").unwrap();
        let day = NaiveDate::from_ymd_opt(2024, 9, 8)
            .unwrap()
            .signed_duration_since(epoch())
            .num_days();
        let start = santiago.day_start_ms(day);
        assert_eq!(santiago.day_of(start), day);
        assert_eq!(santiago.day_of(start - 1), day - 1);
    }
}
