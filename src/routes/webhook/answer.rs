//! How a webhook ends: the one per-webhook log line, the outcome counter and
//! the HTTP answer, for an accepted event and for every refusal.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use super::Relay;
use super::RelayError;
use crate::metrics::Outcome;

/// How an accepted webhook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Accepted {
    Published,
    Queued,
    Dropped,
    Duplicate,
}

impl Accepted {
    fn outcome(self) -> Outcome {
        match self {
            Accepted::Published => Outcome::Published,
            Accepted::Queued => Outcome::Queued,
            Accepted::Dropped => Outcome::Dropped,
            Accepted::Duplicate => Outcome::Duplicate,
        }
    }
}

/// The event's identity for the per-webhook log line, once it parsed.
pub(super) struct Identity {
    pub id: String,
    /// Masked: the log never holds a whole phone number.
    pub phone: String,
}

/// The per-webhook log line, the outcome counter and the answer.
pub(super) fn answer(
    relay: &Relay,
    request_id: &str,
    result: Result<Accepted, RelayError>,
    identity: Option<&Identity>,
    elapsed: std::time::Duration,
) -> HttpResponse {
    let id = identity.map_or("", |i| i.id.as_str());
    let phone = identity.map_or("", |i| i.phone.as_str());
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    match result {
        Ok(accepted) => {
            relay.metrics.webhook(accepted.outcome());
            let (status, result) = match accepted {
                Accepted::Published => (StatusCode::OK, "published"),
                Accepted::Queued => (StatusCode::ACCEPTED, "queued"),
                Accepted::Dropped => (StatusCode::OK, "dropped"),
                Accepted::Duplicate => (StatusCode::OK, "duplicate"),
            };
            tracing::info!(
                request_id,
                verification_id = id,
                user_phone = phone,
                outcome = accepted.outcome().as_str(),
                status = status.as_u16(),
                latency_ms,
                "webhook"
            );
            HttpResponse::build(status).json(serde_json::json!({"result": result, "id": id}))
        }
        Err(error) => {
            relay.metrics.webhook(error.outcome());
            let status = error.status_code().as_u16();
            if status >= 500 {
                tracing::error!(request_id, verification_id = id, user_phone = phone, outcome = error.outcome().as_str(), status, latency_ms, error = %error, "webhook");
            } else {
                tracing::info!(
                    request_id,
                    verification_id = id,
                    user_phone = phone,
                    outcome = error.outcome().as_str(),
                    status,
                    latency_ms,
                    code = error.code(),
                    field = error.field(),
                    "webhook"
                );
            }
            error.error_response()
        }
    }
}
