//! SendTalk's documented create endpoint,
//! `POST /api/v1/verification/create_whatsapp_verification`: the `API-Key`
//! check, the request's validation, the deterministic failure triggers and
//! the envelope every answer comes in (HTTP 200, `status` / `error` / `data`,
//! shaped key for key like the documented examples).
//!
//! | condition (checked in this order) | answer |
//! |---|---|
//! | `--create-delay-ms` | every answer waits that long first |
//! | `--create-fault http-500` / `not-json` | HTTP 500 plain text / HTTP 200 HTML |
//! | no `API-Key` header | `status` 400, code `40001` (documented) |
//! | wrong `API-Key` | `status` 401, code `40100` (our choice) |
//! | body not a JSON object, bad field | `status` 400, code `40002`, `field` |
//! | `userPhone` ends in `0000` / `0001` / `0002` | `success` false, `reason` `invalid_recipient` / `insufficient_balance` / `config_disabled` |
//! | `userPhone` ends in `0003` | HTTP 500, plain-text body |
//! | `userPhone` ends in `0004` | HTTP 200, HTML body (not JSON) |
//! | `userPhone` ends in `0005` | success after `--slow-phone-delay-ms` |
//! | otherwise | success, verification remembered |

use actix_web::http::header::ContentType;
use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::ExposeSecret as _;
use serde::Serialize;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq as _;

use crate::cli::CreateFault;
use crate::message::{self, Language};
use crate::state::{AppState, Verification};

/// The documented route.
pub const CREATE_PATH: &str = "/api/v1/verification/create_whatsapp_verification";

/// Bounds of `expiryMinutes`. SendTalk documents none; a day is the longest a
/// verification link sensibly lives, and the relay's own API uses the same.
const EXPIRY_MINUTES: std::ops::RangeInclusive<i64> = 1..=1440;
/// `appURL` longer than this is refused (a URL, not a document).
const MAX_APP_URL_LEN: usize = 2048;

/// The envelope of every JSON answer.
#[derive(Serialize)]
struct Envelope<D> {
    status: u16,
    error: ErrorBody,
    data: D,
}

/// `data` of a refusal: `{}`, as documented.
#[derive(Serialize)]
struct NoData {}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
    field: &'static str,
}

/// `data` of a create answer, success or documented failure.
#[derive(Serialize)]
struct CreateData {
    success: bool,
    message: &'static str,
    reason: &'static str,
    verification: VerificationView,
}

/// On a failure every string is empty, the zero value a typed upstream
/// serialiser would produce, so that clients see the same keys either way.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct VerificationView {
    id: String,
    wa_link: String,
    wa_message: String,
    qr_code: String,
}

/// A request error: envelope `status`, `error.code`, message and field.
struct Refusal {
    status: u16,
    code: &'static str,
    message: String,
    field: &'static str,
}

impl Refusal {
    fn parameter(field: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status: 400,
            code: "40002",
            message: message.into(),
            field,
        }
    }
}

/// What a phone number's last four digits make the simulator do.
#[derive(Debug, PartialEq, Eq)]
enum Trigger {
    Reason(&'static str, &'static str),
    Http500,
    NotJson,
    Slow,
    Normal,
}

fn trigger(phone: &str) -> Trigger {
    match phone.get(phone.len().saturating_sub(4)..) {
        Some("0000") => Trigger::Reason(
            "invalid_recipient",
            "Recipient phone number is not a valid WhatsApp number",
        ),
        Some("0001") => Trigger::Reason("insufficient_balance", "Insufficient balance"),
        Some("0002") => Trigger::Reason(
            "config_disabled",
            "WhatsApp verification is disabled for this account",
        ),
        Some("0003") => Trigger::Http500,
        Some("0004") => Trigger::NotJson,
        Some("0005") => Trigger::Slow,
        _ => Trigger::Normal,
    }
}

/// The validated request.
struct CreateRequest {
    user_phone: String,
    language: Language,
    expiry_minutes: i64,
}

pub async fn create(
    request: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let settings = &state.settings;
    if !settings.create_delay.is_zero() {
        tokio::time::sleep(settings.create_delay).await;
    }
    match settings.create_fault {
        CreateFault::None => {}
        CreateFault::Http500 => return http_500(),
        CreateFault::NotJson => return not_json(),
    }
    if let Err(refusal) = check_api_key(&request, &state) {
        return refused(refusal);
    }
    let create = match parse(&body) {
        Ok(c) => c,
        Err(refusal) => return refused(refusal),
    };
    match trigger(&create.user_phone) {
        Trigger::Reason(reason, message) => {
            tracing::info!(reason, "create refused by trigger");
            envelope_ok(CreateData {
                success: false,
                message,
                reason,
                verification: VerificationView::default(),
            })
        }
        Trigger::Http500 => http_500(),
        Trigger::NotJson => not_json(),
        Trigger::Slow => {
            tokio::time::sleep(settings.slow_phone_delay).await;
            created(&state, create)
        }
        Trigger::Normal => created(&state, create),
    }
}

fn check_api_key(request: &HttpRequest, state: &AppState) -> Result<(), Refusal> {
    let Some(given) = request.headers().get("API-Key") else {
        return Err(Refusal {
            status: 400,
            code: "40001",
            message: "Request headers are required (API-Key)".into(),
            field: "",
        });
    };
    let expected = state.settings.api_key.expose_secret().as_bytes();
    if bool::from(given.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(Refusal {
            status: 401,
            code: "40100",
            message: "Invalid API-Key".into(),
            field: "",
        })
    }
}

