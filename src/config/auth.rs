//! `[auth]` and `[webhook]`: how a sender proves it holds the secret key
//! (SPEC 2.1) and which events are accepted (SPEC 2.2). Secrets are
//! `SecretString` from deserialisation on and are resolved (files read, the
//! development secret chosen) once, here.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use super::dedup::DEFAULT_TTL_SECS;
use super::dump::redacted_secrets;
use super::{ConfigError, DEV_SECRET};
use crate::auth::AuthMode;

/// The Standard Webhooks recommendation.
const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// `[auth]` as written; `secrets` are secret from the moment they are read.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAuth {
    mode: AuthMode,
    /// The header carrying the secret or signature; `None` means the mode's
    /// default ([`AuthMode::default_header`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) header: Option<String>,
    #[serde(serialize_with = "redacted_secrets")]
    secrets: Vec<SecretString>,
    secret_files: Vec<PathBuf>,
    tolerance_secs: u64,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            // TapTalk's convention for calls to a customer's URL (SPEC 2.1).
            mode: AuthMode::SecretHeader,
            header: None,
            secrets: Vec::new(),
            secret_files: Vec::new(),
            tolerance_secs: DEFAULT_TOLERANCE_SECS,
        }
    }
}

/// `[auth]`, validated, with every secret resolved.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `auth.mode`.
    pub mode: AuthMode,
    /// The header in effect: the configured one, else the mode's default.
    header: String,
    /// `auth.secrets` then `auth.secret_files` (or the development secret):
    /// every one is accepted, so keys can be rotated. Never empty.
    pub secrets: Vec<SecretString>,
    /// How far a signed timestamp may be from now; greater than zero.
    pub tolerance: Duration,
}

impl AuthSettings {
    /// The header name in effect: the configured one, else the mode's default.
    pub fn header(&self) -> &str {
        &self.header
    }
}

impl RawAuth {
    /// The header name in effect: the configured one, else the mode's default.
    pub(super) fn effective_header(&self) -> &str {
        self.header
            .as_deref()
            .unwrap_or_else(|| self.mode.default_header())
    }

    /// The checks that need no file: the header name and the tolerance.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let header = self.effective_header().as_bytes();
        if actix_web::http::header::HeaderName::from_bytes(header).is_err() {
            return Err(ConfigError::new(
                "auth.header",
                "is not a valid HTTP header name",
            ));
        }
        if self.tolerance_secs == 0 {
            return Err(ConfigError::new(
                "auth.tolerance_secs",
                "must be greater than 0",
            ));
        }
        Ok(())
    }

    /// Resolves the secrets from `auth.secrets` and `auth.secret_files`; with
    /// neither, the development secret on the embedded defaults (the `bool`
    /// says so) and an error once a file is in play.
    pub(super) fn resolve(self, embedded: bool) -> Result<(AuthSettings, bool), ConfigError> {
        let header = self.effective_header().to_string();
        let mut secrets = Vec::new();
        for (i, s) in self.secrets.into_iter().enumerate() {
            if s.expose_secret().is_empty() {
                return Err(ConfigError::new(
                    format!("auth.secrets[{i}]"),
                    "must not be empty",
                ));
            }
            secrets.push(s);
        }
        for (i, path) in self.secret_files.iter().enumerate() {
            let content = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    format!("auth.secret_files[{i}]"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let trimmed = content.trim();
            if trimmed.is_empty() {
                return Err(ConfigError::new(
                    format!("auth.secret_files[{i}]"),
                    format!("{} is empty", path.display()),
                ));
            }
            secrets.push(SecretString::from(trimmed));
        }
        let mut using_dev_secret = false;
        if secrets.is_empty() {
            if embedded {
                secrets.push(SecretString::from(DEV_SECRET));
                using_dev_secret = true;
            } else {
                return Err(ConfigError::new(
                    "auth.secrets",
                    "no secret configured: set auth.secrets or auth.secret_files",
                ));
            }
        }
        let auth = AuthSettings {
            mode: self.mode,
            header,
            secrets,
            tolerance: Duration::from_secs(self.tolerance_secs),
        };
        Ok((auth, using_dev_secret))
    }
}

/// `[webhook]` as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWebhook {
    accepted_statuses: Vec<String>,
    max_event_age_secs: u64,
}

impl Default for RawWebhook {
    fn default() -> Self {
        Self {
            accepted_statuses: vec!["verified".into()],
            max_event_age_secs: DEFAULT_TTL_SECS,
        }
    }
}

/// `[webhook]`: which events are accepted.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// At least one; each is safe in a routing key and a message type.
    pub accepted_statuses: Vec<String>,
    /// Older events are refused; never longer than the dedup window.
    pub max_event_age: Duration,
}

impl RawWebhook {
    /// Checks the statuses and the age, which must stay within the dedup
    /// window (`dedup.ttl_secs`).
    pub(super) fn validate(self, dedup_ttl_secs: u64) -> Result<WebhookSettings, ConfigError> {
        if self.accepted_statuses.is_empty() {
            return Err(ConfigError::new(
                "webhook.accepted_statuses",
                "must list at least one status",
            ));
        }
        if let Some(bad) = self.accepted_statuses.iter().find(|s| !is_routing_word(s)) {
            return Err(ConfigError::new(
                "webhook.accepted_statuses",
                format!(
                    "`{bad}` is not a usable status (1-64 characters of a-z, A-Z, 0-9, _ or -)"
                ),
            ));
        }
        if self.max_event_age_secs == 0 {
            return Err(ConfigError::new(
                "webhook.max_event_age_secs",
                "must be greater than 0",
            ));
        }
        if self.max_event_age_secs > dedup_ttl_secs {
            return Err(ConfigError::new(
                "webhook.max_event_age_secs",
                format!(
                    "{} exceeds dedup.ttl_secs ({}): replays older than the dedup window could not be recognised",
                    self.max_event_age_secs, dedup_ttl_secs
                ),
            ));
        }
        Ok(WebhookSettings {
            accepted_statuses: self.accepted_statuses,
            max_event_age: Duration::from_secs(self.max_event_age_secs),
        })
    }
}

/// A status becomes part of a routing key and a message type, so it is kept
/// to characters that are safe in both.
fn is_routing_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::super::test_support::env;
    use super::super::Settings;
    use secrecy::ExposeSecret as _;

    #[test]
    fn a_file_without_secrets_is_rejected() {
        let dir = std::env::temp_dir().join(format!("cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "sink = \"stdout\"\n").unwrap();
        let err = Settings::load(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.key, "auth.secrets");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn secret_files_are_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "from-file\n").unwrap();
        let s = Settings::load(
            None,
            env(&[(
                "SENDTALK_RELAY__AUTH__SECRET_FILES",
                secret.to_str().unwrap(),
            )]),
        )
        .unwrap();
        assert_eq!(s.auth.secrets[0].expose_secret(), "from-file");
        assert!(!s.using_dev_secret);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_header_is_the_configured_one_else_the_modes_default() {
        let s = Settings::load(None, env(&[("SENDTALK_RELAY__AUTH__MODE", "hmac-sha256")]));
        assert_eq!(s.unwrap().auth.header(), "X-SendTalk-Signature");
        let s = Settings::load(None, env(&[("SENDTALK_RELAY__AUTH__HEADER", "X-Key")]));
        assert_eq!(s.unwrap().auth.header(), "X-Key");
        let err = Settings::load(None, env(&[("SENDTALK_RELAY__AUTH__HEADER", "a b")]));
        assert_eq!(err.unwrap_err().key, "auth.header");
    }
}
