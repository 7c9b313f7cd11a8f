//! The QUIC server: sessions from many sites, each request on its own
//! bidirectional stream, each acknowledgement only after the sink.
//!
//! `serve(endpoint, sink, shutdown)` takes a bound endpoint so tests start
//! the real server on port 0.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::task::JoinSet;
use touchline_proto::{
    decode_client, encode_server, ClientMessage, RefusalReason, ServerMessage, FRAME_HEADER_LEN,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use tracing::{debug, info, warn};

use crate::sink::{Sink, SinkError};
use crate::tls::site_of;

/// Application close codes.
const CLOSE_DONE: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;

/// How long a peer may take to send one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Live counters of the receiver.
#[derive(Debug, Default)]
pub struct CentralStats {
    pub connections: AtomicU64,
    pub sessions: AtomicU64,
    pub refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub batches: AtomicU64,
    pub records_received: AtomicU64,
    pub sink_errors: AtomicU64,
}

/// Serves until `shutdown` resolves, then closes every connection.
pub async fn serve<S: Sink>(endpoint: Endpoint, sink: Arc<S>, shutdown: impl Future<Output = ()>) {
    serve_with_stats(endpoint, sink, Arc::new(CentralStats::default()), shutdown).await
}

/// [`serve`] with counters the caller can read.
pub async fn serve_with_stats<S: Sink>(
    endpoint: Endpoint,
    sink: Arc<S>,
    stats: Arc<CentralStats>,
    shutdown: impl Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let sink = sink.clone();
                let stats = stats.clone();
                connections.spawn(async move {
                    match incoming.await {
                        Ok(conn) => {
                            stats.connections.fetch_add(1, Relaxed);
                            session(conn, sink, stats).await;
                        }
                        Err(e) => {
                            stats.refused.fetch_add(1, Relaxed);
                            warn!(error = %e, "handshake failed");
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    endpoint.close(quinn::VarInt::from_u32(CLOSE_DONE), b"shutting down");
    connections.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn session<S: Sink>(conn: Connection, sink: Arc<S>, stats: Arc<CentralStats>) {
    let peer = conn.remote_address();
    let Some(site) = site_of(&conn) else {
        stats.refused.fetch_add(1, Relaxed);
        warn!(%peer, "client certificate names no site");
        conn.close(
            quinn::VarInt::from_u32(CLOSE_REFUSED),
            b"no site in certificate",
        );
        return;
    };
    let mut hello_done = false;
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%site, %peer, reason = %e, "session ended");
                return;
            }
        };
        let request = match read_request(&mut recv).await {
            Ok(m) => m,
            Err(why) => {
                stats.protocol_errors.fetch_add(1, Relaxed);
                warn!(%site, %peer, "bad request: {why}");
                // Said to the site, which logs and counts a refusal, and
                // names the likely cause: a record kind this receiver
                // does not know yet.
                let answer = refuse(
                    RefusalReason::ProtocolViolation,
                    format!(
                        "this receiver cannot read the request ({why}); if the site runs a \
                         newer release, upgrade the receiver first"
                    ),
                );
                if respond(&mut send, &answer).await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                }
                conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"bad request");
                return;
            }
        };
        let (answer, close) = match request {
            ClientMessage::Hello {
                site: named,
                protocol_version,
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    (refuse(RefusalReason::UnsupportedVersion, format!("protocol {protocol_version} is not supported; this receiver speaks {PROTOCOL_VERSION}")), true)
                } else if named != site {
                    (
                        refuse(
                            RefusalReason::SiteMismatch,
                            format!("hello names `{named}` but the certificate is for `{site}`"),
                        ),
                        true,
                    )
                } else {
                    match sink.last_durable(&site).await {
                        Ok(last_durable) => {
                            hello_done = true;
                            stats.sessions.fetch_add(1, Relaxed);
                            info!(%site, %peer, last_durable, "site connected");
                            (ServerMessage::Welcome { last_durable }, false)
                        }
                        Err(e) => sink_failed(&stats, &site, e),
                    }
                }
            }
            ClientMessage::Batch { .. } if !hello_done => (
                refuse(
                    RefusalReason::ProtocolViolation,
                    "batch before hello".into(),
                ),
                true,
            ),
            ClientMessage::Batch {
                dropped_through,
                records,
            } => {
                stats.batches.fetch_add(1, Relaxed);
                stats
                    .records_received
                    .fetch_add(records.len() as u64, Relaxed);
                if !records.windows(2).all(|w| w[0].seq < w[1].seq) {
                    (
                        refuse(
                            RefusalReason::ProtocolViolation,
                            "records out of order".into(),
                        ),
                        true,
                    )
                } else {
                    match sink.write(&site, dropped_through, &records).await {
                        Ok(through) => (ServerMessage::Ack { through }, false),
                        Err(SinkError::Invalid(why)) => {
                            (refuse(RefusalReason::ProtocolViolation, why), true)
                        }
                        Err(e) => sink_failed(&stats, &site, e),
                    }
                }
            }
        };
        if let ServerMessage::Refused { reason, message } = &answer {
            stats.refused.fetch_add(1, Relaxed);
            warn!(%site, %peer, ?reason, "refused: {message}");
        }
        if let Err(e) = respond(&mut send, &answer).await {
            debug!(%site, %peer, error = %e, "could not answer");
            return;
        }
        if close {
            // Let the refusal reach the peer before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(quinn::VarInt::from_u32(CLOSE_REFUSED), b"refused");
            return;
        }
    }
}

fn refuse(reason: RefusalReason, message: String) -> ServerMessage {
    ServerMessage::Refused { reason, message }
}

fn sink_failed(stats: &CentralStats, site: &str, e: SinkError) -> (ServerMessage, bool) {
    stats.sink_errors.fetch_add(1, Relaxed);
    warn!(%site, error = %e, "sink failed; the site will retry");
    (refuse(RefusalReason::SinkUnavailable, e.to_string()), true)
}

async fn read_request(recv: &mut RecvStream) -> Result<ClientMessage, String> {
    let bytes = tokio::time::timeout(
        REQUEST_TIMEOUT,
        recv.read_to_end(FRAME_HEADER_LEN + MAX_FRAME_LEN),
    )
    .await
    .map_err(|_| "request timed out".to_string())?
    .map_err(|e| e.to_string())?;
    decode_client(&bytes).map_err(|e| e.to_string())
}

async fn respond(send: &mut SendStream, msg: &ServerMessage) -> Result<(), String> {
    let frame = encode_server(msg).map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}
