//! The RabbitMQ publisher: a supervised connection (SPEC 4) and the mapping
//! from a broker answer to what the caller does next.
//!
//! The supervisor keeps one `Link` open: it connects to the `amqp.uri`
//! list in order, declares the topology, watches the connection (closed,
//! blocked, silent) and reconnects with capped exponential backoff and
//! jitter. It is the only writer of `amqp_connected`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::broker::BrokerUri;
use super::link::{Attempt, Link, Outgoing, Route, Settled};
use super::properties::properties;
use super::settings::{AmqpSettings, OnUnroutable};
use super::{topology, Delivered, PublishError};
use crate::message::Envelope;

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
pub(super) const APP_ID: &str = "sendtalk-relay";
/// A connection attempt never waits less than this for the handshake.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The metrics the publisher writes.
#[derive(Clone)]
pub struct PublisherMetrics {
    /// `amqp_connected`; written only by the supervisor.
    pub connected: IntGauge,
    /// `unroutable_total`.
    pub unroutable: IntCounter,
    /// `publish_duration_seconds`.
    pub publish_duration: Histogram,
}

/// RabbitMQ publisher. Cloning shares the connection.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    /// The validated `[amqp]` section: parsed URIs, exchange, routing key.
    settings: AmqpSettings,
    /// The open connection, `None` while disconnected. Written by the
    /// supervisor; read-locked only to clone the `Arc`, never across an await.
    link: RwLock<Option<Arc<Link>>>,
    /// Confirms that timed out since the last one that arrived: a broker
    /// that stops answering on an open socket is dropped and reconnected.
    timeouts_since_ack: AtomicU64,
    /// When the last confirm arrived, as milliseconds since `epoch`.
    last_ack_ms: AtomicU64,
    epoch: Instant,
    /// Wakes the supervisor early when a publish saw trouble.
    wake: Notify,
    metrics: PublisherMetrics,
}

impl AmqpPublisher {
    /// A publisher for `settings`; nothing connects until [`Self::supervise`].
    pub fn new(settings: AmqpSettings, metrics: PublisherMetrics) -> Self {
        metrics.connected.set(0);
        Self {
            inner: Arc::new(Inner {
                settings,
                link: RwLock::new(None),
                timeouts_since_ack: AtomicU64::new(0),
                last_ack_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                wake: Notify::new(),
                metrics,
            }),
        }
    }

    fn link(&self) -> Option<Arc<Link>> {
        self.inner.link.read().ok().and_then(|l| l.clone())
    }

    /// True when a publish can be sent now: connected and not blocked.
    pub fn is_connected(&self) -> bool {
        self.link()
            .is_some_and(|link| link.is_open() && !link.is_blocked() && !link.is_lost())
    }

    /// Publishes whose confirm is still pending after their caller gave up
    /// (they settle when the broker answers).
    pub fn late_confirms(&self) -> usize {
        self.link().map_or(0, |link| link.late_confirms())
    }

