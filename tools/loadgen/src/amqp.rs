//! AMQP helpers: the counting queue of the `relay` mode, the raw publisher
//! of the `broker` mode, and clean-up.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::time::Instant;

use crate::client::Clock;

pub async fn connect(uri: &str, name: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(
        uri,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

pub async fn declare_exchange(channel: &Channel, exchange: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// An exclusive, auto-delete queue bound to `exchange` with `#`.
pub async fn counting_queue(channel: &Channel, exchange: &str, name: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            name.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A non-exclusive queue bound to `exchange` with `#` that outlives this
/// process (the drain measurement binds it before the relay restarts) and
/// deletes itself after `expires` unused, should the script die.
pub async fn lasting_counting_queue(
    channel: &Channel,
    exchange: &str,
    name: &str,
    expires: Duration,
) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongUInt(u32::try_from(expires.as_millis()).unwrap_or(u32::MAX)),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            name.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

pub async fn queue_depth(channel: &Channel, name: &str) -> anyhow::Result<u64> {
    let q = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(q.message_count()))
}

/// Waits until the queue holds at least `expected` messages and stays
/// unchanged for `quiet`, or `within` passes. Returns the last count.
pub async fn settle(
    channel: &Channel,
    name: &str,
    expected: u64,
    quiet: Duration,
    within: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    let mut last = queue_depth(channel, name).await?;
    let mut stable_since = Instant::now();
    loop {
        if last >= expected && stable_since.elapsed() >= quiet {
            return Ok(last);
        }
        if Instant::now() >= deadline {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = queue_depth(channel, name).await?;
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
}

pub async fn delete_queue(channel: &Channel, name: &str) {
    let _ = channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
}

pub async fn delete_exchange(channel: &Channel, exchange: &str) -> anyhow::Result<()> {
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}

/// The same properties the relay sets (src/publish.rs `properties`), so the
/// frames have the same size.
fn relay_like_properties(message_id: &str, request_id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-request-id".into(),
        AMQPValue::LongString(LongString::from(request_id)),
    );
    headers.insert(
        "x-received-at".into(),
        AMQPValue::LongString(LongString::from("2026-01-01T00:00:00.000Z")),
    );
    headers.insert(
        "x-dedup".into(),
        AMQPValue::LongString(LongString::from("checked")),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(message_id))
        .with_timestamp(1_767_225_600)
        .with_type("sendtalk.verification.verified".into())
        .with_app_id("sendtalk-relay".into())
        .with_headers(headers)
}

pub struct BrokerResult {
    pub hist: Histogram<u64>,
    pub window_count: u64,
    pub total_acked: u64,
    pub nacked: u64,
    pub returned: u64,
    pub errors: u64,
}

impl BrokerResult {
    fn new() -> Self {
        BrokerResult {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
            window_count: 0,
            total_acked: 0,
            nacked: 0,
            returned: 0,
            errors: 0,
        }
    }
}

/// `c` tasks, each publish-and-await-confirm in a loop on one shared
/// confirmed channel, until `clock.end`.
pub async fn publish_load(
    channel: &Channel,
    exchange: &str,
    body: bytes::Bytes,
    concurrency: usize,
    clock: Clock,
    run_id: &str,
) -> anyhow::Result<BrokerResult> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let exchange: Arc<str> = exchange.into();
    let mut handles = Vec::new();
    for w in 0..concurrency {
        let channel = channel.clone();
        let exchange = exchange.clone();
        let body = body.clone();
        let run_id = run_id.to_string();
        handles.push(tokio::spawn(async move {
            let mut r = BrokerResult::new();
            let mut n = 0u64;
            while Instant::now() < clock.end {
                n += 1;
                let message_id = crate::client::fresh_id(&run_id, w, n);
                let started = Instant::now();
                let confirm = async {
                    channel
                        .basic_publish(
                            ShortString::from(&*exchange),
                            "verification.verified".into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &body,
                            relay_like_properties(&message_id, &message_id),
                        )
                        .await?
                        .await
                }
                .await;
                let done = Instant::now();
                match confirm {
                    Ok(Confirmation::Ack(None)) => r.total_acked += 1,
                    Ok(Confirmation::Ack(Some(_))) => r.returned += 1,
                    Ok(_) => r.nacked += 1,
                    Err(e) => {
                        r.errors += 1;
                        if r.errors == 1 {
                            eprintln!("loadgen: publish failed: {e}");
                        }
                        if r.errors > 100 {
                            break;
                        }
                        continue;
                    }
                }
                if done >= clock.warm_end && done <= clock.end {
                    let micros = done.duration_since(started).as_micros().max(1) as u64;
                    let _ = r.hist.record(micros.min(120_000_000));
                    r.window_count += 1;
                }
            }
            r
        }));
    }
    let mut merged = BrokerResult::new();
    for h in handles {
        let r = h.await?;
        merged.hist.add(&r.hist).expect("same bounds");
        merged.window_count += r.window_count;
        merged.total_acked += r.total_acked;
        merged.nacked += r.nacked;
        merged.returned += r.returned;
        merged.errors += r.errors;
    }
    Ok(merged)
}
