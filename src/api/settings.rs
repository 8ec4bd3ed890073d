//! The `[api]` and `[sendtalk]` configuration sections (SPEC 7, 9): their
//! defaults, validation into typed settings and the resolution of tokens and
//! the API key from files. `config` only embeds the raw sections and calls
//! `check`, so the lifecycle API's settings live next to the code that
//! uses them. Tokens and the key are `SecretString` from deserialisation on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{redact_url_password, redacted_secret, redacted_secrets, ConfigError};

/// SendTalk's documented production base URL.
const DEFAULT_BASE_URL: &str = "https://sendtalk-api.taptalk.io";
/// SendTalk answers in well under a second; 10 s only trips on an outage,
/// and a create is never retried, so a short bound would cost verifications.
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// SendTalk's own default expiry for a verification.
const DEFAULT_EXPIRY_MINUTES: u32 = 10;
/// An expired verification is announced within this many seconds; a sweep
/// is one Redis range query, so a few seconds costs nothing.
const DEFAULT_EXPIRY_CHECK_SECS: u64 = 5;
/// SendTalk's documented range of `expiryMinutes` (one day at most).
pub const EXPIRY_MINUTES_RANGE: std::ops::RangeInclusive<u32> = 1..=1440;
/// The languages SendTalk documents for `languageCode`.
pub const LANGUAGES: [&str; 2] = ["en", "id"];

/// `[api]` as written; `tokens` are secret from the moment they are read.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawApi {
    enabled: bool,
    listen: SocketAddr,
    #[serde(serialize_with = "redacted_secrets")]
    tokens: Vec<SecretString>,
    token_files: Vec<PathBuf>,
    expiry_check_secs: u64,
}

impl Default for RawApi {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            tokens: Vec::new(),
            token_files: Vec::new(),
            expiry_check_secs: DEFAULT_EXPIRY_CHECK_SECS,
        }
    }
}

/// `[api]`: the client-facing lifecycle API (SPEC 9), validated.
#[derive(Clone)]
pub struct ApiSettings {
    /// `api.enabled`: the listener is bound only when set.
    pub enabled: bool,
    /// Its own listener: internal callers only, never the public port.
    pub listen: SocketAddr,
    /// Tokens from `api.tokens` and `api.token_files`; at least one when
    /// the API is enabled.
    pub tokens: Vec<SecretString>,
    /// How often expired verifications are looked for; greater than zero.
    pub expiry_check: Duration,
}

/// Hand-written: the tokens never reach a log through `{:?}`.
impl std::fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("tokens", &self.tokens.len())
            .field("expiry_check", &self.expiry_check)
            .finish()
    }
}

/// `[sendtalk]` as written; `api_key` is secret from the moment it is read.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawSendTalk {
    base_url: String,
    #[serde(serialize_with = "redacted_secret")]
    api_key: SecretString,
    api_key_file: PathBuf,
    timeout_ms: u64,
    default_language: String,
    default_expiry_minutes: u32,
}

impl Default for RawSendTalk {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.into(),
            api_key: SecretString::default(),
            api_key_file: PathBuf::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            default_language: "en".into(),
            default_expiry_minutes: DEFAULT_EXPIRY_MINUTES,
        }
    }
}

/// `[sendtalk]`: how the relay calls SendTalk's create API, validated.
#[derive(Clone)]
pub struct SendTalkSettings {
    /// An `http://` or `https://` URL with a host.
    pub base_url: reqwest::Url,
    /// From `api_key` or `api_key_file` (the file wins); always set when
    /// the API is enabled.
    pub api_key: Option<SecretString>,
    /// Greater than zero.
    pub timeout: Duration,
    /// One of [`LANGUAGES`].
    pub default_language: String,
    /// Within [`EXPIRY_MINUTES_RANGE`].
    pub default_expiry_minutes: u32,
}

/// Hand-written: the API key never reaches a log through `{:?}`.
impl std::fmt::Debug for SendTalkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendTalkSettings")
            .field("base_url", &redact_url_password(self.base_url.as_str()))
            .field("api_key_set", &self.api_key.is_some())
            .field("timeout", &self.timeout)
            .field("default_language", &self.default_language)
            .field("default_expiry_minutes", &self.default_expiry_minutes)
            .finish()
    }
}

