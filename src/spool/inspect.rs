//! What an operator sees of the spool and may do to it (SPEC 5.1): pages of
//! entries with their state, one entry with its body, a retry and a drop;
//! and the same listing of a stopped relay's file, opened read-only.
//!
//! Everything is read from the store (the entries and their meta); only
//! the *held* state and the time of the next attempt come from the
//! drainer's holds, which live as long as the process.

use std::path::Path;
use std::time::{Duration, Instant};

use redb::{ReadOnlyDatabase, ReadableDatabase};
use serde::Serialize;

use super::holds::Hold;
use super::store::{self, Meta, EVENTS, META};
use super::{now_ms, storage, Spool, SpoolError};
use crate::message::{rfc3339, Envelope};

/// Most entries one page may ask for.
pub const PAGE_MAX: usize = 1000;

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    /// The drainer publishes it when the broker takes events, possibly
    /// after a backoff (`nextAttemptAt`).
    Waiting,
    /// Sent; the broker's late confirm decides whether it goes again.
    Held,
    /// Refused `spool.max_attempts` times or older than
    /// `spool.max_age_secs`: waits for an operator.
    Dead,
}

impl EntryState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Waiting => "waiting",
            EntryState::Held => "held",
            EntryState::Dead => "dead",
        }
    }
}

impl std::str::FromStr for EntryState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "waiting" => Ok(EntryState::Waiting),
            "held" => Ok(EntryState::Held),
            "dead" => Ok(EntryState::Dead),
            other => Err(format!(
                "unknown state {other:?}: expected waiting, held or dead"
            )),
        }
    }
}

/// Which entries a page holds.
#[derive(Debug, Clone, Copy)]
pub struct PageQuery {
    /// Only entries in this state.
    pub state: Option<EntryState>,
    /// Only entries after this key (the previous page's `next`).
    pub after: Option<u64>,
    /// At most this many, 1 to [`PAGE_MAX`].
    pub limit: usize,
}

/// One stored entry as an operator sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its key in the store (sequence number: oldest first).
    pub key: u64,
    /// The event as it will be published.
    pub envelope: Envelope,
    /// Its refusals, last error and dead flag.
    meta: Meta,
    /// Its state.
    pub state: EntryState,
    /// When the drainer tries it next (Unix ms), if it waits for a backoff.
    next_attempt_ms: Option<u64>,
}

/// The listing's view of an entry: no body, no phone number.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    key: String,
    id: String,
    status: String,
    routing_key: String,
    spooled_at: String,
    attempts: u32,
    next_attempt_at: Option<String>,
    last_error: Option<String>,
    state: EntryState,
}

impl Summary {
    /// Refusals counted against `spool.max_attempts`.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl Entry {
    /// The listing's fields, with the routing key the entry is published
    /// with.
    pub fn summary(&self, routing_key: String) -> Summary {
        Summary {
            key: self.key.to_string(),
            id: self.envelope.verification_id().to_string(),
            status: self.envelope.status.clone(),
            routing_key,
            spooled_at: rfc3339(self.envelope.received_at_ms),
            attempts: self.meta.attempts,
            next_attempt_at: self.next_attempt_ms.map(rfc3339),
            last_error: self.meta.last_error.clone(),
            state: self.state,
        }
    }
}

/// One page, oldest first.
#[derive(Debug, Default)]
pub struct Page {
    /// The entries.
    pub entries: Vec<Entry>,
    /// The cursor of the next page, if there is one.
    pub next: Option<u64>,
}

