//! Next best action in the running pipeline: the LMDB tables behind the
//! decision core and the code that runs it inside the writer's
//! transaction.
//!
//! Every decision, answer, escalation and expiry commits in the same
//! transaction as the event (or timer tick) that caused it, together with
//! its outbox records and MQTT publications. That is what makes an offer
//! instance exist exactly when its `offer_decision` record does, and what
//! makes an expiry happen once: the timer entry is deleted in the commit
//! that records the expiry, so neither a crash nor a restart can lose or
//! repeat it.
//!
//! In memory the writer keeps only what is small and hot: the learner's
//! arms and the statistics of the current minute. A transaction that does
//! not commit restores both from a snapshot taken when it began, so a
//! retried command is not learned or counted twice.
//!
//! Randomness (Thompson draws, exploration) comes from a generator seeded
//! per (site seed, event, customer): replaying an event decides the same
//! way, and a restart changes nothing. The site seed is drawn once and
//! stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use heed::types::{Bytes, Str, Unit};
use heed::{Database, RoTxn, RwTxn};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::customers;
use super::engine_table::ProgressView;
use super::fanout::{self, Job, JobError, Jobs};
use super::keys::{split_first, KeyBuf};
use super::presence::Presence;
use super::publications::{topic_level, Publication};
use super::ratelimit::LogLimiter;
use super::rewards::{self, RewardDbs, RewardError};
use crate::engine::Pseudonymizer;
use crate::event::Event;
use crate::nba::arbiter::{self, Candidate};
use crate::nba::catalog::Catalog;
use crate::nba::eligibility::{self, Eligibility, Memo};
use crate::nba::escalation::escalate;
use crate::nba::expr;
use crate::nba::instance::{instance_id, OfferInstance};
use crate::nba::learner::{Arm, ArmRef, Learner, Lesson};
use crate::nba::policy::{self, CustomerContact, Suppression};
use crate::nba::state::{OfferState, Persist, StateError};
use crate::nba::stats::{Attribution, Group, OfferCounters, StatsBook};
use crate::nba::{millis, Outcome};
use touchline_proto::{OfferDecision, OfferOutcome, RecordBody};

/// A customer counts as present (a venue-wide moment reaches them) when
/// an event of theirs was seen within this window: the length of a
/// match day.
pub const PRESENCE_WINDOW: Duration = Duration::from_secs(6 * 3600);

/// How often `offer_stats` records are queued.
pub const STATS_INTERVAL: Duration = Duration::from_secs(60);

/// Instances expired per timer transaction; the rest follow in the next.
const EXPIRY_BUDGET: usize = 20_000;

/// LMDB's key limit.
const MAX_KEY: usize = 511;

const LOG_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) const DB_ARMS: &str = "nba_arms";
pub(crate) const DB_CONTACTS: &str = "nba_customer";
pub(crate) const DB_OFFER_STATE: &str = "nba_offer_state";
pub(crate) const DB_INSTANCES: &str = "nba_instances";
pub(crate) const DB_BY_CUSTOMER: &str = "nba_by_customer";
pub(crate) const DB_EXPIRY: &str = "nba_expiry";
pub(crate) const DB_TOTALS: &str = "nba_totals";
pub(crate) const DB_PRESENCE: &str = "presence";
pub(crate) const DB_META: &str = "nba_meta";

const META_SEED: &str = "seed";
const META_NEXT_INSTANCE: &str = "next_instance";

/// The next-best-action databases.
#[derive(Clone, Copy)]
pub(crate) struct NbaDbs {
    /// offer ‖ version ‖ segment → versioned [`Arm`].
    pub arms: Database<Bytes, Bytes>,
    /// customer → versioned [`CustomerContact`].
    pub contacts: Database<Bytes, Bytes>,
    /// customer ‖ offer → versioned [`OfferState`].
    pub offer_state: Database<Bytes, Bytes>,
    /// instance id → versioned [`OfferInstance`], until its expiry.
    pub instances: Database<Str, Bytes>,
    /// customer ‖ instance id → (): a customer's live instances.
    pub by_customer: Database<Bytes, Unit>,
    /// expiry (ms, 8 bytes BE) ‖ instance id → (): the timers.
    pub expiry: Database<Bytes, Unit>,
    /// offer ‖ version → versioned [`OfferCounters`] of closed intervals.
    pub totals: Database<Bytes, Bytes>,
    /// customer → last seen (ms, 8 bytes BE).
    pub presence: Database<Bytes, Bytes>,
    /// `seed`, `next_instance` → u64 BE.
    pub meta: Database<Str, Bytes>,
    /// sequence → fan-out still to finish (see [`super::fanout`]).
    pub fanouts: Database<Bytes, Bytes>,
}

impl NbaDbs {
    pub(crate) fn create(env: &super::env::LmdbEnv, txn: &mut RwTxn) -> heed::Result<NbaDbs> {
        Ok(NbaDbs {
            arms: env.create_database(txn, Some(DB_ARMS))?,
            contacts: env.create_database(txn, Some(DB_CONTACTS))?,
            offer_state: env.create_database(txn, Some(DB_OFFER_STATE))?,
            instances: env.create_database(txn, Some(DB_INSTANCES))?,
            by_customer: env.create_database(txn, Some(DB_BY_CUSTOMER))?,
            expiry: env.create_database(txn, Some(DB_EXPIRY))?,
            totals: env.create_database(txn, Some(DB_TOTALS))?,
            presence: env.create_database(txn, Some(DB_PRESENCE))?,
            meta: env.create_database(txn, Some(DB_META))?,
            fanouts: env.create_database(txn, Some(super::fanout::DB_FANOUTS))?,
        })
    }
}

