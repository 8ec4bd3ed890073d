//! Settings: the layered configuration (defaults < TOML file < environment),
//! its validation into typed values, and the conversion of configured units
//! into `Duration`s.
//!
//! Every key of SPEC section 7 lives in this module and nowhere else. Each
//! section exists twice: a `Raw*` struct mirrors the TOML keys for serde
//! (unknown keys refused, defaults filled in), and validation turns it into
//! the typed `*Settings` the rest of the crate reads, so no later code
//! re-parses a string or falls back silently. Unknown keys and bad values
//! become a [`ConfigError`] naming the key; `main` turns that into exit code
//! 64 before any socket is bound.
//!
//! # Layout
//! - `http`: `[http]` and `[admin]`: listeners, trusted proxies, HTTPS.
//! - `auth`: `[auth]` and `[webhook]`: the sender's secrets, accepted events.
//! - `dedup`: `[dedup]` and `[redis]`: the dedup store and how Redis is found.
//! - `amqp`: `[amqp]` and `[[amqp.queues]]`, validated into
//!   `publish::settings` with the AMQP values of `publish::broker` (URIs,
//!   exchange names and kinds, the routing-key template).
//! - `spool_log`: `[spool]`, `[log]` and `[shutdown]`.
//! - `dump`: what `check-config` prints, and every key with its default.
//!
//! `[api]` and `[sendtalk]` belong to the lifecycle API and live in
//! [`crate::api::settings`].

mod amqp;
mod auth;
mod dedup;
mod dump;
mod http;
pub(crate) mod secrets;
mod spool_log;

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::auth::AuthMode;
pub use crate::publish::broker::{BrokerUri, ExchangeName, ExchangeType, RoutingKey};
pub use crate::ratelimit::IpNet;
pub use crate::telemetry::{LogFilter, LogFormat, LogSettings};
pub use amqp::{AmqpSettings, OnUnroutable, QueueSettings};
pub use auth::{AuthSettings, WebhookSettings};
pub use dedup::{
    DedupBackend, DedupSettings, DedupStore, OnUnavailable, RedisMode, RedisSettings, RedisUrl,
};
pub use dump::{default_keys, redact_url_password};
pub(crate) use dump::{redacted_secret, redacted_secrets};
pub use http::{AdminSettings, HttpSettings, ServerTls};
pub use spool_log::{ShutdownSettings, SpoolSettings};

use crate::api::settings::{ApiSettings, SendTalkSettings};

/// Prefix of every environment variable that configures the relay.
pub const ENV_PREFIX: &str = "SENDTALK_RELAY__";
/// Environment variable naming the TOML file, the same as `--config`.
pub const CONFIG_FILE_ENV: &str = "SENDTALK_RELAY_CONFIG";
/// The publicly documented development secret used when nothing else is set
/// and no file is given; never accepted once a file is in play.
pub const DEV_SECRET: &str = "dev-secret";

/// Keys that hold lists; in the environment they take comma-separated values.
const LIST_KEYS: &[&str] = &[
    "http.trusted_proxies",
    "auth.secrets",
    "auth.secret_files",
    "webhook.accepted_statuses",
    "amqp.uri",
    "api.tokens",
    "api.token_files",
    "redis.urls",
    "admin.tokens",
    "admin.token_files",
];

/// Values that differ when the relay runs with no file at all: a laptop demo
/// must work without Redis, RabbitMQ or a public port.
const EMBEDDED_DEFAULTS: &str = r#"
sink = "stdout"
[http]
listen = "127.0.0.1:8080"
[dedup]
backend = "memory"
"#;

/// `sink` when neither the embedded defaults nor a file set it: a deployed
/// relay publishes to RabbitMQ.
const DEFAULT_SINK: &str = "amqp";

/// Keys that an explicit demo choice makes meaningless (SPEC 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredKeys {
    /// The explicit choice, as `key = value`.
    pub because: &'static str,
    /// The keys it ignores, dotted.
    pub keys: Vec<String>,
}