fn parse(body: &[u8]) -> Result<CreateRequest, Refusal> {
    let object: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        _ => return Err(Refusal::parameter("", "Request body must be a JSON object")),
    };
    // Absent, null and "" all count as missing, as the documented
    // "User phone is required" suggests for an empty form field.
    let text = |key: &str| match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(()),
    };

    let user_phone = match text("userPhone") {
        Ok(Some(p)) if (5..=15).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.to_string()
        }
        Ok(None) => return Err(Refusal::parameter("userPhone", "User phone is required")),
        _ => {
            return Err(Refusal::parameter(
                "userPhone",
                "User phone must be 5-15 digits",
            ))
        }
    };
    let language = match text("languageCode") {
        Ok(Some(code)) => Language::parse(code),
        Ok(None) => {
            return Err(Refusal::parameter(
                "languageCode",
                "Language code is required",
            ))
        }
        Err(()) => None,
    }
    .ok_or_else(|| Refusal::parameter("languageCode", "Language code must be en or id"))?;
    let expiry_minutes = match object.get("expiryMinutes") {
        None | Some(Value::Null) => {
            return Err(Refusal::parameter(
                "expiryMinutes",
                "Expiry minutes is required",
            ))
        }
        Some(v) => v
            .as_i64()
            .filter(|m| EXPIRY_MINUTES.contains(m))
            .ok_or_else(|| {
                Refusal::parameter(
                    "expiryMinutes",
                    format!(
                        "Expiry minutes must be an integer from {} to {}",
                        EXPIRY_MINUTES.start(),
                        EXPIRY_MINUTES.end()
                    ),
                )
            })?,
    };
    match text("appURL") {
        Ok(None) => {}
        Ok(Some(url))
            if url.len() <= MAX_APP_URL_LEN
                && (url.starts_with("http://") || url.starts_with("https://")) => {}
        _ => {
            return Err(Refusal::parameter(
                "appURL",
                "App URL must be an http or https URL",
            ))
        }
    }
    Ok(CreateRequest {
        user_phone,
        language,
        expiry_minutes,
    })
}

fn created(state: &AppState, create: CreateRequest) -> HttpResponse {
    let id = uuid::Uuid::new_v4();
    let expires_at =
        time::OffsetDateTime::now_utc() + time::Duration::minutes(create.expiry_minutes);
    let code = message::verification_code(&id);
    let wa_message = message::wa_message(create.language, &code, expires_at);
    let wa_link = message::wa_link(&state.settings.wa_number, &wa_message);
    let qr_code = match message::qr_png_base64(&wa_link) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "QR code generation failed");
            return http_500();
        }
    };
    state.remember(
        id,
        Verification {
            user_phone: create.user_phone,
        },
    );
    tracing::info!(%id, "verification created");
    envelope_ok(CreateData {
        success: true,
        message: "WhatsApp verification created successfully",
        reason: "",
        verification: VerificationView {
            id: id.to_string(),
            wa_link,
            wa_message,
            qr_code,
        },
    })
}

fn envelope_ok(data: CreateData) -> HttpResponse {
    HttpResponse::Ok().json(Envelope {
        status: 200,
        error: ErrorBody {
            code: "",
            message: String::new(),
            field: "",
        },
        data,
    })
}

/// Refusals travel in the envelope with HTTP 200, as documented.
fn refused(refusal: Refusal) -> HttpResponse {
    tracing::info!(
        code = refusal.code,
        field = refusal.field,
        "create request refused"
    );
    HttpResponse::Ok().json(Envelope {
        status: refusal.status,
        error: ErrorBody {
            code: refusal.code,
            message: refusal.message,
            field: refusal.field,
        },
        data: NoData {},
    })
}

fn http_500() -> HttpResponse {
    HttpResponse::InternalServerError()
        .content_type(ContentType::plaintext())
        .body("Internal Server Error")
}

/// What a misconfigured proxy in front of an API answers.
fn not_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::html())
        .body("<html><body><h1>Service temporarily unavailable</h1></body></html>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_follow_the_last_four_digits() {
        assert!(matches!(
            trigger("6281200000000"),
            Trigger::Reason("invalid_recipient", _)
        ));
        assert!(matches!(
            trigger("6281200000001"),
            Trigger::Reason("insufficient_balance", _)
        ));
        assert!(matches!(
            trigger("6281200000002"),
            Trigger::Reason("config_disabled", _)
        ));
        assert_eq!(trigger("6281200000003"), Trigger::Http500);
        assert_eq!(trigger("6281200000004"), Trigger::NotJson);
        assert_eq!(trigger("6281200000005"), Trigger::Slow);
        assert_eq!(trigger("6281212345678"), Trigger::Normal);
    }

    #[test]
    fn each_field_is_named_when_refused() {
        let field = |body: &str| parse(body.as_bytes()).err().map(|r| r.field);
        let ok = r#""userPhone":"6281212345678","languageCode":"id","expiryMinutes":10"#;
        assert_eq!(field(&format!("{{{ok}}}")), None);
        assert_eq!(
            field(r#"{"languageCode":"id","expiryMinutes":10}"#),
            Some("userPhone")
        );
        assert_eq!(
            field(&format!(r#"{{{ok},"appURL":"ftp://x"}}"#)),
            Some("appURL")
        );
        assert_eq!(
            field(r#"{"userPhone":"6281212345678","languageCode":"fr","expiryMinutes":10}"#),
            Some("languageCode")
        );
        assert_eq!(
            field(r#"{"userPhone":"6281212345678","languageCode":"en","expiryMinutes":0}"#),
            Some("expiryMinutes")
        );
        assert_eq!(field("[1]"), Some(""));
    }
}
