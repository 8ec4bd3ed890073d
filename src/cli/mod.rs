//! The command-line helpers: those that act as a sender (`sign` prints the
//! headers for a body, `send-test` posts a freshly signed sample event),
//! `healthcheck`, and the operator's [`spool`] commands.

pub mod spool;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};

use crate::auth;
use crate::config::{AuthMode, Settings};

/// Mode, header and secret a sender uses: flags win over the configuration.
#[derive(Debug, Clone)]
pub struct SenderKey {
    /// How the request is signed: `--mode`, else `auth.mode`.
    pub mode: AuthMode,
    /// Where the signature (or the secret) goes: `--header`, else the
    /// configured header when the mode is the configured one, else the
    /// mode's default.
    pub header: String,
    /// Exposed only to sign; `{:?}` shows it redacted.
    pub secret: SecretString,
}

impl SenderKey {
    /// Mode, header and secret from the flags, else from `settings`.
    pub fn resolve(
        settings: &Settings,
        mode: Option<AuthMode>,
        header: Option<String>,
        secret: Option<String>,
    ) -> anyhow::Result<Self> {
        let secret = match secret {
            Some(s) => SecretString::from(s),
            None => settings
                .auth
                .secrets
                .first()
                .cloned()
                .context("no secret: pass --secret or configure auth.secrets")?,
        };
        // A mode other than the configured one brings its own default header.
        let header = match (header, mode) {
            (Some(h), _) => h,
            (None, Some(m)) if m != settings.auth.mode => m.default_header().to_string(),
            (None, _) => settings.auth.header().to_string(),
        };
        Ok(Self {
            mode: mode.unwrap_or(settings.auth.mode),
            header,
            secret,
        })
    }

    /// The headers for `body`, as `(name, value)` pairs.
    pub fn headers(&self, body: &[u8]) -> Vec<(String, String)> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let message_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        auth::sign(
            self.mode,
            &self.header,
            self.secret.expose_secret(),
            body,
            i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            &message_id,
        )
    }
}

/// A sample verification event with the current time and the given id.
pub fn sample_event(id: &str, status: &str) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    serde_json::json!({
        "id": id,
        "userPhone": "6281212345678",
        "status": status,
        "verifiedTime": u64::try_from(now_ms).unwrap_or(u64::MAX),
    })
    .to_string()
}

/// The URL `send-test` posts to by default: the configured listener, with an
/// unspecified address replaced by loopback.
pub fn default_url(settings: &Settings) -> String {
    let mut addr = settings.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}{}", settings.http.webhook_path)
}

/// `GET /healthz` on the admin listener of `settings`, with an unspecified
/// address replaced by loopback (SPEC 8).
pub fn healthz_url(settings: &Settings) -> String {
    format!("{}/healthz", spool::admin_base(settings))
}

/// Longest `healthcheck` waits for the answer.
const HEALTHCHECK_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// `Ok` when `url` answers 200 within two seconds.
pub async fn healthcheck(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(HEALTHCHECK_WITHIN)
        .build()
        .context("Failed to build the HTTP client")?;
    let status = client.get(url).send().await.context("no answer")?.status();
    anyhow::ensure!(status == reqwest::StatusCode::OK, "answered {status}");
    Ok(())
}

/// Posts a signed body; returns the status code and the response body.
pub async fn post_signed(
    url: &str,
    key: &SenderKey,
    body: String,
) -> anyhow::Result<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("Failed to build the HTTP client")?;
    let mut request = client.post(url).header("content-type", "application/json");
    for (name, value) in key.headers(body.as_bytes()) {
        request = request.header(name, value);
    }
    let response = request
        .body(body)
        .send()
        .await
        .with_context(|| format!("Failed to POST to {url}"))?;
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .context("Failed to read the response")?;
    Ok((status, text))
}
