//! Connections to Redis in the configured `redis.mode` (SPEC 11): one
//! server, a Redis Cluster or a master found through Sentinel. Each kind is
//! the redis crate's own client (the cluster client follows MOVED/ASK and
//! refreshes its slot map, the sentinel client finds and checks the master),
//! and all of them sit behind [`RedisConn`], which implements
//! `ConnectionLike`, so callers run the same commands and scripts in every
//! mode. `rediss://` (TLS) works in each.
//!
//! Key names are the callers' business; in cluster mode every key a script
//! touches must share a hash slot ([`RedisConnections::is_cluster`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use crate::dedup::{REDIS_CONNECT_TIMEOUT, REDIS_RESPONSE_TIMEOUT};
use crate::telemetry::redact_url_password;

/// Tells the per-thread connection caches of different stores apart (tests
/// run several relays in one process).
static NEXT_STORE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// One multiplexed connection per store and thread. A connection's
    /// driver task runs on the runtime that first used it; keeping it on the
    /// handler's own thread saves two thread hops per Redis call (measured:
    /// CPU per request -25 %, context switches -52 %).
    static CONNECTIONS: RefCell<HashMap<usize, RedisConn>> = RefCell::new(HashMap::new());
}

/// Cluster client retries (MOVED/ASK redirections do not count): enough to
/// ride over a slot-map refresh, few enough to stay inside
/// [`crate::dedup::REDIS_OP_MAX`].
const CLUSTER_RETRIES: u32 = 3;
/// Bounds of the cluster client's back-off between retries, in ms: a
/// failover takes about a second (`cluster-node-timeout` plus an election).
const CLUSTER_RETRY_WAIT_MS: (u64, u64) = (50, 500);

/// Where the store's connections come from; built without I/O.
enum Backend {
    /// One server; `ConnectionManager` reconnects by itself.
    Standalone {
        client: redis::Client,
        config: redis::aio::ConnectionManagerConfig,
    },
    /// Redis Cluster: the client follows MOVED/ASK and refreshes its slot map.
    Cluster(redis::cluster::ClusterClient),
    /// A master found through the sentinels, asked again after a failure.
    Sentinel {
        /// Shared by every thread; locked only while (re)connecting.
        client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
        config: redis::AsyncConnectionConfig,
    },
}

/// One connection of whichever kind the mode uses.
#[derive(Clone)]
pub enum RedisConn {
    /// `redis.mode = "standalone"`: the manager reconnects by itself.
    Standalone(ConnectionManager),
    /// `redis.mode = "cluster"`: routes each key to its slot's master.
    Cluster(redis::cluster_async::ClusterConnection),
    /// `redis.mode = "sentinel"`: the current master, replaced after a
    /// failure by asking the sentinels again.
    Sentinel(redis::aio::MultiplexedConnection),
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
            RedisConn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
            RedisConn::Sentinel(c) => c.get_db(),
        }
    }
}

/// Whether an error means the connection (or, after a failover, the node
/// behind it) is unusable, so the next attempt should start afresh.
fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        // A demoted master answers writes with READONLY (inside a script
        // too): the sentinels know the new one.
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.to_string().contains("READONLY")
}

