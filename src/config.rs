//! Settings: the layered configuration (defaults < TOML file < environment),
//! its validation, and the conversion of configured units into `Duration`s.
//!
//! Every key of SPEC section 7 lives here and nowhere else. Unknown keys and
//! bad values become a [`ConfigError`] naming the key; `main` turns that into
//! exit code 64 before any socket is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

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

// Defaults, each with the reason for its value.
/// SendTalk payloads are ~150 bytes; 64 KiB leaves room for future fields
/// while keeping a flood of large bodies cheap to refuse.
const DEFAULT_MAX_BODY_BYTES: usize = 65_536;
/// Seven days: long enough to cover every provider retry schedule we know.
const DEFAULT_TTL_SECS: u64 = 604_800;
/// Longer than the worst publish (confirm timeout + spool fsync), short
/// enough that a crashed replica's claim frees the id quickly.
const DEFAULT_LEASE_SECS: u64 = 30;
/// The Standard Webhooks recommendation.
const DEFAULT_TOLERANCE_SECS: u64 = 300;
/// RabbitMQ normally confirms in milliseconds; 5 s only trips on a sick broker.
const DEFAULT_CONFIRM_TIMEOUT_MS: u64 = 5_000;
/// 256 MiB holds over a million typical events: hours of a broker outage.
const DEFAULT_SPOOL_MAX_BYTES: u64 = 268_435_456;
/// Below Kubernetes' default 30 s termination grace, so we finish first.
const DEFAULT_GRACE_SECS: u64 = 25;

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
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
    Amqp,
    Stdout,
}

