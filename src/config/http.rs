//! `[http]` and `[admin]`: the listeners, the webhook path and body limit,
//! the optional rate limit, the trusted proxies ([`IpNet`]) and HTTPS, whose
//! PEM files are loaded here, at configuration time, so a bad certificate
//! exits 64 before any socket is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::ratelimit::IpNet;

/// SendTalk payloads are ~150 bytes; 64 KiB leaves room for future fields
/// while keeping a flood of large bodies cheap to refuse.
const DEFAULT_MAX_BODY_BYTES: usize = 65_536;

/// `[http]` as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHttp {
    listen: SocketAddr,
    webhook_path: String,
    max_body_bytes: usize,
    rate_limit_per_sec: u32,
    rate_limit_burst: u32,
    trusted_proxies: Vec<IpNet>,
    tls_cert_file: String,
    tls_key_file: String,
}

impl Default for RawHttp {
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

/// `[http]`: the public webhook listener.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `http.listen`.
    pub listen: SocketAddr,
    /// Starts with `/`.
    pub webhook_path: String,
    /// Greater than 0.
    pub max_body_bytes: usize,
    /// Webhooks per second per client IP; 0 turns the limit off.
    pub rate_limit_per_sec: u32,
    /// Requests a client may send at once; 0 means one second's worth.
    pub rate_limit_burst: u32,
    /// Proxies (IPs or CIDRs) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// HTTPS on the webhook listener, already loaded; `None` serves plain
    /// HTTP (neither `http.tls_cert_file` nor `http.tls_key_file` set).
    pub tls: Option<ServerTls>,
}

impl RawHttp {
    pub(super) fn validate(self) -> Result<HttpSettings, ConfigError> {
        if !self.webhook_path.starts_with('/') {
            return Err(ConfigError::new("http.webhook_path", "must start with `/`"));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "http.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return Err(ConfigError::new(
                "http.tls_key_file",
                "set both http.tls_cert_file and http.tls_key_file, or neither",
            ));
        }
        for (key, path) in [
            ("http.tls_cert_file", &self.tls_cert_file),
            ("http.tls_key_file", &self.tls_key_file),
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
        let tls = if self.tls_cert_file.is_empty() {
            None
        } else {
            Some(ServerTls::load(&self.tls_cert_file, &self.tls_key_file)?)
        };
        Ok(HttpSettings {
            listen: self.listen,
            webhook_path: self.webhook_path,
            max_body_bytes: self.max_body_bytes,
            rate_limit_per_sec: self.rate_limit_per_sec,
            rate_limit_burst: self.rate_limit_burst,
            trusted_proxies: self.trusted_proxies,
            tls,
        })
    }
}

/// The webhook listener's HTTPS: the rustls configuration built from
/// `http.tls_cert_file` and `http.tls_key_file` when the settings load.
#[derive(Clone)]
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// Holds the private key; never printed.
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// Reads the PEM certificate chain and private key and checks they match.
    fn load(cert_file: &str, key_file: &str) -> Result<Self, ConfigError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert_file)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
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
        Ok(Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            config: Arc::new(config),
        })
    }

    /// The rustls server configuration for the webhook listener.
    pub fn server_config(&self) -> rustls::ServerConfig {
        (*self.config).clone()
    }
}

/// Hand-written: the loaded configuration holds the private key.
impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// `[admin]` as written; `tokens` are secret from the moment they are read.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: SocketAddr,
    #[serde(serialize_with = "super::redacted_secrets")]
    tokens: Vec<SecretString>,
    token_files: Vec<PathBuf>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        // Loopback: metrics and readiness are for the node, not the internet.
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            tokens: Vec::new(),
            token_files: Vec::new(),
        }
    }
}

impl RawAdmin {
    pub(super) fn validate(self) -> Result<AdminSettings, ConfigError> {
        let tokens = super::secrets::resolve(
            "admin.tokens",
            self.tokens,
            "admin.token_files",
            &self.token_files,
        )?;
        Ok(AdminSettings {
            listen: self.listen,
            tokens,
        })
    }
}

/// `[admin]`: the metrics and probes listener, and the tokens of the spool
/// operations (SPEC 5.1).
#[derive(Clone)]
pub struct AdminSettings {
    /// `admin.listen`.
    pub listen: SocketAddr,
    /// `admin.tokens` then `admin.token_files`; none: no spool operations.
    pub tokens: Vec<SecretString>,
}

/// Hand-written: the tokens never reach a log through `{:?}`.
impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("listen", &self.listen)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::env;
    use super::super::Settings;

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
    fn no_tls_files_means_plain_http() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert!(s.http.tls.is_none());
    }
}
