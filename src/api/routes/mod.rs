//! The lifecycle API's handlers (SPEC 9.1, 9.2): `create` (idempotency key,
//! the SendTalk call, the stored record and the `pending` event) and
//! `status`, with the bodies they answer.
//!
//! - `error`: [`ApiError`], the only type that turns a failure into an HTTP
//!   answer; its body has the shape of SPEC 2.3.
//! - `bearer`: the bearer-token check.
//! - `validate`: local validation of a create and its fingerprint.

mod bearer;
mod error;
mod validate;

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use super::sendtalk::{CreateRequest, ProviderError};
use super::store::{now_ms, IdemBegin, Record, Status, StoredAnswer};
use super::{rfc3339, Lifecycle};
use crate::payload::VerificationId;
use crate::routes::webhook::{request_id, with_request_id};
use bearer::authorize;
use error::render;
pub use error::{ApiError, ErrorBody, ErrorDetail};
use validate::{idempotency_key, parse_create, ValidCreate};

/// `POST /v1/verifications`'s body (SPEC 9.1).
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // documents the request; the handler parses the JSON value itself
#[schema(as = CreateVerificationRequest)]
pub struct CreateBodyDoc {
    /// 5-15 digits, E.164 without `+`.
    #[schema(rename = "userPhone", example = "6281212345678")]
    user_phone: String,
    /// `en` or `id`; defaults to `sendtalk.default_language`.
    #[schema(rename = "languageCode", example = "id")]
    language_code: Option<String>,
    /// 1-1440; defaults to `sendtalk.default_expiry_minutes`.
    #[schema(rename = "expiryMinutes", minimum = 1, maximum = 1440)]
    expiry_minutes: Option<u32>,
    /// An http(s) URL of at most 2048 characters.
    #[schema(rename = "appURL")]
    app_url: Option<String>,
}

/// The 201 answer of a create.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedBody {
    id: String,
    /// Always `pending`.
    status: String,
    user_phone: String,
    language_code: String,
    wa_link: String,
    wa_message: String,
    /// PNG of `waLink`, base64.
    qr_code: String,
    /// RFC 3339 UTC.
    created_at: String,
    /// RFC 3339 UTC.
    expires_at: String,
}

/// The answer of a status look-up; unknown fields are `null`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusBody {
    id: String,
    /// `pending`, `verified` or `expired`.
    status: String,
    user_phone: Option<String>,
    /// RFC 3339 UTC.
    created_at: Option<String>,
    /// RFC 3339 UTC.
    expires_at: Option<String>,
    /// Unix milliseconds, as SendTalk's webhook carries it.
    verified_time: Option<u64>,
}