impl Backend {
    /// Builds the mode's client from the settings, without any I/O.
    fn new(settings: &RedisSettings) -> redis::RedisResult<Backend> {
        Ok(match settings {
            RedisSettings::Standalone(url) => Backend::Standalone {
                client: redis::Client::open(url.expose())?,
                config: redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2)),
            },
            RedisSettings::Cluster(seeds) => Backend::Cluster(
                redis::cluster::ClusterClient::builder(seeds.iter().map(RedisUrl::expose))
                    .connection_timeout(REDIS_CONNECT_TIMEOUT)
                    .response_timeout(REDIS_RESPONSE_TIMEOUT)
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(CLUSTER_RETRY_WAIT_MS.0)
                    .max_retry_wait(CLUSTER_RETRY_WAIT_MS.1)
                    .build()?,
            ),
            RedisSettings::Sentinel { sentinels, service } => {
                // The master is reached the way the sentinels are: with TLS
                // when they are `rediss://`, with the first URL's username,
                // password and database.
                let first = sentinels.first().ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "redis.urls lists no sentinel",
                    ))
                })?;
                let info = redis::IntoConnectionInfo::into_connection_info(first.expose())?;
                let creds = info.redis_settings();
                let mut master = redis::RedisConnectionInfo::default().set_db(creds.db());
                if let Some(user) = creds.username() {
                    master = master.set_username(user);
                }
                if let Some(password) = creds.password() {
                    master = master.set_password(password);
                }
                let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(master);
                if first.is_tls() {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                // The sentinels themselves never have a database: the
                // number only applies to the master.
                let sentinels = sentinels
                    .iter()
                    .map(|u| {
                        redis::IntoConnectionInfo::into_connection_info(u.expose()).map(|i| {
                            let s = i.redis_settings().clone().set_db(0);
                            i.set_redis_settings(s)
                        })
                    })
                    .collect::<redis::RedisResult<Vec<_>>>()?;
                let client = redis::sentinel::SentinelClient::build(
                    sentinels,
                    service.as_str(),
                    Some(node),
                    redis::sentinel::SentinelServerType::Master,
                )?;
                Backend::Sentinel {
                    client: tokio::sync::Mutex::new(client),
                    config: redis::AsyncConnectionConfig::new()
                        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
                        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT)),
                }
            }
        })
    }

    /// A new connection. Standalone: lazy, no I/O. Cluster: connects to the
    /// seeds and reads the slot map. Sentinel: asks the sentinels for the
    /// master (checking its role) and connects to it.
    async fn connect(&self) -> redis::RedisResult<RedisConn> {
        Ok(match self {
            Backend::Standalone { client, config } => RedisConn::Standalone(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
            ),
            Backend::Cluster(client) => RedisConn::Cluster(client.get_async_connection().await?),
            Backend::Sentinel { client, config } => RedisConn::Sentinel(
                client
                    .lock()
                    .await
                    .get_async_connection_with_config(config)
                    .await?,
            ),
        })
    }

    /// Whether a broken connection should be dropped and made anew: the
    /// standalone manager and the cluster connection recover by themselves,
    /// a sentinel-found connection stays pinned to a master that may be gone.
    fn reconnects_itself(&self) -> bool {
        !matches!(self, Backend::Sentinel { .. })
    }
}

/// The connections of one store (the dedup store, say) in the configured
/// mode: one per thread, made on first use and remade when a sentinel-found
/// master is gone.
pub struct RedisConnections {
    backend: Backend,
    /// Key into each thread's connection cache.
    store: usize,
}

