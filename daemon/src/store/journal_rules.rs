//! The rules the journal's entries are applied with, recorded in the store.
//!
//! A replay after an unclean stop must apply each journal entry with the
//! rules that applied it the first time: the awards of that first time
//! went out, and the state the replay rebuilds has to be the state they
//! came from. By the time of the replay the rule files on disk may say
//! something else (edited while the daemon was down, or while it ran and
//! before a reload took them). A journal never spans two rule bundles (a
//! reload checkpoints first), so one record per journal is enough: the
//! rule files' texts, the site's time zone, and how many codes each
//! voucher pool had. Codes are only ever appended to a pool, so the count
//! decides what a replayed award finds, as it did the first time.
//!
//! The record is written at open, once the journal is empty, and with the
//! first commit after a reload, in the transaction that also holds the
//! first journal entries made under the new rules.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use edge_config::{RuleBundle, TimeZone};
use heed::types::{Bytes, Str};
use heed::{Database, RoTxn, RwTxn, WithoutTls};
use serde::{Deserialize, Serialize};

const KEY: &str = "journal_rules";

/// A rule bundle as recorded: enough to build it again without its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JournalRules {
    /// Each rule file's path (bytes of the OS path) and text, in load
    /// order.
    files: Vec<(Vec<u8>, String)>,
    /// IANA name of `site.timezone`.
    timezone: String,
    /// Codes in each voucher pool, by pool id.
    pools: Vec<(String, u64)>,
}

/// Versioned wrapper: the discriminant is the format version.
#[derive(Serialize, Deserialize)]
enum Stored {
    V1(JournalRules),
}

impl JournalRules {
    /// The record of `bundle`, whose pools hold `pools` codes; `None` for a
    /// bundle not read from files (made in code), which its texts cannot
    /// give back.
    pub(crate) fn of(bundle: &RuleBundle, pools: Vec<(String, u64)>) -> Option<JournalRules> {
        let from_files = bundle.sources.len() == bundle.files.len()
            && (!bundle.files.is_empty()
                || bundle.achievements.is_empty() && bundle.offers.is_empty());
        from_files.then(|| JournalRules {
            files: bundle
                .files
                .iter()
                .map(|p| p.as_os_str().as_bytes().to_vec())
                .zip(bundle.sources.iter().cloned())
                .collect(),
            timezone: bundle.timezone.name().to_string(),
            pools,
        })
    }

    /// The bundle again, as `edge_config` builds it from these texts.
    pub(crate) fn bundle(&self) -> Result<RuleBundle, String> {
        let timezone = TimeZone::parse(&self.timezone)?;
        let sources = self
            .files
            .iter()
            .map(|(path, text)| {
                let path = PathBuf::from(std::ffi::OsString::from_vec(path.clone()));
                (path, text.clone())
            })
            .collect();
        edge_config::rules_from_sources(sources, timezone).map_err(|e| e.to_string())
    }

    /// Codes in each voucher pool when the rules were recorded.
    pub(crate) fn pool_sizes(&self) -> &[(String, u64)] {
        &self.pools
    }

    /// Whether these are the rules of `bundle` with `pools`.
    pub(crate) fn matches(&self, bundle: &RuleBundle, pools: &[(String, u64)]) -> bool {
        JournalRules::of(bundle, pools.to_vec()).as_ref() == Some(self)
    }
}

/// Records `rules`, or removes the record when they cannot be recorded
/// (a replay then applies the rules it is given).
pub(crate) fn save(
    db: Database<Str, Bytes>,
    txn: &mut RwTxn,
    rules: Option<&JournalRules>,
) -> heed::Result<()> {
    match rules {
        Some(rules) => {
            let bytes = postcard::to_allocvec(&Stored::V1(rules.clone()))
                .map_err(|e| heed::Error::Encoding(Box::new(e)))?;
            db.put(txn, KEY, &bytes)
        }
        None => db.delete(txn, KEY).map(|_| ()),
    }
}

/// The recorded rules; `Err` names why a record cannot be read.
pub(crate) fn load(
    db: Database<Str, Bytes>,
    txn: &RoTxn<WithoutTls>,
) -> heed::Result<Result<Option<JournalRules>, String>> {
    Ok(match db.get(txn, KEY)? {
        None => Ok(None),
        Some(bytes) => match postcard::from_bytes::<Stored>(bytes) {
            Ok(Stored::V1(rules)) => Ok(Some(rules)),
            Err(e) => Err(format!("the recorded rules are unreadable: {e}")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = "[[achievement]]\nid = \"a\"\nname = \"A\"\non = [\"fan.cheer\"]\n\
                        measure = \"count\"\nwindow = \"day\"\ntiers = [ { at = 2 } ]\n";

    fn bundle(text: &str, zone: &str) -> RuleBundle {
        let sources = vec![(
            PathBuf::from("/etc/touchline/rules/a.toml"),
            text.to_string(),
        )];
        edge_config::rules_from_sources(sources, TimeZone::parse(zone).unwrap()).unwrap()
    }

    #[test]
    fn the_record_builds_the_bundle_it_was_made_from() {
        let original = bundle(RULE, "Europe/London");
        let pools = vec![("p".to_string(), 3)];
        let record = JournalRules::of(&original, pools.clone()).expect("read from files");
        let bytes = postcard::to_allocvec(&Stored::V1(record.clone())).unwrap();
        let Stored::V1(read) = postcard::from_bytes::<Stored>(&bytes).unwrap();
        assert_eq!(read.bundle().unwrap(), original);
        assert_eq!(read.pool_sizes(), &pools[..]);
        assert!(read.matches(&original, &pools));
    }

    #[test]
    fn a_change_to_a_text_the_zone_or_a_pool_is_another_record() {
        let original = bundle(RULE, "UTC");
        let record = JournalRules::of(&original, vec![]).unwrap();
        assert!(!record.matches(&bundle(&RULE.replace("at = 2", "at = 3"), "UTC"), &[]));
        assert!(!record.matches(&bundle(RULE, "Europe/Paris"), &[]));
        assert!(!record.matches(&original, &[("p".to_string(), 1)]));
    }

    #[test]
    fn a_bundle_made_in_code_is_not_recorded() {
        let mut made = bundle(RULE, "UTC");
        made.files.clear();
        made.sources.clear();
        assert_eq!(JournalRules::of(&made, vec![]), None);
        assert!(JournalRules::of(&RuleBundle::default(), vec![]).is_some());
    }
}
