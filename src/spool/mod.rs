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
mod inspect;
mod store;

use std::collections::{HashMap, HashSet};
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
pub use inspect::{
    list_stopped, Entry, EntryState, Found, OfflineError, Page, PageQuery, Summary, PAGE_MAX,
};
use store::{storage, Command, EVENTS, FILE_NAME};

/// Longest an append may take, fsync included. Past it the webhook is
/// answered 503 (the entry may still land and be drained: at worst a
/// duplicate, never a loss). The lease check of the configuration counts on
/// this bound (SPEC 3).
pub const APPEND_MAX: Duration = Duration::from_secs(5);

/// A commit running this long means the disk stalls (a healthy fsync takes
/// milliseconds): readiness turns 503 when the broker is not there either,
/// well before the appends waiting on it reach [`APPEND_MAX`].
const STALLED_AFTER: Duration = Duration::from_secs(2);

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
    /// Bytes and entries stored: the store's own counts, written only by
    /// the writer thread from what each commit really inserted and deleted
    /// (and recounted from the file when it reopens), so they stay equal to
    /// the file whatever a caller that stopped waiting does (SPEC 5).
    bytes: AtomicU64,
    depth: AtomicU64,
    /// Bytes of appends queued for the writer and not yet committed or
    /// refused: added by `append`, taken off by the writer once it has
    /// dealt with the command, so concurrent appends cannot overshoot
    /// `spool.max_bytes` and an append that outlives its caller still holds
    /// its room until it lands.
    reserved: AtomicU64,
    /// When the writer's current commit started (milliseconds after
    /// `epoch`, plus one), 0 while it is idle: a commit that runs long is a
    /// stalled disk, which readiness reports before any append times out.
    commit_since: AtomicU64,
    epoch: Instant,
    /// True while the disk reserve is released (see `store`): appends are
    /// refused so that the room it gave goes to draining.
    reserve_released: AtomicBool,
    /// Dead entries stored, and the oldest entry's receive time (Unix ms,
    /// 0 when empty): the store's counts too, written like `depth`.
    dead: AtomicU64,
    oldest_ms: AtomicU64,
    depth_gauge: IntGauge,
    bytes_gauge: IntGauge,
    dead_gauge: IntGauge,
    dead_total: IntCounter,
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

    fn recover(&self, db: Arc<Database>, counts: &store::Counts) {
        if let Ok(mut slot) = self.db.write() {
            *slot = Some(db);
        }
        self.depth.store(counts.depth, Ordering::Release);
        self.bytes.store(counts.bytes, Ordering::Release);
        self.dead.store(counts.dead, Ordering::Release);
        self.oldest_ms.store(counts.oldest_ms, Ordering::Release);
        self.update_gauges();
        self.failing.store(false, Ordering::Release);
    }

    fn reserve_released(&self) -> bool {
        self.reserve_released.load(Ordering::Acquire)
    }

    fn set_reserve_released(&self, released: bool) {
        self.reserve_released.store(released, Ordering::Release);
    }

    /// Marks the start (`true`) or the end of a commit (writer thread only).
    fn committing(&self, busy: bool) {
        let since = if busy {
            u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
        } else {
            0
        };
        self.commit_since.store(since, Ordering::Release);
    }

    /// True while a commit has been running for longer than [`STALLED_AFTER`].
    fn is_stalled(&self) -> bool {
        match self.commit_since.load(Ordering::Acquire) {
            0 => false,
            since => {
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                Duration::from_millis(now.saturating_sub(since - 1)) > STALLED_AFTER
            }
        }
    }

    /// Applies a committed group's change (writer thread only).
    fn apply(&self, change: &store::Change) {
        let apply = |v: &AtomicU64, add: u64, sub: u64| {
            let now = v.load(Ordering::Acquire);
            v.store((now + add).saturating_sub(sub), Ordering::Release);
        };
        apply(&self.depth, change.added, change.removed);
        apply(&self.bytes, change.added_bytes, change.removed_bytes);
        apply(&self.dead, change.died, change.revived);
        self.oldest_ms.store(change.oldest_ms, Ordering::Release);
        self.dead_total.inc_by(change.died);
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let get = |v: &AtomicU64| i64::try_from(v.load(Ordering::Acquire)).unwrap_or(i64::MAX);
        self.depth_gauge.set(get(&self.depth));
        self.bytes_gauge.set(get(&self.bytes));
        self.dead_gauge.set(get(&self.dead));
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
    /// `spool_dead`: dead entries stored.
    pub dead: IntGauge,
    /// `spool_dead_total`: entries that became dead.
    pub dead_total: IntCounter,
    /// `spool_oldest_age_seconds`: set by [`Spool::refresh_age`].
    pub oldest_age: IntGauge,
}

