//! The rule engine: turns committed events into rule state and awards.
//!
//! It runs inside the store's writer, within the write transaction that
//! holds the event's dedup key, so an event's state change and the award
//! records it causes commit (or roll back) together with it. That is what
//! makes every (customer, achievement, tier) award happen exactly once.
//!
//! Per event the work is: look the event type up in an index (events meet
//! only the rules that name their type), evaluate the compiled `when`
//! predicates in one shared CEL scope, then for each matching rule read,
//! update and write one state record. The measure and window specifics sit
//! in [`measure`] and [`window`], so new kinds extend those two files.

pub mod measure;
mod predicate;
pub mod pseudonym;
pub mod state;
pub mod window;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_config::{AchievementRule, RuleBundle};
use heed::types::Bytes;
use heed::{Database, RwTxn};
use touchline_proto::{AchievementAwarded, RecordBody};
use tracing::warn;

use crate::event::Event;
use crate::store::keys::KeyBuf;
use crate::store::ratelimit::LogLimiter;
use measure::MeasureState;
use predicate::{Needs, Predicate};
pub use pseudonym::{PseudonymError, Pseudonymizer};
use state::RuleState;

/// Stack for compiling predicates: the CEL parser recurses per nesting
/// level, and a rule file may nest deeply.
const COMPILE_STACK: usize = 64 * 1024 * 1024;

/// How often a failing predicate or a state mismatch is logged per rule.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why rules could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}:{line}: rule `{rule}`: `when` does not compile: {message}", file.display())]
    Compile {
        rule: String,
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("rule compiler thread failed: {0}")]
    CompilerThread(String),
    #[error(transparent)]
    Pseudonym(#[from] PseudonymError),
}

/// Why applying an event failed; the writer rolls the transaction back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
    #[error("rule state of `{rule}` for a customer is unreadable: {source}")]
    Corrupt {
        rule: String,
        source: postcard::Error,
    },
}

/// The rule-state database, opened by the store.
#[derive(Clone, Copy)]
pub struct StateDb(pub(crate) Database<Bytes, Bytes>);

/// A record the engine wants in the outbox; the store gives it a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// Event time of the event that caused it (ms since the epoch).
    pub at_ms: i64,
    pub body: RecordBody,
}

/// Per-rule counters, readable from any thread.
#[derive(Debug)]
pub struct RuleStats {
    id: String,
    version: u32,
    matched: AtomicU64,
    predicate_errors: AtomicU64,
    awards: AtomicU64,
}

impl RuleStats {
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The rule version these counters belong to.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Events that met the rule (type and `when`) and updated its state.
    /// Counted when evaluated; a rolled-back commit is not subtracted.
    pub fn matched(&self) -> u64 {
        self.matched.load(Ordering::Relaxed)
    }
    /// Evaluations whose `when` failed at runtime or was not a bool; each
    /// counted as not matching.
    pub fn predicate_errors(&self) -> u64 {
        self.predicate_errors.load(Ordering::Relaxed)
    }
    /// Tier awards produced (before commit).
    pub fn awards(&self) -> u64 {
        self.awards.load(Ordering::Relaxed)
    }
}

/// Counters of every rule, in bundle order.
#[derive(Debug, Default)]
pub struct EngineStats {
    rules: Vec<RuleStats>,
}

impl EngineStats {
    pub fn rules(&self) -> &[RuleStats] {
        &self.rules
    }
    pub fn rule(&self, id: &str) -> Option<&RuleStats> {
        self.rules.iter().find(|r| r.id == id)
    }
    /// Predicate errors over all rules.
    pub fn predicate_errors(&self) -> u64 {
        self.rules.iter().map(RuleStats::predicate_errors).sum()
    }
}

struct CompiledTier {
    at: f64,
    badge: Option<String>,
    /// Sorted by category (the rule's BTreeMap order).
    points: Vec<(String, i64)>,
}

