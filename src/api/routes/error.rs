//! [`ApiError`]: every way a lifecycle API request can fail, and the one
//! mapping from a failure to an HTTP answer (status, SPEC 2.3 body,
//! `Retry-After`, `WWW-Authenticate`). [`render`] writes every answer of the
//! API, fresh or replayed for an idempotency key.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::sendtalk::ProviderError;
use crate::api::store::StoredAnswer;

/// `Retry-After` for 409: a create takes at most `sendtalk.timeout_ms`.
const IN_FLIGHT_RETRY_SECS: u64 = 5;
/// `Retry-After` for 503: a store or broker outage, or SendTalk's account.
const UNAVAILABLE_RETRY_SECS: u64 = 30;

/// Every way an API request can fail, each with exactly one answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: no bearer token, or none that matches.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// 400: the body does not parse.
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// 400: one field (or header) fails local validation.
    #[error("{message}")]
    InvalidPayload {
        /// The field as the caller spells it, or `""` for the whole body.
        field: &'static str,
        /// What is wrong with it, for the caller.
        message: String,
    },
    /// 422: the key came back with another body.
    #[error("this Idempotency-Key was used with another request body")]
    IdempotencyKeyReused,
    /// 409: the first request with the key has not finished.
    #[error("a request with this Idempotency-Key is still running")]
    InFlight,
    /// 404: an id never seen, or any other path.
    #[error("no verification with this id")]
    NotFound,
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// SendTalk's answer, mapped per [`ProviderError`] variant.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// 503: the store or the broker failed; the cause is logged only.
    #[error("the request could not be completed right now: {0}")]
    Unavailable(String),
}

/// SPEC 2.3's error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
#[allow(missing_docs)] // a `///` here would become its description in /openapi.json
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `invalid_payload`.
    code: String,
    message: String,
    /// The offending field, or `""`.
    field: String,
}

impl ApiError {
    /// The machine-readable `error.code` of the body; also the metric outcome.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidPayload { .. } => "invalid_payload",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::InFlight => "in_flight",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Provider(p) => match p {
                ProviderError::Validation { .. } => "provider_validation_failed",
                ProviderError::Unauthorized(_) => "provider_unauthorized",
                ProviderError::InvalidRecipient => "invalid_recipient",
                ProviderError::InsufficientBalance => "provider_insufficient_balance",
                ProviderError::Disabled => "provider_disabled",
                ProviderError::Timeout(_) => "provider_timeout",
                ProviderError::Unexpected(_) => "provider_error",
            },
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    fn field(&self) -> String {
        match self {
            ApiError::InvalidPayload { field, .. } => (*field).to_string(),
            ApiError::Provider(ProviderError::Validation { field, .. }) => field.clone(),
            ApiError::Provider(ProviderError::InvalidRecipient) => "userPhone".into(),
            _ => String::new(),
        }
    }

    /// What the caller reads; causes of 5xx stay in the log.
    fn public_message(&self) -> String {
        match self {
            ApiError::Provider(ProviderError::Unauthorized(_)) => {
                "SendTalk refused the relay's API key; the operator has been alerted".into()
            }
            ApiError::Provider(ProviderError::Unexpected(_)) => {
                "SendTalk answered in an unexpected way".into()
            }
            ApiError::Provider(ProviderError::Timeout(_)) => {
                "SendTalk did not answer in time; it may or may not have created the verification: retry with a new Idempotency-Key".into()
            }
            ApiError::Unavailable(_) => "the request could not be completed right now; retry later".into(),
            other => other.to_string(),
        }
    }

    fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.public_message(),
                field: self.field(),
            },
        })
        .unwrap_or_default()
    }

    /// The answer as stored for an idempotency key.
    pub(super) fn to_answer(&self) -> StoredAnswer {
        StoredAnswer {
            status: self.status_code().as_u16(),
            body: self.body(),
            location: None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::InvalidJson(_) | ApiError::InvalidPayload { .. } => StatusCode::BAD_REQUEST,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::InFlight => StatusCode::CONFLICT,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Provider(p) => match p {
                ProviderError::Validation { .. } | ProviderError::InvalidRecipient => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ProviderError::Unauthorized(_) | ProviderError::Unexpected(_) => {
                    StatusCode::BAD_GATEWAY
                }
                ProviderError::InsufficientBalance | ProviderError::Disabled => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                ProviderError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            },
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = render(&self.to_answer(), false);
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Renders a stored (or fresh) answer; `Retry-After` follows the status.
pub(super) fn render(answer: &StoredAnswer, replayed: bool) -> HttpResponse {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = HttpResponse::build(status);
    response.content_type("application/json");
    if let Some(location) = &answer.location {
        response.insert_header((header::LOCATION, location.as_str()));
    }
    match status {
        StatusCode::CONFLICT => {
            response.insert_header((header::RETRY_AFTER, IN_FLIGHT_RETRY_SECS));
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            response.insert_header((header::RETRY_AFTER, UNAVAILABLE_RETRY_SECS));
        }
        _ => {}
    }
    if replayed {
        response.insert_header(("Idempotent-Replayed", "true"));
    }
    response.body(answer.body.clone())
}
