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

use crate::admin::{self, Observed};
use crate::event::{DeadLetter, Event, EventOutcome, SubmitError};
use crate::ingest::gate::{self, IntakeGate};
use crate::ingest::{self, EventSink, IngestStats};
use crate::instance::{InstanceLock, LockError};
use crate::publish::{self, PublisherSettings, PublisherState};
use crate::reload::Reloader;
use crate::store::{Rebase, Store, StoreHandle, WriterThread};
use crate::uplink::{self, OutboxBatch, OutboxSource, UplinkError, UplinkSettings, UplinkState};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    AlreadyRunning(#[from] LockError),
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the uplink: {0}")]
    Uplink(String),
    #[error("cannot listen for [admin] on {addr}: {source}")]
    AdminListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How long shutdown waits for admitted HTTP requests to commit.
const IN_FLIGHT_LIMIT: Duration = Duration::from_secs(10);

/// A running daemon. Dropping it without `shutdown` aborts its tasks.
pub struct Daemon {
    store: StoreHandle,
    writer: Option<WriterThread>,
    ingest_stats: Arc<IngestStats>,
    uplink_state: Arc<UplinkState>,
    http_addr: Option<SocketAddr>,
    /// Stops MQTT ingest (a clean disconnect after its last acks).
    stop_mqtt: CancellationToken,
    mqtt_task: Option<JoinHandle<()>>,
    /// HTTP keeps answering (503 for input) until the very end.
    gate: Arc<IntakeGate>,
    stop_http: CancellationToken,
    http_task: Option<JoinHandle<()>>,
    stop_uplink: CancellationToken,
    uplink_task: Option<JoinHandle<()>>,
    /// Publishes queued MQTT messages (with `[ingest.mqtt]`).
    stop_publisher: CancellationToken,
    publisher_task: Option<JoinHandle<()>>,
    reloader: Arc<Reloader>,
    /// Released last, when everything else has stopped.
    _lock: InstanceLock,
    observed: Arc<Observed>,
    admin_addr: Option<SocketAddr>,
    stop_admin: CancellationToken,
    admin_task: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Opens the store, starts every configured stage and returns once they
    /// are accepting work. HTTP may listen on port 0; see [`Daemon::http_addr`].
    pub async fn start(config: SiteConfig, rules: RuleBundle) -> Result<Daemon, StartError> {
        let lock = InstanceLock::acquire(&config.site.data_dir)?;
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
        let stop_mqtt = CancellationToken::new();
        let stop_http = CancellationToken::new();
        let gate = Arc::new(IntakeGate::default());
        let stop_uplink = CancellationToken::new();
        let reloader = Arc::new(Reloader::new(config.clone(), rules.clone(), store.clone()));
        let sink = StoreSink(store.clone());
        let publisher_state = Arc::new(PublisherState::default());
        let observed = Arc::new(Observed::new(
            &config,
            store.clone(),
            ingest_stats.clone(),
            uplink_state.clone(),
            publisher_state.clone(),
        ));
        // Bound before anything starts, so a taken port fails the start
        // cleanly; served once every stage is up.
        let admin_listener = match &config.admin {
            Some(a) => {
                let listen_err = |source| StartError::AdminListen {
                    addr: a.listen,
                    source,
                };
                let listener = tokio::net::TcpListener::bind(a.listen)
                    .await
                    .map_err(listen_err)?;
                let addr = listener.local_addr().map_err(listen_err)?;
                Some((listener, addr))
            }
            None => None,
        };

        let mut http_addr = None;
        let mut http_task = None;
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
            observed.set_http_addr(addr);
            info!(%addr, "HTTP ingest listening (also /metrics, /readyz, /healthz)");
            let cfg = ingest::http::HttpIngestConfig {
                validation: config.ingest.validation.clone(),
                max_body: http.max_body,
            };
            let stop = stop_http.clone();
            let app = gate::guard(
                ingest::http::router(sink.clone(), cfg, ingest_stats.clone()),
                gate.clone(),
            )
            .merge(admin::probe_routes(observed.clone()))
            .merge(crate::fan_api::routes(store.clone()));
            let serve = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await });
            http_task = Some(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    error!(error = %e, "HTTP ingest failed");
                }
            }));
        }

        let mqtt_task = if let Some(mqtt) = &config.ingest.mqtt {
            info!(host = %mqtt.host, port = mqtt.port, topics = ?mqtt.topics, "MQTT ingest starting");
            let stop = stop_mqtt.clone();
            let run = ingest::mqtt::run(
                mqtt.clone(),
                config.ingest.validation.clone(),
                sink.clone(),
                ingest_stats.clone(),
                async move { stop.cancelled().await },
            );
            Some(tokio::spawn(async move {
                if let Err(e) = run.await {
                    error!(error = %e, "MQTT ingest failed");
                }
            }))
        } else {
            None
        };

        let stop_publisher = CancellationToken::new();
        let publisher_task = config.ingest.mqtt.as_ref().map(|mqtt| {
            let stop = stop_publisher.clone();
            tokio::spawn(publish::run(
                PublisherSettings::from_config(mqtt),
                store.clone(),
                publisher_state.clone(),
                async move { stop.cancelled().await },
            ))
        });

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

        let stop_admin = CancellationToken::new();
        let mut admin_addr = None;
        let mut admin_task = None;
        if let Some((listener, addr)) = admin_listener {
            admin_addr = Some(addr);
            info!(%addr, "admin listening (/metrics, /healthz, /readyz, /v1/status)");
            let stop = stop_admin.clone();
            let serve = admin::serve(listener, observed.clone(), reloader.clone(), async move {
                stop.cancelled().await
            });
            admin_task = Some(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    error!(error = %e, "admin listener failed");
                }
            }));
        }

        Ok(Daemon {
            store,
            writer: Some(writer),
            ingest_stats,
            uplink_state,
            http_addr,
            stop_mqtt,
            mqtt_task,
            gate,
            stop_http,
            http_task,
            stop_uplink,
            uplink_task,
            stop_publisher,
            publisher_task,
            reloader,
            _lock: lock,
            observed,
            admin_addr,
            stop_admin,
            admin_task,
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

    /// The address the `[admin]` listener is bound to, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Whether an `[uplink]` is configured (and running until shutdown).
    pub fn uplink_configured(&self) -> bool {
        self.uplink_task.is_some()
    }

    /// Reloads the rules from the config file the daemon started with.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Live metrics, readiness and status of this daemon.
    pub fn observed(&self) -> &Arc<Observed> {
        &self.observed
    }

    /// Stops taking input and lets what was taken finish: MQTT
    /// disconnects cleanly after acking what it committed (the broker
    /// keeps the rest of the persistent session for the next start), HTTP
    /// answers 503 to new input while admitted requests commit, the uplink
    /// gets up to `drain` to send what is in the outbox, then the writer
    /// commits what is queued and closes the store. Whatever the uplink
    /// could not send in time stays in the outbox for the next start.
    pub async fn shutdown(mut self, drain: Duration) {
        self.observed.set_stopping();
        self.gate.close();
        // Said once the gate is shut, so anyone watching the log knows that
        // from here on new input is refused.
        info!("input closed: new events are refused while the drain runs");
        self.stop_mqtt.cancel();
        if let Some(task) = self.mqtt_task.take() {
            if let Err(e) = task.await {
                warn!(error = %e, "MQTT ingest task ended abnormally");
            }
        }
        if !self.gate.wait_idle(IN_FLIGHT_LIMIT).await {
            warn!(
                in_flight = self.gate.in_flight(),
                "HTTP requests still unanswered after {IN_FLIGHT_LIMIT:?}; stopping anyway (their clients got no 202 and will resend)"
            );
        }
        // One grace period for everything still leaving the site.
        let deadline = tokio::time::Instant::now() + drain;
        if let Some(task) = self.publisher_task.take() {
            loop {
                match self.store.pending_publications().await {
                    Ok(n) if n > 0 && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(n) => {
                        if n > 0 {
                            info!(messages = n, "MQTT publications left for the next start");
                        }
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.stop_publisher.cancel();
            if let Err(e) = task.await {
                warn!(error = %e, "publisher task ended abnormally");
            }
        }
        if let Some(task) = self.uplink_task.take() {
            let stats = self.store.stats();
            let waiting = stats.outbox_records();
            if waiting > 0 {
                info!(records = waiting, grace = ?drain, "letting the uplink drain the outbox");
            }
            while tokio::time::Instant::now() < deadline && stats.outbox_records() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = stats.outbox_records();
            if left > 0 {
                info!(records = left, "outbox not empty at the end of the grace period; the records leave after the next start");
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
        // Last, so the drain can be watched (and 503s answered) to the end.
        self.stop_http.cancel();
        if let Some(task) = self.http_task.take() {
            if let Err(e) = task.await {
                warn!(error = %e, "HTTP ingest task ended abnormally");
            }
        }
        self.stop_admin.cancel();
        if let Some(task) = self.admin_task.take() {
            if let Err(e) = task.await {
                warn!(error = %e, "admin task ended abnormally");
            }
        }
        info!("daemon stopped");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_mqtt.cancel();
        self.stop_http.cancel();
        self.stop_uplink.cancel();
        self.stop_publisher.cancel();
        self.stop_admin.cancel();
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

    async fn submit_within(
        &self,
        events: Vec<Event>,
        wait: std::time::Duration,
    ) -> Result<Vec<EventOutcome>, SubmitError> {
        self.0.submit_within(events, wait).await
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

    async fn welcome(&self, central_mark: u64) -> Result<Option<Rebase>, UplinkError> {
        self.0
            .welcome(central_mark)
            .await
            .map_err(|e| UplinkError::Outbox(e.to_string()))
    }

    async fn changed(&self) {
        self.0.outbox_changed().notified().await
    }
}
