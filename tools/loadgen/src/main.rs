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
//!
//! Layout: `relay`, `broker` and `http` hold one mode each; `housekeeping`
//! the helper subcommands of the scripts; `report` the one printer of the
//! results (and of every `RESULT` line); `monitor` the CPU and RSS sampling;
//! `client` the HTTP load client; `amqp` the RabbitMQ helpers; `procstat`
//! the reading of /proc.

mod amqp;
mod broker;
mod client;
mod housekeeping;
mod http;
mod monitor;
mod procstat;
mod relay;
mod report;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tokio::time::Instant;

use client::Clock;

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
            rt.block_on(relay::run(relay::RelayArgs {
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
            rt.block_on(broker::run(shape, amqp_uri))
        }
        Mode::Http {
            shape,
            server_workers,
        } => http::run(shape, server_workers),
        Mode::QueueBind {
            exchange,
            queue,
            expires_secs,
            amqp_uri,
        } => housekeeping::queue_bind(&exchange, &queue, expires_secs, &amqp_uri),
        Mode::QueueCount {
            queue,
            expect,
            within_secs,
            amqp_uri,
        } => housekeeping::queue_count(&queue, expect, within_secs, &amqp_uri),
        Mode::FreePort { count } => housekeeping::free_port(count),
        Mode::Cleanup {
            exchange,
            redis_prefix,
            amqp_uri,
            redis_url,
        } => housekeeping::cleanup(exchange, redis_prefix, amqp_uri, redis_url),
    }
}

/// `http://host:port[/path]` to a loopback address and the path (the
/// webhook path when none is given).
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

/// Refuses an AMQP URI whose host is not loopback.
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

/// The warm-up and the measured window of a run, starting now.
fn clock(shape: &Shape) -> Clock {
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(shape.warmup.max(0.0));
    let end = warm_end + Duration::from_secs_f64(shape.duration.max(0.1));
    Clock { warm_end, end }
}

/// A short random id that names a run's queues, exchange and event ids.
fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..18].to_string()
}
