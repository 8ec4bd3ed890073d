//! The expiry sweeper (SPEC 9.3): every `api.expiry_check_secs` it takes
//! the pending verifications past their `expiresAt` and, for each, claims
//! it with a lease, makes the `expired` event durable, then marks it
//! `expired`. The claim is atomic in the store, so with several replicas
//! exactly one publishes; a replica that dies between claim and finish
//! leaves a lease that runs out, and another replica publishes (the same
//! `message_id` `<id>:expired`, at-least-once like every message).

use std::sync::Arc;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::store::{now_ms, ExpiryClaim, Status};
use super::Lifecycle;

/// Verifications taken per store query.
const SWEEP_BATCH: usize = 500;
/// Expiries in flight at once: each waits for its publish's confirm, so one
/// at a time would make a sweep as slow as the broker's latency times the
/// backlog (SPEC 9.3 asks for 1,000 a second per replica).
const SWEEP_CONCURRENCY: usize = 64;

/// Sweeps until `shutdown`.
pub async fn run(lifecycle: Arc<Lifecycle>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(lifecycle.expiry_check) => {}
            () = shutdown.cancelled() => return,
        }
        sweep(&lifecycle, &shutdown).await;
    }
}

/// One pass: batch after batch until nothing due is left (or nothing in a
/// batch could be expired: every id claimed by another replica), each
/// batch worked on `SWEEP_CONCURRENCY` ids at once; public so that a test
/// can drive it without waiting.
pub async fn sweep(lifecycle: &Lifecycle, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        let due = match lifecycle.store.due(now_ms(), SWEEP_BATCH).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "expiry sweep could not read the pending index");
                return;
            }
        };
        let full = due.len() == SWEEP_BATCH;
        let expired = futures_util::stream::iter(due)
            .take_while(|_| std::future::ready(!shutdown.is_cancelled()))
            .map(|id| async move { expire_one(lifecycle, &id).await })
            .buffer_unordered(SWEEP_CONCURRENCY)
            .filter(|expired| std::future::ready(*expired))
            .count()
            .await;
        if !full || expired == 0 {
            return;
        }
    }
}

/// Claims, publishes and finishes one expiry; true when this call expired
/// it. The claim's lease starts now, at the claim, not when the sweep
/// found the id (SPEC 9.3): a batch behind a slow publish still gets whole
/// leases.
async fn expire_one(lifecycle: &Lifecycle, id: &str) -> bool {
    let token = crate::ids::random_uuid().simple().to_string();
    let record = match lifecycle
        .store
        .claim_expiry(id, now_ms(), lifecycle.expiry_lease, &token)
        .await
    {
        Ok(ExpiryClaim::Claimed(record)) => record,
        Ok(ExpiryClaim::Busy | ExpiryClaim::NotDue | ExpiryClaim::Done) => return false,
        Err(e) => {
            tracing::warn!(verification_id = id, error = %e, "could not claim an expiry");
            return false;
        }
    };
    let request_id = format!("expiry-{token}");
    match lifecycle
        .publish_event(&record, Status::Expired, &request_id)
        .await
    {
        Ok(durable) => {
            lifecycle.metrics.verifications_expired.inc();
            tracing::info!(verification_id = id, request_id, outcome = ?durable, "verification expired; event published");
            if let Err(e) = lifecycle.store.finish_expiry(id, &token).await {
                // The event is safe; the lease runs out and another sweep
                // may publish it again with the same message_id.
                tracing::warn!(verification_id = id, error = %e, "could not mark the verification expired");
            }
            true
        }
        Err(e) => {
            tracing::warn!(verification_id = id, error = %e, "expired event not durable; retried at the next sweep");
            if let Err(e) = lifecycle.store.release_expiry(id, &token).await {
                tracing::warn!(verification_id = id, error = %e, "could not release the expiry claim; it runs out");
            }
            false
        }
    }
}
