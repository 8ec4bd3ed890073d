//! Building the application: the only place that creates clients, binds
//! sockets and spawns background tasks. `main` and the tests start the relay
//! the same way: [`Application::build`] then [`Application::run_until_stopped`].
//!
//! `build` runs named steps in the order data flows: the sink (and its broker
//! supervisor), the spool (and its drainer), the dedup store, the lifecycle
//! API's clients, the webhook's shared state, then the listeners
//! (`servers`). Stopping is in `shutdown`.

mod servers;
mod shutdown;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::web;
use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::config::{DedupStore, Settings, SinkKind};
use crate::dedup::{Dedup, DedupPolicy, MemoryDedup, RedisDedup};
use crate::metrics::Metrics;
use crate::payload::PayloadRules;
use crate::publish::{AmqpPublisher, Sink, StdoutSink};
use crate::ratelimit::ClientLimits;
use crate::routes::admin::AdminState;
use crate::routes::webhook::{Relay, UnknownSchemeLog};
use crate::spool::Spool;

/// How long start-up waits for the first broker connection before serving
/// anyway (events spool until it comes).
const INITIAL_CONNECT_WAIT: Duration = Duration::from_secs(3);
/// How often the dedup store is pinged for the `redis_connected` gauge.
const REDIS_PING_EVERY: Duration = Duration::from_secs(1);
/// How often clients back at full burst are dropped from the rate limiter.
const FORGET_IDLE_CLIENTS_EVERY: Duration = Duration::from_secs(60);

/// A built relay: sockets bound, clients created, not yet stopped.
pub struct Application {
    /// Where the webhook listener really listens (port 0 resolved).
    webhook_addr: SocketAddr,
    /// Where the admin listener really listens.
    admin_addr: SocketAddr,
    /// Stops the webhook listener at shutdown; the server runs in `servers`.
    webhook_server: ServerHandle,
    /// Stops the admin listener, last of all.
    admin_server: ServerHandle,
    /// The lifecycle API listener (SPEC 9), when `api.enabled`.
    api_addr: Option<SocketAddr>,
    /// Stops the lifecycle API listener, together with the webhook's.
    api_server: Option<ServerHandle>,
    /// The running HTTP servers, awaited at the end of the shutdown.
    servers: Vec<JoinHandle<std::io::Result<()>>>,
    /// Broker supervisor, Redis pinger, rate-limit sweeper, expiry sweeper:
    /// they run until `background.token` is cancelled.
    background: Background,
    /// Stops the spool drainer before the final flush at shutdown.
    drain_stop: CancellationToken,
    /// The spool drainer, when there is a spool.
    drainer: Option<JoinHandle<()>>,
    /// The webhook pipelines (shared with `Relay`); awaited at shutdown.
    pipelines: TaskTracker,
    /// Least time the shutdown gives running pipelines after the listener
    /// stopped, even past the grace period: one pipeline's worst case, since
    /// cutting it could lose a dedup commit.
    pipelines_min_wait: Duration,
    /// Where events go; the shutdown flushes the spool into it.
    sink: Arc<Sink>,
    /// Read by `/readyz`; cleared first thing at shutdown.
    accepting: Arc<AtomicBool>,
    /// `shutdown.grace`.
    grace: Duration,
    /// The app's own registry (tests read it; `/metrics` renders it).
    metrics: Metrics,
    /// The spool, shared with the webhook, the drainer and the API.
    spool: Option<Spool>,
    /// The AMQP publisher, when `sink = "amqp"` (tests read its state).
    publisher: Option<AmqpPublisher>,
}

