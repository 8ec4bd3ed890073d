//! The SendTalk client: one call, `create_whatsapp_verification`, and the
//! reading of SendTalk's envelope into [`Created`] or a [`ProviderError`]
//! (SPEC 9.1's table). One `reqwest::Client` (connection pool, rustls) is
//! built by `startup` and reused; every call is bounded by
//! `sendtalk.timeout_ms` and never retried: a create is not idempotent
//! upstream.

use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounterVec};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;
use serde_json::Value;

/// SendTalk's create path, appended to `sendtalk.base_url`.
pub const CREATE_PATH: &str = "/api/v1/verification/create_whatsapp_verification";
/// SendTalk's documented code for a parameter validation error.
const CODE_VALIDATION: &str = "40002";
/// SendTalk's documented code for a header (API key) error.
const CODE_HEADERS: &str = "40001";

/// The create request, as SendTalk documents it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRequest {
    /// The phone to verify: 5-15 digits, E.164 without `+`, as validated by
    /// the API before the call.
    pub user_phone: String,
    /// The language of the WhatsApp message: the caller's, else
    /// `sendtalk.default_language`.
    pub language_code: String,
    /// How long SendTalk keeps the verification open; the relay's expiry
    /// sweeper uses the same value.
    pub expiry_minutes: u32,
    /// Where SendTalk sends the user after verifying; left out of the JSON
    /// when the caller gave none.
    #[serde(rename = "appURL", skip_serializing_if = "Option::is_none")]
    pub app_url: Option<String>,
}

/// What SendTalk gave back for a successful create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// SendTalk's verification id, already checked to parse as a
    /// [`crate::payload::VerificationId`]: the id its webhook will carry.
    pub id: String,
    /// The `wa.me` link the user opens to send the verification message.
    pub wa_link: String,
    /// The message text that link pre-fills.
    pub wa_message: String,
    /// A PNG of the link as a QR code, base64; empty when SendTalk sent none.
    pub qr_code: String,
}

/// Every way a create can fail, each with one relay answer (SPEC 9.1).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Status 400 with code 40002: SendTalk refused a parameter the local
    /// validation let through.
    #[error("SendTalk refused a parameter: {message}")]
    Validation {
        /// The parameter as SendTalk names it (e.g. `userPhone`).
        field: String,
        /// SendTalk's explanation, passed on to the caller.
        message: String,
    },
    /// HTTP 401/403, status 401/403, or status 400 with code 40001:
    /// SendTalk refused the relay's API key (an operator problem).
    #[error("SendTalk refused our API key: {0}")]
    Unauthorized(String),
    /// `reason: invalid_recipient`: the phone cannot receive WhatsApp.
    #[error("SendTalk cannot deliver to this recipient")]
    InvalidRecipient,
    /// `reason: insufficient_balance`: the SendTalk account is out of credit.
    #[error("SendTalk account balance is insufficient")]
    InsufficientBalance,
    /// `reason: config_disabled`: WhatsApp verification is off for the
    /// account.
    #[error("SendTalk WhatsApp verification is disabled for this account")]
    Disabled,
    /// No complete answer within `sendtalk.timeout_ms`; SendTalk may or may
    /// not have created the verification.
    #[error("SendTalk did not answer within {0:?}")]
    Timeout(Duration),
    /// A failed connection, a non-2xx status or a body SPEC 9.1 does not
    /// document.
    #[error("SendTalk answered in an unexpected way: {0}")]
    Unexpected(String),
}

impl ProviderError {
    /// The `outcome` label of `sendtalk_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProviderError::Validation { .. } => "validation_failed",
            ProviderError::Unauthorized(_) => "unauthorized",
            ProviderError::InvalidRecipient => "invalid_recipient",
            ProviderError::InsufficientBalance => "insufficient_balance",
            ProviderError::Disabled => "disabled",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Unexpected(_) => "error",
        }
    }
}

