//! The payload parser must never panic and must only accept events that
//! satisfy every rule of SPEC 2.2.
#![no_main]

use std::time::Duration;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;
use sendtalk_relay::auth::Verifier;
use sendtalk_relay::config::AuthMode;
use sendtalk_relay::payload::{PayloadRules, VerificationEvent};

fuzz_target!(|data: &[u8]| {
    let verifier = Verifier::new(AuthMode::SecretHeader, "x-secret", &[SecretString::from("k")], Duration::from_secs(300));
    let mut headers = HeaderMap::new();
    headers.insert(HeaderName::from_static("x-secret"), HeaderValue::from_static("k"));
    let Ok(body) = verifier.verify(&headers, bytes::Bytes::copy_from_slice(data), 0) else { return };
    let rules = PayloadRules { accepted_statuses: vec!["verified".into()], max_event_age: Duration::from_secs(604_800) };
    let now_ms = 1_800_000_000_000;
    if let Ok(event) = VerificationEvent::parse(&body, &rules, now_ms) {
        let id = event.id.as_str();
        assert!(!id.is_empty() && id.len() <= 128 && id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        assert_eq!(event.status.as_str(), "verified");
        assert!(event.verified_time.millis() > 0);
    }
});
