//! Queries the venue app makes about a fan: rewards, progress,
//! leaderboards and open offers (the pull channel of next best action).
//!
//! Read-only and served from LMDB read transactions on the blocking pool,
//! so they never wait for the writer; they are mounted on the HTTP ingest
//! listener (where the app already talks to the site) and on `[admin]`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::store::boards::{BoardQuery, MAX_ROWS};
use crate::store::customers::MAX_CUSTOMER_LEN;
use crate::store::rewards::LIFETIME;
use crate::store::StoreHandle;

const DEFAULT_AROUND: usize = 3;
const DEFAULT_TOP: usize = 10;

pub fn routes(store: StoreHandle) -> Router {
    Router::new()
        .route("/v1/customers/{id}/rewards", get(rewards))
        .route("/v1/customers/{id}/progress", get(progress))
        .route("/v1/customers/{id}/offers", get(offers))
        .route("/v1/leaderboards/{category}", get(leaderboard))
        .with_state(store)
}

async fn rewards(State(store): State<StoreHandle>, Path(customer): Path<String>) -> Response {
    if let Err(e) = check_customer(&customer) {
        return bad_request(e);
    }
    match store.rewards(&customer).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}

async fn progress(State(store): State<StoreHandle>, Path(customer): Path<String>) -> Response {
    if let Err(e) = check_customer(&customer) {
        return bad_request(e);
    }
    match store.progress(&customer).await {
        Ok(rules) => {
            Json(serde_json::json!({ "customer": customer, "rules": rules })).into_response()
        }
        Err(e) => unavailable(e.to_string()),
    }
}

/// The customer's open offer instances, as the MQTT channel sends them.
async fn offers(State(store): State<StoreHandle>, Path(customer): Path<String>) -> Response {
    if let Err(e) = check_customer(&customer) {
        return bad_request(e);
    }
    match store.open_offers(&customer).await {
        Ok(list) => {
            Json(serde_json::json!({ "customer": customer, "offers": list })).into_response()
        }
        Err(e) => unavailable(e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct BoardParams {
    window: Option<String>,
    customer: Option<String>,
    around: Option<usize>,
    top: Option<usize>,
}

async fn leaderboard(
    State(store): State<StoreHandle>,
    Path(category): Path<String>,
    Query(p): Query<BoardParams>,
) -> Response {
    let window = p.window.unwrap_or_else(|| LIFETIME.to_string());
    if let Err(e) = check_window(&window) {
        return bad_request(e);
    }
    if category.is_empty() || category.len() > 64 {
        return bad_request("the category must be 1 to 64 bytes".into());
    }
    if let Some(c) = &p.customer {
        if let Err(e) = check_customer(c) {
            return bad_request(e);
        }
    }
    let query = BoardQuery {
        category,
        window,
        customer: p.customer,
        around: p.around.unwrap_or(DEFAULT_AROUND).min(MAX_ROWS),
        top: p.top.unwrap_or(DEFAULT_TOP).min(MAX_ROWS),
    };
    match store.leaderboard(query).await {
        Ok(board) => Json(board).into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}

/// `lifetime` or `day:YYYY-MM-DD`.
fn check_window(w: &str) -> Result<(), String> {
    if w == LIFETIME {
        return Ok(());
    }
    let valid_day = w.strip_prefix("day:").is_some_and(|d| {
        time::Date::parse(
            d,
            &time::macros::format_description!("[year]-[month]-[day]"),
        )
        .is_ok()
    });
    if valid_day {
        Ok(())
    } else {
        Err(format!(
            "window {w:?} is not `lifetime` or `day:YYYY-MM-DD`"
        ))
    }
}

fn check_customer(c: &str) -> Result<(), String> {
    if c.is_empty() || c.len() > MAX_CUSTOMER_LEN {
        Err(format!("customer ids are 1 to {MAX_CUSTOMER_LEN} bytes"))
    } else {
        Ok(())
    }
}

fn bad_request(detail: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": "bad_request", "detail": detail })),
    )
        .into_response()
}

fn unavailable(detail: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": "store_unavailable", "detail": detail })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_lifetime_or_a_day() {
        assert!(check_window("lifetime").is_ok());
        assert!(check_window("day:2026-11-23").is_ok());
        assert!(check_window("day:2026-13-01").is_err());
        assert!(check_window("week").is_err());
    }
}
