//! One broker connection and its few confirmed channels ("lanes"), with many
//! publishes in flight on each; the lane's sequencer tells every publish
//! whether the broker routed it.
//!
//! Why several publishes in flight per channel are safe although AMQP 0-9-1
//! gives `basic.return` no delivery tag: every publish carries a unique
//! `x-publish-id`, and each channel's sequencer (`lane`) matches returns by
//! it and decides in delivery-tag order (SPEC 4).
//!
//! A publish whose confirm has not come by its caller's deadline (or that was
//! in flight when the broker blocked the connection) is not abandoned: the
//! sequencer still decides it when the broker answers, and the caller holds a
//! [`LateConfirm`] that tells it, later, whether the message was routed.
//! Nothing is left in lapin's dropped-confirm list.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection, Event};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lane::{Lane, Sent, LATE, WAITING};
use super::PublishError;

/// Channels publishing at once on one connection. Each one carries many
/// publishes in flight; more than one spreads the broker's per-channel work
/// over several of its processes and keeps one slow frame write from holding
/// up every publish.
const LANES: usize = 4;
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

/// What the sequencer tells the publisher of one message.
pub(super) type Verdict = Result<Settled, lapin::Error>;

/// The outcome of a publish whose confirm was still pending when its caller
/// stopped waiting. Resolves once the broker answers or the connection dies.
pub struct LateConfirm(pub(super) oneshot::Receiver<Verdict>);

impl LateConfirm {
    /// True when the broker acked the message without returning it; false
    /// for a nack, a return, or a connection lost before the answer.
    pub async fn routed(self) -> bool {
        matches!(self.0.await, Ok(Ok(Settled::Routed)))
    }
}

impl std::fmt::Debug for LateConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LateConfirm")
    }
}

/// One open connection with its lanes.
pub(super) struct Link {
    connection: Connection,
    /// Each lane's current channel; replaced when its channel dies. The
    /// async lock serialises reopening, never a publish.
    lanes: Vec<tokio::sync::Mutex<Option<Arc<Lane>>>>,
    /// Round-robin cursor over `lanes`.
    next_lane: AtomicUsize,
    /// Whether the broker has blocked this connection (resource alarm);
    /// written only by the task reading the connection's events.
    blocked: watch::Receiver<bool>,
    /// Publishes whose caller stopped waiting and whose confirm is pending.
    late: Arc<AtomicUsize>,
    events: JoinHandle<()>,
    /// Cancelled by [`Link::close`]: pending confirms settle as not routed
    /// instead of waiting on a connection that is going away.
    closed: CancellationToken,
}

impl Link {
    /// Opens a connection, runs `prepare` on its first channel (topology),
    /// and opens the lanes.
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
            lanes: (0..LANES).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next_lane: AtomicUsize::new(0),
            blocked,
            late: Arc::new(AtomicUsize::new(0)),
            events,
            closed: CancellationToken::new(),
        });
        let first = link.open_lane().await?;
        prepare(&first.channel).await?;
        *link.lanes[0].lock().await = Some(first);
        for slot in &link.lanes[1..] {
            *slot.lock().await = Some(link.open_lane().await?);
        }
        Ok(link)
    }

    async fn open_lane(&self) -> Result<Arc<Lane>, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Lane::start(channel, self.late.clone(), self.closed.clone()))
    }

    /// The next lane in turn, with a live channel.
    async fn lane(&self) -> Result<Arc<Lane>, PublishError> {
        let turn = self.next_lane.fetch_add(1, Ordering::Relaxed) % LANES;
        let mut slot = self.lanes[turn].lock().await;
        if let Some(lane) = slot.as_ref().filter(|l| l.channel.status().connected()) {
            return Ok(lane.clone());
        }
        if !self.is_open() {
            return Err(PublishError::NotConnected);
        }
        let lane = self.open_lane().await?;
        *slot = Some(lane.clone());
        Ok(lane)
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

    /// Publishes `message` and waits for its verdict until `deadline`, or
    /// until the broker blocks the connection.
    pub async fn publish(
        self: &Arc<Self>,
        message: Outgoing<'_>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Attempt, PublishError> {
        if self.is_blocked() {
            return Err(PublishError::Blocked);
        }
        let lane = tokio::time::timeout_at(deadline, self.lane())
            .await
            .map_err(|_| PublishError::Timeout(timeout))??;
        // Waiting for the lane may have taken long enough for an alarm.
        let sent = tokio::time::timeout_at(deadline, lane.send(message, || self.is_blocked()))
            .await
            .map_err(|_| PublishError::Timeout(timeout))??;
        let Sent {
            mut verdict,
            caller,
        } = sent;
        let mut blocked = self.blocked.clone();
        let became_blocked = async move {
            if blocked.wait_for(|b| *b).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            answer = &mut verdict => match answer {
                Ok(Ok(settled)) => Ok(Attempt::Settled(settled)),
                Ok(Err(e)) => Err(PublishError::Broker(e)),
                Err(_) => Err(PublishError::NotConnected),
            },
            () = tokio::time::sleep_until(deadline) => Ok(Attempt::Unconfirmed(self.late(verdict, &caller))),
            () = became_blocked => Ok(Attempt::Unconfirmed(self.late(verdict, &caller))),
        }
    }

    fn late(&self, verdict: oneshot::Receiver<Verdict>, caller: &AtomicU8) -> LateConfirm {
        if caller
            .compare_exchange(WAITING, LATE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.late.fetch_add(1, Ordering::AcqRel);
        }
        LateConfirm(verdict)
    }

    /// Closes the connection (cleanly if it still works), bounded in time
    /// so a dead peer cannot hold up reconnection or shutdown.
    pub async fn close(&self) {
        self.closed.cancel();
        self.events.abort();
        let close = async {
            for slot in &self.lanes {
                let lane = slot.lock().await.take();
                if let Some(lane) = lane.filter(|l| l.channel.status().connected()) {
                    let _ = lane.channel.close(200, "shutdown".into()).await;
                }
            }
            if self.connection.status().connected() {
                let _ = self.connection.close(200, "shutdown".into()).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
}
