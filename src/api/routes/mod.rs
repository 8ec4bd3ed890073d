//! The lifecycle API's handlers (SPEC 9.1, 9.2): bearer-token auth, local
//! validation, idempotency keys, the SendTalk call and the answers.
//!
//! [`ApiError`] is the only type that turns a failure into an HTTP answer;
//! its body has the shape of SPEC 2.3.

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::Bytes;
use secrecy::ExposeSecret as _;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use utoipa::ToSchema;

use super::sendtalk::{CreateRequest, ProviderError};
use super::settings::{EXPIRY_MINUTES_RANGE, LANGUAGES};
use super::store::{now_ms, IdemBegin, Record, Status, StoredAnswer};
use super::{rfc3339, Lifecycle};
use crate::payload::{UserPhone, VerificationId};
use crate::routes::webhook::{request_id, with_request_id};

/// `Retry-After` for 409: a create takes at most `sendtalk.timeout_ms`.
const IN_FLIGHT_RETRY_SECS: u64 = 5;
/// `Retry-After` for 503: a store or broker outage, or SendTalk's account.
const UNAVAILABLE_RETRY_SECS: u64 = 30;
/// Longest `appURL` accepted (SPEC 9.1).
const MAX_APP_URL_LEN: usize = 2048;
/// Longest `Idempotency-Key` accepted (SPEC 9.1).
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Every way an API request can fail, each with exactly one answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{message}")]
    InvalidPayload {
        field: &'static str,
        message: String,
    },
    #[error("this Idempotency-Key was used with another request body")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still running")]
    InFlight,
    #[error("no verification with this id")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("the request could not be completed right now: {0}")]
    Unavailable(String),
}

/// SPEC 2.3's error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `invalid_payload`.
    code: String,
    message: String,
    /// The offending field, or `""`.
    field: String,
}

impl ApiError {
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
    fn to_answer(&self) -> StoredAnswer {
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
fn render(answer: &StoredAnswer, replayed: bool) -> HttpResponse {
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

/// A create request after local validation.
#[derive(Debug)]
struct ValidCreate {
    request: CreateRequest,
    /// Canonical digest of the body as a JSON value (for idempotency).
    fingerprint: String,
}

/// Checks `Authorization: Bearer <token>` against every configured token.
/// Each comparison is constant-time over SHA-256 digests, so neither the
/// content nor the length of a token leaks, and every token is compared.
fn authorize(req: &HttpRequest, api: &Lifecycle) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    let presented = Sha256::digest(presented.as_bytes());
    let mut ok = subtle::Choice::from(0u8);
    for token in &api.tokens {
        let expected = Sha256::digest(token.expose_secret().as_bytes());
        ok |= expected.as_slice().ct_eq(presented.as_slice());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn invalid(field: &'static str, message: &str) -> ApiError {
    ApiError::InvalidPayload {
        field,
        message: message.into(),
    }
}

/// The `Idempotency-Key` header, if any: 1-255 printable ASCII.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !bytes.iter().all(|b| (0x21..=0x7e).contains(b))
    {
        return Err(invalid(
            "Idempotency-Key",
            "Idempotency-Key must be 1-255 printable ASCII characters",
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// Local validation (SPEC 9.1), before anything is called or stored.
fn parse_create(body: &[u8], api: &Lifecycle) -> Result<ValidCreate, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(fields) = &value else {
        return Err(invalid("", "body must be a JSON object"));
    };
    let present = |k: &str| fields.get(k).filter(|v| !v.is_null());
    let user_phone = present("userPhone")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("userPhone", "userPhone must be 5-15 digits"))?;
    UserPhone::parse(user_phone)
        .map_err(|_| invalid("userPhone", "userPhone must be 5-15 digits"))?;
    let language_code = match present("languageCode") {
        None => api.default_language.clone(),
        Some(v) => v
            .as_str()
            .filter(|l| LANGUAGES.contains(l))
            .ok_or_else(|| invalid("languageCode", "languageCode must be `en` or `id`"))?
            .to_string(),
    };
    let expiry_minutes = match present("expiryMinutes") {
        None => api.default_expiry_minutes,
        Some(v) => v
            .as_u64()
            .filter(|_| v.is_u64())
            .and_then(|m| u32::try_from(m).ok())
            .filter(|m| EXPIRY_MINUTES_RANGE.contains(m))
            .ok_or_else(|| {
                invalid(
                    "expiryMinutes",
                    "expiryMinutes must be an integer from 1 to 1440",
                )
            })?,
    };
    let app_url = match present("appURL") {
        None => None,
        Some(v) => {
            let url = v
                .as_str()
                .filter(|u| u.len() <= MAX_APP_URL_LEN)
                .filter(|u| {
                    reqwest::Url::parse(u).is_ok_and(|p| {
                        matches!(p.scheme(), "http" | "https") && p.host_str().is_some()
                    })
                })
                .ok_or_else(|| {
                    invalid(
                        "appURL",
                        "appURL must be an http or https URL of at most 2048 characters",
                    )
                })?;
            Some(url.to_string())
        }
    };
    Ok(ValidCreate {
        request: CreateRequest {
            user_phone: user_phone.to_string(),
            language_code,
            expiry_minutes,
            app_url,
        },
        fingerprint: fingerprint(&value),
    })
}

/// SHA-256 of the body's canonical JSON (object keys sorted): "the same
/// body" means the same JSON value, whatever the key order or whitespace.
fn fingerprint(value: &Value) -> String {
    fn canonical(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String((*k).clone()).to_string());
                    out.push(':');
                    if let Some(v) = map.get(*k) {
                        canonical(v, out);
                    }
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    canonical(value, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":[1,2],"d":"x"}}"#).unwrap();
        let b: Value =
            serde_json::from_str("{ \"b\" : {\"d\":\"x\",\"c\":[1, 2]}, \"a\": 1 }").unwrap();
        let c: Value = serde_json::from_str(r#"{"a":2,"b":{"c":[1,2],"d":"x"}}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
