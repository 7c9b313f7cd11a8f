//! The uplink: the site's side of the session with the central platform.
//!
//! It reads the outbox in sequence order, sends batches over QUIC, and
//! deletes records only after the central side acknowledged them as
//! durable. Everything it knows about progress comes from the central
//! side (the Welcome of each session and each Ack), so a crash or a lost
//! connection at any point means at most a resend, which the central side
//! drops by sequence number. An outage only grows the outbox.
//!
//! The sequence numbers here are the central side's. A store that starts
//! over under a known site id has its records renumbered after the
//! central side's mark at the Welcome (see `store::outbox`), so they are
//! not mistaken for records the central side already holds.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint};
use touchline_proto::{
    decode_server, encode_client, ClientMessage, Record, ServerMessage, FRAME_HEADER_LEN,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::store::{Rebase, RebaseCause};

/// How often an idle session looks at the outbox even without a
/// notification (a safety net; notifications are the normal path).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Records read from the outbox for one batch.
#[derive(Debug, Clone, Default)]
pub struct OutboxBatch {
    pub records: Vec<Record>,
    /// Highest sequence the site gave up on (outbox policy `drop-oldest`).
    pub dropped_through: u64,
}

/// What the uplink needs from the store.
pub trait OutboxSource: Clone + Send + Sync + 'static {
    /// Records with seq > `after`, ascending, at most `max_records` and
    /// about `max_bytes` (at least one record when any exists).
    fn read(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<OutboxBatch, UplinkError>> + Send;
    /// Everything up to `through` is durable centrally: delete it.
    fn acknowledge(&self, through: u64) -> impl Future<Output = Result<(), UplinkError>> + Send;
    /// A session began: the central side holds the site's records up to
    /// `central_mark`. Like `acknowledge`, and renumbers the records after
    /// the mark when it is beyond anything this store sent.
    fn welcome(
        &self,
        central_mark: u64,
    ) -> impl Future<Output = Result<Option<Rebase>, UplinkError>> + Send;
    /// Resolves when new records may be available.
    fn changed(&self) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("outbox: {0}")]
    Outbox(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] touchline_central::tls::TlsError),
    #[error("cannot bind a local UDP socket: {0}")]
    Bind(std::io::Error),
    #[error("connecting to {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("session: {0}")]
    Session(String),
    #[error("central refused: {0}")]
    Refused(String),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Everything the uplink needs, resolved from the site config.
#[derive(Clone)]
pub struct UplinkSettings {
    pub site: String,
    pub central: SocketAddr,
    pub server_name: String,
    pub client: quinn::ClientConfig,
    pub batch_max_records: usize,
    pub batch_max_bytes: usize,
    /// How long one exchange may take before the session is given up.
    pub request_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl UplinkSettings {
    /// Loads certificates and builds the QUIC client config.
    pub fn from_config(
        site: &str,
        up: &edge_config::Uplink,
    ) -> Result<UplinkSettings, UplinkError> {
        let client = touchline_central::tls::client_config(
            &up.ca,
            &up.cert,
            &up.key,
            up.keep_alive,
            up.idle_timeout,
        )?;
        Ok(UplinkSettings {
            site: site.to_string(),
            central: up.central,
            server_name: up.server_name.clone(),
            client,
            batch_max_records: up.batch_max_records,
            batch_max_bytes: up.batch_max_bytes,
            request_timeout: up.request_timeout,
            reconnect_min: up.reconnect_min,
            reconnect_max: up.reconnect_max,
        })
    }
}

/// Live uplink state for status and metrics.
#[derive(Debug, Default)]
pub struct UplinkState {
    connected: AtomicBool,
    last_acked: AtomicU64,
    records_sent: AtomicU64,
    records_acked: AtomicU64,
    batches: AtomicU64,
    reconnects: AtomicU64,
    refusals: AtomicU64,
    records_lost_centrally: AtomicU64,
    rebases: AtomicU64,
    batch_timeouts: AtomicU64,
    /// The byte budget of the next batch (see [`BatchBudget`]).
    batch_bytes: AtomicU64,
}

impl UplinkState {
    pub fn connected(&self) -> bool {
        self.connected.load(Relaxed)
    }
    /// Highest sequence the central side acknowledged.
    pub fn last_acked(&self) -> u64 {
        self.last_acked.load(Relaxed)
    }
    pub fn records_sent(&self) -> u64 {
        self.records_sent.load(Relaxed)
    }
    /// Records newly acknowledged (duplicates the central side already had
    /// are not counted twice).
    pub fn records_acked(&self) -> u64 {
        self.records_acked.load(Relaxed)
    }
    pub fn batches(&self) -> u64 {
        self.batches.load(Relaxed)
    }
    /// Sessions lost or failed to start.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Relaxed)
    }
    /// Sessions the central side refused.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Relaxed)
    }
    /// Records the central side had acknowledged (so the site deleted
    /// them) and then no longer held; declared a gap.
    pub fn records_lost_centrally(&self) -> u64 {
        self.records_lost_centrally.load(Relaxed)
    }

    /// Welcomes at which the store's records were renumbered after the
    /// central side's mark.
    pub fn rebases(&self) -> u64 {
        self.rebases.load(Relaxed)
    }

    /// Batches that got no answer within `uplink.request_timeout`.
    pub fn batch_timeouts(&self) -> u64 {
        self.batch_timeouts.load(Relaxed)
    }

    /// How many bytes the next batch may carry (below
    /// `uplink.batch_max_bytes` after timeouts); 0 before the first
    /// session.
    pub fn batch_bytes(&self) -> u64 {
        self.batch_bytes.load(Relaxed)
    }
}

