//! The webhook payload: media type check, JSON parsing, and the typed
//! [`VerificationEvent`] with its field newtypes (SPEC 2.2). Pure: no I/O, the
//! caller passes the clock.
//!
//! Each newtype has one constructor, `parse`, so a value that exists is valid.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::auth::AuthenticatedBody;

/// How far into the future `verifiedTime` may lie (clock skew allowance).
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(300);

/// Why a payload was refused. Each variant maps to one HTTP answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// 415: `Content-Type` is missing or is not `application/json`.
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// 400: the body is not JSON at all (the parser's message is carried).
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// 400: the JSON is not an object, or one field is missing or malformed.
    #[error("{message}")]
    InvalidPayload {
        /// The field as SendTalk spells it (`userPhone`), or `""` for the
        /// whole body.
        field: &'static str,
        /// What is wrong with it, for the sender.
        message: String,
    },
    /// 422: a well-formed status that is not in
    /// `webhook.accepted_statuses` (the first 64 characters are carried).
    #[error("status `{0}` is not accepted")]
    UnsupportedStatus(String),
    /// 422: `verifiedTime` is older than `webhook.max_event_age_secs` or
    /// further ahead than [`MAX_FUTURE_SKEW`].
    #[error("{0}")]
    StaleEvent(String),
}

impl PayloadError {
    fn field(field: &'static str, message: impl Into<String>) -> Self {
        PayloadError::InvalidPayload {
            field,
            message: message.into(),
        }
    }

    /// The payload field the error is about, or `""`.
    pub fn field_name(&self) -> &'static str {
        match self {
            PayloadError::InvalidPayload { field, .. } => field,
            PayloadError::UnsupportedStatus(_) => "status",
            PayloadError::StaleEvent(_) => "verifiedTime",
            PayloadError::UnsupportedMediaType | PayloadError::InvalidJson(_) => "",
        }
    }
}

/// Accepts `application/json` with optional parameters (`; charset=utf-8`).
pub fn check_media_type(content_type: Option<&[u8]>) -> Result<(), PayloadError> {
    let value = content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .ok_or(PayloadError::UnsupportedMediaType)?;
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(PayloadError::UnsupportedMediaType)
    }
}

/// SendTalk's verification id: 1-128 printable ASCII characters (0x21-0x7E).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VerificationId(String);

impl VerificationId {
    /// The only way to a `VerificationId`; refuses anything else with
    /// [`PayloadError::InvalidPayload`] on `id`.
    pub fn parse(raw: &str) -> Result<Self, PayloadError> {
        if raw.is_empty() || raw.len() > 128 {
            return Err(PayloadError::field("id", "id must be 1-128 characters"));
        }
        if !raw.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(PayloadError::field(
                "id",
                "id must be printable ASCII without spaces",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    /// The id as SendTalk sent it: the dedup key and the AMQP message id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The verified phone number: 5-15 ASCII digits (E.164 without `+`).
#[derive(Clone, PartialEq, Eq)]
pub struct UserPhone(String);

impl UserPhone {
    /// The only way to a `UserPhone`; refuses anything else with
    /// [`PayloadError::InvalidPayload`] on `userPhone`.
    pub fn parse(raw: &str) -> Result<Self, PayloadError> {
        if (5..=15).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(raw.to_string()))
        } else {
            Err(PayloadError::field(
                "userPhone",
                "userPhone must be 5-15 digits",
            ))
        }
    }

    /// The number itself; never for a log line (use [`Self::masked`]).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number with its middle hidden, for logs: `6281****678`.
    pub fn masked(&self) -> String {
        crate::telemetry::mask_phone(&self.0)
    }
}

impl std::fmt::Debug for UserPhone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserPhone({})", self.masked())
    }
}

/// A status the relay is configured to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status(String);

