//! Expiry rate (SPEC 9.3, issue 17): how fast one replica's sweeper turns
//! due verifications into `expired` events. The relay runs in-process with
//! the lifecycle API on; each run writes N pending records straight into
//! its Redis store (as the create does, without SendTalk), their due times
//! spread over SPREAD_MS, and times the `verification.expired` events from
//! a queue bound before the writes. One line per run (created, due,
//! expired; lag after the last due time, rate, duplicates, missing), then
//! medians; exits non-zero when an id never expired or a run was invalid.
//! Loopback only, names of its own, removed at the end. Run with
//! `scripts/bench-expiry`.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt as _;
use sendtalk_relay::api::store::{Record, Store};
use support::{
    eventually, free_port, message_ids, now_ms, redis_store, spawn_app_with, unique, Options,
    TestApp, TestConsumer, PHONE,
};

/// Records written at once: enough to make creation take well under the
/// lead, so no record falls due while others are still being written.
const WRITE_CONCURRENCY: usize = 64;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the bench may change, from the environment.
struct Shape {
    n: usize,
    spread_ms: u64,
    lead_ms: u64,
    wait_secs: u64,
    quiet_ms: u64,
}

/// One run's figures (times in epoch milliseconds).
struct RunResult {
    n: usize,
    writes_ms: u64,
    /// First due time minus the end of the writes: below zero, records fell
    /// due while others were being written and the run does not count.
    margin_ms: i64,
    first_due: u64,
    last_due: u64,
    last_arrival: Option<u64>,
    duplicates: usize,
    missing: usize,
    unexpected: usize,
}

impl RunResult {
    fn lag_ms(&self) -> Option<i64> {
        self.last_arrival
            .map(|a| i64::try_from(a).unwrap() - i64::try_from(self.last_due).unwrap())
    }

    /// N over first due -> last arrival: bounded above by the offered rate
    /// (N over the spread), so it shows whether the sweeper keeps up, and
    /// the lag shows by how much it trails.
    fn rate(&self) -> Option<f64> {
        self.last_arrival
            .map(|a| self.n as f64 * 1000.0 / a.saturating_sub(self.first_due).max(1) as f64)
    }
}

/// The relay with the API and its sweeper on. SendTalk is a loopback port
/// nobody listens on: nothing here creates through it.
async fn spawn_relay(expiry_check_secs: u64) -> TestApp {
    let dead_sendtalk = format!("http://127.0.0.1:{}", free_port());
    let mut options = Options::default()
        .env("API__ENABLED", "true")
        .env("API__LISTEN", "127.0.0.1:0")
        .env("API__TOKENS", "bench-token-5e21")
        .env("API__EXPIRY_CHECK_SECS", expiry_check_secs.to_string())
        .env("SENDTALK__BASE_URL", dead_sendtalk)
        .env("SENDTALK__API_KEY", "bench-key");
    // The bench binds its own queue, to `verification.expired` only.
    options.no_consumer = true;
    spawn_app_with(options).await
}

