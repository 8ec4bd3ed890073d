//! The publisher's settings (`[amqp]`, `[[amqp.queues]]`), built and
//! validated by `config`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::broker::{BrokerUri, ExchangeName, ExchangeType, RoutingKey};

/// What happens to an event no queue is bound for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnroutable {
    /// Spool it and retry, as for an unavailable broker.
    Spool,
    /// Acknowledge and drop it, with a warning.
    Drop,
}

/// `[amqp]`, validated: what the publisher and the stdout sink use.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// The brokers, tried in order; at least one.
    pub uris: Vec<BrokerUri>,
    /// `amqp.exchange`, where events are published.
    pub exchange: ExchangeName,
    /// `amqp.exchange_type`, declared with the exchange.
    pub exchange_type: ExchangeType,
    /// `amqp.routing_key`, rendered per event status.
    pub routing_key: RoutingKey,
    /// Whether the relay declares the exchanges and queues on connecting.
    pub declare: bool,
    /// How long a publish waits for the broker's confirm; greater than zero.
    pub confirm_timeout: Duration,
    /// `amqp.on_unroutable`.
    pub on_unroutable: OnUnroutable,
    /// Where bodies that fail validation go; `None` drops them.
    pub quarantine_exchange: Option<ExchangeName>,
    /// `[[amqp.queues]]`, declared and bound when `declare` is set.
    pub queues: Vec<QueueSettings>,
}

/// A queue the relay declares and binds for operators who want it to own the
/// topology.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Never empty.
    pub name: String,
    /// Bound to `amqp.exchange` with this key.
    pub binding_key: String,
    /// Declared as a quorum queue.
    pub quorum: bool,
    /// `x-dead-letter-exchange`, if any.
    pub dead_letter_exchange: Option<ExchangeName>,
}
