//! Customers: profiles, consent and erasure, applied in the writer's
//! transaction before any rule sees an event.
//!
//! A profile is the JSON object built from `customer.profile` events: each
//! top-level key of the event's `data` replaces that key (a `null` value
//! removes it). Rules see it as `profile`. Consent is read from it: a
//! customer whose `consent.gamification` is `false` is not tracked, so
//! their events change no state and are counted as skipped. A
//! `customer.erased` event deletes the profile here and tells the writer,
//! which has every other stage erase its part (rule state, rewards,
//! dead-letter samples) in the same commit that queues the erasure record
//! for the central side.
//!
//! The writer keeps the profiles it has read or written, decoded, in a
//! [`ProfileCache`]: every event of a known customer would otherwise read
//! the profile and decode its JSON again. Only this stage writes
//! profiles, so the cache cannot go stale.
//!
//! Keys are the customer id itself, length-prefixed like rule state, whose
//! keys start with the customer so one prefix scan finds all of a
//! customer's state. Ingest bounds `subject` to [`MAX_CUSTOMER_LEN`]
//! bytes, so those keys are never hashed and that scan is exhaustive.

use std::sync::Arc;

use heed::types::Bytes;
use heed::{Database, RwTxn};
use serde_json::{Map, Value};

use super::committed::Committed;
use super::keys::KeyBuf;
use crate::event::Event;

/// Event type that updates a profile.
pub const PROFILE_EVENT: &str = "customer.profile";
/// Event type that erases a customer.
pub const ERASE_EVENT: &str = "customer.erased";

/// Longest customer id (`subject`) ingest accepts, in bytes.
pub const MAX_CUSTOMER_LEN: usize = 256;

/// Format version byte leading every stored profile.
const PROFILE_V1: u8 = 1;

/// Customers whose profile (or lack of one) the writer remembers. The
/// engine benchmark's profiles (four keys) take about 0.6 KiB each,
/// decoded and as text, so a full cache of such profiles is about
/// 120 MiB; past the bound it starts over.
pub(crate) const PROFILE_CACHE_MAX: usize = 200_000;

/// A profile as stored: decoded for rules, and the JSON text it is stored
/// as, which the journal carries without encoding it again.
///
/// Built only by [`StoredProfile::new`] and never changed after, so its
/// consent flag always follows its map.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredProfile {
    map: Map<String, Value>,
    text: String,
    /// Whether the profile consents to gamification, decided once rather
    /// than looked up in `map` for every event.
    tracked: bool,
}

impl StoredProfile {
    fn new(map: Map<String, Value>, text: String) -> StoredProfile {
        StoredProfile {
            tracked: consents(&map, "gamification"),
            map,
            text,
        }
    }

    /// The profile's attributes, as the rules see them.
    pub(crate) fn map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// The profile as stored (JSON), as the journal copies it.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    fn encode(customer: &str, map: Map<String, Value>) -> Result<StoredProfile, CustomerError> {
        // Serialising a map of JSON values cannot fail.
        let text = serde_json::to_string(&map).map_err(|e| CustomerError::Corrupt {
            customer: customer.to_string(),
            detail: e.to_string(),
        })?;
        Ok(StoredProfile::new(map, text))
    }
}

/// Profiles by customer, `None` for a customer known to have none.
pub(crate) type ProfileCache = Committed<Option<Arc<StoredProfile>>>;

/// What the writer does with an event after this stage.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Apply rules; the profile (when the event has a subject) is what
    /// they see as `profile`.
    Track(Option<Arc<StoredProfile>>),
    /// The customer did not consent to gamification: no state changes.
    NotTracked,
    /// The customer's data was deleted; the caller queues the erasure
    /// record for `customer` and applies no rules.
    Erased { customer: String },
}

/// Why this stage could not run; the transaction is abandoned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CustomerError {
    #[error("{0}")]
    Lmdb(#[from] heed::Error),
    #[error("stored profile of {customer} is unreadable: {detail}")]
    Corrupt { customer: String, detail: String },
}

/// The profile database this stage reads and writes. Rule state belongs to
/// the engine, which erases its own part of a customer.
#[derive(Clone, Copy)]
pub(crate) struct CustomerDbs {
    pub profiles: Database<Bytes, Bytes>,
}

