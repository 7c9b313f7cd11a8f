//! What the writer knows to be committed, so it can skip a read.
//!
//! Some records are written rarely but would be read for every event (a
//! fan's presence, their activity in the current period, their profile).
//! The writer remembers per customer the value it last wrote or read:
//! what the open transaction notes is seen by the rest of that
//! transaction, and stands once it commits, so a rolled-back transaction
//! leaves nothing behind. A miss only costs the read it was meant to
//! save, so forgetting is always safe, and the map starts over when it
//! grows past its bound.
//!
//! Keys are customer ids: hashed with Fx, like the writer's other
//! per-customer maps (the hot state), for the cost of a lookup per event.

use rustc_hash::FxHashMap;

/// Per-customer values known to be committed, or written by the open
/// transaction.
#[derive(Debug)]
pub(crate) struct Committed<V> {
    known: FxHashMap<String, V>,
    pending: FxHashMap<String, V>,
    max: usize,
}

impl<V> Committed<V> {
    /// A map of at most `max` customers.
    pub(crate) fn new(max: usize) -> Committed<V> {
        Committed {
            known: FxHashMap::default(),
            pending: FxHashMap::default(),
            max,
        }
    }

    /// The value the open transaction noted for `customer`, else the one
    /// last committed, if remembered.
    pub(crate) fn get(&self, customer: &str) -> Option<&V> {
        self.pending
            .get(customer)
            .or_else(|| self.known.get(customer))
    }

    /// The open transaction wrote (or read) `value` for `customer`.
    pub(crate) fn note(&mut self, customer: &str, value: V) {
        match self.pending.get_mut(customer) {
            Some(v) => *v = value,
            None => {
                self.pending.insert(customer.to_owned(), value);
            }
        }
    }

    /// The open transaction did not commit (or a new one starts).
    pub(crate) fn rollback(&mut self) {
        self.pending.clear();
    }

    /// The open transaction committed: what it noted now stands.
    pub(crate) fn committed(&mut self) {
        if self.known.len() + self.pending.len() > self.max {
            self.known.clear();
        }
        self.known.extend(self.pending.drain());
    }

    pub(crate) fn forget(&mut self, customer: &str) {
        self.known.remove(customer);
        self.pending.remove(customer);
    }

    pub(crate) fn forget_all(&mut self) {
        self.known.clear();
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Committed;

    #[test]
    fn notes_are_seen_at_once_and_stand_once_committed() {
        let mut m = Committed::new(3);
        m.note("fan-1", 1);
        assert_eq!(m.get("fan-1"), Some(&1), "the open transaction sees it");
        m.committed();
        assert_eq!(m.get("fan-1"), Some(&1));

        m.note("fan-1", 7);
        m.note("fan-2", 2);
        assert_eq!(m.get("fan-1"), Some(&7), "the latest note wins");
        m.rollback();
        assert_eq!(
            m.get("fan-1"),
            Some(&1),
            "a rollback restores the committed value"
        );
        m.committed();
        assert_eq!(m.get("fan-2"), None, "a rolled-back note never counts");

        m.note("fan-1", 5);
        m.committed();
        assert_eq!(m.get("fan-1"), Some(&5), "a later commit replaces");

        m.note("fan-3", 3);
        m.note("fan-4", 4);
        m.forget("fan-3");
        m.committed();
        assert_eq!(m.get("fan-3"), None);
        assert_eq!(m.get("fan-4"), Some(&4));

        // Past the bound the map starts over with the newest notes.
        m.note("fan-5", 5);
        m.note("fan-6", 6);
        m.committed();
        assert_eq!(m.get("fan-1"), None);
        assert_eq!(m.get("fan-6"), Some(&6));
        m.forget_all();
        assert_eq!(m.get("fan-6"), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Note(u8, u8),
        Forget(u8),
        ForgetAll,
        Commit,
        Rollback,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            8 => (0..6u8, any::<u8>()).prop_map(|(k, v)| Op::Note(k, v)),
            1 => (0..6u8).prop_map(Op::Forget),
            1 => Just(Op::ForgetAll),
            3 => Just(Op::Commit),
            3 => Just(Op::Rollback),
        ]
    }

    proptest::proptest! {
        /// Whatever the mix of notes, commits, rollbacks and forgetting,
        /// a read is either a miss or the value the open transaction
        /// would read from LMDB, and a note not forgotten since is never
        /// missed within its transaction.
        #[test]
        fn a_read_is_a_miss_or_the_truth(ops in proptest::collection::vec(op(), 1..80)) {
            use std::collections::BTreeMap;
            let mut m = Committed::new(4);
            // What LMDB holds as of the last commit, and as the open
            // transaction sees it.
            let mut durable: BTreeMap<u8, u8> = BTreeMap::new();
            let mut open = durable.clone();
            let mut noted: BTreeMap<u8, u8> = BTreeMap::new();
            m.rollback();
            for op in ops {
                match op {
                    Op::Note(k, v) => {
                        m.note(&k.to_string(), v);
                        open.insert(k, v);
                        noted.insert(k, v);
                    }
                    Op::Forget(k) => {
                        m.forget(&k.to_string());
                        noted.remove(&k);
                    }
                    Op::ForgetAll => {
                        m.forget_all();
                        noted.clear();
                    }
                    Op::Commit => {
                        m.committed();
                        durable = open.clone();
                        m.rollback();
                        noted.clear();
                    }
                    Op::Rollback => {
                        m.rollback();
                        open = durable.clone();
                        noted.clear();
                    }
                }
                for k in 0..6u8 {
                    let seen = m.get(&k.to_string()).copied();
                    proptest::prop_assert!(seen.is_none() || seen == open.get(&k).copied());
                    if let Some(v) = noted.get(&k) {
                        proptest::prop_assert_eq!(seen, Some(*v));
                    }
                }
            }
        }
    }
}
