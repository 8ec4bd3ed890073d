//! A downstream service's side of the contract: a queue of its own, bound to
//! the relay's exchange, consumed idempotently by `message_id`.
//!
//! Run it next to a relay (see `deploy/compose.yaml`):
//!
//! ```text
//! cargo run --example consumer
//! AMQP_URI=amqp://user:pass@broker:5672/%2f QUEUE=billing cargo run --example consumer
//! cargo run --example consumer -- --binding 'verification.verified'
//! ```
//!
//! Every flag also reads an environment variable: `AMQP_URI`, `EXCHANGE`,
//! `QUEUE`, `BINDING`, `QUEUE_TYPE`. One line per delivery goes to standard
//! output.
//!
//! `QUEUE_TYPE=quorum` declares a quorum queue (replicated over a RabbitMQ
//! cluster): the same declaration as the relay's `[[amqp.queues]]` with
//! `quorum = true`, so either side may declare it first
//! (`deploy/compose.ha.yaml`).
//!
//! Delivery is at least once (SPEC 3): a confirm timeout or a Redis failover
//! can deliver an event twice, both copies with the same `message_id`. The
//! consumer therefore remembers which ids it has processed and acknowledges a
//! repeat without acting on it again.

use std::collections::HashSet;

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

/// How many unacknowledged deliveries the broker may push at once: enough to
/// keep the consumer busy, few enough that a crash redelivers little.
const PREFETCH: u16 = 32;

/// Example consumer of sendtalk-relay verification events.
#[derive(Debug, Parser)]
#[command(name = "consumer")]
struct Args {
    /// Broker to connect to.
    #[arg(
        long,
        env = "AMQP_URI",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_uri: String,
    /// The relay's exchange (`amqp.exchange`).
    #[arg(long, env = "EXCHANGE", default_value = "sendtalk.verification")]
    exchange: String,
    /// This service's own queue; durable, so events wait while it is down.
    #[arg(long, env = "QUEUE", default_value = "verification-consumer-example")]
    queue: String,
    /// Which routing keys to receive (the relay sends `verification.<status>`).
    #[arg(long, env = "BINDING", default_value = "verification.#")]
    binding: String,
    /// The queue's type: `classic`, or `quorum` on a RabbitMQ cluster.
    #[arg(long, env = "QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    queue_type: QueueType,
}

/// `x-queue-type` of the declared queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum QueueType {
    /// No `x-queue-type` argument: the broker's classic queue.
    Classic,
    /// `x-queue-type = quorum`, as the relay declares with `quorum = true`.
    Quorum,
}

impl QueueType {
    fn arguments(self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        arguments
    }
}

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// First time this id was seen: the side effect ran.
    Processed,
    /// The id was already processed: acknowledged, nothing done.
    Duplicate,
    /// Not a relay event (no message id or not JSON): rejected, not requeued,
    /// so it dead-letters if the queue has a dead-letter exchange.
    Rejected,
}

impl Handled {
    fn as_str(self) -> &'static str {
        match self {
            Handled::Processed => "processed",
            Handled::Duplicate => "duplicate",
            Handled::Rejected => "rejected",
        }
    }
}

/// Ids already processed.
///
/// In memory for the example only: it is lost on restart and not shared
/// between replicas. A real service keeps it in its own database, written in
/// the same transaction as its side effect (for example a table with a
/// unique `message_id` column), so "processed" and "remembered" can never
/// disagree after a crash.
#[derive(Debug, Default)]
struct Processed {
    ids: HashSet<String>,
}

impl Processed {
    /// Runs the side effect once per id; returns what happened.
    fn handle(&mut self, message_id: &str, event: &serde_json::Value) -> Handled {
        if self.ids.contains(message_id) {
            return Handled::Duplicate;
        }
        // The side effect goes here (mark the user verified, send a welcome
        // message...). The example only reads the fields it prints.
        let _ = event;
        self.ids.insert(message_id.to_string());
        Handled::Processed
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conn = Connection::connect(&args.amqp_uri, ConnectionProperties::default())
        .await
        .context("Failed to connect to the broker")?;
    let channel = conn
        .create_channel()
        .await
        .context("Failed to open a channel")?;

    // Declaring the exchange too (same kind and durability as the relay's
    // default) lets the consumer start before the relay; if the relay is
    // configured with another `amqp.exchange_type`, change the kind here.
    channel
        .exchange_declare(
            args.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("Failed to declare the exchange {}", args.exchange))?;
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.queue_type.arguments(),
        )
        .await
        .with_context(|| format!("Failed to declare the queue {}", args.queue))?;
    channel
        .queue_bind(
            args.queue.as_str().into(),
            args.exchange.as_str().into(),
            args.binding.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("Failed to bind {} to {}", args.queue, args.exchange))?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .context("Failed to set the prefetch count")?;
    let mut deliveries = channel
        .basic_consume(
            args.queue.as_str().into(),
            "verification-consumer-example".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("Failed to start consuming")?;
    eprintln!(
        "consumer: queue {} bound to {} with {}, prefetch {PREFETCH}",
        args.queue, args.exchange, args.binding
    );

    let mut processed = Processed::default();
    loop {
        let delivery = tokio::select! {
            next = deliveries.next() => match next {
                Some(delivery) => delivery.context("Failed to receive a delivery")?,
                // The broker cancelled the consumer (queue deleted...).
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        };
        handle(&mut processed, &delivery).await?;
    }
    // Unacknowledged deliveries go back to the queue when the channel closes.
    conn.close(200, "bye".into())
        .await
        .context("Failed to close the connection")?;
    Ok(())
}

/// Processes one delivery, prints one line for it and settles it with the
/// broker: acknowledged after processing (or as a duplicate), rejected
/// without requeue when it is not a relay event.
async fn handle(processed: &mut Processed, delivery: &Delivery) -> anyhow::Result<()> {
    let properties = &delivery.properties;
    let message_id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_string());
    let event = serde_json::from_slice::<serde_json::Value>(&delivery.data).ok();
    let outcome = match (&message_id, &event) {
        (Some(id), Some(event)) => processed.handle(id, event),
        _ => Handled::Rejected,
    };
    let field = |name: &str| {
        event.as_ref().and_then(|e| e.get(name)).map_or_else(
            || "-".to_string(),
            |v| v.as_str().map_or_else(|| v.to_string(), String::from),
        )
    };
    println!(
        "{outcome} message_id={id} routing_key={key} status={status} verifiedTime={time} \
         x-dedup={dedup} x-request-id={request} redelivered={redelivered}",
        outcome = outcome.as_str(),
        id = message_id.as_deref().unwrap_or("-"),
        key = delivery.routing_key.as_str(),
        status = field("status"),
        time = field("verifiedTime"),
        dedup = header(delivery, "x-dedup"),
        request = header(delivery, "x-request-id"),
        redelivered = delivery.redelivered,
    );
    if outcome == Handled::Rejected {
        delivery
            .reject(BasicRejectOptions { requeue: false })
            .await
            .context("Failed to reject a delivery")?;
    } else {
        delivery
            .ack(BasicAckOptions::default())
            .await
            .context("Failed to acknowledge a delivery")?;
    }
    Ok(())
}

/// A text header set by the relay, or `-`.
fn header(delivery: &Delivery, name: &str) -> String {
    let value = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(name));
    match value {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
        _ => "-".to_string(),
    }
}
