//! The webhook endpoint: the one place where the stages meet, in the order of
//! SPEC 2.2: body size -> authentication -> media type -> payload -> dedup
//! claim -> publish (or spool) -> dedup commit -> answer.
//!
//! [`RelayError`] is the only type that turns a failure into an HTTP answer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Verifier};
use crate::config::OnUnavailable;
use crate::dedup::{Claim, Dedup, LeaseToken};
use crate::message::{DedupMark, Envelope};
use crate::metrics::{Metrics, Outcome, Stage};
use crate::payload::{check_media_type, PayloadError, PayloadRules, VerificationEvent};
use crate::publish::Sink;
use crate::ratelimit::ClientLimits;
use crate::spool::Spool;

/// A sender that trickles its body is cut off after this long; SendTalk
/// sends ~150 bytes at once.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `Retry-After` for 409: the competing request usually finishes within the
/// confirm timeout.
const IN_FLIGHT_RETRY_SECS: u64 = 5;
/// `Retry-After` for 503: long enough for a broker or Redis to come back.
const UNAVAILABLE_RETRY_SECS: u64 = 30;
/// First allocation for a body; SendTalk's events are ~150 bytes.
const INITIAL_BODY_CAPACITY: usize = 1024;
/// At most one header-name diagnostic per this many seconds (SPEC 2.1).
const UNKNOWN_SCHEME_LOG_EVERY_SECS: i64 = 60;
/// Longest `X-Request-Id` taken from the caller; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Everything the webhook handler needs; built once by `startup`.
pub struct Relay {
    pub verifier: Verifier,
    pub rules: PayloadRules,
    pub dedup: Dedup,
    pub on_unavailable: OnUnavailable,
    pub sink: Arc<Sink>,
    /// `None` when `spool.enabled = false`.
    pub spool: Option<Spool>,
    pub metrics: Metrics,
    pub max_body_bytes: usize,
    pub limits: ClientLimits,
    /// Every webhook's pipeline after its body is read. The pipelines run on
    /// the main runtime, not on the HTTP workers', and `startup` awaits the
    /// tracker at shutdown: a confirmed publish always gets its dedup commit
    /// even when the HTTP workers are stopped at the grace deadline (SPEC 6).
    pub pipelines: TaskTracker,
    /// The runtime the pipelines run on (owned by `main` or the test).
    pub runtime: tokio::runtime::Handle,
    /// Rate-limits the header-name diagnostic of `missing_signature`.
    pub unknown_scheme_log: UnknownSchemeLog,
    /// The lifecycle API's hooks (SPEC 9.3); `None` when `api.enabled` is off.
    pub lifecycle: Option<Arc<crate::api::Lifecycle>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("verifier", &self.verifier)
            .field("dedup", &self.dedup)
            .finish()
    }
}

/// Every way a webhook can fail, each with exactly one HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("the request body was not received in time")]
    BodyTimeout,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("this verification id is being processed right now")]
    InFlight,
    #[error("the event could not be made durable: {0}")]
    Unavailable(String),
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
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
    fn code(&self) -> &'static str {
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

    fn field(&self) -> &'static str {
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
            RelayError::BodyRead(_) => StatusCode::BAD_REQUEST,
            RelayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            RelayError::Auth(_) => StatusCode::UNAUTHORIZED,
            RelayError::Payload(PayloadError::UnsupportedMediaType) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            RelayError::Payload(
                PayloadError::InvalidJson(_) | PayloadError::InvalidPayload { .. },
            ) => StatusCode::BAD_REQUEST,
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

/// How an accepted webhook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepted {
    Published,
    Queued,
    Duplicate,
}

impl Accepted {
    fn outcome(self) -> Outcome {
        match self {
            Accepted::Published => Outcome::Published,
            Accepted::Queued => Outcome::Queued,
            Accepted::Duplicate => Outcome::Duplicate,
        }
    }
}

/// What the per-webhook log line reports about the event, once known.
#[derive(Default)]
struct Trace {
    id: Option<String>,
    phone: Option<String>,
}

