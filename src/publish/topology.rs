//! The broker topology the relay owns when `amqp.declare = true`: the
//! exchange, the optional quarantine exchange and `[[amqp.queues]]`.
//! Declared on every (re)connection, so a broker that lost its definitions
//! gets them back before the first publish.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::broker::ExchangeName;
use super::settings::{AmqpSettings, QueueSettings};

/// Declares the exchanges and queues of `settings` (idempotent).
pub async fn declare(channel: &Channel, settings: &AmqpSettings) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            settings.exchange_type.kind(),
            durable,
            FieldTable::default(),
        )
        .await?;
    if let Some(quarantine) = &settings.quarantine_exchange {
        channel
            .exchange_declare(
                quarantine.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    for queue in &settings.queues {
        declare_queue(channel, &settings.exchange, queue).await?;
    }
    Ok(())
}

/// With `amqp.declare = false`: fails (404, closing `channel`) when the
/// exchange does not exist.
pub async fn check_exchange(
    channel: &Channel,
    settings: &AmqpSettings,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            settings.exchange_type.kind(),
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// True for the broker's 404 NOT_FOUND.
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}

async fn declare_queue(
    channel: &Channel,
    exchange: &ExchangeName,
    queue: &QueueSettings,
) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    if queue.quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    if let Some(dead_letter) = &queue.dead_letter_exchange {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(dead_letter.as_str())),
        );
    }
    channel
        .queue_declare(
            queue.name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            queue.name.as_str().into(),
            exchange.as_str().into(),
            queue.binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
