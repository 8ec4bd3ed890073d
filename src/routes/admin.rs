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
    /// The app's registry, rendered by `/metrics`.
    pub metrics: Metrics,
    /// The webhook's sink: ready when it can publish now.
    pub sink: Arc<Sink>,
    /// The webhook's spool, if enabled: ready when it has room, even with
    /// the broker down.
    pub spool: Option<Spool>,
    /// Cleared when shutdown begins; owned by `startup`.
    pub accepting: Arc<AtomicBool>,
    /// `admin.tokens` and `admin.token_files`: the spool operations exist
    /// only when there is at least one (SPEC 5.1).
    pub tokens: Vec<secrecy::SecretString>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("accepting", &self.accepting)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

/// Liveness: 200 whenever the process can answer at all; it says nothing
/// about the broker or Redis, so an orchestrator does not restart the relay
/// for their outages.
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

/// The Prometheus text exposition of the app's registry.
pub async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    if let Some(spool) = &state.spool {
        spool.refresh_age();
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
