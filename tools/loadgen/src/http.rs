//! `http` mode: the HTTP ceiling, an in-process actix-web handler that
//! answers 200 without I/O, driven by the same client as a relay run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::client::{self, LoadPlan};
use crate::monitor::monitor;
use crate::report::{print_counts, print_latency, ResultLine, Window};
use crate::Shape;

async fn ok_handler(_body: actix_web::web::Bytes) -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"result":"published","id":"x"}"#)
}

/// Serves and loads for the run's window, then prints the report and the
/// `RESULT mode=http` line.
pub fn run(shape: Shape, server_workers: Option<usize>) -> anyhow::Result<()> {
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
        path: crate::WEBHOOK_PATH.to_string(),
        concurrency: shape.concurrency.max(1),
        dup_share: 0.0,
        per_worker: 1024,
        cycle: true,
        secret: Arc::new(b"bench-secret".to_vec()),
        run_id: crate::run_id(),
    });
    let pools = client::build_pools(&plan);
    let rt = client::runtime(shape.client_threads)?;
    let (result, proc_window) = rt.block_on(async {
        let clock = crate::clock(&shape);
        let mon = tokio::spawn(monitor(Vec::new(), clock));
        let result = client::run(plan.clone(), pools, clock).await;
        (result, mon.await.unwrap_or_default())
    });
    actix_web::rt::System::new().block_on(handle.stop(false));
    let _ = server_thread.join();

    let w = Window {
        secs: shape.duration,
        count: result.window_count,
        hist: &result.hist,
        proc: proc_window,
    };
    println!(
        "== http: in-process actix-web ({workers} workers) on {addr}, c={}, measured={}s ==",
        plan.concurrency, w.secs
    );
    println!("{}", w.rate_line("requests/s"));
    print_latency("http", &result.hist);
    print_counts(&result.window);
    println!(
        "{}",
        w.cpu_line("process CPU (client + server)", w.self_cpu())
    );
    println!("{}", w.machine_busy());
    result_line(&w).print();
    Ok(())
}

/// `RESULT mode=http ...`.
fn result_line(w: &Window) -> ResultLine {
    w.result("http").num("system_cores", w.system_cores(), 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::ProcWindow;
    use hdrhistogram::Histogram;

    /// The line is byte for byte what one `format!` printed before the
    /// shared printer (its format string is kept here as the oracle).
    #[test]
    fn the_http_result_line_keeps_its_keys_order_and_formats() {
        let mut h = Histogram::<u64>::new(3).expect("valid precision");
        for v in [1_234u64, 2_345, 3_456, 45_678, 1_000_001] {
            h.record(v).expect("in range");
        }
        let proc = ProcWindow {
            sys_busy_at_warm_end: 100.0,
            sys_busy_at_end: 111.5,
            ..ProcWindow::default()
        };
        let w = Window {
            secs: 7.0,
            count: 12_345,
            hist: &h,
            proc,
        };
        let (secs, rps) = (w.secs, w.count as f64 / w.secs);
        let expected = format!(
            "RESULT mode=http rps={rps:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} n={} system_cores={:.3}",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
            w.count,
            proc.system_cores(secs),
        );
        assert_eq!(result_line(&w).to_string(), expected);
        assert_eq!(
            expected,
            "RESULT mode=http rps=1763.6 p50_ms=3.457 p90_ms=1000.447 p99_ms=1000.447 max_ms=1000.447 n=12345 system_cores=1.643"
        );
    }
}
