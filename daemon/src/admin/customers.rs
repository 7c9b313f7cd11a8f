//! Operator actions on customers: erasure on request and profile imports.
//!
//! Both become ordinary events submitted to the store, so they are
//! deduplicated, committed and (for erasure) reported upstream exactly
//! like events from the venue app; the answer comes after the commit.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::event::EventOutcome;
use crate::store::customers::{self, ImportError};
use crate::store::StoreHandle;

/// Path of a customer's erasure (`{id}` is the customer id).
pub const ERASE_PATH: &str = "/v1/customers/{id}/erase";
/// Path of a JSONL profile import.
pub const IMPORT_PATH: &str = "/v1/profiles/import";

/// Events per submission of a large import, so one import cannot hold
/// more than a few commits' worth of permits.
const IMPORT_CHUNK: usize = 1000;

/// The answer to an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    /// Profile updates committed.
    pub imported: u64,
    /// Lines seen before (same content), skipped.
    pub duplicates: u64,
    /// Lines that could not be used, with why.
    pub invalid: Vec<ImportError>,
}

pub fn routes(store: StoreHandle) -> Router {
    Router::new()
        .route(ERASE_PATH, post(erase))
        .route(IMPORT_PATH, post(import))
        .with_state(Arc::new(store))
}

async fn erase(State(store): State<Arc<StoreHandle>>, Path(customer): Path<String>) -> Response {
    let event = match customers::erase_event(&customer, crate::clock::now_ms()) {
        Ok(e) => e,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    match store.submit(vec![event]).await {
        Ok(_) => (
            StatusCode::OK,
            Json(serde_json::json!({ "erased": customer })),
        )
            .into_response(),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn import(State(store): State<Arc<StoreHandle>>, body: Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return problem(StatusCode::BAD_REQUEST, "the import is not UTF-8".into());
    };
    match import_text(&store, text).await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Submits a JSONL import in chunks; also used by the CLI when no daemon
/// runs and it opens the store itself.
pub async fn import_text(store: &StoreHandle, text: &str) -> Result<ImportReport, String> {
    let (events, invalid) = customers::import_events(text, crate::clock::now_ms());
    let mut report = ImportReport {
        imported: 0,
        duplicates: 0,
        invalid,
    };
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let chunk: Vec<_> = events.by_ref().take(IMPORT_CHUNK).collect();
        let outcomes = store
            .submit(chunk)
            .await
            .map_err(|e| format!("{e} (lines before this chunk were imported)"))?;
        for o in outcomes {
            match o {
                EventOutcome::Duplicate => report.duplicates += 1,
                EventOutcome::Committed { .. } => report.imported += 1,
            }
        }
    }
    Ok(report)
}

fn problem(status: StatusCode, detail: String) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": "refused", "detail": detail })),
    )
        .into_response()
}
