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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RedisSettings;
use crate::payload::{Status, VerificationId, VerifiedTime};
use crate::redis_conn::RedisConnections;

/// How long one Redis command may take before the store counts as down: a
/// webhook must not wait on a blackholed Redis longer than this.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Connecting is allowed a little longer (TLS handshakes, DNS).
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(2_000);
/// Longest one dedup operation (claim, commit or release, with its one
/// retry) may take: a reconnect and an answer.
pub const REDIS_OP_MAX: Duration = Duration::from_millis(3_000);

/// Stored value prefixes: a lease is `lease:<token>`, a committed record is
/// JSON and never starts with that prefix.
const LEASE_PREFIX: &str = "lease:";

/// A claim is `SET key token NX PX lease`; only when that finds the key taken
/// is it read (`GET`) to tell a committed record from another lease. One
/// plain command per new event instead of a script: Redis spends less CPU per
/// claim (measured with `INFO commandstats`, see the README), and the common
/// case stays one round trip.
///
/// Claims attempted when the key vanished between the `SET` and the `GET`
/// (released or expired under us): the `SET` is retried this many times in
/// all, then the id counts as in flight (a 409 the sender retries).
const CLAIM_ATTEMPTS: usize = 3;

/// Commits if the lease is ours or gone (the event is durable either way, so
/// recording it is right); returns 0 when another claim holds the key.
const COMMIT_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
if v == ARGV[2] then return 1 end
return 0";

/// Deletes the key only if it still holds our lease.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("dedup store unavailable: {0}")]
    Unavailable(String),
    #[error("lease was lost before commit (expired or taken over)")]
    LeaseLost,
}