/// The metrics the client writes.
#[derive(Clone)]
pub struct SendTalkMetrics {
    /// `sendtalk_requests_total{outcome}`.
    pub requests: IntCounterVec,
    /// `sendtalk_request_duration_seconds`.
    pub duration: Histogram,
}

/// SendTalk's create API.
pub struct SendTalkClient {
    /// Shared pool of connections; built once.
    http: reqwest::Client,
    create_url: String,
    api_key: SecretString,
    timeout: Duration,
    metrics: SendTalkMetrics,
}

impl std::fmt::Debug for SendTalkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendTalkClient")
            .field("create_url", &self.create_url)
            .finish_non_exhaustive()
    }
}

impl SendTalkClient {
    /// Builds the one pooled client; every request through it is bounded by
    /// `timeout`. Fails only when the TLS back end cannot be set up.
    pub fn new(
        base_url: &str,
        api_key: SecretString,
        timeout: Duration,
        metrics: SendTalkMetrics,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("sendtalk-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            create_url: format!("{}{CREATE_PATH}", base_url.trim_end_matches('/')),
            api_key,
            timeout,
            metrics,
        })
    }

    /// Calls the create API once and reads the answer.
    pub async fn create(&self, request: &CreateRequest) -> Result<Created, ProviderError> {
        let started = Instant::now();
        let result = self.call(request).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "created",
            Err(e) => e.outcome(),
        };
        self.metrics.requests.with_label_values(&[outcome]).inc();
        result
    }

    async fn call(&self, request: &CreateRequest) -> Result<Created, ProviderError> {
        let sent = self
            .http
            .post(&self.create_url)
            .header("API-Key", self.api_key.expose_secret())
            .json(request)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(ProviderError::Timeout(self.timeout)),
            Err(e) => return Err(ProviderError::Unexpected(format!("request failed: {e}"))),
        };
        let status = response.status();
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) if e.is_timeout() => return Err(ProviderError::Timeout(self.timeout)),
            Err(e) => return Err(ProviderError::Unexpected(format!("body unreadable: {e}"))),
        };
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(ProviderError::Unauthorized(format!("HTTP {status}")));
        }
        if !status.is_success() {
            return Err(ProviderError::Unexpected(format!("HTTP {status}")));
        }
        let envelope: Value = serde_json::from_slice(&bytes).map_err(|_| {
            ProviderError::Unexpected(format!("HTTP {status} with a non-JSON body"))
        })?;
        read_envelope(&envelope)
    }
}

