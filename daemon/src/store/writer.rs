//! The writer thread: the only code that opens LMDB write transactions.
//!
//! LMDB allows one write transaction at a time and each commit costs one
//! or two fsyncs, so all writes funnel through one dedicated OS thread
//! (never a tokio worker) that groups commands into commits: it blocks for
//! the first command, takes what else is queued (waiting up to
//! `commit_max_delay` for more, by default not at all) up to
//! `commit_max_events`, applies them all in ONE transaction (dedup keys,
//! rule state or, in `journal` mode, the journal of applied events,
//! outbox records, acks, dead letters), commits, and only then answers
//! every waiter. A failed commit answers every submission with an error
//! and changes nothing, so nothing that was answered `Ok` is lost.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_config::WhenFull;
use heed::RwTxn;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};
use tracing::{error, info, warn};

use super::checkpoint::{Deferred, DeferredError, EngineTable, Policy, Schedule};
use super::customers::{self, Admission, CustomerDbs, CustomerError, ProfileCache};
use super::dedup::Dedup;
use super::engine_table::{LmdbTable, ProgressView};
use super::env::{self, is_map_full, Dbs, LmdbEnv};
use super::keys::KeyBuf;
use super::meta::{self, Meta};
use super::nba::{Drain, Nba, NbaError, Output as NbaOutput};
use super::outbox::{self, Outbox};
use super::publications::{self, Publication};
use super::ratelimit::LogLimiter;
use super::rewards::{self, RewardDbs, RewardError};
use super::rule_stats;
use super::stats::StoreStats;
use super::{dlq, Clock, StoreError};
use crate::engine::{ApplyError, Emitted, Engine, Output, ProgressNote};
use crate::event::{DeadLetter, Event, EventOutcome, SubmitError};
use touchline_proto::{CustomerErased, RecordBody};

/// How long the writer waits for work before sweeping expired dedup keys
/// on its own.
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Dedup keys swept per idle sweep.
const IDLE_SWEEP_BUDGET: usize = 4096;

/// Dedup keys swept per commit on top of two per event in it, so sweeping
/// keeps up with inserting.
const SWEEP_BASE_BUDGET: usize = 64;

/// How long the writer waits, when stopping, for in-flight readers to drop
/// their handles on the environment.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often the maps' usage is published.
const MAP_USAGE_INTERVAL: Duration = Duration::from_secs(1);
/// The share of a map past which the writer warns, at most every
/// [`MAP_WARN_INTERVAL`]: raising `store.map_size` takes a restart, so
/// an operator wants to hear well before commits fail.
const MAP_WARN_SHARE: f64 = 0.9;
const MAP_WARN_INTERVAL: Duration = Duration::from_secs(600);

/// A submission's answer, with its events handed back: the submitter
/// frees them on its own thread. Freeing each event's JSON data on the
/// writer was 2–3 % of the writer's time, and the writer is what bounds
/// the pipeline.
pub(crate) struct SubmitReply {
    pub result: Result<Vec<EventOutcome>, SubmitError>,
    pub spent: (Vec<Event>, Vec<String>),
}

/// Work for the writer. Permits travel with the command so back-pressure
/// covers work queued *and* work in progress.
pub(crate) enum Command {
    Submit {
        events: Vec<Event>,
        /// Each event's `data` as the journal stores it, rendered by the
        /// submitter; empty when the store keeps no journal (or an event
        /// past the end is rendered by the writer).
        data_text: Vec<String>,
        reply: oneshot::Sender<SubmitReply>,
        _permit: OwnedSemaphorePermit,
    },
    DeadLetters {
        samples: Vec<DeadLetter>,
        _permit: OwnedSemaphorePermit,
    },
    Ack {
        through: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A session's Welcome: the central side holds the site's records up
    /// to `central_mark` (see `outbox::welcome`).
    Welcome {
        central_mark: u64,
        reply: oneshot::Sender<Result<Option<outbox::Rebase>, StoreError>>,
    },
    /// The broker acknowledged every publication up to `through`.
    AckPublished {
        through: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Swaps the rules between two commits: every event before it was
    /// applied with the old rules, every event after with the new. In
    /// `journal` mode the held state is written back first; when that
    /// fails the old rules stay and the reply says why.
    ReplaceEngine {
        engine: Box<Engine>,
        /// The new rules as the journal records them.
        recorded: Option<super::journal_rules::JournalRules>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Swaps the offers (next best action) between two commits, after
    /// queueing the old offers' last statistics.
    ReplaceOffers {
        catalog: Box<crate::nba::catalog::Catalog>,
        policy: Box<edge_config::NbaPolicy>,
        reply: oneshot::Sender<()>,
    },
    /// A customer's progress as the engine sees it now, including
    /// changes not yet written back (`journal` mode).
    Progress {
        rules: Arc<edge_config::RuleBundle>,
        customer: String,
        now_ms: i64,
        reply: oneshot::Sender<Result<Vec<crate::engine::progress::RuleView>, StoreError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Command {
    fn events(&self) -> usize {
        match self {
            Command::Submit { events, .. } => events.len(),
            _ => 0,
        }
    }
}

/// What one command's part of a commit produced.
enum Answer {
    Submit(Result<Vec<EventOutcome>, SubmitError>),
    Ack(Result<(), StoreError>),
    Welcome(Result<Option<outbox::Rebase>, StoreError>),
    /// Dead letters and shutdown: nobody waits for a value.
    Done,
}

/// Effects of one committed transaction, published to the stats after the
/// commit.
#[derive(Default)]
struct Tally {
    events: u64,
    duplicates: u64,
    records: u64,
    acked: u64,
    dropped: u64,
    /// Erasure records drop-oldest appended again instead of dropping.
    erasures_kept: u64,
    refusals: u64,
    dead_letters: u64,
    swept: u64,
    /// Events of customers without gamification consent.
    not_tracked: u64,
    /// MQTT publications queued and acknowledged.
    publications: u64,
    published: u64,
    erasures: u64,
    dead_letters_erased: u64,
    publications_erased: u64,
    /// Checkpoints in the transaction (an erasure's, a due one) and the
    /// keys they wrote back.
    checkpoints: u64,
    checkpoint_keys: u64,
    /// From the transaction's start to its durable commit.
    duration: Duration,
}

impl Tally {
    /// A checkpoint in the transaction wrote back `keys` keys.
    fn checkpointed(&mut self, keys: usize) {
        self.checkpoints += 1;
        self.checkpoint_keys += keys as u64;
    }
}

/// Why a transaction did not commit.
enum GroupError {
    MapFull,
    Failed(String),
}

impl From<heed::Error> for GroupError {
    fn from(e: heed::Error) -> Self {
        if is_map_full(&e) {
            GroupError::MapFull
        } else {
            GroupError::Failed(e.to_string())
        }
    }
}

impl From<CustomerError> for GroupError {
    fn from(e: CustomerError) -> Self {
        match e {
            CustomerError::Lmdb(e) => e.into(),
            other => GroupError::Failed(other.to_string()),
        }
    }
}

impl From<RewardError> for GroupError {
    fn from(e: RewardError) -> Self {
        match e {
            RewardError::Lmdb(e) => e.into(),
            other => GroupError::Failed(other.to_string()),
        }
    }
}

/// Writes next best action's records and messages into the transaction
/// that produced them; a long fan-out drains into it as it goes.
struct NbaQueue<'w> {
    outbox: &'w mut Outbox,
    publications: &'w mut publications::Queue,
    dbs: &'w Dbs,
    site: &'w str,
    meta: &'w mut Meta,
    tally: &'w mut Tally,
    /// Outbox records appended so far.
    records: usize,
}

impl Drain for NbaQueue<'_> {
    fn drain(&mut self, txn: &mut RwTxn, out: &mut NbaOutput) -> heed::Result<()> {
        for (at_ms, body) in out.records.drain(..) {
            self.outbox
                .append(self.dbs, txn, self.meta, self.site, at_ms, body)?;
            self.records += 1;
        }
        for p in out.publications.drain(..) {
            self.publications.push(self.dbs.publications, txn, p)?;
            self.tally.publications += 1;
        }
        Ok(())
    }
}

impl From<NbaError> for GroupError {
    fn from(e: NbaError) -> Self {
        match e {
            NbaError::Lmdb(e) => e.into(),
            NbaError::Reward(RewardError::Lmdb(e)) => e.into(),
            NbaError::Customer(CustomerError::Lmdb(e)) => e.into(),
            NbaError::Job(super::fanout::JobError::Lmdb(e)) => e.into(),
            other => GroupError::Failed(other.to_string()),
        }
    }
}

impl From<DeferredError> for GroupError {
    fn from(e: DeferredError) -> Self {
        match e {
            DeferredError::Lmdb(e) => e.into(),
            DeferredError::Journal(super::journal::JournalError::Lmdb(e)) => e.into(),
            other => GroupError::Failed(other.to_string()),
        }
    }
}

impl From<ApplyError> for GroupError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Lmdb(e) => e.into(),
            other => GroupError::Failed(other.to_string()),
        }
    }
}

