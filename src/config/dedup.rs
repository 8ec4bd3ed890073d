//! `[dedup]` and `[redis]`: where verification ids are remembered and for
//! how long (SPEC 3), and how the relay finds its Redis (SPEC 11). Redis is
//! only checked, and only present in the typed settings, when the dedup
//! store is Redis: a memory-backed relay never needs a Redis URL.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::dedup::OnUnavailable;
pub use crate::redis_conn::{RedisMode, RedisSettings, RedisUrl};

use super::{redact_url_password, ConfigError};

/// Seven days: long enough to cover every provider retry schedule we know.
pub(super) const DEFAULT_TTL_SECS: u64 = 604_800;
/// Longer than the worst publish (confirm timeout + spool fsync), short
/// enough that a crashed replica's claim frees the id quickly.
const DEFAULT_LEASE_SECS: u64 = 30;

/// Which store remembers verification ids (`dedup.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupBackend {
    /// Redis, shared by every replica.
    Redis,
    /// This process only.
    Memory,
}

/// `[dedup]` as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDedup {
    backend: DedupBackend,
    key_prefix: String,
    pub(super) ttl_secs: u64,
    lease_secs: u64,
    on_unavailable: OnUnavailable,
}

impl Default for RawDedup {
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

/// `[dedup]`, validated, with the Redis it uses.
#[derive(Debug, Clone)]
pub struct DedupSettings {
    /// The store, and for Redis how to reach it.
    pub store: DedupStore,
    /// `dedup.key_prefix`, before every Redis key.
    pub key_prefix: String,
    /// How long a committed id is remembered; greater than zero.
    pub ttl: Duration,
    /// How long a claim holds an id; below `ttl` and above the worst case
    /// of one webhook.
    pub lease: Duration,
    /// `dedup.on_unavailable`.
    pub on_unavailable: OnUnavailable,
}

/// The dedup store and what it needs.
#[derive(Debug, Clone)]
pub enum DedupStore {
    /// In this process only (the embedded defaults, tests).
    Memory,
    /// Redis, found as `[redis]` says.
    Redis(RedisSettings),
}

impl DedupSettings {
    /// `dedup.backend`.
    pub fn backend(&self) -> DedupBackend {
        match self.store {
            DedupStore::Memory => DedupBackend::Memory,
            DedupStore::Redis(_) => DedupBackend::Redis,
        }
    }
}

impl RawDedup {
    /// Checks the durations, then `[redis]` if the store is Redis.
    pub(super) fn validate(self, redis: RawRedis) -> Result<DedupSettings, ConfigError> {
        if self.ttl_secs == 0 {
            return Err(ConfigError::new("dedup.ttl_secs", "must be greater than 0"));
        }
        if self.lease_secs == 0 || self.lease_secs >= self.ttl_secs {
            return Err(ConfigError::new(
                "dedup.lease_secs",
                "must be greater than 0 and below dedup.ttl_secs",
            ));
        }
        let store = match self.backend {
            DedupBackend::Memory => DedupStore::Memory,
            DedupBackend::Redis => DedupStore::Redis(redis.validate()?),
        };
        Ok(DedupSettings {
            store,
            key_prefix: self.key_prefix,
            ttl: Duration::from_secs(self.ttl_secs),
            lease: Duration::from_secs(self.lease_secs),
            on_unavailable: self.on_unavailable,
        })
    }
}

/// `[redis]` as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    mode: RedisMode,
    /// The server in standalone mode.
    pub(super) url: String,
    /// Cluster seed nodes, or the sentinels (cluster and sentinel modes).
    pub(super) urls: Vec<String>,
    /// The master name the sentinels monitor (sentinel mode).
    sentinel_service: String,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".into(),
            urls: Vec::new(),
            sentinel_service: String::new(),
        }
    }
}

impl RawRedis {
    /// Checks the mode's own keys.
    fn validate(self) -> Result<RedisSettings, ConfigError> {
        let what = match self.mode {
            RedisMode::Standalone => {
                return RedisSettings::standalone(&self.url)
                    .map_err(|e| ConfigError::new("redis.url", e));
            }
            RedisMode::Cluster => "cluster seed node",
            RedisMode::Sentinel => "sentinel",
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
        let urls = self.urls.iter().map(|u| RedisUrl::new(u)).collect();
        let settings = if self.mode == RedisMode::Cluster {
            RedisSettings::Cluster(urls)
        } else {
            if self.sentinel_service.trim().is_empty() {
                return Err(ConfigError::new(
                    "redis.sentinel_service",
                    "must name the master the sentinels monitor in redis.mode = \"sentinel\"",
                ));
            }
            RedisSettings::Sentinel {
                sentinels: urls,
                service: self.sentinel_service,
            }
        };
        // The crate's own checks (one TLS mode, one password for all seed
        // nodes), run here so they exit 64 naming the key.
        crate::redis_conn::RedisConnections::check(&settings)
            .map_err(|e| ConfigError::new("redis.urls", e.to_string()))?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::env;
    use super::super::Settings;
    use super::*;

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
        let DedupStore::Redis(redis_settings) = &s.dedup.store else {
            panic!("dedup.backend = redis holds the Redis settings");
        };
        assert_eq!(redis_settings.mode(), RedisMode::Sentinel);
        let RedisSettings::Sentinel { sentinels, .. } = redis_settings else {
            panic!("sentinel mode keeps the sentinels");
        };
        assert_eq!(sentinels.len(), 2);
        // An explicit memory backend needs no Redis, whatever the mode says
        // (SPEC 7: a redis.* key alone would choose the redis backend).
        let s = Settings::load(
            None,
            env(&[
                ("SENDTALK_RELAY__DEDUP__BACKEND", "memory"),
                ("SENDTALK_RELAY__REDIS__MODE", "cluster"),
            ]),
        )
        .unwrap();
        assert_eq!(s.ignored_keys.len(), 1);
        let err =
            Settings::load(None, env(&[("SENDTALK_RELAY__REDIS__MODE", "cluster")])).unwrap_err();
        assert_eq!(err.key, "redis.urls");
    }

    #[test]
    fn a_redis_url_shows_no_password() {
        let url = RedisUrl::new("redis://user:hunter2@h:6379/0");
        assert_eq!(url.to_string(), "redis://user:<redacted>@h:6379/0");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(url.expose(), "redis://user:hunter2@h:6379/0");
    }
}