/// How much one batch may carry. A batch that gets no answer in time (a
/// link too slow for its size, a slow sink) goes again at half the size,
/// down to one record, so such a link still makes progress instead of
/// sending the same batch until it times out again. A batch answered
/// within a quarter of the timeout lets the next one double, up to the
/// configured limits; one that took longer keeps the size, which is what
/// the link carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchBudget {
    records: usize,
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
}

impl BatchBudget {
    fn new(max_records: usize, max_bytes: usize) -> BatchBudget {
        let (max_records, max_bytes) = (max_records.max(1), max_bytes.max(1));
        BatchBudget {
            records: max_records,
            bytes: max_bytes,
            max_records,
            max_bytes,
        }
    }

    fn timed_out(&mut self) {
        self.records = (self.records / 2).max(1);
        self.bytes = (self.bytes / 2).max(1);
    }

    fn answered(&mut self, took: Duration, timeout: Duration) {
        if took < timeout / 4 {
            self.records = self.records.saturating_mul(2).min(self.max_records);
            self.bytes = self.bytes.saturating_mul(2).min(self.max_bytes);
        }
    }
}

/// Runs sessions with jittered exponential backoff until `shutdown`.
pub async fn run<O: OutboxSource>(
    settings: UplinkSettings,
    source: O,
    state: Arc<UplinkState>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let bind: SocketAddr = if settings.central.is_ipv6() {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    };
    let mut endpoint = loop {
        match Endpoint::client(bind) {
            Ok(e) => break e,
            Err(e) => {
                warn!(error = %e, "cannot bind the uplink socket; retrying");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(settings.reconnect_max) => {}
                }
            }
        }
    };
    endpoint.set_default_client_config(settings.client.clone());
    let mut backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
    let mut budget = BatchBudget::new(settings.batch_max_records, settings.batch_max_bytes);
    loop {
        let outcome = tokio::select! {
            _ = &mut shutdown => break,
            r = session(&endpoint, &settings, &source, &state, &mut backoff, &mut budget) => r,
        };
        state.connected.store(false, Relaxed);
        state.reconnects.fetch_add(1, Relaxed);
        // Sites restarting together spread out.
        let pause = backoff.next_delay();
        if let Err(e) = outcome {
            if matches!(e, UplinkError::Refused(_)) {
                state.refusals.fetch_add(1, Relaxed);
            }
            warn!(central = %settings.central, error = %e, retry_in = ?pause, "uplink session ended");
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    state.connected.store(false, Relaxed);
    endpoint.close(quinn::VarInt::from_u32(0), b"site stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    debug!("uplink stopped");
}

/// One session: hello, then batches until an error.
async fn session<O: OutboxSource>(
    endpoint: &Endpoint,
    settings: &UplinkSettings,
    source: &O,
    state: &UplinkState,
    backoff: &mut Backoff,
    budget: &mut BatchBudget,
) -> Result<(), UplinkError> {
    let addr = settings.central;
    let conn = endpoint
        .connect(addr, &settings.server_name)
        .map_err(|e| UplinkError::Connect {
            addr,
            detail: e.to_string(),
        })?
        .await
        .map_err(|e| UplinkError::Connect {
            addr,
            detail: e.to_string(),
        })?;
    let hello = ClientMessage::Hello {
        site: settings.site.clone(),
        protocol_version: PROTOCOL_VERSION,
    };
    let timeout = settings.request_timeout;
    let last_durable = match request(&conn, &hello, timeout).await? {
        ServerMessage::Welcome { last_durable } => last_durable,
        other => return Err(unexpected(other)),
    };
    // What the central side holds needs no resend, even if its Ack was lost.
    if let Some(rebase) = source.welcome(last_durable).await? {
        state.rebases.fetch_add(1, Relaxed);
        log_rebase(&settings.site, &rebase);
    }
    state.last_acked.store(last_durable, Relaxed);
    state.connected.store(true, Relaxed);
    backoff.reset();
    info!(central = %addr, last_durable, "uplink connected");

    let mut sent_through = last_durable;
    loop {
        state.batch_bytes.store(budget.bytes as u64, Relaxed);
        let batch = source
            .read(sent_through, budget.records, budget.bytes)
            .await?;
        let Some(last) = batch.records.last().map(|r| r.seq) else {
            tokio::select! {
                _ = source.changed() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                e = conn.closed() => return Err(UplinkError::Session(e.to_string())),
            }
            continue;
        };
        let count = batch.records.len() as u64;
        // The central side keeps records in sequence: one that follows
        // neither its mark nor a declared gap would wait for good. That
        // happens when the central side lost records it had acknowledged
        // (a sink restored from a backup, a file cut short): the site
        // deleted them on the ack, so they are gone on both sides, and
        // are declared a gap, loudly.
        let mut dropped_through = batch.dropped_through;
        let expected = sent_through.max(dropped_through) + 1;
        if let Some(first) = batch.records.first().map(|r| r.seq) {
            if first > expected {
                error!(
                    from = expected,
                    through = first - 1,
                    central = %addr,
                    "the central side no longer holds records it acknowledged \
                     (the site deleted them then): declaring them a gap"
                );
                state
                    .records_lost_centrally
                    .fetch_add(first - expected, Relaxed);
                dropped_through = first - 1;
            }
        }
        let msg = ClientMessage::Batch {
            dropped_through,
            records: batch.records,
        };
        state.records_sent.fetch_add(count, Relaxed);
        let started = tokio::time::Instant::now();
        let answer = match request(&conn, &msg, timeout).await {
            Err(UplinkError::TimedOut(after)) => {
                state.batch_timeouts.fetch_add(1, Relaxed);
                budget.timed_out();
                warn!(
                    records = count,
                    ?after,
                    next_max_records = budget.records,
                    next_max_bytes = budget.bytes,
                    "a batch got no answer in time (a slow link or sink): \
                     the next ones are half the size"
                );
                return Err(UplinkError::TimedOut(after));
            }
            other => other?,
        };
        let through = match answer {
            ServerMessage::Ack { through } => through,
            other => return Err(unexpected(other)),
        };
        budget.answered(started.elapsed(), timeout);
        state.batches.fetch_add(1, Relaxed);
        if through > last {
            // More than was ever sent: the central side holds another
            // store's records under this site's name. Deleting on its word
            // would lose records it never had.
            return Err(UplinkError::Session(format!(
                "central acknowledged {through} after a batch up to {last}: beyond what was sent"
            )));
        }
        if through > sent_through {
            source.acknowledge(through).await?;
            state
                .records_acked
                .fetch_add(through.min(last) - sent_through.min(through), Relaxed);
            state.last_acked.store(through, Relaxed);
            sent_through = through;
        } else {
            return Err(UplinkError::Session(format!(
                "central acknowledged {through} after a batch up to {last}: no progress"
            )));
        }
    }
}

fn log_rebase(site: &str, r: &Rebase) {
    match r.cause {
        RebaseCause::NewStore => warn!(
            site,
            central_mark = r.central_mark,
            offset = r.offset,
            queued = r.queued,
            "the central side holds records of this site from another store (the site was \
             rebuilt or its data directory wiped): this store's records follow them"
        ),
        RebaseCause::StoreBehind => error!(
            site,
            central_mark = r.central_mark,
            offset = r.offset,
            superseded = r.superseded,
            "the central side holds records of this site beyond any this store numbered (a \
             store restored from a backup, or a copy running elsewhere): the records it held \
             when it was opened are taken as sent by the other copy and deleted, and its own \
             follow the central side's mark"
        ),
    }
}

fn unexpected(msg: ServerMessage) -> UplinkError {
    match msg {
        ServerMessage::Refused { reason, message } => {
            UplinkError::Refused(format!("{reason:?}: {message}"))
        }
        other => UplinkError::Session(format!("unexpected answer {other:?}")),
    }
}

/// One request on its own bidirectional stream, answered within `timeout`.
async fn request(
    conn: &Connection,
    msg: &ClientMessage,
    timeout: Duration,
) -> Result<ServerMessage, UplinkError> {
    let frame = encode_client(msg).map_err(|e| UplinkError::Session(e.to_string()))?;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let bytes = recv
            .read_to_end(FRAME_HEADER_LEN + MAX_FRAME_LEN)
            .await
            .map_err(|e| e.to_string())?;
        decode_server(&bytes).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| UplinkError::TimedOut(timeout))?
        .map_err(UplinkError::Session)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    #[test]
    fn a_timed_out_batch_halves_the_next_down_to_one_record() {
        let mut budget = BatchBudget::new(2000, 1 << 20);
        budget.timed_out();
        assert_eq!((budget.records, budget.bytes), (1000, 1 << 19));
        for _ in 0..40 {
            budget.timed_out();
        }
        assert_eq!((budget.records, budget.bytes), (1, 1));
    }

    #[test]
    fn quick_answers_double_it_back_to_the_limits_and_slow_ones_keep_it() {
        let mut budget = BatchBudget::new(2000, 1 << 20);
        for _ in 0..3 {
            budget.timed_out();
        }
        budget.answered(TIMEOUT / 2, TIMEOUT);
        assert_eq!(budget.records, 250, "a slow answer keeps the size");
        budget.answered(TIMEOUT / 5, TIMEOUT);
        assert_eq!((budget.records, budget.bytes), (500, 1 << 18));
        for _ in 0..10 {
            budget.answered(Duration::from_millis(1), TIMEOUT);
        }
        assert_eq!((budget.records, budget.bytes), (2000, 1 << 20));
    }
}