/// Create a verification through SendTalk.
#[utoipa::path(
    post,
    path = "/v1/verifications",
    tag = "verifications",
    request_body = CreateBodyDoc,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1-255 printable ASCII; replays the stored answer for 24 h"),
    ),
    responses(
        (status = 201, description = "Created; the record is stored `pending` and a `pending` event is published", body = CreatedBody,
            headers(("Location" = String, description = "/v1/verifications/{id}"))),
        (status = 400, description = "invalid_json / invalid_payload (field named)", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 409, description = "in_flight: the first request with this Idempotency-Key is still running", body = ErrorBody),
        (status = 422, description = "provider_validation_failed / invalid_recipient / idempotency_key_reused", body = ErrorBody),
        (status = 502, description = "provider_unauthorized / provider_error", body = ErrorBody),
        (status = 503, description = "provider_insufficient_balance / provider_disabled / unavailable", body = ErrorBody),
        (status = 504, description = "provider_timeout: not retried; nothing stored", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(req: HttpRequest, body: Bytes, api: web::Data<Lifecycle>) -> HttpResponse {
    let started = Instant::now();
    let request_id = request_id(&req);
    let api = api.into_inner();
    let (response, outcome, phone) = create_inner(&req, &body, &api, &request_id).await;
    let status = response.status().as_u16();
    api.metrics.api_request("create", outcome);
    tracing::info!(
        request_id,
        endpoint = "create",
        user_phone = phone,
        outcome,
        status,
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        "api"
    );
    with_request_id(response, &request_id)
}

/// The create flow; returns the answer, the metric outcome and the masked
/// phone for the log line.
async fn create_inner(
    req: &HttpRequest,
    body: &[u8],
    api: &Arc<Lifecycle>,
    request_id: &str,
) -> (HttpResponse, &'static str, String) {
    // Answers given before SendTalk is called are never stored.
    let early = authorize(req, api)
        .and_then(|()| idempotency_key(req))
        .and_then(|key| parse_create(body, api).map(|valid| (key, valid)));
    let (key, valid) = match early {
        Ok(v) => v,
        Err(e) => return (e.error_response(), e.code(), String::new()),
    };
    let phone = crate::telemetry::mask_phone(&valid.request.user_phone);
    // From here on the work runs in a task of its own: a caller that hangs
    // up cannot cut it between SendTalk's answer and the durable event, nor
    // leave an idempotency key running until its marker expires.
    let job = run_create(api.clone(), key, valid, request_id.to_string());
    let (answer, replayed, outcome) = match tokio::spawn(job).await {
        Ok(done) => done,
        Err(e) => {
            let e = ApiError::Unavailable(format!("create task failed: {e}"));
            (e.to_answer(), false, e.code())
        }
    };
    (render(&answer, replayed), outcome, phone)
}

/// The idempotency check, the SendTalk call and what follows; returns the
/// answer, whether it is a replay, and the metric outcome.
async fn run_create(
    api: Arc<Lifecycle>,
    key: Option<String>,
    valid: ValidCreate,
    request_id: String,
) -> (StoredAnswer, bool, &'static str) {
    let request_id = request_id.as_str();
    if let Some(key) = &key {
        let refused = match api.store.idem_begin(key, &valid.fingerprint).await {
            Ok(IdemBegin::Started) => None,
            Ok(IdemBegin::Done(answer)) => return (answer, true, "replayed"),
            Ok(IdemBegin::Running) => Some(ApiError::InFlight),
            Ok(IdemBegin::Reused) => Some(ApiError::IdempotencyKeyReused),
            Err(e) => {
                tracing::error!(request_id, error = %e, "idempotency key could not be checked");
                Some(ApiError::Unavailable(e.to_string()))
            }
        };
        if let Some(e) = refused {
            return (e.to_answer(), false, e.code());
        }
    }
    let (answer, outcome) = match call_and_store(&api, &valid.request, request_id).await {
        Ok(answer) => (answer, "created"),
        Err(e) => {
            match &e {
                ApiError::Provider(ProviderError::Unauthorized(cause)) => {
                    tracing::error!(
                        request_id,
                        cause,
                        "SendTalk refused the relay's API key: check sendtalk.api_key"
                    );
                }
                ApiError::Provider(
                    p @ (ProviderError::Unexpected(_) | ProviderError::Timeout(_)),
                ) => {
                    tracing::error!(request_id, error = %p, "SendTalk create failed");
                }
                ApiError::Unavailable(cause) => {
                    tracing::error!(
                        request_id,
                        cause,
                        "verification created at SendTalk but not stored or announced"
                    );
                }
                _ => {}
            }
            (e.to_answer(), e.code())
        }
    };
    if let Some(key) = &key {
        if let Err(e) = api
            .store
            .idem_finish(key, &valid.fingerprint, &answer)
            .await
        {
            // The running marker expires; a retry then runs again.
            tracing::warn!(request_id, error = %e, "could not store the idempotent answer");
        }
    }
    (answer, false, outcome)
}

/// Calls SendTalk once; on success stores the record and makes the
/// `pending` event durable before answering 201.
async fn call_and_store(
    api: &Lifecycle,
    request: &CreateRequest,
    request_id: &str,
) -> Result<StoredAnswer, ApiError> {
    let created = api.sendtalk.create(request).await?;
    let created_at = now_ms();
    let expires_at = created_at + u64::from(request.expiry_minutes) * 60_000;
    let record = Record::pending(&created.id, &request.user_phone, created_at, expires_at);
    api.store
        .create_pending(&record)
        .await
        .map_err(|e| ApiError::Unavailable(format!("record not stored: {e}")))?;
    api.publish_event(&record, Status::Pending, request_id)
        .await
        .map_err(|e| ApiError::Unavailable(format!("pending event not durable: {e}")))?;
    let body = CreatedBody {
        id: created.id.clone(),
        status: Status::Pending.as_str().into(),
        user_phone: request.user_phone.clone(),
        language_code: request.language_code.clone(),
        wa_link: created.wa_link,
        wa_message: created.wa_message,
        qr_code: created.qr_code,
        created_at: rfc3339(created_at),
        expires_at: rfc3339(expires_at),
    };
    Ok(StoredAnswer {
        status: StatusCode::CREATED.as_u16(),
        body: serde_json::to_string(&body)
            .map_err(|e| ApiError::Unavailable(format!("answer not encodable: {e}")))?,
        location: Some(format!("/v1/verifications/{}", created.id)),
    })
}

/// Read a verification's status.
#[utoipa::path(
    get,
    path = "/v1/verifications/{id}",
    tag = "verifications",
    params(("id" = String, Path, description = "SendTalk's verification id")),
    responses(
        (status = 200, description = "pending, verified or expired; unknown fields null", body = StatusBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found: never seen by the relay", body = ErrorBody),
        (status = 503, description = "unavailable: the store does not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn status(
    req: HttpRequest,
    id: web::Path<String>,
    api: web::Data<Lifecycle>,
) -> HttpResponse {
    let started = Instant::now();
    let request_id = request_id(&req);
    let result = status_inner(&req, &id, &api).await;
    let (response, outcome) = match result {
        Ok(body) => (HttpResponse::Ok().json(body), "ok"),
        Err(e) => {
            if let ApiError::Unavailable(cause) = &e {
                tracing::error!(request_id, cause, "status look-up failed");
            }
            (e.error_response(), e.code())
        }
    };
    api.metrics.api_request("status", outcome);
    tracing::info!(
        request_id,
        endpoint = "status",
        verification_id = id.as_str(),
        outcome,
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        "api"
    );
    with_request_id(response, &request_id)
}

async fn status_inner(
    req: &HttpRequest,
    id: &str,
    api: &Lifecycle,
) -> Result<StatusBody, ApiError> {
    authorize(req, api)?;
    // An id that cannot be valid cannot have been seen.
    let id = VerificationId::parse(id).map_err(|_| ApiError::NotFound)?;
    let record = api
        .store
        .get(id.as_str())
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .ok_or(ApiError::NotFound)?;
    Ok(StatusBody {
        id: record.id.clone(),
        status: record.status_at(now_ms()).as_str().into(),
        user_phone: record.user_phone.clone(),
        created_at: record.created_at_ms.map(rfc3339),
        expires_at: record.expires_at_ms.map(rfc3339),
        verified_time: record.verified_time_ms,
    })
}

/// JSON 404 for every other path on the API listener.
pub async fn not_found() -> HttpResponse {
    ApiError::NotFound.error_response()
}

/// JSON 405 for other methods on an API path.
pub async fn method_not_allowed() -> HttpResponse {
    ApiError::MethodNotAllowed.error_response()
}