/// Why next-best-action work could not be done; the transaction is
/// abandoned like any other store failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NbaError {
    #[error("{0}")]
    Lmdb(#[from] heed::Error),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Customer(#[from] customers::CustomerError),
    #[error("{0}")]
    Reward(#[from] RewardError),
    #[error("{0}")]
    Job(#[from] JobError),
}

/// Counters for metrics; added after each commit, so rolled-back work is
/// never counted.
#[derive(Debug, Default)]
pub struct NbaStats {
    pub(crate) decisions: AtomicU64,
    pub(crate) control: AtomicU64,
    pub(crate) suppressed: [AtomicU64; 6],
    pub(crate) outcomes: [AtomicU64; 6],
    pub(crate) referrals: AtomicU64,
    pub(crate) escalations: AtomicU64,
    pub(crate) bad_answers: AtomicU64,
    pub(crate) expression_errors: AtomicU64,
    pub(crate) fanout_customers: AtomicU64,
    pub(crate) fanouts_open: AtomicU64,
}

/// The outcomes in the order of [`NbaStats::outcomes`].
pub const OUTCOMES: [Outcome; 6] = [
    Outcome::Accepted,
    Outcome::Dismissed,
    Outcome::Clicked,
    Outcome::Shared,
    Outcome::Expired,
    Outcome::Converted,
];

fn outcome_index(o: Outcome) -> usize {
    OUTCOMES.iter().position(|x| *x == o).unwrap_or(0)
}

impl NbaStats {
    /// Offers decided for treated customers (shown).
    pub fn decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }
    /// Decisions for control-group customers (recorded, not shown).
    pub fn control(&self) -> u64 {
        self.control.load(Ordering::Relaxed)
    }
    pub fn suppressed(&self, reason: Suppression) -> u64 {
        self.suppressed[reason.index()].load(Ordering::Relaxed)
    }
    pub fn outcomes(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome_index(outcome)].load(Ordering::Relaxed)
    }
    pub fn referrals(&self) -> u64 {
        self.referrals.load(Ordering::Relaxed)
    }
    pub fn escalations(&self) -> u64 {
        self.escalations.load(Ordering::Relaxed)
    }
    /// Answers (`offer.*` events) that named no open instance of the
    /// customer, or named none at all.
    pub fn bad_answers(&self) -> u64 {
        self.bad_answers.load(Ordering::Relaxed)
    }
    pub fn expression_errors(&self) -> u64 {
        self.expression_errors.load(Ordering::Relaxed)
    }
    /// Venue-wide fan-outs with fans still to decide, as of the last
    /// commit.
    pub fn fanouts_open(&self) -> u64 {
        self.fanouts_open.load(Ordering::Relaxed)
    }
    /// Customers a venue-wide trigger was decided for.
    pub fn fanout_customers(&self) -> u64 {
        self.fanout_customers.load(Ordering::Relaxed)
    }
}

/// What one transaction did, before it committed.
#[derive(Debug, Default, Clone)]
struct Tally {
    decisions: u64,
    control: u64,
    suppressed: [u64; 6],
    outcomes: [u64; 6],
    referrals: u64,
    escalations: u64,
    bad_answers: u64,
    expression_errors: u64,
    fanout_customers: u64,
    /// Fan-out jobs stored after this transaction, when it changed them.
    fanouts_open: Option<u64>,
}

/// What next-best-action work asks the writer to queue in the same
/// transaction.
#[derive(Default)]
pub(crate) struct Output {
    /// (event time, record) for the outbox.
    pub records: Vec<(i64, RecordBody)>,
    pub publications: Vec<Publication>,
}

/// A customer's profile and progress, as offer expressions read them.
type CustomerView = (Map<String, Value>, Map<String, Value>);

/// `customer`'s achievement progress for offer expressions: read only
/// when one of the catalog's expressions mentions it, else empty.
fn progress_for(
    catalog: &Catalog,
    view: ProgressView<'_>,
    txn: &RoTxn,
    customer: &str,
    at_ms: i64,
) -> Result<Map<String, Value>, NbaError> {
    if !catalog.reads_progress() {
        return Ok(Map::new());
    }
    Ok(view.read(txn, customer, at_ms)?)
}

/// Where the output goes, in the same transaction. A venue-wide fan-out
/// hands it over every [`DRAIN_EVERY`] decisions rather than holding a
/// record and a message for every fan in the venue until the end.
pub(crate) trait Drain {
    /// Writes out everything in `out` and leaves it empty.
    fn drain(&mut self, txn: &mut RwTxn, out: &mut Output) -> heed::Result<()>;
}

/// Decisions a fan-out makes between drains of its output.
const DRAIN_EVERY: usize = 1024;

/// A venue-wide trigger, as each chunk of its fan-out decides it.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    catalog: &'a Catalog,
    scope: &'a cel::Context<'a, 'a>,
    trigger: &'a Event,
    triggered: &'a [usize],
    event_seed: u64,
}

/// In-memory state as of the last commit.
#[derive(Clone)]
struct Snapshot {
    learner: Learner,
    book: StatsBook,
}

/// The writer's next-best-action state.
pub(crate) struct Nba {
    dbs: NbaDbs,
    catalog: Arc<Catalog>,
    learner: Learner,
    book: StatsBook,
    /// When the current statistics interval ends (wall clock).
    stats_due_ms: i64,
    seed: u64,
    next_instance: u64,
    /// The earliest stored expiry, if known; `None` means none pending.
    next_due_ms: Option<i64>,
    site: String,
    /// `touchline/<site>/customers` when an MQTT broker is configured.
    prefix: Option<String>,
    pseudonymizer: Pseudonymizer,
    snapshot: Option<Snapshot>,
    /// Where fans were last seen, for fan-outs.
    presence: Presence,
    tally: Tally,
    stats: Arc<NbaStats>,
    key: KeyBuf,
    key2: KeyBuf,
    error_log: LogLimiter,
    answer_log: LogLimiter,
    /// Fans a fan-out decides per transaction.
    fanout_chunk: usize,
}

/// Other stages' tables next best action reads (profiles, for fan-outs
/// and escalations; achievement progress, for expressions that read it)
/// or credits (rewards, for accepts and referrals), as the writer hands
/// them over for one event.
#[derive(Clone, Copy)]
pub(crate) struct Neighbours<'a> {
    pub profiles: Database<Bytes, Bytes>,
    pub rewards: RewardDbs,
    pub progress: ProgressView<'a>,
}

