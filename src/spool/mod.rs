//! The durable on-disk buffer (SPEC 5): appends fsynced before a 202, and a
//! drainer that republishes oldest first once the broker is back.
//!
//! - `store`: the redb file, its writer thread (group commit) and recovery
//!   from I/O errors.
//! - `drain`: the drainer and the shutdown flush.
//! - `holds`: the holds below, the backoff of refused entries and the wait
//!   for a late confirm.
//!
//! Each entry may carry a hold the drainer respects:
//! - *pending*: the live publish was sent but not confirmed in time (or the
//!   broker blocked the connection while it was in flight). The broker may
//!   still take it, so the entry waits for that answer: a late ack deletes it
//!   unpublished, anything else frees it. This is what keeps a block or a slow
//!   confirm from turning into a second copy.
//! - *retry at*: the broker refused the entry (nack or return); it is retried
//!   with capped exponential backoff, without blocking the entries behind it,
//!   so a queue that keeps refusing does not receive a copy a second.

mod drain;
mod holds;
mod store;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use redb::{Database, ReadableDatabase, ReadableTableMetadata};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::message::Envelope;
use holds::Hold;
pub use holds::Spooled;
use store::{storage, Command, EVENTS, FILE_NAME};

/// Longest an append may take, fsync included. Past it the webhook is
/// answered 503 (the entry may still land and be drained: at worst a
/// duplicate, never a loss). The lease check of the configuration counts on
/// this bound (SPEC 3).
pub const APPEND_MAX: Duration = Duration::from_secs(5);

/// Why an append or a removal failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// `spool.max_bytes` would be exceeded.
    #[error("spool is full ({used} of {max} bytes)")]
    Full {
        /// Bytes already in (or reserved by) the spool before this append.
        used: u64,
        /// `spool.max_bytes`.
        max: u64,
    },
    /// `spool.enabled = false`.
    #[error("spool is disabled")]
    Disabled,
    /// An earlier I/O error has not been recovered from yet.
    #[error("spool storage is failing; writes are refused until it recovers")]
    Failing,
    /// The storage engine or the file system failed.
    #[error("spool storage error: {0}")]
    Storage(String),
}

/// State shared with the writer thread.
pub(crate) struct Shared {
    /// The open database; `None` after an I/O error until it is reopened.
    /// Readers clone the `Arc` for one read transaction only, so the writer
    /// can drop the last handle and reopen.
    db: RwLock<Option<Arc<Database>>>,
    failing: AtomicBool,
    /// Bytes and entries stored; kept in memory so the hot path never reads
    /// the file to check the bound.
    bytes: AtomicU64,
    depth: AtomicU64,
    depth_gauge: IntGauge,
    bytes_gauge: IntGauge,
}

impl Shared {
    fn database(&self) -> Option<Arc<Database>> {
        self.db.read().ok().and_then(|db| db.clone())
    }

    fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    fn fail(&self) {
        self.failing.store(true, Ordering::Release);
        if let Ok(mut db) = self.db.write() {
            *db = None;
        }
    }

    fn recover(&self, db: Arc<Database>, depth: u64, bytes: u64) {
        if let Ok(mut slot) = self.db.write() {
            *slot = Some(db);
        }
        self.depth.store(depth, Ordering::Release);
        self.bytes.store(bytes, Ordering::Release);
        self.update_gauges();
        self.failing.store(false, Ordering::Release);
    }

    fn update_gauges(&self) {
        let get = |v: &AtomicU64| i64::try_from(v.load(Ordering::Acquire)).unwrap_or(i64::MAX);
        self.depth_gauge.set(get(&self.depth));
        self.bytes_gauge.set(get(&self.bytes));
    }
}

