//! Authentication of the raw request body against SendTalk's secret key, in
//! the three modes of SPEC 2.1. Pure: no I/O, no clock (the caller passes
//! `now`), no parsing of the body.
//!
//! The only way to obtain an [`AuthenticatedBody`] is [`Verifier::verify`],
//! so the payload parser cannot be handed bytes nobody checked.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthMode;

type HmacSha256 = Hmac<Sha256>;

/// Standard Webhooks header names (fixed by that specification).
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Most entries of a `webhook-signature` list that are read: a sender rotates
/// between a few keys, never dozens, and a long list must not cost more.
pub const MAX_STANDARD_SIGNATURES: usize = 16;

/// Why a request was not authenticated. Each maps to one 401 error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the request carries no signature")]
    MissingSignature,
    #[error("the signature does not match the body")]
    InvalidSignature,
    #[error("the signature timestamp is outside the accepted window")]
    StaleTimestamp,
}

/// A body whose signature was checked; only [`Verifier::verify`] makes one.
#[derive(Debug, Clone)]
pub struct AuthenticatedBody(Bytes);

impl AuthenticatedBody {
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }
}

/// Access to request headers, so the verifier does not depend on a web framework.
/// (The impl for actix's `HeaderMap` lives with the webhook route.)
pub trait Headers {
    /// The raw value of the first header called `name` (case-insensitive).
    fn get(&self, name: &str) -> Option<&[u8]>;
}

/// Key material derived once from the configured secrets.
struct Key {
    /// The secret as configured, used by `secret-header` and `hmac-sha256`.
    raw: SecretBox<Vec<u8>>,
    /// For `standard-webhooks`: the base64-decoded part after `whsec_`.
    standard: SecretBox<Vec<u8>>,
    /// SHA-256 of the raw secret, so `secret-header` compares fixed-length
    /// digests and leaks nothing about the secret's length.
    raw_digest: [u8; 32],
}

/// Checks requests against every configured secret (rotation: any may match).
pub struct Verifier {
    mode: AuthMode,
    header: String,
    tolerance: Duration,
    keys: Vec<Key>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.mode)
            .field("header", &self.header)
            .field("secrets", &self.keys.len())
            .finish()
    }
}