/// `POST {http.webhook_path}`.
pub async fn receive(
    req: HttpRequest,
    body: web::Payload,
    relay: web::Data<Relay>,
) -> HttpResponse {
    let started = Instant::now();
    let request_id = request_id(&req);
    let relay = relay.into_inner();
    let forwarded_for = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client = relay
        .limits
        .client_ip(req.peer_addr().map(|a| a.ip()), forwarded_for);
    if let Err(wait) = relay.limits.check(client) {
        // Refused before the body is read: a flood costs almost nothing.
        relay.metrics.rate_limited.inc();
        let client = client.map(|ip| ip.to_string()).unwrap_or_default();
        tracing::info!(
            request_id,
            client,
            outcome = "rate_limited",
            status = 429,
            "webhook"
        );
        return with_request_id(RelayError::RateLimited(wait).error_response(), &request_id);
    }
    let headers = req.headers().clone();
    let body = read_body(
        body,
        req.headers().get(header::CONTENT_LENGTH),
        relay.max_body_bytes,
    )
    .await;
    // The pipeline runs in a task of its own, tracked and on the main
    // runtime: a sender that hangs up cannot cancel it between the publish
    // and the dedup commit, and neither can the HTTP workers stopping.
    let (result, trace) = match body {
        Err(e) => (Err(e), Trace::default()),
        Ok(bytes) => {
            let pipeline = {
                let relay = relay.clone();
                let request_id = request_id.clone();
                async move {
                    let started = Instant::now();
                    let mut trace = Trace::default();
                    let result = handle(&relay, &headers, bytes, &request_id, &mut trace).await;
                    relay.metrics.stage(Stage::Total, started.elapsed());
                    (result, trace)
                }
            };
            match relay.pipelines.spawn_on(pipeline, &relay.runtime).await {
                Ok(done) => done,
                Err(e) => (
                    Err(RelayError::Unavailable(format!("webhook task failed: {e}"))),
                    Trace::default(),
                ),
            }
        }
    };
    let elapsed = started.elapsed();
    relay
        .metrics
        .request_duration
        .observe(elapsed.as_secs_f64());
    let id = trace.id.as_deref().unwrap_or("");
    let phone = trace.phone.as_deref().unwrap_or("");
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let response = match result {
        Ok(accepted) => {
            relay.metrics.webhook(accepted.outcome());
            tracing::info!(
                request_id,
                verification_id = id,
                user_phone = phone,
                outcome = accepted.outcome().as_str(),
                status = if accepted == Accepted::Queued {
                    202
                } else {
                    200
                },
                latency_ms,
                "webhook"
            );
            let (status, result) = match accepted {
                Accepted::Published => (StatusCode::OK, "published"),
                Accepted::Queued => (StatusCode::ACCEPTED, "queued"),
                Accepted::Duplicate => (StatusCode::OK, "duplicate"),
            };
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
    };
    with_request_id(response, &request_id)
}

/// Every answer carries the request id the log line and the message carry.
pub(crate) fn with_request_id(mut response: HttpResponse, request_id: &str) -> HttpResponse {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), value);
    }
    response
}

async fn handle(
    relay: &Relay,
    headers: &header::HeaderMap,
    body: Bytes,
    request_id: &str,
    trace: &mut Trace,
) -> Result<Accepted, RelayError> {
    let received_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now_secs = i64::try_from(received_at.as_secs()).unwrap_or(i64::MAX);
    let now_ms = u64::try_from(received_at.as_millis()).unwrap_or(u64::MAX);

    let authed = match relay.verifier.verify(headers, body, now_secs) {
        Ok(authed) => authed,
        Err(e) => {
            if e == AuthError::MissingSignature {
                relay.unknown_scheme_log.headers_seen(headers, now_secs);
            }
            return Err(e.into());
        }
    };
    let parsed = check_media_type(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes))
        .and_then(|()| VerificationEvent::parse(&authed, &relay.rules, now_ms));
    let event = match parsed {
        Ok(event) => event,
        Err(e) => {
            let reason = RelayError::Payload(e);
            relay
                .sink
                .quarantine(authed.bytes(), reason.code(), request_id)
                .await;
            return Err(reason);
        }
    };
    trace.id = Some(event.id.as_str().to_string());
    trace.phone = Some(event.user_phone.masked());

    let claim_started = Instant::now();
    let claimed = relay.dedup.claim(&event.id).await;
    relay.metrics.stage(Stage::Claim, claim_started.elapsed());
    let claim = match claimed {
        Ok(claim) => Some(claim),
        Err(e) => match relay.on_unavailable {
            OnUnavailable::Reject => return Err(RelayError::Unavailable(e.to_string())),
            OnUnavailable::Publish => {
                tracing::warn!(request_id, error = %e, "dedup store unavailable; publishing without a dedup check");
                relay.metrics.dedup_skipped.inc();
                None
            }
        },
    };
    let token: Option<LeaseToken> = match claim {
        Some(Claim::Duplicate) => return Ok(Accepted::Duplicate),
        Some(Claim::InFlight) => return Err(RelayError::InFlight),
        Some(Claim::Claimed(token)) => Some(token),
        None => None,
    };

    // Lifecycle API (SPEC 9.3): x-phone-match for an id created through it.
    let phone_match = match &relay.lifecycle {
        Some(lifecycle) => {
            lifecycle
                .phone_match(event.id.as_str(), event.user_phone.as_str())
                .await
        }
        None => None,
    };
    let envelope = Envelope {
        body: authed.bytes().clone(),
        message_id: event.id.as_str().to_string(),
        status: event.status.as_str().to_string(),
        request_id: request_id.to_string(),
        received_at_ms: now_ms,
        dedup: if token.is_some() {
            DedupMark::Checked
        } else {
            DedupMark::Skipped
        },
        verification_id: Some(event.id.as_str().to_string()),
        phone_match,
    };
    let accepted = match make_durable(relay, &envelope).await {
        Ok(accepted) => accepted,
        Err(e) => {
            if let Some(token) = &token {
                if let Err(release) = relay.dedup.release(&event.id, token).await {
                    tracing::warn!(request_id, error = %release, "could not release the dedup claim; it will expire");
                }
            }
            return Err(e);
        }
    };
    if let Some(token) = &token {
        // The event is safe now; a failed commit only weakens dedup.
        let commit_started = Instant::now();
        let committed = relay
            .dedup
            .commit(&event.id, token, &event.status, event.verified_time)
            .await;
        relay.metrics.stage(Stage::Commit, commit_started.elapsed());
        if let Err(e) = committed {
            relay.metrics.dedup_commit_failed.inc();
            tracing::warn!(request_id, verification_id = event.id.as_str(), error = %e, "dedup commit failed after the event was made durable");
        }
    }
    // Lifecycle API (SPEC 9.2): the record turns verified once the event is safe.
    if let Some(lifecycle) = &relay.lifecycle {
        lifecycle
            .record_verified(
                event.id.as_str(),
                event.user_phone.as_str(),
                event.verified_time.millis(),
            )
            .await;
    }
    Ok(accepted)
}