/// How much the spool may hold, and when a refused entry stops being
/// retried by itself (SPEC 5).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `spool.max_bytes`.
    pub max_bytes: u64,
    /// `spool.max_attempts`: refusals before an entry is dead; 0 = no limit.
    pub max_attempts: u32,
    /// `spool.max_age_secs`: age at which an entry is dead; `None` = no limit.
    pub max_age: Option<Duration>,
}

impl Limits {
    /// `max_bytes` and the documented defaults for dead entries.
    pub fn bytes(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            max_attempts: 20,
            max_age: Some(Duration::from_secs(604_800)),
        }
    }
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
    max_attempts: u32,
    max_age: Option<Duration>,
    errors: IntCounter,
    oldest_age: IntGauge,
    /// Wakes the drainer after an append or a released hold.
    appended: Notify,
    /// Holds by sequence number; an entry without one is drained at once.
    holds: Mutex<HashMap<u64, Hold>>,
    /// Entries the drainer is publishing (until their removal or refusal)
    /// or an operator is dropping: whoever takes an entry first has it, so
    /// a dropped entry is never published.
    busy: Mutex<HashSet<u64>>,
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
    pub fn open(dir: &Path, limits: Limits, metrics: SpoolMetrics) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = store::open(&path)?;
        let counts = store::count(&db)?;
        let (depth, bytes) = (counts.depth, counts.bytes);
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            failing: AtomicBool::new(false),
            bytes: AtomicU64::new(bytes),
            depth: AtomicU64::new(depth),
            reserved: AtomicU64::new(0),
            commit_since: AtomicU64::new(0),
            epoch: Instant::now(),
            // A missing reserve that cannot be written back while entries
            // wait means an earlier run released it on a full disk.
            reserve_released: AtomicBool::new(!store::ensure_reserve(&path) && depth > 0),
            dead: AtomicU64::new(counts.dead),
            oldest_ms: AtomicU64::new(counts.oldest_ms),
            depth_gauge: metrics.depth,
            bytes_gauge: metrics.bytes,
            dead_gauge: metrics.dead,
            dead_total: metrics.dead_total,
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
                dead = counts.dead,
                "spool holds events from an earlier run; they will be drained (dead ones wait for an operator)"
            );
        }
        let spool = Self {
            inner: Arc::new(Inner {
                shared,
                commands: tx,
                next_seq: AtomicU64::new(counts.next_seq),
                max_bytes: limits.max_bytes,
                max_attempts: limits.max_attempts,
                max_age: limits.max_age,
                errors: metrics.errors,
                oldest_age: metrics.oldest_age,
                appended: Notify::new(),
                holds: Mutex::new(HashMap::new()),
                busy: Mutex::new(HashSet::new()),
            }),
        };
        spool.restore_holds(&counts.metas);
        spool.refresh_age();
        Ok(spool)
    }

    /// Dead entries stored.
    pub fn dead(&self) -> u64 {
        self.inner.shared.dead.load(Ordering::Acquire)
    }

    /// Age of the oldest entry; zero when the spool is empty.
    pub fn oldest_age(&self) -> Duration {
        match self.inner.shared.oldest_ms.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            oldest => Duration::from_millis(now_ms().saturating_sub(oldest)),
        }
    }

    /// Sets `spool_oldest_age_seconds` from the store's oldest entry; the
    /// admin listener calls it before each scrape, since an age grows with
    /// no write to report it.
    pub fn refresh_age(&self) {
        let secs = i64::try_from(self.oldest_age().as_secs()).unwrap_or(i64::MAX);
        self.inner.oldest_age.set(secs);
    }

    /// Entries stored.
    pub fn depth(&self) -> u64 {
        self.inner.shared.depth.load(Ordering::Acquire)
    }

    /// Bytes stored.
    pub fn bytes(&self) -> u64 {
        self.inner.shared.bytes.load(Ordering::Acquire)
    }

    /// True while an append can be made durable in time: the store is not
    /// failing, its disk is not stalled, and at least one typical event
    /// still fits. Readiness reads this (SPEC 6).
    pub fn can_take(&self) -> bool {
        let shared = &self.inner.shared;
        !shared.is_failing()
            && !shared.is_stalled()
            && !shared.reserve_released()
            && self.bytes() + shared.reserved.load(Ordering::Acquire) + 1024 <= self.inner.max_bytes
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
        if self.inner.shared.is_failing() || self.inner.shared.reserve_released() {
            self.inner.errors.inc();
            return Err(SpoolError::Failing);
        }
        let bytes = serde_json::to_vec(envelope).map_err(storage)?;
        let len = bytes.len() as u64;
        let shared = &self.inner.shared;
        // Reserve the space first so concurrent appends cannot overshoot;
        // the writer gives it back once the command is dealt with.
        let used =
            shared.bytes.load(Ordering::Acquire) + shared.reserved.fetch_add(len, Ordering::AcqRel);
        if used + len > self.inner.max_bytes {
            shared.reserved.fetch_sub(len, Ordering::AcqRel);
            return Err(SpoolError::Full {
                used,
                max: self.inner.max_bytes,
            });
        }
        let seq = self.inner.next_seq.fetch_add(1, Ordering::AcqRel);
        let (late, hold, meta) = why.hold();
        if let Some(hold) = hold {
            self.set_hold(seq, hold);
        }
        let (done, wait) = oneshot::channel();
        let meta = meta.map(|m| m.encode());
        let write = self.send(
            Command::Append {
                seq,
                bytes,
                meta,
                done,
            },
            wait,
        );
        // Past the bound the webhook is answered 503, but the write stays
        // queued and may still commit: it is then an ordinary entry, counted
        // by the writer and drained (at least once, never lost).
        let result = tokio::time::timeout(APPEND_MAX, write)
            .await
            .unwrap_or_else(|_| Err(storage(format!("no fsync within {APPEND_MAX:?}"))));
        if result.is_ok() {
            if let Some(late) = late {
                self.settle_when_confirmed(seq, late);
            }
            self.inner.appended.notify_one();
        } else {
            self.inner.errors.inc();
            self.clear_hold(seq);
        }
        result
    }

    /// Deletes entries by sequence number once fsynced (the writer counts
    /// what it really deleted).
    async fn remove(&self, seqs: &[u64]) -> Result<(), SpoolError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        let result = self
            .send(
                Command::Remove {
                    seqs: seqs.to_vec(),
                    done,
                },
                wait,
            )
            .await;
        match &result {
            Ok(()) => {
                if let Ok(mut holds) = self.inner.holds.lock() {
                    for seq in seqs {
                        holds.remove(seq);
                    }
                }
            }
            Err(_) => self.inner.errors.inc(),
        }
        result
    }

    /// The oldest entries the drainer may publish now, up to `limit`.
    #[cfg(test)]
    fn oldest(&self, limit: usize) -> Result<Vec<(u64, Envelope)>, SpoolError> {
        self.oldest_from(0, limit)
    }

    /// The oldest entries from sequence number `from` on that the drainer
    /// may publish now, up to `limit`. A range read: a drain pass moves
    /// forward through the table instead of walking over what it already
    /// took (and may still be publishing or deleting).
    fn oldest_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Envelope)>, SpoolError> {
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
        let metas = match txn.open_table(store::META) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(storage(e)),
        };
        let now_ms = now_ms();
        let mut out = Vec::new();
        for entry in table.range(from..).map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let seq = k.value();
            if holds.get(&seq).is_some_and(|h| h.holds_back(now)) {
                continue;
            }
            let raw = v.value();
            match serde_json::from_slice::<Envelope>(raw) {
                Ok(env) => {
                    if let Some(max_age) = self.inner.max_age {
                        let meta = match &metas {
                            Some(t) => t
                                .get(seq)
                                .map_err(storage)?
                                .map(|m| store::Meta::decode(m.value())),
                            None => None,
                        };
                        let born = meta
                            .as_ref()
                            .and_then(|m| m.age_from_ms)
                            .unwrap_or(env.received_at_ms);
                        let age = Duration::from_millis(now_ms.saturating_sub(born));
                        if age > max_age {
                            self.die(
                                seq,
                                &env,
                                meta.unwrap_or_default(),
                                "older than spool.max_age_secs",
                            );
                            continue;
                        }
                    }
                    out.push((seq, env));
                }
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

/// Wall-clock time, Unix milliseconds (the entries' own clock).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
