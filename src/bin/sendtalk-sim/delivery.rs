//! Webhook delivery: the documented body, the secret or signature header of
//! `--auth-mode`, and a bounded number of attempts with exponential backoff.
//! Every attempt, good or bad, is logged in the state for `GET
//! /sim/deliveries`.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use secrecy::ExposeSecret as _;
use serde::Serialize;
use sha2::Sha256;
use time::format_description::well_known::Rfc3339;

use crate::cli::{AuthMode, WebhookSettings};
use crate::state::AppState;

/// At most this much of the receiver's answer is kept per attempt: enough
/// for the relay's JSON answers, small enough for a long log.
const MAX_KEPT_BODY: usize = 512;

/// The documented webhook body, fields in the documented order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEvent {
    pub id: String,
    pub user_phone: String,
    pub status: &'static str,
    /// Unix milliseconds, as documented.
    pub verified_time: u64,
}

impl WebhookEvent {
    /// A `verified` event stamped now.
    pub fn verified(id: String, user_phone: String) -> Self {
        let now = time::OffsetDateTime::now_utc();
        let ms = now.unix_timestamp_nanos() / 1_000_000;
        Self {
            id,
            user_phone,
            status: "verified",
            verified_time: u64::try_from(ms).unwrap_or(0),
        }
    }
}

/// One attempt as listed by `GET /sim/deliveries`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryAttempt {
    pub verification_id: String,
    /// 1 for the first try.
    pub attempt: u32,
    pub url: String,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Why there was no answer (timeout, refused connection...).
    pub error: Option<String>,
    /// The start of the receiver's answer body.
    pub response_body: Option<String>,
    /// When the attempt started, RFC 3339 UTC.
    pub at: String,
    pub duration_ms: u64,
}

/// The answer of `complete`: how the delivery ended.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySummary {
    pub id: String,
    pub user_phone: String,
    pub verified_time: u64,
    /// A 2xx answer was received.
    pub delivered: bool,
    pub attempts: u32,
    pub final_status: Option<u16>,
    pub final_error: Option<String>,
    pub final_response_body: Option<String>,
}

/// Why no request could be built; recorded as the attempt's error.
#[derive(Debug, thiserror::Error)]
enum SignError {
    #[error("the secret is not a valid header value")]
    HeaderValue(#[from] reqwest::header::InvalidHeaderValue),
    #[error("the secret is not a valid HMAC key")]
    Key(#[from] hmac::digest::InvalidLength),
}

/// The header value for `body` in `mode`.
fn sign(settings: &WebhookSettings, body: &[u8]) -> Result<HeaderValue, SignError> {
    let secret = settings.secret.expose_secret();
    let mut value = match settings.mode {
        AuthMode::SecretHeader => HeaderValue::from_str(secret)?,
        AuthMode::HmacSha256 => {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())?;
            mac.update(body);
            let hex = hex::encode(mac.finalize().into_bytes());
            HeaderValue::from_str(&format!("sha256={hex}"))?
        }
    };
    // Keeps the secret out of any `Debug` of the request.
    value.set_sensitive(true);
    Ok(value)
}

/// Delivers `event`, retrying a non-2xx answer or a failed or timed-out
/// request up to the configured number of attempts; waits `first_backoff`
/// before the first retry and twice as long before each next one.
pub async fn deliver(state: &AppState, event: &WebhookEvent) -> DeliverySummary {
    let settings = &state.settings.webhook;
    // One body for every attempt: a retry is the same event, byte for byte.
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => return failed_before_sending(event, format!("serialising the body: {e}")),
    };
    let signature = match sign(settings, &body) {
        Ok(s) => s,
        Err(e) => return failed_before_sending(event, e.to_string()),
    };
    let mut backoff = settings.first_backoff;
    let mut last = Outcome::default();
    for attempt in 1..=settings.attempts {
        let started = Instant::now();
        let at = time::OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        last = send_once(state, settings, &body, &signature).await;
        tracing::info!(
            id = %event.id,
            attempt,
            status = last.status,
            error = last.error.as_deref(),
            "webhook delivery attempt"
        );
        state.log_attempt(DeliveryAttempt {
            verification_id: event.id.clone(),
            attempt,
            url: settings.url.to_string(),
            status: last.status,
            error: last.error.clone(),
            response_body: last.body.clone(),
            at,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
        if last.delivered() {
            return summary(event, attempt, last);
        }
        if attempt < settings.attempts {
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }
    summary(event, settings.attempts, last)
}

/// What one attempt got back.
#[derive(Default)]
struct Outcome {
    status: Option<u16>,
    error: Option<String>,
    body: Option<String>,
}

impl Outcome {
    fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

async fn send_once(
    state: &AppState,
    settings: &WebhookSettings,
    body: &[u8],
    signature: &HeaderValue,
) -> Outcome {
    let request = state
        .client
        .post(settings.url.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(settings.header.clone(), signature.clone())
        // Covers connecting, sending and reading the whole answer.
        .timeout(settings.timeout)
        .body(body.to_vec());
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::error(&e, settings.timeout),
    };
    let status = response.status().as_u16();
    match response.text().await {
        Ok(text) => Outcome {
            status: Some(status),
            error: None,
            body: Some(truncate(text)),
        },
        Err(e) => Outcome::error(&e, settings.timeout),
    }
}

impl Outcome {
    fn error(e: &reqwest::Error, timeout: Duration) -> Self {
        Outcome {
            status: None,
            error: Some(describe(e, timeout)),
            body: None,
        }
    }
}

/// reqwest's own message ("error sending request") hides the cause; the
/// chain of sources names it (connection refused, reset...).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {} ms", timeout.as_millis());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_KEPT_BODY {
        let mut end = MAX_KEPT_BODY;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn summary(event: &WebhookEvent, attempts: u32, last: Outcome) -> DeliverySummary {
    DeliverySummary {
        id: event.id.clone(),
        user_phone: event.user_phone.clone(),
        verified_time: event.verified_time,
        delivered: last.delivered(),
        attempts,
        final_status: last.status,
        final_error: last.error,
        final_response_body: last.body,
    }
}

fn failed_before_sending(event: &WebhookEvent, error: String) -> DeliverySummary {
    tracing::error!(id = %event.id, error = %error, "webhook not sent");
    summary(
        event,
        0,
        Outcome {
            error: Some(error),
            ..Outcome::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_the_documented_fields_in_order() {
        let event = WebhookEvent {
            id: "fc0977f2-baa9-476d-8a3d-128c622d5ff6".into(),
            user_phone: "628124630350".into(),
            status: "verified",
            verified_time: 1_692_847_205_385,
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"id":"fc0977f2-baa9-476d-8a3d-128c622d5ff6","userPhone":"628124630350","status":"verified","verifiedTime":1692847205385}"#
        );
    }

    #[test]
    fn a_fresh_event_is_stamped_in_milliseconds() {
        let event = WebhookEvent::verified("x".into(), "6281".into());
        // Between 2020 and 2100 in milliseconds.
        assert!((1_577_836_800_000..4_102_444_800_000).contains(&event.verified_time));
    }

    #[test]
    fn truncation_respects_characters() {
        let long = "é".repeat(MAX_KEPT_BODY);
        let cut = truncate(long);
        assert!(cut.len() <= MAX_KEPT_BODY);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
