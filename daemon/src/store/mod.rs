//! The durable store: one LMDB environment per site holding dedup
//! expiry entries, rule state, the outbox and dead letters, and a second
//! one for the dedup keys ([`writeback`]).
//!
//! Everything that must survive a crash goes through here. Writes funnel
//! through one writer thread ([`writer`]) that applies events in group
//! commits and answers callers only after the commit holding their
//! effects; the second environment is written by a thread of its own,
//! from what the writer hands it. Reads of the outbox run on tokio's
//! blocking pool. The async side talks to the writer through
//! [`StoreHandle`], which is cheap to clone and never blocks a tokio
//! worker.
//!
//! Back-pressure: a submission takes one permit per event from a bounded
//! pool before it is queued and gives them back when answered, so ingest
//! waits (MQTT stops acking, HTTP waits) instead of piling work up in
//! memory.

mod append;
pub mod boards;
mod checkpoint;
mod codec;
pub(crate) mod committed;
pub mod customers;
mod dedup;
mod dlq;
mod engine_table;
mod env;
mod fanout;
mod hot;
mod journal;
mod journal_rules;
pub(crate) mod keys;
mod meta;
pub mod nba;
mod outbox;
mod presence;
pub mod publications;
pub(crate) mod ratelimit;
pub mod rewards;
mod rule_stats;
mod sorted;
mod stats;
mod writeback;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use edge_config::{RuleBundle, SiteConfig};
use heed::EnvFlags;
use tokio::sync::{oneshot, Notify, Semaphore};
use touchline_proto::Record;
use tracing::warn;

use crate::engine::{Engine, EngineError, EngineStats, Pseudonymizer};
use crate::event::{DeadLetter, Event, EventOutcome, SubmitError};
use env::{LmdbEnv, ReadDbs};
pub use outbox::{OutboxSummary, Rebase, RebaseCause};
pub use stats::{HistogramSnapshot, StoreStats};
use writer::{Command, Opened, Settings, Writer};

/// Source of "now" (ms since the Unix epoch) for the writer: dedup arrival
/// times and their expiry. Tests inject their own.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Stack of the writer thread: predicates are evaluated there and CEL's
/// interpreter recurses per nesting level.
const WRITER_STACK: usize = 16 * 1024 * 1024;

/// The writer thread's name, as the OS shows it (`top -H`, `/proc`), and
/// as the benchmarks find it to measure its CPU time apart.
pub const WRITER_THREAD: &str = "store-writer";

/// Dead-letter commands allowed in flight; more are dropped and counted.
const DLQ_IN_FLIGHT: usize = 64;

