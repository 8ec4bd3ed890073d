//! The drainer: republishes spooled events oldest first with confirms, and
//! deletes an entry only after its confirm (SPEC 5).
//!
//! A pass keeps [`DRAIN_IN_FLIGHT`] publishes outstanding all the time
//! instead of publishing in rounds: a round waits for its slowest confirm and
//! then for its removal's fsync before the next one starts, which left the
//! broker idle most of the time (measured: ~1,500 events/s against a broker
//! that confirms 18-22k msg/s). Reads move forward through the table from a
//! cursor, refilled as confirms come back, and the confirmed entries are
//! deleted by one removal at a time, whatever has been confirmed since the
//! previous one (the writer thread's group commit: one fsync per removal),
//! while the next publishes are already in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio_util::sync::CancellationToken;

use super::{Hold, Spool, SpoolError};
use crate::message::Envelope;
use crate::publish::{Delivered, PublishError, Sink};

/// Publishes outstanding at once while draining; each takes a channel of its
/// own from the publisher's pool (512 at most, shared with live traffic).
const DRAIN_IN_FLIGHT: usize = 256;
/// Entries read per refill: once this many slots are free, so that a read
/// transaction and its JSON decoding are paid per batch, not per entry.
const REFILL_BATCH: usize = 64;
/// How often the drainer looks for work when nothing wakes it.
const DRAIN_POLL: Duration = Duration::from_secs(1);
/// Pause after an append before draining: an append means the broker just
/// failed to take an event.
const AFTER_APPEND: Duration = Duration::from_millis(200);

/// Confirms still outstanding when a flush reaches its deadline get this
/// much longer, so that what the broker took is also deleted; the shutdown
/// stays bounded.
const FLUSH_SETTLE: Duration = Duration::from_secs(1);

/// What finished inside a drain pass.
enum Done {
    /// One entry's publish: (sequence number, envelope, result).
    Published(u64, Envelope, Result<Delivered, PublishError>),
    /// One removal of confirmed entries (sequence numbers).
    Removed(Result<(), SpoolError>, Vec<u64>),
}

type Work<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

