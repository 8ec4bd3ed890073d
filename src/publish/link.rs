//! One broker connection and its pool of confirmed channels, and the one
//! helper that publishes a message and waits for its confirm.
//!
//! Why a pool with one publish outstanding per channel: AMQP 0-9-1 gives
//! `basic.return` no delivery tag, and lapin hands a return to whichever
//! confirm completes next on the channel. With several mandatory publishes in
//! flight on one channel a return can land on the wrong publish (SPEC 4). With
//! at most one publish outstanding per channel, the only confirm a return can
//! meet is its own. Concurrency comes from the number of channels instead.
//!
//! A publish whose confirm has not come by the deadline (or that was in flight
//! when the broker blocked the connection) is not abandoned: its channel is
//! parked with the pending confirm until the broker answers, and the caller
//! gets a [`LateConfirm`] that tells it, later, whether the message was routed.
//! Nothing is left in lapin's dropped-confirm list, and the channel is reused
//! only once its one confirm has arrived.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event, PublisherConfirm};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::PublishError;

/// Most channels open at once on one connection, i.e. most publishes in
/// flight. RabbitMQ's default `channel_max` is 2047; 512 is well above the
/// concurrency one replica sees (a few hundred requests in flight) and keeps
/// the broker's per-channel memory modest.
const MAX_CHANNELS: usize = 512;
/// Channels opened at connect time so the first burst does not pay for
/// channel creation.
const WARM_CHANNELS: usize = 8;
/// Longest a parked confirm is waited for. Past it the channel is closed
/// (which settles the confirm as failed): the supervisor drops a connection
/// that stops confirming long before this.
const LATE_CONFIRM_MAX: Duration = Duration::from_secs(600);

/// A message to publish.
pub(super) struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub mandatory: bool,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// What the broker answered for one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// Acked and routed to at least one queue.
    Routed,
    /// Returned as unroutable (mandatory publishes only), then acked.
    Returned,
    /// Nacked: at least one queue refused it.
    Nacked,
}

/// How a publish attempt ended.
pub(super) enum Attempt {
    Settled(Settled),
    /// Sent, but its confirm is still pending.
    Unconfirmed(LateConfirm),
}

/// The outcome of a publish whose confirm was still pending when its caller
/// stopped waiting. Resolves once the broker answers or the connection dies.
pub struct LateConfirm(oneshot::Receiver<bool>);

impl LateConfirm {
    /// True when the broker acked the message without returning it; false
    /// for a nack, a return, or a connection lost before the answer.
    pub async fn routed(self) -> bool {
        self.0.await.unwrap_or(false)
    }
}

impl std::fmt::Debug for LateConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LateConfirm")
    }
}

/// One open connection with its channels.
pub(super) struct Link {
    connection: Connection,
    /// Confirmed channels with no publish outstanding.
    idle: Mutex<Vec<Channel>>,
    /// One permit per channel in use; bounds the channels opened.
    permits: Arc<Semaphore>,
    /// Whether the broker has blocked this connection (resource alarm);
    /// written only by the task reading the connection's events.
    blocked: watch::Receiver<bool>,
    /// Publishes whose caller stopped waiting and whose confirm is pending.
    late: Arc<AtomicUsize>,
    events: JoinHandle<()>,
    /// Cancelled by [`Link::close`]: parked confirms settle as not routed
    /// instead of waiting on a connection that is going away.
    closed: CancellationToken,
}

