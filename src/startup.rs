//! Building the application: the only place that creates clients, binds
//! sockets and spawns background tasks. `main` and the tests start the relay
//! the same way: [`Application::build`] then [`Application::run_until_stopped`].

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};
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
use crate::routes::admin::{self, AdminState};
use crate::routes::webhook::{self, Relay, UnknownSchemeLog};
use crate::spool::Spool;

/// How long start-up waits for the first broker connection before serving
/// anyway (events spool until it comes).
const INITIAL_CONNECT_WAIT: Duration = Duration::from_secs(3);
/// How often the dedup store is pinged for the `redis_connected` gauge.
const REDIS_PING_EVERY: Duration = Duration::from_secs(1);
/// Longest the shutdown spends pushing spooled events to the broker; the
/// rest drains at the next start.
const SHUTDOWN_FLUSH_MAX: Duration = Duration::from_secs(5);
/// Longest the background tasks (broker supervisor, Redis pinger) get to
/// stop after the listener has drained; closing the AMQP channel is quick.
const BACKGROUND_STOP_MAX: Duration = Duration::from_secs(3);
/// How often clients back at full burst are dropped from the rate limiter.
const FORGET_IDLE_CLIENTS_EVERY: Duration = Duration::from_secs(60);
/// Headers must arrive within this; slow-loris connections are cut.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A built relay: sockets bound, clients created, not yet stopped.
pub struct Application {
    webhook_addr: SocketAddr,
    admin_addr: SocketAddr,
    webhook_server: ServerHandle,
    admin_server: ServerHandle,
    /// The lifecycle API listener (SPEC 9), when `api.enabled`.
    api_addr: Option<SocketAddr>,
    api_server: Option<ServerHandle>,
    tasks: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<std::io::Result<()>>>,
    /// Cancelled after the webhook listener has drained, so background work
    /// (publishing, draining) outlives every in-flight request.
    background: CancellationToken,
    /// Stops the spool drainer before the final flush at shutdown.
    drain_stop: CancellationToken,
    drainer: Option<JoinHandle<()>>,
    /// The webhook pipelines (shared with `Relay`); awaited at shutdown.
    pipelines: TaskTracker,
    /// Least time the shutdown gives running pipelines after the listener
    /// stopped, even past the grace period: one pipeline's worst case, since
    /// cutting it could lose a dedup commit.
    pipelines_min_wait: Duration,
    sink: Arc<Sink>,
    accepting: Arc<AtomicBool>,
    grace: Duration,
    metrics: Metrics,
    spool: Option<Spool>,
    publisher: Option<AmqpPublisher>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("webhook_addr", &self.webhook_addr)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl Application {
    /// Creates the clients, binds both listeners and starts serving.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let background = CancellationToken::new();
        let mut tasks = Vec::new();

        let (sink, publisher) = match settings.sink {
            SinkKind::Stdout => (
                Sink::Stdout(StdoutSink::new(settings.amqp.routing_key.clone())),
                None,
            ),
            SinkKind::Amqp => {
                let publisher = AmqpPublisher::new(settings.amqp.clone(), metrics.publisher());
                tasks.push(tokio::spawn(
                    publisher.clone().supervise(background.clone()),
                ));
                if !publisher.wait_connected(INITIAL_CONNECT_WAIT).await {
                    tracing::warn!(
                        "broker not reachable at start-up; serving anyway, events are spooled"
                    );
                }
                (Sink::Amqp(publisher.clone()), Some(publisher))
            }
        };
        let sink = Arc::new(sink);
        let drain_stop = CancellationToken::new();

        let (spool, drainer) = if settings.spool.enabled && settings.sink == SinkKind::Amqp {
            let spool = Spool::open(
                &settings.spool.dir,
                settings.spool.max_bytes,
                metrics.spool(),
            )
            .with_context(|| {
                format!(
                    "Failed to open the spool in {}",
                    settings.spool.dir.display()
                )
            })?;
            let drainer = tokio::spawn(spool.clone().drain(sink.clone(), drain_stop.clone()));
            (Some(spool), Some(drainer))
        } else {
            (None, None)
        };

        let policy = DedupPolicy {
            key_prefix: settings.dedup.key_prefix.clone(),
            ttl: settings.dedup.ttl,
            lease: settings.dedup.lease,
        };
        let dedup = match &settings.dedup.store {
            DedupStore::Memory => Dedup::Memory(MemoryDedup::new(policy)),
            DedupStore::Redis(redis) => Dedup::Redis(Box::new(
                RedisDedup::new(redis, policy).context("Failed to create the Redis client")?,
            )),
        };

        // Lifecycle API (SPEC 9): its clients, built only when enabled.
        let lifecycle = if settings.api.enabled {
            let lifecycle = Arc::new(build_lifecycle(
                &settings,
                sink.clone(),
                spool.clone(),
                &metrics,
            )?);
            tasks.push(tokio::spawn(crate::api::expiry::run(
                lifecycle.clone(),
                background.clone(),
            )));
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
            tasks.push(tokio::spawn(ping_dedup(relay.clone(), background.clone())));
        }
        if settings.http.rate_limit_per_sec > 0 {
            tasks.push(tokio::spawn(forget_idle_clients(
                relay.clone(),
                background.clone(),
            )));
        }

        let sink_for_shutdown = sink.clone();
        let accepting = Arc::new(AtomicBool::new(true));
        let admin_state = web::Data::new(AdminState {
            metrics: metrics.clone(),
            sink,
            spool: spool.clone(),
            accepting: accepting.clone(),
        });

        let webhook_listener = TcpListener::bind(settings.http.listen)
            .with_context(|| format!("Failed to bind http.listen {}", settings.http.listen))?;
        let admin_listener = TcpListener::bind(settings.admin.listen)
            .with_context(|| format!("Failed to bind admin.listen {}", settings.admin.listen))?;
        let webhook_addr = webhook_listener
            .local_addr()
            .context("Failed to read the webhook address")?;
        let admin_addr = admin_listener
            .local_addr()
            .context("Failed to read the admin address")?;

        let path = settings.http.webhook_path.clone();
        let tls = settings.http.tls.as_ref().map(|tls| tls.server_config());
        let webhook_server = HttpServer::new(move || {
            App::new()
                .app_data(relay.clone())
                .service(
                    web::resource(path.as_str())
                        .route(web::post().to(webhook::receive))
                        .default_service(web::to(webhook::method_not_allowed)),
                )
                .default_service(web::to(webhook::not_found))
        });
        let webhook_server = match tls {
            Some(config) => webhook_server.listen_rustls_0_23(webhook_listener, config),
            None => webhook_server.listen(webhook_listener),
        };
        let webhook_server: Server = webhook_server
            .context("Failed to listen on http.listen")?
            .disable_signals()
            .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
            .shutdown_timeout(settings.shutdown.grace.as_secs())
            .run();

        let admin_server: Server = HttpServer::new(move || {
            App::new()
                .app_data(admin_state.clone())
                .route("/healthz", web::get().to(admin::healthz))
                .route("/readyz", web::get().to(admin::readyz))
                .route("/metrics", web::get().to(admin::metrics))
        })
        .workers(1)
        .listen(admin_listener)
        .context("Failed to listen on admin.listen")?
        .disable_signals()
        .shutdown_timeout(1)
        .run();

        let handles = (webhook_server.handle(), admin_server.handle());
        let mut servers = vec![tokio::spawn(webhook_server), tokio::spawn(admin_server)];
        let (api_addr, api_server) = match lifecycle {
            Some(lifecycle) => {
                let (addr, server) = serve_api(&settings, lifecycle)?;
                let handle = server.handle();
                servers.push(tokio::spawn(server));
                (Some(addr), Some(handle))
            }
            None => (None, None),
        };
        tracing::info!(
            webhook = %webhook_addr,
            path = settings.http.webhook_path,
            admin = %admin_addr,
            auth_mode = settings.auth.mode.as_str(),
            sink = ?settings.sink,
            dedup = ?settings.dedup.backend(),
            api = ?api_addr,
            "sendtalk-relay listening"
        );
        Ok(Self {
            webhook_addr,
            admin_addr,
            api_addr,
            api_server,
            webhook_server: handles.0,
            admin_server: handles.1,
            tasks,
            servers,
            background,
            drain_stop,
            drainer,
            pipelines,
            pipelines_min_wait: settings.worst_case_pipeline(),
            sink: sink_for_shutdown,
            accepting,
            grace: settings.shutdown.grace,
            metrics,
            spool,
            publisher,
        })
    }