/// Long-lived tasks that stop when `token` is cancelled.
struct Background {
    token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("webhook_addr", &self.webhook_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Creates the clients, binds the listeners and starts serving.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let mut background = Background {
            token: CancellationToken::new(),
            tasks: Vec::new(),
        };
        let (sink, publisher) = build_sink(&settings, &metrics, &mut background).await;
        let drain_stop = CancellationToken::new();
        let (spool, drainer) = open_spool(&settings, &metrics, &sink, &drain_stop)?;
        let dedup = build_dedup(&settings)?;
        let lifecycle = if settings.api.enabled {
            let lifecycle = Arc::new(build_lifecycle(
                &settings,
                sink.clone(),
                spool.clone(),
                &metrics,
            )?);
            background.spawn(crate::api::expiry::run(
                lifecycle.clone(),
                background.token.clone(),
            ));
            Some(lifecycle)
        } else {
            None
        };
        let pipelines = TaskTracker::new();
        let relay = web::Data::new(Relay {
            verifier: Verifier::new(
                settings.auth.mode,
                settings.auth.header(),
                &settings.auth.secrets,
                settings.auth.tolerance,
            ),
            rules: PayloadRules {
                accepted_statuses: settings.webhook.accepted_statuses.clone(),
                max_event_age: settings.webhook.max_event_age,
            },
            dedup,
            on_unavailable: settings.dedup.on_unavailable,
            sink: sink.clone(),
            spool: spool.clone(),
            metrics: metrics.clone(),
            max_body_bytes: settings.http.max_body_bytes,
            limits: ClientLimits::new(
                settings.http.rate_limit_per_sec,
                settings.http.rate_limit_burst,
                settings.http.trusted_proxies.clone(),
            ),
            pipelines: pipelines.clone(),
            runtime: tokio::runtime::Handle::current(),
            unknown_scheme_log: UnknownSchemeLog::default(),
            lifecycle: lifecycle.clone(),
        });
        if matches!(settings.dedup.store, DedupStore::Redis(_)) {
            background.spawn(ping_dedup(relay.clone(), background.token.clone()));
        }
        if settings.http.rate_limit_per_sec > 0 {
            background.spawn(forget_idle_clients(relay.clone(), background.token.clone()));
        }
        let accepting = Arc::new(AtomicBool::new(true));
        let admin_state = web::Data::new(AdminState {
            metrics: metrics.clone(),
            sink: sink.clone(),
            spool: spool.clone(),
            accepting: accepting.clone(),
            tokens: settings.admin.tokens.clone(),
        });

        let webhook = servers::webhook(&settings, relay)?;
        let admin = servers::admin(&settings, admin_state)?;
        let api = lifecycle
            .map(|lifecycle| servers::api(&settings, lifecycle))
            .transpose()?;
        tracing::info!(
            webhook = %webhook.addr,
            path = settings.http.webhook_path,
            admin = %admin.addr,
            auth_mode = settings.auth.mode.as_str(),
            sink = ?settings.sink,
            dedup = ?settings.dedup.backend(),
            api = ?api.as_ref().map(|a| a.addr),
            "sendtalk-relay listening"
        );
        let mut servers = Vec::new();
        let mut serve = |server: actix_web::dev::Server| {
            let handle = server.handle();
            servers.push(tokio::spawn(server));
            handle
        };
        let webhook_server = serve(webhook.server);
        let admin_server = serve(admin.server);
        let (api_addr, api_server) = match api {
            Some(api) => (Some(api.addr), Some(serve(api.server))),
            None => (None, None),
        };
        Ok(Self {
            webhook_addr: webhook.addr,
            admin_addr: admin.addr,
            webhook_server,
            admin_server,
            api_addr,
            api_server,
            servers,
            background,
            drain_stop,
            drainer,
            pipelines,
            pipelines_min_wait: settings.worst_case_pipeline(),
            sink,
            accepting,
            grace: settings.shutdown.grace,
            metrics,
            spool,
            publisher,
        })
    }

    /// Where the webhook listener listens.
    pub fn webhook_addr(&self) -> SocketAddr {
        self.webhook_addr
    }

    /// Where the admin listener listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The lifecycle API's address, when `api.enabled`.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// The app's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The spool, when there is one.
    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }

    /// The AMQP publisher, when `sink = "amqp"`.
    pub fn publisher(&self) -> Option<&AmqpPublisher> {
        self.publisher.as_ref()
    }
}

/// The sink; for AMQP also its connection supervisor, and a bounded wait for
/// the first connection so the first webhooks are published, not spooled.
async fn build_sink(
    settings: &Settings,
    metrics: &Metrics,
    background: &mut Background,
) -> (Arc<Sink>, Option<AmqpPublisher>) {
    match settings.sink {
        SinkKind::Stdout => (
            Arc::new(Sink::Stdout(StdoutSink::new(
                settings.amqp.routing_key.clone(),
            ))),
            None,
        ),
        SinkKind::Amqp => {
            let publisher = AmqpPublisher::new(settings.amqp.clone(), metrics.publisher());
            background.spawn(publisher.clone().supervise(background.token.clone()));
            if !publisher.wait_connected(INITIAL_CONNECT_WAIT).await {
                tracing::warn!(
                    "broker not reachable at start-up; serving anyway, events are spooled"
                );
            }
            (Arc::new(Sink::Amqp(publisher.clone())), Some(publisher))
        }
    }
}

