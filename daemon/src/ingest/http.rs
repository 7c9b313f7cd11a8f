//! HTTP ingest: `POST /v1/events` with one CloudEvent or a batch.
//!
//! A 202 means committed: the handler awaits the store's commit before it
//! answers, so a client that got 202 never needs to resend. Batches are
//! split into elements before parsing so every element is judged on its
//! own; the valid ones commit even when neighbours are rejected, and the
//! answer lists the fate of each element by index. The body limit is
//! enforced while reading, never by buffering first.
//!
//! `router` is public so the daemon can merge more routes (metrics,
//! readiness) into the same listener.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edge_config::Validation;
use serde::Serialize;

use crate::event::{Event, EventOutcome, SubmitError};

use super::validate::{parse_event, split_batch, BatchError, RejectReason, Rejection};
use super::{count_outcomes, now_ms, EventSink, IngestStats};

/// What the HTTP source needs from the site configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpIngestConfig {
    pub validation: Validation,
    /// Largest request body in bytes; larger requests get 413 (config
    /// `ingest.http.max_body`, default 16 MiB).
    pub max_body: usize,
}

impl HttpIngestConfig {
    pub fn from_config(http: &edge_config::Http, validation: &Validation) -> HttpIngestConfig {
        HttpIngestConfig {
            validation: validation.clone(),
            max_body: http.max_body,
        }
    }
}

/// Content type for one event (`application/json` is taken as the same).
pub const CONTENT_TYPE_EVENT: &str = "application/cloudevents+json";
/// Content type for a JSON array of events.
pub const CONTENT_TYPE_BATCH: &str = "application/cloudevents-batch+json";

struct AppState<S> {
    sink: S,
    cfg: Arc<HttpIngestConfig>,
    stats: Arc<IngestStats>,
}

impl<S: Clone> Clone for AppState<S> {
    fn clone(&self) -> Self {
        AppState {
            sink: self.sink.clone(),
            cfg: Arc::clone(&self.cfg),
            stats: Arc::clone(&self.stats),
        }
    }
}