/// The whole configuration, as read from the layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub sink: SinkKind,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub webhook: WebhookSettings,
    #[serde(default)]
    pub dedup: DedupSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub amqp: AmqpSettings,
    #[serde(default)]
    pub spool: SpoolSettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub shutdown: ShutdownSettings,
    /// The lifecycle API (SPEC 9); its own module owns these sections.
    #[serde(default)]
    pub api: crate::api::settings::ApiSettings,
    #[serde(default)]
    pub sendtalk: crate::api::settings::SendTalkSettings,
    /// Secrets resolved from `auth.secrets` and `auth.secret_files`; filled by
    /// [`Settings::load`], never serialised.
    #[serde(skip)]
    pub resolved_secrets: Vec<SecretString>,
    /// True when the relay runs on the embedded defaults (no file given).
    #[serde(skip)]
    pub embedded: bool,
    /// True when `dev-secret` is in use because nothing else was configured.
    #[serde(skip)]
    pub using_dev_secret: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub webhook_path: String,
    pub max_body_bytes: usize,
    /// Webhooks per second per client IP; 0 turns the limit off.
    pub rate_limit_per_sec: u32,
    /// Requests a client may send at once; 0 means one second's worth.
    pub rate_limit_burst: u32,
    /// Proxies (IPs or CIDRs) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// PEM certificate chain and key: set both to serve HTTPS directly.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            webhook_path: "/webhooks/sendtalk/verification".into(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            // Off: SendTalk is the only legitimate sender and its retries
            // must not be refused unless an operator decides otherwise.
            rate_limit_per_sec: 0,
            rate_limit_burst: 0,
            trusted_proxies: Vec::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl HttpSettings {
    /// The rustls server configuration for HTTPS on the webhook listener,
    /// or `None` when no certificate is configured.
    pub fn tls_config(&self) -> Result<Option<rustls::ServerConfig>, ConfigError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        if self.tls_cert_file.is_empty() {
            return Ok(None);
        }
        let (cert_file, key_file) = (&self.tls_cert_file, &self.tls_key_file);
        let certs = CertificateDer::pem_file_iter(cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                ConfigError::new(
                    "http.tls_cert_file",
                    format!("{cert_file} holds no readable PEM certificate chain: {e}"),
                )
            })?;
        if certs.is_empty() {
            return Err(ConfigError::new(
                "http.tls_cert_file",
                format!("{cert_file} holds no certificate"),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
            ConfigError::new(
                "http.tls_key_file",
                format!("{key_file} holds no readable PEM private key: {e}"),
            )
        })?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new("http.tls_cert_file", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                ConfigError::new(
                    "http.tls_key_file",
                    format!("the key does not match the certificate: {e}"),
                )
            })?;
        Ok(Some(config))
    }
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`) or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        // Loopback: metrics and readiness are for the node, not the internet.
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// How the sender proves it holds the secret key (SPEC 2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    StandardWebhooks,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// The header carrying the secret or signature; `None` means the mode's
    /// default ([`AuthMode::default_header`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    pub secrets: Vec<String>,
    pub secret_files: Vec<PathBuf>,
    pub tolerance_secs: u64,
}

impl Default for AuthSettings {
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

impl AuthSettings {
    /// The header name in effect: the configured one, else the mode's default.
    pub fn header(&self) -> &str {
        self.header
            .as_deref()
            .unwrap_or_else(|| self.mode.default_header())
    }

    pub fn tolerance(&self) -> Duration {
        Duration::from_secs(self.tolerance_secs)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    pub accepted_statuses: Vec<String>,
    pub max_event_age_secs: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            accepted_statuses: vec!["verified".into()],
            max_event_age_secs: DEFAULT_TTL_SECS,
        }
    }
}

impl WebhookSettings {
    pub fn max_event_age(&self) -> Duration {
        Duration::from_secs(self.max_event_age_secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupBackend {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    Publish,
    Reject,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupSettings {
    pub backend: DedupBackend,
    pub key_prefix: String,
    pub ttl_secs: u64,
    pub lease_secs: u64,
    pub on_unavailable: OnUnavailable,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            backend: DedupBackend::Redis,
            key_prefix: "sendtalk-relay:verification:".into(),
            ttl_secs: DEFAULT_TTL_SECS,
            lease_secs: DEFAULT_LEASE_SECS,
            on_unavailable: OnUnavailable::Publish,
        }
    }
}

impl DedupSettings {
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }
}

/// How the relay finds its Redis (SPEC 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server at `redis.url`.
    Standalone,
    /// Redis Cluster; `redis.urls` lists seed nodes.
    Cluster,
    /// A master watched by Sentinel; `redis.urls` lists the sentinels.
    Sentinel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    pub mode: RedisMode,
    /// The server in standalone mode.
    pub url: String,
    /// Cluster seed nodes, or the sentinels (cluster and sentinel modes).
    pub urls: Vec<String>,
    /// The master name the sentinels monitor (sentinel mode).
    pub sentinel_service: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".into(),
            urls: Vec::new(),
            sentinel_service: String::new(),
        }
    }
}

impl RedisSettings {
    /// Checks the mode's own keys; only called when the Redis backend is in
    /// use, so a memory-backed relay never needs a Redis URL.
    fn validate(&self) -> Result<(), ConfigError> {
        match self.mode {
            RedisMode::Standalone => {
                if !(self.url.starts_with("redis://")
                    || self.url.starts_with("rediss://")
                    || self.url.starts_with("unix://"))
                {
                    return Err(ConfigError::new(
                        "redis.url",
                        "must start with redis://, rediss:// or unix://",
                    ));
                }
                if redis::Client::open(self.url.as_str()).is_err() {
                    return Err(ConfigError::new("redis.url", "is not a valid Redis URL"));
                }
            }
            RedisMode::Cluster | RedisMode::Sentinel => {
                let what = if self.mode == RedisMode::Cluster {
                    "cluster seed node"
                } else {
                    "sentinel"
                };
                if self.urls.is_empty() {
                    return Err(ConfigError::new(
                        "redis.urls",
                        format!("must list at least one {what} in this redis.mode"),
                    ));
                }
                for url in &self.urls {
                    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                        return Err(ConfigError::new(
                            "redis.urls",
                            "every URL must start with redis:// or rediss://",
                        ));
                    }
                    if redis::Client::open(url.as_str()).is_err() {
                        return Err(ConfigError::new(
                            "redis.urls",
                            format!("`{}` is not a valid Redis URL", redact_url_password(url)),
                        ));
                    }
                }
                if self.mode == RedisMode::Sentinel && self.sentinel_service.trim().is_empty() {
                    return Err(ConfigError::new(
                        "redis.sentinel_service",
                        "must name the master the sentinels monitor in redis.mode = \"sentinel\"",
                    ));
                }
                // The crate's own checks (one TLS mode, one password for all
                // seed nodes), run here so they exit 64 naming the key.
                crate::redis_conn::RedisConnections::check(self)
                    .map_err(|e| ConfigError::new("redis.urls", e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// `amqp.uri` is one string or a list tried in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnroutable {
    Spool,
    Drop,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    pub uri: OneOrMany,
    pub exchange: String,
    pub exchange_type: String,
    pub routing_key: String,
    pub declare: bool,
    pub confirm_timeout_ms: u64,
    pub on_unroutable: OnUnroutable,
    pub quarantine_exchange: String,
    pub queues: Vec<QueueSettings>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            uri: OneOrMany::Many(vec!["amqp://guest:guest@127.0.0.1:5672/%2f".into()]),
            exchange: "sendtalk.verification".into(),
            exchange_type: "topic".into(),
            routing_key: "verification.{status}".into(),
            declare: true,
            confirm_timeout_ms: DEFAULT_CONFIRM_TIMEOUT_MS,
            on_unroutable: OnUnroutable::Spool,
            quarantine_exchange: String::new(),
            queues: Vec::new(),
        }
    }
}

impl AmqpSettings {
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }
    pub fn uris(&self) -> Vec<String> {
        self.uri.to_vec()
    }
}

/// A queue the relay declares and binds for operators who want it to own the
/// topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub name: String,
    #[serde(default = "default_binding_key")]
    pub binding_key: String,
    #[serde(default)]
    pub quorum: bool,
    #[serde(default)]
    pub dead_letter_exchange: String,
}

fn default_binding_key() -> String {
    "verification.#".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    pub enabled: bool,
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: PathBuf::from("./data/spool"),
            max_bytes: DEFAULT_SPOOL_MAX_BYTES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    pub grace_secs: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            grace_secs: DEFAULT_GRACE_SECS,
        }
    }
}

impl ShutdownSettings {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_secs)
    }
}

fn default_sink() -> &'static str {
    "amqp"
}

impl Settings {
    /// The longest one webhook can hold its lease, with the time bounds the
    /// relay enforces: claim + publish and confirm + spool write + commit.
    pub fn worst_case_pipeline(&self) -> Duration {
        crate::dedup::REDIS_OP_MAX
            + self.amqp.confirm_timeout()
            + crate::spool::APPEND_MAX
            + crate::dedup::REDIS_OP_MAX
    }

    /// Loads the layers: built-in defaults < `file` (if any) < `env`.
    ///
    /// `env` is passed in (usually `std::env::vars()`) so tests never touch the
    /// process environment. Only `SENDTALK_RELAY__*` entries are read.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder()
            .set_default("sink", default_sink())
            .map_err(|e| ConfigError::new("sink", e.to_string()))?;
        let embedded = file.is_none();
        if embedded {
            builder = builder.add_source(config::File::from_str(
                EMBEDDED_DEFAULTS,
                config::FileFormat::Toml,
            ));
        }
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("file {} does not exist or is not a file", path.display()),
                ));
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replace("__", ".");
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
            builder =
                result.map_err(|e| ConfigError::new(format!("{name} ({key})"), e.to_string()))?;
        }
        let layered = builder.build().map_err(from_config_error)?;
        let mut settings: Settings = layered.try_deserialize().map_err(from_config_error)?;
        settings.embedded = embedded;
        settings.validate()?;
        settings.resolve_secrets()?;
        let taken = [settings.http.listen, settings.admin.listen];
        crate::api::settings::check(&mut settings.api, &mut settings.sendtalk, &taken)?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.http.webhook_path.starts_with('/') {
            return Err(ConfigError::new("http.webhook_path", "must start with `/`"));
        }
        if self.http.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "http.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if self.http.tls_cert_file.is_empty() != self.http.tls_key_file.is_empty() {
            return Err(ConfigError::new(
                "http.tls_key_file",
                "set both http.tls_cert_file and http.tls_key_file, or neither",
            ));
        }
        for (key, path) in [
            ("http.tls_cert_file", &self.http.tls_cert_file),
            ("http.tls_key_file", &self.http.tls_key_file),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                return Err(ConfigError::new(
                    key,
                    format!("{path} is not a readable file"),
                ));
            }
        }
        // A certificate that does not parse, or a key that does not match
        // it, is a configuration error: exit 64 before any socket is bound.
        self.http.tls_config()?;
        if self.http.listen.port() != 0 && self.http.listen == self.admin.listen {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from http.listen",
            ));
        }
        if actix_web::http::header::HeaderName::from_bytes(self.auth.header().as_bytes()).is_err() {
            return Err(ConfigError::new(
                "auth.header",
                "is not a valid HTTP header name",
            ));
        }
        if self.auth.tolerance_secs == 0 {
            return Err(ConfigError::new(
                "auth.tolerance_secs",
                "must be greater than 0",
            ));
        }
        if self.webhook.accepted_statuses.is_empty() {
            return Err(ConfigError::new(
                "webhook.accepted_statuses",
                "must list at least one status",
            ));
        }
        if let Some(bad) = self
            .webhook
            .accepted_statuses
            .iter()
            .find(|s| !is_routing_word(s))
        {
            return Err(ConfigError::new(
                "webhook.accepted_statuses",
                format!(
                    "`{bad}` is not a usable status (1-64 characters of a-z, A-Z, 0-9, _ or -)"
                ),
            ));
        }
        if self.webhook.max_event_age_secs == 0 {
            return Err(ConfigError::new(
                "webhook.max_event_age_secs",
                "must be greater than 0",
            ));
        }
        if self.webhook.max_event_age_secs > self.dedup.ttl_secs {
            return Err(ConfigError::new(
                "webhook.max_event_age_secs",
                format!(
                    "{} exceeds dedup.ttl_secs ({}): replays older than the dedup window could not be recognised",
                    self.webhook.max_event_age_secs, self.dedup.ttl_secs
                ),
            ));
        }
        if self.dedup.ttl_secs == 0 {
            return Err(ConfigError::new("dedup.ttl_secs", "must be greater than 0"));
        }
        if self.dedup.lease_secs == 0 || self.dedup.lease_secs >= self.dedup.ttl_secs {
            return Err(ConfigError::new(
                "dedup.lease_secs",
                "must be greater than 0 and below dedup.ttl_secs",
            ));
        }
        if self.dedup.backend == DedupBackend::Redis {
            self.redis.validate()?;
        }
        let uris = self.amqp.uris();
        if uris.is_empty() {
            return Err(ConfigError::new(
                "amqp.uri",
                "must name at least one broker",
            ));
        }
        for uri in &uris {
            if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
                return Err(ConfigError::new(
                    "amqp.uri",
                    "every URI must start with amqp:// or amqps://",
                ));
            }
            if uri.parse::<lapin::uri::AMQPUri>().is_err() {
                return Err(ConfigError::new("amqp.uri", "is not a valid AMQP URI"));
            }
        }
        if self.amqp.exchange.is_empty() {
            return Err(ConfigError::new(
                "amqp.exchange",
                "must not be empty (the default exchange cannot be declared)",
            ));
        }
        if !["topic", "direct", "fanout", "headers"].contains(&self.amqp.exchange_type.as_str()) {
            return Err(ConfigError::new(
                "amqp.exchange_type",
                "must be topic, direct, fanout or headers",
            ));
        }
        check_routing_template(&self.amqp.routing_key)?;
        if self.amqp.confirm_timeout_ms == 0 {
            return Err(ConfigError::new(
                "amqp.confirm_timeout_ms",
                "must be greater than 0",
            ));
        }
        let worst = self.worst_case_pipeline();
        if self.dedup.lease() <= worst {
            return Err(ConfigError::new(
                "dedup.lease_secs",
                format!(
                    "{} s does not outlive the worst case of one webhook ({} ms: claim {} ms + confirm {} ms + spool write {} ms + commit {} ms); raise it above {} s or lower amqp.confirm_timeout_ms",
                    self.dedup.lease_secs,
                    worst.as_millis(),
                    crate::dedup::REDIS_OP_MAX.as_millis(),
                    self.amqp.confirm_timeout_ms,
                    crate::spool::APPEND_MAX.as_millis(),
                    crate::dedup::REDIS_OP_MAX.as_millis(),
                    worst.as_secs(),
                ),
            ));
        }
        for (i, q) in self.amqp.queues.iter().enumerate() {
            if q.name.is_empty() {
                return Err(ConfigError::new(
                    format!("amqp.queues[{i}].name"),
                    "must not be empty",
                ));
            }
        }
        if self.spool.enabled && self.spool.max_bytes == 0 {
            return Err(ConfigError::new(
                "spool.max_bytes",
                "must be greater than 0",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::new(
                "log.level",
                "is not a valid level or filter directive",
            ));
        }
        Ok(())
    }

    fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        let mut secrets: Vec<SecretString> = Vec::new();
        for (i, s) in self.auth.secrets.iter().enumerate() {
            if s.is_empty() {
                return Err(ConfigError::new(
                    format!("auth.secrets[{i}]"),
                    "must not be empty",
                ));
            }
            secrets.push(SecretString::from(s.clone()));
        }
        for (i, path) in self.auth.secret_files.iter().enumerate() {
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
            secrets.push(SecretString::from(trimmed.to_string()));
        }
        if secrets.is_empty() {
            if self.embedded {
                secrets.push(SecretString::from(DEV_SECRET.to_string()));
                self.using_dev_secret = true;
            } else {
                return Err(ConfigError::new(
                    "auth.secrets",
                    "no secret configured: set auth.secrets or auth.secret_files",
                ));
            }
        }
        self.resolved_secrets = secrets;
        Ok(())
    }

    /// The effective configuration as TOML with every secret replaced by
    /// `"<redacted>"` (for `check-config`).
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.auth.secrets = copy
            .auth
            .secrets
            .iter()
            .map(|_| REDACTED.to_string())
            .collect();
        copy.redis.url = redact_url_password(&copy.redis.url);
        crate::api::settings::redact(&mut copy.api, &mut copy.sendtalk, REDACTED);
        copy.redis.urls = copy
            .redis
            .urls
            .iter()
            .map(|u| redact_url_password(u))
            .collect();
        copy.auth.header = Some(self.auth.header().to_string());
        copy.amqp.uri = OneOrMany::Many(
            copy.amqp
                .uris()
                .iter()
                .map(|u| redact_url_password(u))
                .collect(),
        );
        toml::to_string_pretty(&copy)
            .unwrap_or_else(|e| format!("# could not render configuration: {e}\n"))
    }
}

const REDACTED: &str = "<redacted>";

/// Replaces the password of `scheme://user:password@host` with `<redacted>`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:{}{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            REDACTED,
            &rest[at..]
        ),
        None => url.to_string(),
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