impl Nba {
    /// Loads the learner, the seed, the instance counter and the next
    /// timer from the store (in the store's opening transaction).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        dbs: NbaDbs,
        txn: &mut RwTxn,
        catalog: Catalog,
        site: &str,
        prefix: Option<String>,
        pseudonymizer: Pseudonymizer,
        stats: Arc<NbaStats>,
        now_ms: i64,
        policy: &edge_config::NbaPolicy,
    ) -> Result<Nba, NbaError> {
        let seed = match read_u64(dbs.meta, txn, META_SEED)? {
            Some(s) => s,
            None => {
                let s: u64 = rand::rng().random();
                dbs.meta.put(txn, META_SEED, &s.to_be_bytes())?;
                s
            }
        };
        let next_instance = read_u64(dbs.meta, txn, META_NEXT_INSTANCE)?.unwrap_or(1);
        let mut learner = Learner::from_policy(policy);
        for entry in dbs.arms.iter(txn)? {
            let (k, v) = entry?;
            let Some((offer, version, segment)) = parse_arm_key(k) else {
                continue;
            };
            let arm = Arm::from_bytes(v)?;
            learner.insert(
                ArmRef {
                    offer: &offer,
                    version,
                    segment: &segment,
                },
                arm,
            );
        }
        let mut book = StatsBook::new(now_ms);
        for entry in dbs.totals.iter(txn)? {
            let (k, v) = entry?;
            if let Some((offer, version)) = parse_offer_version(k) {
                book.set_totals(&offer, version, OfferCounters::from_bytes(v)?);
            }
        }
        let next_due_ms = first_expiry(dbs.expiry, txn)?;
        stats
            .fanouts_open
            .store(dbs.fanouts.len(txn)?, Ordering::Relaxed);
        Ok(Nba {
            dbs,
            catalog: Arc::new(catalog),
            learner,
            book,
            stats_due_ms: now_ms.saturating_add(millis(STATS_INTERVAL)),
            seed,
            next_instance,
            next_due_ms,
            site: site.to_owned(),
            prefix,
            pseudonymizer,
            snapshot: None,
            presence: Presence::new(dbs.presence, false),
            tally: Tally::default(),
            stats,
            key: KeyBuf::default(),
            key2: KeyBuf::default(),
            error_log: LogLimiter::new(LOG_INTERVAL),
            answer_log: LogLimiter::new(LOG_INTERVAL),
            fanout_chunk: fanout::CHUNK,
        })
    }

    /// Sets how many fans a fan-out decides per transaction (at least 1).
    pub(crate) fn with_fanout_chunk(mut self, fans: usize) -> Nba {
        self.fanout_chunk = fans.max(1);
        self
    }

    /// Holds presence in memory until [`Nba::write_back_presence`]
    /// (the store's `journal` mode; see `presence.rs`).
    pub(crate) fn with_presence_held(mut self, hold: bool) -> Nba {
        self.presence = Presence::new(self.dbs.presence, hold);
        self
    }

    /// Writes back the presence held in memory, in the open transaction
    /// (each checkpoint does, as it empties the journal). Returns the
    /// fans whose stored presence changed.
    pub(crate) fn write_back_presence(&mut self, txn: &mut RwTxn) -> heed::Result<usize> {
        self.presence.write_back(txn)
    }

    /// Whether presence waits in memory to be written back.
    pub(crate) fn presence_held(&self) -> bool {
        self.presence.held()
    }

    /// A transaction starts. When the previous one did not commit, its
    /// in-memory changes are undone first.
    pub(crate) fn begin(&mut self) {
        self.rollback();
        self.tally = Tally::default();
        self.snapshot = Some(Snapshot {
            learner: self.learner.clone(),
            book: self.book.clone(),
        });
    }

    /// Undoes the in-memory changes of a transaction that did not commit.
    fn rollback(&mut self) {
        self.presence.rollback();
        if let Some(s) = self.snapshot.take() {
            self.learner = s.learner;
            self.book = s.book;
        }
    }

    /// The transaction committed: its changes stand and are counted.
    pub(crate) fn committed(&mut self) {
        self.snapshot = None;
        self.presence.committed();
        let t = std::mem::take(&mut self.tally);
        let s = &self.stats;
        let add = |c: &AtomicU64, n: u64| {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&s.decisions, t.decisions);
        add(&s.control, t.control);
        for (c, n) in s.suppressed.iter().zip(t.suppressed) {
            add(c, n);
        }
        for (c, n) in s.outcomes.iter().zip(t.outcomes) {
            add(c, n);
        }
        add(&s.referrals, t.referrals);
        add(&s.escalations, t.escalations);
        add(&s.bad_answers, t.bad_answers);
        add(&s.expression_errors, t.expression_errors);
        add(&s.fanout_customers, t.fanout_customers);
        if let Some(open) = t.fanouts_open {
            s.fanouts_open.store(open, Ordering::Relaxed);
        }
    }

    /// New offers (a reload), between two commits. Learned arms and
    /// statistics are keyed by offer id and version, so unchanged offer
    /// versions keep what they learned and a new version starts fresh.
    pub(crate) fn replace_catalog(&mut self, catalog: Catalog, policy: &edge_config::NbaPolicy) {
        self.rollback();
        self.learner.set_policy(policy.prior, policy.exploration);
        self.catalog = Arc::new(catalog);
    }

    /// Whether a timer or the statistics interval is due at `now_ms`.
    pub(crate) fn due(&self, now_ms: i64) -> bool {
        now_ms >= self.stats_due_ms || self.next_due_ms.is_some_and(|t| t <= now_ms)
    }

    /// One new event, after the achievement engine ran for it. `profile`
    /// is the subject's profile (`None` when unknown or venue-wide).
    pub(crate) fn on_event(
        &mut self,
        txn: &mut RwTxn,
        neighbours: Neighbours<'_>,
        event: &Event,
        profile: Option<&Map<String, Value>>,
        out: &mut Output,
        drain: &mut dyn Drain,
    ) -> Result<(), NbaError> {
        let Neighbours {
            rewards, progress, ..
        } = neighbours;
        if let Some(customer) = event.subject.as_deref() {
            self.presence.touch(txn, customer, event.time_ms)?;
            if let Some(outcome) = Outcome::from_event_type(&event.kind) {
                self.answer(txn, rewards, event, customer, outcome, out)?;
            }
        }
        let catalog = self.catalog.clone();
        if !catalog.concerns(&event.kind) {
            return Ok(());
        }
        let scope = expr::event_scope(&catalog.root, event);
        let empty = Map::new();
        let profile = profile.unwrap_or(&empty);
        let subject_progress = match event.subject.as_deref() {
            Some(customer) => progress_for(&catalog, progress, txn, customer, event.time_ms)?,
            None => Map::new(),
        };
        // The subject's scope serves conversions and decisions alike.
        let subject = event.subject.as_deref().map(|customer| {
            (
                customer,
                expr::customer_scope(&scope, profile, &subject_progress),
            )
        });
        if let Some((customer, cscope)) = &subject {
            self.convert(txn, &catalog, cscope, event, customer, out)?;
        }
        self.escalate(txn, neighbours, &catalog, &scope, event, out)?;
        let triggered = catalog.triggered_by(&event.kind);
        if triggered.is_empty() {
            return Ok(());
        }
        let event_seed = self.event_seed(event);
        match &subject {
            Some((customer, cscope)) => {
                let eligibility = eligibility::evaluate(&catalog, cscope, profile, triggered);
                self.decide(
                    txn,
                    &catalog,
                    &eligibility,
                    event,
                    customer,
                    event_seed,
                    out,
                )?;
            }
            None => {
                let chunk = Chunk {
                    catalog: &catalog,
                    scope: &scope,
                    trigger: event,
                    triggered,
                    event_seed,
                };
                if let Some(after) = self.fan_out(txn, neighbours, chunk, None, out, drain)? {
                    let jobs = Jobs::new(self.dbs.fanouts);
                    let job = Job {
                        seq: jobs.next_seq(txn)?,
                        trigger: event.clone(),
                        after,
                    };
                    jobs.put(txn, &job)?;
                    self.tally.fanouts_open = Some(self.dbs.fanouts.len(txn)?);
                }
            }
        }
        write_u64(self.dbs.meta, txn, META_NEXT_INSTANCE, self.next_instance)?;
        Ok(())
    }

    /// Deletes every next-best-action trace of an erased customer.
    pub(crate) fn erase(&mut self, txn: &mut RwTxn, customer: &str) -> Result<(), NbaError> {
        let prefix = self.key.start(customer).finish(MAX_KEY).to_vec();
        self.dbs.contacts.delete(txn, &prefix)?;
        self.presence.erase(txn, customer)?;
        let mut doomed = Vec::new();
        for entry in self.dbs.offer_state.prefix_iter(txn, &prefix)? {
            doomed.push(entry?.0.to_vec());
        }
        for k in &doomed {
            self.dbs.offer_state.delete(txn, k)?;
        }
        let mut instances = Vec::new();
        for entry in self.dbs.by_customer.prefix_iter(txn, &prefix)? {
            let (k, ()) = entry?;
            instances.push((
                k.to_vec(),
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
            ));
        }
        for (k, id) in instances {
            self.dbs.by_customer.delete(txn, &k)?;
            if let Some(bytes) = self.dbs.instances.get(txn, &id)? {
                let inst = OfferInstance::from_bytes(bytes)?;
                self.dbs
                    .expiry
                    .delete(txn, &expiry_key(inst.expires_ms, &id))?;
            }
            self.dbs.instances.delete(txn, &id)?;
        }
        // Other fans' offers shared with them name them too, and would
        // credit the sharer if the id came back and accepted. Erasures
        // are rare and open instances bounded by their lives: a scan.
        let mut shared = Vec::new();
        for entry in self.dbs.instances.iter(txn)? {
            let (_, bytes) = entry?;
            let inst = OfferInstance::from_bytes(bytes)?;
            if inst.shared_with.iter().any(|f| f == customer) {
                shared.push(inst);
            }
        }
        for mut inst in shared {
            inst.shared_with.retain(|f| f != customer);
            self.store_instance(txn, &inst)?;
        }
        Ok(())
    }

    /// Expires due instances and closes the statistics interval when it is
    /// over, in the caller's transaction.
    pub(crate) fn tick(
        &mut self,
        txn: &mut RwTxn,
        now_ms: i64,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        if self.next_due_ms.is_some_and(|t| t <= now_ms) {
            self.expire_due(txn, now_ms, out)?;
        }
        if now_ms >= self.stats_due_ms {
            self.close_stats(txn, now_ms, out)?;
        }
        Ok(())
    }

    /// Closes the statistics interval now (before a reload or at
    /// shutdown as well as every minute).
    pub(crate) fn close_stats(
        &mut self,
        txn: &mut RwTxn,
        now_ms: i64,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        let records = self.book.close_interval(now_ms);
        for r in records {
            if let Some(totals) = self.book.totals(&r.offer, r.version) {
                let key = offer_version_key(&mut self.key, &r.offer, r.version);
                self.dbs.totals.put(txn, key, &totals.to_bytes()?)?;
            }
            out.records.push((now_ms, RecordBody::OfferStats(r)));
        }
        self.stats_due_ms = now_ms.saturating_add(millis(STATS_INTERVAL));
        Ok(())
    }

    fn expire_due(
        &mut self,
        txn: &mut RwTxn,
        now_ms: i64,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        let mut due = Vec::new();
        for entry in self.dbs.expiry.iter(txn)? {
            let (k, ()) = entry?;
            let Some((at, id)) = parse_expiry_key(k) else {
                due.push((k.to_vec(), None));
                continue;
            };
            if at > now_ms || due.len() >= EXPIRY_BUDGET {
                break;
            }
            due.push((k.to_vec(), Some(id)));
        }
        let catalog = self.catalog.clone();
        for (k, id) in due {
            self.dbs.expiry.delete(txn, &k)?;
            let Some(id) = id else { continue };
            let Some(bytes) = self.dbs.instances.get(txn, &id)? else {
                continue;
            };
            let mut inst = OfferInstance::from_bytes(bytes)?;
            if inst.expire_if_due(now_ms) {
                self.closed(txn, &catalog, &inst, Outcome::Expired, inst.expires_ms, out)?;
            }
            // The life is over: the referral window closed with it.
            self.dbs.instances.delete(txn, &id)?;
            let bk = by_customer_key(&mut self.key, &inst.customer, &id);
            self.dbs.by_customer.delete(txn, bk)?;
        }
        self.next_due_ms = first_expiry(self.dbs.expiry, txn)?;
        Ok(())
    }

    /// Decides the trigger for the next present fans after `after` (from
    /// the first when `None`), at most `fanout_chunk` of them. Returns
    /// the presence key of the last fan decided when more may follow.
    fn fan_out(
        &mut self,
        txn: &mut RwTxn,
        neighbours: Neighbours<'_>,
        chunk: Chunk<'_>,
        after: Option<&[u8]>,
        out: &mut Output,
        drain: &mut dyn Drain,
    ) -> Result<Option<Vec<u8>>, NbaError> {
        let Chunk {
            catalog,
            scope,
            trigger,
            triggered,
            event_seed,
        } = chunk;
        let (present, next) = self.presence.present(
            txn,
            trigger.time_ms,
            millis(PRESENCE_WINDOW),
            after,
            self.fanout_chunk,
        )?;
        self.tally.fanout_customers += present.len() as u64;
        let mut memo = catalog.deciding_fields(&trigger.kind).map(Memo::new);
        for customer in present {
            let Some(profile) =
                customers::load(neighbours.profiles, txn, &mut self.key, &customer)?
            else {
                continue;
            };
            if !customers::consents(&profile, "gamification") {
                continue;
            }
            let fresh;
            let customer_progress;
            let eligibility = match &mut memo {
                // Only when no expression reads more than profile
                // fields (so none reads progress).
                Some(memo) => memo.get(scope, &profile, |cscope| {
                    eligibility::evaluate(catalog, cscope, &profile, triggered)
                }),
                None => {
                    customer_progress = progress_for(
                        catalog,
                        neighbours.progress,
                        txn,
                        &customer,
                        trigger.time_ms,
                    )?;
                    let cscope = expr::customer_scope(scope, &profile, &customer_progress);
                    fresh = eligibility::evaluate(catalog, &cscope, &profile, triggered);
                    &fresh
                }
            };
            self.decide(
                txn,
                catalog,
                eligibility,
                trigger,
                &customer,
                event_seed,
                out,
            )?;
            if out.records.len() >= DRAIN_EVERY {
                drain.drain(txn, out)?;
            }
        }
        Ok(next)
    }

    /// Whether a venue-wide fan-out still has fans to decide (as of the
    /// last commit).
    pub(crate) fn fanout_pending(&self) -> bool {
        self.stats.fanouts_open() > 0
    }

    /// Decides the next chunk of the oldest unfinished fan-out, with the
    /// offers loaded now, and stores how far it got. A job that cannot be
    /// read is dropped with a log line (its trigger's first chunk was
    /// decided with the trigger).
    pub(crate) fn continue_fanout(
        &mut self,
        txn: &mut RwTxn,
        neighbours: Neighbours<'_>,
        out: &mut Output,
        drain: &mut dyn Drain,
    ) -> Result<(), NbaError> {
        let jobs = Jobs::new(self.dbs.fanouts);
        match jobs.first(txn)? {
            Some((_, Ok(job))) => {
                let catalog = self.catalog.clone();
                let trigger = &job.trigger;
                let triggered = catalog.triggered_by(&trigger.kind);
                let next = if triggered.is_empty() {
                    // The offers it triggered are gone (a reload).
                    None
                } else {
                    let scope = expr::event_scope(&catalog.root, trigger);
                    let chunk = Chunk {
                        catalog: &catalog,
                        scope: &scope,
                        trigger,
                        triggered,
                        event_seed: self.event_seed(trigger),
                    };
                    self.fan_out(txn, neighbours, chunk, Some(&job.after), out, drain)?
                };
                match next {
                    Some(after) => jobs.put(txn, &Job { after, ..job })?,
                    None => jobs.finish(txn, job.seq)?,
                }
                write_u64(self.dbs.meta, txn, META_NEXT_INSTANCE, self.next_instance)?;
            }
            Some((seq, Err(e))) => {
                self.log_error(&format!(
                    "dropping a venue-wide fan-out that cannot be read: {e}"
                ));
                jobs.finish(txn, seq)?;
            }
            None => {}
        }
        self.tally.fanouts_open = Some(self.dbs.fanouts.len(txn)?);
        Ok(())
    }

    fn event_seed(&self, event: &Event) -> u64 {
        let digest = Sha256::new()
            .chain_update(self.seed.to_be_bytes())
            .chain_update((event.source.len() as u64).to_be_bytes())
            .chain_update(event.source.as_bytes())
            .chain_update(event.id.as_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    }

    /// One customer's decision for a trigger, among the offers they are
    /// eligible for.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        txn: &mut RwTxn,
        catalog: &Catalog,
        eligibility: &Eligibility,
        event: &Event,
        customer: &str,
        event_seed: u64,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        let now = event.time_ms;
        for f in &eligibility.failures {
            self.expression_error(&catalog.offers[f.offer].offer.id, f.field, &f.error);
        }
        let eligible = &eligibility.offers;
        if eligible.is_empty() {
            return Ok(());
        }
        // A small fast generator: a fan-out seeds one per customer; the draws
        // need to be reproducible, not unpredictable.
        let mut rng = SmallRng::seed_from_u64(event_seed ^ fnv1a(customer.as_bytes()));
        let candidates: Vec<Candidate> = eligible
            .iter()
            .map(|e| {
                let o = &catalog.offers[e.offer].offer;
                Candidate {
                    propensity: self.learner.sample(
                        ArmRef {
                            offer: &o.id,
                            version: o.version,
                            segment: &e.segment,
                        },
                        &mut rng,
                    ),
                    value: o.value,
                    weight: e.weight,
                }
            })
            .collect();
        // Contact state is read only for candidates the arbiter asks
        // about: with top-K of 1 that is usually one of them, not all.
        let ckey = self.key.start(customer).finish(MAX_KEY).to_vec();
        let mut contact = match self.dbs.contacts.get(txn, &ckey)? {
            Some(b) => CustomerContact::from_bytes(b)?,
            None => CustomerContact::default(),
        };
        let mut states: Vec<Option<OfferState>> = vec![None; eligible.len()];
        let mut load_error = None;
        let site = catalog.site;
        let dbs = self.dbs;
        let key = &mut self.key;
        let mut admit = |idx: usize, contact: &mut CustomerContact| {
            let c = &catalog.offers[eligible[idx].offer];
            let state = match &mut states[idx] {
                Some(s) => s,
                slot => {
                    let k = state_key(key, customer, &c.offer.id);
                    let loaded = match dbs.offer_state.get(txn, k) {
                        Ok(Some(b)) => OfferState::from_bytes(b).map_err(NbaError::from),
                        Ok(None) => Ok(OfferState::default()),
                        Err(e) => Err(NbaError::from(e)),
                    };
                    match loaded {
                        Ok(s) => slot.insert(s),
                        Err(e) => {
                            // Refused here; the error aborts the
                            // transaction right after arbitration.
                            load_error = Some(e);
                            return Err(Suppression::OfferCap);
                        }
                    }
                }
            };
            policy::check(&site, contact, &c.limits, &state.contact, now)?;
            let expires = now.saturating_add(millis(c.offer.expires_after));
            contact.record_shown(&site, now);
            state.contact.record_shown(&c.limits, now, expires);
            Ok(())
        };
        let arbitration = if self.learner.explores(&mut rng) {
            arbiter::explore(&candidates, catalog.top_k, &mut rng, |i| {
                admit(i, &mut contact)
            })
        } else {
            arbiter::arbitrate(&candidates, catalog.top_k, |i| admit(i, &mut contact))
        };
        if let Some(e) = load_error {
            return Err(e);
        }
        for &(idx, reason) in &arbitration.suppressed {
            let o = &catalog.offers[eligible[idx].offer].offer;
            self.book
                .update(&o.id, o.version, |c| c.record_suppressed(reason));
            self.tally.suppressed[reason.index()] += 1;
        }
        self.tally.expression_errors += arbitration.invalid.len() as u64;
        if arbitration.winners.is_empty() {
            return Ok(());
        }
        let control = catalog.control.contains(customer);
        let group = if control {
            Group::Control
        } else {
            Group::Treated
        };
        for w in &arbitration.winners {
            let e = &eligible[w.index];
            let segment = &e.segment;
            let c = &catalog.offers[e.offer];
            let o = &c.offer;
            let id = instance_id(&self.site, self.next_instance);
            self.next_instance += 1;
            let inst = OfferInstance::open(
                o,
                c.payload.clone(),
                id,
                customer,
                segment,
                &event.kind,
                w.score,
                now,
            );
            if let Some(state) = &mut states[w.index] {
                state.attribution = Some(Attribution::new(now, group, inst.id.clone()));
            }
            self.book
                .update(&o.id, o.version, |c| c.record_decision(group));
            out.records.push((
                now,
                RecordBody::OfferDecision(OfferDecision {
                    customer: self.pseudonymizer.pseudonym(customer),
                    offer: o.id.clone(),
                    version: o.version,
                    instance: inst.id.clone(),
                    trigger: event.kind.clone(),
                    score: w.score,
                    control,
                    segment: segment.clone(),
                    expires_ms: inst.expires_ms,
                }),
            ));
            if control {
                self.tally.control += 1;
                continue;
            }
            self.tally.decisions += 1;
            self.store_instance(txn, &inst)?;
            super::append::put(
                self.dbs.expiry,
                txn,
                &expiry_key(inst.expires_ms, &inst.id),
                &(),
            )?;
            let bk = by_customer_key(&mut self.key, customer, &inst.id);
            self.dbs.by_customer.put(txn, bk, &())?;
            self.next_due_ms = Some(
                self.next_due_ms
                    .map_or(inst.expires_ms, |t| t.min(inst.expires_ms)),
            );
            if let Some(p) = self.publication(&inst, "offer") {
                out.publications.push(p);
            }
        }
        self.dbs.contacts.put(txn, &ckey, &contact.to_bytes()?)?;
        for w in &arbitration.winners {
            if let Some(state) = &states[w.index] {
                let offer = &catalog.offers[eligible[w.index].offer].offer.id;
                let k = state_key(&mut self.key, customer, offer);
                self.dbs.offer_state.put(txn, k, &state.to_bytes()?)?;
            }
        }
        Ok(())
    }

    /// An `offer.*` event from the app.
    fn answer(
        &mut self,
        txn: &mut RwTxn,
        rewards: RewardDbs,
        event: &Event,
        customer: &str,
        outcome: Outcome,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        let Some(id) = event.data.get("instance").and_then(Value::as_str) else {
            self.bad_answer(event, "no `data.instance` string");
            return Ok(());
        };
        let Some(bytes) = self.dbs.instances.get(txn, id)? else {
            self.bad_answer(event, "no such open offer instance (unknown or expired)");
            return Ok(());
        };
        let mut inst = OfferInstance::from_bytes(bytes)?;
        let catalog = self.catalog.clone();
        let at = event.time_ms;
        if inst.customer != customer {
            // A friend the offer was shared with accepts it: the sharer
            // earns the referral reward, once, within the instance's life.
            if outcome == Outcome::Accepted && inst.referral_due(customer, at) {
                inst.shared_with.retain(|f| f != customer);
                self.store_instance(txn, &inst)?;
                if let Some(c) = catalog.index_of(&inst.offer).map(|i| &catalog.offers[i]) {
                    let points: Vec<(String, i64)> = c
                        .offer
                        .referral
                        .iter()
                        .map(|(k, v)| (k.clone(), *v))
                        .collect();
                    rewards::credit_points(rewards, txn, &inst.customer, &points, at)?;
                }
                self.tally.referrals += 1;
                out.records
                    .push((at, self.outcome_record(&inst, "referred")));
            } else {
                self.bad_answer(event, "the instance belongs to another customer");
            }
            return Ok(());
        }
        match outcome {
            Outcome::Clicked | Outcome::Shared => {
                if !inst.is_open(at) {
                    self.bad_answer(event, "the instance is no longer open");
                    return Ok(());
                }
                if outcome == Outcome::Shared {
                    match event.data.get("friend").and_then(Value::as_str) {
                        Some(friend) if !friend.is_empty() => {
                            inst.record_share(friend, at);
                            self.store_instance(txn, &inst)?;
                        }
                        _ => {
                            self.bad_answer(event, "`offer.shared` needs a `data.friend` string");
                            return Ok(());
                        }
                    }
                }
                self.book
                    .update(&inst.offer, inst.version, |c| c.record_outcome(outcome));
                self.tally.outcomes[outcome_index(outcome)] += 1;
                out.records
                    .push((at, self.outcome_record(&inst, outcome.as_str())));
            }
            _ => {
                if !inst.close(outcome, at) {
                    self.bad_answer(event, "the instance is no longer open");
                    return Ok(());
                }
                self.store_instance(txn, &inst)?;
                self.closed(txn, &catalog, &inst, outcome, at, out)?;
                if outcome == Outcome::Accepted {
                    if let Some(c) = catalog.index_of(&inst.offer).map(|i| &catalog.offers[i]) {
                        let points: Vec<(String, i64)> = c
                            .offer
                            .reward
                            .iter()
                            .map(|(k, v)| (k.clone(), *v))
                            .collect();
                        rewards::credit_points(rewards, txn, customer, &points, at)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// An instance closed with `outcome` at `at`: contact limits, learner,
    /// statistics and the outcome record.
    fn closed(
        &mut self,
        txn: &mut RwTxn,
        catalog: &Catalog,
        inst: &OfferInstance,
        outcome: Outcome,
        at: i64,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        let k = state_key(&mut self.key, &inst.customer, &inst.offer).to_vec();
        let mut state = match self.dbs.offer_state.get(txn, &k)? {
            Some(b) => OfferState::from_bytes(b)?,
            None => OfferState::default(),
        };
        state.contact.record_outcome(outcome, at);
        self.dbs.offer_state.put(txn, &k, &state.to_bytes()?)?;
        if outcome == Outcome::Accepted {
            let ck = self.key.start(&inst.customer).finish(MAX_KEY).to_vec();
            let mut contact = match self.dbs.contacts.get(txn, &ck)? {
                Some(b) => CustomerContact::from_bytes(b)?,
                None => CustomerContact::default(),
            };
            contact.record_accept(at);
            self.dbs.contacts.put(txn, &ck, &contact.to_bytes()?)?;
        }
        if let Some(lesson) = Lesson::from_outcome(outcome, catalog.on_expiry) {
            let arm_ref = ArmRef {
                offer: &inst.offer,
                version: inst.version,
                segment: &inst.segment,
            };
            let arm = self.learner.learn(arm_ref, lesson);
            let ak = arm_key(&mut self.key2, &inst.offer, inst.version, &inst.segment);
            self.dbs.arms.put(txn, ak, &arm.to_bytes()?)?;
        }
        self.book
            .update(&inst.offer, inst.version, |c| c.record_outcome(outcome));
        self.tally.outcomes[outcome_index(outcome)] += 1;
        out.records
            .push((at, self.outcome_record(inst, outcome.as_str())));
        Ok(())
    }

    /// Escalates open instances of offers this event escalates: one
    /// customer's for a customer event, everyone's for a venue-wide one.
    fn escalate(
        &mut self,
        txn: &mut RwTxn,
        neighbours: Neighbours<'_>,
        catalog: &Catalog,
        scope: &cel::Context<'_, '_>,
        event: &Event,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        let offers = catalog.escalated_by(&event.kind);
        if offers.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = match event.subject.as_deref() {
            Some(customer) => {
                let prefix = self.key.start(customer).finish(MAX_KEY).to_vec();
                let mut ids = Vec::new();
                for entry in self.dbs.by_customer.prefix_iter(txn, &prefix)? {
                    let (k, ()) = entry?;
                    ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
                }
                ids
            }
            None => {
                let mut ids = Vec::new();
                for entry in self.dbs.expiry.iter(txn)? {
                    let (k, ()) = entry?;
                    if let Some((_, id)) = parse_expiry_key(k) {
                        ids.push(id);
                    }
                }
                ids
            }
        };
        // Profile and progress of each customer with an open instance.
        let mut readings: HashMap<String, CustomerView> = HashMap::new();
        for id in ids {
            let Some(bytes) = self.dbs.instances.get(txn, &id)? else {
                continue;
            };
            let mut inst = OfferInstance::from_bytes(bytes)?;
            if !inst.is_open(event.time_ms) {
                continue;
            }
            let Some(&i) = offers
                .iter()
                .find(|&&i| catalog.offers[i].offer.id == inst.offer)
            else {
                continue;
            };
            let c = &catalog.offers[i];
            let Some(step) = &c.offer.escalate else {
                continue;
            };
            if let Some(when) = &c.escalate_when {
                if !readings.contains_key(&inst.customer) {
                    let customer = &inst.customer;
                    let profile =
                        customers::load(neighbours.profiles, txn, &mut self.key, customer)?
                            .unwrap_or_default();
                    let progress =
                        progress_for(catalog, neighbours.progress, txn, customer, event.time_ms)?;
                    readings.insert(customer.clone(), (profile, progress));
                }
                let Some((profile, progress)) = readings.get(&inst.customer) else {
                    continue;
                };
                let cscope = expr::customer_scope(scope, profile, progress);
                match when.eval_bool(&cscope) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        self.expression_error(&c.offer.id, "escalate.when", &e);
                        continue;
                    }
                }
            }
            let mut payload = match inst.payload() {
                Ok(p) => p,
                Err(e) => {
                    self.log_error(&format!("instance {id}: stored payload unreadable: {e}"));
                    continue;
                }
            };
            match escalate(&mut payload, step) {
                Ok(changes) if changes.is_empty() => {}
                Ok(_) => {
                    inst.set_payload(&payload);
                    self.store_instance(txn, &inst)?;
                    self.tally.escalations += 1;
                    if let Some(p) = self.publication(&inst, "offer_updated") {
                        out.publications.push(p);
                    }
                }
                Err(e) => self.log_error(&format!("instance {id}: escalation refused: {e}")),
            }
        }
        Ok(())
    }

    /// Conversions: a configured event following a decision within its
    /// window counts for the decision's group (treated or control).
    fn convert(
        &mut self,
        txn: &mut RwTxn,
        catalog: &Catalog,
        scope: &cel::Context<'_, '_>,
        event: &Event,
        customer: &str,
        out: &mut Output,
    ) -> Result<(), NbaError> {
        for &i in catalog.converted_by(&event.kind) {
            let c = &catalog.offers[i];
            let Some(conv) = &c.offer.conversion else {
                continue;
            };
            let k = state_key(&mut self.key, customer, &c.offer.id).to_vec();
            let Some(bytes) = self.dbs.offer_state.get(txn, &k)? else {
                continue;
            };
            let mut state = OfferState::from_bytes(bytes)?;
            let Some(attribution) = state.attribution.as_mut() else {
                continue;
            };
            if let Some(when) = &c.conversion_when {
                match when.eval_bool(scope) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        self.expression_error(&c.offer.id, "conversion.when", &e);
                        continue;
                    }
                }
            }
            let Some(group) = attribution.convert(event.time_ms, millis(conv.window)) else {
                continue;
            };
            let instance = attribution.instance.clone();
            self.dbs.offer_state.put(txn, &k, &state.to_bytes()?)?;
            self.book
                .update(&c.offer.id, c.offer.version, |s| s.record_conversion(group));
            self.tally.outcomes[outcome_index(Outcome::Converted)] += 1;
            out.records.push((
                event.time_ms,
                RecordBody::OfferOutcome(OfferOutcome {
                    customer: self.pseudonymizer.pseudonym(customer),
                    offer: c.offer.id.clone(),
                    version: c.offer.version,
                    instance,
                    outcome: match group {
                        Group::Treated => "converted".to_owned(),
                        Group::Control => "converted_control".to_owned(),
                    },
                }),
            ));
        }
        Ok(())
    }

    fn store_instance(&mut self, txn: &mut RwTxn, inst: &OfferInstance) -> Result<(), NbaError> {
        super::append::put(self.dbs.instances, txn, &inst.id, &inst.to_bytes()?)?;
        Ok(())
    }

    fn outcome_record(&self, inst: &OfferInstance, outcome: &str) -> RecordBody {
        RecordBody::OfferOutcome(OfferOutcome {
            customer: self.pseudonymizer.pseudonym(&inst.customer),
            offer: inst.offer.clone(),
            version: inst.version,
            instance: inst.id.clone(),
            outcome: outcome.to_owned(),
        })
    }

    /// The app's message for a shown or updated instance. `id` is the
    /// instance (the app's dedup key) and `revision` orders updates.
    fn publication(&self, inst: &OfferInstance, kind: &str) -> Option<Publication> {
        let prefix = self.prefix.as_ref()?;
        Some(Publication {
            topic: format!("{prefix}/{}/offers", topic_level(&inst.customer)),
            payload: instance_message(inst, kind),
        })
    }

    fn bad_answer(&mut self, event: &Event, why: &str) {
        self.tally.bad_answers += 1;
        if let Some(suppressed) = self.answer_log.check() {
            warn!(
                event = %event.id,
                kind = %event.kind,
                reason = why,
                suppressed,
                "offer answer ignored"
            );
        }
    }

    fn expression_error(&mut self, offer: &str, field: &str, e: &expr::ExprError) {
        self.tally.expression_errors += 1;
        if let Some(suppressed) = self.error_log.check() {
            warn!(offer, field, error = %e, suppressed, "offer expression failed; the offer is skipped for this customer");
        }
    }

    fn log_error(&mut self, msg: &str) {
        if let Some(suppressed) = self.error_log.check() {
            warn!(error = msg, suppressed, "offer instance left unchanged");
        }
    }
}

