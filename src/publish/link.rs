//! One broker connection, its few confirmed channels ("lanes") with many
//! publishes in flight on each, and the sequencer that tells every publish
//! whether the broker routed it.
//!
//! Why a sequencer: AMQP 0-9-1 gives `basic.return` no delivery tag, and lapin
//! hands a return to whichever confirm it resolves next on the channel, so
//! with several mandatory publishes in flight a return can land on the wrong
//! publish (SPEC 4). Every publish therefore carries a unique
//! [`PUBLISH_ID_HEADER`], and a return is matched by that header, never by
//! which confirm it came with. What makes the match complete is the order in
//! which the broker and lapin work:
//! - on one channel the broker sends a message's return before its ack, and
//!   acks (single or `multiple`) in delivery-tag order;
//! - lapin attaches the oldest waiting return to each confirm as it resolves
//!   it, one frame at a time under its acknowledgement lock.
//!
//! So once a publish and every publish before it on the channel have
//! resolved, its return (if any) has already been attached to some confirm
//! that has resolved by then: an earlier one, or a later one acked by the
//! same `multiple` frame. The sequencer waits for the oldest publish, sweeps
//! every confirm already resolved for the returns they carry, and only then
//! decides, in channel order. Nothing waits on a lock per publish and many
//! publishes stay in flight (SPEC 4 asks for no global lock).
//!
//! A publish whose confirm has not come by its caller's deadline (or that was
//! in flight when the broker blocked the connection) is not abandoned: the
//! sequencer still decides it when the broker answers, and the caller holds a
//! [`LateConfirm`] that tells it, later, whether the message was routed.
//! Nothing is left in lapin's dropped-confirm list.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event, PublisherConfirm};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::PublishError;

/// Channels publishing at once on one connection. Each one carries many
/// publishes in flight; more than one spreads the broker's per-channel work
/// over several of its processes and keeps one slow frame write from holding
/// up every publish.
const LANES: usize = 4;
/// Longest the oldest confirm of a channel is waited for. Past it the channel
/// is closed (which settles its confirms as failed): the supervisor drops a
/// connection that stops confirming long before this.
const LATE_CONFIRM_MAX: Duration = Duration::from_secs(600);
/// The header that identifies one publish on its channel, so that a return
/// is matched to the publish it belongs to (SPEC 4). Consumers can ignore it.
pub const PUBLISH_ID_HEADER: &str = "x-publish-id";

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
type Verdict = Result<Settled, lapin::Error>;

/// The outcome of a publish whose confirm was still pending when its caller
/// stopped waiting. Resolves once the broker answers or the connection dies.
pub struct LateConfirm(oneshot::Receiver<Verdict>);

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

/// Whether a publish's caller still waits: the one counter of late confirms
/// is kept exact by a single transition out of `WAITING`.
const WAITING: u8 = 0;
const LATE: u8 = 1;
const DECIDED: u8 = 2;

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

/// One confirmed channel and the publishes in flight on it, oldest first.
struct Lane {
    channel: Channel,
    /// Held while a publish is sent and queued, so the queue's order is the
    /// channel's delivery-tag order; holds the next publish id.
    send: tokio::sync::Mutex<u64>,
    /// Publishes sent and not yet decided, in delivery-tag order.
    queue: Mutex<VecDeque<InFlight>>,
    /// Wakes the sequencer when the queue was empty.
    pushed: Notify,
}

/// One publish awaiting its verdict.
struct InFlight {
    id: u64,
    /// Taken by the sequencer (oldest publish) or a sweep once resolved.
    confirm: Option<PublisherConfirm>,
    /// The broker's answer, once known; the return it carried is recorded
    /// separately, by publish id.
    answer: Option<Answer>,
    reply: oneshot::Sender<Verdict>,
    caller: Arc<AtomicU8>,
}

enum Answer {
    Ack,
    Nack,
    Failed(lapin::Error),
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
        let lane = Arc::new(Lane {
            channel,
            send: tokio::sync::Mutex::new(0),
            queue: Mutex::new(VecDeque::new()),
            pushed: Notify::new(),
        });
        tokio::spawn(
            lane.clone()
                .sequence(self.late.clone(), self.closed.clone()),
        );
        Ok(lane)
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
        let (reply, mut verdict) = oneshot::channel();
        let caller = Arc::new(AtomicU8::new(WAITING));
        {
            let mut next_id = tokio::time::timeout_at(deadline, lane.send.lock())
                .await
                .map_err(|_| PublishError::Timeout(timeout))?;
            // Waiting for the lane may have taken long enough for an alarm.
            if self.is_blocked() {
                return Err(PublishError::Blocked);
            }
            let id = *next_id;
            *next_id += 1;
            let confirm = lane
                .channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    message.body,
                    with_publish_id(message.properties, id),
                )
                .await?;
            lane.lock_queue().push_back(InFlight {
                id,
                confirm: Some(confirm),
                answer: None,
                reply,
                caller: caller.clone(),
            });
        }
        lane.pushed.notify_one();
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

