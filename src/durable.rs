//! Making one event durable: publish it with a confirm, or, when the broker
//! cannot take it, append it to the spool (SPEC 4, 5). The webhook and the
//! lifecycle API's events (SPEC 9.3) share this one function, so every
//! message has the same guarantee.

use std::time::Instant;

use crate::message::Envelope;
use crate::metrics::{Metrics, Stage};
use crate::publish::{Delivered, Sink};
use crate::spool::{Spool, Spooled};

/// Where a durable event is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Confirmed (and routed) by the broker.
    Published,
    /// Confirmed, returned as unroutable and let go
    /// (`amqp.on_unroutable = "drop"`): no queue has it.
    Dropped,
    /// Fsynced in the spool; the drainer publishes it later.
    Queued,
}

/// The event is neither confirmed nor spooled; nothing is half-done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotDurable(pub String);

/// Publishes with confirm, or spools when the broker cannot take the event.
/// `stages`: where the webhook times its publish and spool stages
/// (`stage_duration_seconds`); `None` for lifecycle events, which are not
/// part of a webhook's pipeline.
#[tracing::instrument(name = "make_durable", level = "debug", skip_all, fields(message_id = envelope.message_id.as_str()))]
pub async fn make_durable(
    sink: &Sink,
    spool: Option<&Spool>,
    envelope: &Envelope,
    stages: Option<&Metrics>,
) -> Result<Durable, NotDurable> {
    let publish_started = Instant::now();
    let published = sink.publish(envelope).await;
    if let Some(metrics) = stages {
        metrics.stage(Stage::Publish, publish_started.elapsed());
    }
    let publish_error = match published {
        Ok(Delivered::Routed) => return Ok(Durable::Published),
        Ok(Delivered::Dropped) => return Ok(Durable::Dropped),
        Err(e) => e,
    };
    let Some(spool) = spool else {
        return Err(NotDurable(format!("{publish_error}; spool disabled")));
    };
    let reason = publish_error.to_string();
    let spool_started = Instant::now();
    let appended = spool.append(envelope, Spooled::after(publish_error)).await;
    if let Some(metrics) = stages {
        metrics.stage(Stage::Spool, spool_started.elapsed());
    }
    match appended {
        Ok(()) => {
            tracing::warn!(
                request_id = envelope.request_id,
                message_id = envelope.message_id,
                error = reason,
                "broker could not take the event; spooled"
            );
            Ok(Durable::Queued)
        }
        Err(spool_error) => Err(NotDurable(format!("{reason}; {spool_error}"))),
    }
}
