//! `loadgen`: the benchmark of issue 5.
//!
//! * `relay`  — pre-signed webhooks against a running relay; latency, status
//!   counts, relay RSS and CPU, and the loss check through a queue bound to
//!   the relay's exchange before the run.
//! * `broker` — the raw broker ceiling: a bare lapin publisher with
//!   confirms, same body size, same number of publishes in flight.
//! * `http`   — the HTTP ceiling: an in-process actix-web handler without
//!   I/O, driven by the same client.
//!
//! Every mode prints a human-readable report and one machine-readable line
//! starting with `RESULT` (key=value pairs) for scripts/bench.
//! Loopback only: the URL host must be 127.0.0.1 / localhost / ::1.

mod amqp;
mod client;
mod procstat;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tokio::time::Instant;

use client::{Clock, LoadPlan};

const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";
const WEBHOOK_PATH: &str = "/webhooks/sendtalk/verification";

#[derive(Parser)]
#[command(name = "loadgen", about = "sendtalk-relay benchmark (issue 5)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args, Clone)]
struct Shape {
    /// Requests (or publishes) in flight.
    #[arg(short = 'c', long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds (after the warm-up).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Client runtime threads (1 = current-thread runtime, least overhead).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
}

#[derive(Subcommand)]
enum Mode {
    /// Load a running relay and check that nothing answered 2xx was lost.
    Relay {
        #[command(flatten)]
        shape: Shape,
        /// Webhook URL of the relay (loopback only). Repeat it for several
        /// replicas: connections are spread over them round-robin, as an L4
        /// load balancer does.
        #[arg(
            long,
            default_value = "http://127.0.0.1:8080/webhooks/sendtalk/verification"
        )]
        url: Vec<String>,
        /// HMAC secret the relay accepts.
        #[arg(long, default_value = "bench-secret")]
        secret: String,
        /// The relay's exchange (a counting queue is bound to it before the run).
        #[arg(long)]
        exchange: String,
        #[arg(long, default_value = DEFAULT_AMQP)]
        amqp_uri: String,
        /// Share (0..1) of requests repeating an id already accepted.
        #[arg(long, default_value_t = 0.0)]
        dup_share: f64,
        /// Relay process id, for RSS and CPU; repeat it for several replicas
        /// (their CPU and RSS are summed).
        #[arg(long)]
        relay_pid: Vec<u32>,
        /// Pre-signed requests in total (spread over the workers); past
        /// this, requests are signed on the fly and counted.
        #[arg(long, default_value_t = 400_000)]
        pool: usize,
        /// Longest wait for the counting queue to settle after the run (s).
        #[arg(long, default_value_t = 60)]
        settle_secs: u64,
    },
    /// Raw broker ceiling: lapin publisher with confirms, no relay.
    Broker {
        #[command(flatten)]
        shape: Shape,
        #[arg(long, default_value = DEFAULT_AMQP)]
        amqp_uri: String,
    },
    /// HTTP ceiling: in-process actix-web handler answering 200 without I/O.
    Http {
        #[command(flatten)]
        shape: Shape,
        /// actix-web worker threads of the in-process server (the relay
        /// runs actix's default: one per CPU).
        #[arg(long)]
        server_workers: Option<usize>,
    },
    /// Declare a queue bound to `exchange` (and the exchange) that outlives
    /// this process; it expires after `expires_secs` unused.
    QueueBind {
        #[arg(long)]
        exchange: String,
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 600)]
        expires_secs: u64,
        #[arg(long, default_value = DEFAULT_AMQP)]
        amqp_uri: String,
    },
    /// Wait until a queue holds `expect` messages (or `within_secs` passes),
    /// print `RESULT mode=queue delivered=N`, then delete the queue.
    QueueCount {
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 0)]
        expect: u64,
        #[arg(long, default_value_t = 30)]
        within_secs: u64,
        #[arg(long, default_value = DEFAULT_AMQP)]
        amqp_uri: String,
    },
    /// Print free loopback TCP ports (bound together, then released).
    FreePort {
        #[arg(short = 'n', default_value_t = 1)]
        count: usize,
    },
    /// Delete an exchange and/or the Redis keys under a prefix.
    Cleanup {
        #[arg(long)]
        exchange: Option<String>,
        #[arg(long)]
        redis_prefix: Option<String>,
        #[arg(long, default_value = DEFAULT_AMQP)]
        amqp_uri: String,
        #[arg(long, default_value = DEFAULT_REDIS)]
        redis_url: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Mode::Relay {
            shape,
            url,
            secret,
            exchange,
            amqp_uri,
            dup_share,
            relay_pid,
            pool,
            settle_secs,
        } => {
            let mut addrs = Vec::with_capacity(url.len());
            let mut path = String::new();
            for u in &url {
                let (addr, p) = parse_loopback_url(u)?;
                addrs.push(addr);
                path = p;
            }
            check_loopback_amqp(&amqp_uri)?;
            let rt = client::runtime(shape.client_threads)?;
            rt.block_on(relay_mode(RelayArgs {
                shape,
                addrs,
                path,
                secret,
                exchange,
                amqp_uri,
                dup_share: dup_share.clamp(0.0, 0.95),
                relay_pid,
                pool,
                settle: Duration::from_secs(settle_secs),
            }))
        }
        Mode::Broker { shape, amqp_uri } => {
            check_loopback_amqp(&amqp_uri)?;
            let rt = client::runtime(shape.client_threads)?;
            rt.block_on(broker_mode(shape, amqp_uri))
        }
        Mode::Http {
            shape,
            server_workers,
        } => http_mode(shape, server_workers),
        Mode::QueueBind {
            exchange,
            queue,
            expires_secs,
            amqp_uri,
        } => {
            check_loopback_amqp(&amqp_uri)?;
            let rt = client::runtime(1)?;
            rt.block_on(async {
                let (conn, channel) = amqp::connect(&amqp_uri, "loadgen-queue").await?;
                amqp::declare_exchange(&channel, &exchange).await?;
                amqp::lasting_counting_queue(
                    &channel,
                    &exchange,
                    &queue,
                    Duration::from_secs(expires_secs),
                )
                .await?;
                let _ = conn.close(200, "done".into()).await;
                anyhow::Ok(())
            })
        }
        Mode::QueueCount {
            queue,
            expect,
            within_secs,
            amqp_uri,
        } => {
            check_loopback_amqp(&amqp_uri)?;
            let rt = client::runtime(1)?;
            rt.block_on(async {
                let (conn, channel) = amqp::connect(&amqp_uri, "loadgen-queue").await?;
                let delivered = amqp::settle(
                    &channel,
                    &queue,
                    expect,
                    Duration::from_millis(500),
                    Duration::from_secs(within_secs),
                )
                .await?;
                amqp::delete_queue(&channel, &queue).await;
                let _ = conn.close(200, "done".into()).await;
                println!("RESULT mode=queue delivered={delivered}");
                anyhow::Ok(())
            })
        }
        Mode::FreePort { count } => {
            let listeners: Vec<std::net::TcpListener> = (0..count)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<_, _>>()?;
            for l in &listeners {
                println!("{}", l.local_addr()?.port());
            }
            Ok(())
        }
        Mode::Cleanup {
            exchange,
            redis_prefix,
            amqp_uri,
            redis_url,
        } => {
            check_loopback_amqp(&amqp_uri)?;
            let rt = client::runtime(1)?;
            rt.block_on(cleanup(exchange, redis_prefix, amqp_uri, redis_url))
        }
    }
}