/// A demo default and the real backend whose keys replace it (SPEC 7: a
/// configured backend never falls back silently).
struct RealBackend {
    /// The key that chooses (`sink`, `dedup.backend`).
    choice: &'static str,
    /// The value its keys imply.
    real: &'static str,
    /// The demo value.
    demo: &'static str,
    /// The section whose keys imply it.
    section: &'static str,
    /// How the ignored keys are announced.
    because: &'static str,
}

const REAL_BACKENDS: [RealBackend; 2] = [
    RealBackend {
        choice: "sink",
        real: "amqp",
        demo: "stdout",
        section: "amqp",
        because: "sink = \"stdout\"",
    },
    RealBackend {
        choice: "dedup.backend",
        real: "redis",
        demo: "memory",
        section: "redis",
        because: "dedup.backend = \"memory\"",
    },
];

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct ConfigError {
    /// The key at fault, as written in SPEC 7 (`amqp.uri`, `auth.secrets[1]`).
    pub key: String,
    /// What is wrong with its value.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Where events go once they are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// RabbitMQ with publisher confirms.
    Amqp,
    /// One JSON line per event on standard output.
    Stdout,
}

/// The configuration as read from the layers, before validation: the keys of
/// SPEC 7 one for one. No `Debug`: its strings may hold URL passwords; only
/// the typed [`Settings`] are ever printed.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    sink: SinkKind,
    #[serde(default)]
    http: http::RawHttp,
    #[serde(default)]
    admin: http::RawAdmin,
    #[serde(default)]
    auth: auth::RawAuth,
    #[serde(default)]
    webhook: auth::RawWebhook,
    #[serde(default)]
    dedup: dedup::RawDedup,
    #[serde(default)]
    redis: dedup::RawRedis,
    #[serde(default)]
    amqp: amqp::RawAmqp,
    #[serde(default)]
    spool: SpoolSettings,
    #[serde(default)]
    log: spool_log::RawLog,
    #[serde(default)]
    shutdown: spool_log::RawShutdown,
    /// The lifecycle API (SPEC 9); its own module owns these sections.
    #[serde(default)]
    api: crate::api::settings::RawApi,
    #[serde(default)]
    sendtalk: crate::api::settings::RawSendTalk,
}

/// The whole configuration, validated: what the rest of the relay reads.
#[derive(Clone)]
pub struct Settings {
    /// `sink`.
    pub sink: SinkKind,
    /// `[http]`.
    pub http: HttpSettings,
    /// `[admin]`.
    pub admin: AdminSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[webhook]`.
    pub webhook: WebhookSettings,
    /// `[dedup]`, with `[redis]` when the store is Redis.
    pub dedup: DedupSettings,
    /// `[amqp]`.
    pub amqp: AmqpSettings,
    /// `[spool]`.
    pub spool: SpoolSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[shutdown]`.
    pub shutdown: ShutdownSettings,
    /// The lifecycle API (SPEC 9); its own module owns these sections.
    pub api: ApiSettings,
    /// `[sendtalk]`: how the lifecycle API calls SendTalk.
    pub sendtalk: SendTalkSettings,
    /// True when the relay runs on the embedded defaults (no file given).
    pub embedded: bool,
    /// True when `dev-secret` is in use because nothing else was configured.
    pub using_dev_secret: bool,
    /// Keys set beside an explicit demo choice (`sink = "stdout"` with
    /// `amqp.*`, `dedup.backend = "memory"` with `redis.*`): honoured, and
    /// named in a warning at start-up (SPEC 7).
    pub ignored_keys: Vec<IgnoredKeys>,
    /// The effective configuration as `check-config` prints it, rendered
    /// from the layers at load time with every secret already redacted.
    redacted_toml: String,
}

