//! One confirmed channel ("lane") with many publishes in flight, and its
//! sequencer: the task that tells every publish whether the broker routed it.
//!
//! AMQP 0-9-1 gives `basic.return` no delivery tag, and lapin hands a return
//! to whichever confirm it resolves next on the channel, so with several
//! mandatory publishes in flight a return can land on the wrong publish
//! (SPEC 4). Every publish therefore carries a unique [`PUBLISH_ID_HEADER`],
//! and a return is matched by that header, never by which confirm it came
//! with. What makes the match complete is the order in which the broker and
//! lapin work:
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

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{Health, Outgoing, Settled, Verdict};
use super::PublishError;

/// Longest the oldest confirm of a channel is waited for, counting only the
/// time the connection is not blocked (SPEC 4: a resource alarm, however
/// long, never gives up a publish in flight). Past it the channel is closed
/// (which settles its confirms as failed): the supervisor drops a connection
/// that stops confirming long before this.
const LATE_CONFIRM_MAX: Duration = Duration::from_secs(600);
/// The header that identifies one publish on its channel, so that a return
/// is matched to the publish it belongs to (SPEC 4). Consumers can ignore it.
pub const PUBLISH_ID_HEADER: &str = "x-publish-id";

/// Whether a publish's caller still waits: the one counter of late confirms
/// is kept exact by a single transition out of `WAITING`.
pub(super) const WAITING: u8 = 0;
pub(super) const LATE: u8 = 1;
const DECIDED: u8 = 2;

/// What a lane shares with its connection.
pub(super) struct LaneContext {
    /// Publishes whose caller stopped waiting and whose confirm is pending.
    pub late: Arc<AtomicUsize>,
    /// Cancelled when the connection is closed on purpose.
    pub closed: CancellationToken,
    /// The connection's blocked state: the confirm timer stands still
    /// while it is true.
    pub blocked: watch::Receiver<bool>,
    /// Told when the broker closes this channel; `None` for a lane whose
    /// failures must not touch the connection (the quarantine's).
    pub health: Option<Arc<Health>>,
}

/// One confirmed channel and the publishes in flight on it, oldest first.
pub(super) struct Lane {
    pub(super) channel: Channel,
    late: Arc<AtomicUsize>,
    health: Option<Arc<Health>>,
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

impl Lane {
    /// Wraps a channel already in confirm mode and starts its sequencer.
    pub(super) fn start(channel: Channel, context: LaneContext) -> Arc<Self> {
        let lane = Arc::new(Lane {
            channel,
            late: context.late.clone(),
            health: context.health,
            send: tokio::sync::Mutex::new(0),
            queue: Mutex::new(VecDeque::new()),
            pushed: Notify::new(),
        });
        tokio::spawn(
            lane.clone()
                .sequence(context.late, context.closed, context.blocked),
        );
        lane
    }

