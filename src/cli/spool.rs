//! `sendtalk-relay spool …` (SPEC 5.1): the spool operations of a running
//! relay through its admin API, and `spool list --dir` on a stopped relay's
//! file. Each command prints what the relay answers (a table for `list`)
//! and ends with one of the exit codes of [`Failure`].

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::config::Settings;
use crate::spool::{list_stopped, EntryState, PageQuery};

/// How long a command waits for the relay.
const WITHIN: Duration = Duration::from_secs(10);
/// BSD `EX_UNAVAILABLE`: the relay cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 69;

/// Why a spool command failed, and the exit code it ends with.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Exit 1: the relay answered, but not with what was asked (the entry
    /// does not exist, a bad token or parameter, a busy entry).
    #[error("{0}")]
    Refused(String),
    /// Exit 69: no answer from the relay.
    #[error("{0}")]
    Unreachable(String),
}

impl Failure {
    /// The process's exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Unreachable(_) => EXIT_UNREACHABLE,
        }
    }
}

/// One operation against a running relay.
#[derive(Debug, Clone)]
pub enum Operation {
    /// `GET /spool`.
    List(PageQuery),
    /// `GET /spool/{key}`.
    Show(String),
    /// `POST /spool/{key}/retry`.
    Retry(String),
    /// `DELETE /spool/{key}`.
    Drop(String),
}

/// The admin listener of `settings` (loopback when it listens on every
/// interface).
pub fn admin_base(settings: &Settings) -> String {
    let mut addr = settings.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

/// Runs `operation` against the admin API at `base` and returns what to
/// print.
pub async fn run(
    base: &str,
    token: Option<&str>,
    operation: &Operation,
) -> Result<String, Failure> {
    let client = reqwest::Client::builder()
        .timeout(WITHIN)
        .build()
        .map_err(|e| Failure::Unreachable(format!("cannot build an HTTP client: {e}")))?;
    let base = base.trim_end_matches('/');
    let request = match operation {
        Operation::List(query) => {
            let mut params = vec![("limit", query.limit.to_string())];
            if let Some(state) = query.state {
                params.push(("state", state.as_str().to_string()));
            }
            if let Some(after) = query.after {
                params.push(("after", after.to_string()));
            }
            client.get(format!("{base}/spool")).query(&params)
        }
        Operation::Show(key) => client.get(format!("{base}/spool/{}", segment(key))),
        Operation::Retry(key) => client.post(format!("{base}/spool/{}/retry", segment(key))),
        Operation::Drop(key) => client.delete(format!("{base}/spool/{}", segment(key))),
    };
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request
        .send()
        .await
        .map_err(|e| Failure::Unreachable(format!("no answer from the relay at {base}: {e}")))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| {
        Failure::Unreachable(format!("the relay at {base} broke off its answer: {e}"))
    })?;
    if !status.is_success() {
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        let hint = match status.as_u16() {
            401 => " (pass --token, or configure admin.tokens)",
            404 if token.is_none() => " (no admin token: configure admin.tokens, or pass --token)",
            _ => "",
        };
        return Err(Failure::Refused(format!("{status}: {message}{hint}")));
    }
    Ok(match operation {
        Operation::List(_) => {
            let page: Value = serde_json::from_str(&text)
                .map_err(|e| Failure::Refused(format!("unreadable answer: {e}")))?;
            table(&page)
        }
        Operation::Show(_) => serde_json::from_str::<Value>(&text)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or(text),
        Operation::Retry(key) => format!("{key}: retried; it is attempted now"),
        Operation::Drop(key) => format!("{key}: dropped; it will never be published"),
    })
}

/// A key as one path segment: anything but digits names no entry, and is
/// answered 404 by the relay rather than taken for another path.
fn segment(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `spool list --dir DIR`: the page of a stopped relay's spool file.
pub fn list_dir(settings: &Settings, dir: &Path, query: PageQuery) -> Result<String, Failure> {
    let ((depth, bytes, dead), page) =
        list_stopped(dir, query).map_err(|e| Failure::Refused(e.to_string()))?;
    let entries: Vec<Value> = page
        .entries
        .iter()
        .map(|e| {
            let routing_key = settings.amqp.routing_key.render(&e.envelope.status);
            serde_json::to_value(e.summary(routing_key)).unwrap_or_default()
        })
        .collect();
    let listing = serde_json::json!({
        "depth": depth, "bytes": bytes, "dead": dead,
        "entries": entries, "next": page.next.map(|k| k.to_string()),
    });
    Ok(format!(
        "{} (read-only, relay stopped)\n{}",
        dir.display(),
        table(&listing)
    ))
}

/// The listing as a table, one entry a line, with the counts above and the
/// cursor of the next page below.
fn table(page: &Value) -> String {
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "depth {}  bytes {}  dead {}{}\n",
        text(&page["depth"]),
        text(&page["bytes"]),
        text(&page["dead"]),
        page.get("oldestAgeSecs")
            .map(|a| format!("  oldest {} s", text(a)))
            .unwrap_or_default(),
    );
    let columns = [
        ("KEY", "key"),
        ("STATE", "state"),
        ("ATTEMPTS", "attempts"),
        ("SPOOLED AT", "spooledAt"),
        ("NEXT ATTEMPT", "nextAttemptAt"),
        ("ID", "id"),
        ("STATUS", "status"),
        ("ROUTING KEY", "routingKey"),
        ("LAST ERROR", "lastError"),
    ];
    let entries = page["entries"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| columns.iter().map(|(_, field)| text(&e[*field])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (title, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(title.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<width$}  ", width = widths[i]);
            }
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(
        columns.iter().map(|(t, _)| (*t).to_string()).collect(),
    ));
    for row in rows {
        out.push_str(&line(row));
    }
    if entries.is_empty() {
        out.push_str("(no entries)\n");
    }
    if let Some(next) = page["next"].as_str() {
        let _ = writeln!(out, "more: --after {next}");
    }
    out
}

/// The state filter as the command line spells it.
pub fn parse_state(s: &str) -> Result<EntryState, String> {
    s.parse()
}
