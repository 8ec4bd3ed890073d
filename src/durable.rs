//! Making one event durable: publish it with a confirm, or, when the broker
//! cannot take it, append it to the spool (SPEC 4, 5). The webhook and the
//! lifecycle API's events (SPEC 9.3) share this one function, so every
//! message has the same guarantee.

use crate::message::Envelope;
use crate::publish::Sink;
use crate::spool::{Spool, Spooled};

/// Where a durable event is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Confirmed (and routed) by the broker.
    Published,
    /// Fsynced in the spool; the drainer publishes it later.
    Queued,
}

/// The event is neither confirmed nor spooled; nothing is half-done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotDurable(pub String);

/// Publishes with confirm, or spools when the broker cannot take the event.
pub async fn make_durable(
    sink: &Sink,
    spool: Option<&Spool>,
    envelope: &Envelope,
) -> Result<Durable, NotDurable> {
    let publish_error = match sink.publish(envelope).await {
        Ok(()) => return Ok(Durable::Published),
        Err(e) => e,
    };
    let Some(spool) = spool else {
        return Err(NotDurable(format!("{publish_error}; spool disabled")));
    };
    let reason = publish_error.to_string();
    match spool.append(envelope, Spooled::after(publish_error)).await {
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
