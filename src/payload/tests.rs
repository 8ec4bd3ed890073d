//! Unit tests of `payload`.
use super::*;
use crate::auth::AuthMode;
use crate::auth::{sign, Verifier};
use bytes::Bytes;
use secrecy::SecretString;

const NOW: u64 = 1_800_000_000_000;

fn rules() -> PayloadRules {
    PayloadRules {
        accepted_statuses: vec!["verified".into()],
        max_event_age: Duration::from_secs(604_800),
    }
}

fn authed(body: &str) -> AuthenticatedBody {
    let v = Verifier::new(
        AuthMode::HmacSha256,
        "x-sig",
        &[SecretString::from("k")],
        Duration::from_secs(1),
    );
    let h: actix_web::http::header::HeaderMap =
        sign(AuthMode::HmacSha256, "x-sig", "k", body.as_bytes(), 0, "")
            .into_iter()
            .map(|(k, v)| {
                (
                    actix_web::http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    actix_web::http::header::HeaderValue::from_str(&v).unwrap(),
                )
            })
            .collect();
    v.verify(&h, Bytes::from(body.to_string()), 0).unwrap()
}

fn parse(body: &str) -> Result<VerificationEvent, PayloadError> {
    VerificationEvent::parse(&authed(body), &rules(), NOW)
}

fn body_with(field: &str, value: &str) -> String {
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(&format!(
        r#"{{"id":"fc0977f2-baa9","userPhone":"628124630350","status":"verified","verifiedTime":{NOW}}}"#
    ))
    .unwrap();
    if value == "<absent>" {
        v.remove(field);
    } else {
        v.insert(field.into(), serde_json::from_str(value).unwrap());
    }
    Value::Object(v).to_string()
}

#[test]
fn a_valid_event_parses_and_keeps_unknown_fields_out_of_the_way() {
    let e = parse(&body_with("extra", r#"{"nested":[1,2]}"#)).unwrap();
    assert_eq!(e.id.as_str(), "fc0977f2-baa9");
    assert_eq!(e.status.as_str(), "verified");
    assert_eq!(e.verified_time.millis(), NOW);
}

#[test]
fn each_field_rule_names_its_field() {
    let long_id = format!("\"{}\"", "a".repeat(129));
    let cases: &[(&str, &str, &str)] = &[
        ("id", "<absent>", "id"),
        ("id", "\"\"", "id"),
        ("id", "\"has space\"", "id"),
        ("id", "\"caf\u{e9}\"", "id"),
        ("id", "\"tab\\there\"", "id"),
        ("id", &long_id, "id"),
        ("id", "42", "id"),
        ("userPhone", "<absent>", "userPhone"),
        ("userPhone", "\"1234\"", "userPhone"),
        ("userPhone", "\"1234567890123456\"", "userPhone"),
        ("userPhone", "\"+628124630350\"", "userPhone"),
        ("userPhone", "628124630350", "userPhone"),
        ("status", "<absent>", "status"),
        ("status", "true", "status"),
        ("verifiedTime", "<absent>", "verifiedTime"),
        ("verifiedTime", "1.0", "verifiedTime"),
        ("verifiedTime", "1e12", "verifiedTime"),
        ("verifiedTime", "\"1692847205385\"", "verifiedTime"),
        ("verifiedTime", "0", "verifiedTime"),
        ("verifiedTime", "-5", "verifiedTime"),
        ("verifiedTime", "null", "verifiedTime"),
    ];
    for (field, value, expected) in cases {
        let err = parse(&body_with(field, value)).unwrap_err();
        assert!(
            matches!(err, PayloadError::InvalidPayload { .. }),
            "{field}={value}: {err:?}"
        );
        assert_eq!(err.field_name(), *expected, "{field}={value}");
    }
    let long_ok = format!("\"{}\"", "~".repeat(128));
    assert!(parse(&body_with("id", &long_ok)).is_ok());
}

#[test]
fn syntax_comes_before_fields_and_fields_before_status_and_age() {
    assert!(matches!(
        parse("{not json").unwrap_err(),
        PayloadError::InvalidJson(_)
    ));
    assert!(matches!(
        parse("[1]").unwrap_err(),
        PayloadError::InvalidPayload { field: "", .. }
    ));
    let bad_both = body_with("status", "\"pending\"").replace("628124630350", "12");
    assert_eq!(parse(&bad_both).unwrap_err().field_name(), "userPhone");
    let status_and_age = body_with("status", "\"pending\"").replace(&NOW.to_string(), "1");
    assert!(matches!(
        parse(&status_and_age).unwrap_err(),
        PayloadError::UnsupportedStatus(_)
    ));
}

#[test]
fn replay_guard_rejects_old_and_future_events() {
    let old = NOW - 604_800_001;
    assert!(matches!(
        parse(&body_with("verifiedTime", &old.to_string())).unwrap_err(),
        PayloadError::StaleEvent(_)
    ));
    assert!(parse(&body_with("verifiedTime", &(NOW - 604_800_000).to_string())).is_ok());
    assert!(parse(&body_with("verifiedTime", &(NOW + 300_000).to_string())).is_ok());
    let future = parse(&body_with("verifiedTime", &(NOW + 300_001).to_string())).unwrap_err();
    assert_eq!(future.field_name(), "verifiedTime");
}

#[test]
fn media_type_allows_parameters_only() {
    assert!(check_media_type(Some(b"application/json")).is_ok());
    assert!(check_media_type(Some(b"Application/JSON; charset=utf-8")).is_ok());
    assert!(check_media_type(Some(b"text/plain")).is_err());
    assert!(check_media_type(Some(b"application/jsonx")).is_err());
    assert!(check_media_type(None).is_err());
}

#[test]
fn phone_debug_output_is_masked() {
    let p = UserPhone::parse("6281212345678").unwrap();
    assert_eq!(format!("{p:?}"), "UserPhone(6281****678)");
}
