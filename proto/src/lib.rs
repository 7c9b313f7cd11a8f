//! The Touchline wire protocol between an edge site and the central platform.
//!
//! This crate exists so that both ends agree on one definition of every byte
//! they exchange, and so that definition can be tested without a network.
//! It does no I/O and is deterministic: the async layers in the daemon's
//! uplink and in `touchline-central` only move the frames built here.
//!
//! # Session
//!
//! One QUIC connection (ALPN [`ALPN`], mutual TLS) carries one session. Every
//! exchange is one bidirectional stream carrying exactly one request frame
//! and one response frame:
//!
//! 1. [`ClientMessage::Hello`] → [`ServerMessage::Welcome`] with the last
//!    sequence number the central side has made durable for this site.
//! 2. [`ClientMessage::Batch`] → [`ServerMessage::Ack`] naming the highest
//!    contiguous sequence that is durable after the batch. The site deletes
//!    records up to that sequence, never before.
//!
//! # Versioning
//!
//! postcard is not self-describing, so fields are never added to an existing
//! struct. Every frame is an [`Envelope`] whose enum discriminant is the
//! version byte; a new shape gets a new envelope variant, and the session
//! negotiates [`PROTOCOL_VERSION`] in the hello. New record kinds are
//! appended to [`RecordBody`], which old readers reject cleanly as
//! [`DecodeError::Malformed`] rather than misreading.
#![forbid(unsafe_code)]

mod frame;
mod record;

pub use frame::{
    decode_client, decode_server, encode_client, encode_server, DecodeError, EncodeError,
    FRAME_HEADER_LEN, MAX_FRAME_LEN,
};
pub use record::{
    AchievementAwarded, CustomerErased, OfferDecision, OfferOutcome, OfferStats, PeriodSummary,
    Record, RecordBody, RuleProgress, RuleStats,
};

use serde::{Deserialize, Serialize};

/// ALPN protocol id both ends must offer; a peer without it is refused by TLS.
pub const ALPN: &[u8] = b"touchline/1";

/// The protocol version this build speaks, sent in [`ClientMessage::Hello`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Messages a site sends to the central platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// First exchange of a session. `site` must equal the site id carried in
    /// the client certificate, or the central side refuses the session.
    Hello { site: String, protocol_version: u16 },
    /// Records in ascending sequence order.
    ///
    /// `dropped_through` is the highest sequence the site has given up on
    /// (outbox policy `drop-oldest`); 0 when nothing was ever dropped. The
    /// central side treats missing sequences up to it as a declared,
    /// counted gap instead of waiting for them forever.
    Batch {
        dropped_through: u64,
        records: Vec<Record>,
    },
}

/// Messages the central platform sends back, one per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Answer to `Hello`: the highest contiguous sequence already durable
    /// for this site (0 when none).
    Welcome { last_durable: u64 },
    /// Answer to `Batch`: every record of this site up to `through` is
    /// durable at the central side.
    Ack { through: u64 },
    /// The request was refused; the session should be closed.
    Refused {
        reason: RefusalReason,
        message: String,
    },
}

/// Why the central side refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The site speaks a protocol version this receiver does not.
    UnsupportedVersion,
    /// The hello names a site other than the one in the certificate.
    SiteMismatch,
    /// A batch arrived before the hello, or a record names another site.
    ProtocolViolation,
    /// The sink failed; the site should retry later.
    SinkUnavailable,
}

/// The versioned wrapper every frame carries. The discriminant is the
/// version byte on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Envelope<T> {
    V1(T),
}