    /// Publishes an event (mandatory) and waits for the broker's confirm
    /// within `amqp.confirm_timeout_ms`.
    pub async fn publish(&self, envelope: &Envelope) -> Result<Delivered, PublishError> {
        let started = Instant::now();
        let result = self.publish_event(envelope).await;
        self.inner
            .metrics
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) | Err(PublishError::Unroutable | PublishError::Nack) => {
                self.inner.timeouts_since_ack.store(0, Ordering::Relaxed);
                self.inner
                    .last_ack_ms
                    .store(self.millis_since_epoch(), Ordering::Relaxed);
            }
            Err(PublishError::Blocked) => {}
            Err(PublishError::Unconfirmed(_) | PublishError::Timeout(_)) => {
                self.inner
                    .timeouts_since_ack
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.wake.notify_one();
            }
            Err(_) => self.inner.wake.notify_one(),
        }
        result
    }

    /// The routing key `envelope` is published with.
    pub fn routing_key(&self, envelope: &Envelope) -> String {
        self.inner.settings.routing_key.render(&envelope.status)
    }

    fn millis_since_epoch(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn publish_event(&self, envelope: &Envelope) -> Result<Delivered, PublishError> {
        let link = self.link().ok_or(PublishError::NotConnected)?;
        let settings = &self.inner.settings;
        let routing_key = settings.routing_key.render(&envelope.status);
        let timeout = settings.confirm_timeout;
        let message = Outgoing {
            exchange: settings.exchange.as_str().into(),
            routing_key: routing_key.as_str().into(),
            mandatory: true,
            body: envelope.body.clone(),
            properties: properties(envelope),
        };
        match link
            .publish(message, Route::Events, Instant::now() + timeout, timeout)
            .await?
        {
            Attempt::Settled(Settled::Routed) => Ok(Delivered::Routed),
            Attempt::Settled(Settled::Nacked) => Err(PublishError::Nack),
            Attempt::Settled(Settled::Returned) => {
                self.inner.metrics.unroutable.inc();
                match settings.on_unroutable {
                    OnUnroutable::Spool => Err(PublishError::Unroutable),
                    OnUnroutable::Drop => {
                        tracing::warn!(message_id = %envelope.message_id, %routing_key, "unroutable event dropped (amqp.on_unroutable = \"drop\")");
                        Ok(Delivered::Dropped)
                    }
                }
            }
            Attempt::Unconfirmed(late) => Err(PublishError::Unconfirmed(late)),
        }
    }

    /// Publishes a body that failed validation to the quarantine exchange.
    pub(super) async fn quarantine(
        &self,
        body: &Bytes,
        reason: &str,
        request_id: &str,
    ) -> Result<(), PublishError> {
        let Some(exchange) = &self.inner.settings.quarantine_exchange else {
            return Ok(());
        };
        let link = self.link().ok_or(PublishError::NotConnected)?;
        let mut headers = FieldTable::default();
        headers.insert(
            "x-reject-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-request-id".into(),
            AMQPValue::LongString(LongString::from(request_id)),
        );
        let routing_key = format!("rejected.{reason}");
        let message = Outgoing {
            exchange: exchange.as_str().into(),
            routing_key: routing_key.as_str().into(),
            // Nobody has to take a rejected body; a return would be noise.
            mandatory: false,
            body: body.clone(),
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_app_id(APP_ID.into())
                .with_headers(headers),
        };
        let timeout = self.inner.settings.confirm_timeout;
        match link
            .publish(
                message,
                Route::Quarantine,
                Instant::now() + timeout,
                timeout,
            )
            .await?
        {
            Attempt::Settled(Settled::Nacked) => Err(PublishError::Nack),
            Attempt::Settled(_) => Ok(()),
            Attempt::Unconfirmed(_) => Err(PublishError::Timeout(timeout)),
        }
    }

    /// Keeps a connection open until `shutdown`: connects to the URIs in
    /// order, declares the topology, and reconnects with capped exponential
    /// backoff and jitter whenever the connection is lost.
    pub async fn supervise(self, shutdown: CancellationToken) {
        let mut delay = RECONNECT_MIN;
        let uris = &self.inner.settings.uris;
        let mut next_uri = 0usize;
        while !shutdown.is_cancelled() {
            let uri = &uris[next_uri % uris.len()];
            match self.connect(uri).await {
                Ok(link) => {
                    delay = RECONNECT_MIN;
                    tracing::info!(broker = %uri, "connected to the broker");
                    self.watch(&link, &shutdown).await;
                    self.disconnect().await;
                    if shutdown.is_cancelled() {
                        break;
                    }
                    tracing::warn!("broker connection lost; events are spooled until it is back");
                    // Start over from the first URI: it is the preferred broker.
                    next_uri = 0;
                }
                Err(e) => {
                    let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    if let ConnectError::MissingExchange(exchange) = &e {
                        tracing::error!(broker = %uri, exchange, retry_in_ms, "the exchange does not exist and amqp.declare = false: nothing can be published until it is declared");
                    } else {
                        tracing::warn!(broker = %uri, error = %e, retry_in_ms, "could not connect to the broker");
                    }
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

    async fn connect(&self, uri: &BrokerUri) -> Result<Arc<Link>, ConnectError> {
        let props = ConnectionProperties::default().with_connection_name(APP_ID.into());
        let mut parsed = uri.amqp_uri().clone();
        if parsed.query.frame_max.is_none() {
            parsed.query.frame_max = Some(DEFAULT_FRAME_MAX);
        }
        let settings = &self.inner.settings;
        let open = async {
            let connection = Connection::connect_uri(parsed, props).await?;
            // Declared (or, when the relay does not own the topology, looked
            // up) on every connection: a reconnect after the broker closed a
            // channel heals a deleted exchange this way (SPEC 4).
            let prepared = Link::open(connection, async |channel| {
                if settings.declare {
                    topology::declare(channel, settings).await
                } else {
                    topology::check_exchange(channel, settings).await
                }
            })
            .await;
            match prepared {
                Err(e) if !settings.declare && topology::is_not_found(&e) => Err(
                    ConnectError::MissingExchange(settings.exchange.as_str().to_string()),
                ),
                other => other.map_err(ConnectError::from),
            }
        };
        // A blackholed broker would otherwise hang the handshake indefinitely.
        let within = settings.confirm_timeout.max(MIN_CONNECT_TIMEOUT);
        let link = tokio::time::timeout(within, open)
            .await
            .map_err(|_| ConnectError::Timeout(within))??;
        if let Ok(mut slot) = self.inner.link.write() {
            *slot = Some(link.clone());
        }
        self.inner.timeouts_since_ack.store(0, Ordering::Relaxed);
        self.inner
            .last_ack_ms
            .store(self.millis_since_epoch(), Ordering::Relaxed);
        self.set_connected(!link.is_blocked());
        Ok(link)
    }

    /// Returns when the connection is no longer usable or on shutdown.
    async fn watch(&self, link: &Link, shutdown: &CancellationToken) {
        let timeout = self.inner.settings.confirm_timeout;
        let mut blocked = link.blocked_changes();
        let mut was_blocked = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(HEALTH_POLL) => {}
                () = self.inner.wake.notified() => {}
                () = link.lost_changed() => {}
                changed = blocked.changed() => {
                    // The events task ended with the connection: poll instead.
                    if changed.is_err() {
                        tokio::time::sleep(HEALTH_POLL).await;
                    }
                }
                () = shutdown.cancelled() => return,
            }
            // A channel the broker closed (404, 406, 403, ...) heals the way
            // a lost connection does: reconnect, declare, resume.
            if !link.is_open() || link.is_lost() {
                return;
            }
            // While the broker blocks publishers (resource alarm) nothing is
            // published: report unavailable so events spool at once. Silence
            // is expected then, and reconnecting would turn every pending
            // confirm into a duplicate.
            let is_blocked = link.is_blocked();
            self.set_connected(!is_blocked);
            if is_blocked {
                was_blocked = true;
                continue;
            }
            if was_blocked {
                // The silence of the block does not count: the confirms the
                // broker held back are on their way now.
                was_blocked = false;
                self.inner.timeouts_since_ack.store(0, Ordering::Relaxed);
                self.inner
                    .last_ack_ms
                    .store(self.millis_since_epoch(), Ordering::Relaxed);
            }
            let last = self.inner.last_ack_ms.load(Ordering::Relaxed);
            let silent_for = Duration::from_millis(self.millis_since_epoch().saturating_sub(last));
            if self.inner.timeouts_since_ack.load(Ordering::Relaxed) > 0 && silent_for > timeout {
                tracing::warn!(
                    silent_ms = u64::try_from(silent_for.as_millis()).unwrap_or(u64::MAX),
                    "broker stopped confirming; reconnecting"
                );
                return;
            }
        }
    }

    fn set_connected(&self, connected: bool) {
        self.inner.metrics.connected.set(i64::from(connected));
    }

    /// Drops the link and closes its connection.
    async fn disconnect(&self) {
        self.set_connected(false);
        let link = self.inner.link.write().ok().and_then(|mut l| l.take());
        if let Some(link) = link {
            link.close().await;
        }
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

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("exchange {0:?} does not exist")]
    MissingExchange(String),
    #[error(transparent)]
    Broker(#[from] lapin::Error),
}