impl Verifier {
    pub fn new(
        mode: AuthMode,
        header: &str,
        secrets: &[SecretString],
        tolerance: Duration,
    ) -> Self {
        let keys = secrets
            .iter()
            .map(|s| {
                let raw = s.expose_secret().as_bytes().to_vec();
                let standard = standard_webhooks_key(s.expose_secret());
                let raw_digest: [u8; 32] = Sha256::digest(&raw).into();
                Key {
                    raw: SecretBox::new(Box::new(raw)),
                    standard: SecretBox::new(Box::new(standard)),
                    raw_digest,
                }
            })
            .collect();
        Self {
            mode,
            header: header.to_ascii_lowercase(),
            tolerance,
            keys,
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Authenticates `body` with the request's headers at time `now_secs`
    /// (Unix seconds, used by `standard-webhooks` only).
    pub fn verify(
        &self,
        headers: &impl Headers,
        body: Bytes,
        now_secs: i64,
    ) -> Result<AuthenticatedBody, AuthError> {
        match self.mode {
            AuthMode::HmacSha256 => self.verify_hmac(headers, &body)?,
            AuthMode::StandardWebhooks => self.verify_standard(headers, &body, now_secs)?,
            AuthMode::SecretHeader => self.verify_secret_header(headers)?,
        }
        Ok(AuthenticatedBody(body))
    }

    fn verify_hmac(&self, headers: &impl Headers, body: &[u8]) -> Result<(), AuthError> {
        let value = headers
            .get(&self.header)
            .ok_or(AuthError::MissingSignature)?;
        let value = std::str::from_utf8(value)
            .map_err(|_| AuthError::InvalidSignature)?
            .trim();
        if value.is_empty() {
            return Err(AuthError::MissingSignature);
        }
        let signature = parse_hmac_signature(value).ok_or(AuthError::InvalidSignature)?;
        let matched = self.keys.iter().any(|key| {
            let mut mac = new_mac(key.raw.expose_secret());
            mac.update(body);
            mac.verify_slice(&signature).is_ok()
        });
        if matched {
            Ok(())
        } else {
            Err(AuthError::InvalidSignature)
        }
    }

    fn verify_standard(
        &self,
        headers: &impl Headers,
        body: &[u8],
        now_secs: i64,
    ) -> Result<(), AuthError> {
        let id = headers.get(WEBHOOK_ID).ok_or(AuthError::MissingSignature)?;
        let timestamp = headers
            .get(WEBHOOK_TIMESTAMP)
            .ok_or(AuthError::MissingSignature)?;
        let signatures = headers
            .get(WEBHOOK_SIGNATURE)
            .ok_or(AuthError::MissingSignature)?;
        let ts: i64 = std::str::from_utf8(timestamp)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(AuthError::InvalidSignature)?;
        let tolerance = i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX);
        if now_secs.saturating_sub(ts).abs() > tolerance {
            return Err(AuthError::StaleTimestamp);
        }
        let candidates = parse_standard_signatures(signatures);
        if candidates.is_empty() {
            return Err(AuthError::InvalidSignature);
        }
        // One MAC per secret, compared with every listed signature: the cost
        // of a request does not grow with the length of its list.
        let matched = self.keys.iter().any(|key| {
            let expected = standard_mac(key.standard.expose_secret(), id, timestamp, body);
            candidates
                .iter()
                .any(|sig| bool::from(expected.as_slice().ct_eq(sig.as_slice())))
        });
        if matched {
            Ok(())
        } else {
            Err(AuthError::InvalidSignature)
        }
    }

    fn verify_secret_header(&self, headers: &impl Headers) -> Result<(), AuthError> {
        let value = headers
            .get(&self.header)
            .ok_or(AuthError::MissingSignature)?;
        if value.is_empty() {
            return Err(AuthError::MissingSignature);
        }
        let digest: [u8; 32] = Sha256::digest(value).into();
        // Fold over every key without short-circuiting, so timing does not
        // reveal which secret matched.
        let matched = self.keys.iter().fold(subtle::Choice::from(0), |acc, key| {
            acc | key.raw_digest.ct_eq(&digest)
        });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(AuthError::InvalidSignature)
        }
    }
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// A `whsec_` secret is base64 after the prefix; anything else is used as is.
fn standard_webhooks_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => STANDARD
            .decode(encoded)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

/// Parses `[sha256=]<hex | base64>` into the 32 signature bytes.
pub fn parse_hmac_signature(value: &str) -> Option<Vec<u8>> {
    let value = value.trim();
    let value = value
        .strip_prefix("sha256=")
        .or_else(|| value.strip_prefix("SHA256="))
        .unwrap_or(value);
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(value).ok();
    }
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(value).ok())
        .filter(|bytes| bytes.len() == 32)
}

/// The Standard Webhooks MAC of `{id}.{timestamp}.{body}`.
fn standard_mac(key: &[u8], id: &[u8], timestamp: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = new_mac(key);
    mac.update(id);
    mac.update(b".");
    mac.update(timestamp);
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Parses a Standard Webhooks signature header: space-separated `v1,<base64>`
/// entries; entries of other versions are ignored, and only the first
/// [`MAX_STANDARD_SIGNATURES`] entries are read (SPEC 2.1).
pub fn parse_standard_signatures(header: &[u8]) -> Vec<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(header) else {
        return Vec::new();
    };
    text.split_ascii_whitespace()
        .take(MAX_STANDARD_SIGNATURES)
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter(|sig| sig.len() == 32)
        .collect()
}

/// The headers a sender attaches to `body` (used by `sign`, `send-test` and
/// the tests): one `(name, value)` pair each.
pub fn sign(
    mode: AuthMode,
    header: &str,
    secret: &str,
    body: &[u8],
    now_secs: i64,
    message_id: &str,
) -> Vec<(String, String)> {
    match mode {
        AuthMode::HmacSha256 => {
            let mut mac = new_mac(secret.as_bytes());
            mac.update(body);
            let sig = hex::encode(mac.finalize().into_bytes());
            vec![(header.to_string(), format!("sha256={sig}"))]
        }
        AuthMode::StandardWebhooks => {
            let ts = now_secs.to_string();
            let key = standard_webhooks_key(secret);
            let sig = STANDARD.encode(standard_mac(
                &key,
                message_id.as_bytes(),
                ts.as_bytes(),
                body,
            ));
            vec![
                (WEBHOOK_ID.to_string(), message_id.to_string()),
                (WEBHOOK_TIMESTAMP.to_string(), ts),
                (WEBHOOK_SIGNATURE.to_string(), format!("v1,{sig}")),
            ]
        }
        AuthMode::SecretHeader => vec![(header.to_string(), secret.to_string())],
    }
}

#[cfg(test)]
mod tests {
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
            parse_standard_signatures(format!("v1,{}", STANDARD.encode([1u8; 32])).as_bytes())
                .len(),
            1
        );
    }
}
