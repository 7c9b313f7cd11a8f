//! The rule engine: turns committed events into rule state and awards.
//!
//! It runs inside the store's writer, within the write transaction that
//! holds the event's dedup key, so an event's state change and the award
//! records it causes commit (or roll back) together with it. That is what
//! makes every (customer, rule@version, window instance, tier) award happen
//! exactly once.
//!
//! Per event the work is: look the event type up in an index (events meet
//! only the rules that name their type), build one CEL scope, and for each
//! rule run the same gauntlet in the same order — `when`, `sources`, the
//! window instance and its lateness against the site's watermark, the
//! rule's expression (`value`, `key`), the referral, the rate limits — and
//! then read, update and write one state record. Each step that refuses an
//! event counts it (matched, late, limited, predicate errors) per rule.
//! Measures live in [`measure`], windows in [`window`], shared goals in
//! [`shared`], periods and their summaries in [`periods`].

pub mod limits;
pub mod measure;
mod native;
pub mod periods;
pub(crate) mod predicate;
pub mod progress;
pub mod pseudonym;
pub(crate) mod record;
mod shared;
pub mod state;
pub mod table;
pub mod vouchers;
pub mod window;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_config::{AchievementRule, Measure, RuleBundle, Scope, TimeZone, Voucher, Window};
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};
use touchline_proto::{AchievementAwarded, RecordBody};
use tracing::warn;

use crate::event::Event;
use crate::store::committed::Committed;
use crate::store::keys::KeyBuf;
use crate::store::ratelimit::LogLimiter;
use measure::{Input, MeasureState};
use predicate::{EvalError, Expr, Needs, Predicate};
pub use pseudonym::{PseudonymError, Pseudonymizer};
use state::{RuleState, StoredState};
use table::StateTable;
use vouchers::{Handed, Pools};
use window::{Periods, Placement};

/// Stack for compiling expressions: the CEL parser recurses per nesting
/// level, and a rule file may nest deeply.
const COMPILE_STACK: usize = 64 * 1024 * 1024;

/// How often a failing expression or a state mismatch is logged per rule.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Progress feedback points, in percent of the next tier.
const QUARTERS: [u8; 3] = [75, 50, 25];

/// Why rules could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}:{line}: rule `{rule}`: `{field}` does not compile: {message}", file.display())]
    Compile {
        rule: String,
        field: &'static str,
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("rule compiler thread failed: {0}")]
    CompilerThread(String),
    #[error(transparent)]
    Pseudonym(#[from] PseudonymError),
    #[error(transparent)]
    Vouchers(#[from] vouchers::PoolError),
}

/// Why applying an event failed; the writer rolls the transaction back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
    #[error("rule state of `{rule}` is unreadable: {source}")]
    Corrupt {
        rule: String,
        source: postcard::Error,
    },
    #[error("{0}")]
    Customer(String),
}

/// A record the engine wants in the outbox; the store gives it a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// Event time of the event that caused it (ms since the epoch).
    pub at_ms: i64,
    pub body: RecordBody,
    /// For awards: the credited customer's own id (the record carries the
    /// pseudonym), whose ledger the store credits.
    pub customer: Option<String>,
    /// For awards: the voucher code handed out with the tier.
    pub voucher: Option<String>,
}

/// A fan's progress crossed a quarter of the next tier.
///
/// Notes are frequent (a rule with low tiers crosses a quarter on most
/// events), so their names are shared, not copied: the rule's id and the
/// window's name with the engine, the customer's with the event's other
/// notes.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressNote {
    pub customer: Arc<str>,
    pub rule: Arc<str>,
    pub version: u32,
    pub window: NoteWindow,
    pub value: f64,
    pub next_at: f64,
    /// 25, 50 or 75.
    pub percent: u8,
}

/// The window instance a progress note is about.
///
/// A rolling instance is named by its start time in RFC 3339, and a fan's
/// rolling rules make a note on most events: the name is written when
/// the note is published (see its `Display`), not when the engine makes
/// the note.
#[derive(Debug, Clone, PartialEq)]
pub enum NoteWindow {
    /// A window instance by its name, shared with the engine.
    Named(Arc<str>),
    /// The rolling instance that started at this event time (ms).
    RollingFrom(i64),
}

impl NoteWindow {
    /// The instance's name: borrowed when it has one, written when it is
    /// a rolling instance's.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            NoteWindow::Named(name) => Cow::Borrowed(name),
            NoteWindow::RollingFrom(start_ms) => Cow::Owned(window::rolling_name(*start_ms)),
        }
    }

    /// The instance's name, as awards carry it.
    pub fn name(&self) -> Arc<str> {
        match self {
            NoteWindow::Named(name) => name.clone(),
            NoteWindow::RollingFrom(_) => Arc::from(self.text()),
        }
    }
}