/// The metrics the spool writes.
#[derive(Clone)]
pub struct SpoolMetrics {
    /// `spool_depth`.
    pub depth: IntGauge,
    /// `spool_bytes`.
    pub bytes: IntGauge,
    /// `spool_errors_total`: appends and removals refused by a storage error.
    pub errors: IntCounter,
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Feeds the writer thread; dropping every sender ends it.
    commands: mpsc::UnboundedSender<Command>,
    /// Sequence numbers are assigned before the write so that an entry's
    /// hold exists before the drainer can see the entry.
    next_seq: AtomicU64,
    max_bytes: u64,
    errors: IntCounter,
    /// Wakes the drainer after an append or a released hold.
    appended: Notify,
    /// Holds by sequence number; an entry without one is drained at once.
    holds: Mutex<HashMap<u64, Hold>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("depth", &self.depth())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, counting what is already there.
    pub fn open(dir: &Path, max_bytes: u64, metrics: SpoolMetrics) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = store::open(&path)?;
        let (next_seq, depth, bytes) = store::count(&db)?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            failing: AtomicBool::new(false),
            bytes: AtomicU64::new(bytes),
            depth: AtomicU64::new(depth),
            depth_gauge: metrics.depth,
            bytes_gauge: metrics.bytes,
        });
        shared.update_gauges();
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || store::writer_loop(&writer_shared, &path, rx))
            .map_err(storage)?;
        if depth > 0 {
            tracing::info!(
                depth,
                bytes,
                "spool holds events from an earlier run; they will be drained"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                commands: tx,
                next_seq: AtomicU64::new(next_seq),
                max_bytes,
                errors: metrics.errors,
                appended: Notify::new(),
                holds: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Entries stored.
    pub fn depth(&self) -> u64 {
        self.inner.shared.depth.load(Ordering::Acquire)
    }

    /// Bytes stored.
    pub fn bytes(&self) -> u64 {
        self.inner.shared.bytes.load(Ordering::Acquire)
    }

    /// True while an append would be tried: the store is not failing and
    /// at least one typical event still fits.
    pub fn can_take(&self) -> bool {
        !self.inner.shared.is_failing() && self.bytes() + 1024 <= self.inner.max_bytes
    }

    /// True after an I/O error, until the store has been reopened.
    pub fn is_failing(&self) -> bool {
        self.inner.shared.is_failing()
    }

    fn send(
        &self,
        command: Command,
        wait: oneshot::Receiver<Result<(), SpoolError>>,
    ) -> impl std::future::Future<Output = Result<(), SpoolError>> {
        let sent = self.inner.commands.send(command);
        async move {
            match sent {
                Ok(()) => wait
                    .await
                    .unwrap_or_else(|_| Err(storage("spool writer stopped"))),
                Err(_) => Err(storage("spool writer stopped")),
            }
        }
    }

    /// Appends an envelope and returns once it is fsynced.
    pub async fn append(&self, envelope: &Envelope, why: Spooled) -> Result<(), SpoolError> {
        if self.inner.shared.is_failing() {
            self.inner.errors.inc();
            return Err(SpoolError::Failing);
        }
        let bytes = serde_json::to_vec(envelope).map_err(storage)?;
        let len = bytes.len() as u64;
        let shared = &self.inner.shared;
        // Reserve the space first so concurrent appends cannot overshoot.
        let reserved = shared.bytes.fetch_add(len, Ordering::AcqRel) + len;
        if reserved > self.inner.max_bytes {
            shared.bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(SpoolError::Full {
                used: reserved - len,
                max: self.inner.max_bytes,
            });
        }
        let seq = self.inner.next_seq.fetch_add(1, Ordering::AcqRel);
        let (late, hold) = why.hold();
        if let Some(hold) = hold {
            self.set_hold(seq, hold);
        }
        let (done, wait) = oneshot::channel();
        let write = self.send(Command::Append { seq, bytes, done }, wait);
        let result = tokio::time::timeout(APPEND_MAX, write)
            .await
            .unwrap_or_else(|_| Err(storage(format!("no fsync within {APPEND_MAX:?}"))));
        if result.is_ok() {
            shared.depth.fetch_add(1, Ordering::AcqRel);
            if let Some(late) = late {
                self.settle_when_confirmed(seq, len, late);
            }
            self.inner.appended.notify_one();
        } else {
            shared.bytes.fetch_sub(len, Ordering::AcqRel);
            self.inner.errors.inc();
            self.clear_hold(seq);
        }
        shared.update_gauges();
        result
    }

    /// Deletes entries (sequence number, stored length) once fsynced.
    async fn remove(&self, entries: &[(u64, u64)]) -> Result<(), SpoolError> {
        if entries.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        let seqs = entries.iter().map(|(seq, _)| *seq).collect();
        let result = self.send(Command::Remove { seqs, done }, wait).await;
        let shared = &self.inner.shared;
        match &result {
            Ok(()) => {
                let bytes: u64 = entries.iter().map(|(_, len)| len).sum();
                shared.bytes.fetch_sub(bytes, Ordering::AcqRel);
                shared
                    .depth
                    .fetch_sub(entries.len() as u64, Ordering::AcqRel);
                if let Ok(mut holds) = self.inner.holds.lock() {
                    for (seq, _) in entries {
                        holds.remove(seq);
                    }
                }
                shared.update_gauges();
            }
            Err(_) => self.inner.errors.inc(),
        }
        result
    }

    /// The oldest entries the drainer may publish now, up to `limit`.
    #[cfg(test)]
    fn oldest(&self, limit: usize) -> Result<Vec<(u64, Envelope, u64)>, SpoolError> {
        self.oldest_from(0, limit)
    }

    /// The oldest entries from sequence number `from` on that the drainer
    /// may publish now, up to `limit`. A range read: a drain pass moves
    /// forward through the table instead of walking over what it already
    /// took (and may still be publishing or deleting).
    fn oldest_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope, u64)>, SpoolError> {
        let now = Instant::now();
        let holds = self
            .inner
            .holds
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        let db = self.inner.shared.database().ok_or(SpoolError::Failing)?;
        let txn = db.begin_read().map_err(storage)?;
        let table = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let mut out = Vec::new();
        for entry in table.range(from..).map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let seq = k.value();
            if holds.get(&seq).is_some_and(|h| h.holds_back(now)) {
                continue;
            }
            let raw = v.value();
            match serde_json::from_slice::<Envelope>(raw) {
                Ok(env) => out.push((seq, env, raw.len() as u64)),
                Err(e) => tracing::error!(seq, error = %e, "unreadable spool entry left in place"),
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Number of entries stored, read from the file (for tests and start-up).
    pub fn stored_len(&self) -> Result<u64, SpoolError> {
        let db = self.inner.shared.database().ok_or(SpoolError::Failing)?;
        let txn = db.begin_read().map_err(storage)?;
        match txn.open_table(EVENTS) {
            Ok(t) => t.len().map_err(storage),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(storage(e)),
        }
    }
}

#[cfg(test)]
mod tests;
