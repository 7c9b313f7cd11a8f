//! CloudEvents 1.0 (JSON structured mode) parsing and validation.
//!
//! Everything that arrives from outside goes through here before the store
//! sees it, so this is where bad input turns into a `Rejection` with a
//! stable reason label instead of an error somewhere downstream. The hot
//! path deserializes straight into a borrowed struct whose attribute fields
//! accept any JSON type, so one serde pass both parses and lets us report
//! wrong types precisely; only `data` becomes an owned `Value`.

use crate::store::customers::MAX_CUSTOMER_LEN;
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use edge_config::Validation;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::event::Event;

/// Why an input was rejected. The label is stable: counters, log lines and
/// dead-letter samples all use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Larger than `validation.max_event_size`.
    TooLarge,
    /// Not valid UTF-8 (JSON text must be).
    InvalidUtf8,
    /// Not JSON, truncated JSON, or a duplicated attribute.
    InvalidJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// A required attribute (`specversion`, `id`, `source`, `type`) is
    /// absent, null or empty.
    MissingAttribute,
    /// An attribute that must be a string is not.
    WrongType,
    /// `specversion` is not `"1.0"`.
    BadSpecversion,
    /// `time` is not an RFC 3339 timestamp.
    BadTime,
    /// `time` is further ahead than `validation.max_future_skew`.
    TimeInFuture,
    /// `time` is older than `validation.max_age`.
    TooOld,
    /// A customer event type without `subject`.
    MissingSubject,
    /// `data_base64` (binary data) is not supported.
    UnsupportedEncoding,
    /// `subject` longer than a customer id may be.
    SubjectTooLong,
    /// A string attribute holds a control character, which CloudEvents
    /// forbids (and which sinks downstream, PostgreSQL's text above all,
    /// refuse).
    ControlCharacter,
    /// An HTTP request whose `Content-Type` is neither one event nor a
    /// batch (answered 415; its body is not read).
    UnsupportedMediaType,
    /// An HTTP batch that holds no events (`[]`).
    EmptyBatch,
    /// An HTTP body that could not be read to its end (the client stopped
    /// sending or the connection broke).
    UnreadableBody,
}

impl RejectReason {
    /// Number of reasons: the size of per-reason counter arrays.
    pub const COUNT: usize = 17;

    /// Every reason, in `index()` order.
    pub const ALL: [RejectReason; RejectReason::COUNT] = [
        RejectReason::TooLarge,
        RejectReason::InvalidUtf8,
        RejectReason::InvalidJson,
        RejectReason::NotAnObject,
        RejectReason::MissingAttribute,
        RejectReason::WrongType,
        RejectReason::BadSpecversion,
        RejectReason::BadTime,
        RejectReason::TimeInFuture,
        RejectReason::TooOld,
        RejectReason::MissingSubject,
        RejectReason::UnsupportedEncoding,
        RejectReason::SubjectTooLong,
        RejectReason::ControlCharacter,
        RejectReason::UnsupportedMediaType,
        RejectReason::EmptyBatch,
        RejectReason::UnreadableBody,
    ];