/// Writer settings taken from the site config.
pub(crate) struct Settings {
    pub site: String,
    pub config_source: PathBuf,
    pub commit_max_events: usize,
    pub commit_max_delay: Duration,
    pub dedup_retention_ms: i64,
    pub outbox_max_bytes: u64,
    pub when_full: WhenFull,
    pub dlq_max: usize,
    pub map_size: usize,
    /// `touchline/<site>/customers` when progress feedback is published
    /// (an MQTT broker is configured); `None` publishes nothing.
    pub feedback_prefix: Option<String>,
    /// How often `RuleStats` records are queued.
    pub rule_stats_interval: Duration,
    /// Whether a stop writes the deferred state back (false only in
    /// recovery tests, to stop as a crash would).
    pub final_checkpoint: bool,
    /// When what the writer holds in memory is written back.
    pub checkpoint: Policy,
}

pub(crate) struct Writer {
    env: LmdbEnv,
    dbs: Dbs,
    engine: Engine,
    /// The committed counters; a transaction works on a copy.
    meta: Meta,
    settings: Settings,
    clock: Clock,
    stats: Arc<StoreStats>,
    notify: Arc<Notify>,
    /// Woken after commits that queued publications.
    published_notify: Arc<Notify>,
    dedup: Dedup,
    outbox: Outbox,
    /// Awards and progress notes of the event being applied, reused
    /// between events.
    output: Output,
    key: KeyBuf,
    publications: publications::Queue,
    rule_stats: rule_stats::Reporter,
    map_full_log: LogLimiter,
    drop_log: LogLimiter,
    refuse_log: LogLimiter,
    error_log: LogLimiter,
    /// Next best action: offers decided in the event's transaction.
    nba: Nba,
    /// Profiles read or written, decoded (see `customers`).
    profiles: ProfileCache,
    /// `journal` mode: the engine's changes since the last checkpoint
    /// and their journal; `None` in `direct` mode.
    deferred: Option<Deferred>,
    /// When the deferred state, presence and dedup keys are written back.
    schedule: Schedule,
    /// When the maps' usage was last published.
    map_usage_noted: Option<Instant>,
    map_warn_log: LogLimiter,
    /// Whether the last [`Writer::apply`] wrote back what is held (it may
    /// have failed before it got that far).
    tried_write_back: bool,
    /// The rules a reload put in place, to record with the next commit
    /// (`None` inside: they cannot be recorded; see `journal_rules`).
    journal_rules: Option<Option<super::journal_rules::JournalRules>>,
}

/// The environment as `Store::open` prepared it.
pub(crate) struct Opened {
    pub env: LmdbEnv,
    pub dbs: Dbs,
    pub meta: Meta,
    pub nba: Nba,
    pub deferred: Option<Deferred>,
    pub dedup: Dedup,
}

impl Writer {
    pub(crate) fn new(
        opened: Opened,
        engine: Engine,
        settings: Settings,
        clock: Clock,
        stats: Arc<StoreStats>,
        notify: Arc<Notify>,
        published_notify: Arc<Notify>,
    ) -> Writer {
        let Opened {
            env,
            dbs,
            meta,
            nba,
            deferred,
            dedup,
        } = opened;
        let rule_stats = rule_stats::Reporter::new(settings.rule_stats_interval, clock());
        let schedule = Schedule::new(settings.checkpoint);
        Writer {
            env,
            dbs,
            engine,
            meta,
            settings,
            clock,
            stats,
            notify,
            published_notify,
            dedup,
            outbox: Outbox::default(),
            output: Output::default(),
            key: KeyBuf::default(),
            publications: publications::Queue::default(),
            rule_stats,
            map_full_log: LogLimiter::new(LOG_INTERVAL),
            drop_log: LogLimiter::new(LOG_INTERVAL),
            refuse_log: LogLimiter::new(LOG_INTERVAL),
            error_log: LogLimiter::new(LOG_INTERVAL),
            nba,
            profiles: ProfileCache::new(customers::PROFILE_CACHE_MAX),
            deferred,
            schedule,
            map_usage_noted: None,
            map_warn_log: LogLimiter::new(MAP_WARN_INTERVAL),
            tried_write_back: false,
            journal_rules: None,
        }
    }