/// The spool and its drainer, when enabled with the AMQP sink (the stdout
/// sink cannot fail, so it needs none).
fn open_spool(
    settings: &Settings,
    metrics: &Metrics,
    sink: &Arc<Sink>,
    drain_stop: &CancellationToken,
) -> anyhow::Result<(Option<Spool>, Option<JoinHandle<()>>)> {
    if !settings.spool.enabled || settings.sink != SinkKind::Amqp {
        return Ok((None, None));
    }
    let spool = Spool::open(
        &settings.spool.dir,
        settings.spool.limits(),
        metrics.spool(),
    )
    .with_context(|| {
        format!(
            "Failed to open the spool in {}",
            settings.spool.dir.display()
        )
    })?;
    let drainer = tokio::spawn(spool.clone().drain(sink.clone(), drain_stop.clone()));
    Ok((Some(spool), Some(drainer)))
}

/// The dedup store of `dedup.backend`.
fn build_dedup(settings: &Settings) -> anyhow::Result<Dedup> {
    let policy = DedupPolicy {
        key_prefix: settings.dedup.key_prefix.clone(),
        ttl: settings.dedup.ttl,
        lease: settings.dedup.lease,
    };
    Ok(match &settings.dedup.store {
        DedupStore::Memory => Dedup::Memory(MemoryDedup::new(policy)),
        DedupStore::Redis(redis) => Dedup::Redis(Box::new(
            RedisDedup::new(redis, policy).context("Failed to create the Redis client")?,
        )),
    })
}

async fn forget_idle_clients(relay: web::Data<Relay>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(FORGET_IDLE_CLIENTS_EVERY) => relay.limits.forget_idle(),
            () = shutdown.cancelled() => return,
        }
    }
}

async fn ping_dedup(relay: web::Data<Relay>, shutdown: CancellationToken) {
    loop {
        let up = relay.dedup.ping().await;
        relay.metrics.redis_connected.set(i64::from(up));
        tokio::select! {
            () = tokio::time::sleep(REDIS_PING_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// The lifecycle API's store, SendTalk client and shared handles.
fn build_lifecycle(
    settings: &Settings,
    sink: Arc<Sink>,
    spool: Option<Spool>,
    metrics: &Metrics,
) -> anyhow::Result<crate::api::Lifecycle> {
    use crate::api::store::{MemoryStore, RedisStore, Store, StorePolicy};
    /// SPEC 9.1: a stored idempotent answer is replayed for 24 hours.
    const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
    let policy = StorePolicy {
        key_prefix: settings.dedup.key_prefix.clone(),
        ttl: settings.dedup.ttl,
        idempotency_ttl: IDEMPOTENCY_TTL,
        // Outlives one create: SendTalk's timeout, then storing and
        // publishing the pending event in the worst case.
        running_ttl: settings.sendtalk.timeout + settings.worst_case_pipeline(),
    };
    let store = match &settings.dedup.store {
        DedupStore::Memory => Store::Memory(MemoryStore::new(policy)),
        DedupStore::Redis(redis) => Store::Redis(Box::new(
            RedisStore::new(redis, policy)
                .context("Failed to create the Redis client of the lifecycle store")?,
        )),
    };
    let api_key = settings
        .sendtalk
        .api_key
        .clone()
        .context("sendtalk.api_key is checked at load when api.enabled")?;
    let sendtalk = crate::api::sendtalk::SendTalkClient::new(
        settings.sendtalk.base_url.as_str(),
        api_key,
        settings.sendtalk.timeout,
        metrics.sendtalk(),
    )
    .context("Failed to create the SendTalk HTTP client")?;
    Ok(crate::api::Lifecycle {
        store,
        sendtalk,
        tokens: settings.api.tokens.clone(),
        sink,
        spool,
        metrics: metrics.clone(),
        default_language: settings.sendtalk.default_language.clone(),
        default_expiry_minutes: settings.sendtalk.default_expiry_minutes,
        expiry_lease: settings.dedup.lease,
        expiry_check: settings.api.expiry_check,
    })
}