impl std::fmt::Display for NoteWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// What applying events produced, drained by the writer per event.
#[derive(Debug, Default)]
pub struct Output {
    pub records: Vec<Emitted>,
    pub progress: Vec<ProgressNote>,
}

/// Per-rule counters, readable from any thread.
#[derive(Debug)]
pub struct RuleStats {
    id: String,
    version: u32,
    matched: AtomicU64,
    predicate_errors: AtomicU64,
    awards: AtomicU64,
    late: AtomicU64,
    limited: AtomicU64,
}

impl RuleStats {
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The rule version these counters belong to.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Events that met the rule (type and `when`). Counted when
    /// evaluated; a rolled-back commit is not subtracted.
    pub fn matched(&self) -> u64 {
        self.matched.load(Ordering::Relaxed)
    }
    /// Evaluations of the rule's expressions that failed at runtime or
    /// yielded the wrong type; each event counted as not matching.
    pub fn predicate_errors(&self) -> u64 {
        self.predicate_errors.load(Ordering::Relaxed)
    }
    /// Tier awards produced (before commit).
    pub fn awards(&self) -> u64 {
        self.awards.load(Ordering::Relaxed)
    }
    /// Matching events whose window instance had closed (watermark past
    /// its end plus the rule's lateness).
    pub fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
    /// Matching events refused by `sources`, `limits` or the referral
    /// rules.
    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

/// Counters of every rule, in bundle order, and of the site's periods and
/// vouchers.
#[derive(Debug, Default)]
pub struct EngineStats {
    rules: Vec<RuleStats>,
    vouchers_dry: AtomicU64,
    period_events_invalid: AtomicU64,
    period_summaries: AtomicU64,
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
    /// Tiers awarded without their voucher because the pool was empty.
    pub fn vouchers_dry(&self) -> u64 {
        self.vouchers_dry.load(Ordering::Relaxed)
    }
    /// `venue.period.*` events without a usable `data.period`.
    pub fn period_events_invalid(&self) -> u64 {
        self.period_events_invalid.load(Ordering::Relaxed)
    }
    /// `PeriodSummary` records produced.
    pub fn period_summaries(&self) -> u64 {
        self.period_summaries.load(Ordering::Relaxed)
    }
}

pub(crate) struct CompiledTier {
    pub at: f64,
    badge: Option<String>,
    /// Sorted by category (the rule's BTreeMap order).
    points: Vec<(String, i64)>,
    voucher: Option<Voucher>,
}

/// A sequence step: the types it takes and its optional `when`.
struct CompiledStep {
    on: Vec<String>,
    when: Option<Predicate>,
}

pub(crate) struct CompiledRule {
    pub rule: AchievementRule,
    /// `rule.id`, shared with the progress notes.
    id: Arc<str>,
    /// What the slots of this rule's states start with
    /// ([`record::slot_prefix`]).
    slot_prefix: Box<[u8]>,
    when: Option<Predicate>,
    /// `value` (sum, max, min) or `key` (distinct).
    expr: Option<Expr>,
    group_by: Option<Expr>,
    credit: Option<Expr>,
    steps: Vec<CompiledStep>,
    pub tiers: Vec<CompiledTier>,
    /// The most `distinct` keys worth keeping: the highest tier.
    cap: usize,
    lateness_ms: i64,
}

impl CompiledRule {
    /// True when tiers count down (`min`): a tier is reached at or below.
    pub fn descending(&self) -> bool {
        matches!(self.rule.measure, Measure::Min { .. })
    }

    pub fn reached(&self, tier: usize, value: f64) -> bool {
        self.tiers.get(tier).is_some_and(|t| {
            if self.descending() {
                value <= t.at
            } else {
                value >= t.at
            }
        })
    }

