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
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms}ms"))
}