/// A string field as SendTalk may write it: a string, or anything else
/// (absent, `null`, `{}`) meaning "nothing here".
fn text(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Maps SendTalk's envelope `{status, error {code, message, field}, data
/// {success, message, reason, verification}}` per SPEC 9.1. SendTalk writes
/// empty objects where there is nothing, so each branch reads only the
/// documented fields it needs, field by field, and whatever else is there
/// (`null`, `{}`, a partial object) is never a reason to call the answer
/// unreadable. Anything the table does not document is
/// [`ProviderError::Unexpected`].
fn read_envelope(value: &Value) -> Result<Created, ProviderError> {
    if !value.is_object() {
        return Err(ProviderError::Unexpected(
            "the answer is not a JSON object".into(),
        ));
    }
    let error = value.get("error").unwrap_or(&Value::Null);
    // SendTalk writes codes as strings ("40002"); accept a number too.
    let code = match error.get("code") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    match value.get("status").and_then(Value::as_i64) {
        Some(400) if code == CODE_VALIDATION => {
            return Err(ProviderError::Validation {
                field: text(error, "field"),
                message: text(error, "message"),
            })
        }
        Some(400) if code == CODE_HEADERS => {
            return Err(ProviderError::Unauthorized(text(error, "message")))
        }
        Some(401 | 403) => return Err(ProviderError::Unauthorized(text(error, "message"))),
        Some(200) => {}
        other => {
            return Err(ProviderError::Unexpected(format!(
                "envelope status {other:?}, code {code:?}"
            )))
        }
    }
    let data = value.get("data").unwrap_or(&Value::Null);
    let Some(success) = data.get("success").and_then(Value::as_bool) else {
        return Err(ProviderError::Unexpected(
            "envelope without data.success".into(),
        ));
    };
    if !success {
        return Err(match text(data, "reason").as_str() {
            "invalid_recipient" => ProviderError::InvalidRecipient,
            "insufficient_balance" => ProviderError::InsufficientBalance,
            "config_disabled" => ProviderError::Disabled,
            other => ProviderError::Unexpected(format!("undocumented reason {other:?}")),
        });
    }
    let verification = data.get("verification").unwrap_or(&Value::Null);
    let field = |key: &str| {
        verification
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ProviderError::Unexpected(format!("success without verification.{key}")))
    };
    let id = field("id")?;
    if crate::payload::VerificationId::parse(&id).is_err() {
        return Err(ProviderError::Unexpected(
            "verification id is not 1-128 printable characters".into(),
        ));
    }
    Ok(Created {
        id,
        wa_link: field("waLink")?,
        wa_message: field("waMessage")?,
        qr_code: text(verification, "qrCode"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn the_documented_success_is_read() {
        let c = read_envelope(&fixture("create-verification-response-ok.json")).unwrap();
        assert_eq!(c.id, "3f35ec07-77f1-4fa0-9416-8ef019e52189");
        assert!(c.wa_link.starts_with("https://wa.me/"));
    }

    #[test]
    fn the_documented_errors_map_to_their_answers() {
        let e =
            read_envelope(&fixture("create-verification-response-missing-phone.json")).unwrap_err();
        assert!(matches!(e, ProviderError::Validation { ref field, .. } if field == "userPhone"));
        let e = read_envelope(&fixture("create-verification-response-missing-header.json"))
            .unwrap_err();
        assert!(matches!(e, ProviderError::Unauthorized(_)));
    }

    #[test]
    fn empty_objects_where_there_is_nothing_never_make_an_answer_unreadable() {
        // The documented error examples, with `data: {}` as SendTalk writes it,
        // and with null and missing parts.
        for name in [
            "create-verification-response-missing-phone.json",
            "create-verification-response-missing-header.json",
        ] {
            let documented = fixture(name);
            for data in [serde_json::json!({}), Value::Null] {
                let mut v = documented.clone();
                v["data"] = data;
                let e = read_envelope(&v).unwrap_err();
                assert!(!matches!(e, ProviderError::Unexpected(_)), "{name}: {e}");
            }
        }
        for (reason, expected) in [
            ("invalid_recipient", "invalid_recipient"),
            ("insufficient_balance", "insufficient_balance"),
            ("config_disabled", "disabled"),
        ] {
            for verification in [
                serde_json::json!({}),
                Value::Null,
                serde_json::json!({"id": ""}),
            ] {
                let v = serde_json::json!({
                    "status": 200, "error": {}, "data": {
                        "success": false, "message": {}, "reason": reason,
                        "verification": verification
                    }
                });
                assert_eq!(read_envelope(&v).unwrap_err().outcome(), expected, "{v}");
            }
        }
        let mut ok = fixture("create-verification-response-ok.json");
        ok["error"] = Value::Null;
        ok["data"]["reason"] = serde_json::json!({});
        ok["data"]["message"] = serde_json::json!({});
        assert!(read_envelope(&ok).is_ok());
        ok["error"] = serde_json::json!({"code": {}, "message": null, "field": {}});
        assert!(read_envelope(&ok).is_ok());
    }

    #[test]
    fn undocumented_shapes_are_provider_errors() {
        for v in [
            serde_json::json!({"hello": 1}),
            serde_json::json!({"status": 200, "data": {"success": false, "reason": "mystery"}}),
            serde_json::json!({"status": 500}),
            serde_json::json!([1, 2]),
        ] {
            assert!(matches!(
                read_envelope(&v),
                Err(ProviderError::Unexpected(_))
            ));
        }
    }
}
