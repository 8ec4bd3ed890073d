//! The relay as a real process: `kill -9` with events in the spool, and
//! SIGTERM under load. Every id answered 2xx must reach the broker.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::*;

struct Relay {
    child: Child,
    url: String,
    admin: String,
}

impl Relay {
    fn start(amqp_uri: &str, exchange: &str, prefix: &str, spool: &Path) -> Relay {
        Self::start_with(amqp_uri, exchange, prefix, spool, &[])
    }

    /// Like [`Self::start`], with extra `SENDTALK_RELAY__*` variables.
    fn start_with(
        amqp_uri: &str,
        exchange: &str,
        prefix: &str,
        spool: &Path,
        extra: &[(&str, &str)],
    ) -> Relay {
        let mut cmd = relay_command();
        cmd.envs(base_env(exchange, prefix, spool));
        let (port, admin) = listen_on_free_ports(&mut cmd);
        cmd.env("SENDTALK_RELAY__SHUTDOWN__GRACE_SECS", "10");
        for (k, v) in extra {
            cmd.env(format!("SENDTALK_RELAY__{k}"), v);
        }
        let child = cmd
            .env("SENDTALK_RELAY__AMQP__URI", amqp_uri)
            .env("SENDTALK_RELAY__LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(child_stderr())
            .spawn()
            .unwrap();
        Relay {
            child,
            url: format!("http://127.0.0.1:{port}{WEBHOOK_PATH}"),
            admin: format!("http://127.0.0.1:{admin}"),
        }
    }

    async fn wait_listening(&self) {
        let client = reqwest::Client::new();
        let url = format!("{}/healthz", self.admin);
        assert!(
            eventually(Duration::from_secs(15), || {
                let client = client.clone();
                let url = url.clone();
                async move { client.get(url).send().await.is_ok() }
            })
            .await,
            "relay did not start"
        );
    }

    fn signal(&self, signal: &str) {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_events_survive_kill_9_and_are_delivered_after_a_restart() {
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let exchange = unique("test.kill9");
    let prefix = format!("{}:", unique("test-kill9"));
    let spool = std::env::temp_dir().join(unique("spool-kill9"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    broker.cut();
    let first = Relay::start(&broker.amqp_uri(), &exchange, &prefix, &spool);
    first.wait_listening().await;
    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..20).map(|i| unique(&format!("k9-{i}"))).collect();
    for id in &ids {
        let a = try_post_signed(&client, &first.url, &event_body(id))
            .await
            .unwrap();
        assert_eq!(a.status, 202, "{:?}", a.json);
    }
    first.signal("KILL");
    drop(first);

    broker.restore();
    let second = Relay::start(AMQP_URI, &exchange, &prefix, &spool);
    second.wait_listening().await;
    let msgs = consumer
        .collect(
            ids.len(),
            Duration::from_secs(30),
            Duration::from_millis(500),
        )
        .await;
    let counts = id_counts(&msgs);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
    // The restarted relay knows them as accepted (the commit happened before 202).
    let again = try_post_signed(&client, &second.url, &event_body(&ids[0]))
        .await
        .unwrap();
    assert_eq!(again.result(), "duplicate");
    drop(second);
    cleanup_names(&exchange, &prefix).await;
    let _ = std::fs::remove_dir_all(spool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_every_accepted_event_is_in_the_broker() {
    let exchange = unique("test.term");
    let prefix = format!("{}:", unique("test-term"));
    let spool = std::env::temp_dir().join(unique("spool-term"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    let mut relay = Relay::start(AMQP_URI, &exchange, &prefix, &spool);
    relay.wait_listening().await;

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let url = relay.url.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut answers = HashMap::new();
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let id = unique(&format!("term{w}-{i}"));
                    i += 1;
                    match try_post_signed(&client, &url, &event_body(&id)).await {
                        Some(a) => {
                            answers.insert(id, a.status);
                        }
                        None => break, // the listener is closed
                    }
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = relay.child.wait().unwrap();
        drop(relay);
        s
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut answers = HashMap::new();
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    let accepted: HashSet<String> = answers
        .iter()
        .filter(|(_, s)| (200..300).contains(*s))
        .map(|(id, _)| id.clone())
        .collect();
    assert!(accepted.len() > 20, "load ran: {} accepted", accepted.len());
    let msgs = consumer
        .collect(
            accepted.len(),
            Duration::from_secs(20),
            Duration::from_millis(500),
        )
        .await;
    let delivered: HashSet<String> = message_ids(&msgs).into_iter().collect();
    let lost: Vec<_> = accepted.difference(&delivered).collect();
    // Anything spooled at shutdown drains at the next start; with the broker
    // up, the shutdown drain means nothing should be left behind at all.
    assert!(
        lost.is_empty(),
        "lost {} of {}: {lost:?}",
        lost.len(),
        accepted.len()
    );
    cleanup_names(&exchange, &prefix).await;
    let _ = std::fs::remove_dir_all(spool);
}

/// SPEC 6: the grace period runs out while a publish waits for its confirm.
/// The HTTP workers are stopped, but the webhook's pipeline is not dropped
/// with them: the event is spooled and its claim committed, so after a
/// restart the event drains to the broker and the sender's retry is
/// answered `duplicate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_deadline_still_commits_the_in_flight_webhook() {
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let exchange = unique("test.grace");
    let prefix = format!("{}:", unique("test-grace"));
    let spool = std::env::temp_dir().join(unique("spool-grace"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    let mut first = Relay::start_with(
        &broker.amqp_uri(),
        &exchange,
        &prefix,
        &spool,
        &[
            ("SHUTDOWN__GRACE_SECS", "1"),
            ("AMQP__CONFIRM_TIMEOUT_MS", "2000"),
        ],
    );
    first.wait_listening().await;
    broker.blackhole();
    let id = unique("past-grace");
    let body = event_body(&id);
    let url = first.url.clone();
    let request = {
        let body = body.clone();
        tokio::spawn(async move { try_post_signed(&reqwest::Client::new(), &url, &body).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.signal("TERM");
    let status = tokio::task::spawn_blocking(move || first.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Whether the sender got its answer or not, the pipeline finished.
    let _ = request.await;

    broker.restore();
    let second = Relay::start(AMQP_URI, &exchange, &prefix, &spool);
    second.wait_listening().await;
    let msgs = consumer
        .collect(1, Duration::from_secs(15), Duration::from_millis(500))
        .await;
    assert_eq!(message_ids(&msgs), vec![id.clone()]);
    let retry = try_post_signed(&reqwest::Client::new(), &second.url, &body)
        .await
        .unwrap();
    assert_eq!(retry.result(), "duplicate", "the claim was committed");
    drop(second);
    cleanup_names(&exchange, &prefix).await;
    let _ = std::fs::remove_dir_all(spool);
}

/// Issue 16, finding 9 (SPEC 6): SIGTERM while the drainer waits on a
/// stalled disk (the spool's file system frozen in the middle of a drain).
/// The shutdown gives up on the spool within the grace period plus a few
/// seconds and says so, and the process exits 1 (once the kernel lets its
/// writer thread go); nothing answered 202 is lost: a restart on the same
/// spool delivers every id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_stalled_disk_gives_up_on_the_spool_in_time_and_exits_1() {
    let fs = support::loopfs::LoopFs::mount(64);
    let spool = fs.path().join("spool");
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let exchange = unique("test.stall-term");
    let prefix = format!("{}:", unique("test-stall-term"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    broker.cut();
    let log = std::env::temp_dir()
        .join(unique("stall-term"))
        .with_extension("log");
    let mut cmd = relay_command();
    cmd.envs(base_env(&exchange, &prefix, &spool));
    let (port, admin) = listen_on_free_ports(&mut cmd);
    let mut child = cmd
        .env("SENDTALK_RELAY__SHUTDOWN__GRACE_SECS", "2")
        .env("SENDTALK_RELAY__AMQP__URI", broker.amqp_uri())
        .env("SENDTALK_RELAY__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let relay = Relay {
        child: Command::new("true").spawn().unwrap(),
        url: format!("http://127.0.0.1:{port}{WEBHOOK_PATH}"),
        admin: format!("http://127.0.0.1:{admin}"),
    };
    relay.wait_listening().await;
    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..300).map(|i| unique(&format!("st-{i}"))).collect();
    for id in &ids {
        let a = try_post_signed(&client, &relay.url, &event_body(id))
            .await
            .unwrap();
        assert_eq!(a.status, 202, "{:?}", a.json);
    }

    let frozen = fs.freeze();
    broker.restore();
    // The drainer publishes from the page cache; its removal then waits on
    // the frozen disk.
    let first = consumer.next(Duration::from_secs(15)).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let signalled = Instant::now();
    let gave_up = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("giving up on the spool") {
            break Some(signalled.elapsed());
        }
        if signalled.elapsed() > Duration::from_secs(15) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    frozen.thaw();
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(first.is_some(), "the drain had started");
    let gave_up = gave_up.expect("the shutdown said it gave up on the stalled spool");
    assert!(
        gave_up < Duration::from_secs(2 + 3 + 3),
        "gave up after {gave_up:?}"
    );
    assert_eq!(exited.and_then(|s| s.code()), Some(1), "exit status");

    // Nothing answered 202 is lost.
    let second = Relay::start(AMQP_URI, &exchange, &prefix, &spool);
    second.wait_listening().await;
    let mut seen: HashSet<String> = first
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(ToString::to_string))
        .collect();
    let rest = consumer
        .collect(
            ids.len(),
            Duration::from_secs(30),
            Duration::from_millis(500),
        )
        .await;
    seen.extend(message_ids(&rest));
    let lost: Vec<_> = ids.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(lost.is_empty(), "{} answered 202 and lost", lost.len());
    drop(second);
    drop(relay);
    cleanup_names(&exchange, &prefix).await;
    let _ = std::fs::remove_file(log);
}
