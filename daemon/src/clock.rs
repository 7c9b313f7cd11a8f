//! Wall-clock time in the one unit the pipeline uses: milliseconds since
//! the Unix epoch, UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    let now = OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 text for a ms timestamp; out-of-range values print as the raw
/// number so nothing is hidden.
pub fn format_ms(ms: i64) -> String {
    rfc3339(ms).unwrap_or_else(|| format!("{ms}ms"))
}

/// RFC 3339 text for a ms timestamp in UTC (`Z`, the fraction without
/// trailing zeros), `None` when it cannot be written (years outside
/// 0000–9999).
pub fn rfc3339(ms: i64) -> Option<String> {
    let mut out = String::with_capacity(24);
    push_rfc3339(&mut out, ms).then_some(out)
}

/// Appends [`rfc3339`]'s text to `out`; `false` (and `out` unchanged)
/// when it cannot be written. Window names and progress notes format one
/// per event, so the common years are written here directly, into a
/// fixed buffer, rather than through the general formatter; the text is
/// the same.
pub fn push_rfc3339(out: &mut String, ms: i64) -> bool {
    const MS_PER_DAY: i64 = 86_400_000;
    // The calendar date from `time`; only its formatter is slow.
    let date = OffsetDateTime::UNIX_EPOCH
        .date()
        .checked_add(time::Duration::days(ms.div_euclid(MS_PER_DAY)))
        .filter(|d| (0..=9999).contains(&d.year()));
    let Some(date) = date else {
        return match general(ms) {
            Some(text) => {
                out.push_str(&text);
                true
            }
            None => false,
        };
    };
    let (year, month, day) = (i64::from(date.year()), u8::from(date.month()), date.day());
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (secs, millis) = (in_day / 1000, in_day % 1000);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], i64::from(month));
    put_digits(&mut text[8..10], i64::from(day));
    put_digits(&mut text[11..13], secs / 3600);
    put_digits(&mut text[14..16], secs / 60 % 60);
    put_digits(&mut text[17..19], secs % 60);
    let len = if millis == 0 {
        text[19] = b'Z';
        20
    } else {
        put_digits(&mut text[20..23], millis);
        // Trailing zeros of the fraction are not written.
        let mut end = 23;
        while text[end - 1] == b'0' {
            end -= 1;
        }
        text[end] = b'Z';
        end + 1
    };
    match std::str::from_utf8(&text[..len]) {
        Ok(text) => {
            out.push_str(text);
            true
        }
        Err(_) => false,
    }
}

/// `n` in decimal across `digits`, zero-padded (`n` fits).
fn put_digits(digits: &mut [u8], mut n: i64) {
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// RFC 3339 text by the general formatter, `None` where it has none.
fn general(ms: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_writes_what_the_general_formatter_writes() {
        let edges = [
            0,
            1,
            10,
            100,
            120,
            999,
            -1,
            -1_000,
            951_782_400_000,     // 2000-02-29
            4_107_542_400_000,   // 2100-03-01
            -62_167_219_200_000, // 0000-01-01
            253_402_300_799_999, // 9999-12-31T23:59:59.999
        ];
        // A fixed stride through the years 0000–9999 meets every month,
        // leap and century rule, time of day and millisecond pattern.
        let stride = 7_919_993_417;
        let sweep = (0..40_000).map(|i| -62_167_219_200_000 + i * stride);
        for ms in edges.into_iter().chain(sweep) {
            assert_eq!(rfc3339(ms), general(ms), "{ms}");
        }
        // Outside the four-digit years the general formatter answers.
        assert_eq!(rfc3339(-62_167_219_200_001), general(-62_167_219_200_001));
        assert_eq!(rfc3339(i64::MAX), None);
    }
}
