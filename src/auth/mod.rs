//! Authentication of the raw request body against SendTalk's secret key, in
//! the three modes of SPEC 2.1. Pure: no I/O, no clock (the caller passes
//! `now`), no parsing of the body.
//!
//! The only way to obtain an [`AuthenticatedBody`] is [`Verifier::verify`],
//! so the payload parser cannot be handed bytes nobody checked.

mod mode;

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use mode::AuthMode;

type HmacSha256 = Hmac<Sha256>;

/// Standard Webhooks: the message id (the three header names are fixed by
/// that specification).
pub const WEBHOOK_ID: &str = "webhook-id";
/// Unix seconds at which the message was signed.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Space-separated `v1,<base64>` signatures.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Most entries of a `webhook-signature` list that are read: a sender rotates
/// between a few keys, never dozens, and a long list must not cost more.
pub const MAX_STANDARD_SIGNATURES: usize = 16;

/// Why a request was not authenticated. Each maps to one 401 error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// A header the mode needs is absent or empty.
    #[error("the request carries no signature")]
    MissingSignature,
    /// Present, but unreadable or matching no configured secret.
    #[error("the signature does not match the body")]
    InvalidSignature,
    /// `standard-webhooks` only: signed too long before or after `now`.
    #[error("the signature timestamp is outside the accepted window")]
    StaleTimestamp,
}

/// A body whose signature was checked; only [`Verifier::verify`] makes one.
#[derive(Debug, Clone)]
pub struct AuthenticatedBody(Bytes);

impl AuthenticatedBody {
    /// The body exactly as received and checked.
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
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Derives the key material of every secret once; `header` is the
    /// signature (or secret) header of `hmac-sha256` and `secret-header`, and
    /// `tolerance` the `standard-webhooks` timestamp window.
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

    /// The configured mode.
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
mod tests;