/// Publishes with confirm, or spools when the broker cannot take the event
/// (shared with the lifecycle API's events: [`crate::durable`]); the
/// webhook's publish and spool stages are timed.
async fn make_durable(relay: &Relay, envelope: &Envelope) -> Result<Accepted, RelayError> {
    match crate::durable::make_durable(
        &relay.sink,
        relay.spool.as_ref(),
        envelope,
        Some(&relay.metrics),
    )
    .await
    {
        Ok(crate::durable::Durable::Published) => Ok(Accepted::Published),
        Ok(crate::durable::Durable::Queued) => Ok(Accepted::Queued),
        Err(e) => Err(RelayError::Unavailable(e.0)),
    }
}

/// Reads the body, refusing it as soon as it is known to exceed `max`.
fn read_body(
    mut payload: web::Payload,
    content_length: Option<&HeaderValue>,
    max: usize,
) -> impl std::future::Future<Output = Result<Bytes, RelayError>> {
    let declared = content_length
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    async move {
        if declared.is_some_and(|len| len > max as u64) {
            return Err(RelayError::PayloadTooLarge(max));
        }
        let read = async {
            // Sized for a typical event, not from Content-Length: a declared
            // length is only a claim until the bytes arrive.
            let mut buffer = BytesMut::with_capacity(INITIAL_BODY_CAPACITY.min(max));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| RelayError::BodyRead(e.to_string()))?;
                if buffer.len() + chunk.len() > max {
                    return Err(RelayError::PayloadTooLarge(max));
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(buffer.freeze())
        };
        tokio::time::timeout(BODY_READ_TIMEOUT, read)
            .await
            .unwrap_or(Err(RelayError::BodyTimeout))
    }
}

/// Takes the caller's `X-Request-Id` when it is short and printable,
/// otherwise makes a new one (the lifecycle API takes it the same way).
pub(crate) fn request_id(req: &HttpRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.bytes().all(|b| (0x21..=0x7e).contains(&b))
        })
        .map(String::from)
        .unwrap_or_else(|| crate::telemetry::fast_uuid().to_string())
}

/// JSON 404 for every other path on the public listener.
pub async fn not_found() -> Result<HttpResponse, RelayError> {
    Err(RelayError::NotFound)
}

/// JSON 405 for other methods on the webhook path.
pub async fn method_not_allowed() -> Result<HttpResponse, RelayError> {
    Err(RelayError::MethodNotAllowed)
}

/// Logs the header names (never values) of a request refused with
/// `missing_signature`, at most once a minute, so that an operator can see
/// how the provider really sends its secret (SPEC 2.1).
#[derive(Debug, Default)]
pub struct UnknownSchemeLog {
    /// Unix seconds of the last line; 0 before the first.
    last_secs: std::sync::atomic::AtomicI64,
}

impl UnknownSchemeLog {
    fn headers_seen(&self, headers: &header::HeaderMap, now_secs: i64) {
        use std::sync::atomic::Ordering;
        let last = self.last_secs.load(Ordering::Acquire);
        if last != 0 && now_secs - last < UNKNOWN_SCHEME_LOG_EVERY_SECS {
            return;
        }
        if self
            .last_secs
            .compare_exchange(last, now_secs, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let mut names: Vec<&str> = headers.keys().map(header::HeaderName::as_str).collect();
        names.sort_unstable();
        names.dedup();
        tracing::warn!(
            header_names = names.join(","),
            "webhook refused with missing_signature; these are the headers it carried (names only, at most once a minute)"
        );
    }
}
