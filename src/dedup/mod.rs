//! Deduplication by verification id, in two phases (SPEC 3): `claim` takes a
//! short lease holding a unique token, `commit` turns it into the full-TTL
//! record once the event is durable, `release` gives it back (only if it is
//! still ours) when the event could not be made durable.
//!
//! Committing before the event is safe would lose events whenever publishing
//! fails, so the lease is the only thing written up front.
//!
//! Redis is reached per `redis.mode` (SPEC 11) through
//! [`crate::redis_conn`]: one server, a Redis Cluster (keys hash-tagged by
//! id here) or a master found through Sentinel; the scripts are the same in
//! every mode.
//!
//! - this file: the policy, the results, [`Dedup`], which dispatches to one
//!   store, and the Redis time bounds every Redis user of the relay shares.
//! - `redis`: [`RedisDedup`], its commands and scripts.
//! - `memory`: [`MemoryDedup`] and the tests of the claim rules.

mod memory;
mod redis;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::payload::{Status, VerificationId, VerifiedTime};

pub use memory::MemoryDedup;
pub use redis::RedisDedup;

/// What happens to a webhook while the dedup store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Publish without the dedup check (counted as skipped).
    Publish,
    /// Answer 503 so the sender retries.
    Reject,
}

/// How long one Redis command may take before the store counts as down: a
/// webhook must not wait on a blackholed Redis longer than this.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Connecting is allowed a little longer (TLS handshakes, DNS).
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one dedup operation (claim, commit or release, with its one
/// retry) may take: a reconnect and an answer.
pub const REDIS_OP_MAX: Duration = Duration::from_secs(3);

/// Stored value prefixes: a lease is `lease:<token>`, a committed record is
/// JSON and never starts with that prefix.
const LEASE_PREFIX: &str = "lease:";

/// Why a dedup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// Redis did not answer (in time).
    #[error("dedup store unavailable: {0}")]
    Unavailable(String),
    /// The lease expired and another claim took the id before the commit.
    #[error("lease was lost before commit (expired or taken over)")]
    LeaseLost,
}

impl From<::redis::RedisError> for DedupError {
    fn from(e: ::redis::RedisError) -> Self {
        DedupError::Unavailable(e.to_string())
    }
}

/// The result of a claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id is ours to publish; carry the token to commit or release.
    Claimed(LeaseToken),
    /// Already accepted within the dedup window.
    Duplicate,
    /// Someone (this or another replica) is processing it now.
    InFlight,
}

/// A unique token proving which claim holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken(String);

impl LeaseToken {
    fn new() -> Self {
        Self(format!(
            "{LEASE_PREFIX}{}",
            crate::ids::random_uuid().simple()
        ))
    }
}

/// Dedup settings converted to what the store needs.
#[derive(Debug, Clone)]
pub struct DedupPolicy {
    /// `dedup.key_prefix`.
    pub key_prefix: String,
    /// `dedup.ttl_secs`: how long a committed id counts as a duplicate.
    pub ttl: Duration,
    /// `dedup.lease_secs`: how long a claim holds an id uncommitted.
    pub lease: Duration,
}

/// The dedup store: Redis (shared by replicas) or memory (one process).
pub enum Dedup {
    /// Boxed: the Redis clients are far larger than the in-memory map.
    Redis(Box<RedisDedup>),
    /// One process only.
    Memory(MemoryDedup),
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dedup::Redis(_) => f.write_str("Dedup::Redis"),
            Dedup::Memory(_) => f.write_str("Dedup::Memory"),
        }
    }
}

impl Dedup {
    /// Takes a lease on `id`, unless it is committed or leased already.
    #[tracing::instrument(name = "claim", level = "debug", skip_all)]
    pub async fn claim(&self, id: &VerificationId) -> Result<Claim, DedupError> {
        match self {
            Dedup::Redis(r) => r.claim(id).await,
            Dedup::Memory(m) => Ok(m.claim(id, Instant::now())),
        }
    }

    /// Once the event is durable: turns the lease into the full-TTL record
    /// (`{"status","verifiedTime"}`, which the lifecycle API reads).
    #[tracing::instrument(name = "commit", level = "debug", skip_all)]
    pub async fn commit(
        &self,
        id: &VerificationId,
        token: &LeaseToken,
        status: &Status,
        verified_time: VerifiedTime,
    ) -> Result<(), DedupError> {
        let record =
            serde_json::json!({"status": status.as_str(), "verifiedTime": verified_time.millis()})
                .to_string();
        match self {
            Dedup::Redis(r) => r.commit(id, token, &record).await,
            Dedup::Memory(m) => m.commit(id, token, record, Instant::now()),
        }
    }

    /// When the event could not be made durable: gives the lease back if it
    /// is still ours, so the sender's retry is not taken for a duplicate.
    #[tracing::instrument(name = "release", level = "debug", skip_all)]
    pub async fn release(&self, id: &VerificationId, token: &LeaseToken) -> Result<(), DedupError> {
        match self {
            Dedup::Redis(r) => r.release(id, token).await,
            Dedup::Memory(m) => {
                m.release(id, token);
                Ok(())
            }
        }
    }

    /// Checks the store answers (for the `redis_connected` gauge).
    pub async fn ping(&self) -> bool {
        match self {
            Dedup::Redis(r) => r.ping().await,
            Dedup::Memory(_) => true,
        }
    }
}