fn check_routing_template(template: &str) -> Result<(), ConfigError> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(ConfigError::new("amqp.routing_key", "has an unclosed `{`"));
        };
        let name = &rest[open + 1..open + close];
        if name != "status" {
            return Err(ConfigError::new(
                "amqp.routing_key",
                format!("unknown placeholder `{{{name}}}` (only {{status}} is available)"),
            ));
        }
        rest = &rest[open + close + 1..];
    }
    if template.len() > 255 {
        return Err(ConfigError::new(
            "amqp.routing_key",
            "is longer than 255 bytes",
        ));
    }
    Ok(())
}

/// Turns the `config` crate's error into one naming the key.
fn from_config_error(error: config::ConfigError) -> ConfigError {
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

/// Renders the routing key for one status from the configured template.
pub fn render_routing_key(template: &str, status: &str) -> String {
    template.replace("{status}", status)
}

/// Lists every key of the configuration with its default value, for tests
/// that check the documentation stays complete.
pub fn default_keys() -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let defaults = Settings {
        sink: SinkKind::Amqp,
        http: HttpSettings::default(),
        admin: AdminSettings::default(),
        auth: AuthSettings::default(),
        webhook: WebhookSettings::default(),
        dedup: DedupSettings::default(),
        redis: RedisSettings::default(),
        amqp: AmqpSettings::default(),
        spool: SpoolSettings::default(),
        log: LogSettings::default(),
        shutdown: ShutdownSettings::default(),
        api: Default::default(),
        sendtalk: Default::default(),
        resolved_secrets: Vec::new(),
        embedded: false,
        using_dev_secret: false,
    };
    if let Ok(toml::Value::Table(table)) = toml::Value::try_from(&defaults) {
        flatten("", &table, &mut keys);
    }
    keys
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn example() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config.example.toml")
    }

    #[test]
    fn embedded_defaults_use_memory_stdout_loopback_and_the_dev_secret() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s.sink, SinkKind::Stdout);
        assert_eq!(s.dedup.backend, DedupBackend::Memory);
        assert!(s.http.listen.ip().is_loopback());
        assert!(s.using_dev_secret);
    }

    #[test]
    fn example_file_parses_and_documents_every_key() {
        let s = Settings::load(Some(&example()), env(&[])).unwrap();
        assert_eq!(s.sink, SinkKind::Amqp);
        let text = std::fs::read_to_string(example()).unwrap();
        for key in default_keys().keys() {
            let leaf = key.rsplit('.').next().unwrap();
            let documented =
                text.contains(&format!("{leaf} =")) || text.contains(&format!("[[{key}]]"));
            assert!(documented, "config.example.toml does not document `{key}`");
        }
    }

    #[test]
    fn environment_overrides_the_file_and_splits_lists() {
        let s = Settings::load(
            Some(&example()),
            env(&[
                ("SENDTALK_RELAY__AMQP__URI", "amqp://a:1/%2f,amqp://b:2/%2f"),
                ("SENDTALK_RELAY__AUTH__SECRETS", "one,two"),
                ("SENDTALK_RELAY__HTTP__MAX_BODY_BYTES", "1234"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.amqp.uris(), vec!["amqp://a:1/%2f", "amqp://b:2/%2f"]);
        assert_eq!(s.resolved_secrets.len(), 2);
        assert_eq!(s.http.max_body_bytes, 1234);
    }

    #[test]
    fn unknown_environment_key_is_rejected_naming_it() {
        let err = Settings::load(None, env(&[("SENDTALK_RELAY__HTTP__BOGUS", "1")])).unwrap_err();
        assert_eq!(err.key, "http.bogus", "{err}");
        let err = Settings::load(None, env(&[("SENDTALK_RELAY__NOPE", "1")])).unwrap_err();
        assert_eq!(err.key, "nope", "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("SENDTALK_RELAY__AUTH__MODE", "rot13", "auth.mode"),
            ("SENDTALK_RELAY__HTTP__LISTEN", "nowhere", "http.listen"),
            (
                "SENDTALK_RELAY__WEBHOOK__MAX_EVENT_AGE_SECS",
                "999999999",
                "webhook.max_event_age_secs",
            ),
            ("SENDTALK_RELAY__AMQP__URI", "http://x", "amqp.uri"),
            (
                "SENDTALK_RELAY__AMQP__ROUTING_KEY",
                "v.{nope}",
                "amqp.routing_key",
            ),
            ("SENDTALK_RELAY__DEDUP__TTL_SECS", "ten", "dedup.ttl_secs"),
        ];
        for (var, value, key) in cases {
            let err = Settings::load(None, env(&[(var, value)])).unwrap_err();
            assert_eq!(err.key, key, "{var}={value}: {err}");
        }
    }

    #[test]
    fn trusted_proxies_take_addresses_and_cidrs() {
        let s = Settings::load(
            None,
            env(&[(
                "SENDTALK_RELAY__HTTP__TRUSTED_PROXIES",
                "10.0.0.0/8, 192.0.2.7,fd00::/8",
            )]),
        )
        .unwrap();
        let nets = &s.http.trusted_proxies;
        assert!(nets[0].contains("10.200.1.1".parse().unwrap()));
        assert!(!nets[0].contains("11.0.0.1".parse().unwrap()));
        assert!(
            nets[1].contains("192.0.2.7".parse().unwrap())
                && !nets[1].contains("192.0.2.8".parse().unwrap())
        );
        assert!(nets[2].contains("fd12::1".parse().unwrap()));
        let err = Settings::load(
            None,
            env(&[("SENDTALK_RELAY__HTTP__TRUSTED_PROXIES", "10.0.0.0/40")]),
        )
        .unwrap_err();
        assert!(err.key.starts_with("http.trusted_proxies"), "{err}");
        let err = Settings::load(
            None,
            env(&[("SENDTALK_RELAY__HTTP__TLS_CERT_FILE", "/nonexistent.pem")]),
        )
        .unwrap_err();
        assert_eq!(err.key, "http.tls_key_file", "both or neither");
    }

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
        use secrecy::ExposeSecret;
        assert_eq!(s.resolved_secrets[0].expose_secret(), "from-file");
        assert!(!s.using_dev_secret);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn redacted_output_hides_every_secret() {
        let s = Settings::load(
            None,
            env(&[
                ("SENDTALK_RELAY__AUTH__SECRETS", "topsecret1"),
                (
                    "SENDTALK_RELAY__AMQP__URI",
                    "amqp://user:brokerpw@h:5672/%2f",
                ),
                ("SENDTALK_RELAY__REDIS__URL", "redis://:redispw@h:6379"),
                (
                    "SENDTALK_RELAY__REDIS__URLS",
                    "redis://:seedpw1@a:7000,rediss://u:seedpw2@b:7001",
                ),
            ]),
        )
        .unwrap();
        let out = s.redacted_toml();
        for secret in ["topsecret1", "brokerpw", "redispw", "seedpw1", "seedpw2"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.contains("<redacted>"));
        let _: toml::Value = toml::from_str(&out).unwrap();
    }

    #[test]
    fn redis_modes_are_validated_naming_the_key() {
        let redis = ("SENDTALK_RELAY__DEDUP__BACKEND", "redis");
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[("SENDTALK_RELAY__REDIS__MODE", "ring")], "redis.mode"),
            (
                &[redis, ("SENDTALK_RELAY__REDIS__MODE", "cluster")],
                "redis.urls",
            ),
            (
                &[redis, ("SENDTALK_RELAY__REDIS__MODE", "sentinel")],
                "redis.urls",
            ),
            (
                &[
                    redis,
                    ("SENDTALK_RELAY__REDIS__MODE", "sentinel"),
                    ("SENDTALK_RELAY__REDIS__URLS", "redis://s1:26379"),
                ],
                "redis.sentinel_service",
            ),
            (
                &[
                    redis,
                    ("SENDTALK_RELAY__REDIS__MODE", "cluster"),
                    (
                        "SENDTALK_RELAY__REDIS__URLS",
                        "redis://a:7000,http://b:7001",
                    ),
                ],
                "redis.urls",
            ),
            (
                &[
                    redis,
                    ("SENDTALK_RELAY__REDIS__MODE", "cluster"),
                    (
                        "SENDTALK_RELAY__REDIS__URLS",
                        "redis://a:7000,rediss://b:7001",
                    ),
                ],
                "redis.urls",
            ),
        ];
        for (pairs, key) in cases {
            let err = Settings::load(None, env(pairs)).unwrap_err();
            assert_eq!(err.key, key, "{pairs:?}: {err}");
        }
        let s = Settings::load(
            None,
            env(&[
                redis,
                ("SENDTALK_RELAY__REDIS__MODE", "sentinel"),
                (
                    "SENDTALK_RELAY__REDIS__URLS",
                    "redis://s1:26379, redis://s2:26379",
                ),
                ("SENDTALK_RELAY__REDIS__SENTINEL_SERVICE", "relay"),
            ]),
        )
        .unwrap();
        assert_eq!(s.redis.mode, RedisMode::Sentinel);
        assert_eq!(s.redis.urls.len(), 2);
        // The memory backend needs no Redis, whatever the mode says.
        Settings::load(None, env(&[("SENDTALK_RELAY__REDIS__MODE", "cluster")])).unwrap();
    }
}
