//! The operator's window into a running daemon: Prometheus metrics,
//! liveness and readiness probes, and a JSON status document.
//!
//! Nothing here keeps counters of its own. [`Observed`] holds handles to
//! the stages' live statistics and reads them when asked, so a scrape
//! costs the pipeline nothing and every view (metrics, status, probes)
//! shows the same numbers. The routes are served on the `[admin]`
//! listener and, for single-port setups, `/metrics` and `/readyz` are
//! merged into the HTTP ingest router too (which has its own `/healthz`).

pub mod customers;
mod metrics;
mod readiness;
mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edge_config::SiteConfig;
use serde::Serialize;

use crate::ingest::{IngestSnapshot, IngestStats};
use crate::publish::PublisherState;
use crate::reload::{ReloadError, Reloader};
use crate::store::{OutboxSummary, StoreHandle, StoreStats};
use crate::uplink::UplinkState;

pub use metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;
pub use readiness::{Check, Readiness};
pub use status::{
    EventCounters, MqttStatus, OutboxStatus, RuleStatus, StatusReport, StoreCounters, UplinkStatus,
};

/// The Touchline version reported in metrics and status.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Path of the JSON status document on the admin listener.
pub const STATUS_PATH: &str = "/v1/status";

/// `POST` here reloads the rules (what `touchline reload` calls).
pub const RELOAD_PATH: &str = "/v1/reload";

/// Handles on the live state of one daemon, read on demand.
pub struct Observed {
    site: String,
    started_at_ms: i64,
    started: Instant,
    store: StoreHandle,
    ingest: Arc<IngestStats>,
    uplink: Arc<UplinkState>,
    publisher: Arc<PublisherState>,
    uplink_configured: bool,
    mqtt_configured: bool,
    http_configured: bool,
    outbox_max_bytes: u64,
    /// Set once HTTP ingest is bound.
    http_addr: OnceLock<SocketAddr>,
    stopping: AtomicBool,
}

/// One consistent read of the values that cost more than an atomic load.
pub(crate) struct Sample {
    ingest: IngestSnapshot,
    /// The committed outbox, or why the store could not be read.
    outbox: Result<OutboxSummary, String>,
    now_ms: i64,
}

impl Sample {
    /// The outbox as committed, or the writer's counters when the store
    /// cannot be read (then with the error).
    fn outbox_view(&self, stats: &StoreStats) -> (OutboxSummary, Option<String>) {
        match &self.outbox {
            Ok(summary) => (summary.clone(), None),
            Err(e) => (
                OutboxSummary {
                    records: stats.outbox_records(),
                    bytes: stats.outbox_bytes(),
                    oldest_seq: None,
                    oldest_at_ms: None,
                    next_seq: stats.next_seq(),
                    dropped_through: stats.dropped_through(),
                },
                Some(e.clone()),
            ),
        }
    }

    /// Seconds since the oldest waiting record's event time; `None` when
    /// the outbox is empty or unreadable. Never negative (event times may
    /// lie a little ahead of the site clock).
    fn oldest_age_seconds(&self) -> Option<f64> {
        let at = self.outbox.as_ref().ok()?.oldest_at_ms?;
        Some(self.now_ms.saturating_sub(at).max(0) as f64 / 1000.0)
    }
}

impl Observed {
    /// Starts the uptime clock.
    pub fn new(
        config: &SiteConfig,
        store: StoreHandle,
        ingest: Arc<IngestStats>,
        uplink: Arc<UplinkState>,
        publisher: Arc<PublisherState>,
    ) -> Observed {
        Observed {
            site: config.site.id.clone(),
            started_at_ms: crate::clock::now_ms(),
            started: Instant::now(),
            store,
            ingest,
            uplink,
            publisher,
            uplink_configured: config.uplink.is_some(),
            mqtt_configured: config.ingest.mqtt.is_some(),
            http_configured: config.ingest.http.is_some(),
            outbox_max_bytes: config.outbox.max_bytes,
            http_addr: OnceLock::new(),
            stopping: AtomicBool::new(false),
        }
    }

    /// Records that HTTP ingest is bound (a readiness condition).
    pub fn set_http_addr(&self, addr: SocketAddr) {
        let _ = self.http_addr.set(addr);
    }

