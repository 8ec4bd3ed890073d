//! `broker` mode: the raw broker ceiling, a bare lapin publisher with
//! confirms, the same body size and the same number of publishes in flight
//! as a relay run.

use std::time::Duration;

use anyhow::Context as _;

use crate::monitor::monitor;
use crate::report::{print_latency, ResultLine, Window};
use crate::{amqp, client, Shape};

/// Publishes for the run's window, then prints the report and the
/// `RESULT mode=broker` line.
pub async fn run(shape: Shape, amqp_uri: String) -> anyhow::Result<()> {
    let run = crate::run_id();
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
    let clock = crate::clock(&shape);
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

    let w = Window {
        secs: shape.duration,
        count: r.window_count,
        hist: &r.hist,
        proc: proc_window,
    };
    println!("== broker: {} publishes in flight, body {} bytes, persistent, mandatory, confirms, measured={}s ==", shape.concurrency, body.len(), w.secs);
    println!(
        "{}  (acked {}, nacked {}, returned {}, errors {}, in queue {delivered})",
        w.rate_line("msgs/s"),
        r.total_acked,
        r.nacked,
        r.returned,
        r.errors
    );
    print_latency("confirm", &r.hist);
    println!("{}", w.cpu_line("publisher (loadgen) CPU", w.self_cpu()));
    println!("{}", w.machine_busy());
    result_line(&w, r.total_acked, delivered).print();
    Ok(())
}

/// `RESULT mode=broker ...`.
fn result_line(w: &Window, acked: u64, delivered: u64) -> ResultLine {
    w.result("broker")
        .int("acked", acked)
        .int("delivered", delivered)
        .num("client_cores", w.cores_of(w.self_cpu()), 3)
        .num("system_cores", w.system_cores(), 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::ProcWindow;
    use hdrhistogram::Histogram;

    /// The line is byte for byte what one `format!` printed before the
    /// shared printer (its format string is kept here as the oracle).
    #[test]
    fn the_broker_result_line_keeps_its_keys_order_and_formats() {
        let mut h = Histogram::<u64>::new(3).expect("valid precision");
        for v in [433u64, 1_001, 5_555, 70_000] {
            h.record(v).expect("in range");
        }
        let proc = ProcWindow {
            self_cpu_at_warm_end: 1.0,
            self_cpu_at_end: 6.5,
            sys_busy_at_warm_end: 10.0,
            sys_busy_at_end: 25.0,
            ..ProcWindow::default()
        };
        let w = Window {
            secs: 9.0,
            count: 98_765,
            hist: &h,
            proc,
        };
        let (acked, delivered) = (99_000u64, 98_999u64);
        let (secs, rate) = (w.secs, w.count as f64 / w.secs);
        let client_cpu = proc.self_cpu_at_end - proc.self_cpu_at_warm_end;
        let expected = format!(
            "RESULT mode=broker rps={rate:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} n={} acked={} delivered={delivered} client_cores={:.3} system_cores={:.3}",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
            w.count,
            acked,
            client_cpu / secs,
            proc.system_cores(secs),
        );
        assert_eq!(result_line(&w, acked, delivered).to_string(), expected);
    }
}
