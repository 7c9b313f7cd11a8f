//! Framing: one length-prefixed, versioned postcard message per stream
//! direction.
//!
//! A frame is a 4-byte big-endian payload length followed by the postcard
//! encoding of an [`Envelope`]. The length lets a reader refuse an oversized
//! frame before buffering it and detect truncation; the envelope carries the
//! version. Decoding never panics: every failure is a [`DecodeError`].

use serde::{de::DeserializeOwned, Serialize};

use crate::{ClientMessage, Envelope, ServerMessage};

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest payload either side accepts (16 MiB). Batches are sized well
/// below it by the sender.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame is truncated: {got} bytes, need {need}")]
    Truncated { got: usize, need: usize },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("{extra} trailing bytes after the frame")]
    TrailingBytes { extra: usize },
    #[error("malformed frame payload: {0}")]
    Malformed(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the frame limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

fn encode<T: Serialize>(msg: T) -> Result<Vec<u8>, EncodeError> {
    let header = vec![0u8; FRAME_HEADER_LEN];
    let mut out = postcard::to_extend(&Envelope::V1(msg), header)
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    let len = out.len() - FRAME_HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need: FRAME_HEADER_LEN,
        });
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    header.copy_from_slice(&bytes[..FRAME_HEADER_LEN]);
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let payload = &bytes[FRAME_HEADER_LEN..];
    if payload.len() < len {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need: FRAME_HEADER_LEN + len,
        });
    }
    if payload.len() > len {
        return Err(DecodeError::TrailingBytes {
            extra: payload.len() - len,
        });
    }
    let (envelope, rest): (Envelope<T>, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    match envelope {
        Envelope::V1(msg) => Ok(msg),
    }
}

/// Encodes a site → central message as one frame.
pub fn encode_client(msg: &ClientMessage) -> Result<Vec<u8>, EncodeError> {
    encode(msg)
}

/// Encodes a central → site message as one frame.
pub fn encode_server(msg: &ServerMessage) -> Result<Vec<u8>, EncodeError> {
    encode(msg)
}

/// Decodes exactly one site → central frame.
pub fn decode_client(bytes: &[u8]) -> Result<ClientMessage, DecodeError> {
    decode(bytes)
}

/// Decodes exactly one central → site frame.
pub fn decode_server(bytes: &[u8]) -> Result<ServerMessage, DecodeError> {
    decode(bytes)
}