/// Runs the stage for one new (non-duplicate) event.
pub(crate) fn admit(
    dbs: CustomerDbs,
    txn: &mut RwTxn,
    key: &mut KeyBuf,
    cache: &mut ProfileCache,
    event: &Event,
) -> Result<Admission, CustomerError> {
    let Some(customer) = event.subject.as_deref() else {
        return Ok(Admission::Track(None));
    };
    if event.kind == ERASE_EVENT {
        erase(dbs, txn, key, customer)?;
        cache.forget(customer);
        return Ok(Admission::Erased {
            customer: customer.to_string(),
        });
    }
    let mut profile = match cache.get(customer) {
        Some(known) => known.clone(),
        None => {
            let stored = load_stored(dbs.profiles, txn, key, customer)?.map(Arc::new);
            cache.note(customer, stored.clone());
            stored
        }
    };
    if event.kind == PROFILE_EVENT {
        let updates = match &event.data {
            Value::Object(map) => map.clone(),
            // Validation lets any JSON through as `data`; a profile update
            // that is not an object changes nothing.
            _ => Map::new(),
        };
        let mut merged = profile.map(|p| p.map.clone()).unwrap_or_default();
        merge(&mut merged, updates);
        let stored = Arc::new(StoredProfile::encode(customer, merged)?);
        save(dbs.profiles, txn, key, customer, &stored.text)?;
        cache.note(customer, Some(stored.clone()));
        profile = Some(stored);
    }
    if profile.as_ref().is_some_and(|p| !p.tracked) {
        return Ok(Admission::NotTracked);
    }
    Ok(Admission::Track(profile))
}

/// Applies a profile update: each top-level key replaces the stored one;
/// `null` removes it.
pub fn merge(profile: &mut Map<String, Value>, updates: Map<String, Value>) {
    for (k, v) in updates {
        if v.is_null() {
            profile.remove(&k);
        } else {
            profile.insert(k, v);
        }
    }
}

/// Whether `profile.consent.<purpose>` allows it. Only an explicit `false`
/// withholds consent for gamification (tracking is the venue app's
/// default); a purpose that needs an explicit opt-in is checked with
/// [`opted_in`].
pub fn consents(profile: &Map<String, Value>, purpose: &str) -> bool {
    !matches!(
        profile.get("consent").and_then(|c| c.get(purpose)),
        Some(Value::Bool(false))
    )
}

/// Whether `profile.consent.<purpose>` is explicitly `true` (marketing
/// offers need an opt-in).
pub fn opted_in(profile: &Map<String, Value>, purpose: &str) -> bool {
    matches!(
        profile.get("consent").and_then(|c| c.get(purpose)),
        Some(Value::Bool(true))
    )
}

fn profile_key<'b>(key: &'b mut KeyBuf, customer: &str) -> &'b [u8] {
    // Never hashed: customer ids are bounded well below the limit.
    key.start(customer).finish(usize::MAX)
}

pub(crate) fn load(
    db: Database<Bytes, Bytes>,
    txn: &heed::RoTxn,
    key: &mut KeyBuf,
    customer: &str,
) -> Result<Option<Map<String, Value>>, CustomerError> {
    let Some(bytes) = db.get(txn, profile_key(key, customer))? else {
        return Ok(None);
    };
    decode(bytes)
        .map(Some)
        .map_err(|detail| CustomerError::Corrupt {
            customer: customer.to_string(),
            detail,
        })
}

/// A customer's stored profile with its text, `None` when they have none.
fn load_stored(
    db: Database<Bytes, Bytes>,
    txn: &heed::RoTxn,
    key: &mut KeyBuf,
    customer: &str,
) -> Result<Option<StoredProfile>, CustomerError> {
    let Some(bytes) = db.get(txn, profile_key(key, customer))? else {
        return Ok(None);
    };
    let corrupt = |detail: String| CustomerError::Corrupt {
        customer: customer.to_string(),
        detail,
    };
    let text = std::str::from_utf8(json_of(bytes).map_err(corrupt)?)
        .map_err(|e| corrupt(e.to_string()))?;
    let map = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    Ok(Some(StoredProfile::new(map, text.to_owned())))
}

/// The JSON text of a stored profile record.
fn json_of(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.split_first() {
        Some((&PROFILE_V1, json)) => Ok(json),
        Some((v, _)) => Err(format!("unknown profile format {v}")),
        None => Err("empty profile record".into()),
    }
}

fn decode(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    serde_json::from_slice(json_of(bytes)?).map_err(|e| e.to_string())
}

fn save(
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn,
    key: &mut KeyBuf,
    customer: &str,
    text: &str,
) -> Result<(), CustomerError> {
    let mut bytes = Vec::with_capacity(1 + text.len());
    bytes.push(PROFILE_V1);
    bytes.extend_from_slice(text.as_bytes());
    db.put(txn, profile_key(key, customer), &bytes)?;
    Ok(())
}