    /// Position in `ALL`, for indexing counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stable machine-readable label.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MissingAttribute => "missing_attribute",
            RejectReason::WrongType => "wrong_type",
            RejectReason::BadSpecversion => "bad_specversion",
            RejectReason::BadTime => "bad_time",
            RejectReason::TimeInFuture => "time_in_future",
            RejectReason::TooOld => "too_old",
            RejectReason::MissingSubject => "missing_subject",
            RejectReason::UnsupportedEncoding => "unsupported_encoding",
            RejectReason::SubjectTooLong => "subject_too_long",
            RejectReason::ControlCharacter => "control_character",
            RejectReason::UnsupportedMediaType => "unsupported_media_type",
            RejectReason::EmptyBatch => "empty_batch",
            RejectReason::UnreadableBody => "unreadable_body",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A rejected input: the reason (for counters) and a human-readable detail
/// (for the sender, logs and the dead-letter store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Parses and validates one event from raw bytes (an MQTT payload, an HTTP
/// body, or one element of a batch). `now_ms` is the arrival time: it
/// replaces a missing `time` and anchors the skew and age checks.
pub fn parse_event(bytes: &[u8], now_ms: i64, v: &Validation) -> Result<Event, Rejection> {
    check_size(bytes.len(), v)?;
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    match text.trim_start().as_bytes().first() {
        Some(b'{') => {}
        Some(_) => return Err(not_an_object(text)),
        None => return Err(Rejection::new(RejectReason::InvalidJson, "empty input")),
    }
    let raw: RawEvent<'_> = serde_json::from_str(text).map_err(|e| json_rejection(&e))?;
    validate(raw, now_ms, v)
}

/// Validates an already parsed JSON value, e.g. an element of a batch that
/// was parsed as a whole. `raw_len` is the element's size in bytes, for the
/// size limit.
pub fn parse_event_value(
    value: Value,
    raw_len: usize,
    now_ms: i64,
    v: &Validation,
) -> Result<Event, Rejection> {
    check_size(raw_len, v)?;
    if !value.is_object() {
        return Err(Rejection::new(
            RejectReason::NotAnObject,
            format!("an event must be a JSON object, got {}", value_kind(&value)),
        ));
    }
    // `Value` hands out owned strings, so the attributes end up as
    // `Cow::Owned` and the `'static` lifetime is honest.
    let raw = <RawEvent<'static> as Deserialize<'static>>::deserialize(value)
        .map_err(|e| json_rejection(&e))?;
    validate(raw, now_ms, v)
}

/// Whether events of `kind` are venue-wide (no `subject` needed): a pattern
/// matches exactly, or as a prefix when it ends with `*`.
pub fn is_venue_type(kind: &str, venue_types: &[String]) -> bool {
    venue_types.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => kind == p,
    })
}

/// Why a batch body could not be split into elements: the whole request is
/// rejected, since element boundaries are unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the body is empty; a batch is a JSON array of events")]
    Empty,
    #[error("a batch must be a JSON array of events (found `{0}` at byte {1})")]
    NotAnArray(char, usize),
    #[error("malformed batch at byte {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
    #[error("the batch holds more than {MAX_BATCH_EVENTS} events; send it in parts")]
    TooManyEvents,
}

/// The most events one batch may hold. Each element costs a per-event
/// answer (and a rejection's detail when it is bad) on top of its bytes:
/// sixteen MiB of `[1,1,1,…]` would otherwise take gigabytes to answer.
pub const MAX_BATCH_EVENTS: usize = 20_000;

/// Splits a JSON array into the byte ranges of its elements without
/// parsing them, so each element is validated (and rejected) on its own:
/// one bad element, even one with invalid UTF-8 or broken JSON inside
/// balanced brackets, never takes its neighbours down. Fails only when the
/// array structure itself is broken.
pub fn split_batch(bytes: &[u8]) -> Result<Vec<&[u8]>, BatchError> {
    let mut i = skip_ws(bytes, 0);
    match bytes.get(i) {
        None => return Err(BatchError::Empty),
        Some(b'[') => i += 1,
        Some(&c) => return Err(BatchError::NotAnArray(char::from(c), i)),
    }
    let mut elements = Vec::new();
    i = skip_ws(bytes, i);
    if bytes.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            let start = i;
            i = scan_value(bytes, i)?;
            if elements.len() == MAX_BATCH_EVENTS {
                return Err(BatchError::TooManyEvents);
            }
            elements.push(&bytes[start..i]);
            i = skip_ws(bytes, i);
            match bytes.get(i) {
                Some(b',') => i = skip_ws(bytes, i + 1),
                Some(b']') => {
                    i += 1;
                    break;
                }
                Some(_) => return Err(malformed(i, "expected `,` or `]` after an element")),
                None => return Err(malformed(i, "truncated: the array is not closed")),
            }
        }
    }
    let end = skip_ws(bytes, i);
    if end != bytes.len() {
        return Err(malformed(end, "unexpected data after the array"));
    }
    Ok(elements)
}

fn malformed(offset: usize, what: &'static str) -> BatchError {
    BatchError::Malformed { offset, what }
}

fn skip_ws(bytes: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(i) {
        i += 1;
    }
    i
}

