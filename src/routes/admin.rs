//! The admin listener: liveness, readiness and Prometheus metrics (SPEC 6).
//! It stays up through shutdown so orchestrators can watch readiness drop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::{web, HttpResponse};

use crate::metrics::Metrics;
use crate::publish::Sink;
use crate::spool::Spool;

/// What readiness looks at.
pub struct AdminState {
    pub metrics: Metrics,
    pub sink: Arc<Sink>,
    pub spool: Option<Spool>,
    /// Cleared when shutdown begins; owned by `startup`.
    pub accepting: Arc<AtomicBool>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("accepting", &self.accepting)
            .finish()
    }
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// 200 when an event can be made durable now: the broker is connected (and
/// not blocked) or the spool can take it (enabled, room left, not failing).
/// 503 while shutting down or when neither can take one.
pub async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let broker = state.sink.is_available();
    let spool = state.spool.as_ref().is_some_and(Spool::can_take);
    let accepting = state.accepting.load(Ordering::Acquire);
    let body = serde_json::json!({
        "ready": accepting && (broker || spool),
        "accepting": accepting,
        "broker": broker,
        "spool_has_room": state.spool.as_ref().is_some_and(|s| !s.is_failing() && s.can_take()),
        "spool_failing": state.spool.as_ref().is_some_and(Spool::is_failing),
    });
    if accepting && (broker || spool) {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
