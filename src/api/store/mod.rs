//! What the lifecycle API remembers: verification records, the index of
//! pending verifications by expiry, and idempotency keys. In Redis (shared by
//! replicas) or in memory (one process, `dedup.backend = "memory"`).
//!
//! Redis layout, with `P` = `dedup.key_prefix` (every name has a space, so
//! none can equal the dedup key `P + id` of a valid id, which has none):
//! - `P record {<id>}`: a hash `id, userPhone, status, createdAt, expiresAt,
//!   verifiedTime` (+ `lease, leaseUntil` while a replica expires it). The
//!   `{<id>}` hash tag puts it in the slot of the cluster dedup key `P{<id>}`.
//! - `P expiry pending`: a sorted set of pending ids scored by `expiresAt`.
//! - `P idempotency <key>`: the running marker or the stored answer (JSON).
//!
//! Expiring is claim -> publish -> finish: a claim is a lease in the record,
//! so a replica that dies after claiming leaves the work to another once the
//! lease runs out, and the `expired` status is only written after the event
//! is durable.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RedisSettings;
use crate::dedup::REDIS_OP_MAX;
use crate::redis_conn::RedisConnections;

/// Where a verification is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Verified,
    Expired,
}

impl Status {
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
    pub id: String,
    pub user_phone: Option<String>,
    pub status: Status,
    pub created_at_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
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

    fn from_fields(fields: &HashMap<String, String>) -> Option<Self> {
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        Some(Self {
            id: fields.get("id")?.clone(),
            user_phone: fields.get("userPhone").cloned(),
            status: Status::parse(fields.get("status")?)?,
            created_at_ms: num("createdAt"),
            expires_at_ms: num("expiresAt"),
            verified_time_ms: num("verifiedTime"),
        })
    }

    fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("id", self.id.clone()),
            ("status", self.status.as_str().into()),
        ];
        if let Some(p) = &self.user_phone {
            f.push(("userPhone", p.clone()));
        }
        for (k, v) in [
            ("createdAt", self.created_at_ms),
            ("expiresAt", self.expires_at_ms),
            ("verifiedTime", self.verified_time_ms),
        ] {
            if let Some(v) = v {
                f.push((k, v.to_string()));
            }
        }
        f
    }
}

/// A stored idempotent answer (SPEC 9.1), replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: String,
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("verification store unavailable: {0}")]
    Unavailable(String),
    #[error("verification store holds a value it cannot read: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
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
            Store::Memory($s) => $e,
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

fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Claims the expiry: 0 done, 1 not due, 2 busy, 3 claimed.
const CLAIM_EXPIRY_SCRIPT: &str = r"
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'pending' then return 0 end
local exp = tonumber(redis.call('HGET', KEYS[1], 'expiresAt') or '0')
local now = tonumber(ARGV[1])
if exp > now then return 1 end
-- Our own lease (a retried call after a lost answer) is still ours.
if redis.call('HGET', KEYS[1], 'lease') == ARGV[2] then return 3 end
local held = tonumber(redis.call('HGET', KEYS[1], 'leaseUntil') or '0')
if held > now then return 2 end
redis.call('HSET', KEYS[1], 'lease', ARGV[2], 'leaseUntil', ARGV[3])
return 3";

/// Finishes our claim: writes `expired` if still pending. 1 = ours.
const FINISH_EXPIRY_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'lease', 'leaseUntil')
if redis.call('HGET', KEYS[1], 'status') == 'pending' then
  redis.call('HSET', KEYS[1], 'status', 'expired')
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1";

/// Releases our claim only.
const RELEASE_EXPIRY_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'lease', 'leaseUntil')
  return 1
end
return 0";

