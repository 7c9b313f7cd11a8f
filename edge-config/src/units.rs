//! Sizes and durations as operators write them (`"64KiB"`, `"30s"`).
//!
//! Only binary size units exist, so `KiB` can never be mistaken for 1000
//! bytes, and every duration needs a unit, so `30` is never silently
//! seconds in one place and milliseconds in another.

use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

const SIZE_UNITS: &[(&str, u64)] = &[("B", 1), ("KiB", KIB), ("MiB", MIB), ("GiB", GIB)];

const MS_PER_S: u64 = 1000;
const MS_PER_M: u64 = 60 * MS_PER_S;
const MS_PER_H: u64 = 60 * MS_PER_M;
const MS_PER_D: u64 = 24 * MS_PER_H;

const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", MS_PER_S),
    ("m", MS_PER_M),
    ("h", MS_PER_H),
    ("d", MS_PER_D),
];

/// Parses a size in bytes: a whole number with an optional unit `B`,
/// `KiB`, `MiB` or `GiB` (powers of 1024), spaces allowed between them:
/// `"1024"`, `"512B"`, `"64KiB"`, `"1 MiB"`, `"4GiB"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (number, unit) = split_number(s)?;
    let factor = if unit.is_empty() {
        1
    } else {
        lookup(SIZE_UNITS, unit).ok_or_else(|| {
            format!("unknown size unit `{unit}` in `{s}`; use B, KiB, MiB or GiB (powers of 1024)")
        })?
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// Parses a duration: a whole number and a unit `ms`, `s`, `m`, `h` or
/// `d`, spaces allowed between them: `"2ms"`, `"30s"`, `"5m"`, `"24h"`,
/// `"7d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(s)?;
    if unit.is_empty() {
        return Err(format!(
            "duration `{s}` has no unit; add one of ms, s, m, h, d (e.g. \"30s\")"
        ));
    }
    let factor = lookup(DURATION_UNITS, unit)
        .ok_or_else(|| format!("unknown duration unit `{unit}` in `{s}`; use ms, s, m, h or d"))?;
    number
        .checked_mul(factor)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration `{s}` is too large"))
}

/// A size the way a person would write it, for messages.
pub(crate) fn format_size(bytes: u64) -> String {
    for &(unit, factor) in SIZE_UNITS.iter().rev() {
        if factor > 1 && bytes >= factor && bytes % factor == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

/// A duration the way a person would write it, for messages.
pub(crate) fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{d:?}");
    }
    let ms = d.as_millis();
    for &(unit, factor) in DURATION_UNITS.iter().rev() {
        let factor = u128::from(factor);
        if ms >= factor && ms % factor == 0 {
            return format!("{}{unit}", ms / factor);
        }
    }
    "0s".to_owned()
}

fn lookup(units: &[(&str, u64)], unit: &str) -> Option<u64> {
    units
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, f)| f)
}

/// Splits `"64 KiB"` into `64` and `"KiB"`.
fn split_number(s: &str) -> Result<(u64, &str), String> {
    let trimmed = s.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, rest) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(if trimmed.starts_with('-') {
            format!("`{s}` is negative")
        } else {
            format!("`{s}` does not start with a number")
        });
    }
    if rest.starts_with(['.', ',']) {
        return Err(format!(
            "`{s}` is not a whole number; use a smaller unit instead of a fraction"
        ));
    }
    let number = digits
        .parse::<u64>()
        .map_err(|_| format!("`{s}` is too large"))?;
    Ok((number, rest.trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1 MiB"), Ok(1024 * 1024));
        assert_eq!(parse_size(" 4GiB "), Ok(4 * 1024 * 1024 * 1024));
    }

    #[test]
    fn bad_sizes_say_why() {
        for (input, needle) in [
            ("", "does not start with a number"),
            ("KiB", "does not start with a number"),
            ("-1KiB", "negative"),
            ("1.5GiB", "not a whole number"),
            ("64KB", "unknown size unit `KB`"),
            ("64kib", "unknown size unit `kib`"),
            ("1TiB", "unknown size unit `TiB`"),
            ("64 KiB extra", "unknown size unit `KiB extra`"),
            ("99999999999999999999", "too large"),
            ("99999999999GiB", "too large"),
        ] {
            let err = parse_size(input).expect_err(input);
            assert!(err.contains(needle), "{input:?}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7 d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_say_why() {
        for (input, needle) in [
            ("30", "has no unit"),
            ("s", "does not start with a number"),
            ("1.5s", "not a whole number"),
            ("10us", "unknown duration unit `us`"),
            ("1w", "unknown duration unit `w`"),
            ("1h30m", "unknown duration unit `h30m`"),
            ("-5s", "negative"),
            ("99999999999999999999d", "too large"),
        ] {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(needle), "{input:?}: {err}");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for s in ["64KiB", "1MiB", "4GiB", "1000B", "1B"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
        for s in ["2ms", "1500ms", "30s", "5m", "90m", "36h", "7d"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
