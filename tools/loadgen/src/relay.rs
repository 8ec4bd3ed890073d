//! `relay` mode: pre-signed webhooks against running relays; latency,
//! status counts, relay RSS and CPU, and the loss check through a queue
//! bound to the relays' exchange before the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::client::{self, LoadPlan, LoadResult};
use crate::monitor::{monitor, rss_of};
use crate::report::{print_counts, print_latency, ResultLine, Window};
use crate::{amqp, procstat, Shape};

/// A `relay` run, its URLs and URI already checked by `main`.
pub struct RelayArgs {
    pub shape: Shape,
    /// One per replica; workers are spread over them round-robin.
    pub addrs: Vec<SocketAddr>,
    /// The webhook path (the same on every replica).
    pub path: String,
    pub secret: String,
    pub exchange: String,
    pub amqp_uri: String,
    /// Clamped to 0..0.95.
    pub dup_share: f64,
    pub relay_pid: Vec<u32>,
    /// Pre-signed requests in total.
    pub pool: usize,
    /// Longest wait for the counting queue to settle.
    pub settle: Duration,
}

/// RSS of the relays outside the window (kB, summed over the replicas).
struct RelayRss {
    idle_kb: u64,
    after_kb: u64,
    hwm_kb: u64,
}

/// Runs the load, then prints the report and the `RESULT mode=relay` line.
pub async fn run(a: RelayArgs) -> anyhow::Result<()> {
    let run = crate::run_id();
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
    let clock = crate::clock(&a.shape);
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

    let w = Window {
        secs: a.shape.duration,
        count: result.window_count,
        hist: &result.hist,
        proc: proc_window,
    };
    println!(
        "== relay: {} c={} warmup={}s measured={}s dup-share={} ==",
        a.addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(" + "),
        plan.concurrency,
        a.shape.warmup,
        w.secs,
        a.dup_share
    );
    println!(
        "pre-signed {} requests in {:.2} s (signed on the fly during the run: {})",
        per_worker * plan.concurrency,
        signing.as_secs_f64(),
        result.signed_on_the_fly
    );
    println!(
        "{}  ({} answers in the measured window)",
        w.rate_line("requests/s"),
        result.window_count
    );
    print_latency("relay", &result.hist);
    println!("answers in the window by status:");
    print_counts(&result.window);
    println!("answers over the whole run (warm-up included):");
    print_counts(&result.total);
    let lost = new_events as i64 - delivered as i64;
    println!(
        "loss check: answered 2xx-new {new_events}, delivered to the bound queue {delivered}, lost = {} {}",
        lost.max(0),
        if lost < 0 { format!("(extra deliveries: {})", -lost) } else { String::new() }
    );
    let client_cpu = w.self_cpu();
    println!(
        "{}, {:.4} s per 1000 requests",
        w.cpu_line("client (loadgen) CPU", client_cpu),
        w.per_thousand(client_cpu)
    );
    println!(
        "{} (relay + client + Redis + RabbitMQ + anything else)",
        w.machine_busy()
    );
    let rss = (!a.relay_pid.is_empty()).then(|| RelayRss {
        idle_kb: idle_rss.unwrap_or(0),
        after_kb: after_rss.unwrap_or(0),
        hwm_kb: hwm.unwrap_or(0),
    });
    if let Some(rss) = &rss {
        let pid = a
            .relay_pid
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join("+");
        println!(
            "relay pid {pid}: RSS idle {:.1} MB, at end of load {:.1} MB, max sampled {:.1} MB, after load {:.1} MB, VmHWM {:.1} MB",
            mb(rss.idle_kb),
            mb(w.proc.rss_end_kb),
            mb(w.proc.rss_max_kb),
            mb(rss.after_kb),
            mb(rss.hwm_kb),
        );
        let cpu = w.relay_cpu();
        println!(
            "{}, {:.4} core-s per 1000 requests",
            w.cpu_line("relay CPU", cpu),
            w.per_thousand(cpu)
        );
    }
    result_line(&w, new_events, delivered, non2xx(&result), rss.as_ref()).print();
    Ok(())
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Answers outside 2xx over the whole run.
fn non2xx(result: &LoadResult) -> u64 {
    result
        .total
        .iter()
        .filter(|(k, _)| !k.starts_with('2'))
        .map(|(_, v)| v)
        .sum()
}

/// `RESULT mode=relay ...`; the relay figures only when relay pids were given.
fn result_line(
    w: &Window,
    new_events: u64,
    delivered: u64,
    non2xx: u64,
    rss: Option<&RelayRss>,
) -> ResultLine {
    let lost = new_events as i64 - delivered as i64;
    let client_cpu = w.self_cpu();
    let line = w
        .result("relay")
        .int("new", new_events)
        .int("delivered", delivered)
        .int("lost", lost.max(0))
        .int("extra", (-lost).max(0))
        .num("client_cpu_per_k", w.per_thousand(client_cpu), 5)
        .num("client_cores", w.cores_of(client_cpu), 3)
        .num("system_cores", w.system_cores(), 3)
        .int("non2xx", non2xx);
    let Some(rss) = rss else {
        return line;
    };
    let cpu = w.relay_cpu();
    line.num("rss_idle_mb", mb(rss.idle_kb), 2)
        .num("rss_load_mb", mb(w.proc.rss_end_kb), 2)
        .num("rss_max_mb", mb(w.proc.rss_max_kb), 2)
        .num("hwm_mb", mb(rss.hwm_kb), 2)
        .num("cpu_per_k", w.per_thousand(cpu), 5)
        .num("relay_cores", w.cores_of(cpu), 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::ProcWindow;
    use hdrhistogram::Histogram;

    /// The line is byte for byte what one `format!` printed before the
    /// shared printer (its format string is kept here as the oracle).
    #[test]
    fn the_relay_result_line_keeps_its_keys_order_and_formats() {
        let mut h = Histogram::<u64>::new(3).expect("valid precision");
        for v in [812u64, 1_907, 2_222, 9_999, 250_000] {
            h.record(v).expect("in range");
        }
        let proc = ProcWindow {
            cpu_at_warm_end: 2.0,
            cpu_at_end: 11.125,
            self_cpu_at_warm_end: 0.25,
            self_cpu_at_end: 4.5,
            rss_end_kb: 30_100,
            rss_max_kb: 31_337,
            sys_busy_at_warm_end: 50.0,
            sys_busy_at_end: 69.75,
        };
        let w = Window {
            secs: 10.0,
            count: 54_321,
            hist: &h,
            proc,
        };
        let (new_events, delivered, non2xx) = (54_300u64, 54_301u64, 3u64);
        let rss = RelayRss {
            idle_kb: 12_000,
            after_kb: 29_000,
            hwm_kb: 33_000,
        };
        let (secs, rps) = (w.secs, w.count as f64 / w.secs);
        let lost = new_events as i64 - delivered as i64;
        let client_cpu = proc.self_cpu_at_end - proc.self_cpu_at_warm_end;
        let client_cpu_per_k = client_cpu / (w.count.max(1) as f64 / 1000.0);
        let head = format!(
            "RESULT mode=relay rps={rps:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} n={} new={new_events} delivered={delivered} lost={} extra={} client_cpu_per_k={client_cpu_per_k:.5} client_cores={:.3} system_cores={:.3} non2xx={}",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
            w.count,
            lost.max(0),
            (-lost).max(0),
            client_cpu / secs,
            proc.system_cores(secs),
            non2xx,
        );
        let cpu = proc.cpu_at_end - proc.cpu_at_warm_end;
        let per_k = cpu / (w.count.max(1) as f64 / 1000.0);
        let mb = |kb: u64| kb as f64 / 1024.0;
        let tail = format!(
            " rss_idle_mb={:.2} rss_load_mb={:.2} rss_max_mb={:.2} hwm_mb={:.2} cpu_per_k={per_k:.5} relay_cores={:.3}",
            mb(rss.idle_kb),
            mb(proc.rss_end_kb),
            mb(proc.rss_max_kb),
            mb(rss.hwm_kb),
            cpu / secs
        );
        assert_eq!(
            result_line(&w, new_events, delivered, non2xx, None).to_string(),
            head
        );
        assert_eq!(
            result_line(&w, new_events, delivered, non2xx, Some(&rss)).to_string(),
            format!("{head}{tail}")
        );
        assert!(head.contains(" lost=0 extra=1 "));
    }
}
