//! Windows: which instance of a rule's state an event belongs to, and when
//! that instance closes.
//!
//! The instance name is part of the state key and of every award, so each
//! instance keeps its own progress and its tiers can be earned again in the
//! next one. Windows are event-time: an instance closes when the site's
//! watermark passes its end plus the rule's lateness ([`Placement::late`]).
//! Periods (matches, concerts) are not computed from the clock but opened
//! and closed by venue events; [`Periods`] is their registry.

use std::sync::{Arc, LazyLock};

use edge_config::{TimeZone, Window};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Instance name of a `lifetime` window.
pub const LIFETIME: &str = "lifetime";

/// State key of a `rolling` window: one record per customer and rule; the
/// instance the award names is kept in the state (`rolling:<start>`).
pub const ROLLING_KEY: &str = "rolling";

/// The names of the windows with a single instance, made once: nearly
/// every event has a rule in each.
static LIFETIME_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(LIFETIME));
static ROLLING_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(ROLLING_KEY));

/// The longest period id kept; longer ones are refused (a counted bad
/// event), so period names stay readable and keys bounded.
pub const MAX_PERIOD_ID: usize = 128;

/// Where an event falls for one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The instance's state key component (and the award's window name,
    /// except for `rolling`, whose award names the run's start). Shared:
    /// every rule in the same instance holds the same name.
    pub name: Arc<str>,
    /// The instance's position in its sequence (day number, period
    /// ordinal, span number): what streaks count over.
    pub ordinal: i64,
    /// Event time at which the instance ends, `None` when it never does
    /// (lifetime) or has not yet been closed (an open period).
    pub end_ms: Option<i64>,
}

impl Placement {
    /// True when the watermark has passed the instance's end by more than
    /// `lateness_ms`: the event arrived too late to count.
    pub fn late(&self, watermark_ms: i64, lateness_ms: i64) -> bool {
        self.end_ms
            .is_some_and(|end| watermark_ms > end.saturating_add(lateness_ms))
    }
}

/// The instance of `window` an event at `time_ms` falls into, or `None`
/// for a `period` window when no period covers the time.
pub fn place(window: &Window, tz: TimeZone, periods: &Periods, time_ms: i64) -> Option<Placement> {
    // One lookup: remembering the name would only allocate a table to drop.
    let mut once = Names {
        memo: FxHashMap::default(),
        keep: false,
        day: None,
    };
    once.place(window, tz, periods, time_ms)
}

/// Instance names already formatted. Every rule an event matches needs
/// its instance's name (it is part of the state key), and formatting a
/// date for each one was a good part of the engine's time; consecutive
/// events nearly always fall in the same few instances. Day names depend
/// on the time zone, so one `Names` serves one zone (the engine's).
#[derive(Debug)]
pub struct Names {
    memo: FxHashMap<(Kind, i64), Arc<str>>,
    /// Whether names are remembered (not for [`place`]'s single lookup).
    keep: bool,
    /// The last time placed in a day.
    day: Option<DayAt>,
}

/// A local day: its number, its first instant and the next day's.
#[derive(Debug, Clone, Copy)]
struct DayAt {
    n: i64,
    start_ms: i64,
    end_ms: i64,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            memo: FxHashMap::default(),
            keep: true,
            day: None,
        }
    }
}

/// Which sequence of instances an ordinal counts in (windows with more
/// than one instance; the others share one name each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Day,
    Tumbling(i64),
    Period,
}

/// Names remembered before the memo starts over: a handful of windows,
/// each with the few instances events are arriving for.
const NAMES_MAX: usize = 4096;

impl Names {
    /// [`place`], naming each instance once.
    pub fn place(
        &mut self,
        window: &Window,
        tz: TimeZone,
        periods: &Periods,
        time_ms: i64,
    ) -> Option<Placement> {
        match window {
            Window::Lifetime => Some(Placement {
                name: LIFETIME_NAME.clone(),
                ordinal: 0,
                end_ms: None,
            }),
            Window::Day => {
                let (n, end_ms) = self.day(tz, time_ms);
                Some(Placement {
                    name: self.name(Kind::Day, n, || day_name(n)),
                    ordinal: n,
                    end_ms: Some(end_ms),
                })
            }
            Window::Period => {
                let (i, p) = periods.covering(time_ms)?;
                let ordinal = i as i64;
                // A period that starts earlier than a known one is
                // inserted before it, so an ordinal can come to mean
                // another period: the name is used only if it still fits.
                let name = match self.memo.get(&(Kind::Period, ordinal)) {
                    Some(name) if names_period(name, &p.id) => name.clone(),
                    _ => {
                        self.memo.remove(&(Kind::Period, ordinal));
                        self.name(Kind::Period, ordinal, || period_name(&p.id))
                    }
                };
                Some(Placement {
                    name,
                    ordinal,
                    end_ms: p.end_ms,
                })
            }
            Window::Tumbling(span) => {
                let span_ms = duration_ms(*span);
                let n = time_ms.div_euclid(span_ms);
                let start = n.saturating_mul(span_ms);
                Some(Placement {
                    name: self.name(Kind::Tumbling(span_ms), n, || {
                        format!("{}/{}", rfc3339(start), duration_text(span_ms))
                    }),
                    ordinal: n,
                    end_ms: Some(start.saturating_add(span_ms)),
                })
            }
            Window::Rolling(span) => Some(Placement {
                name: ROLLING_NAME.clone(),
                ordinal: 0,
                // The event leaves the window `span` after it happened.
                end_ms: Some(time_ms.saturating_add(duration_ms(*span))),
            }),
        }
    }