    /// The thread body: runs until a shutdown command or until every handle
    /// is gone, then closes the environment.
    pub(crate) fn run(mut self, rx: Receiver<Command>, shared_env: Arc<Mutex<Option<LmdbEnv>>>) {
        let mut group = Vec::new();
        let mut stop = false;
        // A swap that arrived while a group was gathering; done right
        // after that group commits.
        let mut swap = None;
        while !stop {
            // The loop turns at least every IDLE_SWEEP_INTERVAL, so the
            // heartbeat stays fresh while idle and goes stale only when a
            // commit hangs.
            self.stats.beat();
            self.note_map_usage();
            self.report_rule_stats(false);
            self.nba_tick(false);
            if self.hold_due() {
                // A failure is logged; the journal keeps the state and the
                // next turn tries again.
                let _ = self.checkpoint("interval");
            }
            // A venue-wide fan-out goes on one chunk per turn, between
            // groups of other commands, which wait at most one chunk.
            let fanning_out = self.nba.fanout_pending() && self.nba_fanout();
            let first = match swap.take() {
                Some(cmd) => cmd,
                None if fanning_out => match rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(TryRecvError::Empty) => continue,
                    Err(TryRecvError::Disconnected) => break,
                },
                None => match rx.recv_timeout(IDLE_SWEEP_INTERVAL) {
                    Ok(cmd) => cmd,
                    Err(RecvTimeoutError::Timeout) => {
                        self.idle_sweep();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let first = match first {
                Command::Progress {
                    rules,
                    customer,
                    now_ms,
                    reply,
                } => {
                    let _ = reply.send(self.progress(&rules, &customer, now_ms));
                    continue;
                }
                other => other,
            };
            if let Command::ReplaceEngine {
                engine,
                recorded,
                reply,
            } = first
            {
                // A journal never spans two rule bundles: a replay must
                // apply each entry with the rules that applied it. So the
                // rules change only once the journal is empty. (In
                // `direct` mode nothing held depends on the rules.)
                let checkpointed = match self.deferred {
                    Some(_) => self.checkpoint("rule reload"),
                    None => Ok(()),
                };
                if let Err(e) = checkpointed {
                    let _ = reply.send(Err(StoreError::Write(format!(
                        "the state held since the last checkpoint could not be written back ({e}); \
                         a reload needs that first"
                    ))));
                    continue;
                }
                // The old rules' last counts go out under their versions.
                self.report_rule_stats(true);
                self.engine = *engine;
                // Written with the next commit: the first that can hold
                // journal entries made under these rules.
                self.journal_rules = Some(recorded);
                self.rule_stats.forget_counters();
                let _ = reply.send(Ok(()));
                continue;
            }
            if let Command::ReplaceOffers {
                catalog,
                policy,
                reply,
            } = first
            {
                // The old offers' counts go out under their versions.
                self.nba_tick(true);
                self.nba.replace_catalog(*catalog, &policy);
                let _ = reply.send(());
                continue;
            }
            let deadline = Instant::now() + self.settings.commit_max_delay;
            let mut events = first.events();
            stop = matches!(first, Command::Shutdown { .. });
            group.push(first);
            while !stop && events < self.settings.commit_max_events {
                // Past the deadline, still take what is already queued:
                // that costs no waiting and shares the commit.
                let next = match deadline.checked_duration_since(Instant::now()) {
                    Some(wait) if !wait.is_zero() => rx.recv_timeout(wait).ok(),
                    _ => rx.try_recv().ok(),
                };
                let Some(cmd) = next else { break };
                if matches!(
                    cmd,
                    Command::ReplaceEngine { .. }
                        | Command::ReplaceOffers { .. }
                        | Command::Progress { .. }
                ) {
                    swap = Some(cmd);
                    break;
                }
                events += cmd.events();
                stop = matches!(cmd, Command::Shutdown { .. });
                group.push(cmd);
            }
            self.process(&mut group);
        }
        // The current minute's offer statistics leave with this stop.
        self.nba_tick(true);
        // A clean stop leaves nothing to replay; a failed checkpoint is
        // logged, and the journal replays at the next start.
        if self.settings.final_checkpoint {
            let _ = self.checkpoint("shutdown");
        }
        // The dedup keys handed over last are written before the stop.
        self.dedup.close();
        // Later senders now fail at once and report `Closed`.
        drop(rx);
        let env = self.env.clone();
        drop(self);
        let mut slot = shared_env.lock().unwrap_or_else(|p| p.into_inner());
        slot.take();
        drop(slot);
        if !env.prepare_for_closing().wait_timeout(CLOSE_WAIT) {
            warn!("store environment still in use by readers after {CLOSE_WAIT:?}");
        }
        info!("store writer stopped");
    }

    /// Commits `group` (or as much of it as can commit) and answers every
    /// command in it.
    fn process(&mut self, group: &mut Vec<Command>) {
        let now_ms = (self.clock)();
        let mut answers: Vec<Option<Answer>> = group.iter().map(|_| None).collect();
        let all: Vec<usize> = (0..group.len()).collect();
        let mut first = self.apply(group, &all, now_ms, true);
        // Only `journal` mode writes pages for what it holds (the state,
        // presence); `direct` mode's write-back hands dedup keys over.
        let wrote_pages = self.tried_write_back && self.deferred.is_some();
        if wrote_pages && matches!(first, Err(GroupError::MapFull)) {
            // The write-back may be what does not fit: the group goes
            // again without it, and the write-back waits (see
            // `Schedule::failed`), so the acks that free space commit.
            self.write_back_failed("it did not fit with the events");
            first = self.apply(group, &all, now_ms, false);
        }
        match first {
            Ok(done) => self.record(done, &mut answers),
            Err(GroupError::MapFull) => {
                self.refuse_map_full(group, &all, &mut answers);
                // Acks only delete; they usually still fit and free space.
                let acks: Vec<usize> = all
                    .iter()
                    .copied()
                    .filter(|&i| {
                        matches!(
                            group[i],
                            Command::Ack { .. }
                                | Command::AckPublished { .. }
                                | Command::Welcome { .. }
                        )
                    })
                    .collect();
                if !acks.is_empty() {
                    match self.apply(group, &acks, now_ms, false) {
                        Ok(done) => self.record(done, &mut answers),
                        Err(e) => self.fail(group, &acks, &e, &mut answers),
                    }
                }
            }
            Err(GroupError::Failed(msg)) if group.len() > 1 => {
                // Isolate the command that fails so the others still commit.
                self.log_failure(&msg, group.len());
                for i in all {
                    match self.apply(group, &[i], now_ms, true) {
                        Ok(done) => self.record(done, &mut answers),
                        Err(GroupError::MapFull) => self.refuse_map_full(group, &[i], &mut answers),
                        Err(e) => self.fail(group, &[i], &e, &mut answers),
                    }
                }
            }
            Err(e) => {
                if let GroupError::Failed(msg) = &e {
                    self.log_failure(msg, 1);
                }
                self.fail(group, &all, &e, &mut answers);
            }
        }
        // What a failed transaction left in the deferred state is dropped
        // now, so reads between groups see only what committed.
        if let Some(d) = &mut self.deferred {
            d.begin();
        }
        for (cmd, answer) in group.drain(..).zip(answers) {
            match (cmd, answer) {
                (
                    Command::Submit {
                        reply,
                        events,
                        data_text,
                        ..
                    },
                    answer,
                ) => {
                    let result = match answer {
                        Some(Answer::Submit(result)) => result,
                        _ => Err(SubmitError::Storage("not applied".into())),
                    };
                    let spent = (events, data_text);
                    let _ = reply.send(SubmitReply { result, spent });
                }
                (Command::Ack { reply, .. }, Some(Answer::Ack(result)))
                | (Command::AckPublished { reply, .. }, Some(Answer::Ack(result))) => {
                    let _ = reply.send(result);
                }
                (Command::Ack { reply, .. }, _) | (Command::AckPublished { reply, .. }, _) => {
                    let _ = reply.send(Err(StoreError::Write("not applied".into())));
                }
                (Command::Welcome { reply, .. }, Some(Answer::Welcome(result))) => {
                    let _ = reply.send(result);
                }
                (Command::Welcome { reply, .. }, _) => {
                    let _ = reply.send(Err(StoreError::Write("not applied".into())));
                }
                (Command::ReplaceEngine { reply, .. }, _) => {
                    let _ = reply.send(Err(StoreError::Write("not applied".into())));
                }
                (Command::Shutdown { reply }, _) | (Command::ReplaceOffers { reply, .. }, _) => {
                    let _ = reply.send(());
                }
                (Command::Progress { reply, .. }, _) => {
                    let _ = reply.send(Err(StoreError::Write("not applied".into())));
                }
                (Command::DeadLetters { .. }, _) => {}
            }
        }
    }

    /// Applies the picked commands in one transaction and commits it.
    /// With `write_back`, what is held is written back in the same
    /// transaction when it is due.
    fn apply(
        &mut self,
        group: &[Command],
        pick: &[usize],
        now_ms: i64,
        write_back: bool,
    ) -> Result<(Vec<(usize, Answer)>, Tally), GroupError> {
        let started = Instant::now();
        let env = self.env.clone();
        let mut txn = env.write_txn()?;
        self.engine.begin();
        self.profiles.rollback();
        self.begin_held();
        self.tried_write_back = false;
        let mut meta = self.meta;
        let mut tally = Tally::default();
        let mut answers = Vec::with_capacity(pick.len());
        for &i in pick {
            let answer = match &group[i] {
                Command::Submit {
                    events, data_text, ..
                } => Answer::Submit(
                    self.submit(&mut txn, &mut meta, &mut tally, events, data_text, now_ms)?,
                ),
                Command::DeadLetters { samples, .. } => {
                    for sample in samples {
                        dlq::put(
                            &self.dbs,
                            &mut txn,
                            &mut meta,
                            sample,
                            self.settings.dlq_max,
                        )?;
                    }
                    tally.dead_letters += samples.len() as u64;
                    Answer::Done
                }
                Command::Ack { through, .. } => {
                    let local = meta.local_seq(*through);
                    tally.acked += outbox::ack(&self.dbs, &mut txn, &mut meta, local)?;
                    Answer::Ack(Ok(()))
                }
                Command::Welcome { central_mark, .. } => {
                    let (acked, rebase) =
                        outbox::welcome(&self.dbs, &mut txn, &mut meta, *central_mark)?;
                    tally.acked += acked;
                    Answer::Welcome(Ok(rebase))
                }
                Command::AckPublished { through, .. } => {
                    tally.published +=
                        publications::ack(self.dbs.publications, &mut txn, *through)?;
                    Answer::Ack(Ok(()))
                }
                Command::Shutdown { .. }
                | Command::ReplaceEngine { .. }
                | Command::ReplaceOffers { .. }
                | Command::Progress { .. } => Answer::Done,
            };
            answers.push((i, answer));
        }
        if self.settings.when_full == WhenFull::DropOldest {
            let max = self.settings.outbox_max_bytes;
            let dropped = self
                .outbox
                .drop_oldest(&self.dbs, &mut txn, &mut meta, max)?;
            if let Some(dropped) = dropped {
                tally.dropped = dropped.records;
                tally.erasures_kept = dropped.erasures_kept;
            }
        }
        let budget = 2 * (tally.events + tally.duplicates) as usize + SWEEP_BASE_BUDGET;
        let retention = self.settings.dedup_retention_ms;
        let (swept, _) = self
            .dedup
            .sweep(&self.dbs, &mut txn, now_ms, retention, budget)?;
        tally.swept = swept as u64;
        if meta != self.meta {
            meta::save(self.dbs.meta, &mut txn, &meta)?;
        }
        self.engine.flush(&mut EngineTable::new(
            &mut self.deferred,
            &mut txn,
            &self.dbs,
        ))?;
        self.tried_write_back = write_back && self.hold_due();
        if self.tried_write_back {
            if let Some(keys) = self.write_back_held(&mut txn)? {
                tally.checkpointed(keys);
            }
        }
        if let Some(recorded) = &self.journal_rules {
            super::journal_rules::save(self.dbs.meta, &mut txn, recorded.as_ref())?;
        }
        txn.commit()?;
        self.journal_rules = None;
        self.engine.committed();
        self.profiles.committed();
        self.commit_held();
        tally.duration = started.elapsed();
        self.meta = meta;
        Ok((answers, tally))
    }

    /// One submission's part of the transaction.
    fn submit(
        &mut self,
        txn: &mut RwTxn,
        meta: &mut Meta,
        tally: &mut Tally,
        events: &[Event],
        data_text: &[String],
        now_ms: i64,
    ) -> Result<Result<Vec<EventOutcome>, SubmitError>, GroupError> {
        let s = &self.settings;
        if s.when_full == WhenFull::Block && meta.outbox_bytes >= s.outbox_max_bytes {
            tally.refusals += 1;
            if let Some(suppressed) = self.refuse_log.check() {
                warn!(
                    outbox_bytes = meta.outbox_bytes,
                    max_bytes = s.outbox_max_bytes,
                    suppressed,
                    "outbox full (policy block): refusing events until the uplink catches up"
                );
            }
            return Ok(Err(SubmitError::OutboxFull));
        }
        let mut outcomes = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let retention = self.settings.dedup_retention_ms;
            let dup = self.dedup.check_and_insert(
                &self.dbs,
                txn,
                &event.source,
                &event.id,
                now_ms,
                retention,
            )?;
            if dup {
                tally.duplicates += 1;
                outcomes.push(EventOutcome::Duplicate);
                continue;
            }
            self.output.records.clear();
            self.output.progress.clear();
            let customer_dbs = CustomerDbs {
                profiles: self.dbs.profiles,
            };
            // Next best action runs after the engine, on tracked events.
            let mut nba_profile = None;
            match customers::admit(customer_dbs, txn, &mut self.key, &mut self.profiles, event)? {
                Admission::Track(profile) => {
                    self.engine.apply(
                        &mut EngineTable::new(&mut self.deferred, txn, &self.dbs),
                        event,
                        profile.as_deref().map(|p| p.map()),
                        now_ms,
                        &mut self.output,
                    )?;
                    if let Some(d) = &mut self.deferred {
                        d.journal(
                            txn,
                            now_ms,
                            event,
                            data_text.get(i).map(String::as_str),
                            profile.as_deref().map(|p| p.text()),
                        )?;
                    }
                    nba_profile = Some(profile);
                }
                Admission::NotTracked => tally.not_tracked += 1,
                Admission::Erased { customer } => {
                    // Their state and journaled events go to LMDB first,
                    // so the erasure below finds and deletes every trace
                    // in this commit (with the rest of what is held: one
                    // write-back writes all of it). The write-back empties
                    // the journal, so it must carry what earlier events of
                    // this commit changed site-wide (the watermark, the
                    // periods), which the engine otherwise writes only at
                    // the commit's end.
                    self.engine
                        .flush(&mut EngineTable::new(&mut self.deferred, txn, &self.dbs))?;
                    if let Some(keys) = self.write_back_held(txn)? {
                        tally.checkpointed(keys);
                    }
                    self.engine
                        .erase(&mut LmdbTable::new(txn, &self.dbs), &customer)?;
                    self.nba.erase(txn, &customer)?;
                    rewards::erase(self.reward_dbs(), txn, &customer)?;
                    tally.dead_letters_erased += dlq::erase_mentions(&self.dbs, txn, &customer)?;
                    if let Some(prefix) = &self.settings.feedback_prefix {
                        tally.publications_erased +=
                            publications::erase(self.dbs.publications, txn, prefix, &customer)?;
                    }
                    tally.erasures += 1;
                    self.output.records.push(Emitted {
                        at_ms: event.time_ms,
                        body: RecordBody::CustomerErased(CustomerErased {
                            customer: self.engine.pseudonymizer().pseudonym(&customer),
                        }),
                        customer: None,
                        voucher: None,
                    });
                }
            }
            for e in &self.output.records {
                let (RecordBody::AchievementAwarded(award), Some(customer)) =
                    (&e.body, &e.customer)
                else {
                    continue;
                };
                rewards::credit(
                    self.reward_dbs(),
                    txn,
                    customer,
                    award,
                    e.voucher.as_deref(),
                    e.at_ms,
                )?;
                if let Some(prefix) = &self.settings.feedback_prefix {
                    let publication = tier_reached(
                        prefix,
                        &self.settings.site,
                        customer,
                        award,
                        e.voucher.as_deref(),
                    );
                    self.publications
                        .push(self.dbs.publications, txn, publication)?;
                    tally.publications += 1;
                }
            }
            if let Some(prefix) = &self.settings.feedback_prefix {
                for note in &self.output.progress {
                    let publication = progress_crossed(prefix, &self.settings.site, note);
                    self.publications
                        .push(self.dbs.publications, txn, publication)?;
                    tally.publications += 1;
                }
            }
            let mut records = self.output.records.len();
            for e in self.output.records.drain(..) {
                self.outbox
                    .append(&self.dbs, txn, meta, &self.settings.site, e.at_ms, e.body)?;
            }
            // ---- next best action (see store/nba.rs) ----
            if let Some(profile) = nba_profile {
                let profile = profile.as_deref().map(|p| p.map());
                records += self.nba_event(txn, meta, tally, event, profile)?;
            }
            // ---- end of next best action ----
            tally.events += 1;
            tally.records += records as u64;
            outcomes.push(EventOutcome::Committed {
                records: u32::try_from(records).unwrap_or(u32::MAX),
            });
        }
        Ok(Ok(outcomes))
    }

    /// Writes what the writer holds back in a transaction of its own: the
    /// deferred engine state and presence (`journal` mode) and the dedup
    /// keys (either mode). `why` names the cause in the log. A failure
    /// keeps the state in memory and the journal as it was, so nothing
    /// is lost; the next due checkpoint tries again.
    fn checkpoint(&mut self, why: &str) -> heed::Result<()> {
        let held = self.deferred.as_ref().is_some_and(Deferred::pending)
            || self.nba.presence_held()
            || self.dedup.keys_to_write_back() > 0;
        if !held {
            return Ok(());
        }
        let env = self.env.clone();
        let mut write = || -> heed::Result<Option<usize>> {
            let mut txn = env.write_txn()?;
            self.begin_held();
            let keys = self.write_back_held(&mut txn)?;
            txn.commit()?;
            self.commit_held();
            Ok(keys)
        };
        match write() {
            Ok(keys) => {
                // In `direct` mode this wrote back dedup keys only: not a
                // checkpoint of the rules' state.
                if let Some(keys) = keys {
                    StoreStats::add(&self.stats.checkpoints, 1);
                    StoreStats::add(&self.stats.checkpoint_keys, keys as u64);
                    StoreStats::set(&self.stats.journal_entries, 0);
                }
                StoreStats::add(&self.stats.commits, 1);
                Ok(())
            }
            Err(e) => {
                self.begin_held();
                self.write_back_failed(&format!("{why}: {e}"));
                Err(e)
            }
        }
    }

    /// A write-back did not commit: counted as a storage error, logged,
    /// and put off (see `Schedule::failed`). What is held stays held,
    /// and in `journal` mode the journal keeps it durable.
    fn write_back_failed(&mut self, why: &str) {
        StoreStats::add(&self.stats.storage_errors, 1);
        let retry_in = self.schedule.failed();
        if let Some(suppressed) = self.error_log.check() {
            warn!(
                why,
                suppressed,
                retry_in_ms = retry_in.as_millis() as u64,
                "write-back of what the writer holds not committed; it stays held \
                 (in journal mode the journal keeps it) and is tried again later"
            );
        }
    }

    /// Whether what the writer holds in memory is due to be written
    /// back: the rules' state and the dedup keys count against one key
    /// bound (see `store.checkpoint_max_keys`).
    fn hold_due(&self) -> bool {
        let (keys, events) = self
            .deferred
            .as_ref()
            .map_or((0, 0), |d| (d.hot.keys(), d.journal.entries()));
        self.schedule
            .due(keys + self.dedup.keys_to_write_back(), events)
    }

    /// Writes back, in `txn`, everything the writer holds in memory: in
    /// `journal` mode the deferred engine state (a checkpoint, which
    /// empties the journal) and presence, in either mode the dedup keys.
    /// Returns the keys the checkpoint wrote; `None` in `direct` mode,
    /// which holds no rules' state.
    fn write_back_held(&mut self, txn: &mut RwTxn) -> heed::Result<Option<usize>> {
        let keys = match &mut self.deferred {
            Some(d) => {
                let keys = d.checkpoint(txn, &self.dbs)?;
                self.nba.write_back_presence(txn)?;
                Some(keys)
            }
            None => None,
        };
        self.dedup.write_back();
        self.schedule.wrote_back();
        Ok(keys)
    }

    /// Starts a transaction for what is held (every transaction that
    /// applies events, and a checkpoint's own); an unfinished one's
    /// changes are dropped.
    fn begin_held(&mut self) {
        if let Some(d) = &mut self.deferred {
            d.begin();
        }
        self.nba.begin();
        self.dedup.begin();
        self.schedule.begin();
    }

    /// The transaction begun by [`Writer::begin_held`] committed.
    fn commit_held(&mut self) {
        if let Some(d) = &mut self.deferred {
            d.commit();
        }
        self.nba.committed();
        self.dedup.commit();
        self.schedule.commit();
    }

    /// A customer's progress as of the last commit, unwritten changes
    /// included.
    fn progress(
        &self,
        rules: &edge_config::RuleBundle,
        customer: &str,
        now_ms: i64,
    ) -> Result<Vec<crate::engine::progress::RuleView>, StoreError> {
        let txn = self
            .env
            .read_txn()
            .map_err(|e| StoreError::Read(e.to_string()))?;
        let snapshot = super::hot::Snapshot {
            txn: &txn,
            db: self.dbs.rule_state,
            hot: self.deferred.as_ref().map(|d| &d.hot),
        };
        crate::engine::progress::query(rules, &snapshot, customer, now_ms)
            .map_err(|e| StoreError::Read(e.to_string()))
    }

    fn reward_dbs(&self) -> RewardDbs {
        RewardDbs {
            ledgers: self.dbs.ledgers,
            scores: self.dbs.scores,
            ranking: self.dbs.ranking,
        }
    }

    /// Publishes a committed transaction's effects and fills its answers.
    fn record(
        &mut self,
        (done, tally): (Vec<(usize, Answer)>, Tally),
        answers: &mut [Option<Answer>],
    ) {
        for (i, answer) in done {
            answers[i] = Some(answer);
        }
        let st = &self.stats;
        StoreStats::add(&st.events_committed, tally.events);
        StoreStats::add(&st.duplicates, tally.duplicates);
        StoreStats::add(&st.records_appended, tally.records);
        StoreStats::add(&st.records_acked, tally.acked);
        StoreStats::add(&st.records_dropped, tally.dropped);
        StoreStats::add(&st.outbox_full_refusals, tally.refusals);
        StoreStats::add(&st.dead_letters_stored, tally.dead_letters);
        StoreStats::add(&st.dedup_expired, tally.swept);
        StoreStats::add(&st.events_not_tracked, tally.not_tracked);
        StoreStats::add(&st.publications_queued, tally.publications);
        StoreStats::add(&st.publications_acked, tally.published);
        if tally.publications > 0 {
            self.published_notify.notify_one();
        }
        StoreStats::add(&st.erasures, tally.erasures);
        StoreStats::add(&st.checkpoints, tally.checkpoints);
        StoreStats::add(&st.checkpoint_keys, tally.checkpoint_keys);
        if let Some(d) = &self.deferred {
            StoreStats::set(&st.journal_entries, d.journal.entries());
        }
        StoreStats::add(&st.dead_letters_erased, tally.dead_letters_erased);
        StoreStats::add(&st.publications_erased, tally.publications_erased);
        StoreStats::add(&st.commits, 1);
        StoreStats::set(&st.last_commit_events, tally.events + tally.duplicates);
        st.commit_duration.observe_duration(tally.duration);
        if tally.events + tally.duplicates > 0 {
            st.commit_events.observe(tally.events + tally.duplicates);
        }
        publish_meta(st, &self.meta);
        if tally.dropped > 0 {
            if let Some(suppressed) = self.drop_log.check() {
                warn!(
                    dropped = tally.dropped,
                    erasure_records_kept = tally.erasures_kept,
                    dropped_through = self.meta.dropped_through,
                    total_dropped = st.records_dropped(),
                    suppressed,
                    "outbox over max_bytes (policy drop-oldest): dropped the oldest records"
                );
            }
        }
        if tally.records > 0 {
            // Wake a waiting uplink, and leave a permit for one that is
            // between reads (it may then wake once for nothing).
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
    }

    fn refuse_map_full(
        &mut self,
        group: &[Command],
        pick: &[usize],
        answers: &mut [Option<Answer>],
    ) {
        let mut events = 0u64;
        for &i in pick {
            match &group[i] {
                Command::Submit { events: evs, .. } => {
                    events += evs.len() as u64;
                    answers[i] = Some(Answer::Submit(Err(SubmitError::StoreFull)));
                }
                Command::DeadLetters { samples, .. } => {
                    StoreStats::add(&self.stats.dead_letters_dropped, samples.len() as u64);
                }
                Command::Ack { .. }
                | Command::AckPublished { .. }
                | Command::Welcome { .. }
                | Command::Shutdown { .. }
                | Command::ReplaceEngine { .. }
                | Command::ReplaceOffers { .. }
                | Command::Progress { .. } => {}
            }
        }
        StoreStats::add(&self.stats.map_full_events, events);
        if let Some(suppressed) = self.map_full_log.check() {
            error!(
                map_size = self.settings.map_size,
                config = %self.settings.config_source.display(),
                refused_events = events,
                suppressed,
                "LMDB map is full: raise store.map_size; events are refused (back-pressure) until space frees up"
            );
        }
    }

    fn fail(
        &mut self,
        group: &[Command],
        pick: &[usize],
        e: &GroupError,
        answers: &mut [Option<Answer>],
    ) {
        let msg = match e {
            GroupError::MapFull => "store map is full: raise store.map_size".to_string(),
            GroupError::Failed(msg) => msg.clone(),
        };
        StoreStats::add(&self.stats.storage_errors, 1);
        for &i in pick {
            answers[i] = match &group[i] {
                Command::Submit { .. } => Some(Answer::Submit(Err(match e {
                    GroupError::MapFull => SubmitError::StoreFull,
                    GroupError::Failed(_) => SubmitError::Storage(msg.clone()),
                }))),
                Command::Ack { .. } | Command::AckPublished { .. } => {
                    Some(Answer::Ack(Err(StoreError::Write(msg.clone()))))
                }
                Command::Welcome { .. } => {
                    Some(Answer::Welcome(Err(StoreError::Write(msg.clone()))))
                }
                Command::DeadLetters { samples, .. } => {
                    StoreStats::add(&self.stats.dead_letters_dropped, samples.len() as u64);
                    Some(Answer::Done)
                }
                Command::Shutdown { .. }
                | Command::ReplaceEngine { .. }
                | Command::ReplaceOffers { .. }
                | Command::Progress { .. } => Some(Answer::Done),
            };
        }
    }

    fn log_failure(&mut self, msg: &str, commands: usize) {
        if let Some(suppressed) = self.error_log.check() {
            error!(error = %msg, commands, suppressed, "store write failed");
        }
    }

    /// Sweeps expired dedup keys while no work arrives.
    /// Appends the `RuleStats` records of the interval when it is over
    /// (or now, with `force`) in a transaction of their own.
    fn report_rule_stats(&mut self, force: bool) {
        let now_ms = (self.clock)();
        if !force && !self.rule_stats.due(now_ms) {
            return;
        }
        let report = self.rule_stats.collect(&self.engine.stats(), now_ms);
        if report.records.is_empty() {
            self.rule_stats.reported(report);
            return;
        }
        let site = self.settings.site.clone();
        let result = (|| -> heed::Result<Meta> {
            let env = self.env.clone();
            let mut txn = env.write_txn()?;
            let mut meta = self.meta;
            for body in &report.records {
                self.outbox.append(
                    &self.dbs,
                    &mut txn,
                    &mut meta,
                    &site,
                    report.to_ms,
                    body.clone(),
                )?;
            }
            meta::save(self.dbs.meta, &mut txn, &meta)?;
            txn.commit()?;
            Ok(meta)
        })();
        match result {
            Ok(meta) => {
                StoreStats::add(&self.stats.records_appended, report.records.len() as u64);
                StoreStats::add(&self.stats.commits, 1);
                self.meta = meta;
                publish_meta(&self.stats, &self.meta);
                self.notify.notify_one();
                self.rule_stats.reported(report);
            }
            Err(e) => {
                if let Some(suppressed) = self.error_log.check() {
                    warn!(error = %e, suppressed, "cannot queue rule statistics; the counts go out with the next report");
                }
            }
        }
    }

    /// Publishes how full both environments' maps are, and warns when
    /// either is past [`MAP_WARN_SHARE`].
    fn note_map_usage(&mut self) {
        if self
            .map_usage_noted
            .is_some_and(|at| at.elapsed() < MAP_USAGE_INTERVAL)
        {
            return;
        }
        self.map_usage_noted = Some(Instant::now());
        let store = env::map_usage(&self.env);
        let writeback = self.dedup.map_usage();
        self.stats.set_map_usage(store, writeback);
        for (environment, usage) in [("store", Some(store)), ("writeback", writeback)] {
            let Some(usage) = usage.filter(|u| u.share() >= MAP_WARN_SHARE) else {
                continue;
            };
            if self.map_warn_log.check().is_some() {
                warn!(
                    environment,
                    used_bytes = usage.used,
                    map_size_bytes = usage.size,
                    "the LMDB map is {:.0} % used (its high-water mark): raise store.map_size \
                     before commits fail",
                    usage.share() * 100.0
                );
            }
        }
    }

    fn idle_sweep(&mut self) {
        let now_ms = (self.clock)();
        let retention = self.settings.dedup_retention_ms;
        let result = (|| -> heed::Result<u64> {
            let env = self.env.clone();
            let mut txn = env.write_txn()?;
            self.dedup.begin();
            let (swept, _) =
                self.dedup
                    .sweep(&self.dbs, &mut txn, now_ms, retention, IDLE_SWEEP_BUDGET)?;
            if swept > 0 || self.dedup.sweep_wrote() {
                txn.commit()?;
                self.dedup.commit();
            }
            Ok(swept as u64)
        })();
        match result {
            Ok(swept) if swept > 0 => {
                StoreStats::add(&self.stats.dedup_expired, swept);
                StoreStats::add(&self.stats.commits, 1);
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(suppressed) = self.error_log.check() {
                    warn!(error = %e, suppressed, "dedup expiry sweep failed; will retry");
                }
            }
        }
    }
}

/// Next best action's part of the writer: running it for an event in the
/// event's transaction, and its timers in transactions of their own.
impl Writer {
    /// Decisions, answers, escalations for one tracked event; returns the
    /// outbox records it appended.
    fn nba_event(
        &mut self,
        txn: &mut RwTxn,
        meta: &mut Meta,
        tally: &mut Tally,
        event: &Event,
        profile: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<usize, GroupError> {
        let mut out = super::nba::Output::default();
        let (nba, mut queue, neighbours) = self.nba_queue(meta, tally);
        nba.on_event(txn, neighbours, event, profile, &mut out, &mut queue)?;
        queue.drain(txn, &mut out)?;
        Ok(queue.records)
    }

    /// Next best action, where its output goes (the outbox and the
    /// publication queue, in the same transaction) and the other stages'
    /// tables it reads.
    fn nba_queue<'w>(
        &'w mut self,
        meta: &'w mut Meta,
        tally: &'w mut Tally,
    ) -> (&'w mut Nba, NbaQueue<'w>, super::nba::Neighbours<'w>) {
        let neighbours = super::nba::Neighbours {
            profiles: self.dbs.profiles,
            rewards: self.reward_dbs(),
            progress: ProgressView::new(
                &self.engine,
                &self.dbs,
                self.deferred.as_ref().map(|d| &d.hot),
            ),
        };
        let queue = NbaQueue {
            outbox: &mut self.outbox,
            publications: &mut self.publications,
            dbs: &self.dbs,
            site: &self.settings.site,
            meta,
            tally,
            records: 0,
        };
        (&mut self.nba, queue, neighbours)
    }

    /// Expires due offer instances and queues offer statistics when their
    /// interval is over (or now, with `force`), in one transaction. A
    /// failure leaves the timers in place for the next turn.
    fn nba_tick(&mut self, force: bool) {
        let now_ms = (self.clock)();
        if !force && !self.nba.due(now_ms) {
            return;
        }
        self.nba_transaction("offer timers or statistics", |nba, txn, _, out, _| {
            nba.tick(txn, now_ms, out)?;
            if force {
                nba.close_stats(txn, now_ms, out)?;
            }
            Ok(())
        });
    }

    /// Decides the next chunk of an unfinished venue-wide fan-out in a
    /// transaction of its own. Returns false when it failed: the job
    /// stays, and the writer waits for its next turn as when idle rather
    /// than retrying at once.
    fn nba_fanout(&mut self) -> bool {
        self.nba_transaction(
            "venue-wide fan-out chunk",
            |nba, txn, neighbours, out, drain| nba.continue_fanout(txn, neighbours, out, drain),
        )
    }

    /// Runs next-best-action work that no command carries (timers, a
    /// fan-out's later chunks) in a transaction of its own, with its
    /// output queued in the same transaction. Returns whether it
    /// committed; a failure is logged (`what` names the work) and leaves
    /// the stored state as it was.
    fn nba_transaction(
        &mut self,
        what: &str,
        work: impl FnOnce(
            &mut Nba,
            &mut RwTxn,
            super::nba::Neighbours<'_>,
            &mut NbaOutput,
            &mut dyn Drain,
        ) -> Result<(), NbaError>,
    ) -> bool {
        let result = (|| -> Result<(Meta, Tally), GroupError> {
            let env = self.env.clone();
            let mut txn = env.write_txn()?;
            self.nba.begin();
            let mut meta = self.meta;
            let mut tally = Tally::default();
            let mut out = NbaOutput::default();
            let (nba, mut queue, neighbours) = self.nba_queue(&mut meta, &mut tally);
            work(nba, &mut txn, neighbours, &mut out, &mut queue)?;
            queue.drain(&mut txn, &mut out)?;
            tally.records = queue.records as u64;
            if meta != self.meta {
                meta::save(self.dbs.meta, &mut txn, &meta)?;
            }
            txn.commit()?;
            self.nba.committed();
            Ok((meta, tally))
        })();
        match result {
            Ok((meta, tally)) => {
                self.meta = meta;
                StoreStats::add(&self.stats.records_appended, tally.records);
                StoreStats::add(&self.stats.publications_queued, tally.publications);
                StoreStats::add(&self.stats.commits, 1);
                publish_meta(&self.stats, &self.meta);
                if tally.publications > 0 {
                    self.published_notify.notify_one();
                }
                if tally.records > 0 {
                    self.notify.notify_waiters();
                    self.notify.notify_one();
                }
                true
            }
            Err(e) => {
                let msg = match e {
                    GroupError::MapFull => "store map is full".to_owned(),
                    GroupError::Failed(m) => m,
                };
                if let Some(suppressed) = self.error_log.check() {
                    warn!(error = %msg, suppressed, "{what} not committed; will retry");
                }
                false
            }
        }
    }
}

/// Mirrors the persisted counters into the stats.
pub(crate) fn publish_meta(st: &StoreStats, meta: &Meta) {
    StoreStats::set(&st.outbox_records, meta.outbox_records);
    StoreStats::set(&st.outbox_bytes, meta.outbox_bytes);
    StoreStats::set(&st.next_seq, meta.central_seq(meta.next_seq));
    StoreStats::set(&st.dropped_through, meta.central_dropped_through());
}

/// The progress message for a reached tier. `id` names the award (rule,
/// version, window instance, tier, customer), which is awarded once, so
/// it is the app's key for dropping a redelivered copy.
fn tier_reached(
    prefix: &str,
    site: &str,
    customer: &str,
    award: &touchline_proto::AchievementAwarded,
    voucher: Option<&str>,
) -> Publication {
    let points: serde_json::Map<String, serde_json::Value> = award
        .points
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
        .collect();
    let payload = serde_json::json!({
        "id": format!("{site}:{}@{}:{}:{}:{customer}", award.achievement, award.version, award.window, award.tier),
        "kind": "tier_reached",
        "customer": customer,
        "achievement": award.achievement,
        "version": award.version,
        "window": award.window,
        "tier": award.tier,
        "badge": award.badge,
        "points": points,
        "voucher": voucher,
        "value": award.value,
    });
    Publication {
        topic: format!("{prefix}/{}/progress", publications::topic_level(customer)),
        payload: json_bytes(&payload),
    }
}

/// A JSON value as message bytes. `to_vec` writes straight into the
/// buffer (`Value`'s `Display` goes through the formatting machinery,
/// several times slower); serialising a `Value` into memory cannot fail.
fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// The MQTT message telling a fan they are 25, 50 or 75 % of the way to
/// their next tier.
fn progress_crossed(prefix: &str, site: &str, note: &ProgressNote) -> Publication {
    let window = note.window.text();
    let payload = serde_json::json!({
        "id": format!("{site}:{}@{}:{window}:{}%{}:{}", note.rule, note.version, note.percent, note.next_at, note.customer),
        "kind": "progress",
        "customer": &*note.customer,
        "achievement": &*note.rule,
        "version": note.version,
        "window": &*window,
        "percent": note.percent,
        "value": note.value,
        "next_at": note.next_at,
    });
    Publication {
        topic: format!(
            "{prefix}/{}/progress",
            publications::topic_level(&note.customer)
        ),
        payload: json_bytes(&payload),
    }
}
