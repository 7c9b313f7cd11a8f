//! Opening the LMDB environment and its named databases.
//!
//! This is the only place that touches `heed`'s unsafe open, so the reasons
//! it is sound are written down once, next to it.

use std::path::Path;

use edge_config::SyncMode;
use heed::types::{Bytes, Str, Unit};
use heed::{Database, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};

use super::codec::{BeU64, Postcard};
use crate::event::DeadLetter;

/// The environment type used everywhere: read transactions are not tied
/// to a thread, so they can run on tokio's blocking pool.
pub(crate) type LmdbEnv = heed::Env<WithoutTls>;

/// Named databases we create (21 so far) plus room for the ones later
/// features add without a migration of the env (LMDB fixes the count at
/// open).
const MAX_DBS: u32 = 48;

/// Map sizes are rounded up to this, a multiple of every page size LMDB
/// runs with on our targets (4 KiB, 16 KiB, 64 KiB).
const MAP_SIZE_GRANULE: usize = 64 * 1024;

pub(crate) const DB_META: &str = "meta";
pub(crate) const DB_DEDUP: &str = "dedup";
pub(crate) const DB_DEDUP_EXPIRY: &str = "dedup_expiry";
pub(crate) const DB_OUTBOX: &str = "outbox";
pub(crate) const DB_RULE_STATE: &str = "rule_state";
pub(crate) const DB_DEAD_LETTERS: &str = "dead_letters";
pub(crate) const DB_PROFILES: &str = "profiles";
pub(crate) const DB_LEDGERS: &str = "ledgers";
pub(crate) const DB_SCORES: &str = "scores";
pub(crate) const DB_RANKING: &str = "ranking";
pub(crate) const DB_PUBLICATIONS: &str = "publications";
pub(crate) const DB_JOURNAL: &str = "journal";

/// How each commit reaches the disk; see [`SyncMode`] for the faults each
/// mode survives.
///
/// - `Full` (no flags): every commit fsyncs data and meta pages. A commit
///   that returned survives a process crash, an OS crash and power loss.
/// - `NoMetaSync` (`MDB_NOMETASYNC`): the meta page is written but not
///   fsynced at commit. A process crash (`kill -9`) loses nothing; an OS
///   crash or power loss may undo the last commit(s), never corrupt.
/// - `None` (`MDB_NOSYNC`): no fsync at commit; the OS flushes when it
///   likes. A process crash loses nothing; an OS crash or power loss may
///   undo several recent commits.
pub(crate) fn sync_flags(mode: SyncMode) -> EnvFlags {
    match mode {
        SyncMode::Full => EnvFlags::empty(),
        SyncMode::NoMetaSync => EnvFlags::NO_META_SYNC,
        SyncMode::None => EnvFlags::NO_SYNC,
    }
}

fn round_map_size(map_size: usize) -> usize {
    let granules = map_size.div_ceil(MAP_SIZE_GRANULE).max(1);
    granules.saturating_mul(MAP_SIZE_GRANULE)
}

/// Opens (creating files when needed) the environment in `dir`.
///
/// `flags` may only be the sync flags of [`sync_flags`] and/or
/// `READ_ONLY`.
#[allow(unsafe_code)]
pub(crate) fn open_env(dir: &Path, map_size: usize, flags: EnvFlags) -> heed::Result<LmdbEnv> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(round_map_size(map_size)).max_dbs(MAX_DBS);
    // SAFETY: `flags` and `open` are unsafe because a memory map is undefined
    // behaviour if its file changes under it outside LMDB's locking, and
    // because NO_SYNC/NO_META_SYNC/NO_LOCK weaken guarantees. Here:
    // - the env for a data directory is opened once per process: the
    //   writer owns it for the daemon's lifetime, and `heed` itself refuses
    //   a second open of the same path in one process (EnvAlreadyOpened);
    // - other processes (`touchline dlq`, status) open the same path
    //   through LMDB's lock file, which is exactly what it coordinates;
    // - we never pass NO_LOCK or WRITE_MAP, and never write the data file
    //   other than through LMDB; NO_SYNC/NO_META_SYNC only trade
    //   durability on OS crash (documented on `sync_flags`), not memory
    //   safety.
    unsafe {
        options.flags(flags);
        options.open(dir)
    }
}

