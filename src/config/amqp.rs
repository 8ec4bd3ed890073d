//! `[amqp]` and `[[amqp.queues]]`: where accepted events are published and
//! the topology the relay may declare (SPEC 4). Validation turns the strings
//! into [`BrokerUri`]s, an [`ExchangeType`], [`ExchangeName`]s and a
//! [`RoutingKey`], so a bad value is a configuration error, never a silent
//! fallback or a made-up connection error later.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BrokerUri, ConfigError, ExchangeName, RoutingKey};
pub use crate::publish::settings::{AmqpSettings, OnUnroutable, QueueSettings};

/// RabbitMQ normally confirms in milliseconds; 5 s only trips on a sick broker.
const DEFAULT_CONFIRM_TIMEOUT_MS: u64 = 5_000;

/// `amqp.uri` is one string or a list tried in order.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `[amqp]` as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAmqp {
    pub(super) uri: OneOrMany,
    exchange: String,
    exchange_type: String,
    routing_key: String,
    declare: bool,
    confirm_timeout_ms: u64,
    on_unroutable: OnUnroutable,
    quarantine_exchange: String,
    queues: Vec<RawQueue>,
}

impl Default for RawAmqp {
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

/// One `[[amqp.queues]]` entry as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: String,
    #[serde(default = "default_binding_key")]
    binding_key: String,
    #[serde(default)]
    quorum: bool,
    #[serde(default)]
    dead_letter_exchange: String,
}

fn default_binding_key() -> String {
    "verification.#".into()
}

impl RawAmqp {
    pub(super) fn validate(self) -> Result<AmqpSettings, ConfigError> {
        let uris = self.uri.to_vec();
        if uris.is_empty() {
            return Err(ConfigError::new(
                "amqp.uri",
                "must name at least one broker",
            ));
        }
        let uris = uris
            .iter()
            .map(|uri| BrokerUri::parse(uri).map_err(|e| ConfigError::new("amqp.uri", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let exchange = ExchangeName::parse(&self.exchange).map_err(|_| {
            ConfigError::new(
                "amqp.exchange",
                "must not be empty (the default exchange cannot be declared)",
            )
        })?;
        let exchange_type = self
            .exchange_type
            .parse()
            .map_err(|e| ConfigError::new("amqp.exchange_type", e))?;
        let routing_key = RoutingKey::parse(&self.routing_key)
            .map_err(|e| ConfigError::new("amqp.routing_key", e))?;
        if self.confirm_timeout_ms == 0 {
            return Err(ConfigError::new(
                "amqp.confirm_timeout_ms",
                "must be greater than 0",
            ));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.into_iter().enumerate() {
            if q.name.is_empty() {
                return Err(ConfigError::new(
                    format!("amqp.queues[{i}].name"),
                    "must not be empty",
                ));
            }
            queues.push(QueueSettings {
                dead_letter_exchange: ExchangeName::optional(&q.dead_letter_exchange),
                name: q.name,
                binding_key: q.binding_key,
                quorum: q.quorum,
            });
        }
        Ok(AmqpSettings {
            uris,
            exchange,
            exchange_type,
            routing_key,
            declare: self.declare,
            confirm_timeout: Duration::from_millis(self.confirm_timeout_ms),
            on_unroutable: self.on_unroutable,
            quarantine_exchange: ExchangeName::optional(&self.quarantine_exchange),
            queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::env;
    use super::super::Settings;
    use super::*;
    use crate::publish::broker::ExchangeType;

    #[test]
    fn defaults_become_typed_values() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s.amqp.exchange.as_str(), "sendtalk.verification");
        assert_eq!(s.amqp.exchange_type, ExchangeType::Topic);
        assert_eq!(
            s.amqp.routing_key.render("verified"),
            "verification.verified"
        );
        assert_eq!(s.amqp.quarantine_exchange, None);
        assert_eq!(s.amqp.confirm_timeout, Duration::from_secs(5));
        assert_eq!(s.amqp.uris[0].amqp_uri().authority.port, 5672);
    }

    #[test]
    fn an_unknown_exchange_type_is_refused_not_taken_for_topic() {
        let err = Settings::load(
            None,
            env(&[("SENDTALK_RELAY__AMQP__EXCHANGE_TYPE", "fan-out")]),
        )
        .unwrap_err();
        assert_eq!(err.key, "amqp.exchange_type", "{err}");
        let s = Settings::load(
            None,
            env(&[("SENDTALK_RELAY__AMQP__EXCHANGE_TYPE", "headers")]),
        )
        .unwrap();
        assert_eq!(s.amqp.exchange_type, ExchangeType::Headers);
    }

    #[test]
    fn an_unparsable_uri_stops_loading_naming_amqp_uri() {
        for bad in ["amqp://h:port/", "amqp://a/%2f,amqp://h:99999/"] {
            let err = Settings::load(None, env(&[("SENDTALK_RELAY__AMQP__URI", bad)])).unwrap_err();
            assert_eq!(err.key, "amqp.uri", "{bad}: {err}");
        }
    }

    #[test]
    fn a_quarantine_exchange_is_optional() {
        let s = Settings::load(
            None,
            env(&[("SENDTALK_RELAY__AMQP__QUARANTINE_EXCHANGE", "rejects")]),
        )
        .unwrap();
        let name = s
            .amqp
            .quarantine_exchange
            .as_ref()
            .map(ExchangeName::as_str);
        assert_eq!(name, Some("rejects"));
    }
}
