//! [`RedisDedup`]: the dedup store in Redis, shared by every replica, in any
//! `redis.mode`: a claim is `SET NX PX`, commit and release are scripts that
//! check the lease token.

use super::{Claim, DedupError, DedupPolicy, LeaseToken, LEASE_PREFIX, REDIS_OP_MAX};
use crate::payload::VerificationId;
use crate::redis_conn::RedisConnections;
use crate::redis_conn::RedisSettings;

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
    pub(super) async fn claim(&self, id: &VerificationId) -> Result<Claim, DedupError> {
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
                    None => {}
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

    pub(super) async fn commit(
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

    pub(super) async fn release(
        &self,
        id: &VerificationId,
        token: &LeaseToken,
    ) -> Result<(), DedupError> {
        self.invoke(self.release.key(self.key(id)).arg(&token.0))
            .await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> bool {
        let ping = redis::cmd("PING");
        bounded(self.query::<String>(&ping)).await.is_ok()
    }
}
