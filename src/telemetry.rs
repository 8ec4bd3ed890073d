//! Structured logging set-up (tracing-subscriber), its settings (`[log]`,
//! built by `config`), and the masking helpers that keep personal data out
//! of log lines.

use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::Directive;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to standard error (standard output
/// belongs to the `stdout` sink). `RUST_LOG`, when set, wins over `log.level`.
pub fn init(settings: &LogSettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| settings.filter.to_env_filter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests building several apps) is harmless; ignore it.
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            // A stage's line carries the webhook's span (request id,
            // verification id); the per-webhook line is written outside it.
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
    };
}

/// Hides the middle of a phone number: `6281212345678` -> `6281****678`.
/// Short numbers keep less, so at least half is always hidden.
pub fn mask_phone(phone: &str) -> String {
    let n = phone.chars().count();
    let (head, tail) = if n >= 10 { (4, 3) } else { (n / 4, n / 4) };
    let start: String = phone.chars().take(head).collect();
    let end: String = phone.chars().skip(n - tail).collect();
    format!("{start}****{end}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_masked_like_the_spec_example() {
        assert_eq!(mask_phone("6281212345678"), "6281****678");
        assert_eq!(mask_phone("628124630350"), "6281****350");
        assert_eq!(mask_phone("12345"), "1****5");
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Multi-line, for people.
    Pretty,
}

/// `[log]`, validated.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `log.format`.
    pub format: LogFormat,
    /// `log.level`, parsed.
    pub filter: LogFilter,
}

/// `log.level`: a level or `RUST_LOG`-style directives (`info,lapin=warn`),
/// parsed once when the settings load.
#[derive(Debug, Clone)]
pub struct LogFilter {
    directives: Vec<Directive>,
}

impl LogFilter {
    /// Parses comma-separated directives the way `EnvFilter` does.
    pub fn parse(text: &str) -> Result<Self, tracing_subscriber::filter::ParseError> {
        let directives = text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Directive>, _>>()?;
        Ok(Self { directives })
    }

    /// The filter for the subscriber.
    pub fn to_env_filter(&self) -> EnvFilter {
        self.directives
            .iter()
            .cloned()
            .fold(EnvFilter::default(), EnvFilter::add_directive)
    }
}

impl std::fmt::Display for LogFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, directive) in self.directives.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{directive}")?;
        }
        Ok(())
    }
}

/// Replaces the password of `scheme://user:password@host` with `<redacted>`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:{}{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            "<redacted>",
            &rest[at..]
        ),
        None => url.to_string(),
    }
}