/// Marks verified, creating the record when the id was never created here;
/// returns 1 when it was pending (so it is still in the expiry index).
const MARK_VERIFIED_SCRIPT: &str = r"
local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'userPhone', ARGV[2])
end
redis.call('HSET', KEYS[1], 'status', 'verified', 'verifiedTime', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if st == 'pending' then return 1 end
return 0";

/// Returns the key's value, or sets it (running marker) and returns nil.
const IDEM_BEGIN_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false";

/// Redis-backed store, shared by every replica, in any `redis.mode`.
pub struct RedisStore {
    /// The same kind of connections as the dedup store (SPEC 11); every
    /// script here touches one key, so each works on a cluster.
    redis: RedisConnections,
    policy: StorePolicy,
    claim_expiry: redis::Script,
    finish_expiry: redis::Script,
    release_expiry: redis::Script,
    mark_verified: redis::Script,
    idem_begin: redis::Script,
}

impl RedisStore {
    /// Builds the client without connecting: the API answers 503 while
    /// Redis is down rather than refusing to start.
    pub fn new(settings: &RedisSettings, policy: StorePolicy) -> Result<Self, StoreError> {
        Ok(Self {
            redis: RedisConnections::new(settings)?,
            policy,
            claim_expiry: redis::Script::new(CLAIM_EXPIRY_SCRIPT),
            finish_expiry: redis::Script::new(FINISH_EXPIRY_SCRIPT),
            release_expiry: redis::Script::new(RELEASE_EXPIRY_SCRIPT),
            mark_verified: redis::Script::new(MARK_VERIFIED_SCRIPT),
            idem_begin: redis::Script::new(IDEM_BEGIN_SCRIPT),
        })
    }

    fn record_key(&self, id: &str) -> String {
        format!("{}record {{{id}}}", self.policy.key_prefix)
    }
    fn index_key(&self) -> String {
        format!("{}expiry pending", self.policy.key_prefix)
    }
    fn idem_key(&self, key: &str) -> String {
        format!("{}idempotency {key}", self.policy.key_prefix)
    }
    /// The webhook's dedup commit (SPEC 3): `{status, verifiedTime}` JSON;
    /// hash-tagged in cluster mode, like `dedup.rs` names it.
    fn dedup_key(&self, id: &str) -> String {
        if self.redis.is_cluster() {
            format!("{}{{{id}}}", self.policy.key_prefix)
        } else {
            format!("{}{id}", self.policy.key_prefix)
        }
    }

    /// Bounds one operation like the dedup store does.
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REDIS_OP_MAX, op).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {REDIS_OP_MAX:?}"
            ))),
        }
    }

    fn record_ttl_secs(&self, record: &Record, now_ms: u64) -> u64 {
        let base = self.policy.ttl.as_secs();
        let until_expiry = record
            .expires_at_ms
            .map_or(0, |e| e.saturating_sub(now_ms) / 1000);
        base + until_expiry
    }

    async fn create_pending(&self, record: &Record) -> Result<(), StoreError> {
        let key = self.record_key(&record.id);
        let ttl = self.record_ttl_secs(record, now_ms());
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(&key, &record.to_fields())
            .ignore()
            .expire(&key, i64::try_from(ttl).unwrap_or(i64::MAX))
            .ignore();
        let write = async {
            let mut conn = self.redis.get().await?;
            pipe.query_async::<()>(&mut conn).await.inspect_err(|e| {
                self.redis.after_error(e);
            })
        };
        self.bounded(write).await?;
        // A separate command: the index lives in another slot in a cluster.
        let score = record.expires_at_ms.unwrap_or(0);
        self.bounded(
            self.redis.query(
                redis::cmd("ZADD")
                    .arg(self.index_key())
                    .arg(score)
                    .arg(&record.id),
            ),
        )
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let fields: HashMap<String, String> = self
            .bounded(
                self.redis
                    .query(redis::cmd("HGETALL").arg(self.record_key(id))),
            )
            .await?;
        if !fields.is_empty() {
            return Record::from_fields(&fields)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt(format!("record of {id}")));
        }
        let committed: Option<String> = self
            .bounded(self.redis.query(redis::cmd("GET").arg(self.dedup_key(id))))
            .await?;
        Ok(committed.and_then(|v| from_dedup_commit(id, &v)))
    }

    async fn mark_verified(
        &self,
        id: &str,
        user_phone: &str,
        verified_time_ms: u64,
    ) -> Result<(), StoreError> {
        let was_pending = self
            .bounded(
                self.redis.invoke::<i64>(
                    self.mark_verified
                        .key(self.record_key(id))
                        .arg(id)
                        .arg(user_phone)
                        .arg(verified_time_ms)
                        .arg(self.policy.ttl.as_secs()),
                ),
            )
            .await?;
        // Only a pending record is indexed: the common webhook-only id
        // costs one round trip.
        if was_pending == 1 {
            self.unindex(id).await?;
        }
        Ok(())
    }

    async fn created_phone(&self, id: &str) -> Result<Option<String>, StoreError> {
        let (phone, created): (Option<String>, Option<String>) = self
            .bounded(
                self.redis.query(
                    redis::cmd("HMGET")
                        .arg(self.record_key(id))
                        .arg("userPhone")
                        .arg("createdAt"),
                ),
            )
            .await?;
        Ok(phone.filter(|_| created.is_some()))
    }

    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.bounded(
            self.redis.query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.index_key())
                    .arg("-inf")
                    .arg(now_ms)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            ),
        )
        .await
    }

    async fn claim_expiry(
        &self,
        id: &str,
        now_ms: u64,
        lease: Duration,
        token: &str,
    ) -> Result<ExpiryClaim, StoreError> {
        let code: i64 = self
            .bounded(
                self.redis.invoke(
                    self.claim_expiry
                        .key(self.record_key(id))
                        .arg(now_ms)
                        .arg(token)
                        .arg(now_ms + ttl_ms(lease)),
                ),
            )
            .await?;
        match code {
            3 => match self.get(id).await? {
                Some(record) => Ok(ExpiryClaim::Claimed(record)),
                None => Ok(ExpiryClaim::Done),
            },
            2 => Ok(ExpiryClaim::Busy),
            1 => Ok(ExpiryClaim::NotDue),
            _ => {
                self.unindex(id).await?;
                Ok(ExpiryClaim::Done)
            }
        }
    }

    async fn unindex(&self, id: &str) -> Result<(), StoreError> {
        self.bounded(
            self.redis
                .query(redis::cmd("ZREM").arg(self.index_key()).arg(id)),
        )
        .await
    }

    async fn finish_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.bounded(
            self.redis.invoke::<i64>(
                self.finish_expiry
                    .key(self.record_key(id))
                    .arg(token)
                    .arg(self.policy.ttl.as_secs()),
            ),
        )
        .await?;
        self.unindex(id).await
    }

    async fn release_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.bounded(
            self.redis
                .invoke::<i64>(self.release_expiry.key(self.record_key(id)).arg(token)),
        )
        .await?;
        Ok(())
    }

    async fn idem_begin(&self, key: &str, fingerprint: &str) -> Result<IdemBegin, StoreError> {
        let running = IdemValue {
            fingerprint: fingerprint.to_string(),
            answer: None,
        };
        let marker =
            serde_json::to_string(&running).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let existing: Option<String> = self
            .bounded(
                self.redis.invoke(
                    self.idem_begin
                        .key(self.idem_key(key))
                        .arg(marker)
                        .arg(ttl_ms(self.policy.running_ttl)),
                ),
            )
            .await?;
        match existing {
            None => Ok(IdemBegin::Started),
            Some(text) => {
                let value: IdemValue = serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("idempotency key: {e}")))?;
                Ok(judge(&value, fingerprint))
            }
        }
    }

    async fn idem_finish(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_string(&IdemValue {
            fingerprint: fingerprint.to_string(),
            answer: Some(answer.clone()),
        })
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.bounded(
            self.redis.query(
                redis::cmd("SET")
                    .arg(self.idem_key(key))
                    .arg(value)
                    .arg("EX")
                    .arg(self.policy.idempotency_ttl.as_secs()),
            ),
        )
        .await
    }
}

