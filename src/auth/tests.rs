//! Unit tests of the three modes and the signature parsers; compiled only
//! under `#[cfg(test)]`.

use super::*;
use std::collections::HashMap;

struct Map(HashMap<String, Vec<u8>>);
impl Headers for Map {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.0.get(&name.to_ascii_lowercase()).map(Vec::as_slice)
    }
}
fn headers(pairs: Vec<(String, String)>) -> Map {
    Map(pairs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.into_bytes()))
        .collect())
}
fn verifier(mode: AuthMode, secrets: &[&str]) -> Verifier {
    let secrets: Vec<SecretString> = secrets
        .iter()
        .map(|s| SecretString::from(s.to_string()))
        .collect();
    Verifier::new(
        mode,
        "X-SendTalk-Signature",
        &secrets,
        Duration::from_secs(300),
    )
}
const BODY: &[u8] = br#"{"id":"a"}"#;
const NOW: i64 = 1_700_000_000;

#[test]
fn hmac_accepts_hex_base64_and_prefix() {
    let v = verifier(AuthMode::HmacSha256, &["s3cret"]);
    let mut mac = new_mac(b"s3cret");
    mac.update(BODY);
    let raw = mac.finalize().into_bytes();
    for value in [
        hex::encode(raw),
        hex::encode_upper(raw),
        format!("sha256={}", hex::encode(raw)),
        STANDARD.encode(raw),
        format!("sha256={}", STANDARD.encode(raw)),
        URL_SAFE_NO_PAD.encode(raw),
    ] {
        let h = headers(vec![("X-SendTalk-Signature".into(), value.clone())]);
        assert!(
            v.verify(&h, Bytes::from_static(BODY), NOW).is_ok(),
            "{value}"
        );
    }
}

#[test]
fn hmac_rejects_missing_wrong_and_other_body() {
    let v = verifier(AuthMode::HmacSha256, &["s3cret"]);
    assert_eq!(
        v.verify(&headers(vec![]), Bytes::from_static(BODY), NOW)
            .unwrap_err(),
        AuthError::MissingSignature
    );
    let wrong = sign(
        AuthMode::HmacSha256,
        "X-SendTalk-Signature",
        "other",
        BODY,
        NOW,
        "",
    );
    assert_eq!(
        v.verify(&headers(wrong), Bytes::from_static(BODY), NOW)
            .unwrap_err(),
        AuthError::InvalidSignature
    );
    let other_body = sign(
        AuthMode::HmacSha256,
        "X-SendTalk-Signature",
        "s3cret",
        b"{}",
        NOW,
        "",
    );
    assert_eq!(
        v.verify(&headers(other_body), Bytes::from_static(BODY), NOW)
            .unwrap_err(),
        AuthError::InvalidSignature
    );
    let garbage = vec![(
        "X-SendTalk-Signature".to_string(),
        "zz-not-a-signature".to_string(),
    )];
    assert_eq!(
        v.verify(&headers(garbage), Bytes::from_static(BODY), NOW)
            .unwrap_err(),
        AuthError::InvalidSignature
    );
}

#[test]
fn every_listed_secret_is_accepted() {
    let v = verifier(AuthMode::HmacSha256, &["old", "new"]);
    for secret in ["old", "new"] {
        let h = headers(sign(
            AuthMode::HmacSha256,
            "X-SendTalk-Signature",
            secret,
            BODY,
            NOW,
            "",
        ));
        assert!(v.verify(&h, Bytes::from_static(BODY), NOW).is_ok());
    }
}

#[test]
fn standard_webhooks_checks_signature_list_and_window() {
    let secret = format!("whsec_{}", STANDARD.encode(b"key-bytes"));
    let v = verifier(AuthMode::StandardWebhooks, &[&secret]);
    let mut h = sign(AuthMode::StandardWebhooks, "", &secret, BODY, NOW, "msg_1");
    assert!(v
        .verify(&headers(h.clone()), Bytes::from_static(BODY), NOW + 299)
        .is_ok());
    assert_eq!(
        v.verify(&headers(h.clone()), Bytes::from_static(BODY), NOW + 301)
            .unwrap_err(),
        AuthError::StaleTimestamp
    );
    assert_eq!(
        v.verify(&headers(h.clone()), Bytes::from_static(BODY), NOW - 301)
            .unwrap_err(),
        AuthError::StaleTimestamp
    );
    // Several signatures in one header: any valid one passes.
    let good = h[2].1.clone();
    h[2].1 = format!("v1,{} v2,abc {}", STANDARD.encode([0u8; 32]), good);
    assert!(v
        .verify(&headers(h.clone()), Bytes::from_static(BODY), NOW)
        .is_ok());
    h[2].1 = format!("v1,{}", STANDARD.encode([0u8; 32]));
    assert_eq!(
        v.verify(&headers(h), Bytes::from_static(BODY), NOW)
            .unwrap_err(),
        AuthError::InvalidSignature
    );
}

#[test]
fn standard_webhooks_reads_at_most_sixteen_signatures() {
    let secret = format!("whsec_{}", STANDARD.encode(b"key-bytes"));
    let v = verifier(AuthMode::StandardWebhooks, &[&secret]);
    let mut h = sign(AuthMode::StandardWebhooks, "", &secret, BODY, NOW, "msg_1");
    let good = h[2].1.clone();
    let filler = format!("v1,{}", STANDARD.encode([0u8; 32]));
    let list = |n: usize| {
        let mut entries = vec![filler.clone(); n];
        entries.push(good.clone());
        entries.join(" ")
    };
    h[2].1 = list(15);
    assert!(v
        .verify(&headers(h.clone()), Bytes::from_static(BODY), NOW)
        .is_ok());
    h[2].1 = list(16);
    assert_eq!(
        v.verify(&headers(h), Bytes::from_static(BODY), NOW)
            .unwrap_err(),
        AuthError::InvalidSignature
    );
}

#[test]
fn standard_webhooks_requires_all_three_headers() {
    let v = verifier(AuthMode::StandardWebhooks, &["whsec_a2V5"]);
    let full = sign(AuthMode::StandardWebhooks, "", "whsec_a2V5", BODY, NOW, "m");
    for skip in 0..3 {
        let partial: Vec<_> = full
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, p)| p.clone())
            .collect();
        assert_eq!(
            v.verify(&headers(partial), Bytes::from_static(BODY), NOW)
                .unwrap_err(),
            AuthError::MissingSignature
        );
    }
}

#[test]
fn secret_header_compares_the_secret_itself() {
    let v = verifier(AuthMode::SecretHeader, &["abc", "def"]);
    let ok = headers(vec![("x-sendtalk-signature".into(), "def".into())]);
    assert!(v.verify(&ok, Bytes::from_static(BODY), NOW).is_ok());
    let bad = headers(vec![("x-sendtalk-signature".into(), "abcd".into())]);
    assert_eq!(
        v.verify(&bad, Bytes::from_static(BODY), NOW).unwrap_err(),
        AuthError::InvalidSignature
    );
}

#[test]
fn signature_parsers_reject_wrong_lengths() {
    assert!(parse_hmac_signature("abcd").is_none());
    assert!(parse_hmac_signature(&"a".repeat(63)).is_none());
    assert!(parse_standard_signatures(b"v1,AAAA v1,").is_empty());
    assert_eq!(
        parse_standard_signatures(format!("v1,{}", STANDARD.encode([1u8; 32])).as_bytes()).len(),
        1
    );
}