    fn rolling_span(&self) -> Option<i64> {
        match self.rule.window {
            Window::Rolling(span) => Some(window::duration_ms(span)),
            _ => None,
        }
    }
}

/// The rules an event type meets, and the variables their expressions read.
struct TypeEntry {
    rules: Vec<usize>,
    needs: Needs,
}

/// Site-wide engine state, cached between commits (see [`Engine::begin`]).
#[derive(Debug, Clone, Default)]
struct Globals {
    watermark: i64,
    periods: Periods,
    watermark_dirty: bool,
    periods_dirty: bool,
}

/// Loaded rules plus what evaluation reuses between events.
pub struct Engine {
    root: cel::Context<'static, 'static>,
    rules: Vec<CompiledRule>,
    logs: Vec<RuleLogs>,
    /// Looked up once per event. Built from the rules and never grown by
    /// input, so a fast hash is safe here.
    by_type: FxHashMap<String, TypeEntry>,
    pseudonymizer: Pseudonymizer,
    pools: Pools,
    timezone: TimeZone,
    stats: Arc<EngineStats>,
    /// Globals as of the last commit, and as changed by the open one.
    committed: Option<Globals>,
    working: Option<Globals>,
    /// The period each customer has an activity record in, as committed;
    /// a period event forgets them all.
    active: Committed<String>,
    key: KeyBuf,
    /// The records of the customers the current event touches.
    records: record::Records,
    slot: Vec<u8>,
    names: window::Names,
    value: Vec<u8>,
    /// The customer named in the last progress note.
    noted: Option<Arc<str>>,
}

/// Customers remembered in [`Engine::active`].
const ACTIVE_CACHE_MAX: usize = 1_000_000;

/// Everything but the rules, borrowed while one rule is applied.
pub(crate) struct Work<'a> {
    pub key: &'a mut KeyBuf,
    /// Customers' rule states, read and written once per event.
    pub records: &'a mut record::Records,
    /// The slot of the rule state being updated in its record.
    pub slot: &'a mut Vec<u8>,
    pub names: &'a mut window::Names,
    pub value: &'a mut Vec<u8>,
    /// The customer named in the last progress note ([`shared_name`]).
    pub noted: &'a mut Option<Arc<str>>,
    /// The event's subject's record, once a rule has opened it: most
    /// rules credit the subject, and each would search the open records
    /// for them again.
    pub subject_rec: Option<record::Rec>,
    pub pseudonymizer: &'a Pseudonymizer,
    pub pools: &'a Pools,
    pub periods: &'a Periods,
    pub stats: &'a EngineStats,
}

impl Engine {
    /// How many codes each voucher pool holds (see [`Pools::sizes`]).
    pub fn pool_sizes(&self) -> Vec<(String, u64)> {
        self.pools.sizes()
    }

    /// Limits the voucher pools to `sizes` (see [`Pools::limit`]).
    pub fn limit_pools(&mut self, sizes: &[(String, u64)]) {
        self.pools.limit(sizes);
    }