/// The ingest routes: `POST /v1/events` and `GET /healthz`. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so dead-letter
/// samples name the peer.
pub fn router<S: EventSink>(sink: S, cfg: HttpIngestConfig, stats: Arc<IngestStats>) -> Router {
    let max_body = cfg.max_body;
    let state = AppState {
        sink,
        cfg: Arc::new(cfg),
        stats,
    };
    Router::new()
        .route(
            "/v1/events",
            post(post_events::<S>).layer(DefaultBodyLimit::max(max_body)),
        )
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish (their commits included).
pub async fn serve<S: EventSink>(
    listener: tokio::net::TcpListener,
    sink: S,
    cfg: HttpIngestConfig,
    stats: Arc<IngestStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(sink, cfg, stats);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn healthz() -> &'static str {
    "ok"
}

#[derive(Clone, Copy)]
enum BodyKind {
    Single,
    Batch,
}

/// The fate of one event, as answered to the client.
#[derive(Serialize)]
struct ItemResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl ItemResult {
    fn outcome(index: Option<usize>, outcome: EventOutcome) -> ItemResult {
        let status = match outcome {
            EventOutcome::Committed { .. } => "accepted",
            EventOutcome::Duplicate => "duplicate",
        };
        ItemResult {
            index,
            status,
            reason: None,
            detail: None,
        }
    }

    fn rejected(index: Option<usize>, rejection: Rejection) -> ItemResult {
        ItemResult {
            index,
            status: "rejected",
            reason: Some(rejection.reason.label()),
            detail: Some(rejection.detail),
        }
    }
}

#[derive(Serialize)]
struct BatchResponse {
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    results: Vec<ItemResult>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    detail: String,
}

fn error_response(status: StatusCode, error: &str, detail: impl Into<String>) -> Response {
    let body = ErrorBody {
        error,
        detail: detail.into(),
    };
    (status, Json(body)).into_response()
}

/// 413, counted and sampled like any rejected input (without its body,
/// which was never read).
async fn too_large<S: EventSink>(
    app: &AppState<S>,
    now: i64,
    origin: &(dyn Fn() -> String + Sync),
) -> Response {
    let detail = format!(
        "the request body exceeds the limit of {} bytes",
        app.cfg.max_body
    );
    let refusal = Refusal::new(RejectReason::TooLarge, StatusCode::PAYLOAD_TOO_LARGE)
        .code("payload_too_large");
    refuse_request(app, refusal, detail, &[], now, origin).await
}

/// How a request refused as a whole is counted and answered.
struct Refusal {
    reason: RejectReason,
    status: StatusCode,
    /// The answer's error code; the reason's label unless set.
    code: &'static str,
}

impl Refusal {
    fn new(reason: RejectReason, status: StatusCode) -> Refusal {
        Refusal {
            reason,
            status,
            code: reason.label(),
        }
    }

    fn code(self, code: &'static str) -> Refusal {
        Refusal { code, ..self }
    }
}

/// A request refused as a whole, before any event in it was taken:
/// counted as one rejected input, `sample` (what of the body was read)
/// kept with it, and answered with the refusal's status and code.
async fn refuse_request<S: EventSink>(
    app: &AppState<S>,
    refusal: Refusal,
    detail: String,
    sample: &[u8],
    now: i64,
    origin: &(dyn Fn() -> String + Sync),
) -> Response {
    app.stats.add_received(1);
    let rejection = Rejection {
        reason: refusal.reason,
        detail: detail.clone(),
    };
    reject(app, vec![(sample, &rejection)], now, origin).await;
    error_response(refusal.status, refusal.code, detail)
}

/// The body kind from `Content-Type`, or why it is not acceptable.
fn body_kind(headers: &HeaderMap) -> Result<BodyKind, String> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err("Content-Type is missing".into());
    };
    let text = value.to_str().unwrap_or_default();
    let essence = text.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(CONTENT_TYPE_EVENT)
        || essence.eq_ignore_ascii_case("application/json")
    {
        Ok(BodyKind::Single)
    } else if essence.eq_ignore_ascii_case(CONTENT_TYPE_BATCH) {
        Ok(BodyKind::Batch)
    } else {
        Err(format!(
            "Content-Type {:?} is not supported",
            text.chars().take(100).collect::<String>()
        ))
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn post_events<S: EventSink>(State(app): State<AppState<S>>, req: Request) -> Response {
    let now = now_ms();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let origin = move || match peer {
        Some(peer) => format!("http:{peer}"),
        None => "http:unknown".to_string(),
    };
    let kind = match body_kind(req.headers()) {
        Ok(kind) => kind,
        Err(what) => {
            let detail = format!(
                "{what}; send {CONTENT_TYPE_EVENT} (one event) or {CONTENT_TYPE_BATCH} (a JSON array)"
            );
            let refusal = Refusal::new(
                RejectReason::UnsupportedMediaType,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            );
            return refuse_request(&app, refusal, detail, &[], now, &origin).await;
        }
    };
    let max_body = app.cfg.max_body;
    // Refuse a declared oversize body before reading any of it.
    if declared_length(req.headers()).is_some_and(|len| len > max_body as u64) {
        return too_large(&app, now, &origin).await;
    }
    // The route's `DefaultBodyLimit` caps what this reads (chunked bodies
    // included) at `max_body`.
    let body = match Bytes::from_request(req, &()).await {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return too_large(&app, now, &origin).await
        }
        Err(rejection) => {
            let refusal = Refusal::new(RejectReason::UnreadableBody, rejection.status());
            let detail = rejection.body_text();
            return refuse_request(&app, refusal, detail, &[], now, &origin).await;
        }
    };
    match kind {
        BodyKind::Single => single(&app, &body, now, &origin).await,
        BodyKind::Batch => batch(&app, &body, now, &origin).await,
    }
}

async fn single<S: EventSink>(
    app: &AppState<S>,
    body: &[u8],
    now: i64,
    origin: &(dyn Fn() -> String + Sync),
) -> Response {
    app.stats.add_received(1);
    let event = match parse_event(body, now, &app.cfg.validation) {
        Ok(event) => event,
        Err(rejection) => {
            reject(app, vec![(body, &rejection)], now, origin).await;
            return (
                StatusCode::BAD_REQUEST,
                Json(ItemResult::rejected(None, rejection)),
            )
                .into_response();
        }
    };
    match submit(app, vec![event]).await {
        Ok(outcomes) => match outcomes.first() {
            Some(&outcome) => (
                StatusCode::ACCEPTED,
                Json(ItemResult::outcome(None, outcome)),
            )
                .into_response(),
            None => outcome_mismatch(1, 0),
        },
        Err(error) => submit_error_response(app, error, now),
    }
}

