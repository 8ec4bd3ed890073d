//! The drainer: republishes spooled events oldest first with confirms, and
//! deletes an entry only after its confirm (SPEC 5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Hold, Spool, SpoolError};
use crate::publish::{PublishError, Sink};

/// Entries published concurrently per round; each takes a channel of its
/// own from the publisher's pool.
const DRAIN_BATCH: usize = 256;
/// How often the drainer looks for work when nothing wakes it.
const DRAIN_POLL: Duration = Duration::from_secs(1);
/// Pause after an append before draining: an append means the broker just
/// failed to take an event.
const AFTER_APPEND: Duration = Duration::from_millis(200);

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
                match self.drain_once(&sink).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    // Already logged once by the writer; it recovers by itself.
                    Err(SpoolError::Failing) => break,
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
        while self.depth() > 0 && sink.is_available() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.drain_once(sink)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "spool flush failed");
                    return;
                }
                _ => return,
            }
        }
    }

    /// One round: publish a batch concurrently, delete the confirmed ones in
    /// one transaction. Returns how many entries were settled one way or
    /// another (0 when there was nothing to do or the broker went away).
    async fn drain_once(&self, sink: &Sink) -> Result<usize, SpoolError> {
        let this = self.clone();
        let batch = tokio::task::spawn_blocking(move || this.oldest(DRAIN_BATCH))
            .await
            .map_err(super::storage)??;
        if batch.is_empty() {
            return Ok(0);
        }
        let results =
            futures_util::future::join_all(batch.iter().map(|(_, env, _)| sink.publish(env))).await;
        let mut confirmed = Vec::new();
        let mut settled = 0usize;
        for ((seq, env, len), result) in batch.into_iter().zip(results) {
            match result {
                Ok(()) => confirmed.push((seq, len)),
                Err(error @ (PublishError::Unroutable | PublishError::Nack)) => {
                    let wait = self.back_off(seq);
                    settled += 1;
                    tracing::warn!(message_id = %env.message_id, %error, retry_in_secs = wait.as_secs(), "spooled event refused again; retrying later");
                }
                Err(PublishError::Unconfirmed(late)) => {
                    self.set_hold(seq, Hold::Pending);
                    self.settle_when_confirmed(seq, len, late);
                    settled += 1;
                }
                Err(error) => tracing::debug!(%error, "spool drain paused"),
            }
        }
        let n = confirmed.len();
        self.remove(&confirmed).await?;
        if n > 0 {
            tracing::info!(
                drained = n,
                remaining = self.depth(),
                "spooled events published"
            );
        }
        Ok(n + settled)
    }
}