    /// Marks the daemon as stopping: from now on it is not ready.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The readiness checks as of now (one store read).
    pub async fn readiness(&self) -> Readiness {
        self.readiness_of(&self.sample().await)
    }

    /// The `GET /v1/status` document as of now.
    pub async fn status(&self) -> StatusReport {
        status::report(self, &self.sample().await)
    }

    /// The `GET /metrics` exposition as of now.
    pub async fn metrics(&self) -> String {
        metrics::render(self, &self.sample().await)
    }

    async fn sample(&self) -> Sample {
        Sample {
            ingest: self.ingest.snapshot(),
            outbox: self.store.outbox_summary().await.map_err(|e| e.to_string()),
            now_ms: crate::clock::now_ms(),
        }
    }

    fn readiness_of(&self, sample: &Sample) -> Readiness {
        let mut r = Readiness { checks: Vec::new() };
        if self.stopping() {
            r.check("lifecycle", false, "stopping: taking no more input");
        } else {
            r.check("lifecycle", true, "running");
        }
        match &sample.outbox {
            Ok(_) => r.check("store", true, "open"),
            Err(e) => r.check("store", false, format!("cannot read the store: {e}")),
        }
        let rules = self.store.engine_stats().rules().len();
        r.check("rules", true, format!("{rules} rule(s) loaded"));
        if self.http_configured {
            match self.http_addr.get() {
                Some(addr) => r.check("http", true, format!("listening on {addr}")),
                None => r.check("http", false, "not listening yet"),
            }
        }
        if self.mqtt_configured {
            if sample.ingest.mqtt_connected {
                r.check("mqtt", true, "connected to the broker");
            } else {
                r.check("mqtt", false, "not connected to the broker");
            }
        }
        r
    }
}

/// `/metrics` and `/readyz`: the routes also merged into the HTTP
/// ingest router (which answers `/healthz` itself).
pub fn probe_routes(observed: Arc<Observed>) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/readyz", get(get_readyz))
        .with_state(observed)
}

/// Every admin route: [`probe_routes`] plus `/healthz`, `/v1/status`,
/// `POST /v1/reload` and the customer actions of [`customers`].
pub fn router(observed: Arc<Observed>, reloader: Arc<Reloader>) -> Router {
    Router::new()
        .route("/healthz", get(get_healthz))
        .route(STATUS_PATH, get(get_status))
        .with_state(observed.clone())
        .merge(probe_routes(observed.clone()))
        .merge(
            Router::new()
                .route(RELOAD_PATH, post(post_reload))
                .with_state(reloader),
        )
        .merge(customers::routes(observed.store.clone()))
        .merge(crate::fan_api::routes(observed.store.clone()))
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    observed: Arc<Observed>,
    reloader: Arc<Reloader>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(observed, reloader))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn get_healthz() -> &'static str {
    "ok"
}

async fn get_metrics(State(observed): State<Arc<Observed>>) -> Response {
    let body = observed.metrics().await;
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

#[derive(Serialize)]
struct ReadyBody<'a> {
    ready: bool,
    /// Names of the failing checks, mapped to why.
    not_ready: std::collections::BTreeMap<&'static str, &'a str>,
    checks: &'a [Check],
}

async fn get_readyz(State(observed): State<Arc<Observed>>) -> Response {
    let readiness = observed.readiness().await;
    let ready = readiness.ready();
    let body = ReadyBody {
        ready,
        not_ready: readiness
            .failing()
            .map(|c| (c.name, c.detail.as_str()))
            .collect(),
        checks: &readiness.checks,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn get_status(State(observed): State<Arc<Observed>>) -> Json<StatusReport> {
    Json(observed.status().await)
}

/// 200 with the [`crate::reload::ReloadReport`], or 422 with the errors
/// (the old rules stay active).
async fn post_reload(State(reloader): State<Arc<Reloader>>) -> Response {
    match reloader.reload().await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(e) => {
            let status = match e {
                ReloadError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let body = serde_json::json!({ "error": "reload_refused", "detail": e.to_string() });
            (status, Json(body)).into_response()
        }
    }
}
