//! The simulator's command line: every flag with its environment variable
//! and default, and the one conversion from raw flags to checked `Settings`
//! (units turned into `Duration`, secrets wrapped, the webhook URL parsed).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use reqwest::Url;
use secrecy::SecretString;

/// Default API key: a public development value, like the relay's
/// `dev-secret`, so that `sendtalk-sim` runs with no flag at all.
pub const DEV_API_KEY: &str = "sim-api-key";
/// Default webhook secret: the relay's publicly documented development
/// secret (SPEC 7), so the two binaries talk out of the box.
pub const DEV_SECRET: &str = "dev-secret";
/// A number no one owns (Indonesia's 62 plus zeros): SendTalk's real business
/// account number is not documented, and `waLink` is never opened by a test.
pub const DEFAULT_WA_NUMBER: &str = "6280000000000";

/// A stand-in for SendTalk's WhatsApp Verification API (SPEC 10).
///
/// Endpoints:
///   POST /api/v1/verification/create_whatsapp_verification
///        SendTalk's documented create (header API-Key); answers in the
///        documented envelope {status, error {code, message, field}, data}
///   POST /sim/verifications/{id}/complete   [body {"userPhone": "..."}]
///        plays the user sending the WhatsApp message: POSTs the documented
///        webhook body to --webhook-url per --auth-mode, retrying non-2xx or
///        timed-out deliveries with doubling backoff
///   GET  /sim/deliveries[?verificationId=ID]   every delivery attempt
///   GET  /healthz
///
/// Create triggers, by the last four digits of userPhone:
///   0000  data.success=false, reason invalid_recipient
///   0001  data.success=false, reason insufficient_balance
///   0002  data.success=false, reason config_disabled
///   0003  HTTP 500, plain-text body
///   0004  HTTP 200, HTML body (not JSON)
///   0005  success after --slow-phone-delay-ms
///   other success
/// API-Key missing: envelope status 400, code 40001 (documented).
/// API-Key wrong:   envelope status 401, code 40100 (the simulator's choice).
/// Parameter error: envelope status 400, code 40002, field named.
#[derive(Parser)]
#[command(name = "sendtalk-sim", version, verbatim_doc_comment)]
pub struct Cli {
    /// Address the simulator listens on.
    #[arg(long, env = "SENDTALK_SIM_LISTEN", default_value = "127.0.0.1:8099")]
    pub listen: SocketAddr,

    /// API key that clients must send in the `API-Key` header.
    #[arg(long, env = "SENDTALK_SIM_API_KEY", default_value = DEV_API_KEY,
          hide_default_value = true, hide_env_values = true)]
    pub api_key: String,

    /// Where verified webhooks are POSTed (plain http).
    #[arg(
        long,
        env = "SENDTALK_SIM_WEBHOOK_URL",
        default_value = "http://127.0.0.1:8080/webhooks/sendtalk/verification"
    )]
    pub webhook_url: String,

    /// How the webhook carries the secret key.
    #[arg(long, env = "SENDTALK_SIM_AUTH_MODE", value_enum, default_value_t = AuthMode::SecretHeader)]
    pub auth_mode: AuthMode,

    /// Header carrying the secret or the signature [default: X-Secret-Key
    /// for secret-header, X-SendTalk-Signature for hmac-sha256].
    #[arg(long, env = "SENDTALK_SIM_HEADER")]
    pub header: Option<String>,

    /// Webhook secret key [default: the development secret `dev-secret`].
    #[arg(long, env = "SENDTALK_SIM_SECRET", default_value = DEV_SECRET,
          hide_default_value = true, hide_env_values = true)]
    pub secret: String,

    /// SendTalk's WhatsApp business number, the recipient in `waLink`.
    #[arg(long, env = "SENDTALK_SIM_WA_NUMBER", default_value = DEFAULT_WA_NUMBER)]
    pub wa_number: String,

    /// Delay before every create answer, in milliseconds (client timeouts).
    #[arg(long, env = "SENDTALK_SIM_CREATE_DELAY_MS", default_value_t = 0)]
    pub create_delay_ms: u64,

    /// Delay of a create for a userPhone ending in 0005, in milliseconds.
    #[arg(
        long,
        env = "SENDTALK_SIM_SLOW_PHONE_DELAY_MS",
        default_value_t = 30_000
    )]
    pub slow_phone_delay_ms: u64,

    /// Make every create fail this way, whatever the phone number.
    #[arg(long, env = "SENDTALK_SIM_CREATE_FAULT", value_enum, default_value_t = CreateFault::None)]
    pub create_fault: CreateFault,

    /// Webhook delivery attempts in all (the first one included).
    #[arg(long, env = "SENDTALK_SIM_DELIVERY_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub delivery_attempts: u32,

    /// Wait before the first retry, in milliseconds; doubles at each retry.
    #[arg(long, env = "SENDTALK_SIM_DELIVERY_BACKOFF_MS", default_value_t = 200)]
    pub delivery_backoff_ms: u64,

    /// Time limit of one delivery attempt, in milliseconds.
    #[arg(long, env = "SENDTALK_SIM_DELIVERY_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub delivery_timeout_ms: u64,
}

/// How the webhook is authenticated (SPEC 2.1, the two modes a sender of
/// SendTalk's kind would use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// The secret itself in the header (TapTalk's convention).
    SecretHeader,
    /// `sha256=<hex HMAC-SHA256(secret, raw body)>` in the header.
    HmacSha256,
}

impl AuthMode {
    fn default_header(self) -> &'static str {
        match self {
            AuthMode::SecretHeader => "X-Secret-Key",
            AuthMode::HmacSha256 => "X-SendTalk-Signature",
        }
    }
}