/// Hand-written to leave out the rendered TOML; every section's own `Debug`
/// keeps its secrets out.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("sink", &self.sink)
            .field("http", &self.http)
            .field("admin", &self.admin)
            .field("auth", &self.auth)
            .field("webhook", &self.webhook)
            .field("dedup", &self.dedup)
            .field("amqp", &self.amqp)
            .field("spool", &self.spool)
            .field("log", &self.log)
            .field("shutdown", &self.shutdown)
            .field("api", &self.api)
            .field("sendtalk", &self.sendtalk)
            .field("embedded", &self.embedded)
            .field("using_dev_secret", &self.using_dev_secret)
            .finish_non_exhaustive()
    }
}

/// The longest one webhook can hold its lease, with the time bounds the
/// relay enforces: claim + (with the lifecycle API) the `x-phone-match`
/// look-up + publish and confirm + spool write + commit.
fn worst_case_pipeline(confirm_timeout: Duration, api_enabled: bool) -> Duration {
    let phone_match = if api_enabled {
        crate::dedup::REDIS_OP_MAX
    } else {
        Duration::ZERO
    };
    crate::dedup::REDIS_OP_MAX
        + phone_match
        + confirm_timeout
        + crate::spool::APPEND_MAX
        + crate::dedup::REDIS_OP_MAX
}

impl Settings {
    /// The longest one webhook can hold its lease: claim + (with the
    /// lifecycle API) the `x-phone-match` look-up + publish and confirm +
    /// spool write + commit, with the bounds the relay enforces.
    pub fn worst_case_pipeline(&self) -> Duration {
        worst_case_pipeline(self.amqp.confirm_timeout, self.api.enabled)
    }

    /// Loads the layers: built-in defaults < `file` (if any) < `env`.
    ///
    /// `env` is passed in (usually `std::env::vars()`) so tests never touch the
    /// process environment. Only `SENDTALK_RELAY__*` entries are read.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let (raw, ignored_keys) = read_layers(file, env)?;
        let mut settings = Settings::validate(raw, file.is_none())?;
        settings.ignored_keys = ignored_keys;
        Ok(settings)
    }

    /// The effective configuration as TOML with every secret replaced by
    /// `"<redacted>"` (for `check-config`).
    pub fn redacted_toml(&self) -> &str {
        &self.redacted_toml
    }

    /// Turns the raw layers into typed settings, section by section, in the
    /// order the keys are documented; secrets (which may mean reading files)
    /// come last.
    fn validate(raw: RawSettings, embedded: bool) -> Result<Settings, ConfigError> {
        let redacted_toml = dump::redacted_toml(&raw);
        let http = raw.http.validate()?;
        if http.listen.port() != 0 && http.listen == raw.admin.listen {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from http.listen",
            ));
        }
        raw.auth.check()?;
        let webhook = raw.webhook.validate(raw.dedup.ttl_secs)?;
        let dedup = raw.dedup.validate(raw.redis)?;
        let amqp = raw.amqp.validate()?;
        raw.spool.validate()?;
        let log = raw.log.validate()?;
        let (auth, using_dev_secret) = raw.auth.resolve(embedded)?;
        let admin = raw.admin.validate()?;
        let taken = [http.listen, admin.listen];
        let (api, sendtalk) = crate::api::settings::check(raw.api, raw.sendtalk, &taken)?;
        let worst = worst_case_pipeline(amqp.confirm_timeout, api.enabled);
        if dedup.lease <= worst {
            return Err(ConfigError::new(
                "dedup.lease_secs",
                format!(
                    "{} s does not outlive the worst case of one webhook ({} ms: claim {} ms{} + confirm {} ms + spool write {} ms + commit {} ms); raise it above {} s or lower amqp.confirm_timeout_ms",
                    dedup.lease.as_secs(),
                    worst.as_millis(),
                    crate::dedup::REDIS_OP_MAX.as_millis(),
                    if api.enabled {
                        format!(" + phone match {} ms", crate::dedup::REDIS_OP_MAX.as_millis())
                    } else {
                        String::new()
                    },
                    amqp.confirm_timeout.as_millis(),
                    crate::spool::APPEND_MAX.as_millis(),
                    crate::dedup::REDIS_OP_MAX.as_millis(),
                    worst.as_secs(),
                ),
            ));
        }
        Ok(Settings {
            sink: raw.sink,
            http,
            admin,
            auth,
            webhook,
            dedup,
            amqp,
            spool: raw.spool,
            log,
            shutdown: raw.shutdown.into(),
            api,
            sendtalk,
            embedded,
            using_dev_secret,
            ignored_keys: Vec::new(),
            redacted_toml,
        })
    }
}

