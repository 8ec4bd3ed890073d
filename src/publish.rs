//! Publishing accepted events: to RabbitMQ with publisher confirms and a
//! supervised, reconnecting connection (SPEC 4), or to standard output for
//! the embedded demo sink.
//!
//! Publishes run concurrently on one confirmed channel; nothing serialises
//! them. A publish that is not acked in time, nacked or returned is an error
//! the caller answers by spooling.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{render_routing_key, AmqpSettings, OnUnroutable, QueueSettings};

/// First reconnect delay; doubles up to [`RECONNECT_MAX`], with jitter so
/// replicas do not reconnect in lockstep after a broker restart.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the connection when nothing wakes it.
const HEALTH_POLL: Duration = Duration::from_millis(250);
/// Frame size asked of the broker unless the URI says otherwise. lapin keeps
/// send and receive buffers of 32 frames; RabbitMQ's 128 KiB default makes
/// them 8 MB, which the relay's ~150-byte events never need (measured: idle
/// RSS 16.7 MB -> 9.2 MB). Larger bodies are simply split over more frames.
const DEFAULT_FRAME_MAX: u32 = 8192;
/// The `app_id` property of every message.
const APP_ID: &str = "sendtalk-relay";

/// Whether the dedup check ran for an event (`x-dedup` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMark {
    Checked,
    Skipped,
}

impl DedupMark {
    pub fn as_str(self) -> &'static str {
        match self {
            DedupMark::Checked => "checked",
            DedupMark::Skipped => "skipped",
        }
    }
}

/// Everything needed to publish one event, now or later from the spool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The webhook's raw body, published byte for byte.
    #[serde(with = "base64_bytes")]
    pub body: Bytes,
    pub message_id: String,
    pub status: String,
    pub request_id: String,
    /// Receive time, Unix milliseconds.
    pub received_at_ms: u64,
    pub dedup: DedupMark,
}

impl Envelope {
    /// `x-received-at`: RFC 3339 with milliseconds, UTC.
    pub fn received_at_rfc3339(&self) -> String {
        let nanos = i128::from(self.received_at_ms) * 1_000_000;
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| {
                t.format(time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
                ))
                .ok()
            })
            .unwrap_or_default()
    }

    pub fn message_type(&self) -> String {
        format!("sendtalk.verification.{}", self.status)
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no broker connection")]
    NotConnected,
    #[error("the broker nacked the message")]
    Nack,
    #[error("the broker returned the message as unroutable")]
    Unroutable,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("could not write to standard output: {0}")]
    Stdout(#[from] std::io::Error),
}

/// Where accepted events go.
pub enum Sink {
    Amqp(AmqpPublisher),
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
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        match self {
            Sink::Amqp(p) => p.publish(envelope).await,
            Sink::Stdout(s) => s.publish(envelope),
        }
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

/// One JSON line per event on standard output (the embedded demo sink).
#[derive(Debug, Default)]
pub struct StdoutSink {
    routing_key: String,
}

impl StdoutSink {
    pub fn new(routing_key_template: &str) -> Self {
        Self {
            routing_key: routing_key_template.to_string(),
        }
    }

    fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        use std::io::Write as _;
        let body: serde_json::Value = serde_json::from_slice(&envelope.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&envelope.body).into_owned())
        });
        let line = serde_json::json!({
            "routing_key": render_routing_key(&self.routing_key, &envelope.status),
            "message_id": envelope.message_id,
            "type": envelope.message_type(),
            "headers": {
                "x-request-id": envelope.request_id,
                "x-received-at": envelope.received_at_rfc3339(),
                "x-dedup": envelope.dedup.as_str(),
            },
            "body": body,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    }
}

