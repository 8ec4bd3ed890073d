//! The embedded demo sink: one JSON line per event on standard output, shaped
//! like the AMQP message (routing key, properties, headers, body).

use super::broker::RoutingKey;
use crate::message::Envelope;

use super::PublishError;

/// One JSON line per event on standard output.
#[derive(Debug)]
pub struct StdoutSink {
    /// `amqp.routing_key`: each line shows the key the broker would see.
    routing_key: RoutingKey,
}

impl StdoutSink {
    /// A sink rendering routing keys from `routing_key`.
    pub fn new(routing_key: RoutingKey) -> Self {
        Self { routing_key }
    }

    /// The routing key `envelope` would be published with.
    pub fn routing_key(&self, envelope: &Envelope) -> String {
        self.routing_key.render(&envelope.status)
    }

    pub(super) fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        use std::io::Write as _;
        let body: serde_json::Value = serde_json::from_slice(&envelope.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&envelope.body).into_owned())
        });
        let mut headers = serde_json::json!({
            "x-request-id": envelope.request_id,
            "x-received-at": envelope.received_at_rfc3339(),
            "x-verification-id": envelope.verification_id(),
        });
        if let Some(dedup) = envelope.dedup.header() {
            headers["x-dedup"] = dedup.into();
        }
        if let Some(matched) = envelope.phone_match {
            headers["x-phone-match"] = matched.to_string().into();
        }
        let line = serde_json::json!({
            "routing_key": self.routing_key(envelope),
            "message_id": envelope.message_id,
            "type": envelope.message_type(),
            "headers": headers,
            "body": body,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    }
}