/// What became of an operator's request for one entry.
#[derive(Debug)]
pub enum Found<T> {
    /// No entry with that key.
    Missing,
    /// The entry is taken right now; the text says by what.
    Busy(&'static str),
    /// Done.
    Done(T),
}

/// Why a stopped relay's spool cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// No spool file in the directory.
    #[error("no spool file at {0}")]
    Missing(String),
    /// A running relay has the file open.
    #[error("{0} is in use by a running relay: stop it first, or ask the running relay (sendtalk-relay spool list without --dir)")]
    InUse(String),
    /// The file needs the repair a writer makes when it opens it (the
    /// relay was killed); reading it read-only cannot do that.
    #[error("{0} was not closed cleanly and needs the repair the relay makes when it starts; start the relay (it drains the spool) or copy the file and read the copy after a start")]
    NeedsRepair(String),
    /// Anything else the store said.
    #[error(transparent)]
    Storage(#[from] SpoolError),
}

/// The state of an entry and when it is tried next, from its meta and the
/// drainer's hold (none for a stopped relay).
fn state_of(meta: &Meta, hold: Option<Hold>) -> (EntryState, Option<u64>) {
    match hold {
        _ if meta.dead => (EntryState::Dead, None),
        Some(Hold::Dead) => (EntryState::Dead, None),
        Some(Hold::Pending) => (EntryState::Held, None),
        Some(Hold::RetryAt { at, .. }) => {
            let wait = at.saturating_duration_since(Instant::now());
            let next = (wait > Duration::ZERO)
                .then(|| now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
            (EntryState::Waiting, next)
        }
        None => (EntryState::Waiting, None),
    }
}

/// Reads entries from `after` on, keeping those in `query.state`.
fn read_page(
    db: &impl ReadableDatabase,
    query: PageQuery,
    hold: impl Fn(u64) -> Option<Hold>,
) -> Result<Page, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = match txn.open_table(EVENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Page::default()),
        Err(e) => return Err(storage(e)),
    };
    let metas = match txn.open_table(META) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(storage(e)),
    };
    let from = query.after.map_or(0, |a| a.saturating_add(1));
    let mut page = Page::default();
    for item in table.range(from..).map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        let key = k.value();
        let meta = match &metas {
            Some(t) => t
                .get(key)
                .map_err(storage)?
                .map(|m| Meta::decode(m.value()))
                .unwrap_or_default(),
            None => Meta::default(),
        };
        let (state, next_attempt_ms) = state_of(&meta, hold(key));
        if query.state.is_some_and(|wanted| wanted != state) {
            continue;
        }
        if page.entries.len() == query.limit {
            page.next = page.entries.last().map(|e| e.key);
            break;
        }
        let Ok(envelope) = serde_json::from_slice::<Envelope>(v.value()) else {
            tracing::error!(key, "unreadable spool entry left out of the listing");
            continue;
        };
        page.entries.push(Entry {
            key,
            envelope,
            meta,
            state,
            next_attempt_ms,
        });
    }
    Ok(page)
}

impl Spool {
    /// One page of entries, oldest first.
    pub async fn page(&self, query: PageQuery) -> Result<Page, SpoolError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let db = this.inner.shared.database().ok_or(SpoolError::Failing)?;
            read_page(&*db, query, |key| this.hold_of(key))
        })
        .await
        .map_err(storage)?
    }

    /// The entry under `key`, if there is one.
    pub async fn entry(&self, key: u64) -> Result<Option<Entry>, SpoolError> {
        let query = PageQuery {
            state: None,
            after: key.checked_sub(1),
            limit: 1,
        };
        let page = self.page(query).await?;
        Ok(page.entries.into_iter().find(|e| e.key == key))
    }

    /// An operator's retry: the entry (dead or waiting) is attempted at
    /// once with its attempts reset. A held entry waits for the broker's
    /// answer about the copy it already has.
    pub async fn retry(&self, key: u64) -> Result<Found<Entry>, SpoolError> {
        let Some(entry) = self.entry(key).await? else {
            return Ok(Found::Missing);
        };
        if entry.state == EntryState::Held {
            return Ok(Found::Busy(
                "the broker has not yet answered for the copy it was sent; retry once it has",
            ));
        }
        self.revive(key).await?;
        tracing::info!(
            key,
            verification_id = entry.envelope.verification_id(),
            "spool entry retried by an operator"
        );
        Ok(Found::Done(entry))
    }

    /// An operator's drop: the entry is deleted and never published.
    pub async fn drop_entry(&self, key: u64) -> Result<Found<Entry>, SpoolError> {
        let Some(entry) = self.entry(key).await? else {
            return Ok(Found::Missing);
        };
        let taken = self
            .inner
            .busy
            .lock()
            .is_ok_and(|mut busy| busy.insert(key));
        if !taken {
            return Ok(Found::Busy(
                "the drainer is publishing it right now; look again in a moment",
            ));
        }
        let removed = self.remove(&[key]).await;
        self.release(&[key]);
        removed?;
        tracing::warn!(
            key,
            verification_id = entry.envelope.verification_id(),
            status = %entry.envelope.status,
            state = entry.state.as_str(),
            "spool entry dropped by an operator; it will never be published"
        );
        Ok(Found::Done(entry))
    }
}

/// What a stopped relay's spool holds: (entries, bytes, dead) and a page.
pub fn list_stopped(dir: &Path, query: PageQuery) -> Result<((u64, u64, u64), Page), OfflineError> {
    let path = dir.join(store::FILE_NAME);
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(OfflineError::Missing(shown));
    }
    let db = ReadOnlyDatabase::open(&path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            OfflineError::InUse(shown.clone())
        }
        redb::DatabaseError::RepairAborted => OfflineError::NeedsRepair(shown.clone()),
        other => OfflineError::Storage(storage(format!("cannot open {shown}: {other}"))),
    })?;
    let counts = store::count(&db)?;
    let page = read_page(&db, query, |_| None)?;
    Ok(((counts.depth, counts.bytes, counts.dead), page))
}