/// Deletes the profile and every rule-state record of `customer`.
fn erase(
    dbs: CustomerDbs,
    txn: &mut RwTxn,
    key: &mut KeyBuf,
    customer: &str,
) -> Result<(), CustomerError> {
    dbs.profiles.delete(txn, profile_key(key, customer))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn updates_replace_top_level_keys_and_null_removes() {
        let mut p = obj(json!({"team": "A", "section": "101", "consent": {"marketing": true}}));
        merge(
            &mut p,
            obj(json!({"section": "102", "consent": {"gamification": false}, "team": null})),
        );
        assert_eq!(
            Value::Object(p),
            json!({"section": "102", "consent": {"gamification": false}})
        );
    }

    #[test]
    fn only_an_explicit_false_withholds_gamification_consent() {
        assert!(consents(&Map::new(), "gamification"));
        assert!(consents(&obj(json!({"consent": {}})), "gamification"));
        assert!(!consents(
            &obj(json!({"consent": {"gamification": false}})),
            "gamification"
        ));
        assert!(!opted_in(&Map::new(), "marketing"));
        assert!(opted_in(
            &obj(json!({"consent": {"marketing": true}})),
            "marketing"
        ));
    }

    #[test]
    fn profile_records_are_versioned() {
        assert!(decode(b"").is_err());
        assert!(decode(b"\x07{}").is_err());
        assert_eq!(decode(b"\x01{\"a\":1}").unwrap()["a"], json!(1));
    }
}

/// Source of the events `touchline forget` and `touchline profiles import`
/// create.
pub const ADMIN_SOURCE: &str = "touchline/admin";

/// One line of a profile import that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportError {
    /// 1-based line number.
    pub line: usize,
    pub error: String,
}

/// The `customer.erased` event for `customer`, as of `now_ms`. Its id
/// is random: its dedup key outlives the erasure by the retention, so it
/// must say nothing of the customer (a hash of a guessable id would).
/// Erasing is idempotent, so a retried erasure needs no deduplication.
pub fn erase_event(customer: &str, now_ms: i64) -> Result<Event, String> {
    check_customer(customer)?;
    let nonce: u128 = rand::random();
    Ok(Event {
        id: format!("erase-{now_ms}-{nonce:032x}"),
        source: ADMIN_SOURCE.into(),
        kind: ERASE_EVENT.into(),
        subject: Some(customer.to_string()),
        time_ms: now_ms,
        data: Value::Object(Map::new()),
    })
}

/// Turns a JSONL profile import (`{"customer": "...", "profile": {...}}`
/// per line; blank lines skipped) into `customer.profile` events. The
/// event id is a hash of the line, so importing the same file twice is
/// deduplicated like any repeated event.
pub fn import_events(text: &str, now_ms: i64) -> (Vec<Event>, Vec<ImportError>) {
    let mut events = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match import_line(line, now_ms) {
            Ok(e) => events.push(e),
            Err(error) => errors.push(ImportError { line: i + 1, error }),
        }
    }
    (events, errors)
}

fn import_line(line: &str, now_ms: i64) -> Result<Event, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let customer = value
        .get("customer")
        .and_then(Value::as_str)
        .ok_or("needs a string `customer`")?;
    check_customer(customer)?;
    let profile = match value.get("profile") {
        Some(Value::Object(p)) => p.clone(),
        _ => return Err("needs an object `profile`".into()),
    };
    Ok(Event {
        id: format!("import-{}", short_hash(line.trim().as_bytes())),
        source: ADMIN_SOURCE.into(),
        kind: PROFILE_EVENT.into(),
        subject: Some(customer.to_string()),
        time_ms: now_ms,
        data: Value::Object(profile),
    })
}

fn check_customer(customer: &str) -> Result<(), String> {
    if customer.is_empty() {
        Err("the customer id is empty".into())
    } else if customer.len() > MAX_CUSTOMER_LEN {
        Err(format!(
            "the customer id is {} bytes; at most {MAX_CUSTOMER_LEN}",
            customer.len()
        ))
    } else {
        Ok(())
    }
}

fn short_hash(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod import_tests {
    use super::*;

    #[test]
    fn import_lines_become_idempotent_profile_events() {
        let text = "{\"customer\":\"c1\",\"profile\":{\"team\":\"A\"}}\n\n\
                    not json\n{\"customer\":\"c2\"}\n{\"customer\":\"c1\",\"profile\":{\"team\":\"A\"}}\n";
        let (events, errors) = import_events(text, 5);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].id, events[1].id, "same line, same id");
        assert_eq!(events[0].kind, PROFILE_EVENT);
        assert_eq!(events[0].subject.as_deref(), Some("c1"));
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4]);
        assert!(erase_event("", 1).is_err());
        let erase = erase_event("c1", 1).unwrap();
        assert_eq!(erase.kind, ERASE_EVENT);
        assert_eq!(erase.subject.as_deref(), Some("c1"));
        // Nothing in the id comes from the customer: two erasures of one
        // customer at one instant get ids of their own.
        assert_ne!(erase.id, erase_event("c1", 1).unwrap().id);
    }
}