/// An instance as the app sees it (MQTT payload and pull API).
/// [`instance_json`] as bytes, written without turning the stored
/// payload text into values and back: a fan-out writes one per fan.
fn instance_message(inst: &OfferInstance, kind: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Head<'a> {
        id: &'a str,
        kind: &'a str,
        revision: u32,
        customer: &'a str,
        offer: &'a str,
        version: u32,
        decided_ms: i64,
        expires_ms: i64,
    }
    let head = Head {
        id: &inst.id,
        kind,
        revision: inst.escalations,
        customer: &inst.customer,
        offer: &inst.offer,
        version: inst.version,
        decided_ms: inst.decided_ms,
        expires_ms: inst.expires_ms,
    };
    let mut out = Vec::with_capacity(256 + inst.payload.len());
    // Serializing plain fields into a Vec cannot fail; the object's
    // closing brace is replaced by the payload member.
    let _ = serde_json::to_writer(&mut out, &head);
    out.pop();
    out.extend_from_slice(b",\"payload\":");
    // The payload is text this daemon wrote; checked (without building
    // values) so a damaged record still gives valid JSON.
    if serde_json::from_str::<serde::de::IgnoredAny>(&inst.payload).is_ok() {
        out.extend_from_slice(inst.payload.as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
    out.push(b'}');
    out
}

pub fn instance_json(inst: &OfferInstance, kind: &str) -> Value {
    json!({
        "id": inst.id,
        "kind": kind,
        "revision": inst.escalations,
        "customer": inst.customer,
        "offer": inst.offer,
        "version": inst.version,
        "payload": inst.payload().map(Value::Object).unwrap_or(Value::Null),
        "decided_ms": inst.decided_ms,
        "expires_ms": inst.expires_ms,
    })
}

/// A customer's open instances at `now_ms`, oldest first.
pub(crate) fn open_instances(
    dbs: &NbaDbs,
    txn: &RoTxn<'_, heed::WithoutTls>,
    customer: &str,
    now_ms: i64,
) -> Result<Vec<OfferInstance>, NbaError> {
    let mut key = KeyBuf::default();
    let prefix = key.start(customer).finish(MAX_KEY).to_vec();
    let mut out = Vec::new();
    for entry in dbs.by_customer.prefix_iter(txn, &prefix)? {
        let (k, ()) = entry?;
        let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if let Some(bytes) = dbs.instances.get(txn, &id)? {
            let inst = OfferInstance::from_bytes(bytes)?;
            if inst.is_open(now_ms) {
                out.push(inst);
            }
        }
    }
    out.sort_by_key(|i| i.decided_ms);
    Ok(out)
}

fn read_u64(
    db: Database<Str, Bytes>,
    txn: &RoTxn<'_, heed::WithoutTls>,
    key: &str,
) -> heed::Result<Option<u64>> {
    Ok(db
        .get(txn, key)?
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes))
}

