//! [`AuthMode`]: how a sender proves it holds the secret key (SPEC 2.1).

use serde::{Deserialize, Serialize};

/// How the sender proves it holds the secret key (SPEC 2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    #[serde(rename = "hmac-sha256")]
    /// `hmac-sha256`: an HMAC of the body in `auth.header`.
    HmacSha256,
    /// `standard-webhooks`: the Standard Webhooks headers.
    StandardWebhooks,
    /// `secret-header`: the secret itself in `auth.header`.
    SecretHeader,
}

impl AuthMode {
    /// `auth.header` when it is not set: `X-Secret-Key` (TapTalk's header for
    /// the secret key itself) or `X-SendTalk-Signature` (HMAC). Standard
    /// Webhooks has fixed header names and ignores it.
    pub fn default_header(self) -> &'static str {
        match self {
            AuthMode::SecretHeader => "X-Secret-Key",
            AuthMode::HmacSha256 | AuthMode::StandardWebhooks => "X-SendTalk-Signature",
        }
    }

    /// The name used in the configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::HmacSha256 => "hmac-sha256",
            AuthMode::StandardWebhooks => "standard-webhooks",
            AuthMode::SecretHeader => "secret-header",
        }
    }
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hmac-sha256" => Ok(AuthMode::HmacSha256),
            "standard-webhooks" => Ok(AuthMode::StandardWebhooks),
            "secret-header" => Ok(AuthMode::SecretHeader),
            other => Err(format!(
                "unknown auth mode `{other}` (expected hmac-sha256, standard-webhooks or secret-header)"
            )),
        }
    }
}
