//! One broker connection and its few confirmed channels ("lanes"), with many
//! publishes in flight on each; the lane's sequencer tells every publish
//! whether the broker routed it.
//!
//! Why several publishes in flight per channel are safe although AMQP 0-9-1
//! gives `basic.return` no delivery tag: every publish carries a unique
//! `x-publish-id`, and each channel's sequencer (`lane`) matches returns by
//! it and decides in delivery-tag order (SPEC 4).
//!
//! A publish is decided once, by the broker (SPEC 4). One whose confirm has
//! not come by its caller's deadline (or that was in flight when the broker
//! blocked the connection) is not abandoned: a send still under way goes on
//! in a task of its own, the sequencer still decides it when the broker
//! answers, and the caller holds a [`LateConfirm`] that tells it, later,
//! whether the message was routed. Nothing is left in lapin's
//! dropped-confirm list.
//!
//! A channel the broker closes (a deleted exchange: 404; 406, 403, ...) is
//! reported to the supervisor through [`Health`] instead of being reopened
//! here, so that it heals the way a lost connection does: reconnect and
//! declare the topology again. The quarantine has a lane of its own whose
//! failures touch nothing else.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, Event};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lane::{Lane, LaneContext, LATE, WAITING};
use super::PublishError;

/// Channels publishing at once on one connection. Each one carries many
/// publishes in flight; more than one spreads the broker's per-channel work
/// over several of its processes and keeps one slow frame write from holding
/// up every publish.
const LANES: usize = 4;
/// A message to publish; owned, so that its send can outlive its caller.
pub(super) struct Outgoing {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub mandatory: bool,
    pub body: Bytes,
    pub properties: BasicProperties,
}

/// Which lanes a publish takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// The events' lanes.
    Events,
    /// The quarantine's lane: a missing quarantine exchange closes only it.
    Quarantine,
}

/// Whether the broker has closed one of the events' channels; read by the
/// supervisor, which then reconnects.
#[derive(Default)]
pub(super) struct Health {
    lost: AtomicBool,
    changed: Notify,
}

