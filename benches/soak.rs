//! Bounded soak: the relay binary under steady load for SOAK_SECS (default
//! 600) while a fault proxy periodically cuts RabbitMQ and Redis. Prints
//! sent / 2xx / delivered / lost / duplicated and the relay's RSS at start
//! and end; exits non-zero when anything answered 2xx was lost.
//! Loopback only; stops by itself. Run with `scripts/soak`.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::{
    base_env, cleanup_names, event_body, eventually, listen_on_free_ports, message_ids,
    relay_command, try_post_signed, unique, TestConsumer, WEBHOOK_PATH,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(String::from)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env_u64("SOAK_SECS", 600);
    let workers = usize::try_from(env_u64("SOAK_WORKERS", 16)).unwrap_or(usize::MAX);
    let cut_every = env_u64("SOAK_CUT_EVERY_SECS", 20);
    let cut_for = env_u64("SOAK_CUT_FOR_MS", 2500);

    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let redis = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let exchange = unique("soak.sendtalk");
    let prefix = format!("{}:", unique("soak"));
    let spool = std::env::temp_dir().join(unique("soak-spool"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;

    let mut cmd = relay_command();
    cmd.envs(base_env(&exchange, &prefix, &spool));
    let (port, admin) = listen_on_free_ports(&mut cmd);
    let mut relay = cmd
        .env("SENDTALK_RELAY__AMQP__URI", broker.amqp_uri())
        .env("SENDTALK_RELAY__REDIS__URL", redis.redis_url())
        .env("SENDTALK_RELAY__DEDUP__TTL_SECS", "7200")
        .env("SENDTALK_RELAY__WEBHOOK__MAX_EVENT_AGE_SECS", "3600")
        .env("SENDTALK_RELAY__LOG__LEVEL", "error,lapin=off")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}{WEBHOOK_PATH}");
    let client = reqwest::Client::new();
    assert!(
        eventually(Duration::from_secs(15), || {
            let c = client.clone();
            let u = format!("http://127.0.0.1:{admin}/readyz");
            async move { c.get(u).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await
    );
    let rss_start = rss_kib(relay.id());
    println!("soak: {secs}s, {workers} workers, a cut every {cut_every}s for {cut_for}ms (broker and Redis alternately)");

    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..workers)
        .map(|w| {
            let url = url.clone();
            let stop = stop.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let mut answers: HashMap<String, u16> = HashMap::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("soak{w}-{i}-{}", uuid::Uuid::new_v4().simple());
                    i += 1;
                    let status = try_post_signed(&client, &url, &event_body(&id))
                        .await
                        .map_or(0, |a| a.status);
                    answers.insert(id, status);
                }
                answers
            })
        })
        .collect();

    let started = Instant::now();
    let mut cuts = 0u32;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(
            Duration::from_secs(cut_every)
                .min(Duration::from_secs(secs).saturating_sub(started.elapsed())),
        )
        .await;
        if started.elapsed() >= Duration::from_secs(secs) {
            break;
        }
        let target = if cuts.is_multiple_of(2) {
            &broker
        } else {
            &redis
        };
        target.cut();
        tokio::time::sleep(Duration::from_millis(cut_for)).await;
        target.restore();
        cuts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = HashMap::new();
    for s in senders {
        answers.extend(s.await.unwrap());
    }
    let rss_end = rss_kib(relay.id());
    let accepted: Vec<&String> = answers
        .iter()
        .filter(|(_, s)| (200..300).contains(*s))
        .map(|(id, _)| id)
        .collect();

    let mut delivered: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && delivered.len() < accepted.len() {
        if let Some(d) = consumer.next(Duration::from_secs(5)).await {
            *delivered
                .entry(message_ids(std::slice::from_ref(&d))[0].clone())
                .or_insert(0) += 1;
        }
    }
    for d in consumer.drain(Duration::from_secs(2)).await {
        *delivered
            .entry(message_ids(std::slice::from_ref(&d))[0].clone())
            .or_insert(0) += 1;
    }
    let lost = accepted
        .iter()
        .filter(|id| !delivered.contains_key(**id))
        .count();
    let duplicated = delivered.values().filter(|n| **n > 1).count();
    let errors = answers
        .values()
        .filter(|s| !(200..300).contains(*s))
        .count();
    println!(
        "sent={} 2xx={} non2xx={} delivered={} lost={} duplicated={} cuts={} rss_start={:.1}MB rss_end={:.1}MB",
        answers.len(),
        accepted.len(),
        errors,
        delivered.len(),
        lost,
        duplicated,
        cuts,
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(relay.id().to_string())
        .status();
    let _ = relay.wait();
    cleanup_names(&exchange, &prefix).await;
    let _ = std::fs::remove_dir_all(&spool);
    if lost > 0 {
        eprintln!("soak: LOST {lost} accepted events");
        std::process::exit(1);
    }
}
