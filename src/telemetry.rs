//! Structured logging set-up (tracing-subscriber) and the masking helpers
//! that keep personal data out of log lines.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

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
