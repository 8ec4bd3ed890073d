//! The AMQP properties and headers every event is published with (SPEC 4,
//! SPEC 9.3): the message contract queue consumers rely on.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use super::amqp::APP_ID;
use crate::message::Envelope;

/// The AMQP properties and headers of SPEC 4.
pub(super) fn properties(envelope: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-request-id".into(),
        AMQPValue::LongString(LongString::from(envelope.request_id.as_str())),
    );
    headers.insert(
        "x-received-at".into(),
        AMQPValue::LongString(LongString::from(envelope.received_at_rfc3339())),
    );
    if let Some(dedup) = envelope.dedup.header() {
        headers.insert(
            "x-dedup".into(),
            AMQPValue::LongString(LongString::from(dedup)),
        );
    }
    // Lifecycle headers (SPEC 9.3).
    headers.insert(
        "x-verification-id".into(),
        AMQPValue::LongString(LongString::from(envelope.verification_id())),
    );
    if let Some(matched) = envelope.phone_match {
        headers.insert(
            "x-phone-match".into(),
            AMQPValue::LongString(LongString::from(if matched { "true" } else { "false" })),
        );
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(envelope.message_id.as_str()))
        .with_timestamp(envelope.received_at_ms / 1000)
        .with_type(ShortString::from(envelope.message_type()))
        .with_app_id(APP_ID.into())
        .with_headers(headers)
}

/// [`properties`] as JSON, field for field: what an operator is shown of a
/// spooled event (SPEC 5.1), so it cannot drift from what is published.
pub(super) fn describe(envelope: &Envelope) -> serde_json::Value {
    let p = properties(envelope);
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
    let headers: serde_json::Map<String, serde_json::Value> = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), super::header_text(v)?.into())))
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "contentType": text(p.content_type()),
        "deliveryMode": p.delivery_mode(),
        "messageId": text(p.message_id()),
        "timestamp": p.timestamp(),
        "type": text(p.kind()),
        "appId": text(p.app_id()),
        "headers": headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::tests::envelope;

    #[test]
    fn properties_carry_every_field_of_the_contract() {
        let p = properties(&envelope());
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.kind().as_ref().unwrap().as_str(),
            "sendtalk.verification.verified"
        );
        assert_eq!(*p.timestamp(), Some(1_692_847_205));
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "sendtalk-relay");
    }

    #[test]
    fn the_description_shows_what_is_published() {
        let d = describe(&envelope());
        assert_eq!(d["type"], "sendtalk.verification.verified");
        assert_eq!(d["deliveryMode"], 2);
        assert_eq!(d["headers"]["x-dedup"], "checked");
        assert_eq!(d["headers"]["x-received-at"], "2023-08-24T03:20:05.385Z");
    }

    #[test]
    fn lifecycle_headers_are_emitted_only_when_set() {
        let header = |p: &BasicProperties, name: &str| {
            p.headers()
                .as_ref()
                .and_then(|h| h.inner().get(name))
                .and_then(crate::publish::header_text)
        };
        let mut e = envelope();
        let p = properties(&e);
        assert_eq!(header(&p, "x-verification-id").as_deref(), Some("x"));
        assert_eq!(header(&p, "x-dedup").as_deref(), Some("checked"));
        assert_eq!(header(&p, "x-phone-match"), None);
        e.dedup = crate::message::DedupMark::Omitted;
        e.verification_id = Some("v".into());
        e.phone_match = Some(false);
        let p = properties(&e);
        assert_eq!(header(&p, "x-verification-id").as_deref(), Some("v"));
        assert_eq!(header(&p, "x-dedup"), None);
        assert_eq!(header(&p, "x-phone-match").as_deref(), Some("false"));
    }
}