/// Reads and merges the layers into the raw sections; unknown keys and values
/// of the wrong shape stop here.
fn read_layers(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(RawSettings, Vec<IgnoredKeys>), ConfigError> {
    let mut builder = config::Config::builder()
        .set_default("sink", DEFAULT_SINK)
        .map_err(|e| ConfigError::new("sink", e.to_string()))?;
    // The keys the operator set (file, then environment), for SPEC 7's
    // rule on real backends.
    let mut set: Vec<(String, String)> = Vec::new();
    match file {
        None => {
            builder = builder.add_source(config::File::from_str(
                EMBEDDED_DEFAULTS,
                config::FileFormat::Toml,
            ));
        }
        Some(path) => {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("file {} does not exist or is not a file", path.display()),
                ));
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
            // A file that does not parse is reported by `config` below.
            if let Ok(table) = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| text.parse::<toml::Table>().map_err(|e| e.to_string()))
            {
                // Strings as written, so that `sink = "stdout"` reads as the
                // environment's SENDTALK_RELAY__SINK=stdout does.
                dump::flatten("", &table, &mut set, |v| {
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                });
            }
        }
    }
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        set.push((key.clone(), value.clone()));
        let result = if LIST_KEYS.contains(&key.as_str()) {
            let items: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            builder.set_override(key.as_str(), items)
        } else {
            builder.set_override(key.as_str(), value)
        };
        builder = result.map_err(|e| ConfigError::new(format!("{name} ({key})"), e.to_string()))?;
    }
    let mut ignored = Vec::new();
    for backend in &REAL_BACKENDS {
        let in_section = |k: &String| {
            k.strip_prefix(backend.section)
                .is_some_and(|rest| rest.starts_with('.'))
        };
        let keys: Vec<String> = set
            .iter()
            .map(|(k, _)| k)
            .filter(|k| in_section(k))
            .cloned()
            .collect();
        if keys.is_empty() {
            continue;
        }
        // The last layer that set the choice wins, as in `config`.
        match set.iter().rev().find(|(k, _)| k == backend.choice) {
            None => {
                builder = builder
                    .set_override(backend.choice, backend.real)
                    .map_err(|e| ConfigError::new(backend.choice, e.to_string()))?;
            }
            Some((_, value)) if value == backend.demo => ignored.push(IgnoredKeys {
                because: backend.because,
                keys,
            }),
            Some(_) => {}
        }
    }
    let layered = builder.build().map_err(|e| from_config_error(&e))?;
    let raw = layered
        .try_deserialize()
        .map_err(|e| from_config_error(&e))?;
    Ok((raw, ignored))
}

/// Turns the `config` crate's error into one naming the key.
fn from_config_error(error: &config::ConfigError) -> ConfigError {
    let text = error.to_string();
    // serde's messages name the field, `config` appends the path ("for key `x.y`").
    let key = text
        .split("for key `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .map(String::from);
    let unknown = text
        .split("unknown field `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .map(String::from);
    match (key, unknown) {
        (Some(section), Some(field)) if !section.ends_with(&field) => ConfigError::new(
            format!("{section}.{field}"),
            format!("unknown key ({text})"),
        ),
        (Some(k), Some(_)) => ConfigError::new(k, format!("unknown key ({text})")),
        (None, Some(field)) => ConfigError::new(field, format!("unknown key ({text})")),
        (Some(k), None) => ConfigError::new(k, text),
        (None, None) => ConfigError::new("<configuration>", text),
    }
}

/// Helpers shared by the sections' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// An environment for [`super::Settings::load`] from literal pairs.
    pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