    /// Compiles every rule's expressions once (on a thread with a deep
    /// stack), reads the voucher pools and indexes rules by event type.
    pub fn new(bundle: &RuleBundle, pseudonymizer: Pseudonymizer) -> Result<Engine, EngineError> {
        let compiled = compile_all(&bundle.achievements)?;
        let pools = Pools::load(&bundle.voucher_pools)?;
        let mut rules = Vec::with_capacity(bundle.achievements.len());
        let mut by_type: FxHashMap<String, TypeEntry> = FxHashMap::default();
        for (idx, (rule, exprs)) in bundle.achievements.iter().zip(compiled).enumerate() {
            let needs = exprs.needs();
            for kind in rule.event_types() {
                let entry = by_type
                    .entry(kind.to_string())
                    .or_insert_with(|| TypeEntry {
                        rules: Vec::new(),
                        needs: Needs::default(),
                    });
                if !entry.rules.contains(&idx) {
                    entry.rules.push(idx);
                    entry.needs = entry.needs.union(needs);
                }
            }
            let tiers: Vec<CompiledTier> = rule
                .tiers
                .iter()
                .map(|t| CompiledTier {
                    at: t.at,
                    badge: t.badge.clone(),
                    points: t.points.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    voucher: t.voucher.clone(),
                })
                .collect();
            let cap = tiers
                .iter()
                .map(|t| t.at.ceil() as usize)
                .max()
                .unwrap_or(0);
            let steps = match &rule.measure {
                Measure::Sequence { steps, .. } => steps
                    .iter()
                    .zip(exprs.steps)
                    .map(|(s, when)| CompiledStep {
                        on: s.on.clone(),
                        when,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            rules.push(CompiledRule {
                rule: rule.clone(),
                id: Arc::from(rule.id.as_str()),
                slot_prefix: record::slot_prefix(&rule.id, rule.version),
                when: exprs.when,
                expr: exprs.expr,
                group_by: exprs.group_by,
                credit: exprs.credit,
                steps,
                tiers,
                cap,
                lateness_ms: i64::try_from(rule.lateness.as_millis()).unwrap_or(i64::MAX),
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
                    late: AtomicU64::new(0),
                    limited: AtomicU64::new(0),
                })
                .collect(),
            ..EngineStats::default()
        });
        Ok(Engine {
            root: predicate::root(),
            logs: rules.iter().map(|_| RuleLogs::new()).collect(),
            rules,
            by_type,
            pseudonymizer,
            pools,
            timezone: bundle.timezone,
            stats,
            committed: None,
            working: None,
            active: Committed::new(ACTIVE_CACHE_MAX),
            key: KeyBuf::default(),
            records: record::Records::default(),
            slot: Vec::new(),
            names: window::Names::default(),
            noted: None,
            value: Vec::new(),
        })
    }

    pub fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    pub fn pseudonymizer(&self) -> &Pseudonymizer {
        &self.pseudonymizer
    }

    /// Starts a transaction: site-wide state is taken from the last
    /// commit, so a transaction that rolls back leaves no trace in it.
    pub fn begin(&mut self) {
        self.working = self.committed.clone();
        self.records.clear();
        self.active.rollback();
    }

    /// Writes the site-wide state the transaction changed; call right
    /// before committing it.
    pub fn flush(&mut self, table: &mut dyn StateTable) -> Result<(), ApplyError> {
        let Some(g) = &mut self.working else {
            return Ok(());
        };
        if g.watermark_dirty {
            periods::save_watermark(table, &mut self.key, g.watermark)?;
            g.watermark_dirty = false;
        }
        if g.periods_dirty {
            periods::save_periods(table, &mut self.key, &g.periods)?;
            g.periods_dirty = false;
        }
        Ok(())
    }

    /// The transaction committed: its site-wide state is now the base.
    pub fn committed(&mut self) {
        if let Some(g) = self.working.take() {
            self.committed = Some(g);
        }
        self.active.committed();
    }

    /// A customer's progress as offer expressions see it: for every
    /// customer-scope rule, its value in the window instance `time_ms`
    /// falls in (0 when nothing counted there yet), from the customer's
    /// stored record (`None`: no record). Shared goals are not included.
    pub(crate) fn progress_of(&self, record: Option<&[u8]>, time_ms: i64) -> Map<String, Value> {
        let none = Periods::default();
        let periods = self
            .working
            .as_ref()
            .or(self.committed.as_ref())
            .map_or(&none, |g| &g.periods);
        let mut slot = Vec::new();
        let mut out = Map::new();
        for c in &self.rules {
            let rule = &c.rule;
            if !matches!(rule.scope, Scope::Customer) {
                continue;
            }
            let place = window::place(&rule.window, self.timezone, periods, time_ms);
            let stored = match (record, place) {
                (Some(record), Some(place)) => {
                    record::slot_from(&mut slot, &c.slot_prefix, &place.name);
                    record::find(record, &slot).map(state::decode)
                }
                _ => None,
            };
            let value = match stored {
                Some(Ok(StoredState::V1(s))) => progress::value_at(&s.measure, time_ms, rule),
                _ => 0.0,
            };
            let number = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
            out.insert(rule.id.clone(), number);
        }
        out
    }

    /// Deletes everything the engine keeps about `customer`: their key
    /// space (rule state, shares, rate histories, period activity) and the
    /// site-space index entries that name them, which are found through
    /// those records.
    pub fn erase(&mut self, table: &mut dyn StateTable, customer: &str) -> Result<(), ApplyError> {
        self.active.forget(customer);
        self.records.clear();
        let prefix = self.key.start(customer).finish(usize::MAX).to_vec();
        // Keys first, deletes after; one customer's state is small.
        let mut doomed = Vec::new();
        for (k, v) in table.prefixed(&prefix)? {
            match state::decode(&v) {
                Ok(StoredState::Member(m)) => doomed.push(m.index),
                Ok(StoredState::Activity(a)) => doomed.push(a.index),
                _ => {}
            }
            doomed.push(k);
        }
        for key in doomed {
            table.delete(&key)?;
        }
        Ok(())
    }

    /// Applies one new (non-duplicate) event inside the writer's
    /// transaction: advances the watermark, handles period events, updates
    /// the state of every rule the event counts for, and pushes the awards
    /// and progress notes it causes onto `out`.
    ///
    /// `profile` is the subject's profile (tracked customers only: the
    /// caller skips customers without consent).
    pub fn apply(
        &mut self,
        table: &mut dyn StateTable,
        event: &Event,
        profile: Option<&Map<String, Value>>,
        now_ms: i64,
        out: &mut Output,
    ) -> Result<(), ApplyError> {
        if self.working.is_none() {
            self.working = Some(match self.committed.clone() {
                Some(g) => g,
                None => periods::load_globals(table, &mut self.key)?,
            });
        }
        let Engine {
            root,
            rules,
            logs,
            by_type,
            pseudonymizer,
            pools,
            timezone,
            stats,
            working,
            active,
            key,
            records,
            slot,
            names,
            value,
            noted,
            ..
        } = self;
        let Some(globals) = working.as_mut() else {
            return Ok(());
        };
        // Lateness is judged against the watermark before this event.
        let watermark = globals.watermark;
        let capped = event.time_ms.min(now_ms);
        if capped > globals.watermark {
            globals.watermark = capped;
            globals.watermark_dirty = true;
        }
        let Some(customer) = event.subject.as_deref() else {
            // Summaries read no periods: an empty registry stands in while
            // the real one is being changed.
            let none = Periods::default();
            let mut work = Work {
                key,
                records,
                slot,
                names,
                value,
                noted,
                subject_rec: None,
                pseudonymizer,
                pools,
                periods: &none,
                stats,
            };
            if periods::venue_event(&mut work, table, rules, globals, event, out)? {
                globals.periods_dirty = true;
                active.forget_all();
            }
            return Ok(());
        };
        let mut work = Work {
            key,
            records,
            slot,
            names,
            value,
            noted,
            subject_rec: None,
            pseudonymizer,
            pools,
            periods: &globals.periods,
            stats,
        };
        if let Some(period) = periods::period_at(&globals.periods, event.time_ms) {
            if active.get(customer).is_none_or(|p| p != period) {
                periods::mark_active(&mut work, table, customer, period)?;
                active.note(customer, period.to_owned());
            }
        }
        let Some(entry) = by_type.get(event.kind.as_str()) else {
            return Ok(());
        };
        let vars = predicate::Vars::new(root, event, profile, entry.needs);
        for &idx in &entry.rules {
            let compiled = &rules[idx];
            let logs = &mut logs[idx];
            let counters = &stats.rules[idx];
            let ctx = Ctx {
                event,
                customer,
                watermark,
                timezone: *timezone,
                vars: &vars,
                counters,
            };
            let awards = match apply_rule(compiled, logs, &ctx, &mut work, table, out) {
                Ok(n) => n,
                Err(RuleError::Eval(e)) => {
                    counters.predicate_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = logs.error.check() {
                        warn!(
                            rule = %compiled.rule.id,
                            event = %event.id,
                            error = %e,
                            suppressed,
                            "rule expression failed; the event does not count for this rule"
                        );
                    }
                    0
                }
                Err(RuleError::Apply(e)) => return Err(e),
            };
            if awards > 0 {
                counters.awards.fetch_add(awards, Ordering::Relaxed);
            }
        }
        records.write_back(table, globals.watermark, &globals.periods)?;
        Ok(())
    }
}

/// The event's context while one rule is applied.
pub(crate) struct Ctx<'a, 's, 'e> {
    pub event: &'a Event,
    pub customer: &'a str,
    pub watermark: i64,
    pub timezone: TimeZone,
    pub vars: &'a predicate::Vars<'s, 'e>,
    pub counters: &'a RuleStats,
}

pub(crate) enum RuleError {
    /// An expression failed on this event: counted, the event skipped.
    Eval(EvalError),
    Apply(ApplyError),
}

impl From<heed::Error> for RuleError {
    fn from(e: heed::Error) -> Self {
        RuleError::Apply(ApplyError::Lmdb(e))
    }
}

impl From<ApplyError> for RuleError {
    fn from(e: ApplyError) -> Self {
        RuleError::Apply(e)
    }
}

impl From<EvalError> for RuleError {
    fn from(e: EvalError) -> Self {
        RuleError::Eval(e)
    }
}

/// Per-rule log limiters, kept apart from the compiled rule so a rule
/// can be read while its logs are written.
pub(crate) struct RuleLogs {
    error: LogLimiter,
    mismatch: LogLimiter,
    dry: LogLimiter,
}

impl RuleLogs {
    fn new() -> RuleLogs {
        RuleLogs {
            error: LogLimiter::new(LOG_INTERVAL),
            mismatch: LogLimiter::new(LOG_INTERVAL),
            dry: LogLimiter::new(LOG_INTERVAL),
        }
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Runs one rule's gauntlet for the event; returns the awards made.
fn apply_rule(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    ctx: &Ctx<'_, '_, '_>,
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    out: &mut Output,
) -> Result<u64, RuleError> {
    let rule = &c.rule;
    let event = ctx.event;
    let sequence = matches!(rule.measure, Measure::Sequence { .. });
    if !sequence {
        if let Some(when) = &c.when {
            if !when.eval(ctx.vars)? {
                return Ok(0);
            }
        }
        count(&ctx.counters.matched);
    }
    if !limits::source_allowed(rule.sources.as_deref(), &event.source) {
        count(&ctx.counters.limited);
        return Ok(0);
    }
    let Some(place) = work
        .names
        .place(&rule.window, ctx.timezone, work.periods, event.time_ms)
    else {
        // A `period` rule's event outside every period.
        return Ok(0);
    };
    if place.late(ctx.watermark, c.lateness_ms) {
        count(&ctx.counters.late);
        return Ok(0);
    }
    let input = match (&rule.measure, &c.expr) {
        (Measure::Sum { .. } | Measure::Max { .. } | Measure::Min { .. }, Some(expr)) => {
            let v = expr.number(ctx.vars)?;
            if rule.limits.max_value.is_some_and(|max| v > max) {
                count(&ctx.counters.limited);
                return Ok(0);
            }
            Input::Number(v)
        }
        (Measure::Distinct { .. }, Some(expr)) => Input::Key(expr.key(ctx.vars)?),
        _ => Input::Unit,
    };
    // A streak counts instances of `every`, whatever its (lifetime) window.
    let ordinal = match measure::every(&rule.measure) {
        Some(edge_config::Every::Day) => work.names.day(ctx.timezone, event.time_ms).0,
        Some(edge_config::Every::Period) => match work.periods.covering(event.time_ms) {
            Some((i, _)) => i as i64,
            None => return Ok(0),
        },
        None => place.ordinal,
    };
    let target = match (&rule.referral, &c.credit) {
        (Some(_), Some(credit)) => {
            let credited = credit.key(ctx.vars)?;
            if credited.is_empty()
                || credited == ctx.customer
                || credited.len() > crate::store::customers::MAX_CUSTOMER_LEN
            {
                count(&ctx.counters.limited);
                return Ok(0);
            }
            // The credited customer must be tracked too.
            let profile = table.profile(&credited)?;
            if profile
                .as_ref()
                .is_some_and(|p| !crate::store::customers::consents(p, "gamification"))
            {
                return Ok(0);
            }
            Cow::Owned(credited)
        }
        _ => Cow::Borrowed(ctx.customer),
    };
    let per_referrer = rule
        .referral
        .as_ref()
        .and_then(|r| r.max_per_referrer.as_ref());
    // Most rules have no rate: they skip the bookkeeping.
    if (rule.limits.max_per_customer.is_some() || per_referrer.is_some())
        && !within_rates(c, ctx, work, table, &target, per_referrer)?
    {
        count(&ctx.counters.limited);
        return Ok(0);
    }
    let input = Step {
        input,
        ordinal,
        place: &place,
    };
    match rule.scope {
        Scope::Customer => update_customer(c, logs, ctx, work, table, out, &target, input),
        Scope::Group { .. } | Scope::Venue { .. } => {
            shared::update(c, logs, ctx, work, table, out, input)
        }
    }
}

/// Checks the rule's rates (the customer's, and the referrer's for a
/// referral) and records the event in them when both admit it. Both are
/// checked before either is recorded, so an event one limit refuses uses
/// up nothing of the other.
fn within_rates(
    c: &CompiledRule,
    ctx: &Ctx<'_, '_, '_>,
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    target: &str,
    per_referrer: Option<&edge_config::Rate>,
) -> Result<bool, RuleError> {
    let rule = &c.rule;
    let mut admitted: [Option<limits::Admitted>; 2] = [None, None];
    let rates = [
        (rule.limits.max_per_customer.as_ref(), ctx.customer, "rate"),
        (per_referrer, target, "referral"),
    ];
    for (slot, (rate, who, what)) in admitted.iter_mut().zip(rates) {
        let Some(rate) = rate else { continue };
        let key = state::rate_key(work.key, who, &rule.id, rule.version, what).to_vec();
        match limits::check(table, key, rate, ctx.event.time_ms)? {
            Some(a) => *slot = Some(a),
            None => return Ok(false),
        }
    }
    for a in admitted.into_iter().flatten() {
        limits::record(table, work.value, a)?;
    }
    Ok(true)
}

/// What the gauntlet established for the update.
pub(crate) struct Step<'p> {
    pub input: Input,
    pub ordinal: i64,
    pub place: &'p Placement,
}

/// Whether the event satisfies sequence step `i` (its type and `when`).
fn step_matches(c: &CompiledRule, i: usize, ctx: &Ctx<'_, '_, '_>) -> Result<bool, EvalError> {
    let Some(step) = c.steps.get(i) else {
        return Ok(false);
    };
    if !step.on.contains(&ctx.event.kind) {
        return Ok(false);
    }
    match &step.when {
        Some(when) => when.eval(ctx.vars),
        None => Ok(true),
    }
}

/// Reads a rule state record, or a fresh one. A record of another kind
/// (or another measure: a rule edited without a version bump) restarts
/// the measure; awarded tiers stay awarded.
pub(crate) fn read_state(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    table: &dyn StateTable,
    key: &[u8],
    time_ms: i64,
) -> Result<RuleState, ApplyError> {
    state_or_fresh(c, logs, table.get(key)?, time_ms)
}

/// A stored rule state (see [`read_state`]), or a fresh one.
fn state_or_fresh(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    stored: Option<&[u8]>,
    time_ms: i64,
) -> Result<RuleState, ApplyError> {
    let rolling = c.rolling_span().is_some() && matches!(c.rule.scope, Scope::Customer);
    let mut state = match stored {
        Some(bytes) => match state::decode(bytes) {
            Ok(StoredState::V1(s)) => s,
            Ok(_) => RuleState::new(MeasureState::initial(&c.rule.measure, rolling), time_ms),
            Err(source) => {
                return Err(ApplyError::Corrupt {
                    rule: c.rule.id.clone(),
                    source,
                })
            }
        },
        None => RuleState::new(MeasureState::initial(&c.rule.measure, rolling), time_ms),
    };
    if !state.measure.fits(&c.rule.measure, rolling) {
        if let Some(suppressed) = logs.mismatch.check() {
            warn!(rule = %c.rule.id, suppressed, "stored state does not fit the rule's measure; bump `version` when changing a rule");
        }
        state.measure = MeasureState::initial(&c.rule.measure, rolling);
    }
    Ok(state)
}

pub(crate) fn write_state(
    table: &mut dyn StateTable,
    buf: &mut Vec<u8>,
    key: &[u8],
    state: StoredState,
) -> Result<(), ApplyError> {
    encode_state(&state, buf)?;
    table.put(key, buf)?;
    Ok(())
}

/// Encodes `state` into `buf`, as the store writes it.
fn encode_state(state: &StoredState, buf: &mut Vec<u8>) -> Result<(), ApplyError> {
    state::encode(state, buf).map_err(|e| ApplyError::Lmdb(heed::Error::Encoding(Box::new(e))))
}

/// A customer-scope update: the target's own state in the instance.
#[allow(clippy::too_many_arguments)]
fn update_customer(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    ctx: &Ctx<'_, '_, '_>,
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    out: &mut Output,
    target: &str,
    step: Step<'_>,
) -> Result<u64, RuleError> {
    let rule = &c.rule;
    let time_ms = ctx.event.time_ms;
    // Awards below leave `work.slot` alone: it still names this state
    // when the state is put back.
    record::slot_from(work.slot, &c.slot_prefix, &step.place.name);
    // The subject's own id (not a credited customer's equal one) is the
    // event's: the same reference every time.
    let subject = std::ptr::eq(target, ctx.customer);
    let rec = match work.subject_rec {
        Some(rec) if subject => rec,
        _ => {
            let rec = work.records.open(table, target)?;
            if subject {
                work.subject_rec = Some(rec);
            }
            rec
        }
    };
    let stored = work.records.get(rec, work.slot);
    let mut state = state_or_fresh(c, logs, stored, time_ms)?;
    let before = if state.measure.is_empty() {
        0.0
    } else {
        state.measure.value()
    };
    // A rolling instance is named by its start, formatted only when an
    // award or a progress note needs the name.
    let (value, rolling_start) = if let Some(span) = c.rolling_span() {
        let amount = match step.input {
            Input::Number(v) => v,
            _ => 1.0,
        };
        let Some((value, fresh)) =
            measure::observe_rolling(&mut state.measure, amount, time_ms, span)
        else {
            // Older than what the window still holds.
            count(&ctx.counters.late);
            return Ok(0);
        };
        if fresh {
            state.tiers_awarded = 0;
            state.first_ms = time_ms;
        }
        let start = match &state.measure {
            MeasureState::Rolling { start_ms, .. } => *start_ms,
            _ => time_ms,
        };
        (value, Some(start))
    } else {
        let input = if let MeasureState::Sequence { next, .. } = &state.measure {
            let next = *next as usize;
            let first = step_matches(c, 0, ctx)?;
            let fits = if next > 0 {
                step_matches(c, next, ctx)?
            } else {
                first
            };
            if !first && !fits {
                return Ok(0);
            }
            count(&ctx.counters.matched);
            Input::Steps { first, next: fits }
        } else {
            step.input
        };
        let Some(value) =
            state
                .measure
                .observe(&rule.measure, &input, time_ms, step.ordinal, c.cap)
        else {
            return Ok(0);
        };
        (value, None)
    };
    let instance = || match rolling_start {
        Some(start) => NoteWindow::RollingFrom(start),
        None => NoteWindow::Named(step.place.name.clone()),
    };
    state.updated_ms = time_ms;
    let mut awarded = 0u64;
    if c.reached(state.tiers_awarded as usize, value) {
        let window = instance().name();
        while c.reached(state.tiers_awarded as usize, value) {
            award(
                c,
                logs,
                work,
                table,
                out,
                target,
                state.tiers_awarded as usize,
                &window,
                value,
                time_ms,
            )?;
            state.tiers_awarded += 1;
            awarded += 1;
        }
    } else if let Some(note) = progress_note(
        c,
        || shared_name(work.noted, target),
        instance,
        before,
        value,
        state.tiers_awarded,
    ) {
        out.progress.push(note);
    }
    state::encode_rule(&state, work.value);
    let expiry = record::Expiry {
        end_ms: step.place.end_ms,
        lateness_ms: c.lateness_ms,
    };
    work.records.put(rec, work.slot, expiry, work.value);
    Ok(awarded)
}

/// Awards tier `tier` (0-based) of `c` to `customer`: hands out its
/// voucher, notes it in the customer's period activity and emits the
/// record.
#[allow(clippy::too_many_arguments)]
pub(crate) fn award(
    c: &CompiledRule,
    logs: &mut RuleLogs,
    work: &mut Work<'_>,
    table: &mut dyn StateTable,
    out: &mut Output,
    customer: &str,
    tier: usize,
    window: &str,
    value: f64,
    at_ms: i64,
) -> Result<(), ApplyError> {
    let Some(t) = c.tiers.get(tier) else {
        return Ok(());
    };
    let number = u32::try_from(tier + 1).unwrap_or(u32::MAX);
    let rule = &c.rule;
    let voucher = match &t.voucher {
        Some(v) => match work.pools.hand_out(
            table,
            work.key,
            v,
            customer,
            &rule.id,
            rule.version,
            number,
        )? {
            Handed::Code(code) => Some(code),
            Handed::Dry => {
                count(&work.stats.vouchers_dry);
                if let Some(suppressed) = logs.dry.check() {
                    warn!(rule = %rule.id, tier = number, suppressed, "voucher pool is empty: tier awarded without a voucher; add codes to the pool file and reload");
                }
                None
            }
        },
        None => None,
    };
    periods::credit_activity(work, table, customer, at_ms, &t.points, t.badge.as_deref())?;
    out.records.push(Emitted {
        at_ms,
        body: RecordBody::AchievementAwarded(AchievementAwarded {
            customer: work.pseudonymizer.pseudonym(customer),
            achievement: rule.id.clone(),
            version: rule.version,
            tier: number,
            badge: t.badge.clone(),
            points: t.points.clone(),
            window: window.to_string(),
            value,
        }),
        customer: Some(customer.to_string()),
        voucher,
    });
    Ok(())
}

/// `name` as an `Arc`, the one in `last` when it is the same name.
fn shared_name(last: &mut Option<Arc<str>>, name: &str) -> Arc<str> {
    match last {
        Some(n) if **n == *name => n.clone(),
        _ => last.insert(Arc::from(name)).clone(),
    }
}

/// A note when the value crossed 25, 50 or 75 % of the next tier (the
/// highest mark crossed; `min` rules count down and get none).
fn progress_note(
    c: &CompiledRule,
    customer: impl FnOnce() -> Arc<str>,
    window: impl FnOnce() -> NoteWindow,
    before: f64,
    after: f64,
    awarded: u32,
) -> Option<ProgressNote> {
    if c.descending() {
        return None;
    }
    let next = c.tiers.get(awarded as usize)?;
    let percent = QUARTERS.into_iter().find(|q| {
        let mark = next.at * f64::from(*q) / 100.0;
        before < mark && after >= mark
    })?;
    Some(ProgressNote {
        customer: customer(),
        rule: c.id.clone(),
        version: c.rule.version,
        window: window(),
        value: after,
        next_at: next.at,
        percent,
    })
}

/// Every expression of one rule, compiled.
#[derive(Default)]
struct RuleExprs {
    when: Option<Predicate>,
    expr: Option<Expr>,
    group_by: Option<Expr>,
    credit: Option<Expr>,
    steps: Vec<Option<Predicate>>,
}

impl RuleExprs {
    fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        for n in [
            self.when.as_ref().map(|p| p.needs),
            self.expr.as_ref().map(|e| e.needs),
            self.group_by.as_ref().map(|e| e.needs),
            self.credit.as_ref().map(|e| e.needs),
        ]
        .into_iter()
        .flatten()
        .chain(self.steps.iter().flatten().map(|p| p.needs))
        {
            needs = needs.union(n);
        }
        needs
    }
}

fn compile_rule(rule: &AchievementRule) -> Result<RuleExprs, EngineError> {
    let fail = |field: &'static str| {
        move |message: String| EngineError::Compile {
            rule: rule.id.clone(),
            field,
            file: rule.file.clone(),
            line: rule.line,
            message,
        }
    };
    let mut out = RuleExprs {
        when: rule
            .when
            .as_deref()
            .map(|s| Predicate::compile(s).map_err(fail("when")))
            .transpose()?,
        ..RuleExprs::default()
    };
    match &rule.measure {
        Measure::Sum { value } | Measure::Max { value } | Measure::Min { value } => {
            out.expr = Some(Expr::compile(value).map_err(fail("value"))?);
        }
        Measure::Distinct { key } => {
            out.expr = Some(Expr::compile(key).map_err(fail("key"))?);
        }
        Measure::Sequence { steps, .. } => {
            for step in steps {
                out.steps.push(
                    step.when
                        .as_deref()
                        .map(|s| Predicate::compile(s).map_err(fail("steps.when")))
                        .transpose()?,
                );
            }
        }
        Measure::Count | Measure::Streak { .. } => {}
    }
    if let Scope::Group { group_by, .. } = &rule.scope {
        out.group_by = Some(Expr::compile(group_by).map_err(fail("group_by"))?);
    }
    if let Some(referral) = &rule.referral {
        out.credit = Some(Expr::compile(&referral.credit).map_err(fail("referral.credit"))?);
    }
    Ok(out)
}

/// Compiles every rule's expressions on a thread with a deep stack.
fn compile_all(rules: &[AchievementRule]) -> Result<Vec<RuleExprs>, EngineError> {
    let compile =
        || -> Result<Vec<RuleExprs>, EngineError> { rules.iter().map(compile_rule).collect() };
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
