//! [`RedisStore`]: the verification store in Redis, shared by every replica
//! in any `redis.mode`; the Redis encoding of a [`Record`] and the Lua
//! scripts that keep each change to a record atomic.
//!
//! Layout, with `P` = `dedup.key_prefix` (every name has a space, so none
//! can equal the dedup key `P + id` of a valid id, which has none):
//! - `P record {<id>}`: a hash `id, userPhone, status, createdAt, expiresAt,
//!   verifiedTime` (+ `lease, leaseUntil` while a replica expires it). The
//!   `{<id>}` hash tag puts it in the slot of the cluster dedup key `P{<id>}`.
//! - `P expiry pending`: a sorted set of pending ids scored by `expiresAt`.
//! - `P idempotency <key>`: the running marker or the stored answer (JSON).
//!
//! One file a little past the usual ~400 lines on purpose: each operation,
//! the keys it touches and the script it runs are read together.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use super::{
    judge, now_ms, ttl_ms, ExpiryClaim, IdemBegin, IdemValue, Record, Status, StoreError,
    StorePolicy, StoredAnswer,
};
use crate::dedup::REDIS_OP_MAX;
use crate::redis_conn::RedisConnections;
use crate::redis_conn::RedisSettings;

/// A record as the fields of its Redis hash.
impl Record {
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
    /// hash-tagged in cluster mode, as `crate::dedup` names it.
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

    pub(super) async fn create_pending(&self, record: &Record) -> Result<(), StoreError> {
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

    pub(super) async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
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

    pub(super) async fn mark_verified(
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

    pub(super) async fn created_phone(&self, id: &str) -> Result<Option<String>, StoreError> {
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

    pub(super) async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
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

    pub(super) async fn claim_expiry(
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

    pub(super) async fn finish_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
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

    pub(super) async fn release_expiry(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.bounded(
            self.redis
                .invoke::<i64>(self.release_expiry.key(self.record_key(id)).arg(token)),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn idem_begin(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<IdemBegin, StoreError> {
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

    pub(super) async fn idem_finish(
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

/// A record from the webhook's dedup commit `{"status","verifiedTime"}`;
/// a lease (`lease:…`) means nothing is committed yet.
pub(super) fn from_dedup_commit(id: &str, value: &str) -> Option<Record> {
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