    /// Sends `message` with the next publish id and queues it for the
    /// sequencer, whose verdict goes to `reply`, unless `blocked()` says the
    /// broker blocks publishing by the time the lane is free. Owns what it
    /// sends, so that a caller that stops waiting hands the rest of the send
    /// to a task instead of dropping it half-way (lapin has registered the
    /// delivery tag and queued the frames before the socket write ends).
    pub(super) async fn send(
        self: Arc<Self>,
        message: Outgoing,
        reply: oneshot::Sender<Verdict>,
        caller: Arc<AtomicU8>,
        blocked: impl Fn() -> bool,
    ) -> Result<(), PublishError> {
        let sent = self.queue_publish(message, reply, &caller, blocked).await;
        if sent.is_err() && caller.swap(DECIDED, Ordering::AcqRel) == LATE {
            // Nothing reached the sequencer: its caller is told by the
            // dropped reply, and the late count must not keep it.
            self.late.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    async fn queue_publish(
        &self,
        message: Outgoing,
        reply: oneshot::Sender<Verdict>,
        caller: &Arc<AtomicU8>,
        blocked: impl Fn() -> bool,
    ) -> Result<(), PublishError> {
        {
            let mut next_id = self.send.lock().await;
            if blocked() {
                return Err(PublishError::Blocked);
            }
            let id = *next_id;
            *next_id += 1;
            let confirm = self
                .channel
                .basic_publish(
                    message.exchange,
                    message.routing_key,
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    with_publish_id(message.properties, id),
                )
                .await?;
            self.lock_queue().push_back(InFlight {
                id,
                confirm: Some(confirm),
                answer: None,
                reply,
                caller: caller.clone(),
            });
        }
        self.pushed.notify_one();
        Ok(())
    }

    /// Tells the connection's supervisor that the broker closed this
    /// channel (SPEC 4: every broker-side failure heals the same way).
    fn report_lost(&self, why: &dyn std::fmt::Display) {
        if let Some(health) = &self.health {
            health.report_lost(why);
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<InFlight>> {
        // A panic while holding this lock cannot leave the queue half-changed
        // (every change is one push or pop), so a poisoned lock is usable.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides every publish of this lane, in channel order, until the
    /// channel is gone and nothing is left to decide (see the module doc).
    async fn sequence(
        self: Arc<Self>,
        late: Arc<AtomicUsize>,
        closed: CancellationToken,
        blocked: watch::Receiver<bool>,
    ) {
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
                    if closed.is_cancelled() {
                        return;
                    }
                    if gone {
                        self.report_lost(&"channel closed while idle");
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
                        answer = within_unblocked(LATE_CONFIRM_MAX, confirm, blocked.clone()) => answer,
                        () = closed.cancelled() => None,
                    };
                    let answer = if let Some(result) = answer {
                        if let Err(e) = &result {
                            if !closed.is_cancelled() {
                                self.report_lost(e);
                            }
                        }
                        read(result, &mut returned)
                    } else {
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
                if let Some(result) = p
                    .confirm
                    .as_mut()
                    .and_then(futures_util::FutureExt::now_or_never)
                {
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

/// Runs `future` for at most `budget` of time during which `blocked` is
/// false: the clock stands still while the broker blocks the connection, so
/// a resource alarm of any length never runs a publish's timer out (SPEC 4).
/// `None` when the budget ran out first.
pub(super) async fn within_unblocked<F: Future>(
    budget: Duration,
    future: F,
    mut blocked: watch::Receiver<bool>,
) -> Option<F::Output> {
    tokio::pin!(future);
    let mut left = budget;
    loop {
        let is_blocked = *blocked.borrow_and_update();
        let started = Instant::now();
        let running = async {
            if is_blocked {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(left).await;
        };
        tokio::select! {
            biased;
            out = &mut future => return Some(out),
            changed = blocked.changed() => {
                if !is_blocked {
                    left = left.saturating_sub(started.elapsed());
                }
                if changed.is_err() {
                    // The connection's event reader is gone: no more blocks
                    // to wait out, only the time left.
                    return tokio::time::timeout(left, future).await.ok();
                }
            }
            () = running => return None,
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
        if let Some(id) = publish_id(&message.delivery.properties) {
            returned.insert(id);
        } else {
            tracing::warn!("the broker returned a message without a publish id");
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

    #[tokio::test(start_paused = true)]
    async fn the_confirm_timer_stands_still_while_the_connection_is_blocked() {
        let (tx, rx) = watch::channel(false);
        let never = std::future::pending::<()>();
        let started = Instant::now();
        let timer = tokio::spawn(within_unblocked(Duration::from_secs(600), never, rx));
        // 100 s unblocked, then an alarm of an hour, then the rest.
        tokio::time::sleep(Duration::from_secs(100)).await;
        tx.send_replace(true);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!timer.is_finished(), "the timer ran out during the block");
        tx.send_replace(false);
        assert_eq!(timer.await.unwrap(), None);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(4200) && took < Duration::from_secs(4201),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_finishes_during_a_block_is_returned() {
        let (tx, rx) = watch::channel(true);
        let done = async {
            tokio::time::sleep(Duration::from_secs(5000)).await;
            7
        };
        assert_eq!(
            within_unblocked(Duration::from_secs(10), done, rx).await,
            Some(7)
        );
        drop(tx);
        let (tx, rx) = watch::channel(false);
        drop(tx);
        let never = std::future::pending::<()>();
        assert_eq!(
            within_unblocked(Duration::from_secs(1), never, rx).await,
            None
        );
    }

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