/// Returns the end of the JSON value starting at `i`. Only structure is
/// checked (brackets, strings); the element's own parse finds the rest.
fn scan_value(bytes: &[u8], i: usize) -> Result<usize, BatchError> {
    match bytes.get(i) {
        None => Err(malformed(i, "truncated: expected an element")),
        Some(b'"') => scan_string(bytes, i),
        Some(b'{' | b'[') => {
            let mut stack = Vec::with_capacity(8);
            let mut j = i;
            loop {
                match bytes.get(j) {
                    None => return Err(malformed(j, "truncated: an element is not closed")),
                    Some(b'"') => {
                        j = scan_string(bytes, j)?;
                        continue;
                    }
                    Some(&open @ (b'{' | b'[')) => stack.push(open),
                    Some(&close @ (b'}' | b']')) => {
                        let expected = if close == b'}' { b'{' } else { b'[' };
                        if stack.pop() != Some(expected) {
                            return Err(malformed(j, "mismatched bracket"));
                        }
                        if stack.is_empty() {
                            return Ok(j + 1);
                        }
                    }
                    Some(_) => {}
                }
                j += 1;
            }
        }
        Some(b',' | b']' | b'}') => Err(malformed(i, "expected an element")),
        Some(_) => {
            // A scalar: ends at the next structural character or space.
            let mut j = i;
            while let Some(&c) = bytes.get(j) {
                if matches!(c, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            Ok(j)
        }
    }
}

/// `i` is at an opening quote; returns the index after the closing one.
fn scan_string(bytes: &[u8], i: usize) -> Result<usize, BatchError> {
    let mut j = i + 1;
    loop {
        match bytes.get(j) {
            None => return Err(malformed(i, "truncated: a string is not closed")),
            Some(b'"') => return Ok(j + 1),
            Some(b'\\') => j += 2,
            Some(_) => j += 1,
        }
    }
}

fn check_size(len: usize, v: &Validation) -> Result<(), Rejection> {
    if len > v.max_event_size {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "event is {len} bytes; the limit is {} bytes",
                v.max_event_size
            ),
        ));
    }
    Ok(())
}

fn not_an_object(text: &str) -> Rejection {
    match serde_json::from_str::<Value>(text) {
        Ok(value) => Rejection::new(
            RejectReason::NotAnObject,
            format!("an event must be a JSON object, got {}", value_kind(&value)),
        ),
        Err(e) => json_rejection(&e),
    }
}

fn json_rejection(e: &serde_json::Error) -> Rejection {
    let detail = match e.classify() {
        serde_json::error::Category::Eof => format!("truncated JSON: {e}"),
        _ => format!("invalid JSON: {e}"),
    };
    Rejection::new(RejectReason::InvalidJson, detail)
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The event as it arrived. Attributes take any JSON type so a wrong type
/// becomes a precise rejection rather than a generic serde error; unknown
/// attributes (CloudEvents extensions) are skipped.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    specversion: Option<Attr<'a>>,
    #[serde(borrow)]
    id: Option<Attr<'a>>,
    #[serde(borrow)]
    source: Option<Attr<'a>>,
    #[serde(borrow, rename = "type")]
    kind: Option<Attr<'a>>,
    #[serde(borrow)]
    subject: Option<Attr<'a>>,
    #[serde(borrow)]
    time: Option<Attr<'a>>,
    #[serde(borrow)]
    datacontenttype: Option<Attr<'a>>,
    #[serde(borrow)]
    dataschema: Option<Attr<'a>>,
    data: Option<Value>,
    data_base64: Option<IgnoredAny>,
}

/// An attribute value: a string (borrowed from the input when it has no
/// escapes) or the name of the JSON type it had instead. JSON `null` never
/// gets here: CloudEvents treats it as absent, and so does `Option`.
enum Attr<'a> {
    Str(Cow<'a, str>),
    Other(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(AttrVisitor)
    }
}

struct AttrVisitor;

impl<'de> Visitor<'de> for AttrVisitor {
    type Value = Attr<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Attr::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Attr::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Attr::Str(Cow::Owned(v)))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Attr::Other("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Attr::Other("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Attr::Other("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Attr::Other("a number"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Attr::Other("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Attr::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Attr::Other("an object"))
    }
}

/// At most this many characters of a sender's value are echoed in details.
const ECHO_MAX: usize = 64;

fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_MAX) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

fn optional<'a>(attr: Option<Attr<'a>>, name: &str) -> Result<Option<Cow<'a, str>>, Rejection> {
    match attr {
        None => Ok(None),
        Some(Attr::Str(s)) if s.chars().any(char::is_control) => Err(Rejection::new(
            RejectReason::ControlCharacter,
            format!(
                "attribute `{name}` contains a control character (U+0000–U+001F or \
                 U+007F–U+009F), which CloudEvents forbids in strings"
            ),
        )),
        Some(Attr::Str(s)) => Ok(Some(s)),
        Some(Attr::Other(kind)) => Err(Rejection::new(
            RejectReason::WrongType,
            format!("attribute `{name}` must be a string, got {kind}"),
        )),
    }
}

