//! Publishing accepted events: to RabbitMQ with publisher confirms (SPEC 4),
//! or to standard output for the embedded demo sink.
//!
//! - [`amqp`]: the publisher and its connection supervisor.
//! - `link`: one connection, its lanes, the blocked state and late confirms.
//! - `lane`: one confirmed channel and the sequencer that matches returns and
//!   confirms to their publishes (`x-publish-id`).
//! - `properties`: the AMQP properties and headers of the message contract.
//! - `topology`: exchanges and queues declared on every connection.
//! - [`stdout`]: the demo sink.
//!
//! A publish that is not acked in time, nacked, returned or refused because
//! the broker blocks publishing is an error the caller answers by spooling.

pub mod amqp;
pub mod broker;
mod lane;
mod link;
mod properties;
pub mod settings;
pub mod stdout;
mod topology;

use std::time::Duration;

use bytes::Bytes;
use lapin::types::AMQPValue;

pub use amqp::{AmqpPublisher, PublisherMetrics};
pub use link::LateConfirm;
pub use stdout::StdoutSink;

use crate::message::Envelope;

/// How a publish the broker confirmed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Acked and routed to at least one queue.
    Routed,
    /// Returned as unroutable and let go (`amqp.on_unroutable = "drop"`):
    /// no queue has it, and nothing will publish it again (SPEC 4).
    Dropped,
}

/// Why a publish did not end with a routed, confirmed message.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection to the broker; nothing was sent.
    #[error("no broker connection")]
    NotConnected,
    /// The broker blocks publishing (resource alarm); nothing was sent.
    #[error("the broker blocks publishing (resource alarm)")]
    Blocked,
    /// The broker nacked the message.
    #[error("the broker nacked the message")]
    Nack,
    /// The broker returned the message as unroutable.
    #[error("the broker returned the message as unroutable")]
    Unroutable,
    /// No channel became free in time; nothing was sent.
    #[error("no channel free within {0:?}")]
    Timeout(Duration),
    /// Sent, but not confirmed in time (or the broker blocked the connection
    /// while it was in flight): the broker may still take it.
    #[error("no confirm in time; the broker may still take the message")]
    Unconfirmed(LateConfirm),
    /// The broker or the client library failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// Standard output could not be written (stdout sink).
    #[error("could not write to standard output: {0}")]
    Stdout(#[from] std::io::Error),
}

/// Where accepted events go.
pub enum Sink {
    /// RabbitMQ with confirms.
    Amqp(AmqpPublisher),
    /// One JSON line per event on standard output.
    Stdout(StdoutSink),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Amqp(_) => f.write_str("Sink::Amqp"),
            Sink::Stdout(_) => f.write_str("Sink::Stdout"),
        }
    }
}

impl Sink {
    /// Publishes one event; `Ok` only once it is confirmed, and routed
    /// unless the configuration lets unroutable events go.
    pub async fn publish(&self, envelope: &Envelope) -> Result<Delivered, PublishError> {
        match self {
            Sink::Amqp(p) => p.publish(envelope).await,
            Sink::Stdout(s) => s.publish(envelope).map(|()| Delivered::Routed),
        }
    }

    /// The routing key `envelope` is published with.
    pub fn routing_key(&self, envelope: &Envelope) -> String {
        match self {
            Sink::Amqp(p) => p.routing_key(envelope),
            Sink::Stdout(s) => s.routing_key(envelope),
        }
    }

    /// The AMQP properties and headers `envelope` is published with, as
    /// JSON (for an operator looking at a spooled event).
    pub fn message_properties(envelope: &Envelope) -> serde_json::Value {
        properties::describe(envelope)
    }

    /// True when a publish has a chance of being confirmed right now.
    pub fn is_available(&self) -> bool {
        match self {
            Sink::Amqp(p) => p.is_connected(),
            Sink::Stdout(_) => true,
        }
    }

    /// Publishes a body that failed validation to the quarantine exchange,
    /// if one is configured. Best effort: the sender gets its 4xx regardless.
    pub async fn quarantine(&self, body: &Bytes, reason: &str, request_id: &str) {
        if let Sink::Amqp(p) = self {
            if let Err(e) = p.quarantine(body, reason, request_id).await {
                tracing::warn!(error = %e, reason, "could not publish rejected body to the quarantine exchange");
            }
        }
    }
}

/// Exposed for the tests' consumers: the AMQP header value as text.
pub fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