impl From<redis::RedisError> for DedupError {
    fn from(e: redis::RedisError) -> Self {
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
    pub key_prefix: String,
    pub ttl: Duration,
    pub lease: Duration,
}

/// The dedup store: Redis (shared by replicas) or memory (one process).
pub enum Dedup {
    Redis(Box<RedisDedup>),
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
    #[tracing::instrument(name = "claim", level = "debug", skip_all)]
    pub async fn claim(&self, id: &VerificationId) -> Result<Claim, DedupError> {
        match self {
            Dedup::Redis(r) => r.claim(id).await,
            Dedup::Memory(m) => Ok(m.claim(id, Instant::now())),
        }
    }

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

/// Bounds one dedup operation, retries included, by [`REDIS_OP_MAX`]: the
/// lease check of the configuration counts on that bound (SPEC 3).
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, DedupError>>,
) -> Result<T, DedupError> {
    tokio::time::timeout(REDIS_OP_MAX, call)
        .await
        .unwrap_or_else(|_| {
            Err(DedupError::Unavailable(format!(
                "no answer within {REDIS_OP_MAX:?}"
            )))
        })
}

/// Redis-backed store, shared by every replica.
pub struct RedisDedup {
    /// Connections in the configured `redis.mode`; owned by this store.
    redis: RedisConnections,
    policy: DedupPolicy,
    commit: redis::Script,
    release: redis::Script,
}

impl RedisDedup {
    /// Builds the client without connecting: the relay must start (and spool
    /// or skip dedup) while Redis is down.
    pub fn new(settings: &RedisSettings, policy: DedupPolicy) -> Result<Self, DedupError> {
        Ok(Self {
            redis: RedisConnections::new(settings)?,
            policy,
            commit: redis::Script::new(COMMIT_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
        })
    }

    /// The Redis key of one verification. In cluster mode the id is a hash
    /// tag, `prefix{id}`, so every key of one verification shares a slot
    /// (SPEC 11); standalone and sentinel keep SPEC 3's `prefix + id`.
    fn key(&self, id: &VerificationId) -> String {
        if self.redis.is_cluster() {
            format!("{}{{{}}}", self.policy.key_prefix, id.as_str())
        } else {
            format!("{}{}", self.policy.key_prefix, id.as_str())
        }
    }

    /// Runs a script, retrying once when the connection was found broken:
    /// after a Redis restart the first command meets the dead socket, and
    /// every script here is idempotent.
    ///
    /// The whole call, retry included, is bounded by [`REDIS_OP_MAX`]: the
    /// lease check of the configuration counts on that bound (SPEC 3).
    async fn invoke(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<i64, DedupError> {
        bounded(async { Ok(self.redis.invoke::<i64>(invocation).await?) }).await
    }

    /// Runs one command, retrying once when the connection was found broken
    /// (every command here is idempotent for its caller, see `claim`).
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, DedupError> {
        Ok(self.redis.query::<T>(cmd).await?)
    }

    /// `SET NX PX`, and on conflict a `GET` that tells a committed record
    /// from a lease. Finding our own token counts as claimed, so a `SET`
    /// retried after a lost answer is idempotent. Bounded as a whole by
    /// [`REDIS_OP_MAX`].
    async fn claim(&self, id: &VerificationId) -> Result<Claim, DedupError> {
        let token = LeaseToken::new();
        let lease_ms = u64::try_from(self.policy.lease.as_millis()).unwrap_or(u64::MAX);
        let key = self.key(id);
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(&token.0)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms);
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let call = async {
            for _ in 0..CLAIM_ATTEMPTS {
                // `OK` when set, nil when the key exists.
                let set: redis::Value = self.query(&set).await?;
                if !matches!(set, redis::Value::Nil) {
                    return Ok(Claim::Claimed(token));
                }
                let held: Option<Vec<u8>> = self.query(&get).await?;
                match held {
                    // Gone between the two commands: try the SET again.
                    None => continue,
                    Some(v) if v == token.0.as_bytes() => return Ok(Claim::Claimed(token)),
                    Some(v) if v.starts_with(LEASE_PREFIX.as_bytes()) => {
                        return Ok(Claim::InFlight)
                    }
                    Some(_) => return Ok(Claim::Duplicate),
                }
            }
            Ok(Claim::InFlight)
        };
        bounded(call).await
    }

    async fn commit(
        &self,
        id: &VerificationId,
        token: &LeaseToken,
        record: &str,
    ) -> Result<(), DedupError> {
        let ttl = self.policy.ttl.as_secs();
        let ok = self
            .invoke(
                self.commit
                    .key(self.key(id))
                    .arg(&token.0)
                    .arg(record)
                    .arg(ttl),
            )
            .await?;
        if ok == 1 {
            Ok(())
        } else {
            Err(DedupError::LeaseLost)
        }
    }

    async fn release(&self, id: &VerificationId, token: &LeaseToken) -> Result<(), DedupError> {
        self.invoke(self.release.key(self.key(id)).arg(&token.0))
            .await?;
        Ok(())
    }

    async fn ping(&self) -> bool {
        let ping = redis::cmd("PING");
        bounded(self.query::<String>(&ping)).await.is_ok()
    }
}

enum MemoryEntry {
    Lease { token: LeaseToken, expires: Instant },
    Committed { expires: Instant },
}

/// In-process store with the same semantics; for the embedded default and
/// single-process deployments.
pub struct MemoryDedup {
    /// Guarded by a std mutex: every critical section is a few map operations
    /// with no await inside.
    entries: Mutex<HashMap<String, MemoryEntry>>,
    policy: DedupPolicy,
}

/// Expired entries are swept once the map grows past this many since the
/// last sweep, keeping memory bounded without a background task.
const MEMORY_SWEEP_EVERY: usize = 10_000;

impl MemoryDedup {
    pub fn new(policy: DedupPolicy) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemoryEntry>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (each operation is a single insert or remove), so poison is ignored.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn claim(&self, id: &VerificationId, now: Instant) -> Claim {
        let mut entries = self.lock();
        if entries.len() % MEMORY_SWEEP_EVERY == MEMORY_SWEEP_EVERY - 1 {
            entries.retain(|_, e| match e {
                MemoryEntry::Lease { expires, .. } | MemoryEntry::Committed { expires } => {
                    *expires > now
                }
            });
        }
        match entries.get(id.as_str()) {
            Some(MemoryEntry::Committed { expires }) if *expires > now => return Claim::Duplicate,
            Some(MemoryEntry::Lease { expires, .. }) if *expires > now => return Claim::InFlight,
            _ => {}
        }
        let token = LeaseToken::new();
        entries.insert(
            id.as_str().to_string(),
            MemoryEntry::Lease {
                token: token.clone(),
                expires: now + self.policy.lease,
            },
        );
        Claim::Claimed(token)
    }

