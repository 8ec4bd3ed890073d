//! Local validation of a create request (SPEC 9.1), before anything is
//! called or stored: the `Idempotency-Key` header, the body's fields and the
//! body's fingerprint, which tells "the same body" for an idempotency key.

use actix_web::HttpRequest;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::ApiError;
use crate::api::sendtalk::CreateRequest;
use crate::api::settings::{EXPIRY_MINUTES_RANGE, LANGUAGES};
use crate::api::Lifecycle;
use crate::payload::UserPhone;

/// Longest `appURL` accepted (SPEC 9.1).
const MAX_APP_URL_LEN: usize = 2048;
/// Longest `Idempotency-Key` accepted (SPEC 9.1).
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A create request after local validation.
#[derive(Debug)]
pub(super) struct ValidCreate {
    /// What SendTalk is asked for, defaults filled in.
    pub(super) request: CreateRequest,
    /// Canonical digest of the body as a JSON value (for idempotency).
    pub(super) fingerprint: String,
}

fn invalid(field: &'static str, message: &str) -> ApiError {
    ApiError::InvalidPayload {
        field,
        message: message.into(),
    }
}

/// The `Idempotency-Key` header, if any: 1-255 printable ASCII.
pub(super) fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
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
pub(super) fn parse_create(body: &[u8], api: &Lifecycle) -> Result<ValidCreate, ApiError> {
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
