//! Where the engine keeps its state: a sorted key-value table.
//!
//! The engine decides; the table remembers. Keeping the two apart lets
//! the engine run without I/O: in the daemon the table is the writer's
//! LMDB transaction (the store's `engine_table`), so an event's state
//! changes commit or roll back with the event; [`MemoryTable`] keeps
//! everything in process, for measuring the engine alone.
//!
//! Errors are LMDB's: the memory table never fails, and the writer maps
//! LMDB's (a full map above all) to its own.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use serde_json::{Map, Value};

use super::ApplyError;

/// A profile, as the engine reads it for a customer other than the
/// event's subject (a referral's credited customer).
pub type Profile = Map<String, Value>;

/// A key and its value, as a prefix scan returns them.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Reading the engine's state without changing it (progress queries).
pub trait StateRead {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, heed::Error>;
}

/// The engine's view of its storage.
pub trait StateTable {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, heed::Error>;
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), heed::Error>;
    fn delete(&mut self, key: &[u8]) -> Result<(), heed::Error>;
    /// Every entry whose key starts with `prefix`, in key order. For the
    /// rare scans (erasure, a goal's members, a period's summaries).
    fn prefixed(&self, prefix: &[u8]) -> Result<Vec<Entry>, heed::Error>;
    /// A customer's stored profile, `None` when they have none.
    fn profile(&mut self, customer: &str) -> Result<Option<Profile>, ApplyError>;
}

/// Engine state held in process: no I/O, nothing durable. Values live in
/// a hash map (the engine's reads and writes are point lookups). Only the
/// rare prefix scans need the keys in order, so new keys wait in a list
/// and are sorted into the ordered set by the next scan. The map and the
/// order share each key's bytes.
///
/// It keeps no profiles: the caller passes the subject's profile to
/// [`super::Engine::apply`], and a credited customer (referrals) reads as
/// one without a stored profile, which the engine tracks.
#[derive(Debug, Default)]
pub struct MemoryTable {
    values: FxHashMap<Arc<[u8]>, Vec<u8>>,
    order: RefCell<Order>,
}

/// Keys in order, and keys not yet placed.
#[derive(Debug, Default)]
struct Order {
    sorted: BTreeSet<Arc<[u8]>>,
    pending: Vec<Arc<[u8]>>,
}

impl MemoryTable {
    pub fn new() -> MemoryTable {
        MemoryTable::default()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl StateTable for MemoryTable {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, heed::Error> {
        Ok(self.values.get(key).map(Vec::as_slice))
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), heed::Error> {
        match self.values.get_mut(key) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(value);
            }
            None => {
                let key: Arc<[u8]> = Arc::from(key);
                self.values.insert(key.clone(), value.to_vec());
                self.order.get_mut().pending.push(key);
            }
        }
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), heed::Error> {
        if self.values.remove(key).is_some() {
            let Order { sorted, pending } = self.order.get_mut();
            sorted.extend(pending.drain(..));
            sorted.remove(key);
        }
        Ok(())
    }

    fn prefixed(&self, prefix: &[u8]) -> Result<Vec<Entry>, heed::Error> {
        let mut order = self.order.borrow_mut();
        let Order { sorted, pending } = &mut *order;
        sorted.extend(pending.drain(..));
        Ok(sorted
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix))
            .filter_map(|k| self.values.get(k).map(|v| (k.to_vec(), v.clone())))
            .collect())
    }

    fn profile(&mut self, _customer: &str) -> Result<Option<Profile>, ApplyError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_table_scans_only_its_prefix_in_order() {
        let mut t = MemoryTable::new();
        for k in [&b"ab2"[..], b"ab1", b"a", b"b", b"ab"] {
            t.put(k, k).unwrap();
        }
        t.put(b"ab1", b"x").unwrap();
        let keys: Vec<Vec<u8>> = t
            .prefixed(b"ab")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"ab".to_vec(), b"ab1".to_vec(), b"ab2".to_vec()]);
        assert_eq!(t.get(b"ab1").unwrap(), Some(&b"x"[..]));
        t.delete(b"ab1").unwrap();
        assert_eq!(t.get(b"ab1").unwrap(), None);
        assert_eq!(t.len(), 4);
    }
}