impl Health {
    /// Records the first channel loss and wakes the supervisor.
    pub(super) fn report_lost(&self, why: &dyn std::fmt::Display) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %why, "the broker closed a publishing channel; reconnecting");
            self.changed.notify_one();
        }
    }
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
    /// Each lane's channel, opened with the connection. A lane whose
    /// channel dies is not reopened: the whole link is replaced.
    lanes: Vec<Arc<Lane>>,
    /// The quarantine's lane, opened on first use and again after the
    /// broker closed it; the async lock serialises reopening.
    quarantine: tokio::sync::Mutex<Option<Arc<Lane>>>,
    /// Channel losses, for the supervisor.
    health: Arc<Health>,
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
        let late = Arc::new(AtomicUsize::new(0));
        let closed = CancellationToken::new();
        let health = Arc::new(Health::default());
        let context = |health: Option<&Arc<Health>>| LaneContext {
            late: late.clone(),
            closed: closed.clone(),
            blocked: blocked.clone(),
            health: health.cloned(),
        };
        let mut lanes = Vec::with_capacity(LANES);
        let first = open_lane(&connection, context(Some(&health))).await?;
        prepare(&first.channel).await?;
        lanes.push(first);
        while lanes.len() < LANES {
            lanes.push(open_lane(&connection, context(Some(&health))).await?);
        }
        Ok(Arc::new(Self {
            connection,
            lanes,
            quarantine: tokio::sync::Mutex::new(None),
            health,
            next_lane: AtomicUsize::new(0),
            blocked,
            late,
            events,
            closed,
        }))
    }

    /// The lane for the next publish of `route`, with a live channel.
    async fn lane(&self, route: Route) -> Result<Arc<Lane>, PublishError> {
        if !self.is_open() {
            return Err(PublishError::NotConnected);
        }
        if route == Route::Quarantine {
            let mut slot = self.quarantine.lock().await;
            if let Some(lane) = slot.as_ref().filter(|l| l.channel.status().connected()) {
                return Ok(lane.clone());
            }
            let context = LaneContext {
                late: self.late.clone(),
                closed: self.closed.clone(),
                blocked: self.blocked.clone(),
                health: None,
            };
            let lane = open_lane(&self.connection, context).await?;
            *slot = Some(lane.clone());
            return Ok(lane);
        }
        let turn = self.next_lane.fetch_add(1, Ordering::Relaxed) % LANES;
        let lane = &self.lanes[turn];
        if lane.channel.status().connected() {
            Ok(lane.clone())
        } else {
            self.health.report_lost(&"publishing channel closed");
            Err(PublishError::NotConnected)
        }
    }

    /// True while the connection is open (blocked or not).
    pub fn is_open(&self) -> bool {
        self.connection.status().connected()
    }

    /// True once the broker closed one of the events' channels: the link
    /// must be replaced (reconnect, declare the topology again).
    pub fn is_lost(&self) -> bool {
        self.health.lost.load(Ordering::Acquire)
    }

    /// Resolves when [`Self::is_lost`] may have changed.
    pub async fn lost_changed(&self) {
        self.health.changed.notified().await;
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

    /// Publishes `message` on a lane of `route` and waits for its verdict
    /// until `deadline`, or until the broker blocks the connection. Past
    /// either the caller stops waiting but the publish is not given up: a
    /// send under way finishes in a task, and the verdict comes to the
    /// returned [`LateConfirm`].
    pub async fn publish(
        self: &Arc<Self>,
        message: Outgoing,
        route: Route,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Attempt, PublishError> {
        if self.is_blocked() {
            return Err(PublishError::Blocked);
        }
        // Nothing is published yet while waiting for a lane: dropping this
        // wait loses nothing.
        let lane = tokio::time::timeout_at(deadline, self.lane(route))
            .await
            .map_err(|_| PublishError::Timeout(timeout))??;
        let (reply, mut verdict) = oneshot::channel();
        let caller = Arc::new(AtomicU8::new(WAITING));
        let link = self.clone();
        // Waiting for the lane may have taken long enough for an alarm.
        let mut send =
            Box::pin(lane.send(message, reply, caller.clone(), move || link.is_blocked()));
        tokio::select! {
            biased;
            sent = &mut send => sent?,
            () = tokio::time::sleep_until(deadline) => {
                tokio::spawn(send);
                return Ok(Attempt::Unconfirmed(self.late(verdict, &caller)));
            }
            () = became_blocked(self.blocked.clone()) => {
                tokio::spawn(send);
                return Ok(Attempt::Unconfirmed(self.late(verdict, &caller)));
            }
        }
        tokio::select! {
            biased;
            answer = &mut verdict => match answer {
                Ok(Ok(settled)) => Ok(Attempt::Settled(settled)),
                Ok(Err(e)) => Err(PublishError::Broker(e)),
                Err(_) => Err(PublishError::NotConnected),
            },
            () = tokio::time::sleep_until(deadline) => Ok(Attempt::Unconfirmed(self.late(verdict, &caller))),
            () = became_blocked(self.blocked.clone()) => Ok(Attempt::Unconfirmed(self.late(verdict, &caller))),
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
            let quarantine = self.quarantine.lock().await.take();
            for lane in self.lanes.iter().chain(quarantine.as_ref()) {
                if lane.channel.status().connected() {
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

async fn open_lane(
    connection: &Connection,
    context: LaneContext,
) -> Result<Arc<Lane>, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(Lane::start(channel, context))
}

/// Resolves once the broker blocks the connection (never, once the
/// connection's event reader is gone).
async fn became_blocked(mut blocked: watch::Receiver<bool>) {
    if blocked.wait_for(|b| *b).await.is_err() {
        std::future::pending::<()>().await;
    }
}