impl Status {
    /// Accepts `raw` only when it is one of `accepted`
    /// (`webhook.accepted_statuses`), compared exactly.
    pub fn parse(raw: &str, accepted: &[String]) -> Result<Self, PayloadError> {
        if accepted.iter().any(|s| s == raw) {
            Ok(Self(raw.to_string()))
        } else {
            Err(PayloadError::UnsupportedStatus(
                raw.chars().take(64).collect(),
            ))
        }
    }

    /// The status as sent; it renders the routing key and the `type` property.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// When SendTalk verified the number, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedTime(u64);

impl VerifiedTime {
    /// Accepts a JSON integer > 0 only: `1.0`, `1e12` and strings are refused.
    pub fn parse(raw: &Value) -> Result<Self, PayloadError> {
        match raw {
            Value::Number(n) if n.is_u64() => match n.as_u64() {
                Some(ms) if ms > 0 => Ok(Self(ms)),
                _ => Err(PayloadError::field(
                    "verifiedTime",
                    "verifiedTime must be greater than 0",
                )),
            },
            _ => Err(PayloadError::field(
                "verifiedTime",
                "verifiedTime must be an integer number of Unix milliseconds",
            )),
        }
    }

    /// Unix milliseconds, as SendTalk sent them.
    pub fn millis(self) -> u64 {
        self.0
    }
}

/// A validated verification webhook.
#[derive(Debug, Clone)]
pub struct VerificationEvent {
    /// `id`: the dedup key.
    pub id: VerificationId,
    /// `userPhone`: the number that sent the verification message.
    pub user_phone: UserPhone,
    /// `status`: one of the accepted statuses.
    pub status: Status,
    /// `verifiedTime`: within the accepted age when the event was parsed.
    pub verified_time: VerifiedTime,
}

/// What payload parsing needs from the configuration.
#[derive(Debug, Clone)]
pub struct PayloadRules {
    /// `webhook.accepted_statuses`: any other status is refused with 422.
    pub accepted_statuses: Vec<String>,
    /// `webhook.max_event_age_secs`: an older `verifiedTime` is refused with
    /// 422, so that a replay cannot outlive the dedup window.
    pub max_event_age: Duration,
}

impl VerificationEvent {
    /// Parses an authenticated body in the order of SPEC 2.2: JSON syntax,
    /// then fields, then status, then age. `now_ms` is Unix milliseconds.
    pub fn parse(
        body: &AuthenticatedBody,
        rules: &PayloadRules,
        now_ms: u64,
    ) -> Result<Self, PayloadError> {
        let value: Value = serde_json::from_slice(body.bytes())
            .map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(PayloadError::field("", "body must be a JSON object"));
        };
        let id = VerificationId::parse(required_str(&object, "id")?)?;
        let user_phone = UserPhone::parse(required_str(&object, "userPhone")?)?;
        let raw_status = required_str(&object, "status")?;
        let verified_time = VerifiedTime::parse(
            object
                .get("verifiedTime")
                .ok_or_else(|| missing("verifiedTime"))?,
        )?;
        let status = Status::parse(raw_status, &rules.accepted_statuses)?;
        check_age(verified_time, rules.max_event_age, now_ms)?;
        Ok(Self {
            id,
            user_phone,
            status,
            verified_time,
        })
    }
}

fn missing(field: &'static str) -> PayloadError {
    PayloadError::field(field, format!("{field} is required"))
}

fn required_str<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, PayloadError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(PayloadError::field(
            field,
            format!("{field} must be a string"),
        )),
    }
}

fn check_age(time: VerifiedTime, max_age: Duration, now_ms: u64) -> Result<(), PayloadError> {
    let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    let skew_ms = u64::try_from(MAX_FUTURE_SKEW.as_millis()).unwrap_or(u64::MAX);
    if now_ms.saturating_sub(time.millis()) > max_age_ms {
        return Err(PayloadError::StaleEvent(format!(
            "verifiedTime is older than {} seconds",
            max_age.as_secs()
        )));
    }
    if time.millis().saturating_sub(now_ms) > skew_ms {
        return Err(PayloadError::StaleEvent(
            "verifiedTime is too far in the future".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
