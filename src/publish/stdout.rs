//! The embedded demo sink: one JSON line per event on standard output, shaped
//! like the AMQP message (routing key, properties, headers, body).

use crate::config::render_routing_key;
use crate::message::Envelope;

use super::PublishError;

/// One JSON line per event on standard output.
#[derive(Debug, Default)]
pub struct StdoutSink {
    routing_key: String,
}

impl StdoutSink {
    /// A sink rendering routing keys from `routing_key_template`.
    pub fn new(routing_key_template: &str) -> Self {
        Self {
            routing_key: routing_key_template.to_string(),
        }
    }

    pub(super) fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        use std::io::Write as _;
        let body: serde_json::Value = serde_json::from_slice(&envelope.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&envelope.body).into_owned())
        });
        let line = serde_json::json!({
            "routing_key": render_routing_key(&self.routing_key, &envelope.status),
            "message_id": envelope.message_id,
            "type": envelope.message_type(),
            "headers": {
                "x-request-id": envelope.request_id,
                "x-received-at": envelope.received_at_rfc3339(),
                "x-dedup": envelope.dedup.as_str(),
            },
            "body": body,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    }
}