    /// The local day `time_ms` falls in and the instant the next one
    /// starts. The time zone's arithmetic is the costly part of placing
    /// an event, and nearly every event falls in the day the last one
    /// did: the last day's bounds answer for any time between them.
    pub fn day(&mut self, tz: TimeZone, time_ms: i64) -> (i64, i64) {
        match self.day {
            Some(d) if d.start_ms <= time_ms && time_ms < d.end_ms => (d.n, d.end_ms),
            _ => {
                let n = tz.day_of(time_ms);
                let start_ms = tz.day_start_ms(n);
                let end_ms = tz.day_start_ms(n + 1);
                // Bounds that do not hold the time (out of the time
                // zone's range) are not kept.
                self.day = (start_ms <= time_ms && time_ms < end_ms).then_some(DayAt {
                    n,
                    start_ms,
                    end_ms,
                });
                (n, end_ms)
            }
        }
    }

    fn name(&mut self, kind: Kind, ordinal: i64, format: impl FnOnce() -> String) -> Arc<str> {
        if let Some(name) = self.memo.get(&(kind, ordinal)) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(format());
        if self.keep {
            if self.memo.len() >= NAMES_MAX {
                self.memo.clear();
            }
            self.memo.insert((kind, ordinal), name.clone());
        }
        name
    }
}

/// `YYYY-MM-DD` of day number `n` (days since 1970-01-01).
pub fn day_name(n: i64) -> String {
    let date = OffsetDateTime::UNIX_EPOCH + time::Duration::days(n);
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// The name of a rolling run that started at `start_ms`.
pub fn rolling_name(start_ms: i64) -> String {
    let mut name = String::with_capacity(32);
    name.push_str("rolling:");
    push_time(&mut name, start_ms);
    name
}

/// The name of period `id`'s instance.
pub fn period_name(id: &str) -> String {
    format!("{PERIOD_PREFIX}{id}")
}

const PERIOD_PREFIX: &str = "period:";

/// Whether `name` is [`period_name`] of `id`, without formatting it.
fn names_period(name: &str, id: &str) -> bool {
    name.strip_prefix(PERIOD_PREFIX) == Some(id)
}

/// The period a [`period_name`] names, from the name as stored (bytes);
/// `None` for other windows.
pub fn period_id_bytes(name: &[u8]) -> Option<&[u8]> {
    name.strip_prefix(PERIOD_PREFIX.as_bytes())
}

pub fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// A duration the way rule files write it, in its largest whole unit.
fn duration_text(ms: i64) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

pub fn rfc3339(ms: i64) -> String {
    let mut text = String::with_capacity(24);
    push_time(&mut text, ms);
    text
}

/// A time as window names write it: RFC 3339, or the number of ms where
/// it has no RFC 3339 text.
fn push_time(out: &mut String, ms: i64) {
    if !crate::clock::push_rfc3339(out, ms) {
        out.push_str(&ms.to_string());
    }
}

/// One venue period, as announced by `venue.period.started` / `.ended`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Period {
    pub id: String,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
}

/// Every period the site has seen, in the order they started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Periods {
    pub list: Vec<Period>,
}

impl Periods {
    /// The period covering `time_ms` (`start <= t < end`) and its
    /// ordinal; when periods overlap, the one that started last.
    pub fn covering(&self, time_ms: i64) -> Option<(usize, &Period)> {
        self.list
            .iter()
            .enumerate()
            .rev()
            .find(|(_, p)| p.start_ms <= time_ms && p.end_ms.is_none_or(|end| time_ms < end))
    }

    /// Opens period `id` at `start_ms`. A period that is already known is
    /// left as it is (a repeated start changes nothing). Returns whether
    /// it was new.
    pub fn open(&mut self, id: &str, start_ms: i64) -> bool {
        if self.list.iter().any(|p| p.id == id) {
            return false;
        }
        let at = self.list.partition_point(|p| p.start_ms <= start_ms);
        self.list.insert(
            at,
            Period {
                id: id.to_string(),
                start_ms,
                end_ms: None,
            },
        );
        true
    }

    /// Closes period `id` at `end_ms`; a period never opened is opened and
    /// closed at once (it covers nothing before its end was known).
    /// Returns false when it was already closed.
    pub fn close(&mut self, id: &str, end_ms: i64) -> bool {
        match self.list.iter_mut().find(|p| p.id == id) {
            Some(p) if p.end_ms.is_some() => false,
            Some(p) => {
                p.end_ms = Some(end_ms.max(p.start_ms));
                true
            }
            None => {
                self.open(id, end_ms);
                self.close(id, end_ms)
            }
        }
    }