fn parse_loopback_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, WEBHOOK_PATH.to_string()),
    };
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {hostport}"))?
        .next()
        .context("no address")?;
    if !addr.ip().is_loopback() {
        bail!("loopback only: {addr} is not a loopback address");
    }
    Ok((addr, path))
}

fn check_loopback_amqp(uri: &str) -> anyhow::Result<()> {
    let host = uri
        .split('@')
        .next_back()
        .unwrap_or("")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        bail!("loopback only: AMQP host {host:?}");
    }
    Ok(())
}

fn clock(shape: &Shape) -> Clock {
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(shape.warmup.max(0.0));
    let end = warm_end + Duration::from_secs_f64(shape.duration.max(0.1));
    Clock { warm_end, end }
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..18].to_string()
}

struct RelayArgs {
    shape: Shape,
    addrs: Vec<SocketAddr>,
    path: String,
    secret: String,
    exchange: String,
    amqp_uri: String,
    dup_share: f64,
    relay_pid: Vec<u32>,
    pool: usize,
    settle: Duration,
}

/// What the monitor measured about the relay process during the window.
#[derive(Default, Debug, Clone, Copy)]
struct ProcWindow {
    cpu_at_warm_end: f64,
    cpu_at_end: f64,
    self_cpu_at_warm_end: f64,
    self_cpu_at_end: f64,
    rss_end_kb: u64,
    rss_max_kb: u64,
    sys_busy_at_warm_end: f64,
    sys_busy_at_end: f64,
}