impl Spool {
    /// Republishes spooled events until `shutdown`, oldest first.
    pub async fn drain(self, sink: Arc<Sink>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(DRAIN_POLL) => {}
                () = self.inner.appended.notified() => {
                    tokio::select! {
                        () = tokio::time::sleep(AFTER_APPEND) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                () = shutdown.cancelled() => return,
            }
            while self.depth() > 0 && sink.is_available() && !shutdown.is_cancelled() {
                match self.drain_pass(&sink, None, &shutdown).await {
                    // Nothing left; or the storage is failing, which the
                    // writer logged once already and recovers from by itself.
                    Ok(0) | Err(SpoolError::Failing) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "spool drain failed");
                        break;
                    }
                }
            }
        }
    }

    /// Drains what it can within `within` (used at shutdown, after the
    /// webhook listener has stopped). Whatever is left stays on disk for the
    /// next start.
    pub async fn flush(&self, sink: &Sink, within: Duration) {
        let deadline = Instant::now() + within;
        let never = CancellationToken::new();
        while self.depth() > 0 && sink.is_available() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            // The pass stops publishing at the deadline; the timeout only
            // bounds the confirms still outstanding then.
            let pass = self.drain_pass(sink, Some(deadline), &never);
            match tokio::time::timeout(left + FLUSH_SETTLE, pass).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "spool flush failed");
                    return;
                }
                _ => return,
            }
        }
    }

    /// One pass from the oldest entry to the newest: keeps up to
    /// [`DRAIN_IN_FLIGHT`] publishes outstanding, deletes confirmed entries
    /// as they come, and stops taking new entries at the end of the table, at
    /// `deadline`, on `stop`, or when the broker goes away. Returns how many
    /// entries were settled one way or another (0 when there was nothing to
    /// do or the broker went away at once).
    async fn drain_pass(
        &self,
        sink: &Sink,
        deadline: Option<Instant>,
        stop: &CancellationToken,
    ) -> Result<usize, SpoolError> {
        let mut work: FuturesUnordered<Work<'_>> = FuturesUnordered::new();
        let mut publishing = 0usize;
        let mut removing = false;
        // Everything before the cursor was taken by this pass: an entry in
        // flight or awaiting its removal is never read twice.
        let mut cursor = 0u64;
        let mut exhausted = false;
        let mut confirmed: Vec<u64> = Vec::new();
        let mut settled = 0usize;
        let mut removed = 0usize;
        let mut failure = None;
        loop {
            let stopping = stop.is_cancelled()
                || deadline.is_some_and(|d| Instant::now() >= d)
                || !sink.is_available();
            if !exhausted && !stopping && DRAIN_IN_FLIGHT - publishing >= REFILL_BATCH {
                let want = DRAIN_IN_FLIGHT - publishing;
                let batch = match self.read_batch(cursor, want).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        // The publishes in flight still finish and their
                        // entries are still deleted: dropping them would
                        // send those events again later.
                        failure = Some(e);
                        Vec::new()
                    }
                };
                if batch.len() < want {
                    exhausted = true;
                }
                for (seq, envelope) in batch {
                    cursor = seq + 1;
                    if !self.take(seq) {
                        // An operator is dropping it.
                        continue;
                    }
                    publishing += 1;
                    work.push(Box::pin(async move {
                        let result = sink.publish(&envelope).await;
                        Done::Published(seq, envelope, result)
                    }));
                }
            }
            if !removing && !confirmed.is_empty() {
                let batch = std::mem::take(&mut confirmed);
                let spool = self.clone();
                removing = true;
                work.push(Box::pin(async move {
                    let result = spool.remove(&batch).await;
                    Done::Removed(result, batch)
                }));
            }
            let Some(done) = work.next().await else {
                break;
            };
            match done {
                Done::Published(seq, envelope, result) => {
                    publishing -= 1;
                    if result.is_err() {
                        self.release(&[seq]);
                    }
                    match result {
                        // Dropped too: the configuration lets it go.
                        Ok(_) => confirmed.push(seq),
                        Err(error @ (PublishError::Unroutable | PublishError::Nack)) => {
                            settled += 1;
                            if let Some(wait) = self.refused(seq, &envelope, &error) {
                                tracing::warn!(message_id = %envelope.message_id, %error, retry_in_secs = wait.as_secs(), "spooled event refused again; retrying later");
                            }
                        }
                        Err(PublishError::Unconfirmed(late)) => {
                            self.set_hold(seq, Hold::Pending);
                            self.settle_when_confirmed(seq, late);
                            settled += 1;
                        }
                        Err(error) => {
                            // The broker went away: take nothing more this pass.
                            exhausted = true;
                            tracing::debug!(%error, "spool drain paused");
                        }
                    }
                }
                Done::Removed(result, batch) => {
                    removing = false;
                    self.release(&batch);
                    match result {
                        Ok(()) => removed += batch.len(),
                        Err(e) => {
                            // Left in place: a later pass publishes them again.
                            exhausted = true;
                            failure = Some(e);
                        }
                    }
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                drained = removed,
                remaining = self.depth(),
                "spooled events published"
            );
        }
        match failure {
            Some(e) if removed == 0 => Err(e),
            Some(e) => {
                tracing::error!(error = %e, "spool drain pass cut short; the rest waits for the next pass");
                Ok(removed + settled)
            }
            None => Ok(removed + settled),
        }
    }

    /// Takes `seq` for publishing; false when an operator is dropping it.
    fn take(&self, seq: u64) -> bool {
        self.inner
            .busy
            .lock()
            .is_ok_and(|mut busy| busy.insert(seq))
    }

    /// Gives entries back once published and removed, or refused.
    pub(super) fn release(&self, seqs: &[u64]) {
        if let Ok(mut busy) = self.inner.busy.lock() {
            for seq in seqs {
                busy.remove(seq);
            }
        }
    }

    /// The next entries of a pass, read off the async threads.
    async fn read_batch(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope)>, SpoolError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.oldest_from(from, limit))
            .await
            .map_err(super::storage)?
    }
}
