//! The spool's storage: one redb file written by one thread.
//!
//! redb is a checksummed, crash-safe B-tree whose commits are fsynced
//! (`Durability::Immediate`), so an event appended before a 202 survives
//! `kill -9` and torn writes without a recovery routine of our own. Every
//! write (appends and removals) goes through the writer thread, which commits
//! whatever has queued up in one transaction (group commit): under a broker
//! outage at full load one fsync covers many events, and a drain round's
//! removals cost one fsync.
//!
//! redb latches its first I/O error: a database that failed a commit refuses
//! every later one. So after a storage error the writer drops the database
//! and reopens it (which repairs it) until a probe write succeeds; meanwhile
//! every write is refused at once (SPEC 5).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Shared, SpoolError};

pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// What the drainer learnt about an entry ([`Meta`] as JSON), under the
/// entry's key; only entries the broker refused or an operator touched
/// have one. Written and deleted in the same transactions as `EVENTS`.
pub(super) const META: TableDefinition<u64, &[u8]> = TableDefinition::new("meta");
/// A scratch table the recovery probe writes to and clears.
const PROBE: TableDefinition<u8, &[u8]> = TableDefinition::new("probe");
/// Bytes the recovery probe writes: a few typical events' worth, so a disk
/// with room for nothing fails the probe.
const PROBE_BYTES: usize = 16 * 1024;
/// The spool file's name inside `spool.dir`.
pub(super) const FILE_NAME: &str = "spool.redb";
/// redb's page cache; the spool is written once and read once per entry, so
/// a small cache keeps the relay's memory low without costing throughput.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Most commands one group commit takes.
const GROUP_COMMIT_MAX: usize = 512;
/// How often a failing store tries to reopen when no write asks for it.
pub(super) const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// A file of this size kept beside the database: a copy-on-write store
/// needs free pages to delete anything, so a spool that filled its disk
/// could never drain. When the store cannot be reopened the reserve is
/// released, which gives the drainer room to delete what it publishes;
/// appends are refused until the spool is empty and the reserve is back.
const RESERVE_BYTES: usize = 1024 * 1024;
/// The reserve's name inside `spool.dir`.
const RESERVE_FILE: &str = "reserve";

/// The reserve file beside the database at `path`.
fn reserve_path(path: &Path) -> std::path::PathBuf {
    path.with_file_name(RESERVE_FILE)
}

/// Writes the reserve (fsynced) if it is missing; true when it is there.
pub(super) fn ensure_reserve(path: &Path) -> bool {
    let reserve = reserve_path(path);
    if reserve.is_file() {
        return true;
    }
    let written = std::fs::File::create(&reserve).and_then(|mut file| {
        std::io::Write::write_all(&mut file, &vec![0u8; RESERVE_BYTES])?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&reserve);
        tracing::warn!(error = %e, "could not write the spool's disk reserve");
        return false;
    }
    true
}

/// An entry's refusals and state, kept beside it in the store so that a
/// dead entry stays dead and an entry's attempts survive a restart (SPEC 5).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Meta {
    /// Refusals (returns and nacks) since it was spooled or last retried by
    /// an operator.
    #[serde(default)]
    pub(crate) attempts: u32,
    /// What the broker said last time.
    #[serde(default)]
    pub(crate) last_error: Option<String>,
    /// No longer retried by itself.
    #[serde(default)]
    pub(crate) dead: bool,
    /// When an operator last retried it (Unix ms): its age for
    /// `spool.max_age_secs` counts from then.
    #[serde(default)]
    pub(crate) age_from_ms: Option<u64>,
}

impl Meta {
    pub(super) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(super) fn decode(raw: &[u8]) -> Meta {
        serde_json::from_slice(raw).unwrap_or_default()
    }
}

/// The one field of an entry the counts need: its age.
#[derive(serde::Deserialize)]
struct Stamp {
    received_at_ms: u64,
}

/// The receive time of an encoded entry, 0 when it cannot be read.
pub(super) fn received_at_ms(raw: &[u8]) -> u64 {
    serde_json::from_slice::<Stamp>(raw).map_or(0, |s| s.received_at_ms)
}