impl ProcWindow {
    /// Busy cores of the whole machine during the window.
    fn system_cores(&self, secs: f64) -> f64 {
        (self.sys_busy_at_end - self.sys_busy_at_warm_end) / secs
    }
}

/// Sum of the processes' CPU seconds.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| procstat::cpu_secs(p)).sum()
}

/// Sum of the processes' RSS (kB); `None` without processes.
fn rss_of(pids: &[u32], read: fn(u32) -> Option<u64>) -> Option<u64> {
    (!pids.is_empty()).then(|| pids.iter().filter_map(|&p| read(p)).sum())
}

/// Samples the relays (if any) and this process at the window's edges and
/// every 250 ms in between (bounded by the clock).
async fn monitor(pids: Vec<u32>, clock: Clock) -> ProcWindow {
    let mut w = ProcWindow::default();
    tokio::time::sleep_until(clock.warm_end).await;
    w.self_cpu_at_warm_end = procstat::self_cpu_secs();
    w.sys_busy_at_warm_end = procstat::system_cpu_secs().0;
    w.cpu_at_warm_end = cpu_of(&pids);
    loop {
        w.rss_max_kb = w
            .rss_max_kb
            .max(rss_of(&pids, procstat::rss_kb).unwrap_or(0));
        let now = Instant::now();
        if now >= clock.end {
            break;
        }
        tokio::time::sleep_until((now + Duration::from_millis(250)).min(clock.end)).await;
    }
    w.self_cpu_at_end = procstat::self_cpu_secs();
    w.sys_busy_at_end = procstat::system_cpu_secs().0;
    w.cpu_at_end = cpu_of(&pids);
    w.rss_end_kb = rss_of(&pids, procstat::rss_kb).unwrap_or(0);
    w.rss_max_kb = w.rss_max_kb.max(w.rss_end_kb);
    w
}