    fn commit(
        &self,
        id: &VerificationId,
        token: &LeaseToken,
        _record: String,
        now: Instant,
    ) -> Result<(), DedupError> {
        let mut entries = self.lock();
        let ours = match entries.get(id.as_str()) {
            None => true,
            Some(MemoryEntry::Lease {
                token: held,
                expires,
            }) => held == token || *expires <= now,
            Some(MemoryEntry::Committed { expires }) => *expires <= now,
        };
        if !ours {
            return Err(DedupError::LeaseLost);
        }
        entries.insert(
            id.as_str().to_string(),
            MemoryEntry::Committed {
                expires: now + self.policy.ttl,
            },
        );
        Ok(())
    }

    fn release(&self, id: &VerificationId, token: &LeaseToken) {
        let mut entries = self.lock();
        if matches!(entries.get(id.as_str()), Some(MemoryEntry::Lease { token: held, .. }) if held == token)
        {
            entries.remove(id.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemoryDedup {
        MemoryDedup::new(DedupPolicy {
            key_prefix: String::new(),
            ttl: Duration::from_secs(60),
            lease: Duration::from_secs(5),
        })
    }
    fn id(s: &str) -> VerificationId {
        VerificationId::parse(s).unwrap()
    }

    #[test]
    fn claim_commit_then_duplicate() {
        let s = store();
        let now = Instant::now();
        let Claim::Claimed(token) = s.claim(&id("a"), now) else {
            panic!("not claimed")
        };
        assert_eq!(s.claim(&id("a"), now), Claim::InFlight);
        s.commit(&id("a"), &token, String::new(), now).unwrap();
        assert_eq!(s.claim(&id("a"), now), Claim::Duplicate);
    }

    #[test]
    fn release_frees_only_our_own_lease() {
        let s = store();
        let now = Instant::now();
        let Claim::Claimed(first) = s.claim(&id("b"), now) else {
            panic!()
        };
        // The lease expires and another request claims the id.
        let later = now + Duration::from_secs(6);
        let Claim::Claimed(second) = s.claim(&id("b"), later) else {
            panic!()
        };
        s.release(&id("b"), &first);
        assert_eq!(
            s.claim(&id("b"), later),
            Claim::InFlight,
            "stale release must not free the new lease"
        );
        s.release(&id("b"), &second);
        assert!(matches!(s.claim(&id("b"), later), Claim::Claimed(_)));
    }

    #[test]
    fn an_expired_lease_can_be_claimed_again() {
        let s = store();
        let now = Instant::now();
        assert!(matches!(s.claim(&id("c"), now), Claim::Claimed(_)));
        assert!(matches!(
            s.claim(&id("c"), now + Duration::from_secs(5)),
            Claim::Claimed(_)
        ));
    }

    #[test]
    fn commit_fails_when_another_claim_holds_the_key() {
        let s = store();
        let now = Instant::now();
        let Claim::Claimed(first) = s.claim(&id("d"), now) else {
            panic!()
        };
        let later = now + Duration::from_secs(6);
        let Claim::Claimed(_) = s.claim(&id("d"), later) else {
            panic!()
        };
        assert!(matches!(
            s.commit(&id("d"), &first, String::new(), later),
            Err(DedupError::LeaseLost)
        ));
    }
}
