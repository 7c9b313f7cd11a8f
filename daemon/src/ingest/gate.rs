//! The intake gate: how HTTP ingest stops taking input on shutdown without
//! dropping what it already took.
//!
//! While the daemon drains, a client should learn at once to go elsewhere
//! or retry later (503 with `Retry-After`), not see its connection refused
//! or hang; and the shutdown must wait for requests already inside, whose
//! 202 promises a commit. Counting requests in before checking the gate
//! makes the two race-free: once `close` has been seen by a request it
//! answers 503, and every request that got past the check is counted.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio::sync::Notify;

/// Seconds a refused client is asked to wait.
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, Default)]
pub struct IntakeGate {
    closed: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl IntakeGate {
    /// From now on input requests are refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until every admitted request has been answered, at most
    /// `limit`; true when none is left.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Puts every request of `router` that brings input (anything but GET and
/// HEAD) behind `gate`.
pub fn guard(router: Router, gate: Arc<IntakeGate>) -> Router {
    router.layer(middleware::from_fn_with_state(gate, admit))
}

async fn admit(State(gate): State<Arc<IntakeGate>>, request: Request, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    // Counted before the check, and uncounted even when the client goes
    // away mid-request and this future is dropped.
    let _admitted = Admitted::new(&gate);
    if gate.is_closed() {
        return refuse();
    }
    next.run(request).await
}

struct Admitted<'a>(&'a IntakeGate);

impl<'a> Admitted<'a> {
    fn new(gate: &'a IntakeGate) -> Admitted<'a> {
        gate.in_flight.fetch_add(1, Ordering::SeqCst);
        Admitted(gate)
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn refuse() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, RETRY_AFTER_SECS)],
        Json(serde_json::json!({
            "error": "draining",
            "detail": "the daemon is shutting down; retry later or elsewhere",
        })),
    )
        .into_response()
}