struct CompiledRule {
    rule: AchievementRule,
    predicate: Option<Predicate>,
    tiers: Vec<CompiledTier>,
    error_log: LogLimiter,
    mismatch_log: LogLimiter,
}

/// The rules an event type meets, and the variables their predicates read.
struct TypeEntry {
    rules: Vec<usize>,
    needs: Needs,
}

/// Loaded rules plus what evaluation reuses between events.
pub struct Engine {
    root: cel::Context<'static, 'static>,
    rules: Vec<CompiledRule>,
    by_type: HashMap<String, TypeEntry>,
    pseudonymizer: Pseudonymizer,
    stats: Arc<EngineStats>,
    key: KeyBuf,
    value: Vec<u8>,
}

impl Engine {
    /// Compiles every rule's `when` once (on a thread with a deep stack)
    /// and indexes rules by event type.
    pub fn new(bundle: &RuleBundle, pseudonymizer: Pseudonymizer) -> Result<Engine, EngineError> {
        let predicates = compile_all(&bundle.achievements)?;
        let mut rules = Vec::with_capacity(bundle.achievements.len());
        let mut by_type: HashMap<String, TypeEntry> = HashMap::new();
        for (idx, (rule, predicate)) in bundle.achievements.iter().zip(predicates).enumerate() {
            let needs = predicate.as_ref().map(|p| p.needs).unwrap_or_default();
            for kind in &rule.on {
                let entry = by_type.entry(kind.clone()).or_insert_with(|| TypeEntry {
                    rules: Vec::new(),
                    needs: Needs::default(),
                });
                if !entry.rules.contains(&idx) {
                    entry.rules.push(idx);
                    entry.needs = entry.needs.union(needs);
                }
            }
            let tiers = rule
                .tiers
                .iter()
                .map(|t| CompiledTier {
                    at: t.at,
                    badge: t.badge.clone(),
                    points: t.points.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                })
                .collect();
            rules.push(CompiledRule {
                rule: rule.clone(),
                predicate,
                tiers,
                error_log: LogLimiter::new(LOG_INTERVAL),
                mismatch_log: LogLimiter::new(LOG_INTERVAL),
            });
        }
        let stats = Arc::new(EngineStats {
            rules: bundle
                .achievements
                .iter()
                .map(|r| RuleStats {
                    id: r.id.clone(),
                    version: r.version,
                    matched: AtomicU64::new(0),
                    predicate_errors: AtomicU64::new(0),
                    awards: AtomicU64::new(0),
                })
                .collect(),
        });
        Ok(Engine {
            root: predicate::root(),
            rules,
            by_type,
            pseudonymizer,
            stats,
            key: KeyBuf::default(),
            value: Vec::new(),
        })
    }

    pub fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    pub fn pseudonymizer(&self) -> &Pseudonymizer {
        &self.pseudonymizer
    }