impl RedisConnections {
    /// Builds the mode's client without connecting: the relay must start
    /// (and spool or skip dedup) while Redis is down.
    pub fn new(settings: &RedisSettings) -> redis::RedisResult<Self> {
        Ok(Self {
            backend: Backend::new(settings)?,
            store: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Runs the redis crate's own checks of the mode's URLs (one TLS mode
    /// and one password for all cluster seeds, say) without any I/O, so
    /// configuration can refuse them up front.
    pub fn check(settings: &RedisSettings) -> redis::RedisResult<()> {
        Backend::new(settings).map(|_| ())
    }

    /// True in cluster mode: keys used together need one hash tag.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// This thread's connection, created on first use.
    pub async fn get(&self) -> redis::RedisResult<RedisConn> {
        if let Some(conn) = CONNECTIONS.with(|cache| cache.borrow().get(&self.store).cloned()) {
            return Ok(conn);
        }
        let conn = self.backend.connect().await?;
        CONNECTIONS.with(|cache| cache.borrow_mut().insert(self.store, conn.clone()));
        Ok(conn)
    }

    /// Drops this thread's connection after `e` if it cannot recover by
    /// itself; returns whether a retry on a fresh connection makes sense.
    ///
    /// A timeout also drops a sentinel-found connection (its master may be
    /// blackholed) but is not retried: the retry would wait as long again.
    pub fn after_error(&self, e: &redis::RedisError) -> bool {
        let broken = is_connection_error(e);
        if (broken || e.is_timeout()) && !self.backend.reconnects_itself() {
            CONNECTIONS.with(|cache| cache.borrow_mut().remove(&self.store));
        }
        broken
    }

    /// Runs one command, retried once when the connection was found broken
    /// (after a restart or a failover the first command meets the dead
    /// socket); only for commands that are idempotent for the caller. The
    /// caller bounds the whole call in time.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = self.get().await?;
        match cmd.query_async::<T>(&mut conn).await {
            Err(e) if self.after_error(&e) => {
                let mut conn = self.get().await?;
                cmd.query_async::<T>(&mut conn).await.inspect_err(|e| {
                    self.after_error(e);
                })
            }
            other => other,
        }
    }

    /// Like [`Self::query`], for a script invocation (EVALSHA, loading the
    /// script when the server lacks it: a promoted replica may).
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        let mut conn = self.get().await?;
        match invocation.invoke_async::<T>(&mut conn).await {
            Err(e) if self.after_error(&e) => {
                let mut conn = self.get().await?;
                invocation
                    .invoke_async::<T>(&mut conn)
                    .await
                    .inspect_err(|e| {
                        self.after_error(e);
                    })
            }
            other => other,
        }
    }
}

/// How the relay finds its Redis (SPEC 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server at `redis.url`.
    Standalone,
    /// Redis Cluster; `redis.urls` lists seed nodes.
    Cluster,
    /// A master watched by Sentinel; `redis.urls` lists the sentinels.
    Sentinel,
}

/// `[redis]`, validated: only the keys the mode uses.
#[derive(Debug, Clone)]
pub enum RedisSettings {
    /// One server (`redis.url`).
    Standalone(RedisUrl),
    /// Redis Cluster through these seed nodes (`redis.urls`, at least one).
    Cluster(Vec<RedisUrl>),
    /// The master the sentinels (`redis.urls`, at least one) know as
    /// `service` (`redis.sentinel_service`).
    Sentinel {
        /// The sentinels, at least one.
        sentinels: Vec<RedisUrl>,
        /// The master the sentinels monitor.
        service: String,
    },
}

impl RedisSettings {
    /// One server at `url` (`redis://`, `rediss://` or `unix://`), checked
    /// as `redis.url` is; the error says what is wrong with it.
    pub fn standalone(url: &str) -> Result<Self, &'static str> {
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://"))
        {
            return Err("must start with redis://, rediss:// or unix://");
        }
        if redis::Client::open(url).is_err() {
            return Err("is not a valid Redis URL");
        }
        Ok(Self::Standalone(RedisUrl::new(url)))
    }

    /// `redis.mode`.
    pub fn mode(&self) -> RedisMode {
        match self {
            RedisSettings::Standalone(_) => RedisMode::Standalone,
            RedisSettings::Cluster(_) => RedisMode::Cluster,
            RedisSettings::Sentinel { .. } => RedisMode::Sentinel,
        }
    }
}

/// A Redis URL as configured. It may carry a password, so it is held as a
/// secret and shown (`Display`, `Debug`) with the password redacted.
#[derive(Clone)]
pub struct RedisUrl {
    url: SecretString,
    redacted: String,
}

impl RedisUrl {
    pub(crate) fn new(url: &str) -> Self {
        Self {
            url: SecretString::from(url),
            redacted: redact_url_password(url),
        }
    }

    /// The URL with its password, for the Redis client only.
    pub fn expose(&self) -> &str {
        self.url.expose_secret()
    }

    /// True for `rediss://` (TLS).
    pub fn is_tls(&self) -> bool {
        self.expose().starts_with("rediss://")
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// Hand-written: the password stays out of `{:?}`.
impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RedisUrl").field(&self.redacted).finish()
    }
}
