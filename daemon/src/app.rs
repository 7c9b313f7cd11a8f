//! Composition: wires ingest → store → engine → outbox → uplink into one
//! running daemon.
//!
//! Every stage is written against a small trait or handle so it can be
//! tested alone; this is the one place that knows how they fit together.
//! `Daemon::start` takes validated config and returns once every stage is
//! up, so tests and the demo run the exact pipeline `touchline run` runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_config::{RuleBundle, SiteConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::event::{DeadLetter, Event, EventOutcome, SubmitError};
use crate::ingest::{self, EventSink, IngestStats};
use crate::store::{Store, StoreHandle, WriterThread};
use crate::uplink::{self, OutboxBatch, OutboxSource, UplinkError, UplinkSettings, UplinkState};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the uplink: {0}")]
    Uplink(String),
}

/// A running daemon. Dropping it without `shutdown` aborts its tasks.
pub struct Daemon {
    store: StoreHandle,
    writer: Option<WriterThread>,
    ingest_stats: Arc<IngestStats>,
    uplink_state: Arc<UplinkState>,
    http_addr: Option<SocketAddr>,
    stop_ingest: CancellationToken,
    stop_uplink: CancellationToken,
    ingest_tasks: Vec<JoinHandle<()>>,
    uplink_task: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Opens the store, starts every configured stage and returns once they
    /// are accepting work. HTTP may listen on port 0; see [`Daemon::http_addr`].
    pub async fn start(config: SiteConfig, rules: RuleBundle) -> Result<Daemon, StartError> {
        let (store, writer) =
            Store::open(&config, &rules).map_err(|e| StartError::Store(e.to_string()))?;
        info!(
            site = %config.site.id,
            data_dir = %config.site.data_dir.display(),
            rules = rules.achievements.len(),
            "store open"
        );

        let ingest_stats = Arc::new(IngestStats::default());
        let uplink_state = Arc::new(UplinkState::default());
        let stop_ingest = CancellationToken::new();
        let stop_uplink = CancellationToken::new();
        let mut ingest_tasks = Vec::new();
        let sink = StoreSink(store.clone());

        let mut http_addr = None;
        if let Some(http) = &config.ingest.http {
            let listener = tokio::net::TcpListener::bind(http.listen)
                .await
                .map_err(|source| StartError::HttpListen {
                    addr: http.listen,
                    source,
                })?;
            let addr = listener
                .local_addr()
                .map_err(|source| StartError::HttpListen {
                    addr: http.listen,
                    source,
                })?;
            http_addr = Some(addr);
            info!(%addr, "HTTP ingest listening");
            let cfg = ingest::http::HttpIngestConfig {
                validation: config.ingest.validation.clone(),
                max_body: http.max_body,
            };
            let stop = stop_ingest.clone();
            let serve = ingest::http::serve(
                listener,
                sink.clone(),
                cfg,
                ingest_stats.clone(),
                async move { stop.cancelled().await },
            );
            ingest_tasks.push(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    error!(error = %e, "HTTP ingest failed");
                }
            }));
        }

        if let Some(mqtt) = &config.ingest.mqtt {
            info!(host = %mqtt.host, port = mqtt.port, topics = ?mqtt.topics, "MQTT ingest starting");
            let stop = stop_ingest.clone();
            let run = ingest::mqtt::run(
                mqtt.clone(),
                config.ingest.validation.clone(),
                sink.clone(),
                ingest_stats.clone(),
                async move { stop.cancelled().await },
            );
            ingest_tasks.push(tokio::spawn(async move {
                if let Err(e) = run.await {
                    error!(error = %e, "MQTT ingest failed");
                }
            }));
        }

        let uplink_task = match &config.uplink {
            Some(up) => {
                let settings = UplinkSettings::from_config(&config.site.id, up)
                    .map_err(|e| StartError::Uplink(e.to_string()))?;
                info!(central = %up.central, "uplink starting");
                let stop = stop_uplink.clone();
                Some(tokio::spawn(uplink::run(
                    settings,
                    StoreSink(store.clone()),
                    uplink_state.clone(),
                    async move { stop.cancelled().await },
                )))
            }
            None => {
                warn!("no [uplink] configured: records stay in the outbox");
                None
            }
        };

        Ok(Daemon {
            store,
            writer: Some(writer),
            ingest_stats,
            uplink_state,
            http_addr,
            stop_ingest,
            stop_uplink,
            ingest_tasks,
            uplink_task,
        })
    }

    /// The address HTTP ingest is bound to, when configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    pub fn ingest_stats(&self) -> &Arc<IngestStats> {
        &self.ingest_stats
    }

    pub fn uplink_state(&self) -> &Arc<UplinkState> {
        &self.uplink_state
    }

    /// Stops taking input, lets the uplink drain for up to `drain` (so
    /// records committed just before still leave when the central side is
    /// reachable), then commits what is queued and stops the writer.
    pub async fn shutdown(mut self, drain: Duration) {
        self.stop_ingest.cancel();
        for task in self.ingest_tasks.drain(..) {
            if let Err(e) = task.await {
                warn!(error = %e, "ingest task ended abnormally");
            }
        }
        if let Some(task) = self.uplink_task.take() {
            let deadline = tokio::time::Instant::now() + drain;
            let stats = self.store.stats();
            while tokio::time::Instant::now() < deadline && stats.outbox_records() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.stop_uplink.cancel();
            if let Err(e) = task.await {
                warn!(error = %e, "uplink task ended abnormally");
            }
        }
        self.store.shutdown().await;
        if let Some(writer) = self.writer.take() {
            let joined = tokio::task::spawn_blocking(move || writer.join()).await;
            if joined.is_err() {
                warn!("store writer thread ended abnormally");
            }
        }
        info!("daemon stopped");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_ingest.cancel();
        self.stop_uplink.cancel();
    }
}

/// Adapts the store handle to the traits the ingest and uplink stages are
/// written against.
#[derive(Clone)]
struct StoreSink(StoreHandle);

impl EventSink for StoreSink {
    async fn submit(&self, events: Vec<Event>) -> Result<Vec<EventOutcome>, SubmitError> {
        self.0.submit(events).await
    }

    async fn dead_letter(&self, samples: Vec<DeadLetter>) {
        self.0.dead_letter(samples).await
    }
}

impl OutboxSource for StoreSink {
    async fn read(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<OutboxBatch, UplinkError> {
        let (records, dropped_through) = self
            .0
            .read_outbox(after, max_records, max_bytes)
            .await
            .map_err(|e| UplinkError::Outbox(e.to_string()))?;
        Ok(OutboxBatch {
            records,
            dropped_through,
        })
    }

    async fn acknowledge(&self, through: u64) -> Result<(), UplinkError> {
        self.0
            .ack_outbox(through)
            .await
            .map_err(|e| UplinkError::Outbox(e.to_string()))
    }

    async fn changed(&self) {
        self.0.outbox_changed().notified().await
    }
}