/// How far an environment's data has reached into its memory map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MapUsage {
    /// The map's size (`store.map_size`, rounded up).
    pub size: u64,
    /// Bytes up to the highest page any commit has used. LMDB reuses
    /// freed pages below that mark before it goes past it, so this is a
    /// high-water mark, not what the data takes now: the map is full only
    /// when a commit needs more pages than are free below the mark and
    /// left above it. Near the size, raise the map.
    pub used: u64,
}

impl MapUsage {
    /// `used` as a share of `size` (0 for an empty map).
    pub(crate) fn share(&self) -> f64 {
        if self.size == 0 {
            0.0
        } else {
            self.used as f64 / self.size as f64
        }
    }
}

/// `env`'s map usage as of its last commit. Reads two words of LMDB's
/// meta page: cheap enough for every writer turn.
pub(crate) fn map_usage(env: &LmdbEnv) -> MapUsage {
    let info = env.info();
    let page = u64::from(env.stat().page_size);
    MapUsage {
        size: info.map_size as u64,
        used: (info.last_page_number as u64)
            .saturating_add(1)
            .saturating_mul(page),
    }
}

/// Handles to every named database. `Database` is a plain id, so this is
/// `Copy` and shared between the writer and readers.
#[derive(Clone, Copy)]
pub(crate) struct Dbs {
    /// `meta`: string key → postcard value (see `meta.rs`).
    pub meta: Database<Str, Bytes>,
    /// `dedup`: dedup key → first-seen arrival time (ms).
    pub dedup: Database<Bytes, BeU64>,
    /// `dedup_expiry`: arrival time (8 bytes BE) ‖ number (8 bytes BE) →
    /// dedup key; entries written before the number existed are arrival
    /// time ‖ dedup key → empty (see `dedup.rs`).
    pub dedup_expiry: Database<Bytes, Bytes>,
    /// `outbox`: sequence (BE) → postcard `Record`.
    pub outbox: Database<BeU64, Bytes>,
    /// `rule_state`: state key → postcard rule state (engine-owned format).
    pub rule_state: Database<Bytes, Bytes>,
    /// `dead_letters`: insertion number (BE) → postcard `DeadLetter`.
    pub dead_letters: Database<BeU64, Postcard<DeadLetter>>,
    /// `profiles`: customer key → versioned JSON profile (see
    /// `customers.rs`).
    pub profiles: Database<Bytes, Bytes>,
    /// `ledgers`, `scores`, `ranking`: rewards and leaderboards (see
    /// `rewards.rs`).
    pub ledgers: Database<Bytes, Bytes>,
    pub scores: Database<Bytes, Bytes>,
    pub ranking: Database<Bytes, Unit>,
    /// `publications`: number (BE) → versioned postcard MQTT message
    /// waiting for its PUBACK (see `publications.rs`).
    pub publications: Database<BeU64, Bytes>,
    /// `journal`: sequence (BE) → an event the engine applied since the
    /// last checkpoint (see `journal.rs`).
    pub journal: Database<BeU64, Bytes>,
    /// Next best action: learner, contact state, offer instances and
    /// their timers, presence (see `nba.rs`).
    pub nba: super::nba::NbaDbs,
}

impl Dbs {
    /// Creates missing databases (writer side).
    pub(crate) fn create(env: &LmdbEnv, txn: &mut RwTxn) -> heed::Result<Dbs> {
        Ok(Dbs {
            meta: env.create_database(txn, Some(DB_META))?,
            dedup: env.create_database(txn, Some(DB_DEDUP))?,
            dedup_expiry: env.create_database(txn, Some(DB_DEDUP_EXPIRY))?,
            outbox: env.create_database(txn, Some(DB_OUTBOX))?,
            rule_state: env.create_database(txn, Some(DB_RULE_STATE))?,
            dead_letters: env.create_database(txn, Some(DB_DEAD_LETTERS))?,
            profiles: env.create_database(txn, Some(DB_PROFILES))?,
            ledgers: env.create_database(txn, Some(DB_LEDGERS))?,
            scores: env.create_database(txn, Some(DB_SCORES))?,
            ranking: env.create_database(txn, Some(DB_RANKING))?,
            publications: env.create_database(txn, Some(DB_PUBLICATIONS))?,
            journal: env.create_database(txn, Some(DB_JOURNAL))?,
            nba: super::nba::NbaDbs::create(env, txn)?,
        })
    }
}