fn judge(value: &IdemValue, fingerprint: &str) -> IdemBegin {
    if value.fingerprint != fingerprint {
        return IdemBegin::Reused;
    }
    match &value.answer {
        None => IdemBegin::Running,
        Some(answer) => IdemBegin::Done(answer.clone()),
    }
}

/// A record from the webhook's dedup commit `{"status","verifiedTime"}`;
/// a lease (`lease:…`) means nothing is committed yet.
fn from_dedup_commit(id: &str, value: &str) -> Option<Record> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Commit {
        status: String,
        verified_time: Option<u64>,
    }
    let commit: Commit = serde_json::from_str(value).ok()?;
    Some(Record {
        id: id.to_string(),
        user_phone: None,
        status: Status::parse(&commit.status)?,
        created_at_ms: None,
        expires_at_ms: None,
        verified_time_ms: commit.verified_time,
    })
}

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct MemoryRecord {
    record: Record,
    lease: Option<(String, u64)>,
    /// Unix ms after which the record is forgotten.
    forget_at_ms: u64,
}

struct MemoryIdem {
    value: IdemValue,
    forget_at_ms: u64,
}

/// Inserts between two sweeps of forgotten in-memory entries.
const MEMORY_SWEEP_EVERY: u64 = 1024;

#[derive(Default)]
struct MemoryState {
    records: HashMap<String, MemoryRecord>,
    idempotency: HashMap<String, MemoryIdem>,
    /// Inserts since start, to pace the sweeps.
    inserts: u64,
}