/// Writes `ids` as pending records due uniformly over the spread, starting
/// `lead_ms` after the writes start (their end is not known in advance);
/// returns (start, first due, last due, end) of the writes.
async fn create(store: &Store, ids: &[String], shape: &Shape) -> (u64, u64, u64, u64) {
    let start = now_ms();
    let first_due = start + shape.lead_ms;
    let last = u64::try_from(ids.len().saturating_sub(1).max(1)).unwrap();
    let due_of = |i: usize| first_due + shape.spread_ms * u64::try_from(i).unwrap() / last;
    futures_util::stream::iter(ids.iter().enumerate())
        .map(|(i, id)| async move {
            store
                .create_pending(&Record::pending(id, PHONE, start, due_of(i)))
                .await
                .unwrap();
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    (start, first_due, due_of(ids.len() - 1), now_ms())
}

/// Creates N records and collects their `expired` events: until every id
/// arrived (or `wait_secs` after the last due time), then `quiet_ms` more
/// to catch duplicates.
async fn run_once(
    store: &Store,
    consumer: &mut TestConsumer,
    run: usize,
    shape: &Shape,
) -> RunResult {
    let batch = unique(&format!("exp{run}"));
    let ids: Vec<String> = (0..shape.n).map(|i| format!("{batch}-{i}")).collect();
    let wanted: HashSet<String> = ids.iter().map(|id| format!("{id}:expired")).collect();
    let (start, first_due, last_due, written) = create(store, &ids, shape).await;

    // First arrival per message id; later ones are duplicates.
    let mut arrivals: HashMap<String, u64> = HashMap::new();
    let (mut duplicates, mut unexpected) = (0, 0);
    let deadline = last_due + shape.wait_secs * 1000;
    loop {
        let all_in = arrivals.len() == wanted.len();
        let within = if all_in {
            Duration::from_millis(shape.quiet_ms)
        } else {
            Duration::from_millis(deadline.saturating_sub(now_ms()).max(1))
        };
        let Some(d) = consumer.next(within).await else {
            break;
        };
        let at = now_ms();
        let id = message_ids(std::slice::from_ref(&d)).remove(0);
        if !wanted.contains(&id) {
            unexpected += 1;
        } else if let Entry::Vacant(first) = arrivals.entry(id) {
            first.insert(at);
        } else {
            duplicates += 1;
        }
    }
    RunResult {
        n: shape.n,
        writes_ms: written - start,
        margin_ms: i64::try_from(first_due).unwrap() - i64::try_from(written).unwrap(),
        first_due,
        last_due,
        last_arrival: arrivals.values().max().copied(),
        duplicates,
        missing: wanted.len() - arrivals.len(),
        unexpected,
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some(f64::midpoint(v[n / 2 - 1], v[n / 2])),
    }
}

fn show(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.decimals$}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let shape = Shape {
        n: usize::try_from(env_u64("N", 3000)).unwrap().max(1),
        spread_ms: env_u64("SPREAD_MS", 1000),
        lead_ms: env_u64("LEAD_MS", 3000),
        wait_secs: env_u64("WAIT_SECS", 30),
        quiet_ms: env_u64("QUIET_MS", 2000),
    };
    let runs = usize::try_from(env_u64("RUNS", 3)).unwrap().max(1);
    let check_secs = env_u64("EXPIRY_CHECK_SECS", 1);

    let app = spawn_relay(check_secs).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            app.admin("/readyz").await.0 == 200
        })
        .await,
        "relay ready"
    );
    // Bound before any record exists: an event published to an unbound
    // exchange would be lost to the count.
    let mut consumer = TestConsumer::bind(&app.exchange, "verification.expired").await;
    let store = redis_store(&app.key_prefix);
    println!(
        "expiry bench: N={} over {} ms (offered {:.0}/s), first due {} ms after the writes start, sweep every {check_secs}s, {runs} runs, {} CPUs",
        shape.n,
        shape.spread_ms,
        shape.n as f64 * 1000.0 / shape.spread_ms.max(1) as f64,
        shape.lead_ms,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );

    let mut results = Vec::new();
    for run in 1..=runs {
        let r = run_once(&store, &mut consumer, run, &shape).await;
        println!(
            "run={run} n={} writes_ms={} margin_ms={} first_due={} last_due={} last_expired={} lag_ms={} rate={}/s duplicates={} missing={} unexpected={}",
            r.n,
            r.writes_ms,
            r.margin_ms,
            r.first_due,
            r.last_due,
            r.last_arrival.map_or_else(|| "-".into(), |a| a.to_string()),
            r.lag_ms().map_or_else(|| "-".into(), |l| l.to_string()),
            show(r.rate(), 1),
            r.duplicates,
            r.missing,
            r.unexpected,
        );
        results.push(r);
    }

    let lags = results
        .iter()
        .filter_map(RunResult::lag_ms)
        .map(|l| l as f64);
    let rates = results.iter().filter_map(RunResult::rate);
    let missing: usize = results.iter().map(|r| r.missing).sum();
    let duplicates: usize = results.iter().map(|r| r.duplicates).sum();
    let invalid = results.iter().filter(|r| r.margin_ms < 0).count();
    println!(
        "medians of {runs} runs: lag_ms={} rate={}/s; all runs: duplicates={duplicates} missing={missing} invalid_runs={invalid}",
        show(median(lags.collect()), 0),
        show(median(rates.collect()), 1),
    );
    // Drop runs the clean-up (exchange, Redis keys, spool) that exit skips.
    drop(consumer);
    drop(app);
    if missing > 0 {
        eprintln!("expiry bench: {missing} verifications never expired");
        std::process::exit(1);
    }
    if invalid > 0 {
        eprintln!(
            "expiry bench: {invalid} runs wrote records past their first due time; raise LEAD_MS"
        );
        std::process::exit(1);
    }
}
