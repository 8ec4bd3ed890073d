//! The simulator's own endpoints, which SendTalk does not have: the user's
//! side of the flow (`POST /sim/verifications/{id}/complete`, "the user sent
//! the WhatsApp message"), the delivery log (`GET /sim/deliveries`) and
//! liveness (`GET /healthz`). Errors use the `{code, message, field}` object
//! of SendTalk's envelope, under `error`.

use actix_web::{web, HttpResponse, ResponseError};
use serde::Deserialize;
use serde_json::json;

use crate::delivery::{self, WebhookEvent};
use crate::state::AppState;

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no verification with this id was created")]
    NotFound,
    #[error("body must be empty or a JSON object like {{\"userPhone\": \"...\"}}: {0}")]
    InvalidBody(serde_json::Error),
}

impl ResponseError for ControlError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        match self {
            ControlError::NotFound => actix_web::http::StatusCode::NOT_FOUND,
            ControlError::InvalidBody(_) => actix_web::http::StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let (code, field) = match self {
            ControlError::NotFound => ("not_found", "id"),
            ControlError::InvalidBody(_) => ("invalid_payload", ""),
        };
        HttpResponse::build(self.status_code()).json(json!({
            "error": {"code": code, "message": self.to_string(), "field": field}
        }))
    }
}

/// Optional body of `complete`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CompleteBody {
    /// Sent instead of the phone the verification was created for, to test
    /// how a receiver handles a mismatch. Not checked: any string goes.
    user_phone: Option<String>,
}

/// Plays the user sending the WhatsApp message: delivers the `verified`
/// webhook (with retries) and answers how the delivery went: 200 when a
/// 2xx answer came back, 502 when every attempt failed. A verification may
/// be completed again, which re-sends it (a provider's duplicate delivery).
pub async fn complete(
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ControlError> {
    let id = path.into_inner();
    let known = uuid::Uuid::parse_str(&id)
        .ok()
        .and_then(|uuid| state.verification(&uuid))
        .ok_or(ControlError::NotFound)?;
    let overrides: CompleteBody = if body.iter().all(u8::is_ascii_whitespace) {
        CompleteBody::default()
    } else {
        serde_json::from_slice(&body).map_err(ControlError::InvalidBody)?
    };
    let phone = overrides.user_phone.unwrap_or(known.user_phone);
    let event = WebhookEvent::verified(id, phone);
    let summary = delivery::deliver(&state, &event).await;
    let mut answer = if summary.delivered {
        HttpResponse::Ok()
    } else {
        HttpResponse::BadGateway()
    };
    Ok(answer.json(summary))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveriesQuery {
    /// Only the attempts for this verification.
    verification_id: Option<String>,
}

/// Every delivery attempt, oldest first, as a JSON array.
pub async fn deliveries(
    query: web::Query<DeliveriesQuery>,
    state: web::Data<AppState>,
) -> HttpResponse {
    HttpResponse::Ok().json(state.attempts(query.verification_id.as_deref()))
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}