    /// Applies one new (non-duplicate) event inside the writer's
    /// transaction: updates the state of every rule it matches and pushes
    /// one [`Emitted`] award per tier reached onto `out`.
    ///
    /// Events without a subject are venue-wide and change no customer
    /// state.
    pub fn apply(
        &mut self,
        txn: &mut RwTxn,
        db: StateDb,
        event: &Event,
        out: &mut Vec<Emitted>,
    ) -> Result<(), ApplyError> {
        let Engine {
            root,
            rules,
            by_type,
            pseudonymizer,
            stats,
            key,
            value,
        } = self;
        let Some(entry) = by_type.get(event.kind.as_str()) else {
            return Ok(());
        };
        let Some(customer) = event.subject.as_deref() else {
            return Ok(());
        };
        let mut scope = None;
        for &idx in &entry.rules {
            let compiled = &mut rules[idx];
            let counters = &stats.rules[idx];
            if let Some(pred) = &compiled.predicate {
                let scope = scope.get_or_insert_with(|| predicate::scope(root, event, entry.needs));
                match pred.eval(scope) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        counters.predicate_errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = compiled.error_log.check() {
                            warn!(
                                rule = %compiled.rule.id,
                                event = %event.id,
                                error = %e,
                                suppressed,
                                "`when` failed; counted as not matching"
                            );
                        }
                        continue;
                    }
                }
            }
            counters.matched.fetch_add(1, Ordering::Relaxed);
            let awards = update(
                compiled,
                txn,
                db,
                key,
                value,
                customer,
                event,
                pseudonymizer,
                out,
            )?;
            if awards > 0 {
                counters.awards.fetch_add(awards, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Reads, updates and writes one rule's state; emits the tiers reached.
#[allow(clippy::too_many_arguments)]
fn update(
    compiled: &mut CompiledRule,
    txn: &mut RwTxn,
    db: StateDb,
    key: &mut KeyBuf,
    value: &mut Vec<u8>,
    customer: &str,
    event: &Event,
    pseudonymizer: &Pseudonymizer,
    out: &mut Vec<Emitted>,
) -> Result<u64, ApplyError> {
    let rule = &compiled.rule;
    let window = window::instance(&rule.window, event.time_ms);
    let key = state::key(key, customer, &rule.id, rule.version, &window);
    let mut state = match db.0.get(txn, key)? {
        Some(bytes) => state::decode(bytes).map_err(|source| ApplyError::Corrupt {
            rule: rule.id.clone(),
            source,
        })?,
        None => RuleState::new(MeasureState::initial(&rule.measure), event.time_ms),
    };
    if !state.measure.fits(&rule.measure) {
        // Same id and version, different measure: the rule was edited
        // without a version bump. Restart the measure; awarded tiers stay
        // awarded.
        if let Some(suppressed) = compiled.mismatch_log.check() {
            warn!(rule = %rule.id, suppressed, "stored state does not fit the rule's measure; bump `version` when changing a rule");
        }
        state.measure = MeasureState::initial(&rule.measure);
    }
    let Some(current) = state.measure.observe(&rule.measure, event) else {
        return Ok(0);
    };
    state.updated_ms = event.time_ms;
    let mut awarded = 0u64;
    while let Some(tier) = compiled.tiers.get(state.tiers_awarded as usize) {
        if current < tier.at {
            break;
        }
        state.tiers_awarded += 1;
        awarded += 1;
        out.push(Emitted {
            at_ms: event.time_ms,
            body: RecordBody::AchievementAwarded(AchievementAwarded {
                customer: pseudonymizer.pseudonym(customer),
                achievement: rule.id.clone(),
                version: rule.version,
                tier: state.tiers_awarded,
                badge: tier.badge.clone(),
                points: tier.points.clone(),
                window: window.clone().into_owned(),
                value: current,
            }),
        });
    }
    state::encode(state, value).map_err(|e| heed::Error::Encoding(Box::new(e)))?;
    db.0.put(txn, key, value)?;
    Ok(awarded)
}

/// Compiles every `when` on a thread with a deep stack.
fn compile_all(rules: &[AchievementRule]) -> Result<Vec<Option<Predicate>>, EngineError> {
    let compile = || -> Result<Vec<Option<Predicate>>, EngineError> {
        rules
            .iter()
            .map(|rule| {
                rule.when
                    .as_deref()
                    .map(|src| {
                        Predicate::compile(src).map_err(|message| EngineError::Compile {
                            rule: rule.id.clone(),
                            file: rule.file.clone(),
                            line: rule.line,
                            message,
                        })
                    })
                    .transpose()
            })
            .collect()
    };
    if rules.iter().all(|r| r.when.is_none()) {
        return Ok(rules.iter().map(|_| None).collect());
    }
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("rule-compiler".into())
            .stack_size(COMPILE_STACK)
            .spawn_scoped(s, compile)
            .map_err(|e| EngineError::CompilerThread(e.to_string()))?;
        handle
            .join()
            .map_err(|_| EngineError::CompilerThread("panicked while compiling".into()))?
    })
}
