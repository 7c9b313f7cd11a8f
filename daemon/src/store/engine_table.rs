//! The engine's state table inside the writer's LMDB transaction.
//!
//! The engine reads and writes its state through [`StateTable`]; here that
//! table is the `rule_state` database in the transaction that also holds
//! the event's dedup key and the records the event causes, so they commit
//! or roll back together. Offers read customers' progress from the same
//! state through [`ProgressView`].

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn};

use super::customers;
use super::env::Dbs;
use super::hot::{read_through, HotState};
use super::keys::KeyBuf;
use crate::engine::record;
use crate::engine::table::{Entry, Profile, StateTable};
use crate::engine::{ApplyError, Engine};

/// The state and profile databases inside the writer's transaction.
pub(crate) struct LmdbTable<'t, 'e> {
    txn: &'t mut RwTxn<'e>,
    state: Database<Bytes, Bytes>,
    profiles: Database<Bytes, Bytes>,
    key: KeyBuf,
}

impl<'t, 'e> LmdbTable<'t, 'e> {
    pub(crate) fn new(txn: &'t mut RwTxn<'e>, dbs: &Dbs) -> Self {
        LmdbTable {
            txn,
            state: dbs.rule_state,
            profiles: dbs.profiles,
            key: KeyBuf::default(),
        }
    }
}

impl StateTable for LmdbTable<'_, '_> {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, heed::Error> {
        self.state.get(self.txn, key)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), heed::Error> {
        self.state.put(self.txn, key, value)
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), heed::Error> {
        self.state.delete(self.txn, key).map(|_| ())
    }

    fn prefixed(&self, prefix: &[u8]) -> Result<Vec<Entry>, heed::Error> {
        let mut entries = Vec::new();
        for entry in self.state.prefix_iter(self.txn, prefix)? {
            let (k, v) = entry?;
            entries.push((k.to_vec(), v.to_vec()));
        }
        Ok(entries)
    }

    fn profile(&mut self, customer: &str) -> Result<Option<Profile>, ApplyError> {
        customers::load(self.profiles, self.txn, &mut self.key, customer)
            .map_err(|e| ApplyError::Customer(e.to_string()))
    }
}

/// A customer's achievement progress, as offer expressions read it, from
/// the engine's state in the writer's transaction.
#[derive(Clone, Copy)]
pub(crate) struct ProgressView<'a> {
    engine: &'a Engine,
    states: Database<Bytes, Bytes>,
    /// The engine's changes not yet written back (`journal` mode).
    hot: Option<&'a HotState>,
}

impl<'a> ProgressView<'a> {
    pub(crate) fn new(engine: &'a Engine, dbs: &Dbs, hot: Option<&'a HotState>) -> Self {
        ProgressView {
            engine,
            states: dbs.rule_state,
            hot,
        }
    }

    /// Rule id → value in the instance `time_ms` falls in.
    pub(crate) fn read(
        &self,
        txn: &RoTxn,
        customer: &str,
        time_ms: i64,
    ) -> Result<Profile, heed::Error> {
        let mut key = KeyBuf::default();
        let key = record::key(&mut key, customer);
        let record = read_through(self.hot, txn, self.states, key)?;
        Ok(self.engine.progress_of(record, time_ms))
    }
}