/// Events allowed queued or in progress, in units of `commit_max_events`.
const QUEUED_COMMITS: usize = 4;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store in {path}: {source}")]
    Open { path: PathBuf, source: heed::Error },
    #[error("the store in {path} is already open in this process")]
    AlreadyOpen { path: PathBuf },
    #[error(
        "the store in {path} belongs to site `{found}`, not `{expected}`; use another data_dir"
    )]
    SiteMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("the store in {path} is unreadable: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("cannot load rules: {0}")]
    Engine(#[from] EngineError),
    #[error("cannot load offers: {0}")]
    Offers(#[from] crate::nba::catalog::CompileError),
    #[error("cannot start the store writer thread: {0}")]
    Thread(std::io::Error),
    #[error("store read failed: {0}")]
    Read(String),
    #[error("store write failed: {0}")]
    Write(String),
    #[error("store is closed")]
    Closed,
}

/// Test and embedding hooks for [`Store::open_with`].
#[derive(Default, Clone)]
pub struct StoreOptions {
    /// Replaces the system clock (default: wall clock).
    pub clock: Option<Clock>,
    /// How often `RuleStats` records are queued (default one minute).
    pub rule_stats_interval: Option<std::time::Duration>,
    /// Fans a venue-wide fan-out decides per transaction (default
    /// 4,096; at least 1).
    pub fanout_chunk: Option<usize>,
    /// Stop as a crash would: no final checkpoint, so the next open
    /// replays the journal (`rule_state = "journal"`). For recovery tests.
    pub skip_final_checkpoint: bool,
}

/// Key file of the leaderboard pseudonyms, in the data directory.
pub const BOARD_KEY_FILE: &str = "leaderboard.key";

/// Opens stores; see [`Store::open`].
pub struct Store;

/// The writer thread; join it after [`StoreHandle::shutdown`] to be sure
/// the environment is closed (e.g. before opening it again).
pub struct WriterThread(JoinHandle<()>);

impl WriterThread {
    /// Waits for the writer to finish. `Err` only if it panicked.
    pub fn join(self) -> std::thread::Result<()> {
        self.0.join()
    }
}

struct Shared {
    tx: std::sync::mpsc::Sender<Command>,
    event_permits: Arc<Semaphore>,
    event_permit_cap: usize,
    dlq_permits: Arc<Semaphore>,
    /// Taken by the writer when it stops, so readers cannot keep the
    /// environment open after the store is shut down.
    env: Arc<Mutex<Option<LmdbEnv>>>,
    dbs: env::Dbs,
    stats: Arc<StoreStats>,
    /// Replaced with the engine on a rules reload.
    engine_stats: RwLock<Arc<EngineStats>>,
    /// The active rules (progress queries), replaced on a reload.
    rules: RwLock<Arc<RuleBundle>>,
    clock: Clock,
    /// Kept so a reload builds its engine with the same key.
    pseudonymizer: Pseudonymizer,
    /// Names customers on leaderboards who did not opt in (a site-local
    /// key of its own, so board names never match uplink pseudonyms).
    board_names: Pseudonymizer,
    notify: Arc<Notify>,
    published: Arc<Notify>,
    /// Next best action: counters, and what a reload compiles offers with.
    nba_stats: Arc<nba::NbaStats>,
    nba_policy: edge_config::NbaPolicy,
    site_id: String,
    /// `rule_state = "journal"`: progress is read through the writer.
    deferred_state: bool,
}

/// The async face of the store. Clone freely; all clones talk to the same
/// writer.
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
}

impl Store {
    /// Opens (creating if needed) the store in `site.data_dir`, loads the
    /// rules and starts the writer thread.
    pub fn open(
        site: &SiteConfig,
        rules: &RuleBundle,
    ) -> Result<(StoreHandle, WriterThread), StoreError> {
        Store::open_with(site, rules, StoreOptions::default())
    }

    pub fn open_with(
        site: &SiteConfig,
        rules: &RuleBundle,
        options: StoreOptions,
    ) -> Result<(StoreHandle, WriterThread), StoreError> {
        let dir = &site.site.data_dir;
        create_dir(dir)?;
        // Rules and key first: a bad rule file should fail before we touch
        // the environment.
        let pseudonymizer = Pseudonymizer::from_config(site).map_err(EngineError::from)?;
        let engine = Engine::new(rules, pseudonymizer.clone())?;
        let engine_stats = engine.stats();
        let catalog = crate::nba::catalog::Catalog::new(&rules.offers, &site.nba, &site.site.id)?;
        let board_key = crate::engine::pseudonym::load_or_create_key(&dir.join(BOARD_KEY_FILE))
            .map_err(EngineError::from)?;
        let board_names = Pseudonymizer::keyed(&board_key);

        let flags = env::sync_flags(site.store.sync);
        let env = env::open_env(dir, site.store.map_size, flags).map_err(|e| open_error(dir, e))?;
        let (dbs, meta) = prepare(&env, dir, &site.site.id)?;

        let stats = Arc::new(StoreStats::default());
        writer::publish_meta(&stats, &meta);
        let notify = Arc::new(Notify::new());
        let shared_env = Arc::new(Mutex::new(Some(env.clone())));
        let settings = Settings {
            site: site.site.id.clone(),
            config_source: site.source.clone(),
            commit_max_events: site.store.commit_max_events.max(1),
            commit_max_delay: site.store.commit_max_delay,
            dedup_retention_ms: i64::try_from(site.ingest.validation.dedup_retention.as_millis())
                .unwrap_or(i64::MAX),
            outbox_max_bytes: site.outbox.max_bytes,
            when_full: site.outbox.when_full,
            dlq_max: site.ingest.validation.dlq_max,
            map_size: site.store.map_size,
            feedback_prefix: site
                .ingest
                .mqtt
                .as_ref()
                .map(|_| format!("touchline/{}/customers", site.site.id)),
            rule_stats_interval: options
                .rule_stats_interval
                .unwrap_or(rule_stats::DEFAULT_INTERVAL),
            final_checkpoint: !options.skip_final_checkpoint,
            checkpoint: checkpoint::Policy::from_config(&site.store),
        };
        let published = Arc::new(Notify::new());
        let clock = options.clock.unwrap_or_else(|| Arc::new(wall_clock_ms));
        let nba_stats = Arc::new(nba::NbaStats::default());
        let nba = {
            let write_err = |e: heed::Error| open_error(dir, e);
            let mut txn = env.write_txn().map_err(write_err)?;
            let nba = nba::Nba::open(
                dbs.nba,
                &mut txn,
                catalog,
                &site.site.id,
                settings.feedback_prefix.clone(),
                pseudonymizer.clone(),
                nba_stats.clone(),
                clock(),
                &site.nba,
            )
            .map_err(|e| StoreError::Format {
                path: dir.to_owned(),
                detail: e.to_string(),
            })?;
            txn.commit().map_err(write_err)?;
            nba.with_fanout_chunk(options.fanout_chunk.unwrap_or(fanout::CHUNK))
                .with_presence_held(site.store.rule_state == edge_config::RuleStateMode::Journal)
        };
        // What an unclean stop in `journal` mode left in the journal is
        // replayed (with a throwaway engine, so the counters of this run
        // start clean) before any new event is applied. That holds in
        // `direct` mode too: a site switched to it after such a stop must
        // not lose the journaled state.
        let deferred = {
            let write_err = |e: heed::Error| open_error(dir, e);
            let txn = env.write_txn().map_err(write_err)?;
            let journal = journal::Journal::open(dbs.journal, &txn).map_err(write_err)?;
            drop(txn);
            let mut deferred = checkpoint::Deferred::new(journal);
            if deferred.journal.entries() > 0 {
                let replay_engine =
                    replay_engine(&env, &dbs, rules, &engine.pool_sizes(), &pseudonymizer)?;
                let replayed = std::thread::scope(|scope| {
                    std::thread::Builder::new()
                        .name("store-replay".into())
                        .stack_size(WRITER_STACK)
                        .spawn_scoped(scope, || {
                            checkpoint::replay(&env, &dbs, &mut deferred, replay_engine)
                        })
                        .map_err(StoreError::Thread)?
                        .join()
                        .map_err(|_| StoreError::Format {
                            path: dir.to_owned(),
                            detail: "journal replay panicked".into(),
                        })?
                        .map_err(|e| StoreError::Format {
                            path: dir.to_owned(),
                            detail: format!("journal replay failed: {e}"),
                        })
                })?;
                StoreStats::add(&stats.journal_replayed, replayed);
            }
            // The replay checkpointed: the journal's next entries are
            // applied with these rules.
            let recorded = journal_rules::JournalRules::of(rules, engine.pool_sizes());
            let write_err = |e: heed::Error| open_error(dir, e);
            let mut txn = env.write_txn().map_err(write_err)?;
            journal_rules::save(dbs.meta, &mut txn, recorded.as_ref()).map_err(write_err)?;
            txn.commit().map_err(write_err)?;
            // In direct mode nothing is held.
            (site.store.rule_state == edge_config::RuleStateMode::Journal).then_some(deferred)
        };
        // Dedup keys a run held when it stopped uncleanly are put back
        // before any event is checked against them.
        let dedup = {
            let write_err = |e: heed::Error| open_error(dir, e);
            let table = writeback::WriteBack::open(dir, site.store.map_size, flags)
                .map_err(|e| open_error(&dir.join(writeback::DIR), e))?;
            let mut txn = env.write_txn().map_err(write_err)?;
            let (dedup, restored) =
                dedup::Dedup::open(&dbs, &mut txn, table, stats.clone()).map_err(write_err)?;
            txn.commit().map_err(write_err)?;
            if restored > 0 {
                tracing::info!(restored, "dedup keys held before an unclean stop put back");
            }
            dedup
        };
        let event_permit_cap = settings
            .commit_max_events
            .saturating_mul(QUEUED_COMMITS)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let writer = Writer::new(
            Opened {
                env,
                dbs,
                meta,
                nba,
                deferred,
                dedup,
            },
            engine,
            settings,
            clock.clone(),
            stats.clone(),
            notify.clone(),
            published.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_env = shared_env.clone();
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .stack_size(WRITER_STACK)
            .spawn(move || writer.run(rx, thread_env))
            .map_err(StoreError::Thread)?;
        let handle = StoreHandle {
            shared: Arc::new(Shared {
                tx,
                event_permits: Arc::new(Semaphore::new(event_permit_cap)),
                event_permit_cap,
                dlq_permits: Arc::new(Semaphore::new(DLQ_IN_FLIGHT)),
                env: shared_env,
                dbs,
                stats,
                engine_stats: RwLock::new(engine_stats),
                rules: RwLock::new(Arc::new(rules.clone())),
                clock,
                pseudonymizer,
                board_names,
                notify,
                published,
                nba_stats,
                nba_policy: site.nba.clone(),
                site_id: site.site.id.clone(),
                deferred_state: site.store.rule_state == edge_config::RuleStateMode::Journal,
            }),
        };
        Ok((handle, WriterThread(thread)))
    }
}

impl StoreHandle {
    /// Applies `events` (dedup, rules, outbox) and returns one outcome per
    /// event, in order, only after the commit holding their effects. On
    /// `Err` nothing of the submission took effect.
    pub async fn submit(&self, events: Vec<Event>) -> Result<Vec<EventOutcome>, SubmitError> {
        self.submit_waiting(events, None).await
    }

    /// As [`StoreHandle::submit`], but refuses with
    /// [`SubmitError::Busy`] when the events cannot join the writer's
    /// queue within `wait` (nothing of them took effect then).
    pub async fn submit_within(
        &self,
        events: Vec<Event>,
        wait: std::time::Duration,
    ) -> Result<Vec<EventOutcome>, SubmitError> {
        self.submit_waiting(events, Some(wait)).await
    }

    async fn submit_waiting(
        &self,
        events: Vec<Event>,
        wait: Option<std::time::Duration>,
    ) -> Result<Vec<EventOutcome>, SubmitError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let want = events.len().min(self.shared.event_permit_cap);
        let acquire = self
            .shared
            .event_permits
            .clone()
            .acquire_many_owned(u32::try_from(want).unwrap_or(u32::MAX));
        let acquired = match wait {
            None => acquire.await,
            Some(wait) => tokio::time::timeout(wait, acquire)
                .await
                .map_err(|_| SubmitError::Busy)?,
        };
        let permit = acquired.map_err(|_| SubmitError::Closed)?;
        // The journal keeps each event's data as JSON text. Rendered here,
        // on the submitter's thread, the writer (one thread for the whole
        // store) only copies it.
        let data_text = if self.shared.deferred_state {
            journal::render_data(&events)
        } else {
            Vec::new()
        };
        let (reply, answer) = oneshot::channel();
        self.shared
            .tx
            .send(Command::Submit {
                events,
                data_text,
                reply,
                _permit: permit,
            })
            .map_err(|_| SubmitError::Closed)?;
        let reply = answer.await.map_err(|_| SubmitError::Closed)?;
        drop(reply.spent);
        reply.result
    }

    /// Keeps rejected-input samples, best effort: never waits for the
    /// commit, and drops (and counts) samples when the writer is busy.
    pub async fn dead_letter(&self, samples: Vec<DeadLetter>) {
        if samples.is_empty() {
            return;
        }
        let n = samples.len() as u64;
        let Ok(permit) = self.shared.dlq_permits.clone().try_acquire_owned() else {
            StoreStats::add(&self.shared.stats.dead_letters_dropped, n);
            return;
        };
        let sent = self.shared.tx.send(Command::DeadLetters {
            samples,
            _permit: permit,
        });
        if sent.is_err() {
            StoreStats::add(&self.shared.stats.dead_letters_dropped, n);
        }
    }

    /// Records with a sequence above `after`, in order, at most
    /// `max_records` and about `max_bytes` (at least one when any), plus
    /// the current `dropped_through`, all numbered as the central side
    /// numbers them (see [`Self::welcome`]). Runs on the blocking pool.
    pub async fn read_outbox(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, u64), StoreError> {
        let env = self.env()?;
        let dbs = self.shared.dbs;
        tokio::task::spawn_blocking(move || {
            let txn = env.read_txn().map_err(read_error)?;
            let meta = meta::load(dbs.meta, &txn)
                .map_err(|e| StoreError::Read(e.to_string()))?
                .unwrap_or_default();
            let mut records = outbox::read(
                dbs.outbox,
                &txn,
                meta.local_seq(after),
                max_records,
                max_bytes,
            )
            .map_err(|e| StoreError::Read(e.to_string()))?;
            for record in &mut records {
                record.seq = meta.central_seq(record.seq);
            }
            Ok((records, meta.central_dropped_through()))
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
    }

    /// Deletes every outbox record up to `through` (the central side made
    /// them durable; its numbering). Goes through the writer; works even
    /// when the map is full.
    pub async fn ack_outbox(&self, through: u64) -> Result<(), StoreError> {
        self.ask(|reply| Command::Ack { through, reply }).await
    }

    /// Takes a session's Welcome: the central side holds the site's
    /// records up to `central_mark`. Deletes them here, and renumbers this
    /// store's records after the mark when the mark is beyond anything
    /// this store sent (a new store under a known site id, or a restored
    /// one); returns the renumbering, if any. Goes through the writer.
    pub async fn welcome(&self, central_mark: u64) -> Result<Option<Rebase>, StoreError> {
        self.ask(|reply| Command::Welcome {
            central_mark,
            reply,
        })
        .await
    }

    /// Sends the writer the command `make` builds around a reply channel
    /// and waits for its answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.shared
            .tx
            .send(make(reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Notified after each commit that appended records. May wake once
    /// without new records; re-read the outbox to find out.
    pub fn outbox_changed(&self) -> Arc<Notify> {
        self.shared.notify.clone()
    }

    pub fn stats(&self) -> Arc<StoreStats> {
        self.shared.stats.clone()
    }

    /// Per-rule counters (matches, predicate errors, awards).
    pub fn engine_stats(&self) -> Arc<EngineStats> {
        let slot = self
            .shared
            .engine_stats
            .read()
            .unwrap_or_else(|p| p.into_inner());
        slot.clone()
    }

    /// Compiles `rules` and makes them the active rules between two
    /// commits. On `Err` (a rule that does not compile, or in `journal`
    /// mode held state that could not be written back first) the old
    /// rules and offers stay active. State is keyed by rule id and
    /// version, so the progress of unchanged rules carries over and a rule
    /// whose version changed starts fresh; the new rules' counters start
    /// at zero.
    pub async fn replace_rules(&self, rules: &RuleBundle) -> Result<(), StoreError> {
        // Compiling the predicates is CPU work: keep it off the workers.
        let bundle = rules.clone();
        let pseudonymizer = self.shared.pseudonymizer.clone();
        let (engine, recorded) = tokio::task::spawn_blocking(move || {
            let engine = Engine::new(&bundle, pseudonymizer)?;
            let recorded = journal_rules::JournalRules::of(&bundle, engine.pool_sizes());
            Ok::<_, StoreError>((engine, recorded))
        })
        .await
        .map_err(|e| StoreError::Write(format!("rule compilation aborted: {e}")))??;
        let stats = engine.stats();
        let offers = rules.offers.clone();
        let policy = self.shared.nba_policy.clone();
        let site_id = self.shared.site_id.clone();
        let catalog = tokio::task::spawn_blocking(move || {
            crate::nba::catalog::Catalog::new(&offers, &policy, &site_id)
        })
        .await
        .map_err(|e| StoreError::Write(format!("offer compilation aborted: {e}")))??;
        // The engine first: in `journal` mode it can be refused (its held
        // state must be written back before the rules change), and then
        // the offers must stay as they are too.
        self.ask(|reply| Command::ReplaceEngine {
            engine: Box::new(engine),
            recorded,
            reply,
        })
        .await?;
        let (reply, answer) = oneshot::channel();
        self.shared
            .tx
            .send(Command::ReplaceOffers {
                catalog: Box::new(catalog),
                policy: Box::new(self.shared.nba_policy.clone()),
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?;
        let mut slot = self
            .shared
            .engine_stats
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *slot = stats;
        drop(slot);
        let mut slot = self.shared.rules.write().unwrap_or_else(|p| p.into_inner());
        *slot = Arc::new(rules.clone());
        Ok(())
    }

    /// A customer's progress in every active rule, at the store's clock.
    pub async fn progress(
        &self,
        customer: &str,
    ) -> Result<Vec<crate::engine::progress::RuleView>, StoreError> {
        let rules = self
            .shared
            .rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let customer = customer.to_string();
        let now_ms = (self.shared.clock)();
        if self.shared.deferred_state {
            // The writer holds changes LMDB does not have yet.
            return self
                .ask(|reply| Command::Progress {
                    rules,
                    customer,
                    now_ms,
                    reply,
                })
                .await;
        }
        self.read(move |dbs, txn, _| {
            let snapshot = hot::Snapshot {
                txn,
                db: dbs.rule_state,
                hot: None,
            };
            crate::engine::progress::query(&rules, &snapshot, &customer, now_ms)
                .map_err(rewards::RewardError::from)
        })
        .await
    }

    /// Next-best-action counters (decisions, suppressions, outcomes).
    pub fn nba_stats(&self) -> Arc<nba::NbaStats> {
        self.shared.nba_stats.clone()
    }

    /// A customer's open offer instances (the app's pull channel), as the
    /// JSON the MQTT channel carries, oldest first.
    pub async fn open_offers(&self, customer: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let env = self.env()?;
        let dbs = self.shared.dbs;
        let customer = customer.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = env.read_txn().map_err(read_error)?;
            let open = nba::open_instances(&dbs.nba, &txn, &customer, wall_clock_ms())
                .map_err(|e| StoreError::Read(e.to_string()))?;
            Ok(open
                .iter()
                .map(|i| nba::instance_json(i, "offer"))
                .collect())
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
    }

    /// A customer's lifetime points and badges (empty when unknown).
    pub async fn rewards(&self, customer: &str) -> Result<boards::Rewards, StoreError> {
        let customer = customer.to_string();
        self.read(move |dbs, txn, _| boards::rewards_of(dbs, txn, &customer))
            .await
    }

    /// A leaderboard with privacy applied; see [`boards`].
    pub async fn leaderboard(
        &self,
        query: boards::BoardQuery,
    ) -> Result<boards::Board, StoreError> {
        self.read(move |dbs, txn, names| boards::board(dbs, txn, names, &query))
            .await
    }

    /// Runs `f` in a read transaction on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&env::Dbs, &heed::RoTxn, &Pseudonymizer) -> Result<T, rewards::RewardError>
            + Send
            + 'static,
    ) -> Result<T, StoreError> {
        let env = self.env()?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let txn = env.read_txn().map_err(read_error)?;
            f(&shared.dbs, &txn, &shared.board_names).map_err(|e| StoreError::Read(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
    }

    /// Up to `max` queued MQTT publications numbered above `after`.
    pub async fn read_publications(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, publications::Publication)>, StoreError> {
        let env = self.env()?;
        let db = self.shared.dbs.publications;
        tokio::task::spawn_blocking(move || {
            let txn = env.read_txn().map_err(read_error)?;
            publications::read(db, &txn, after, max).map_err(read_error)
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
    }

    /// Publications waiting for the broker now.
    pub async fn pending_publications(&self) -> Result<u64, StoreError> {
        let env = self.env()?;
        let db = self.shared.dbs.publications;
        tokio::task::spawn_blocking(move || {
            let txn = env.read_txn().map_err(read_error)?;
            publications::len(db, &txn).map_err(read_error)
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
    }

    /// Deletes every publication up to `through` (the broker acked them).
    pub async fn ack_publications(&self, through: u64) -> Result<(), StoreError> {
        self.ask(|reply| Command::AckPublished { through, reply })
            .await
    }

    /// Notified after commits that queued publications.
    pub fn publications_changed(&self) -> Arc<Notify> {
        self.shared.published.clone()
    }

    /// Outbox size, age and sequence numbers as committed now.
    pub async fn outbox_summary(&self) -> Result<OutboxSummary, StoreError> {
        let env = self.env()?;
        let dbs = self.shared.dbs;
        tokio::task::spawn_blocking(move || {
            let txn = env.read_txn().map_err(read_error)?;
            let meta = meta::load(dbs.meta, &txn)
                .map_err(|e| StoreError::Read(e.to_string()))?
                .unwrap_or_default();
            outbox::summary(Some(dbs.outbox), &txn, &meta)
                .map_err(|e| StoreError::Read(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
    }

    /// Stops taking submissions, lets the writer commit what is queued,
    /// and returns when it has. Join the [`WriterThread`] afterwards to wait
    /// for the environment to close.
    pub async fn shutdown(&self) {
        self.shared.event_permits.close();
        let (reply, answer) = oneshot::channel();
        if self.shared.tx.send(Command::Shutdown { reply }).is_ok() {
            let _ = answer.await;
        }
    }

    fn env(&self) -> Result<LmdbEnv, StoreError> {
        let slot = self.shared.env.lock().unwrap_or_else(|p| p.into_inner());
        slot.clone().ok_or(StoreError::Closed)
    }
}

/// The newest `limit` dead-letter samples (oldest first) of the store in
/// `data_dir`. Safe while the daemon runs (another process); an empty list
/// when no store exists there yet.
pub fn read_dead_letters(
    data_dir: &Path,
    map_size: usize,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let Some(env) = open_reader(data_dir, map_size)? else {
        return Ok(Vec::new());
    };
    let txn = env.read_txn().map_err(read_error)?;
    let dbs = ReadDbs::open(&env, &txn).map_err(read_error)?;
    match dbs.dead_letters {
        Some(db) => dlq::read(db, &txn, limit).map_err(read_error),
        None => Ok(Vec::new()),
    }
}

/// The outbox summary of the store in `data_dir`, from another process
/// (`None` when no store exists there yet).
pub fn read_outbox_summary(
    data_dir: &Path,
    map_size: usize,
) -> Result<Option<OutboxSummary>, StoreError> {
    let Some(env) = open_reader(data_dir, map_size)? else {
        return Ok(None);
    };
    let txn = env.read_txn().map_err(read_error)?;
    let dbs = ReadDbs::open(&env, &txn).map_err(read_error)?;
    let meta = match dbs.meta {
        Some(db) => meta::load(db, &txn)
            .map_err(|e| StoreError::Read(e.to_string()))?
            .unwrap_or_default(),
        None => meta::Meta::default(),
    };
    outbox::summary(dbs.outbox, &txn, &meta)
        .map(Some)
        .map_err(|e| StoreError::Read(e.to_string()))
}

fn open_reader(data_dir: &Path, map_size: usize) -> Result<Option<LmdbEnv>, StoreError> {
    if !data_dir.join("data.mdb").exists() {
        return Ok(None);
    }
    env::open_env(data_dir, map_size, EnvFlags::READ_ONLY)
        .map(Some)
        .map_err(|e| open_error(data_dir, e))
}

fn open_error(dir: &Path, e: heed::Error) -> StoreError {
    match e {
        heed::Error::EnvAlreadyOpened => StoreError::AlreadyOpen {
            path: dir.to_owned(),
        },
        source => StoreError::Open {
            path: dir.to_owned(),
            source,
        },
    }
}

/// The engine a replay applies the journal with: the rules recorded with
/// the journal when the rule files (or pools, or the time zone) changed
/// since, else `rules`. A store of a release that recorded nothing, or a
/// record that cannot be built again (a codes file gone), replays with
/// `rules`, saying so.
fn replay_engine(
    env: &LmdbEnv,
    dbs: &env::Dbs,
    rules: &RuleBundle,
    pools: &[(String, u64)],
    pseudonymizer: &Pseudonymizer,
) -> Result<Engine, StoreError> {
    let txn = env.read_txn().map_err(read_error)?;
    let recorded = journal_rules::load(dbs.meta, &txn).map_err(read_error)?;
    drop(txn);
    let current = || Engine::new(rules, pseudonymizer.clone());
    let fallback = |why: String| {
        warn!("{why}: the journal replays with the rule files as they are now");
        current()
    };
    let engine = match recorded {
        Ok(Some(recorded)) if recorded.matches(rules, pools) => current(),
        Ok(Some(recorded)) => {
            let rebuilt = recorded.bundle().and_then(|bundle| {
                Engine::new(&bundle, pseudonymizer.clone()).map_err(|e| e.to_string())
            });
            match rebuilt {
                Ok(mut engine) => {
                    engine.limit_pools(recorded.pool_sizes());
                    tracing::info!(
                        "the rule files changed since the journal was written: it replays with \
                         the rules it was applied with, and the new ones apply after it"
                    );
                    Ok(engine)
                }
                Err(e) => fallback(format!(
                    "the rules recorded with the journal cannot be built again ({e})"
                )),
            }
        }
        Ok(None) => current(),
        Err(why) => fallback(why),
    };
    Ok(engine?)
}

fn read_error(e: heed::Error) -> StoreError {
    StoreError::Read(e.to_string())
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// Creates the databases, checks the site and loads the counters.
fn prepare(env: &LmdbEnv, dir: &Path, site: &str) -> Result<(env::Dbs, meta::Meta), StoreError> {
    let write_err = |e: heed::Error| StoreError::Open {
        path: dir.to_owned(),
        source: e,
    };
    let mut txn = env.write_txn().map_err(write_err)?;
    let dbs = env::Dbs::create(env, &mut txn).map_err(write_err)?;
    match meta::site(dbs.meta, &txn).map_err(write_err)? {
        Some(found) if found != site => {
            return Err(StoreError::SiteMismatch {
                path: dir.to_owned(),
                found,
                expected: site.to_owned(),
            })
        }
        Some(_) => {}
        None => meta::set_site(dbs.meta, &mut txn, site).map_err(write_err)?,
    }
    let format_err = |e: meta::MetaError| StoreError::Format {
        path: dir.to_owned(),
        detail: e.to_string(),
    };
    let mut meta = meta::load(dbs.meta, &txn)
        .map_err(format_err)?
        .unwrap_or_default();
    // The counters are written in the same transactions as the outbox, so
    // this only trips on a store written by something else; recount then.
    let records = dbs.outbox.len(&txn).map_err(write_err)?;
    if records != meta.outbox_records {
        warn!(
            counted = records,
            recorded = meta.outbox_records,
            "outbox counters disagree with its contents; recounting"
        );
        let mut bytes = 0u64;
        let mut last = 0u64;
        for entry in dbs.outbox.iter(&txn).map_err(write_err)? {
            let (seq, value) = entry.map_err(write_err)?;
            bytes += value.len() as u64;
            last = seq;
        }
        meta.outbox_records = records;
        meta.outbox_bytes = bytes;
        meta.next_seq = meta.next_seq.max(last + 1);
    }
    meta.opened();
    meta::save(dbs.meta, &mut txn, &meta).map_err(write_err)?;
    txn.commit().map_err(write_err)?;
    Ok((dbs, meta))
}

fn wall_clock_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}
