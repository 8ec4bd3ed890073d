//! What the lifecycle API remembers: verification records, the index of
//! pending verifications by expiry, and idempotency keys. In Redis (shared by
//! replicas) or in memory (one process, `dedup.backend = "memory"`).
//!
//! Expiring is claim -> publish -> finish: a claim is a lease in the record,
//! so a replica that dies after claiming leaves the work to another once the
//! lease runs out, and the `expired` status is only written after the event
//! is durable.
//!
//! - this file: the records and answers, [`StorePolicy`], [`StoreError`] and
//!   [`Store`], which dispatches to one backend.
//! - `redis`: [`RedisStore`], its key layout and Lua scripts.
//! - `memory`: [`MemoryStore`].

mod memory;
mod redis;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// Where a verification is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created through the API; neither verified nor past its expiry.
    Pending,
    /// A webhook reported it verified.
    Verified,
    /// Past its expiry unverified; the `expired` event was published.
    Expired,
}

impl Status {
    /// The lowercase name used in JSON, in Redis and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Verified => "verified",
            Status::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Status::Pending),
            "verified" => Some(Status::Verified),
            "expired" => Some(Status::Expired),
            _ => None,
        }
    }
}

/// One verification as the relay knows it. Times are Unix milliseconds;
/// `None` where the relay does not know (an id seen only in a webhook has
/// no `createdAt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// SendTalk's verification id.
    pub id: String,
    /// The phone it was sent to; `None` when the relay never learnt it.
    pub user_phone: Option<String>,
    /// As stored; [`Record::status_at`] is what a client sees.
    pub status: Status,
    /// Set only for a verification created through the API.
    pub created_at_ms: Option<u64>,
    /// Set only for a verification created through the API.
    pub expires_at_ms: Option<u64>,
    /// SendTalk's `verifiedTime`, once verified.
    pub verified_time_ms: Option<u64>,
}

impl Record {
    /// A verification just created through the API.
    pub fn pending(id: &str, user_phone: &str, created_at_ms: u64, expires_at_ms: u64) -> Self {
        Self {
            id: id.to_string(),
            user_phone: Some(user_phone.to_string()),
            status: Status::Pending,
            created_at_ms: Some(created_at_ms),
            expires_at_ms: Some(expires_at_ms),
            verified_time_ms: None,
        }
    }

    /// True when it was created through the API (not only seen in a webhook).
    pub fn created_here(&self) -> bool {
        self.created_at_ms.is_some()
    }

    /// The status a client sees at `now_ms`: a pending record past its
    /// expiry is `expired` even before the sweeper has announced it.
    pub fn status_at(&self, now_ms: u64) -> Status {
        match (self.status, self.expires_at_ms) {
            (Status::Pending, Some(exp)) if exp <= now_ms => Status::Expired,
            (status, _) => status,
        }
    }
}

/// A stored idempotent answer (SPEC 9.1), replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body, as sent.
    pub body: String,
    /// The `Location` header of a 201.
    #[serde(default)]
    pub location: Option<String>,
}

/// What an idempotency key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IdemValue {
    /// The request body's canonical JSON digest.
    fingerprint: String,
    /// `None` while the first request runs.
    answer: Option<StoredAnswer>,
}

/// The result of presenting an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdemBegin {
    /// The key was free: this request runs and must finish it.
    Started,
    /// The same key came with another body.
    Reused,
    /// The first request with this key is still running.
    Running,
    /// The stored answer of the first request.
    Done(StoredAnswer),
}

/// How an expiry claim ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpiryClaim {
    /// Ours to publish: the record as it stands.
    Claimed(Record),
    /// Another replica holds the lease.
    Busy,
    /// Not due yet (its expiry moved, or the clock disagrees).
    NotDue,
    /// Nothing left to do: verified, already expired or gone.
    Done,
}

/// Why the store could not answer; the API answers 503 either way.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis did not answer (in time).
    #[error("verification store unavailable: {0}")]
    Unavailable(String),
    /// A stored value is not in the shape this relay writes.
    #[error("verification store holds a value it cannot read: {0}")]
    Corrupt(String),
}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// How long records and keys live.
#[derive(Debug, Clone)]
pub struct StorePolicy {
    /// `dedup.key_prefix`.
    pub key_prefix: String,
    /// `dedup.ttl_secs`: records are kept this long after their last change.
    pub ttl: Duration,
    /// Stored idempotent answers: 24 h (SPEC 9.1).
    pub idempotency_ttl: Duration,
    /// A running idempotency marker outlives the longest request.
    pub running_ttl: Duration,
}

/// The verification store.
pub enum Store {
    /// Boxed: the Redis clients are far larger than the in-memory maps.
    Redis(Box<RedisStore>),
    /// One process only.
    Memory(MemoryStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Redis(_) => "Store::Redis",
            Store::Memory(_) => "Store::Memory",
        })
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Redis($s) => $e.await,
            Store::Memory($s) => Ok($e),
        }
    };
}

impl Store {
    /// Stores a record created through the API and indexes it for expiry.
    pub async fn create_pending(&self, record: &Record) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_pending(record))
    }

    /// The record of `id`, or what the webhook's dedup commit recorded.
    pub async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        dispatch!(self, s => s.get(id))
    }

    /// The phone a verification was created for through the API; `None`
    /// for an id not created here. One read: it runs on the webhook path.
    pub async fn created_phone(&self, id: &str) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => s.created_phone(id))
    }

    /// Turns a record `verified` (creating one for an id seen only in a
    /// webhook) and drops it from the expiry index.
    pub async fn mark_verified(
        &self,
        id: &str,
        user_phone: &str,
        verified_time_ms: u64,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.mark_verified(id, user_phone, verified_time_ms))
    }

    /// Pending ids whose expiry is at or before `now_ms`, oldest first.
    pub async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.due(now_ms, limit))
    }

    /// Claims the expiry of `id` for `lease` with `token`.
    pub async fn claim_expiry(
        &self,
        id: &str,
        now_ms: u64,
        lease: Duration,
        token: &str,
    ) -> Result<ExpiryClaim, StoreError> {
        dispatch!(self, s => s.claim_expiry(id, now_ms, lease, token))
    }

    /// After the `expired` event is durable: writes `expired` (unless a
    /// webhook turned it `verified` meanwhile) and drops it from the index.
    pub async fn finish_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.finish_expiry(id, token))
    }

    /// Gives a claim back when the event could not be made durable.
    pub async fn release_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.release_expiry(id, token))
    }

    /// Presents an idempotency key with the request's fingerprint.
    pub async fn idem_begin(&self, key: &str, fingerprint: &str) -> Result<IdemBegin, StoreError> {
        dispatch!(self, s => s.idem_begin(key, fingerprint))
    }

    /// Stores the answer of the request that started `key`.
    pub async fn idem_finish(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.idem_finish(key, fingerprint, answer))
    }
}

/// Milliseconds, saturating: both backends keep times in Unix ms.
fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a stored idempotency value means for a request with `fingerprint`;
/// one rule for both backends.
fn judge(value: &IdemValue, fingerprint: &str) -> IdemBegin {
    if value.fingerprint != fingerprint {
        return IdemBegin::Reused;
    }
    match &value.answer {
        None => IdemBegin::Running,
        Some(answer) => IdemBegin::Done(answer.clone()),
    }
}

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