/// Read-only handles for another process's store; any database may be
/// missing when the daemon never ran far enough to create it.
pub(crate) struct ReadDbs {
    pub meta: Option<Database<Str, Bytes>>,
    pub outbox: Option<Database<BeU64, Bytes>>,
    pub dead_letters: Option<Database<BeU64, Postcard<DeadLetter>>>,
}

impl ReadDbs {
    pub(crate) fn open(env: &LmdbEnv, txn: &RoTxn<WithoutTls>) -> heed::Result<ReadDbs> {
        Ok(ReadDbs {
            meta: env.open_database(txn, Some(DB_META))?,
            outbox: env.open_database(txn, Some(DB_OUTBOX))?,
            dead_letters: env.open_database(txn, Some(DB_DEAD_LETTERS))?,
        })
    }
}

/// True when LMDB refused a write because the map is full.
pub(crate) fn is_map_full(e: &heed::Error) -> bool {
    matches!(e, heed::Error::Mdb(heed::MdbError::MapFull))
}

/// For tests: an environment of `map_size` bytes in a temporary
/// directory, without fsync, holding one empty table `t`.
#[cfg(test)]
pub(crate) fn scratch_table(
    map_size: usize,
) -> (tempfile::TempDir, LmdbEnv, Database<Bytes, Bytes>) {
    let dir = tempfile::tempdir().unwrap();
    let env = open_env(dir.path(), map_size, sync_flags(SyncMode::None)).unwrap();
    let mut txn = env.write_txn().unwrap();
    let db = env.create_database(&mut txn, Some("t")).unwrap();
    txn.commit().unwrap();
    (dir, env, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_size_rounds_up_to_granule() {
        assert_eq!(round_map_size(0), MAP_SIZE_GRANULE);
        assert_eq!(round_map_size(1), MAP_SIZE_GRANULE);
        assert_eq!(round_map_size(MAP_SIZE_GRANULE), MAP_SIZE_GRANULE);
        assert_eq!(round_map_size(MAP_SIZE_GRANULE + 1), 2 * MAP_SIZE_GRANULE);
    }

    /// The usage follows the data up, stays at its high-water mark when
    /// the data goes (the freed pages are reused), and a commit that does
    /// not fit fails at the map's size.
    #[test]
    fn map_usage_is_a_high_water_mark_up_to_the_map_size() {
        let size = 4 * MAP_SIZE_GRANULE;
        let (_dir, env, db) = scratch_table(size);
        let empty = map_usage(&env);
        assert_eq!(empty.size, size as u64);
        assert!(empty.used > 0 && empty.used < empty.size / 4, "{empty:?}");

        let value = vec![7u8; 1000];
        let fill = |first: u32, n: u32| {
            let mut txn = env.write_txn().unwrap();
            for i in first..first + n {
                db.put(&mut txn, &i.to_be_bytes(), &value).unwrap();
            }
            txn.commit().unwrap();
        };
        fill(0, 100);
        let filled = map_usage(&env);
        assert!(
            filled.used >= empty.used + 100 * 1000,
            "{empty:?} → {filled:?}"
        );
        assert!(filled.share() > 0.3 && filled.share() <= 1.0);

        let mut txn = env.write_txn().unwrap();
        db.clear(&mut txn).unwrap();
        txn.commit().unwrap();
        assert!(map_usage(&env).used >= filled.used);

        // Past the map, the commit fails; the usage never passes the size.
        let mut txn = env.write_txn().unwrap();
        let mut full = false;
        for i in 0..1_000u32 {
            if let Err(e) = db.put(&mut txn, &i.to_be_bytes(), &value) {
                assert!(is_map_full(&e), "{e}");
                full = true;
                break;
            }
        }
        assert!(full, "a 256 KiB map took a megabyte");
        drop(txn);
        assert!(map_usage(&env).used <= size as u64);
    }
}
