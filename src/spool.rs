//! The durable on-disk buffer (SPEC 5) and its drainer.
//!
//! Storage is redb: a checksummed, crash-safe B-tree whose commits are
//! fsynced (`Durability::Immediate`), so an event appended before a 202 survives
//! `kill -9` and torn writes without a recovery routine of our own. Appends go
//! through one writer thread that commits whatever has queued up in a single
//! transaction (group commit): under a broker outage at full load, one fsync
//! covers many events.
//!
//! The drainer republishes oldest first with confirms and deletes an entry
//! only after its confirm. An entry the broker returns again is skipped for a
//! while instead of blocking the entries behind it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::publish::{Envelope, PublishError, Sink};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// The spool file's name inside `spool.dir`.
const FILE_NAME: &str = "spool.redb";
/// redb's page cache; the spool is written once and read once per entry, so
/// a small cache keeps the relay's memory low without costing throughput.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Most appends one group commit takes.
const GROUP_COMMIT_MAX: usize = 512;
/// Entries the drainer publishes concurrently per round.
const DRAIN_BATCH: usize = 64;
/// How long an entry the broker returned as unroutable waits before retrying.
const UNROUTABLE_RETRY: Duration = Duration::from_secs(30);
/// How often the drainer looks for work when nothing wakes it.
const DRAIN_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("spool is disabled")]
    Disabled,
    #[error("spool storage error: {0}")]
    Storage(String),
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

struct Append {
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    /// Feeds the writer thread; dropping every sender ends it.
    appends: mpsc::UnboundedSender<Append>,
    max_bytes: u64,
    /// Bytes and entries currently stored; kept in memory so the hot path
    /// never reads the file to check the bound.
    bytes: AtomicU64,
    depth: AtomicU64,
    depth_gauge: IntGauge,
    bytes_gauge: IntGauge,
    /// Wakes the drainer after an append.
    appended: Notify,
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
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        depth_gauge: IntGauge,
        bytes_gauge: IntGauge,
    ) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(FILE_NAME))
            .map_err(|e| {
                storage(format!(
                    "cannot open {}: {e}",
                    dir.join(FILE_NAME).display()
                ))
            })?;
        let (mut next_seq, mut depth, mut bytes) = (0u64, 0u64, 0u64);
        {
            let txn = db.begin_write().map_err(storage)?;
            {
                let table = txn.open_table(EVENTS).map_err(storage)?;
                for entry in table.iter().map_err(storage)? {
                    let (k, v) = entry.map_err(storage)?;
                    next_seq = next_seq.max(k.value() + 1);
                    depth += 1;
                    bytes += v.value().len() as u64;
                }
            }
            txn.commit().map_err(storage)?;
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            db: db.clone(),
            appends: tx,
            max_bytes,
            bytes: AtomicU64::new(bytes),
            depth: AtomicU64::new(depth),
            depth_gauge,
            bytes_gauge,
            appended: Notify::new(),
        });
        let spool = Self { inner };
        spool.update_gauges();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer_loop(db, rx, next_seq))
            .map_err(storage)?;
        if depth > 0 {
            tracing::info!(
                depth,
                bytes,
                "spool holds events from an earlier run; they will be drained"
            );
        }
        Ok(spool)
    }

    pub fn depth(&self) -> u64 {
        self.inner.depth.load(Ordering::Acquire)
    }

    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Acquire)
    }

    /// True while at least one typical event still fits.
    pub fn has_room(&self) -> bool {
        self.bytes() + 1024 <= self.inner.max_bytes
    }

    fn update_gauges(&self) {
        self.inner
            .depth_gauge
            .set(i64::try_from(self.depth()).unwrap_or(i64::MAX));
        self.inner
            .bytes_gauge
            .set(i64::try_from(self.bytes()).unwrap_or(i64::MAX));
    }

    /// Appends an envelope and returns once it is fsynced.
    pub async fn append(&self, envelope: &Envelope) -> Result<(), SpoolError> {
        let bytes = serde_json::to_vec(envelope).map_err(storage)?;
        let len = bytes.len() as u64;
        // Reserve the space first so concurrent appends cannot overshoot.
        let reserved = self.inner.bytes.fetch_add(len, Ordering::AcqRel) + len;
        if reserved > self.inner.max_bytes {
            self.inner.bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(SpoolError::Full {
                used: reserved - len,
                max: self.inner.max_bytes,
            });
        }
        let (done, wait) = oneshot::channel();
        let result = match self.inner.appends.send(Append { bytes, done }) {
            Ok(()) => wait
                .await
                .unwrap_or_else(|_| Err(storage("spool writer stopped"))),
            Err(_) => Err(storage("spool writer stopped")),
        };
        match &result {
            Ok(()) => {
                self.inner.depth.fetch_add(1, Ordering::AcqRel);
                self.inner.appended.notify_one();
            }
            Err(_) => {
                self.inner.bytes.fetch_sub(len, Ordering::AcqRel);
            }
        }
        self.update_gauges();
        result
    }

    /// The oldest entries not in `skip`, up to `limit`.
    fn oldest(
        &self,
        limit: usize,
        skip: &HashMap<u64, Instant>,
    ) -> Result<Vec<(u64, Envelope, u64)>, SpoolError> {
        let now = Instant::now();
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let seq = k.value();
            if skip.get(&seq).is_some_and(|until| *until > now) {
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

    /// Deletes entries whose publish was confirmed.
    fn remove(&self, done: &[(u64, u64)]) -> Result<(), SpoolError> {
        if done.is_empty() {
            return Ok(());
        }
        let txn = self.inner.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(EVENTS).map_err(storage)?;
            for (seq, _) in done {
                table.remove(seq).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        let bytes: u64 = done.iter().map(|(_, len)| len).sum();
        self.inner.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.inner
            .depth
            .fetch_sub(done.len() as u64, Ordering::AcqRel);
        self.update_gauges();
        Ok(())
    }

    /// Number of entries stored, read from the file (for tests and start-up).
    pub fn stored_len(&self) -> Result<u64, SpoolError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        match txn.open_table(EVENTS) {
            Ok(t) => t.len().map_err(storage),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(storage(e)),
        }
    }

    /// Republishes spooled events until `shutdown`, oldest first.
    pub async fn drain(self, sink: Arc<Sink>, shutdown: CancellationToken) {
        let mut skip: HashMap<u64, Instant> = HashMap::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(DRAIN_POLL) => {}
                () = self.inner.appended.notified() => {
                    // Give the broker a moment: an append means it just failed.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                () = shutdown.cancelled() => return,
            }
            while self.depth() > 0 && sink.is_available() && !shutdown.is_cancelled() {
                match self.drain_once(&sink, &mut skip).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "spool drain failed");
                        break;
                    }
                }
            }
            let now = Instant::now();
            skip.retain(|_, until| *until > now);
        }
    }

    /// Drains what it can within `within` (used at shutdown, after the
    /// webhook listener has stopped). Whatever is left stays on disk for the
    /// next start.
    pub async fn flush(&self, sink: &Sink, within: Duration) {
        let deadline = Instant::now() + within;
        let mut skip = HashMap::new();
        while self.depth() > 0 && sink.is_available() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.drain_once(sink, &mut skip)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "spool flush failed");
                    return;
                }
                _ => return,
            }
        }
    }

    /// One round: publish a batch concurrently, delete the confirmed ones.
    /// Returns how many were confirmed.
    async fn drain_once(
        &self,
        sink: &Sink,
        skip: &mut HashMap<u64, Instant>,
    ) -> Result<usize, SpoolError> {
        let this = self.clone();
        let skip_copy = skip.clone();
        let batch = tokio::task::spawn_blocking(move || this.oldest(DRAIN_BATCH, &skip_copy))
            .await
            .map_err(storage)??;
        if batch.is_empty() {
            return Ok(0);
        }
        let results =
            futures_util::future::join_all(batch.iter().map(|(_, env, _)| sink.publish(env))).await;
        let mut confirmed = Vec::new();
        let mut stop = false;
        for ((seq, env, len), result) in batch.iter().zip(results) {
            match result {
                Ok(()) => confirmed.push((*seq, *len)),
                Err(PublishError::Unroutable) => {
                    tracing::warn!(message_id = %env.message_id, "spooled event still unroutable; retrying later");
                    skip.insert(*seq, Instant::now() + UNROUTABLE_RETRY);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "spool drain paused");
                    stop = true;
                }
            }
        }
        let n = confirmed.len();
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.remove(&confirmed))
            .await
            .map_err(storage)??;
        if n > 0 {
            tracing::info!(
                drained = n,
                remaining = self.depth(),
                "spooled events published"
            );
        }
        if stop && n == 0 {
            return Ok(0);
        }
        Ok(n.max(1))
    }
}