/// Validates both sections and resolves their secrets. Values are checked
/// even with the API off, so that turning it on later is not the moment a
/// typo is found; secrets are only required when it is on. `taken` are the
/// other listeners' addresses (`http.listen`, `admin.listen`).
pub(crate) fn check(
    api: RawApi,
    sendtalk: RawSendTalk,
    taken: &[SocketAddr],
) -> Result<(ApiSettings, SendTalkSettings), ConfigError> {
    if api.enabled && api.listen.port() != 0 && taken.contains(&api.listen) {
        return Err(ConfigError::new(
            "api.listen",
            "must differ from http.listen and admin.listen (the API is for internal callers only)",
        ));
    }
    if api.expiry_check_secs == 0 {
        return Err(ConfigError::new(
            "api.expiry_check_secs",
            "must be greater than 0",
        ));
    }
    let url = reqwest::Url::parse(&sendtalk.base_url)
        .map_err(|e| ConfigError::new("sendtalk.base_url", format!("is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::new(
            "sendtalk.base_url",
            "must be an http:// or https:// URL with a host",
        ));
    }
    if sendtalk.timeout_ms == 0 {
        return Err(ConfigError::new(
            "sendtalk.timeout_ms",
            "must be greater than 0",
        ));
    }
    if !LANGUAGES.contains(&sendtalk.default_language.as_str()) {
        return Err(ConfigError::new(
            "sendtalk.default_language",
            "must be `en` or `id` (SendTalk's languages)",
        ));
    }
    if !EXPIRY_MINUTES_RANGE.contains(&sendtalk.default_expiry_minutes) {
        return Err(ConfigError::new(
            "sendtalk.default_expiry_minutes",
            "must be between 1 and 1440",
        ));
    }

    let tokens = crate::config::secrets::resolve(
        "api.tokens",
        api.tokens,
        "api.token_files",
        &api.token_files,
    )?;
    let mut api_key = (!sendtalk.api_key.expose_secret().is_empty()).then_some(sendtalk.api_key);
    if !sendtalk.api_key_file.as_os_str().is_empty() {
        api_key = Some(crate::config::secrets::read_file(
            "sendtalk.api_key_file",
            &sendtalk.api_key_file,
        )?);
    }
    if api.enabled {
        if tokens.is_empty() {
            return Err(ConfigError::new(
                "api.tokens",
                "api.enabled needs at least one bearer token (api.tokens or api.token_files)",
            ));
        }
        if api_key.is_none() {
            return Err(ConfigError::new(
                "sendtalk.api_key",
                "api.enabled needs SendTalk's API key (sendtalk.api_key or sendtalk.api_key_file)",
            ));
        }
    }
    let api = ApiSettings {
        enabled: api.enabled,
        listen: api.listen,
        tokens,
        expiry_check: Duration::from_secs(api.expiry_check_secs),
    };
    let sendtalk = SendTalkSettings {
        base_url: url,
        api_key,
        timeout: Duration::from_millis(sendtalk.timeout_ms),
        default_language: sendtalk.default_language,
        default_expiry_minutes: sendtalk.default_expiry_minutes,
    };
    Ok((api, sendtalk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> (RawApi, RawSendTalk) {
        (RawApi::default(), RawSendTalk::default())
    }

    #[test]
    fn defaults_pass_with_the_api_off() {
        let (a, s) = both();
        check(a, s, &[]).unwrap();
    }

    #[test]
    fn enabling_the_api_needs_a_token_then_an_api_key() {
        let (mut a, mut s) = both();
        a.enabled = true;
        let err = check(a.clone(), s.clone(), &[]).unwrap_err();
        assert_eq!(err.key, "api.tokens");
        a.tokens = vec!["t".into()];
        let err = check(a.clone(), s.clone(), &[]).unwrap_err();
        assert_eq!(err.key, "sendtalk.api_key");
        s.api_key = "k".into();
        let (api, sendtalk) = check(a, s, &[]).unwrap();
        assert_eq!(api.tokens.len(), 1);
        assert_eq!(sendtalk.api_key.unwrap().expose_secret(), "k");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_embedded_default_keeps_the_api_off_and_loads() {
        let s = crate::config::Settings::load(None, env(&[])).unwrap();
        assert!(!s.api.enabled);
    }

    #[test]
    fn loading_names_the_missing_secret_and_a_clashing_listener() {
        let err =
            crate::config::Settings::load(None, env(&[("SENDTALK_RELAY__API__ENABLED", "true")]))
                .unwrap_err();
        assert_eq!(err.key, "api.tokens");
        let err = crate::config::Settings::load(
            None,
            env(&[
                ("SENDTALK_RELAY__API__ENABLED", "true"),
                ("SENDTALK_RELAY__API__TOKENS", "a,b"),
                ("SENDTALK_RELAY__SENDTALK__API_KEY", "k"),
                ("SENDTALK_RELAY__API__LISTEN", "127.0.0.1:8080"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.key, "api.listen");
    }

    #[test]
    fn check_config_output_hides_tokens_and_the_api_key() {
        let s = crate::config::Settings::load(
            None,
            env(&[
                ("SENDTALK_RELAY__API__ENABLED", "true"),
                ("SENDTALK_RELAY__API__TOKENS", "tok-one,tok-two"),
                ("SENDTALK_RELAY__SENDTALK__API_KEY", "the-api-key"),
            ]),
        )
        .unwrap();
        assert_eq!(s.api.tokens.len(), 2);
        let out = s.redacted_toml();
        for secret in ["tok-one", "tok-two", "the-api-key"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.contains("[api]") && out.contains("[sendtalk]"), "{out}");
    }

    #[test]
    fn bad_values_name_their_key() {
        type Spoil = fn(&mut RawApi, &mut RawSendTalk);
        let cases: [(&str, Spoil); 5] = [
            ("sendtalk.default_language", |_, s| {
                s.default_language = "fr".into();
            }),
            ("sendtalk.default_expiry_minutes", |_, s| {
                s.default_expiry_minutes = 1441;
            }),
            ("sendtalk.base_url", |_, s| s.base_url = "ftp://x".into()),
            ("sendtalk.timeout_ms", |_, s| s.timeout_ms = 0),
            ("api.expiry_check_secs", |a, _| a.expiry_check_secs = 0),
        ];
        for (key, spoil) in cases {
            let (mut a, mut s) = both();
            spoil(&mut a, &mut s);
            assert_eq!(check(a, s, &[]).unwrap_err().key, key);
        }
    }
}
