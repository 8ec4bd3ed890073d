//! Stopping the application in order (SPEC 6): readiness goes 503, the
//! listeners finish in-flight requests within the grace period, the webhook
//! pipelines finish even past it, the spool gets one last push, background
//! tasks stop, and the admin listener goes last.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Application;

/// Longest the shutdown spends pushing spooled events to the broker; the
/// rest drains at the next start.
const SHUTDOWN_FLUSH_MAX: Duration = Duration::from_secs(5);
/// Longest the background tasks (broker supervisor, Redis pinger) get to
/// stop after the listener has drained; closing the AMQP channel is quick.
const BACKGROUND_STOP_MAX: Duration = Duration::from_secs(3);
/// How long past the grace period the spool may take to stop (the drainer's
/// last removal, the final flush) before the shutdown gives up on it: a
/// stalled disk must not turn a SIGTERM into a SIGKILL (SPEC 6).
const SPOOL_STOP_SLACK: Duration = Duration::from_secs(3);

/// The spool did not stop within the grace period and its slack.
#[derive(Debug, thiserror::Error)]
#[error("the spool did not finish within the grace period ({0:?} past it); every event answered 202 was fsynced before its answer and drains at the next start")]
pub struct SpoolStalled(Duration);

impl Application {
    /// Serves until `shutdown` is cancelled, then drains in order: readiness
    /// goes 503, the webhook listener stops accepting and finishes in-flight
    /// requests within the grace period, background tasks stop (the AMQP
    /// channel is closed cleanly, the spool is already fsynced), and the
    /// admin listener stops last.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        shutdown.cancelled().await;
        self.accepting.store(false, Ordering::Release);
        tracing::info!(
            grace_secs = self.grace.as_secs(),
            "shutting down: readiness is 503, finishing in-flight webhooks"
        );
        let started = Instant::now();
        let api_stopped = async {
            if let Some(api) = &self.api_server {
                api.stop(true).await;
            }
        };
        futures_util::future::join(self.webhook_server.stop(true), api_stopped).await;
        if started.elapsed() >= self.grace {
            tracing::warn!(
                grace_secs = self.grace.as_secs(),
                "grace period ran out; remaining connections were closed"
            );
        }
        // Pipelines outlive the HTTP workers: a publish confirmed just before
        // the deadline still gets its dedup commit.
        self.pipelines.close();
        let left = self
            .grace
            .saturating_sub(started.elapsed())
            .max(self.pipelines_min_wait);
        if tokio::time::timeout(left, self.pipelines.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = self.pipelines.len(),
                "webhook pipelines did not finish in time; their leases expire"
            );
        }
        // Stop the drainer first, then give the spool one last bounded
        // chance to reach the broker while the channel is still open. Both
        // wait on the disk, so both are bounded by the grace period plus a
        // slack: a stalled disk ends the shutdown with exit 1, not a hang.
        let spool_deadline =
            tokio::time::Instant::from_std(started + self.grace + SPOOL_STOP_SLACK);
        let mut stalled = None;
        if let Some(drainer) = self.drainer {
            self.drain_stop.cancel();
            if tokio::time::timeout_at(spool_deadline, drainer)
                .await
                .is_err()
            {
                stalled = Some(SpoolStalled(SPOOL_STOP_SLACK));
            }
        }
        if let (Some(spool), None) = (&self.spool, &stalled) {
            let left = self
                .grace
                .saturating_sub(started.elapsed())
                .min(SHUTDOWN_FLUSH_MAX);
            let flush = spool.flush(&self.sink, left);
            if tokio::time::timeout_at(spool_deadline, flush)
                .await
                .is_err()
            {
                stalled = Some(SpoolStalled(SPOOL_STOP_SLACK));
            }
        }
        if let Some(stalled) = &stalled {
            tracing::error!(error = %stalled, "shutdown: giving up on the spool; exiting 1");
        }
        self.background.token.cancel();
        // One bound for all of them together: a hung task must not stretch
        // the shutdown past what an orchestrator allows.
        let tasks = futures_util::future::join_all(self.background.tasks);
        if tokio::time::timeout(BACKGROUND_STOP_MAX, tasks)
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop in time; exiting anyway");
        }
        if let Some(spool) = &self.spool {
            if spool.depth() > 0 {
                tracing::info!(
                    depth = spool.depth(),
                    "spooled events remain; they drain at the next start"
                );
            }
        }
        self.admin_server.stop(true).await;
        for server in self.servers {
            let _ = server.await;
        }
        if let Some(stalled) = stalled {
            return Err(stalled.into());
        }
        tracing::info!("stopped");
        Ok(())
    }
}