async fn relay_mode(a: RelayArgs) -> anyhow::Result<()> {
    let run = run_id();
    // The counting queue exists before the first request.
    let (conn, channel) = amqp::connect(&a.amqp_uri, "loadgen-counter")
        .await
        .context("RabbitMQ not reachable")?;
    amqp::declare_exchange(&channel, &a.exchange).await?;
    let queue = format!("loadgen.count.{run}");
    amqp::counting_queue(&channel, &a.exchange, &queue).await?;

    let per_worker = a.pool.div_ceil(a.shape.concurrency.max(1));
    let plan = Arc::new(LoadPlan {
        addrs: a.addrs.clone(),
        path: a.path.clone(),
        concurrency: a.shape.concurrency.max(1),
        dup_share: a.dup_share,
        per_worker,
        cycle: false,
        secret: Arc::new(a.secret.clone().into_bytes()),
        run_id: run.clone(),
    });
    let signing = std::time::Instant::now();
    let pools = client::build_pools(&plan);
    let signing = signing.elapsed();

    let idle_rss = rss_of(&a.relay_pid, procstat::rss_kb);
    let clock = clock(&a.shape);
    let mon = tokio::spawn(monitor(a.relay_pid.clone(), clock));
    let result = client::run(plan.clone(), pools, clock).await;
    let proc_window = mon.await.unwrap_or_default();
    let after_rss = rss_of(&a.relay_pid, procstat::rss_kb);
    let hwm = rss_of(&a.relay_pid, procstat::hwm_kb);

    // Loss check: every event answered 200 published / 202 queued must be in
    // the queue (queued ones drain from the spool, so allow time).
    let new_events = result.total_of("200 published") + result.total_of("202 queued");
    let delivered = amqp::settle(
        &channel,
        &queue,
        new_events,
        Duration::from_secs(1),
        a.settle,
    )
    .await?;
    amqp::delete_queue(&channel, &queue).await;
    let _ = conn.close(200, "done".into()).await;

    let secs = a.shape.duration;
    let rps = result.window_count as f64 / secs;
    println!(
        "== relay: {} c={} warmup={}s measured={}s dup-share={} ==",
        a.addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(" + "),
        plan.concurrency,
        a.shape.warmup,
        secs,
        a.dup_share
    );
    println!(
        "pre-signed {} requests in {:.2} s (signed on the fly during the run: {})",
        per_worker * plan.concurrency,
        signing.as_secs_f64(),
        result.signed_on_the_fly
    );
    println!(
        "requests/s: {rps:.0}  ({} answers in the measured window)",
        result.window_count
    );
    client::print_latency("relay", &result.hist);
    println!("answers in the window by status:");
    for (k, v) in &result.window {
        println!("  {k}: {v}");
    }
    println!("answers over the whole run (warm-up included):");
    for (k, v) in &result.total {
        println!("  {k}: {v}");
    }
    let lost = new_events as i64 - delivered as i64;
    println!(
        "loss check: answered 2xx-new {new_events}, delivered to the bound queue {delivered}, lost = {} {}",
        lost.max(0),
        if lost < 0 { format!("(extra deliveries: {})", -lost) } else { String::new() }
    );
    let client_cpu = proc_window.self_cpu_at_end - proc_window.self_cpu_at_warm_end;
    let client_cpu_per_k = client_cpu / (result.window_count.max(1) as f64 / 1000.0);
    println!("client (loadgen) CPU: {client_cpu:.2} s in the window = {:.2} cores, {client_cpu_per_k:.4} s per 1000 requests", client_cpu / secs);
    println!(
        "machine busy: {:.2} of {} cores (relay + client + Redis + RabbitMQ + anything else)",
        proc_window.system_cores(secs),
        cores()
    );

    let mut line = format!(
        "RESULT mode=relay rps={rps:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} n={} new={new_events} delivered={delivered} lost={} extra={} client_cpu_per_k={client_cpu_per_k:.5} client_cores={:.3} system_cores={:.3} non2xx={}",
        result.hist.value_at_quantile(0.5) as f64 / 1000.0,
        result.hist.value_at_quantile(0.9) as f64 / 1000.0,
        result.hist.value_at_quantile(0.99) as f64 / 1000.0,
        result.hist.max() as f64 / 1000.0,
        result.window_count,
        lost.max(0),
        (-lost).max(0),
        client_cpu / secs,
        proc_window.system_cores(secs),
        result
            .total
            .iter()
            .filter(|(k, _)| !k.starts_with('2'))
            .map(|(_, v)| v)
            .sum::<u64>(),
    );
    if !a.relay_pid.is_empty() {
        let pid = a
            .relay_pid
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join("+");
        let cpu = proc_window.cpu_at_end - proc_window.cpu_at_warm_end;
        let per_k = cpu / (result.window_count.max(1) as f64 / 1000.0);
        let mb = |kb: u64| kb as f64 / 1024.0;
        println!(
            "relay pid {pid}: RSS idle {:.1} MB, at end of load {:.1} MB, max sampled {:.1} MB, after load {:.1} MB, VmHWM {:.1} MB",
            mb(idle_rss.unwrap_or(0)),
            mb(proc_window.rss_end_kb),
            mb(proc_window.rss_max_kb),
            mb(after_rss.unwrap_or(0)),
            mb(hwm.unwrap_or(0)),
        );
        println!(
            "relay CPU: {cpu:.2} s in the window = {:.2} cores, {per_k:.4} core-s per 1000 requests",
            cpu / secs
        );
        line.push_str(&format!(
            " rss_idle_mb={:.2} rss_load_mb={:.2} rss_max_mb={:.2} hwm_mb={:.2} cpu_per_k={per_k:.5} relay_cores={:.3}",
            mb(idle_rss.unwrap_or(0)),
            mb(proc_window.rss_end_kb),
            mb(proc_window.rss_max_kb),
            mb(hwm.unwrap_or(0)),
            cpu / secs
        ));
    }
    println!("{line}");
    Ok(())
}

