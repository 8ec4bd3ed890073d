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
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::link::{Outgoing, Settled, Verdict};
use super::PublishError;

/// Longest the oldest confirm of a channel is waited for. Past it the channel
/// is closed (which settles its confirms as failed): the supervisor drops a
/// connection that stops confirming long before this.
const LATE_CONFIRM_MAX: Duration = Duration::from_secs(600);
/// The header that identifies one publish on its channel, so that a return
/// is matched to the publish it belongs to (SPEC 4). Consumers can ignore it.
pub const PUBLISH_ID_HEADER: &str = "x-publish-id";

/// Whether a publish's caller still waits: the one counter of late confirms
/// is kept exact by a single transition out of `WAITING`.
pub(super) const WAITING: u8 = 0;
pub(super) const LATE: u8 = 1;
const DECIDED: u8 = 2;

/// A publish sent and queued: where its verdict comes, and the flag its
/// caller sets when it stops waiting.
pub(super) struct Sent {
    pub verdict: oneshot::Receiver<Verdict>,
    pub caller: Arc<AtomicU8>,
}

/// One confirmed channel and the publishes in flight on it, oldest first.
pub(super) struct Lane {
    pub(super) channel: Channel,
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
    pub(super) fn start(
        channel: Channel,
        late: Arc<AtomicUsize>,
        closed: CancellationToken,
    ) -> Arc<Self> {
        let lane = Arc::new(Lane {
            channel,
            send: tokio::sync::Mutex::new(0),
            queue: Mutex::new(VecDeque::new()),
            pushed: Notify::new(),
        });
        tokio::spawn(lane.clone().sequence(late, closed));
        lane
    }

    /// Sends `message` with the next publish id and queues it for the
    /// sequencer, unless `blocked()` says the broker blocks publishing by the
    /// time the lane is free.
    pub(super) async fn send(
        &self,
        message: Outgoing<'_>,
        blocked: impl Fn() -> bool,
    ) -> Result<Sent, PublishError> {
        let (reply, verdict) = oneshot::channel();
        let caller = Arc::new(AtomicU8::new(WAITING));
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
            self.lock_queue().push_back(InFlight {
                id,
                confirm: Some(confirm),
                answer: None,
                reply,
                caller: caller.clone(),
            });
        }
        self.pushed.notify_one();
        Ok(Sent { verdict, caller })
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
                    let answer = if let Some(result) = answer {
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