/// A write for the writer thread.
pub(super) enum Command {
    /// Insert `bytes` under `seq`, with its first `meta` if it has one.
    Append {
        seq: u64,
        bytes: Vec<u8>,
        meta: Option<Vec<u8>>,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Delete these entries (and their meta).
    Remove {
        seqs: Vec<u64>,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Replace the meta of `seq`, if the entry is still there.
    Mark {
        seq: u64,
        meta: Meta,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
}

pub(super) fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

/// Opens (or creates and repairs) the database in `path`.
pub(super) fn open(path: &Path) -> Result<Database, SpoolError> {
    Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))
}

/// What the store holds, counted from the file.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) next_seq: u64,
    pub(super) depth: u64,
    pub(super) bytes: u64,
    pub(super) dead: u64,
    /// Receive time of the oldest entry (Unix ms), 0 when empty.
    pub(super) oldest_ms: u64,
    /// Every entry's meta, for the drainer's holds.
    pub(super) metas: Vec<(u64, Meta)>,
}

/// Counts the stored entries.
pub(super) fn count(db: &impl ReadableDatabase) -> Result<Counts, SpoolError> {
    let mut counts = Counts::default();
    let txn = db.begin_read().map_err(storage)?;
    let table = match txn.open_table(EVENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(counts),
        Err(e) => return Err(storage(e)),
    };
    for entry in table.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        if counts.depth == 0 {
            counts.oldest_ms = received_at_ms(v.value());
        }
        counts.next_seq = counts.next_seq.max(k.value() + 1);
        counts.depth += 1;
        counts.bytes += v.value().len() as u64;
    }
    match txn.open_table(META) {
        Ok(meta) => {
            for entry in meta.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let meta = Meta::decode(v.value());
                counts.dead += u64::from(meta.dead);
                counts.metas.push((k.value(), meta));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(storage(e)),
    }
    Ok(counts)
}

/// Writes and clears a scratch entry: proof that commits work again.
fn probe(db: &Database) -> Result<(), SpoolError> {
    let filler = vec![0u8; PROBE_BYTES];
    for insert in [true, false] {
        let txn = db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(PROBE).map_err(storage)?;
            if insert {
                table.insert(0, filler.as_slice()).map_err(storage)?;
            } else {
                table.remove(0).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
    }
    Ok(())
}

/// The writer thread: group commits until every sender is gone.
pub(super) fn writer_loop(shared: &Shared, path: &Path, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut last_reopen = Instant::now();
    loop {
        let first = if shared.is_failing() {
            // Wake up on our own too, so readiness recovers without traffic.
            match recv_timeout(&mut rx, REOPEN_EVERY) {
                Recv::Closed => return,
                Recv::Timeout => {
                    try_reopen(shared, path, &mut last_reopen);
                    continue;
                }
                Recv::Got(command) => {
                    try_reopen(shared, path, &mut last_reopen);
                    command
                }
            }
        } else {
            match rx.blocking_recv() {
                Some(command) => command,
                None => return,
            }
        };
        let mut group = vec![first];
        while group.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        shared.committing(true);
        let result = match shared.database() {
            Some(db) => commit(&db, &group),
            None => Err(SpoolError::Failing),
        };
        shared.committing(false);
        // Whatever became of them, the appends of this group no longer
        // need their reserved room: committed, they are counted below.
        let reserved: u64 = group
            .iter()
            .map(|c| match c {
                Command::Append { bytes, .. } => bytes.len() as u64,
                Command::Remove { .. } | Command::Mark { .. } => 0,
            })
            .sum();
        if let Ok(change) = &result {
            shared.apply(change);
            if shared.reserve_released() && shared.depth.load(Ordering::Acquire) == 0 {
                // Drained: take the reserve back, and appends again. Without
                // room for it the spool still works, as it would without one.
                let restored = ensure_reserve(path);
                shared.set_reserve_released(false);
                tracing::info!(
                    reserve = restored,
                    "spool drained after its disk was full; appends are taken again"
                );
            }
        }
        shared.reserved.fetch_sub(reserved, Ordering::AcqRel);
        if let Err(e) = &result {
            if !matches!(e, SpoolError::Failing) {
                tracing::error!(error = %e, "spool write failed; refusing writes until the store can be reopened");
                shared.fail();
                last_reopen = Instant::now();
            }
        }
        for command in group {
            let (done, answer) = match command {
                Command::Append { done, .. }
                | Command::Remove { done, .. }
                | Command::Mark { done, .. } => {
                    let answer = match &result {
                        Ok(_) => Ok(()),
                        Err(SpoolError::Failing) => Err(SpoolError::Failing),
                        Err(e) => Err(storage(e)),
                    };
                    (done, answer)
                }
            };
            let _ = done.send(answer);
        }
    }
}

/// What one committed group did to the table: the change of the counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Change {
    pub(super) added: u64,
    pub(super) added_bytes: u64,
    pub(super) removed: u64,
    pub(super) removed_bytes: u64,
    /// Entries that became dead, and dead entries retried or removed.
    pub(super) died: u64,
    pub(super) revived: u64,
    /// Receive time of the oldest entry after the commit, 0 when empty.
    pub(super) oldest_ms: u64,
}