async fn broker_mode(shape: Shape, amqp_uri: String) -> anyhow::Result<()> {
    let run = run_id();
    let exchange = format!("loadgen.broker.{run}");
    let queue = format!("loadgen.broker.q.{run}");
    let (conn, channel) = amqp::connect(&amqp_uri, "loadgen-broker")
        .await
        .context("RabbitMQ not reachable")?;
    amqp::declare_exchange(&channel, &exchange).await?;
    amqp::counting_queue(&channel, &exchange, &queue).await?;
    // Counting on a channel of its own: the publishing one is in confirm mode.
    let counter = conn.create_channel().await?;
    // Same size as a relay webhook body.
    let body = client::event_body(&client::fresh_id(&run, 0, 0), client::now_ms());
    let clock = clock(&shape);
    let mon = tokio::spawn(monitor(Vec::new(), clock));
    let outcome = amqp::publish_load(
        &channel,
        &exchange,
        body.clone(),
        shape.concurrency.max(1),
        clock,
        &run,
    )
    .await;
    let proc_window = mon.await.unwrap_or_default();
    let delivered = match &outcome {
        Ok(r) => amqp::settle(
            &counter,
            &queue,
            r.total_acked,
            Duration::from_millis(500),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or(0),
        Err(_) => 0,
    };
    amqp::delete_queue(&counter, &queue).await;
    let deleted = amqp::delete_exchange(&counter, &exchange).await;
    let _ = conn.close(200, "done".into()).await;
    let r = outcome?;
    deleted?;

    let secs = shape.duration;
    let rate = r.window_count as f64 / secs;
    let client_cpu = proc_window.self_cpu_at_end - proc_window.self_cpu_at_warm_end;
    println!("== broker: {} publishes in flight, body {} bytes, persistent, mandatory, confirms, measured={}s ==", shape.concurrency, body.len(), secs);
    println!(
        "msgs/s: {rate:.0}  (acked {}, nacked {}, returned {}, errors {}, in queue {delivered})",
        r.total_acked, r.nacked, r.returned, r.errors
    );
    client::print_latency("confirm", &r.hist);
    println!(
        "publisher (loadgen) CPU: {client_cpu:.2} s in the window = {:.2} cores",
        client_cpu / secs
    );
    println!(
        "machine busy: {:.2} of {} cores",
        proc_window.system_cores(secs),
        cores()
    );
    println!(
        "RESULT mode=broker rps={rate:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} n={} acked={} delivered={delivered} client_cores={:.3} system_cores={:.3}",
        r.hist.value_at_quantile(0.5) as f64 / 1000.0,
        r.hist.value_at_quantile(0.9) as f64 / 1000.0,
        r.hist.value_at_quantile(0.99) as f64 / 1000.0,
        r.hist.max() as f64 / 1000.0,
        r.window_count,
        r.total_acked,
        client_cpu / secs,
        proc_window.system_cores(secs),
    );
    Ok(())
}

async fn ok_handler(_body: actix_web::web::Bytes) -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"result":"published","id":"x"}"#)
}