    /// The most recent period, open or not (what "current" means for
    /// progress queries).
    pub fn latest(&self) -> Option<&Period> {
        self.list.last()
    }

    pub fn ordinal_of(&self, id: &str) -> Option<i64> {
        self.list.iter().position(|p| p.id == id).map(|i| i as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T: i64 = 1_750_000_000_000; // 2025-06-15T15:06:40Z

    #[test]
    fn calendar_windows() {
        let periods = Periods::default();
        let utc = TimeZone::UTC;
        let d = place(&Window::Day, utc, &periods, T).unwrap();
        assert_eq!(&*d.name, "2025-06-15");
        assert_eq!(d.end_ms, Some(1_750_032_000_000));
        let london = TimeZone::parse("Europe/London").unwrap();
        // 23:30 UTC is already the next day in London (BST).
        let late = place(&Window::Day, london, &periods, 1_750_030_200_000).unwrap();
        assert_eq!(&*late.name, "2025-06-16");
        let t = place(
            &Window::Tumbling(Duration::from_secs(900)),
            utc,
            &periods,
            T,
        )
        .unwrap();
        assert_eq!(&*t.name, "2025-06-15T15:00:00Z/15m");
        assert_eq!(t.end_ms, Some(1_750_000_500_000));
        assert!(!t.late(1_750_000_500_000 + 30_000, 30_000));
        assert!(t.late(1_750_000_500_000 + 30_001, 30_000));
        assert!(place(&Window::Lifetime, utc, &periods, T)
            .unwrap()
            .end_ms
            .is_none());
    }

    #[test]
    fn remembered_names_match_fresh_ones_even_when_ordinals_shift() {
        let utc = TimeZone::UTC;
        let mut names = Names::default();
        let mut periods = Periods::default();
        periods.open("m2", T);
        let windows = [
            Window::Lifetime,
            Window::Day,
            Window::Period,
            Window::Tumbling(Duration::from_secs(900)),
            Window::Rolling(Duration::from_secs(600)),
        ];
        let check = |names: &mut Names, periods: &Periods, t: i64| {
            for w in &windows {
                assert_eq!(
                    names.place(w, utc, periods, t),
                    place(w, utc, periods, t),
                    "{w:?} at {t}"
                );
            }
        };
        for t in [T, T + 1, T + 900_000, T + 86_400_000] {
            check(&mut names, &periods, t);
        }
        // A period announced late but starting earlier takes ordinal 0:
        // the remembered name for ordinal 0 must not be reused for it.
        periods.open("m1", T - 10_000);
        periods.close("m1", T - 5_000);
        check(&mut names, &periods, T - 7_000);
        check(&mut names, &periods, T + 1);
        assert_eq!(
            &*names
                .place(&Window::Period, utc, &periods, T - 7_000)
                .unwrap()
                .name,
            "period:m1"
        );
    }

    #[test]
    fn a_remembered_day_answers_as_the_time_zone_does_across_clock_changes() {
        // London's clocks went forward on 2025-03-30 and back on
        // 2025-10-26 (at 01:00 UTC): days of 23 and 25 hours.
        let london = TimeZone::parse("Europe/London").unwrap();
        let spring = 1_743_296_400_000; // 2025-03-30T01:00:00Z
        let autumn = 1_761_440_400_000; // 2025-10-26T01:00:00Z
        let mut names = Names::default();
        let hour = 3_600_000;
        for around in [spring, autumn] {
            // Forwards through two days, then back across the change.
            let times = (-30..30).map(|h| around + h * hour + 17);
            let back = (-30..30).rev().map(|h| around + h * hour - 1);
            for t in times.chain(back) {
                let n = london.day_of(t);
                assert_eq!(names.day(london, t), (n, london.day_start_ms(n + 1)), "{t}");
            }
        }
        // Day boundaries themselves belong to the day they start.
        let n = london.day_of(autumn);
        for t in [london.day_start_ms(n), london.day_start_ms(n + 1) - 1] {
            assert_eq!(names.day(london, t).0, london.day_of(t), "{t}");
        }
    }

    #[test]
    fn periods_open_close_and_cover() {
        let mut p = Periods::default();
        let at = |p: &Periods, t: i64| place(&Window::Period, TimeZone::UTC, p, t);
        assert!(at(&p, T).is_none());
        assert!(p.open("m1", T));
        assert!(!p.open("m1", T + 5));
        assert_eq!(&*at(&p, T + 10).unwrap().name, "period:m1");
        assert!(at(&p, T - 1).is_none());
        assert!(p.close("m1", T + 100));
        assert!(!p.close("m1", T + 200));
        assert!(at(&p, T + 100).is_none());
        assert_eq!(at(&p, T + 99).unwrap().end_ms, Some(T + 100));
        assert!(p.open("m2", T + 1000));
        assert_eq!(at(&p, T + 1001).unwrap().ordinal, 1);
        assert_eq!(p.ordinal_of("m2"), Some(1));
    }
}
