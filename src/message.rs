//! The message record: everything needed to publish one accepted event, now
//! or later from the spool. The AMQP publisher, the stdout sink and the spool
//! all carry this one type, so a spooled event is published exactly as a live
//! one would have been.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Whether the dedup check ran for an event (`x-dedup` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMark {
    /// The dedup store was asked and the id was claimed.
    Checked,
    /// The dedup store was unavailable (`dedup.on_unavailable = "publish"`).
    Skipped,
    /// A lifecycle event (`pending`, `expired`: SPEC 9.3): no dedup ran, and
    /// the message carries no `x-dedup` header.
    Omitted,
}

impl DedupMark {
    /// The `x-dedup` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DedupMark::Checked => "checked",
            DedupMark::Skipped => "skipped",
            DedupMark::Omitted => "",
        }
    }

    /// The `x-dedup` header value, `None` when the header is left out.
    pub fn header(self) -> Option<&'static str> {
        match self {
            DedupMark::Omitted => None,
            other => Some(other.as_str()),
        }
    }
}

/// One event to publish. Serialized as JSON into the spool, so field names
/// are part of the on-disk format: add fields with `#[serde(default)]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The webhook's raw body, published byte for byte.
    #[serde(with = "base64_bytes")]
    pub body: Bytes,
    /// The `message_id` property: the verification id.
    pub message_id: String,
    /// The event status; renders the routing key and the `type` property.
    pub status: String,
    /// The `x-request-id` header.
    pub request_id: String,
    /// Receive time, Unix milliseconds.
    pub received_at_ms: u64,
    /// The `x-dedup` header.
    pub dedup: DedupMark,
    /// The `x-verification-id` header; `None` in entries spooled before it
    /// existed, which then fall back to `message_id` (the id itself).
    #[serde(default)]
    pub verification_id: Option<String>,
    /// The `x-phone-match` header: set only on a verified message whose id
    /// was created through the lifecycle API (SPEC 9.3).
    #[serde(default)]
    pub phone_match: Option<bool>,
}

impl Envelope {
    /// `x-verification-id`: every message carries it (SPEC 9.3).
    pub fn verification_id(&self) -> &str {
        self.verification_id.as_deref().unwrap_or(&self.message_id)
    }

    /// `x-received-at`: RFC 3339 with milliseconds, UTC.
    pub fn received_at_rfc3339(&self) -> String {
        rfc3339(self.received_at_ms)
    }

    /// The `type` property: `sendtalk.verification.<status>`.
    pub fn message_type(&self) -> String {
        format!("sendtalk.verification.{}", self.status)
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds
/// (`2023-08-24T03:20:05.385Z`): the form of `x-received-at` and of the
/// lifecycle API's timestamps.
pub fn rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A verified event as the unit tests of other modules use it.
    pub(crate) fn envelope() -> Envelope {
        Envelope {
            body: Bytes::from_static(b"{\"id\":\"x\"}"),
            message_id: "x".into(),
            status: "verified".into(),
            request_id: "r".into(),
            received_at_ms: 1_692_847_205_385,
            dedup: DedupMark::Checked,
            verification_id: None,
            phone_match: None,
        }
    }

    #[test]
    fn received_at_is_rfc3339_with_milliseconds() {
        assert_eq!(envelope().received_at_rfc3339(), "2023-08-24T03:20:05.385Z");
    }

    #[test]
    fn envelopes_round_trip_through_json_byte_for_byte() {
        let e = envelope();
        let back: Envelope = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(back.body, e.body);
        assert_eq!(back.dedup, DedupMark::Checked);
    }
}