fn http_mode(shape: Shape, server_workers: Option<usize>) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let workers = server_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let (tx, rx) = std::sync::mpsc::channel();
    let server_thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = actix_web::HttpServer::new(|| {
                actix_web::App::new().default_service(actix_web::web::to(ok_handler))
            })
            .workers(workers)
            .disable_signals()
            .listen(listener)?
            .run();
            let _ = tx.send(server.handle());
            server.await
        })
    });
    let handle = rx
        .recv_timeout(Duration::from_secs(10))
        .context("in-process HTTP server did not start")?;

    let plan = Arc::new(LoadPlan {
        addrs: vec![addr],
        path: WEBHOOK_PATH.to_string(),
        concurrency: shape.concurrency.max(1),
        dup_share: 0.0,
        per_worker: 1024,
        cycle: true,
        secret: Arc::new(b"bench-secret".to_vec()),
        run_id: run_id(),
    });
    let pools = client::build_pools(&plan);
    let rt = client::runtime(shape.client_threads)?;
    let (result, proc_window) = rt.block_on(async {
        let clock = clock(&shape);
        let mon = tokio::spawn(monitor(Vec::new(), clock));
        let result = client::run(plan.clone(), pools, clock).await;
        (result, mon.await.unwrap_or_default())
    });
    actix_web::rt::System::new().block_on(handle.stop(false));
    let _ = server_thread.join();

    let secs = shape.duration;
    let rps = result.window_count as f64 / secs;
    let cpu = proc_window.self_cpu_at_end - proc_window.self_cpu_at_warm_end;
    println!(
        "== http: in-process actix-web ({workers} workers) on {addr}, c={}, measured={}s ==",
        plan.concurrency, secs
    );
    println!("requests/s: {rps:.0}");
    client::print_latency("http", &result.hist);
    for (k, v) in &result.window {
        println!("  {k}: {v}");
    }
    println!(
        "process CPU (client + server): {cpu:.2} s in the window = {:.2} cores",
        cpu / secs
    );
    println!(
        "machine busy: {:.2} of {} cores",
        proc_window.system_cores(secs),
        cores()
    );
    println!(
        "RESULT mode=http rps={rps:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} n={} system_cores={:.3}",
        result.hist.value_at_quantile(0.5) as f64 / 1000.0,
        result.hist.value_at_quantile(0.9) as f64 / 1000.0,
        result.hist.value_at_quantile(0.99) as f64 / 1000.0,
        result.hist.max() as f64 / 1000.0,
        result.window_count,
        proc_window.system_cores(secs),
    );
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn cleanup(
    exchange: Option<String>,
    redis_prefix: Option<String>,
    amqp_uri: String,
    redis_url: String,
) -> anyhow::Result<()> {
    if let Some(exchange) = exchange {
        let (conn, channel) = amqp::connect(&amqp_uri, "loadgen-cleanup").await?;
        amqp::delete_exchange(&channel, &exchange).await?;
        let _ = conn.close(200, "done".into()).await;
        println!("deleted exchange {exchange}");
    }
    if let Some(prefix) = redis_prefix {
        if prefix.is_empty() || prefix.contains(['*', '?', '[']) {
            bail!("refusing to delete by prefix {prefix:?}");
        }
        let client = redis::Client::open(redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cursor: u64 = 0;
        let mut deleted = 0usize;
        // Bounded: SCAN terminates when the cursor returns to 0.
        for _ in 0..10_000_000u64 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                deleted += keys.len();
                let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        println!("deleted {deleted} Redis keys under {prefix}");
    }
    Ok(())
}
