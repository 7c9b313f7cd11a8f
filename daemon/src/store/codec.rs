//! The postcard codec for LMDB values.
//!
//! Values that are written rarely or read across processes (meta, dead
//! letters, outbox reads) go through this typed codec; the hot paths
//! (outbox appends, rule state) encode into reused buffers instead and
//! store raw bytes.

use std::borrow::Cow;
use std::marker::PhantomData;

use heed::{BoxedError, BytesDecode, BytesEncode};
use serde::{Deserialize, Serialize};

/// `heed` codec storing `T` in its postcard encoding.
pub(crate) struct Postcard<T>(PhantomData<T>);

impl<'a, T: Serialize + 'a> BytesEncode<'a> for Postcard<T> {
    type EItem = T;

    fn bytes_encode(item: &'a T) -> Result<Cow<'a, [u8]>, BoxedError> {
        Ok(Cow::Owned(postcard::to_allocvec(item)?))
    }
}

impl<'a, T: Deserialize<'a> + 'a> BytesDecode<'a> for Postcard<T> {
    type DItem = T;

    fn bytes_decode(bytes: &'a [u8]) -> Result<T, BoxedError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

/// Sequence-style keys: big-endian so LMDB's byte order is numeric order.
pub(crate) type BeU64 = heed::types::U64<heed::byteorder::BigEndian>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let value = (7u64, "seven".to_string());
        let bytes = Postcard::<(u64, String)>::bytes_encode(&value).unwrap();
        let back = Postcard::<(u64, String)>::bytes_decode(&bytes).unwrap();
        assert_eq!(back, value);
        assert!(Postcard::<(u64, String)>::bytes_decode(&[0xff, 0xff]).is_err());
    }
}
