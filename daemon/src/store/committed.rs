//! What the writer knows to be committed, so it can skip a read.
//!
//! Some records are written rarely but would be read for every event (a
//! fan's presence, their activity in the current period). The writer
//! remembers per customer what it last saw committed: entries a
//! transaction notes count only once it commits, so a rolled-back
//! transaction leaves nothing behind. A miss only costs the read it was
//! meant to save, so forgetting is always safe, and the map starts over
//! when it grows past its bound.

use std::collections::HashMap;

/// Per-customer values known to be committed.
#[derive(Debug)]
pub(crate) struct Committed<V> {
    known: HashMap<String, V>,
    pending: Vec<(String, V)>,
    max: usize,
}

impl<V> Committed<V> {
    /// A map of at most `max` customers.
    pub(crate) fn new(max: usize) -> Committed<V> {
        Committed {
            known: HashMap::new(),
            pending: Vec::new(),
            max,
        }
    }

    /// The value last committed for `customer`, if remembered.
    pub(crate) fn get(&self, customer: &str) -> Option<&V> {
        self.known.get(customer)
    }

    /// The open transaction wrote (or read) `value` for `customer`.
    pub(crate) fn note(&mut self, customer: &str, value: V) {
        self.pending.push((customer.to_owned(), value));
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
        self.known.extend(self.pending.drain(..));
    }

    pub(crate) fn forget(&mut self, customer: &str) {
        self.known.remove(customer);
        self.pending.retain(|(c, _)| c != customer);
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
    fn only_committed_notes_count() {
        let mut m = Committed::new(3);
        m.note("fan-1", 1);
        assert_eq!(m.get("fan-1"), None, "not before the commit");
        m.committed();
        assert_eq!(m.get("fan-1"), Some(&1));

        m.note("fan-2", 2);
        m.rollback();
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
}