impl Link {
    /// Opens a connection, runs `prepare` on its first channel (topology),
    /// and warms the pool.
    pub async fn open(
        connection: Connection,
        prepare: impl AsyncFnOnce(&Channel) -> Result<(), lapin::Error>,
    ) -> Result<Arc<Self>, lapin::Error> {
        let (blocked_tx, blocked) = watch::channel(connection.status().blocked());
        let mut stream = connection.events_listener();
        let events = tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        tracing::warn!(reason, "the broker blocked publishing (resource alarm); events are spooled until it unblocks");
                        blocked_tx.send_replace(true);
                    }
                    Event::ConnectionUnblocked => {
                        tracing::info!("the broker unblocked publishing");
                        blocked_tx.send_replace(false);
                    }
                    _ => {}
                }
            }
        });
        let link = Arc::new(Self {
            connection,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_CHANNELS)),
            blocked,
            late: Arc::new(AtomicUsize::new(0)),
            events,
            closed: CancellationToken::new(),
        });
        let first = link.open_channel().await?;
        prepare(&first).await?;
        let mut warm = vec![first];
        for _ in 1..WARM_CHANNELS {
            warm.push(link.open_channel().await?);
        }
        for channel in warm {
            link.put_back(channel);
        }
        Ok(link)
    }

    async fn open_channel(&self) -> Result<Channel, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    fn take_idle(&self) -> Option<Channel> {
        self.idle.lock().ok().and_then(|mut idle| idle.pop())
    }

    fn put_back(&self, channel: Channel) {
        if channel.status().connected() {
            if let Ok(mut idle) = self.idle.lock() {
                idle.push(channel);
            }
        }
    }

    /// True while the connection is open (blocked or not).
    pub fn is_open(&self) -> bool {
        self.connection.status().connected()
    }

    /// True while the broker blocks publishing on this connection.
    pub fn is_blocked(&self) -> bool {
        *self.blocked.borrow() || self.connection.status().blocked()
    }

    /// A receiver that sees every change of the blocked state.
    pub fn blocked_changes(&self) -> watch::Receiver<bool> {
        self.blocked.clone()
    }

    /// Publishes awaiting pending confirms their callers stopped waiting for.
    pub fn late_confirms(&self) -> usize {
        self.late.load(Ordering::Acquire)
    }

    /// Channels open on this connection (idle or in use).
    pub fn channels_in_use(&self) -> usize {
        MAX_CHANNELS - self.permits.available_permits()
    }

    /// Publishes `message` on a channel of its own and waits for the confirm
    /// until `deadline`, or until the broker blocks the connection.
    pub async fn publish(
        self: &Arc<Self>,
        message: Outgoing<'_>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Attempt, PublishError> {
        if self.is_blocked() {
            return Err(PublishError::Blocked);
        }
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| PublishError::Timeout(timeout))?
            .map_err(|_| PublishError::NotConnected)?;
        let channel = match self.take_idle() {
            Some(channel) => channel,
            None => tokio::time::timeout_at(deadline, self.open_channel())
                .await
                .map_err(|_| PublishError::Timeout(timeout))??,
        };
        // Waiting for a channel may have taken long enough for an alarm.
        if self.is_blocked() {
            self.put_back(channel);
            return Err(PublishError::Blocked);
        }
        let mut confirm = channel
            .basic_publish(
                message.exchange.into(),
                message.routing_key.into(),
                BasicPublishOptions {
                    mandatory: message.mandatory,
                    ..BasicPublishOptions::default()
                },
                message.body,
                message.properties,
            )
            .await?;
        let mut blocked = self.blocked.clone();
        let became_blocked = async move {
            if blocked.wait_for(|b| *b).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            answer = &mut confirm => {
                let settled = settle(answer?)?;
                self.put_back(channel);
                drop(permit);
                Ok(Attempt::Settled(settled))
            }
            () = tokio::time::sleep_until(deadline) => {
                Ok(Attempt::Unconfirmed(self.park(confirm, channel, permit)))
            }
            () = became_blocked => {
                Ok(Attempt::Unconfirmed(self.park(confirm, channel, permit)))
            }
        }
    }

    /// Keeps waiting for `confirm` in the background; the channel returns to
    /// the pool once it has come.
    fn park(
        self: &Arc<Self>,
        confirm: PublisherConfirm,
        channel: Channel,
        permit: OwnedSemaphorePermit,
    ) -> LateConfirm {
        let (tx, rx) = oneshot::channel();
        let link = Arc::downgrade(self);
        let late = self.late.clone();
        let closed = self.closed.clone();
        late.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let answer = tokio::select! {
                answer = tokio::time::timeout(LATE_CONFIRM_MAX, confirm) => answer.ok(),
                () = closed.cancelled() => None,
            };
            let routed = matches!(answer, Some(Ok(Confirmation::Ack(None))));
            match (answer, link.upgrade()) {
                (Some(Ok(_)), Some(link)) => link.put_back(channel),
                _ => {
                    let _ = channel.close(200, "confirm abandoned".into()).await;
                }
            }
            late.fetch_sub(1, Ordering::AcqRel);
            drop(permit);
            let _ = tx.send(routed);
        });
        LateConfirm(rx)
    }

    /// Closes the connection (cleanly if it still works), bounded in time
    /// so a dead peer cannot hold up reconnection or shutdown.
    pub async fn close(&self) {
        self.closed.cancel();
        self.events.abort();
        let channels: Vec<Channel> = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        let close = async {
            for channel in channels {
                if channel.status().connected() {
                    let _ = channel.close(200, "shutdown".into()).await;
                }
            }
            if self.connection.status().connected() {
                let _ = self.connection.close(200, "shutdown".into()).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
}

fn settle(confirmation: Confirmation) -> Result<Settled, PublishError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(Settled::Routed),
        Confirmation::Ack(Some(_returned)) => Ok(Settled::Returned),
        Confirmation::Nack(_) => Ok(Settled::Nacked),
        // confirm_select runs before a channel enters the pool, so this
        // means the channel was replaced under us.
        Confirmation::NotRequested => Err(PublishError::NotConnected),
    }
}