fn write_u64(db: Database<Str, Bytes>, txn: &mut RwTxn, key: &str, v: u64) -> heed::Result<()> {
    db.put(txn, key, &v.to_be_bytes())
}

fn first_expiry(
    db: Database<Bytes, Unit>,
    txn: &RoTxn<'_, heed::WithoutTls>,
) -> heed::Result<Option<i64>> {
    Ok(db
        .first(txn)?
        .and_then(|(k, ())| parse_expiry_key(k).map(|(at, _)| at)))
}

/// Expiry keys sort by time: the sign bit is flipped so negative times
/// (never expected) still sort first.
fn expiry_key(at_ms: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&((at_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn parse_expiry_key(k: &[u8]) -> Option<(i64, String)> {
    let (at, id) = k.split_at_checked(8)?;
    let at = u64::from_be_bytes(<[u8; 8]>::try_from(at).ok()?) ^ (1 << 63);
    Some((at as i64, String::from_utf8(id.to_vec()).ok()?))
}

fn state_key<'k>(key: &'k mut KeyBuf, customer: &str, offer: &str) -> &'k [u8] {
    key.start(customer).rest(offer).finish(MAX_KEY)
}

fn by_customer_key<'k>(key: &'k mut KeyBuf, customer: &str, id: &str) -> &'k [u8] {
    key.start(customer).rest(id).finish(MAX_KEY)
}