fn writer_loop(db: Arc<Database>, mut rx: mpsc::UnboundedReceiver<Append>, mut next_seq: u64) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        let result = (|| -> Result<(), SpoolError> {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut table = txn.open_table(EVENTS).map_err(storage)?;
                for (i, append) in group.iter().enumerate() {
                    table
                        .insert(next_seq + i as u64, append.bytes.as_slice())
                        .map_err(storage)?;
                }
            }
            txn.commit().map_err(storage)
        })();
        if result.is_ok() {
            next_seq += group.len() as u64;
        }
        for append in group {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(storage(e)),
            };
            let _ = append.done.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::DedupMark;
    use bytes::Bytes;

    fn gauges() -> (IntGauge, IntGauge) {
        (
            IntGauge::new("d", "d").unwrap(),
            IntGauge::new("b", "b").unwrap(),
        )
    }

    fn envelope(id: &str) -> Envelope {
        Envelope {
            body: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
            message_id: id.into(),
            status: "verified".into(),
            request_id: "r".into(),
            received_at_ms: 1,
            dedup: DedupMark::Checked,
        }
    }

    #[tokio::test]
    async fn appended_entries_survive_reopening_in_order() {
        let dir = std::env::temp_dir().join(format!("spool-{}", uuid::Uuid::new_v4()));
        {
            let (d, b) = gauges();
            let spool = Spool::open(&dir, 1 << 20, d, b).unwrap();
            for i in 0..5 {
                spool.append(&envelope(&format!("e{i}"))).await.unwrap();
            }
            assert_eq!(spool.depth(), 5);
        }
        // The writer thread holds the database until its channel closes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (d, b) = gauges();
        let spool = Spool::open(&dir, 1 << 20, d, b).unwrap();
        assert_eq!(spool.depth(), 5);
        let oldest = spool.oldest(10, &HashMap::new()).unwrap();
        let ids: Vec<_> = oldest
            .iter()
            .map(|(_, e, _)| e.message_id.clone())
            .collect();
        assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
        spool.remove(&[(oldest[0].0, oldest[0].2)]).unwrap();
        assert_eq!(spool.stored_len().unwrap(), 4);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_full_spool_refuses_appends() {
        let dir = std::env::temp_dir().join(format!("spool-{}", uuid::Uuid::new_v4()));
        let (d, b) = gauges();
        let spool = Spool::open(&dir, 300, d, b).unwrap();
        spool.append(&envelope("a")).await.unwrap();
        let mut refused = false;
        for i in 0..10 {
            if matches!(
                spool.append(&envelope(&format!("x{i}"))).await,
                Err(SpoolError::Full { .. })
            ) {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(spool.bytes() <= 300);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