/// A failure forced on every create, for client error-path tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CreateFault {
    /// Answer normally.
    None,
    /// HTTP 500 with a plain-text body.
    #[value(name = "http-500")]
    Http500,
    /// HTTP 200 with a body that is not JSON.
    NotJson,
}

/// Why the flags cannot be used; start-up stops before binding.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("--webhook-url {url:?} is not a URL: {reason}")]
    WebhookUrl { url: String, reason: String },
    #[error("--webhook-url must use http:// (this build has no TLS client), got {0:?}")]
    WebhookScheme(String),
    #[error("--wa-number must be 5 to 15 digits")]
    WaNumber,
    #[error("--header {0:?} is not a valid HTTP header name")]
    Header(String),
    #[error(
        "--secret must be printable ASCII to travel as is in a header (--auth-mode secret-header)"
    )]
    SecretNotHeaderValue,
    #[error("--{0} must not be empty")]
    Empty(&'static str),
}

/// The checked configuration the rest of the simulator reads.
pub struct Settings {
    pub listen: SocketAddr,
    /// Compared with each request's `API-Key`; never logged.
    pub api_key: SecretString,
    pub webhook: WebhookSettings,
    pub wa_number: String,
    pub create_delay: Duration,
    pub slow_phone_delay: Duration,
    pub create_fault: CreateFault,
}

/// Everything the delivery of a webhook needs.
pub struct WebhookSettings {
    pub url: Url,
    pub mode: AuthMode,
    pub header: reqwest::header::HeaderName,
    /// The webhook secret key; only `delivery.rs` exposes it.
    pub secret: SecretString,
    pub attempts: u32,
    pub first_backoff: Duration,
    pub timeout: Duration,
}

// Hand-written so that a `{:?}` never shows a secret.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("api_key", &"<redacted>")
            .field("webhook_url", &self.webhook.url.as_str())
            .field("auth_mode", &self.webhook.mode)
            .field("header", &self.webhook.header)
            .field("wa_number", &self.wa_number)
            .finish_non_exhaustive()
    }
}

impl Cli {
    /// Checks the flags and converts units once.
    pub fn into_settings(self) -> Result<Settings, CliError> {
        let url: Url = self
            .webhook_url
            .parse()
            .map_err(|e: <Url as std::str::FromStr>::Err| CliError::WebhookUrl {
                url: self.webhook_url.clone(),
                reason: e.to_string(),
            })?;
        if url.scheme() != "http" {
            return Err(CliError::WebhookScheme(self.webhook_url));
        }
        let wa = &self.wa_number;
        if !(5..=15).contains(&wa.len()) || !wa.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CliError::WaNumber);
        }
        if self.api_key.is_empty() {
            return Err(CliError::Empty("api-key"));
        }
        if self.secret.is_empty() {
            return Err(CliError::Empty("secret"));
        }
        if self.auth_mode == AuthMode::SecretHeader
            && reqwest::header::HeaderValue::from_str(&self.secret).is_err()
        {
            return Err(CliError::SecretNotHeaderValue);
        }
        let header_name = self
            .header
            .unwrap_or_else(|| self.auth_mode.default_header().to_string());
        let header = reqwest::header::HeaderName::from_bytes(header_name.as_bytes())
            .map_err(|_| CliError::Header(header_name.clone()))?;
        Ok(Settings {
            listen: self.listen,
            api_key: self.api_key.into(),
            webhook: WebhookSettings {
                url,
                mode: self.auth_mode,
                header,
                secret: self.secret.into(),
                attempts: self.delivery_attempts,
                first_backoff: Duration::from_millis(self.delivery_backoff_ms),
                timeout: Duration::from_millis(self.delivery_timeout_ms),
            },
            wa_number: self.wa_number,
            create_delay: Duration::from_millis(self.create_delay_ms),
            slow_phone_delay: Duration::from_millis(self.slow_phone_delay_ms),
            create_fault: self.create_fault,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, CliError> {
        let mut argv = vec!["sendtalk-sim"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().into_settings()
    }

    #[test]
    fn the_header_defaults_per_mode() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.webhook.header.as_str(), "x-secret-key");
        let s = parse(&["--auth-mode", "hmac-sha256"]).unwrap();
        assert_eq!(s.webhook.header.as_str(), "x-sendtalk-signature");
        let s = parse(&["--auth-mode", "hmac-sha256", "--header", "X-Sig"]).unwrap();
        assert_eq!(s.webhook.header.as_str(), "x-sig");
    }

    #[test]
    fn bad_flags_are_refused_before_start() {
        assert!(matches!(
            parse(&["--webhook-url", "https://example.com/hook"]),
            Err(CliError::WebhookScheme(_))
        ));
        assert!(matches!(
            parse(&["--webhook-url", "not a url"]),
            Err(CliError::WebhookUrl { .. })
        ));
        assert!(matches!(
            parse(&["--wa-number", "62-81"]),
            Err(CliError::WaNumber)
        ));
        assert!(matches!(
            parse(&["--header", "bad header"]),
            Err(CliError::Header(_))
        ));
        assert!(matches!(parse(&["--secret", ""]), Err(CliError::Empty(_))));
        assert!(matches!(
            parse(&["--secret", "line\nbreak"]),
            Err(CliError::SecretNotHeaderValue)
        ));
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let s = parse(&["--api-key", "k-123", "--secret", "s-456"]).unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("k-123") && !shown.contains("s-456"),
            "{shown}"
        );
    }
}