fn required<'a>(attr: Option<Attr<'a>>, name: &str) -> Result<Cow<'a, str>, Rejection> {
    match optional(attr, name)? {
        None => Err(Rejection::new(
            RejectReason::MissingAttribute,
            format!("required attribute `{name}` is missing"),
        )),
        Some(s) if s.is_empty() => Err(Rejection::new(
            RejectReason::MissingAttribute,
            format!("required attribute `{name}` is empty"),
        )),
        Some(s) => Ok(s),
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn parse_time(s: &str) -> Result<i64, Rejection> {
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        Rejection::new(
            RejectReason::BadTime,
            format!("`time` {} is not RFC 3339: {e}", echo(s)),
        )
    })?;
    // Floor division keeps pre-1970 instants on the right millisecond.
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(ms).map_err(|_| {
        Rejection::new(
            RejectReason::BadTime,
            format!("`time` {} is out of range", echo(s)),
        )
    })
}

fn validate(raw: RawEvent<'_>, now_ms: i64, v: &Validation) -> Result<Event, Rejection> {
    let specversion = required(raw.specversion, "specversion")?;
    if specversion != "1.0" {
        return Err(Rejection::new(
            RejectReason::BadSpecversion,
            format!(
                "`specversion` is {}; only \"1.0\" is supported",
                echo(&specversion)
            ),
        ));
    }
    let id = required(raw.id, "id")?;
    let source = required(raw.source, "source")?;
    let kind = required(raw.kind, "type")?;
    // CloudEvents requires a non-empty subject when present; an empty one
    // names no customer, so it counts as absent.
    let subject = optional(raw.subject, "subject")?.filter(|s| !s.is_empty());
    if subject.is_none() && !is_venue_type(&kind, &v.venue_types) {
        return Err(Rejection::new(
            RejectReason::MissingSubject,
            format!(
                "type {} is a customer event and needs `subject` (venue-wide types: {})",
                echo(&kind),
                v.venue_types.join(", ")
            ),
        ));
    }
    if let Some(s) = &subject {
        if s.len() > MAX_CUSTOMER_LEN {
            return Err(Rejection::new(
                RejectReason::SubjectTooLong,
                format!(
                    "`subject` is {} bytes; customer ids are at most {MAX_CUSTOMER_LEN}",
                    s.len()
                ),
            ));
        }
    }
    optional(raw.datacontenttype, "datacontenttype")?;
    optional(raw.dataschema, "dataschema")?;
    if raw.data_base64.is_some() {
        return Err(Rejection::new(
            RejectReason::UnsupportedEncoding,
            "`data_base64` (binary data) is not supported; send JSON in `data`",
        ));
    }
    let time_ms = match optional(raw.time, "time")? {
        None => now_ms,
        Some(s) => parse_time(&s)?,
    };
    if time_ms > now_ms.saturating_add(duration_ms(v.max_future_skew)) {
        return Err(Rejection::new(
            RejectReason::TimeInFuture,
            format!(
                "`time` is {} ms ahead of arrival; at most {} ms allowed",
                time_ms.saturating_sub(now_ms),
                duration_ms(v.max_future_skew)
            ),
        ));
    }
    if time_ms < now_ms.saturating_sub(duration_ms(v.max_age)) {
        return Err(Rejection::new(
            RejectReason::TooOld,
            format!(
                "`time` is {} ms before arrival; at most {} ms allowed",
                now_ms.saturating_sub(time_ms),
                duration_ms(v.max_age)
            ),
        ));
    }
    Ok(Event {
        id: id.into_owned(),
        source: source.into_owned(),
        kind: kind.into_owned(),
        subject: subject.map(Cow::into_owned),
        time_ms,
        data: raw.data.unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_750_000_000_000;

    fn validation() -> Validation {
        Validation {
            max_event_size: 1024,
            max_future_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(7 * 24 * 3600),
            dedup_retention: Duration::from_secs(24 * 3600),
            venue_types: vec!["venue.*".into(), "match.*".into(), "exact".into()],
            dlq_max: 1000,
        }
    }

    fn parse(text: &str) -> Result<Event, Rejection> {
        parse_event(text.as_bytes(), NOW, &validation())
    }

    fn reason(text: &str) -> RejectReason {
        match parse(text) {
            Ok(e) => panic!("expected a rejection for {text}, got {e:?}"),
            Err(r) => r.reason,
        }
    }

    const GOOD: &str = r#"{"specversion":"1.0","id":"e1","source":"app","type":"fan.cheer","subject":"c1","time":"2025-06-15T15:06:40Z","data":{"intensity":3},"ext":1}"#;

    #[test]
    fn accepts_a_valid_event() {
        let e = parse(GOOD).unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.source, "app");
        assert_eq!(e.kind, "fan.cheer");
        assert_eq!(e.subject.as_deref(), Some("c1"));
        assert_eq!(e.time_ms, 1_750_000_000_000);
        assert_eq!(e.data, json!({"intensity": 3}));
    }

    #[test]
    fn value_path_matches_bytes_path() {
        let value: Value = serde_json::from_str(GOOD).unwrap();
        let e = parse_event_value(value, GOOD.len(), NOW, &validation()).unwrap();
        assert_eq!(e, parse(GOOD).unwrap());
        let r = parse_event_value(json!([1]), 3, NOW, &validation()).unwrap_err();
        assert_eq!(r.reason, RejectReason::NotAnObject);
        let r = parse_event_value(json!({"id": 1}), 9, NOW, &validation()).unwrap_err();
        assert_eq!(r.reason, RejectReason::MissingAttribute);
        let r = parse_event_value(json!({}), 5000, NOW, &validation()).unwrap_err();
        assert_eq!(r.reason, RejectReason::TooLarge);
    }

    #[test]
    fn missing_time_is_arrival_time_and_escapes_work() {
        let e =
            parse(r#"{"specversion":"1.0","id":"a\"b","source":"s","type":"venue.open"}"#).unwrap();
        assert_eq!(e.time_ms, NOW);
        assert_eq!(e.id, "a\"b");
        assert_eq!(e.subject, None);
        assert_eq!(e.data, Value::Null);
    }

    #[test]
    fn venue_patterns() {
        let v = validation().venue_types;
        assert!(is_venue_type("match.goal", &v));
        assert!(is_venue_type("exact", &v));
        assert!(!is_venue_type("exactly", &v));
        assert!(!is_venue_type("fan.cheer", &v));
        assert!(is_venue_type("anything", &["*".to_string()]));
    }

    #[test]
    fn rejections_by_reason() {
        use RejectReason::*;
        assert_eq!(
            reason(&format!("{{\"x\":\"{}\"}}", "a".repeat(2000))),
            TooLarge
        );
        assert_eq!(
            parse_event(b"{\"id\":\"\xff\"}", NOW, &validation())
                .unwrap_err()
                .reason,
            InvalidUtf8
        );
        assert_eq!(reason(r#"{"specversion":"1.0","id":"#), InvalidJson);
        assert_eq!(reason("not json"), InvalidJson);
        assert_eq!(reason(""), InvalidJson);
        assert_eq!(reason("[1,2]"), NotAnObject);
        assert_eq!(reason("42"), NotAnObject);
        assert_eq!(reason(r#"{"id":"a","id":"b"}"#), InvalidJson);
        assert_eq!(
            reason(r#"{"specversion":"1.0","source":"s","type":"venue.x"}"#),
            MissingAttribute
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","id":"","source":"s","type":"venue.x"}"#),
            MissingAttribute
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","id":null,"source":"s","type":"venue.x"}"#),
            MissingAttribute
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","id":5,"source":"s","type":"venue.x"}"#),
            WrongType
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","id":"i","source":{"a":[1]},"type":"venue.x"}"#),
            WrongType
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","id":"i","source":"s","type":"fan.x","subject":7}"#),
            WrongType
        );
        assert_eq!(
            reason(r#"{"specversion":1.0,"id":"i","source":"s","type":"venue.x"}"#),
            WrongType
        );
        assert_eq!(
            reason(r#"{"specversion":"0.3","id":"i","source":"s","type":"venue.x"}"#),
            BadSpecversion
        );
        assert_eq!(
            reason(
                r#"{"specversion":"1.0","id":"i","source":"s","type":"venue.x","time":"yesterday"}"#
            ),
            BadTime
        );
        assert_eq!(
            reason(
                r#"{"specversion":"1.0","id":"i","source":"s","type":"venue.x","time":"2999-01-01T00:00:00Z"}"#
            ),
            TimeInFuture
        );
        assert_eq!(
            reason(
                r#"{"specversion":"1.0","id":"i","source":"s","type":"venue.x","time":"2001-01-01T00:00:00Z"}"#
            ),
            TooOld
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","id":"i","source":"s","type":"fan.cheer"}"#),
            MissingSubject
        );
        assert_eq!(
            reason(
                r#"{"specversion":"1.0","id":"i","source":"s","type":"fan.cheer","subject":""}"#
            ),
            MissingSubject
        );
        assert_eq!(
            reason(
                r#"{"specversion":"1.0","id":"i","source":"s","type":"venue.x","data_base64":"AA=="}"#
            ),
            UnsupportedEncoding
        );
        // Control characters, escaped or not, in any string attribute;
        // in `data` they are only data.
        for attrs in [
            r#""id":"a\u0000b","source":"s","type":"venue.x""#,
            r#""id":"i","source":"s\n","type":"venue.x""#,
            r#""id":"i","source":"s","type":"venue.x\u0085""#,
            r#""id":"i","source":"s","type":"fan.cheer","subject":"fan\u001f1""#,
        ] {
            assert_eq!(
                reason(&format!(r#"{{"specversion":"1.0",{attrs}}}"#)),
                ControlCharacter,
                "{attrs}"
            );
        }
        let ok = parse_event(
            br#"{"specversion":"1.0","id":"i","source":"s","type":"venue.x","data":{"t":"a\u0000\n"}}"#,
            NOW,
            &validation(),
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn skew_and_age_bounds_are_inclusive() {
        let at = |ms: i64| {
            format!(
                r#"{{"specversion":"1.0","id":"i","source":"s","type":"venue.x","time":"{}"}}"#,
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                    .unwrap()
                    .format(&Rfc3339)
                    .unwrap()
            )
        };
        assert!(parse(&at(NOW + 300_000)).is_ok());
        assert_eq!(
            parse(&at(NOW + 300_001)).unwrap_err().reason,
            RejectReason::TimeInFuture
        );
        assert!(parse(&at(NOW - 7 * 24 * 3_600_000)).is_ok());
        assert_eq!(
            parse(&at(NOW - 7 * 24 * 3_600_000 - 1)).unwrap_err().reason,
            RejectReason::TooOld
        );
    }

    #[test]
    fn labels_are_unique_and_indexed() {
        let mut labels: Vec<_> = RejectReason::ALL.iter().map(|r| r.label()).collect();
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), RejectReason::COUNT);
    }

    #[test]
    fn splits_batches() {
        let body = br#" [ {"a":"],}"} , 42,"s\"]" ,[1,[2]], {"b":{}} ] "#;
        let parts = split_batch(body).unwrap();
        let parts: Vec<&str> = parts
            .iter()
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect();
        assert_eq!(
            parts,
            [
                r#"{"a":"],}"}"#,
                "42",
                r#""s\"]""#,
                "[1,[2]]",
                r#"{"b":{}}"#
            ]
        );
        assert_eq!(split_batch(b"[]").unwrap().len(), 0);
        assert_eq!(split_batch(b"[ \n ]").unwrap().len(), 0);
        // Broken JSON inside balanced brackets stays an element of its own.
        assert_eq!(split_batch(b"[{\"a\": }, {\"\xff\":1}]").unwrap().len(), 2);
    }

    #[test]
    fn rejects_broken_batches() {
        for body in [
            &b""[..],
            b"   ",
            b"{}",
            b"[",
            b"[{}",
            b"[{},",
            b"[{}}",
            b"[{]",
            b"[,]",
            b"[{} {}]",
            b"[\"abc",
            b"[{}] x",
            b"[1,]",
        ] {
            assert!(
                split_batch(body).is_err(),
                "{:?} should not split",
                String::from_utf8_lossy(body)
            );
        }
        // As many elements as a batch may hold split; one more does not.
        let batch = |n: usize| format!("[{}]", vec!["1"; n].join(","));
        assert_eq!(
            split_batch(batch(MAX_BATCH_EVENTS).as_bytes())
                .unwrap()
                .len(),
            MAX_BATCH_EVENTS
        );
        assert!(matches!(
            split_batch(batch(MAX_BATCH_EVENTS + 1).as_bytes()),
            Err(BatchError::TooManyEvents)
        ));
    }
}
