//! [`RelayError`]: every way a webhook can fail, and the one place that turns
//! a failure into an HTTP answer (status, headers, JSON body naming the
//! field).

use std::time::Duration;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::auth::AuthError;
use crate::metrics::Outcome;
use crate::payload::PayloadError;

/// `Retry-After` for 409: the competing request usually finishes within the
/// confirm timeout.
const IN_FLIGHT_RETRY_SECS: u64 = 5;
/// `Retry-After` for 503: long enough for a broker or Redis to come back.
const UNAVAILABLE_RETRY_SECS: u64 = 30;

/// Every way a webhook can fail, each with exactly one HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// 413: `Content-Length` or the bytes received exceed
    /// `http.max_body_bytes` (the limit is carried).
    #[error("body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    /// 400: the connection failed while the body was being read.
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    /// 408: the body did not arrive within [`super::BODY_READ_TIMEOUT`].
    #[error("the request body was not received in time")]
    BodyTimeout,
    /// 401: the signature or secret check failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// 400, 415 or 422: the body is not a relayable event.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// 409: another request holds the dedup claim on this id.
    #[error("this verification id is being processed right now")]
    InFlight,
    /// 503: the dedup store is down with `dedup.on_unavailable = "reject"`,
    /// or the event could be neither confirmed nor spooled; the cause is
    /// logged, never answered.
    #[error("the event could not be made durable: {0}")]
    Unavailable(String),
    /// 404: any path of the public listener but the webhook's.
    #[error("no such endpoint")]
    NotFound,
    /// 405: a method other than POST on the webhook path.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 429: the client's rate limit is spent; carries how long until it
    /// may try again (`Retry-After`).
    #[error("too many requests from this client")]
    RateLimited(Duration),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    field: &'a str,
}

impl RelayError {
    pub(super) fn code(&self) -> &'static str {
        match self {
            RelayError::PayloadTooLarge(_) => "payload_too_large",
            RelayError::BodyRead(_) => "invalid_request",
            RelayError::BodyTimeout => "request_timeout",
            RelayError::Auth(AuthError::MissingSignature) => "missing_signature",
            RelayError::Auth(AuthError::InvalidSignature) => "invalid_signature",
            RelayError::Auth(AuthError::StaleTimestamp) => "stale_timestamp",
            RelayError::Payload(PayloadError::UnsupportedMediaType) => "unsupported_media_type",
            RelayError::Payload(PayloadError::InvalidJson(_)) => "invalid_json",
            RelayError::Payload(PayloadError::InvalidPayload { .. }) => "invalid_payload",
            RelayError::Payload(PayloadError::UnsupportedStatus(_)) => "unsupported_status",
            RelayError::Payload(PayloadError::StaleEvent(_)) => "stale_event",
            RelayError::InFlight => "in_flight",
            RelayError::Unavailable(_) => "unavailable",
            RelayError::NotFound => "not_found",
            RelayError::MethodNotAllowed => "method_not_allowed",
            RelayError::RateLimited(_) => "rate_limited",
        }
    }

    pub(super) fn field(&self) -> &'static str {
        match self {
            RelayError::Payload(p) => p.field_name(),
            _ => "",
        }
    }

    /// What the sender reads. 5xx causes stay in the log, not the body.
    fn public_message(&self) -> String {
        match self {
            RelayError::Unavailable(_) => {
                "the event could not be accepted right now; retry later".into()
            }
            other => other.to_string(),
        }
    }

    /// The `outcome` label this failure counts under in `webhooks_total`.
    pub fn outcome(&self) -> Outcome {
        match self {
            RelayError::Auth(_) => Outcome::RejectedAuth,
            RelayError::InFlight => Outcome::InFlight,
            RelayError::Unavailable(_) => Outcome::Unavailable,
            _ => Outcome::RejectedPayload,
        }
    }
}

impl ResponseError for RelayError {
    fn status_code(&self) -> StatusCode {
        match self {
            RelayError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RelayError::BodyRead(_)
            | RelayError::Payload(
                PayloadError::InvalidJson(_) | PayloadError::InvalidPayload { .. },
            ) => StatusCode::BAD_REQUEST,
            RelayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            RelayError::Auth(_) => StatusCode::UNAUTHORIZED,
            RelayError::Payload(PayloadError::UnsupportedMediaType) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            RelayError::Payload(
                PayloadError::UnsupportedStatus(_) | PayloadError::StaleEvent(_),
            ) => StatusCode::UNPROCESSABLE_ENTITY,
            RelayError::InFlight => StatusCode::CONFLICT,
            RelayError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RelayError::NotFound => StatusCode::NOT_FOUND,
            RelayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RelayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            RelayError::InFlight => {
                response.insert_header((header::RETRY_AFTER, IN_FLIGHT_RETRY_SECS));
            }
            RelayError::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, UNAVAILABLE_RETRY_SECS));
            }
            RelayError::MethodNotAllowed => {
                response.insert_header((header::ALLOW, "POST"));
            }
            RelayError::RateLimited(wait) => {
                response.insert_header((header::RETRY_AFTER, wait.as_secs().max(1)));
            }
            RelayError::Auth(_) => {
                response.insert_header((header::WWW_AUTHENTICATE, "Signature"));
            }
            _ => {}
        }
        response.json(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.public_message(),
                field: self.field(),
            },
        })
    }
}
