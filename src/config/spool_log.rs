//! `[spool]`, `[log]` and `[shutdown]`: the local side of the process, its
//! on-disk buffer (SPEC 5), its log output and its drain period. The log
//! filter is parsed here, once, into tracing directives.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::telemetry::{LogFilter, LogFormat, LogSettings};

/// 256 MiB holds over a million typical events: hours of a broker outage.
const DEFAULT_SPOOL_MAX_BYTES: u64 = 268_435_456;
/// Below Kubernetes' default 30 s termination grace, so we finish first.
const DEFAULT_GRACE_SECS: u64 = 25;

/// `[spool]`. Nothing in it needs parsing beyond serde's, so the raw and the
/// typed form are one struct.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// `spool.enabled`; only used with the `amqp` sink.
    pub enabled: bool,
    /// `spool.dir`.
    pub dir: PathBuf,
    /// Greater than zero when the spool is enabled.
    pub max_bytes: u64,
    /// `spool.max_attempts`: refusals before an entry is dead; 0 = no limit.
    pub max_attempts: u32,
    /// `spool.max_age_secs`: age at which an entry is dead; 0 = no limit.
    pub max_age_secs: u64,
}

/// Twenty refusals with the drainer's backoff (1 s doubling to 60 s) is
/// about a quarter of an hour of a queue refusing: long enough to ride out
/// a binding being redeployed, short enough that a nacking queue beside a
/// healthy one does not receive a copy a minute for ever.
const DEFAULT_MAX_ATTEMPTS: u32 = 20;
/// The dedup window's default: an event older than that could no longer be
/// recognised as a duplicate anyway.
const DEFAULT_MAX_AGE_SECS: u64 = 604_800;

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: PathBuf::from("./data/spool"),
            max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_age_secs: DEFAULT_MAX_AGE_SECS,
        }
    }
}

impl SpoolSettings {
    /// What the spool itself is told.
    pub fn limits(&self) -> crate::spool::Limits {
        crate::spool::Limits {
            max_bytes: self.max_bytes,
            max_attempts: self.max_attempts,
            max_age: (self.max_age_secs > 0).then(|| Duration::from_secs(self.max_age_secs)),
        }
    }
}

impl SpoolSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && self.max_bytes == 0 {
            return Err(ConfigError::new(
                "spool.max_bytes",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// `[log]` as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    format: LogFormat,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

impl RawLog {
    pub(super) fn validate(self) -> Result<LogSettings, ConfigError> {
        let filter = LogFilter::parse(&self.level).map_err(|_| {
            ConfigError::new("log.level", "is not a valid level or filter directive")
        })?;
        Ok(LogSettings {
            format: self.format,
            filter,
        })
    }
}

/// `[shutdown]` as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShutdown {
    grace_secs: u64,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self {
            grace_secs: DEFAULT_GRACE_SECS,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    /// How long in-flight webhooks get to finish once a stop is asked for.
    pub grace: Duration,
}

impl From<RawShutdown> for ShutdownSettings {
    fn from(raw: RawShutdown) -> Self {
        Self {
            grace: Duration::from_secs(raw.grace_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::env;
    use super::super::Settings;
    use super::*;

    #[test]
    fn the_log_level_is_parsed_once_into_directives() {
        let s = Settings::load(
            None,
            env(&[("SENDTALK_RELAY__LOG__LEVEL", "info,lapin=warn")]),
        )
        .unwrap();
        assert_eq!(s.log.filter.to_string(), "info,lapin=warn");
        assert_eq!(s.log.filter.to_env_filter().to_string(), "lapin=warn,info");
        let err =
            Settings::load(None, env(&[("SENDTALK_RELAY__LOG__LEVEL", "info,=[")])).unwrap_err();
        assert_eq!(err.key, "log.level");
    }

    #[test]
    fn spool_and_grace_keep_their_units() {
        let s = Settings::load(None, env(&[("SENDTALK_RELAY__SHUTDOWN__GRACE_SECS", "7")]));
        assert_eq!(s.unwrap().shutdown.grace, Duration::from_secs(7));
        let err = Settings::load(None, env(&[("SENDTALK_RELAY__SPOOL__MAX_BYTES", "0")]));
        assert_eq!(err.unwrap_err().key, "spool.max_bytes");
    }
}