/// Commits a group in one transaction and says what it really changed: an
/// insert over an existing key or the removal of a missing one is counted
/// for what it did to the file, not for what was asked.
fn commit(db: &Database, group: &[Command]) -> Result<Change, SpoolError> {
    let mut change = Change::default();
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut table = txn.open_table(EVENTS).map_err(storage)?;
        let mut metas = txn.open_table(META).map_err(storage)?;
        // Only a dead meta changes a count when it goes.
        let drop_meta = |metas: &mut redb::Table<u64, &[u8]>, seq: u64| {
            let was_dead = metas
                .remove(seq)
                .map_err(storage)?
                .is_some_and(|old| Meta::decode(old.value()).dead);
            Ok::<bool, SpoolError>(was_dead)
        };
        for command in group {
            match command {
                Command::Append {
                    seq, bytes, meta, ..
                } => {
                    let old = table.insert(*seq, bytes.as_slice()).map_err(storage)?;
                    if let Some(old) = old {
                        change.removed += 1;
                        change.removed_bytes += old.value().len() as u64;
                    }
                    change.revived += u64::from(drop_meta(&mut metas, *seq)?);
                    if let Some(meta) = meta {
                        metas.insert(*seq, meta.as_slice()).map_err(storage)?;
                    }
                    change.added += 1;
                    change.added_bytes += bytes.len() as u64;
                }
                Command::Remove { seqs, .. } => {
                    for seq in seqs {
                        if let Some(old) = table.remove(*seq).map_err(storage)? {
                            change.removed += 1;
                            change.removed_bytes += old.value().len() as u64;
                        }
                        change.revived += u64::from(drop_meta(&mut metas, *seq)?);
                    }
                }
                Command::Mark { seq, meta, .. } => {
                    if table.get(*seq).map_err(storage)?.is_none() {
                        continue;
                    }
                    let was_dead = drop_meta(&mut metas, *seq)?;
                    metas
                        .insert(*seq, meta.encode().as_slice())
                        .map_err(storage)?;
                    match (was_dead, meta.dead) {
                        (false, true) => change.died += 1,
                        (true, false) => change.revived += 1,
                        _ => {}
                    }
                }
            }
        }
        change.oldest_ms = table
            .first()
            .map_err(storage)?
            .map_or(0, |(_, v)| received_at_ms(v.value()));
    }
    txn.commit().map_err(storage)?;
    Ok(change)
}

fn try_reopen(shared: &Shared, path: &Path, last: &mut Instant) {
    if last.elapsed() < REOPEN_EVERY / 4 {
        return;
    }
    *last = Instant::now();
    let reopened = open(path).and_then(|db| {
        probe(&db)?;
        let counts = count(&db)?;
        Ok((db, counts))
    });
    let reopened = match reopened {
        Err(e)
            if !shared.reserve_released() && std::fs::remove_file(reserve_path(path)).is_ok() =>
        {
            shared.set_reserve_released(true);
            tracing::warn!(error = %e, reserve_bytes = RESERVE_BYTES, "spool store cannot be reopened; released its disk reserve so that spooled events can drain; appends are refused until the spool is empty");
            open(path).and_then(|db| {
                probe(&db)?;
                let counts = count(&db)?;
                Ok((db, counts))
            })
        }
        other => other,
    };
    match reopened {
        Ok((db, counts)) => {
            let depth = counts.depth;
            shared.recover(Arc::new(db), &counts);
            tracing::info!(depth, "spool store reopened; writes work again");
        }
        Err(e) => tracing::debug!(error = %e, "spool store still failing"),
    }
}

enum Recv {
    Got(Command),
    Timeout,
    Closed,
}

fn recv_timeout(rx: &mut mpsc::UnboundedReceiver<Command>, within: Duration) -> Recv {
    let deadline = Instant::now() + within;
    loop {
        match rx.try_recv() {
            Ok(command) => return Recv::Got(command),
            Err(mpsc::error::TryRecvError::Disconnected) => return Recv::Closed,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        if Instant::now() >= deadline {
            return Recv::Timeout;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
