//! Composite LMDB keys that always fit LMDB's 511-byte key limit.
//!
//! Keys are built from input we do not control (event source and id,
//! customer ids), so a natural key can be arbitrarily long. Short keys stay
//! readable and ordered; a key over the limit is replaced by a marker byte
//! and its SHA-256, which cannot collide with a natural key because natural
//! keys start with a big-endian length below 0xFF00.

use sha2::{Digest, Sha256};

/// Marker byte of a hashed key.
const HASHED: u8 = 0xFF;

/// Builds keys into a reused buffer.
#[derive(Default)]
pub(crate) struct KeyBuf {
    buf: Vec<u8>,
}

impl KeyBuf {
    /// A buffer with room for keys of `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> KeyBuf {
        KeyBuf {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// The finished key (see [`KeyBuf::finish`]), taking the buffer.
    pub(crate) fn into_key(mut self, max: usize) -> Vec<u8> {
        self.finish(max);
        self.buf
    }

    /// Starts a key with a length-prefixed first component (at most
    /// `u16::MAX` bytes are meaningful; longer input is hashed anyway).
    pub(crate) fn start(&mut self, first: &str) -> &mut Self {
        self.buf.clear();
        let len = u16::try_from(first.len()).unwrap_or(u16::MAX);
        // A length of 0xFF00 or more would make the first byte look like
        // the hash marker; such keys are far over the limit and get hashed.
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(first.as_bytes());
        self
    }

    /// Appends a short length-prefixed component (ids of at most 255 bytes;
    /// longer ones are truncated in the prefix but kept whole in the key).
    pub(crate) fn short(&mut self, part: &str) -> &mut Self {
        let len = u8::try_from(part.len()).unwrap_or(u8::MAX);
        self.buf.push(len);
        self.buf.extend_from_slice(part.as_bytes());
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends the last component, unprefixed.
    pub(crate) fn rest(&mut self, part: &str) -> &mut Self {
        self.buf.extend_from_slice(part.as_bytes());
        self
    }

    /// The finished key: itself when at most `max` bytes, else hashed.
    pub(crate) fn finish(&mut self, max: usize) -> &[u8] {
        if self.buf.len() > max {
            let digest = Sha256::digest(&self.buf);
            self.buf.clear();
            self.buf.push(HASHED);
            self.buf.extend_from_slice(&digest);
        }
        &self.buf
    }
}

/// (first component, rest) of a key built with [`KeyBuf::start`]; `None`
/// for a hashed key or one that is not such a key.
pub(crate) fn split_first(k: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = k.split_at_checked(2)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let (first, rest) = rest.split_at_checked(len)?;
    Some((std::str::from_utf8(first).ok()?, rest))
}

/// Bytes of a key copied inline to sort by.
pub(crate) const HEAD: usize = 16;

/// The first [`HEAD`] bytes of `key`, zero-padded, read as one
/// big-endian number. Sorting by (head, key) gives key order: numbers
/// compare as their big-endian bytes do, a shorter key's padding sorts it
/// before any longer key it is a prefix of, and the full keys break every
/// tie. Comparing heads first spares most comparisons a cache miss on
/// each key's own allocation, which dominated sorting a checkpoint's
/// keys; comparing them as numbers spares each a call to `memcmp`.
pub(crate) fn head(key: &[u8]) -> u128 {
    let mut h = [0; HEAD];
    let n = key.len().min(HEAD);
    h[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Just;

    #[test]
    fn short_keys_are_natural_long_keys_hashed() {
        let mut k = KeyBuf::default();
        let key = k.start("src").rest("id-1").finish(64).to_vec();
        assert_eq!(key, b"\x00\x03srcid-1");

        let long = "x".repeat(500);
        let key = k.start(&long).rest("id").finish(256).to_vec();
        assert_eq!(key.len(), 33);
        assert_eq!(key[0], HASHED);

        // The prefix keeps ("ab","c") and ("a","bc") apart.
        let a = k.start("ab").rest("c").finish(64).to_vec();
        let b = k.start("a").rest("bc").finish(64).to_vec();
        assert_ne!(a, b);
    }

    proptest::proptest! {
        #[test]
        fn sorting_by_head_then_key_is_key_order(
            mut keys in proptest::collection::vec(
                proptest::collection::vec(proptest::prop_oneof![Just(0u8), Just(1u8), Just(b'a'), 0u8..=255], 0..24),
                0..64,
            )
        ) {
            let mut by_head: Vec<(u128, Vec<u8>)> =
                keys.iter().map(|k| (head(k), k.clone())).collect();
            by_head.sort_unstable();
            keys.sort_unstable();
            let by_head: Vec<Vec<u8>> = by_head.into_iter().map(|(_, k)| k).collect();
            proptest::prop_assert_eq!(by_head, keys);
        }
    }

    #[test]
    fn the_first_component_splits_off() {
        let mut k = KeyBuf::default();
        let key = k.start("fan-1").rest("x").finish(64).to_vec();
        assert_eq!(split_first(&key), Some(("fan-1", &b"x"[..])));
        let long = "x".repeat(600);
        let hashed = k.start(&long).finish(511).to_vec();
        assert_eq!(split_first(&hashed), None, "a hashed key names no one");
    }
}