/// In-process store with the same semantics, for one process.
pub struct MemoryStore {
    /// Every critical section is a few map operations with no await.
    state: Mutex<MemoryState>,
    policy: StorePolicy,
}

impl MemoryStore {
    pub fn new(policy: StorePolicy) -> Self {
        Self {
            state: Mutex::new(MemoryState::default()),
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // Each operation leaves the maps consistent; poison is ignored.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops forgotten entries once every [`MEMORY_SWEEP_EVERY`] inserts:
    /// memory stays bounded without a scan per request.
    fn forget_old(state: &mut MemoryState, now: u64) {
        state.inserts += 1;
        if !state.inserts.is_multiple_of(MEMORY_SWEEP_EVERY) {
            return;
        }
        state.records.retain(|_, r| r.forget_at_ms > now);
        state.idempotency.retain(|_, i| i.forget_at_ms > now);
    }

    fn create_pending(&self, record: &Record) -> Result<(), StoreError> {
        let now = now_ms();
        let mut state = self.lock();
        Self::forget_old(&mut state, now);
        let forget_at_ms = record.expires_at_ms.unwrap_or(now).max(now) + ttl_ms(self.policy.ttl);
        state.records.insert(
            record.id.clone(),
            MemoryRecord {
                record: record.clone(),
                lease: None,
                forget_at_ms,
            },
        );
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let now = now_ms();
        Ok(self
            .lock()
            .records
            .get(id)
            .filter(|r| r.forget_at_ms > now)
            .map(|r| r.record.clone()))
    }

    fn created_phone(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(id)?
            .filter(Record::created_here)
            .and_then(|r| r.user_phone))
    }

    fn mark_verified(
        &self,
        id: &str,
        user_phone: &str,
        verified_time_ms: u64,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let forget_at_ms = now + ttl_ms(self.policy.ttl);
        let mut state = self.lock();
        Self::forget_old(&mut state, now);
        let entry = state
            .records
            .entry(id.to_string())
            .or_insert_with(|| MemoryRecord {
                record: Record {
                    id: id.to_string(),
                    user_phone: Some(user_phone.to_string()),
                    status: Status::Verified,
                    created_at_ms: None,
                    expires_at_ms: None,
                    verified_time_ms: None,
                },
                lease: None,
                forget_at_ms,
            });
        entry.record.status = Status::Verified;
        entry.record.verified_time_ms = Some(verified_time_ms);
        entry.forget_at_ms = forget_at_ms;
        Ok(())
    }

    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        let state = self.lock();
        let mut due: Vec<(u64, String)> = state
            .records
            .values()
            .filter(|r| r.record.status == Status::Pending)
            .filter_map(|r| {
                r.record
                    .expires_at_ms
                    .filter(|e| *e <= now_ms)
                    .map(|e| (e, r.record.id.clone()))
            })
            .collect();
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, id)| id).collect())
    }

    fn claim_expiry(
        &self,
        id: &str,
        now_ms: u64,
        lease: Duration,
        token: &str,
    ) -> Result<ExpiryClaim, StoreError> {
        let mut state = self.lock();
        let Some(entry) = state.records.get_mut(id) else {
            return Ok(ExpiryClaim::Done);
        };
        if entry.record.status != Status::Pending {
            return Ok(ExpiryClaim::Done);
        }
        if entry.record.expires_at_ms.unwrap_or(0) > now_ms {
            return Ok(ExpiryClaim::NotDue);
        }
        if entry
            .lease
            .as_ref()
            .is_some_and(|(_, until)| *until > now_ms)
        {
            return Ok(ExpiryClaim::Busy);
        }
        entry.lease = Some((token.to_string(), now_ms + ttl_ms(lease)));
        Ok(ExpiryClaim::Claimed(entry.record.clone()))
    }

    fn finish_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
        let forget_at_ms = now_ms() + ttl_ms(self.policy.ttl);
        let mut state = self.lock();
        if let Some(entry) = state.records.get_mut(id) {
            if entry.lease.as_ref().is_some_and(|(t, _)| t == token) {
                entry.lease = None;
                if entry.record.status == Status::Pending {
                    entry.record.status = Status::Expired;
                }
                entry.forget_at_ms = forget_at_ms;
            }
        }
        Ok(())
    }

    fn release_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(entry) = state.records.get_mut(id) {
            if entry.lease.as_ref().is_some_and(|(t, _)| t == token) {
                entry.lease = None;
            }
        }
        Ok(())
    }

    fn idem_begin(&self, key: &str, fingerprint: &str) -> Result<IdemBegin, StoreError> {
        let now = now_ms();
        let mut state = self.lock();
        if let Some(existing) = state.idempotency.get(key).filter(|i| i.forget_at_ms > now) {
            return Ok(judge(&existing.value, fingerprint));
        }
        Self::forget_old(&mut state, now);
        state.idempotency.insert(
            key.to_string(),
            MemoryIdem {
                value: IdemValue {
                    fingerprint: fingerprint.to_string(),
                    answer: None,
                },
                forget_at_ms: now + ttl_ms(self.policy.running_ttl),
            },
        );
        Ok(IdemBegin::Started)
    }

    fn idem_finish(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
    ) -> Result<(), StoreError> {
        let forget_at_ms = now_ms() + ttl_ms(self.policy.idempotency_ttl);
        self.lock().idempotency.insert(
            key.to_string(),
            MemoryIdem {
                value: IdemValue {
                    fingerprint: fingerprint.to_string(),
                    answer: Some(answer.clone()),
                },
                forget_at_ms,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemoryStore {
        MemoryStore::new(StorePolicy {
            key_prefix: String::new(),
            ttl: Duration::from_secs(60),
            idempotency_ttl: Duration::from_secs(60),
            running_ttl: Duration::from_secs(5),
        })
    }

    #[test]
    fn expiry_is_claimed_once_and_finished_after_the_event() {
        let s = store();
        let now = now_ms();
        s.create_pending(&Record::pending("a", "628100", now - 10, now - 1))
            .unwrap();
        assert_eq!(s.due(now, 10).unwrap(), vec!["a".to_string()]);
        let lease = Duration::from_secs(30);
        assert!(matches!(
            s.claim_expiry("a", now, lease, "t1").unwrap(),
            ExpiryClaim::Claimed(_)
        ));
        assert_eq!(
            s.claim_expiry("a", now, lease, "t2").unwrap(),
            ExpiryClaim::Busy
        );
        s.finish_expiry("a", "t1").unwrap();
        assert_eq!(
            s.claim_expiry("a", now, lease, "t2").unwrap(),
            ExpiryClaim::Done
        );
        assert_eq!(s.get("a").unwrap().unwrap().status, Status::Expired);
        assert!(s.due(now, 10).unwrap().is_empty());
    }

    #[test]
    fn a_lost_lease_lets_another_claim() {
        let s = store();
        let now = now_ms();
        s.create_pending(&Record::pending("b", "628100", now - 10, now - 1))
            .unwrap();
        let lease = Duration::from_millis(100);
        assert!(matches!(
            s.claim_expiry("b", now, lease, "t1").unwrap(),
            ExpiryClaim::Claimed(_)
        ));
        assert!(matches!(
            s.claim_expiry("b", now + 200, lease, "t2").unwrap(),
            ExpiryClaim::Claimed(_)
        ));
    }

    #[test]
    fn idempotency_keys_replay_refuse_and_report_running() {
        let s = store();
        assert_eq!(s.idem_begin("k", "f1").unwrap(), IdemBegin::Started);
        assert_eq!(s.idem_begin("k", "f1").unwrap(), IdemBegin::Running);
        assert_eq!(s.idem_begin("k", "f2").unwrap(), IdemBegin::Reused);
        let answer = StoredAnswer {
            status: 201,
            body: "{}".into(),
            location: None,
        };
        s.idem_finish("k", "f1", &answer).unwrap();
        assert_eq!(s.idem_begin("k", "f1").unwrap(), IdemBegin::Done(answer));
    }

    #[test]
    fn dedup_commits_read_as_verified_records() {
        let r = from_dedup_commit("x", r#"{"status":"verified","verifiedTime":5}"#).unwrap();
        assert_eq!(r.status, Status::Verified);
        assert_eq!(r.verified_time_ms, Some(5));
        assert!(from_dedup_commit("x", "lease:abc").is_none());
    }
}
