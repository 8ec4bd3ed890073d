//! The webhook endpoint: the one place where the stages meet, in the order of
//! SPEC 2.2: body size -> authentication -> media type -> payload -> dedup
//! claim -> publish (or spool) -> dedup commit -> answer.
//!
//! - `error`: [`RelayError`], the only type that turns a failure into an
//!   HTTP answer.
//! - `request`: what is read off the HTTP request (body, request id).
//! - `answer`: the per-webhook log line and the answer.
//!
//! The pipeline after the body runs in a `webhook` span carrying the request
//! id and, once parsed, the verification id: every line a stage logs has
//! them. The one per-webhook line is written by `answer`, after the answer
//! is known, outside the span.

mod answer;
mod error;
mod request;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::Bytes;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::auth::{AuthError, AuthenticatedBody, Verifier};
use crate::dedup::OnUnavailable;
use crate::dedup::{Claim, Dedup, LeaseToken};
use crate::message::{DedupMark, Envelope};
use crate::metrics::{Metrics, Stage};
use crate::payload::{check_media_type, PayloadRules, VerificationEvent};
use crate::publish::Sink;
use crate::ratelimit::ClientLimits;
use crate::spool::Spool;

use answer::{answer, Accepted, Identity};
pub use error::RelayError;
pub(crate) use request::{request_id, with_request_id};
pub use request::{UnknownSchemeLog, BODY_READ_TIMEOUT};

/// Everything the webhook handler needs; built once by `startup`.
pub struct Relay {
    /// Checks the signature or secret of every request (SPEC 2.1).
    pub verifier: Verifier,
    /// Accepted statuses and the oldest `verifiedTime` taken (SPEC 2.2).
    pub rules: PayloadRules,
    /// Claims, commits and releases verification ids (SPEC 3).
    pub dedup: Dedup,
    /// What to do when the dedup store cannot answer.
    pub on_unavailable: OnUnavailable,
    /// Where events are published (shared with the drainer and the API).
    pub sink: Arc<Sink>,
    /// `None` when `spool.enabled = false`.
    pub spool: Option<Spool>,
    /// The app's registry.
    pub metrics: Metrics,
    /// `http.max_body_bytes`.
    pub max_body_bytes: usize,
    /// Per-client rate limit (off unless `http.rate_limit_per_sec` is set).
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
            .finish_non_exhaustive()
    }
}

/// What the pipeline hands back to the handler.
type PipelineResult = (Result<Accepted, RelayError>, Option<Identity>);

/// The receive time, read once per webhook.
#[derive(Clone, Copy)]
struct Received {
    secs: i64,
    millis: u64,
}

impl Received {
    fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            secs: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
            millis: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
        }
    }
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
    let body = request::read_body(
        body,
        req.headers().get(header::CONTENT_LENGTH),
        relay.max_body_bytes,
    )
    .await;
    // The pipeline runs in a task of its own, tracked and on the main
    // runtime: a sender that hangs up cannot cancel it between the publish
    // and the dedup commit, and neither can the HTTP workers stopping.
    let (result, identity) = match body {
        Err(e) => (Err(e), None),
        Ok(bytes) => {
            let span = tracing::info_span!(
                "webhook",
                request_id = request_id.as_str(),
                verification_id = tracing::field::Empty
            );
            let pipeline = pipeline(relay.clone(), headers, bytes, request_id.clone());
            match relay
                .pipelines
                .spawn_on(pipeline.instrument(span), &relay.runtime)
                .await
            {
                Ok(done) => done,
                Err(e) => (
                    Err(RelayError::Unavailable(format!("webhook task failed: {e}"))),
                    None,
                ),
            }
        }
    };
    let elapsed = started.elapsed();
    relay
        .metrics
        .request_duration
        .observe(elapsed.as_secs_f64());
    let response = answer(&relay, &request_id, result, identity.as_ref(), elapsed);
    with_request_id(response, &request_id)
}

/// Everything after the body is read, timed as the `total` stage.
async fn pipeline(
    relay: Arc<Relay>,
    headers: header::HeaderMap,
    body: Bytes,
    request_id: String,
) -> PipelineResult {
    let started = Instant::now();
    let received = Received::now();
    let done = match admit(&relay, &headers, body, &request_id, received).await {
        Err(e) => (Err(e), None),
        Ok((authed, event)) => {
            tracing::Span::current().record("verification_id", event.id.as_str());
            let identity = Identity {
                id: event.id.as_str().to_string(),
                phone: event.user_phone.masked(),
            };
            let result = relay_event(&relay, &authed, &event, request_id, received).await;
            (result, Some(identity))
        }
    };
    relay.metrics.stage(Stage::Total, started.elapsed());
    done
}

/// Authentication, media type and payload: the checks that need no I/O. A
/// body that authenticates but does not parse goes to the quarantine.
async fn admit(
    relay: &Relay,
    headers: &header::HeaderMap,
    body: Bytes,
    request_id: &str,
    received: Received,
) -> Result<(AuthenticatedBody, VerificationEvent), RelayError> {
    let authed = match relay.verifier.verify(headers, body, received.secs) {
        Ok(authed) => authed,
        Err(e) => {
            if e == AuthError::MissingSignature {
                relay
                    .unknown_scheme_log
                    .headers_seen(headers, received.secs);
            }
            return Err(e.into());
        }
    };
    let parsed = check_media_type(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes))
        .and_then(|()| VerificationEvent::parse(&authed, &relay.rules, received.millis));
    match parsed {
        Ok(event) => Ok((authed, event)),
        Err(e) => {
            let reason = RelayError::Payload(e);
            relay
                .sink
                .quarantine(authed.bytes(), reason.code(), request_id)
                .await;
            Err(reason)
        }
    }
}

/// Dedup claim, publish or spool, dedup commit (SPEC 3-5).
async fn relay_event(
    relay: &Relay,
    authed: &AuthenticatedBody,
    event: &VerificationEvent,
    request_id: String,
    received: Received,
) -> Result<Accepted, RelayError> {
    let claim_started = Instant::now();
    let claimed = relay.dedup.claim(&event.id).await;
    relay.metrics.stage(Stage::Claim, claim_started.elapsed());
    let claim = match claimed {
        Ok(claim) => Some(claim),
        Err(e) => match relay.on_unavailable {
            OnUnavailable::Reject => return Err(RelayError::Unavailable(e.to_string())),
            OnUnavailable::Publish => {
                tracing::warn!(error = %e, "dedup store unavailable; publishing without a dedup check");
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
        request_id,
        received_at_ms: received.millis,
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
                    tracing::warn!(error = %release, "could not release the dedup claim; it will expire");
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
            tracing::warn!(error = %e, "dedup commit failed after the event was made durable");
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
        Ok(crate::durable::Durable::Dropped) => Ok(Accepted::Dropped),
        Err(e) => Err(RelayError::Unavailable(e.0)),
    }
}

/// JSON 404 for every other path on the public listener.
pub async fn not_found() -> Result<HttpResponse, RelayError> {
    Err(RelayError::NotFound)
}

/// JSON 405 for other methods on the webhook path.
pub async fn method_not_allowed() -> Result<HttpResponse, RelayError> {
    Err(RelayError::MethodNotAllowed)
}
