//! The AMQP values `[amqp]` validates into: parsed broker URIs (password
//! hidden), exchange names and kinds, and the routing-key template. Each has
//! one checked constructor; the publisher takes them as they are.

use std::fmt;
use std::str::FromStr;

use lapin::uri::AMQPUri;

use crate::telemetry::redact_url_password;

/// The kind of `amqp.exchange` (`amqp.exchange_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    /// `topic`: routing keys matched against patterns.
    Topic,
    /// `direct`: routing keys matched exactly.
    Direct,
    /// `fanout`: every bound queue gets every event.
    Fanout,
    /// `headers`: bindings match message headers.
    Headers,
}

impl ExchangeType {
    /// The kind lapin declares.
    pub fn kind(self) -> lapin::ExchangeKind {
        match self {
            ExchangeType::Topic => lapin::ExchangeKind::Topic,
            ExchangeType::Direct => lapin::ExchangeKind::Direct,
            ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeType::Headers => lapin::ExchangeKind::Headers,
        }
    }

    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Topic => "topic",
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Headers => "headers",
        }
    }
}

impl FromStr for ExchangeType {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "topic" => Ok(ExchangeType::Topic),
            "direct" => Ok(ExchangeType::Direct),
            "fanout" => Ok(ExchangeType::Fanout),
            "headers" => Ok(ExchangeType::Headers),
            _ => Err("must be topic, direct, fanout or headers"),
        }
    }
}

/// The name of an exchange the relay declares or publishes to: never empty,
/// since the default exchange can be neither declared nor bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeName(String);

impl ExchangeName {
    /// Accepts any non-empty name.
    pub fn parse(name: &str) -> Result<Self, &'static str> {
        if name.is_empty() {
            return Err("must not be empty");
        }
        Ok(Self(name.to_string()))
    }

    /// Parses an optional name: empty means none.
    pub(crate) fn optional(name: &str) -> Option<Self> {
        Self::parse(name).ok()
    }

    /// The name as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExchangeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `amqp.routing_key` template: text with `{status}` placeholders, at
/// most 255 bytes, checked once when the settings load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKey(String);

impl RoutingKey {
    /// Checks the placeholders (only `{status}`) and the length.
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                return Err("has an unclosed `{`".into());
            };
            let name = &rest[open + 1..open + close];
            if name != "status" {
                return Err(format!(
                    "unknown placeholder `{{{name}}}` (only {{status}} is available)"
                ));
            }
            rest = &rest[open + close + 1..];
        }
        if template.len() > 255 {
            return Err("is longer than 255 bytes".into());
        }
        Ok(Self(template.to_string()))
    }

    /// The routing key of an event with this status.
    pub fn render(&self, status: &str) -> String {
        self.0.replace("{status}", status)
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One `amqp.uri` entry, parsed when the settings load: a bad URI stops
/// start-up instead of failing every connection attempt. `Display` and
/// `Debug` show it with the password redacted.
#[derive(Clone)]
pub struct BrokerUri {
    uri: AMQPUri,
    redacted: String,
}

impl BrokerUri {
    /// Accepts `amqp://` and `amqps://` URIs lapin can connect to.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        if !(text.starts_with("amqp://") || text.starts_with("amqps://")) {
            return Err("every URI must start with amqp:// or amqps://");
        }
        let uri = text
            .parse::<AMQPUri>()
            .map_err(|_| "is not a valid AMQP URI")?;
        Ok(Self {
            uri,
            redacted: redact_url_password(text),
        })
    }

    /// The parsed URI, password included, to connect with.
    pub fn amqp_uri(&self) -> &AMQPUri {
        &self.uri
    }
}

impl fmt::Display for BrokerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// Hand-written: `AMQPUri`'s own `Debug` prints the password.
impl fmt::Debug for BrokerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BrokerUri").field(&self.redacted).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_render_every_status_placeholder() {
        let key = RoutingKey::parse("verification.{status}.{status}").unwrap();
        assert_eq!(key.render("verified"), "verification.verified.verified");
        assert_eq!(RoutingKey::parse("plain").unwrap().render("x"), "plain");
    }

    #[test]
    fn routing_key_templates_are_checked() {
        assert!(RoutingKey::parse("v.{nope}")
            .unwrap_err()
            .contains("{nope}"));
        assert!(RoutingKey::parse("v.{status")
            .unwrap_err()
            .contains("unclosed"));
        assert!(RoutingKey::parse(&"k".repeat(256)).is_err());
    }

    #[test]
    fn exchange_types_are_the_four_amqp_kinds() {
        for name in ["topic", "direct", "fanout", "headers"] {
            assert_eq!(name.parse::<ExchangeType>().unwrap().as_str(), name);
        }
        assert!("Topic".parse::<ExchangeType>().is_err());
        assert!(ExchangeName::parse("").is_err());
        assert_eq!(ExchangeName::optional(""), None);
    }

    #[test]
    fn broker_uris_parse_once_and_hide_the_password() {
        let uri = BrokerUri::parse("amqp://user:s3cret@h:5672/%2f").unwrap();
        assert_eq!(uri.amqp_uri().authority.userinfo.password, "s3cret");
        assert_eq!(uri.to_string(), "amqp://user:<redacted>@h:5672/%2f");
        assert!(!format!("{uri:?}").contains("s3cret"));
        assert!(BrokerUri::parse("http://h").is_err());
        assert!(BrokerUri::parse("amqp://h:notaport/").is_err());
    }
}