async fn batch<S: EventSink>(
    app: &AppState<S>,
    body: &[u8],
    now: i64,
    origin: &(dyn Fn() -> String + Sync),
) -> Response {
    let parts = match split_batch(body) {
        Ok(parts) => parts,
        Err(error) => {
            let refusal = match error {
                BatchError::TooManyEvents => {
                    Refusal::new(RejectReason::TooLarge, StatusCode::PAYLOAD_TOO_LARGE)
                        .code("too_many_events")
                }
                _ => Refusal::new(RejectReason::InvalidJson, StatusCode::BAD_REQUEST)
                    .code("malformed_batch"),
            };
            return refuse_request(app, refusal, error.to_string(), body, now, origin).await;
        }
    };
    if parts.is_empty() {
        let refusal = Refusal::new(RejectReason::EmptyBatch, StatusCode::BAD_REQUEST);
        let detail = "the batch holds no events".to_string();
        return refuse_request(app, refusal, detail, body, now, origin).await;
    }
    app.stats.add_received(parts.len() as u64);

    let mut events: Vec<Event> = Vec::with_capacity(parts.len());
    let mut event_index = Vec::with_capacity(parts.len());
    let mut rejections = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        match parse_event(part, now, &app.cfg.validation) {
            Ok(event) => {
                events.push(event);
                event_index.push(index);
            }
            Err(rejection) => rejections.push((index, *part, rejection)),
        }
    }
    let rejected = rejections.len() as u64;
    // Rejections are counted (and sampled) once the batch is answered
    // with them: a batch refused with 503 comes again, and its bad events
    // with it.
    let account = || {
        reject(
            app,
            rejections.iter().map(|(_, raw, r)| (*raw, r)).collect(),
            now,
            origin,
        )
    };
    // Results by index; accepted slots are filled in after the commit.
    let mut results: Vec<Option<ItemResult>> = (0..parts.len()).map(|_| None).collect();
    let status = if events.is_empty() {
        account().await;
        StatusCode::BAD_REQUEST
    } else {
        let submitted = events.len();
        let outcomes = match submit(app, events).await {
            Ok(outcomes) => outcomes,
            Err(error) => return submit_error_response(app, error, now),
        };
        account().await;
        if outcomes.len() != submitted {
            return outcome_mismatch(submitted, outcomes.len());
        }
        for (index, outcome) in event_index.into_iter().zip(outcomes) {
            results[index] = Some(ItemResult::outcome(Some(index), outcome));
        }
        StatusCode::ACCEPTED
    };
    for (index, _, rejection) in rejections {
        results[index] = Some(ItemResult::rejected(Some(index), rejection));
    }
    let results: Vec<ItemResult> = results.into_iter().flatten().collect();
    let duplicates = results.iter().filter(|r| r.status == "duplicate").count() as u64;
    let response = BatchResponse {
        accepted: results.len() as u64 - duplicates - rejected,
        duplicates,
        rejected,
        results,
    };
    (status, Json(response)).into_response()
}

/// Accounts for rejected inputs and stores their samples.
async fn reject<S: EventSink>(
    app: &AppState<S>,
    rejected: Vec<(&[u8], &Rejection)>,
    now: i64,
    origin: &(dyn Fn() -> String + Sync),
) {
    let samples: Vec<_> = rejected
        .into_iter()
        .filter_map(|(raw, rejection)| app.stats.record_rejection(origin, raw, rejection, now))
        .collect();
    if !samples.is_empty() {
        app.sink.dead_letter(samples).await;
    }
}

/// Submits and counts the outcomes.
async fn submit<S: EventSink>(
    app: &AppState<S>,
    events: Vec<Event>,
) -> Result<Vec<EventOutcome>, SubmitError> {
    let outcomes = app.sink.submit_within(events, SUBMIT_WAIT).await?;
    let (accepted, duplicates) = count_outcomes(&outcomes);
    app.stats.add_outcomes(accepted, duplicates);
    Ok(outcomes)
}

/// How long a request waits for room in the writer's queue before it is
/// answered 503: a client retries, and a request held longer keeps its
/// body in memory for nothing.
const SUBMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Maps a refusal to the HTTP answer the client acts on.
fn submit_error_response<S>(app: &AppState<S>, error: SubmitError, now: i64) -> Response {
    let detail = error.to_string();
    match error {
        SubmitError::OutboxFull | SubmitError::StoreFull | SubmitError::Busy => {
            app.stats.record_backpressure("http", &error, now);
            let code = match error {
                SubmitError::OutboxFull => "outbox_full",
                SubmitError::Busy => "store_busy",
                _ => "store_full",
            };
            let body = ErrorBody {
                error: code,
                detail,
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                Json(body),
            )
                .into_response()
        }
        SubmitError::Closed => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(ErrorBody {
                error: "store_closed",
                detail,
            }),
        )
            .into_response(),
        SubmitError::Storage(_) => {
            app.stats.add_submit_error();
            tracing::error!(error = %detail, "store failed an HTTP ingest submission");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "store_error", detail)
        }
    }
}

fn outcome_mismatch(expected: usize, got: usize) -> Response {
    tracing::error!(
        expected,
        got,
        "store returned a wrong number of outcomes; answering 500"
    );
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "store_error",
        format!("the store returned {got} outcomes for {expected} events"),
    )
}