/// RabbitMQ publisher. Cloning shares the connection.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    settings: AmqpSettings,
    /// The confirmed channel, `None` while disconnected. Read-locked only to
    /// clone the handle, never across an await.
    channel: RwLock<Option<Channel>>,
    /// Owned by the supervisor; kept here so shutdown can close it.
    connection: RwLock<Option<Connection>>,
    connected: AtomicBool,
    /// Confirms that timed out since the last one that arrived: a broker
    /// that stops answering on an open socket is dropped and reconnected.
    timeouts_since_ack: AtomicU64,
    last_ack: RwLock<Instant>,
    /// Wakes the supervisor early when a publish saw trouble.
    wake: Notify,
    gauge: IntGauge,
    unroutable: prometheus::IntCounter,
    publish_duration: prometheus::Histogram,
}

impl AmqpPublisher {
    pub fn new(
        settings: AmqpSettings,
        gauge: IntGauge,
        unroutable: prometheus::IntCounter,
        publish_duration: prometheus::Histogram,
    ) -> Self {
        gauge.set(0);
        Self {
            inner: Arc::new(Inner {
                settings,
                channel: RwLock::new(None),
                connection: RwLock::new(None),
                connected: AtomicBool::new(false),
                timeouts_since_ack: AtomicU64::new(0),
                last_ack: RwLock::new(Instant::now()),
                wake: Notify::new(),
                gauge,
                unroutable,
                publish_duration,
            }),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }

    fn channel(&self) -> Option<Channel> {
        self.inner.channel.read().ok().and_then(|c| c.clone())
    }

    /// Publishes and waits for the broker's confirm, within the timeout.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let started = Instant::now();
        let result = self.publish_confirmed(envelope).await;
        self.inner
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                self.inner.timeouts_since_ack.store(0, Ordering::Relaxed);
                if let Ok(mut t) = self.inner.last_ack.write() {
                    *t = Instant::now();
                }
            }
            Err(PublishError::Unroutable) => {}
            Err(PublishError::Timeout(_)) => {
                self.inner
                    .timeouts_since_ack
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.wake.notify_one();
            }
            Err(_) => self.inner.wake.notify_one(),
        }
        result
    }

    async fn publish_confirmed(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let channel = self.channel().ok_or(PublishError::NotConnected)?;
        let settings = &self.inner.settings;
        let routing_key = render_routing_key(&settings.routing_key, &envelope.status);
        let timeout = settings.confirm_timeout();
        let confirm = tokio::time::timeout(timeout, async {
            channel
                .basic_publish(
                    settings.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &envelope.body,
                    properties(envelope),
                )
                .await?
                .await
        })
        .await
        .map_err(|_| PublishError::Timeout(timeout))??;
        match confirm {
            Confirmation::Ack(Some(_returned)) => {
                self.inner.unroutable.inc();
                match settings.on_unroutable {
                    OnUnroutable::Spool => Err(PublishError::Unroutable),
                    OnUnroutable::Drop => {
                        tracing::warn!(message_id = %envelope.message_id, %routing_key, "unroutable event dropped (amqp.on_unroutable = \"drop\")");
                        Ok(())
                    }
                }
            }
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(_) => Err(PublishError::Nack),
            Confirmation::NotRequested => {
                // confirm_select runs before the channel is shared, so this
                // means the channel was replaced under us: treat as failure.
                Err(PublishError::NotConnected)
            }
        }
    }

    async fn quarantine(
        &self,
        body: &Bytes,
        reason: &str,
        request_id: &str,
    ) -> Result<(), PublishError> {
        let exchange = &self.inner.settings.quarantine_exchange;
        if exchange.is_empty() {
            return Ok(());
        }
        let channel = self.channel().ok_or(PublishError::NotConnected)?;
        let mut headers = FieldTable::default();
        headers.insert(
            "x-reject-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-request-id".into(),
            AMQPValue::LongString(LongString::from(request_id)),
        );
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_app_id(APP_ID.into())
            .with_headers(headers);
        let timeout = self.inner.settings.confirm_timeout();
        let routing_key = format!("rejected.{reason}");
        let confirm = tokio::time::timeout(timeout, async {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await?
                .await
        })
        .await
        .map_err(|_| PublishError::Timeout(timeout))??;
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(PublishError::Nack)
        }
    }

    /// Keeps a confirmed channel open until `shutdown`: connects to the URIs
    /// in order, declares the topology, and reconnects with capped
    /// exponential backoff and jitter whenever the connection is lost.
    pub async fn supervise(self, shutdown: CancellationToken) {
        let mut delay = RECONNECT_MIN;
        let uris = self.inner.settings.uris();
        let mut next_uri = 0usize;
        while !shutdown.is_cancelled() {
            let uri = &uris[next_uri % uris.len()];
            match self.connect(uri).await {
                Ok(()) => {
                    delay = RECONNECT_MIN;
                    tracing::info!(broker = %crate::config::redact_url_password(uri), "connected to the broker");
                    self.watch(&shutdown).await;
                    self.disconnect().await;
                    if shutdown.is_cancelled() {
                        break;
                    }
                    tracing::warn!("broker connection lost; events are spooled until it is back");
                    // Start over from the first URI: it is the preferred broker.
                    next_uri = 0;
                }
                Err(e) => {
                    tracing::warn!(broker = %crate::config::redact_url_password(uri), error = %e, retry_in_ms = delay.as_millis() as u64, "could not connect to the broker");
                    next_uri += 1;
                    let jittered = delay.mul_f64(rand::random_range(0.5..1.0));
                    tokio::select! {
                        () = tokio::time::sleep(jittered) => {}
                        () = shutdown.cancelled() => break,
                    }
                    delay = (delay * 2).min(RECONNECT_MAX);
                }
            }
        }
        self.disconnect().await;
    }

    async fn connect(&self, uri: &str) -> Result<(), lapin::Error> {
        let props = ConnectionProperties::default().with_connection_name("sendtalk-relay".into());
        let mut parsed: lapin::uri::AMQPUri = uri.parse().map_err(|_| {
            lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Closed,
            ))
        })?;
        if parsed.query.frame_max.is_none() {
            parsed.query.frame_max = Some(DEFAULT_FRAME_MAX);
        }
        let connect = Connection::connect_uri(parsed, props);
        // A blackholed broker would otherwise hang the handshake indefinitely.
        let conn = tokio::time::timeout(
            self.inner
                .settings
                .confirm_timeout()
                .max(Duration::from_secs(2)),
            connect,
        )
        .await
        .map_err(|_| {
            lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Closed,
            ))
        })??;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        if self.inner.settings.declare {
            declare_topology(&channel, &self.inner.settings).await?;
        }
        if let Ok(mut slot) = self.inner.connection.write() {
            *slot = Some(conn);
        }
        if let Ok(mut slot) = self.inner.channel.write() {
            *slot = Some(channel);
        }
        self.inner.timeouts_since_ack.store(0, Ordering::Relaxed);
        if let Ok(mut t) = self.inner.last_ack.write() {
            *t = Instant::now();
        }
        self.set_connected(true);
        Ok(())
    }

    /// Returns when the connection is no longer usable or on shutdown.
    async fn watch(&self, shutdown: &CancellationToken) {
        let timeout = self.inner.settings.confirm_timeout();
        loop {
            tokio::select! {
                () = tokio::time::sleep(HEALTH_POLL) => {}
                () = self.inner.wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
            let healthy = {
                let conn_ok = self
                    .inner
                    .connection
                    .read()
                    .ok()
                    .and_then(|c| c.as_ref().map(|c| c.status().connected()))
                    .unwrap_or(false);
                let chan_ok = self
                    .channel()
                    .map(|c| c.status().connected())
                    .unwrap_or(false);
                conn_ok && chan_ok
            };
            if !healthy {
                return;
            }
            let blocked = self
                .inner
                .connection
                .read()
                .ok()
                .and_then(|c| c.as_ref().map(|c| c.status().blocked()))
                .unwrap_or(false);
            // While the broker blocks publishers (resource alarm), publishes
            // would only time out: report unavailable so events spool at once.
            self.set_connected(!blocked);
            let silent_for = self
                .inner
                .last_ack
                .read()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if self.inner.timeouts_since_ack.load(Ordering::Relaxed) > 0 && silent_for > timeout {
                tracing::warn!(
                    silent_ms = silent_for.as_millis() as u64,
                    "broker stopped confirming; reconnecting"
                );
                return;
            }
        }
    }

    fn set_connected(&self, connected: bool) {
        self.inner.connected.store(connected, Ordering::Release);
        self.inner.gauge.set(i64::from(connected));
    }

    /// Drops the channel and closes the connection (cleanly if it still works).
    async fn disconnect(&self) {
        self.set_connected(false);
        let channel = self.inner.channel.write().ok().and_then(|mut c| c.take());
        let connection = self
            .inner
            .connection
            .write()
            .ok()
            .and_then(|mut c| c.take());
        let close = async {
            if let Some(ch) = channel {
                if ch.status().connected() {
                    let _ = ch.close(200, "shutdown".into()).await;
                }
            }
            if let Some(conn) = connection {
                if conn.status().connected() {
                    let _ = conn.close(200, "shutdown".into()).await;
                }
            }
        };
        // A dead peer must not hold up reconnection or shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }

    /// Test hook: waits until the publisher is connected or `within` passes.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.is_connected() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.is_connected()
    }
}

