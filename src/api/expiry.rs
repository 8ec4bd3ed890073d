//! The expiry sweeper (SPEC 9.3): every `api.expiry_check_secs` it takes
//! the pending verifications past their `expiresAt` and, for each, claims
//! it with a lease, makes the `expired` event durable, then marks it
//! `expired`. The claim is atomic in the store, so with several replicas
//! exactly one publishes; a replica that dies between claim and finish
//! leaves a lease that runs out, and another replica publishes (the same
//! `message_id` `<id>:expired`, at-least-once like every message).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::store::{now_ms, ExpiryClaim, Status};
use super::Lifecycle;

/// Verifications expired per store query; the next sweep takes the rest.
const SWEEP_BATCH: usize = 100;

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

/// One pass; public so that a test can drive it without waiting.
pub async fn sweep(lifecycle: &Lifecycle, shutdown: &CancellationToken) {
    let now = now_ms();
    let due = match lifecycle.store.due(now, SWEEP_BATCH).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "expiry sweep could not read the pending index");
            return;
        }
    };
    for id in due {
        if shutdown.is_cancelled() {
            return;
        }
        expire_one(lifecycle, &id, now).await;
    }
}

async fn expire_one(lifecycle: &Lifecycle, id: &str, now: u64) {
    let token = crate::ids::random_uuid().simple().to_string();
    let record = match lifecycle
        .store
        .claim_expiry(id, now, lifecycle.expiry_lease, &token)
        .await
    {
        Ok(ExpiryClaim::Claimed(record)) => record,
        Ok(ExpiryClaim::Busy | ExpiryClaim::NotDue | ExpiryClaim::Done) => return,
        Err(e) => {
            tracing::warn!(verification_id = id, error = %e, "could not claim an expiry");
            return;
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
        }
        Err(e) => {
            tracing::warn!(verification_id = id, error = %e, "expired event not durable; retried at the next sweep");
            if let Err(e) = lifecycle.store.release_expiry(id, &token).await {
                tracing::warn!(verification_id = id, error = %e, "could not release the expiry claim; it runs out");
            }
        }
    }
}