fn offer_version_key<'k>(key: &'k mut KeyBuf, offer: &str, version: u32) -> &'k [u8] {
    key.start(offer).u32(version).finish(MAX_KEY)
}

fn arm_key<'k>(key: &'k mut KeyBuf, offer: &str, version: u32, segment: &str) -> &'k [u8] {
    key.start(offer).u32(version).rest(segment).finish(MAX_KEY)
}

fn parse_offer_version(k: &[u8]) -> Option<(String, u32)> {
    let (offer, rest) = split_first(k)?;
    let v = u32::from_be_bytes(<[u8; 4]>::try_from(rest).ok()?);
    Some((offer.to_owned(), v))
}

fn parse_arm_key(k: &[u8]) -> Option<(String, u32, String)> {
    let (offer, rest) = split_first(k)?;
    let (v, segment) = rest.split_at_checked(4)?;
    let v = u32::from_be_bytes(<[u8; 4]>::try_from(v).ok()?);
    Some((
        offer.to_owned(),
        v,
        std::str::from_utf8(segment).ok()?.to_owned(),
    ))
}

/// FNV-1a, to mix the customer into the event's seed cheaply.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_the_instance_json() {
        let offers = edge_config::parse_offers(
            "[[offer]]\nid = \"jersey\"\non = [\"match.goal\"]\nvalue = 1.0\nconsent = \"marketing\"\nexpires_after = \"5m\"\n\
             payload = { title = 'Jersey \"10\"', discount = 10, tags = [\"a\"] }\n",
            std::path::Path::new("offers.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let offer = &offers[0];
        let mut inst = OfferInstance::open(
            offer,
            crate::nba::instance::payload_text(offer),
            "i-1".into(),
            "fan \"1\"",
            "all",
            "match.goal",
            1.0,
            5,
        );
        let parsed: Value = serde_json::from_slice(&instance_message(&inst, "offer"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, instance_json(&inst, "offer"));
        assert_eq!(parsed["payload"]["discount"], 10);
        inst.payload = "{damaged".into();
        let parsed: Value = serde_json::from_slice(&instance_message(&inst, "offer_updated"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed["payload"], Value::Null);
        assert_eq!(parsed["kind"], "offer_updated");
    }

    #[test]
    fn keys_round_trip_and_expiries_sort_by_time() {
        let mut k = KeyBuf::default();
        let arm = arm_key(&mut k, "team-a-jersey", 3, "gold").to_vec();
        assert_eq!(
            parse_arm_key(&arm),
            Some(("team-a-jersey".to_owned(), 3, "gold".to_owned()))
        );
        let ov = offer_version_key(&mut k, "x", 7).to_vec();
        assert_eq!(parse_offer_version(&ov), Some(("x".to_owned(), 7)));
        let a = expiry_key(1_000, "s.9");
        let b = expiry_key(2_000, "s.1");
        assert!(a < b);
        assert_eq!(parse_expiry_key(&b), Some((2_000, "s.1".to_owned())));
    }
}