fn properties(envelope: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-request-id".into(),
        AMQPValue::LongString(LongString::from(envelope.request_id.as_str())),
    );
    headers.insert(
        "x-received-at".into(),
        AMQPValue::LongString(LongString::from(envelope.received_at_rfc3339())),
    );
    headers.insert(
        "x-dedup".into(),
        AMQPValue::LongString(LongString::from(envelope.dedup.as_str())),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(envelope.message_id.as_str()))
        .with_timestamp(envelope.received_at_ms / 1000)
        .with_type(ShortString::from(envelope.message_type()))
        .with_app_id(APP_ID.into())
        .with_headers(headers)
}

fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Topic,
    }
}

async fn declare_topology(channel: &Channel, settings: &AmqpSettings) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            exchange_kind(&settings.exchange_type),
            durable,
            FieldTable::default(),
        )
        .await?;
    if !settings.quarantine_exchange.is_empty() {
        channel
            .exchange_declare(
                settings.quarantine_exchange.as_str().into(),
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

async fn declare_queue(
    channel: &Channel,
    exchange: &str,
    queue: &QueueSettings,
) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    if queue.quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    if !queue.dead_letter_exchange.is_empty() {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(queue.dead_letter_exchange.as_str())),
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
            exchange.into(),
            queue.binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Exposed for the tests' consumers: the AMQP header value as text.
pub fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            body: Bytes::from_static(b"{\"id\":\"x\"}"),
            message_id: "x".into(),
            status: "verified".into(),
            request_id: "r".into(),
            received_at_ms: 1_692_847_205_385,
            dedup: DedupMark::Checked,
        }
    }

    #[test]
    fn received_at_is_rfc3339_with_milliseconds() {
        assert_eq!(envelope().received_at_rfc3339(), "2023-08-24T03:20:05.385Z");
    }

    #[test]
    fn envelopes_round_trip_through_json_byte_for_byte() {
        let e = envelope();
        let back: Envelope = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(back.body, e.body);
        assert_eq!(back.dedup, DedupMark::Checked);
    }

    #[test]
    fn properties_carry_every_field_of_the_contract() {
        let p = properties(&envelope());
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.kind().as_ref().unwrap().as_str(),
            "sendtalk.verification.verified"
        );
        assert_eq!(*p.timestamp(), Some(1_692_847_205));
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "sendtalk-relay");
    }
}
