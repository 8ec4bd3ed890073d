//! What the configuration looks like from outside: the effective settings as
//! `check-config` prints them (TOML, every secret `"<redacted>"`), and every
//! key with its default, which the documentation tests hold to.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Serializer;

use super::amqp::{OneOrMany, RawAmqp};
use super::auth::{RawAuth, RawWebhook};
use super::dedup::{RawDedup, RawRedis};
use super::http::RawAdmin;
use super::http::RawHttp;
use super::spool_log::{RawLog, RawShutdown};
use super::{RawSettings, SinkKind, SpoolSettings};
use crate::api::settings::{RawApi, RawSendTalk};

/// What a secret is printed as.
const REDACTED: &str = "<redacted>";

pub use crate::telemetry::redact_url_password;

/// Serialises a list of secrets as as many `"<redacted>"`: the raw settings
/// can be printed, their secrets never.
pub(crate) fn redacted_secrets<S: Serializer>(
    secrets: &[SecretString],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(secrets.iter().map(|_| REDACTED))
}

/// Serialises an optional secret (empty means unset) as `""` or
/// `"<redacted>"`.
pub(crate) fn redacted_secret<S: Serializer>(
    secret: &SecretString,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(if secret.expose_secret().is_empty() {
        ""
    } else {
        REDACTED
    })
}

/// The effective configuration as TOML for `check-config`: secrets are
/// redacted by their serialisers, URL passwords here, and `auth.header`
/// shows the header in effect.
pub(super) fn redacted_toml(raw: &RawSettings) -> String {
    let mut copy = raw.clone();
    copy.auth.header = Some(raw.auth.effective_header().to_string());
    copy.redis.url = redact_url_password(&copy.redis.url);
    copy.redis.urls = copy
        .redis
        .urls
        .iter()
        .map(|u| redact_url_password(u))
        .collect();
    copy.amqp.uri = OneOrMany::Many(
        copy.amqp
            .uri
            .to_vec()
            .iter()
            .map(|u| redact_url_password(u))
            .collect(),
    );
    toml::to_string_pretty(&copy)
        .unwrap_or_else(|e| format!("# could not render configuration: {e}\n"))
}

/// Lists every key of the configuration with its default value, for tests
/// that check the documentation stays complete.
pub fn default_keys() -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let defaults = RawSettings {
        sink: SinkKind::Amqp,
        http: RawHttp::default(),
        admin: RawAdmin::default(),
        auth: RawAuth::default(),
        webhook: RawWebhook::default(),
        dedup: RawDedup::default(),
        redis: RawRedis::default(),
        amqp: RawAmqp::default(),
        spool: SpoolSettings::default(),
        log: RawLog::default(),
        shutdown: RawShutdown::default(),
        api: RawApi::default(),
        sendtalk: RawSendTalk::default(),
    };
    if let Ok(toml::Value::Table(table)) = toml::Value::try_from(&defaults) {
        flatten("", &table, &mut keys, toml::Value::to_string);
    }
    keys
}

/// Every dotted key `table` sets (arrays of tables count as their key),
/// each with its value rendered by `leaf`.
pub(super) fn flatten(
    prefix: &str,
    table: &toml::Table,
    out: &mut impl Extend<(String, String)>,
    leaf: fn(&toml::Value) -> String,
) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out, leaf),
            other => out.extend([(key, leaf(other))]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::env;
    use super::super::Settings;
    use super::*;

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
        let _: toml::Value = toml::from_str(out).unwrap();
    }

    #[test]
    fn url_passwords_are_redacted_and_the_rest_kept() {
        assert_eq!(
            redact_url_password("amqp://u:p@h:5672/%2f"),
            "amqp://u:<redacted>@h:5672/%2f"
        );
        assert_eq!(redact_url_password("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url_password("redis://u@h"), "redis://u@h");
    }

    #[test]
    fn defaults_list_keys_with_their_values() {
        let keys = default_keys();
        assert_eq!(keys["sink"], "\"amqp\"");
        assert_eq!(keys["auth.secrets"], "[]");
        assert_eq!(keys["sendtalk.api_key"], "\"\"");
        assert_eq!(keys["amqp.quarantine_exchange"], "\"\"");
        assert!(!keys.contains_key("auth.header"), "no default header key");
    }
}