    pub fn webhook_addr(&self) -> SocketAddr {
        self.webhook_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The lifecycle API's address, when `api.enabled`.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }

    pub fn publisher(&self) -> Option<&AmqpPublisher> {
        self.publisher.as_ref()
    }

    /// Serves until `shutdown` is cancelled, then drains in order: readiness
    /// goes 503, the webhook listener stops accepting and finishes in-flight
    /// requests within the grace period, background tasks stop (the AMQP
    /// channel is closed cleanly, the spool is already fsynced), and the
    /// admin listener stops last.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        shutdown.cancelled().await;
        self.accepting.store(false, Ordering::Release);
        tracing::info!(
            grace_secs = self.grace.as_secs(),
            "shutting down: readiness is 503, finishing in-flight webhooks"
        );
        let started = Instant::now();
        let api_stopped = async {
            if let Some(api) = &self.api_server {
                api.stop(true).await;
            }
        };
        futures_util::future::join(self.webhook_server.stop(true), api_stopped).await;
        if started.elapsed() >= self.grace {
            tracing::warn!(
                grace_secs = self.grace.as_secs(),
                "grace period ran out; remaining connections were closed"
            );
        }
        // Pipelines outlive the HTTP workers: a publish confirmed just before
        // the deadline still gets its dedup commit.
        self.pipelines.close();
        let left = self
            .grace
            .saturating_sub(started.elapsed())
            .max(self.pipelines_min_wait);
        if tokio::time::timeout(left, self.pipelines.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = self.pipelines.len(),
                "webhook pipelines did not finish in time; their leases expire"
            );
        }
        // Stop the drainer first, then give the spool one last bounded
        // chance to reach the broker while the channel is still open.
        if let Some(drainer) = self.drainer {
            self.drain_stop.cancel();
            let _ = drainer.await;
        }
        if let Some(spool) = &self.spool {
            let left = self
                .grace
                .saturating_sub(started.elapsed())
                .min(SHUTDOWN_FLUSH_MAX);
            spool.flush(&self.sink, left).await;
        }
        self.background.cancel();
        // One bound for all of them together: a hung task must not stretch
        // the shutdown past what an orchestrator allows.
        let tasks = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(BACKGROUND_STOP_MAX, tasks)
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop in time; exiting anyway");
        }
        if let Some(spool) = &self.spool {
            if spool.depth() > 0 {
                tracing::info!(
                    depth = spool.depth(),
                    "spooled events remain; they drain at the next start"
                );
            }
        }
        self.admin_server.stop(true).await;
        for server in self.servers {
            let _ = server.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
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

/// Binds `api.listen` and serves the lifecycle API and its OpenAPI document.
fn serve_api(
    settings: &Settings,
    lifecycle: Arc<crate::api::Lifecycle>,
) -> anyhow::Result<(SocketAddr, Server)> {
    use crate::api::{openapi, routes};
    let listener = TcpListener::bind(settings.api.listen)
        .with_context(|| format!("Failed to bind api.listen {}", settings.api.listen))?;
    let addr = listener
        .local_addr()
        .context("Failed to read the API address")?;
    let data = web::Data::from(lifecycle);
    let document = web::Data::new(openapi::document(&settings.http.webhook_path));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(document.clone())
            .service(
                web::resource("/v1/verifications")
                    .route(web::post().to(routes::create))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/v1/verifications/{id}")
                    .route(web::get().to(routes::status))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .route(
                "/openapi.json",
                web::get().to(|doc: web::Data<String>| async move {
                    actix_web::HttpResponse::Ok()
                        .content_type("application/json")
                        .body(doc.get_ref().clone())
                }),
            )
            .default_service(web::to(routes::not_found))
    })
    .workers(2)
    .listen(listener)
    .context("Failed to listen on api.listen")?
    .disable_signals()
    .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
    .shutdown_timeout(settings.shutdown.grace.as_secs())
    .run();
    Ok((addr, server))
}