impl Lane {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<InFlight>> {
        // A panic while holding this lock cannot leave the queue half-changed
        // (every change is one push or pop), so a poisoned lock is usable.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides every publish of this lane, in channel order, until the
    /// channel is gone and nothing is left to decide (see the module doc).
    async fn sequence(self: Arc<Self>, late: Arc<AtomicUsize>, closed: CancellationToken) {
        // Ids of publishes seen returned and not yet decided.
        let mut returned: HashSet<u64> = HashSet::new();
        loop {
            let oldest = self
                .lock_queue()
                .front_mut()
                .map(|p| (p.confirm.take(), p.answer.is_some()));
            match oldest {
                None => {
                    let gone = {
                        let _send = self.send.lock().await;
                        !self.channel.status().connected() && self.lock_queue().is_empty()
                    };
                    if gone || closed.is_cancelled() {
                        return;
                    }
                    tokio::select! {
                        () = self.pushed.notified() => {}
                        () = closed.cancelled() => {}
                        // A channel that dies idle is noticed here.
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    continue;
                }
                Some((Some(confirm), _)) => {
                    let answer = tokio::select! {
                        answer = tokio::time::timeout(LATE_CONFIRM_MAX, confirm) => answer.ok(),
                        () = closed.cancelled() => None,
                    };
                    let answer = match answer {
                        Some(result) => read(result, &mut returned),
                        None => {
                            // Closing the channel rejects every confirm on it
                            // (on shutdown, `Link::close` closes it).
                            if !closed.is_cancelled() {
                                let _ = self.channel.close(200, "confirm abandoned".into()).await;
                            }
                            Answer::Failed(
                                lapin::ErrorKind::InvalidChannelState(
                                    lapin::ChannelState::Closed,
                                    "confirm abandoned",
                                )
                                .into(),
                            )
                        }
                    };
                    if let Some(p) = self.lock_queue().front_mut() {
                        p.answer = Some(answer);
                    }
                }
                Some((None, _)) => {}
            }
            // No publish may be half-queued while the sweep runs: a confirm
            // resolved but not yet queued could hold the return we look for.
            let _send = self.send.lock().await;
            let mut queue = self.lock_queue();
            for p in queue.iter_mut().filter(|p| p.answer.is_none()) {
                if let Some(result) = p.confirm.as_mut().and_then(|c| c.now_or_never()) {
                    p.confirm = None;
                    p.answer = Some(read(result, &mut returned));
                }
            }
            while queue.front().is_some_and(|p| p.answer.is_some()) {
                let Some(p) = queue.pop_front() else { break };
                let verdict = match p.answer {
                    Some(Answer::Ack) if returned.remove(&p.id) => Ok(Settled::Returned),
                    Some(Answer::Ack) => Ok(Settled::Routed),
                    Some(Answer::Nack) => {
                        returned.remove(&p.id);
                        Ok(Settled::Nacked)
                    }
                    Some(Answer::Failed(e)) => Err(e),
                    None => continue,
                };
                if p.caller.swap(DECIDED, Ordering::AcqRel) == LATE {
                    late.fetch_sub(1, Ordering::AcqRel);
                }
                let _ = p.reply.send(verdict);
            }
            if queue.is_empty() {
                // Every return belongs to a publish in the queue; anything
                // left would be a return for a message we never sent.
                returned.clear();
            }
        }
    }
}

/// The answer of one confirm, recording the return it carries (which may
/// belong to another publish) by its publish id.
fn read(result: Result<Confirmation, lapin::Error>, returned: &mut HashSet<u64>) -> Answer {
    let (answer, message) = match result {
        Ok(Confirmation::Ack(message)) => (Answer::Ack, message),
        Ok(Confirmation::Nack(message)) => (Answer::Nack, message),
        // confirm_select runs before a lane takes publishes.
        Ok(Confirmation::NotRequested) => {
            return Answer::Failed(
                lapin::ErrorKind::InvalidChannelState(
                    lapin::ChannelState::Closed,
                    "channel not in confirm mode",
                )
                .into(),
            );
        }
        Err(e) => return Answer::Failed(e),
    };
    if let Some(message) = message {
        match publish_id(&message.delivery.properties) {
            Some(id) => {
                returned.insert(id);
            }
            None => tracing::warn!("the broker returned a message without a publish id"),
        }
    }
    answer
}

fn with_publish_id(properties: BasicProperties, id: u64) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        PUBLISH_ID_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(id).unwrap_or(i64::MAX)),
    );
    properties.with_headers(headers)
}

fn publish_id(properties: &BasicProperties) -> Option<u64> {
    let headers: &FieldTable = properties.headers().as_ref()?;
    match headers.inner().get(PUBLISH_ID_HEADER)? {
        AMQPValue::LongLongInt(id) => u64::try_from(*id).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publish_id_survives_the_round_trip_through_properties() {
        let mut headers = FieldTable::default();
        headers.insert("x-request-id".into(), AMQPValue::LongLongInt(1));
        let properties = with_publish_id(BasicProperties::default().with_headers(headers), 42);
        assert_eq!(publish_id(&properties), Some(42));
        let kept = properties.headers().as_ref().unwrap();
        assert!(kept.inner().contains_key("x-request-id"));
        assert_eq!(publish_id(&BasicProperties::default()), None);
    }
}
