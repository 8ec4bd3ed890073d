//! The 2xx promise when the broker or the disk runs out of a resource
//! (SPEC 4, 5, 6): a broker memory alarm (`connection.blocked`) on a private
//! RabbitMQ node, and a spool on a small tmpfs that fills up.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::loopfs::LoopFs;
use support::proxy::FaultProxy;
use support::rabbit_node::PrivateRabbit;
use support::tmpfs::SmallFs;
use support::*;

/// Issue 8, situation 4: under a memory alarm webhooks are answered 202 at
/// once (not after the confirm timeout), `amqp_connected` is 0, readiness
/// stays 200 (the spool takes events), and once the alarm clears every event
/// arrives exactly once: the publish that was in flight when the broker
/// blocked is not published a second time from the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_broker_spools_at_once_and_publishes_nothing_twice() {
    let node = PrivateRabbit::start().await;
    let mut options = Options::default()
        .env("AMQP__URI", node.amqp_uri())
        .env("AMQP__CONFIRM_TIMEOUT_MS", "5000");
    options.no_consumer = true;
    let app = spawn_app_with(options).await;
    let mut consumer = TestConsumer::bind_on(&node.amqp_uri(), &app.exchange, "#").await;

    let mut accepted = Vec::new();
    for _ in 0..5 {
        let id = unique("pre-alarm");
        let a = app.post(&event_body(&id)).await;
        assert_eq!((a.status, a.result()), (200, "published"));
        accepted.push(id);
    }

    node.set_memory_alarm(true);
    // RabbitMQ blocks a connection when it next publishes: the first event
    // is in flight when the block arrives, the rest meet a blocked link.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let id = unique("blocked");
        let started = Instant::now();
        let a = app.post(&event_body(&id)).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
        accepted.push(id);
    }
    assert!(
        slowest < Duration::from_secs(4),
        "spooled at once, not after the 5 s confirm timeout (slowest {slowest:?})"
    );
    assert_eq!(app.metric("sendtalk_relay_amqp_connected").await, Some(0.0));
    assert_eq!(
        app.admin("/readyz").await.0,
        200,
        "the spool can take events"
    );

    node.set_memory_alarm(false);
    let delivered = consumer
        .collect(
            accepted.len(),
            Duration::from_secs(30),
            Duration::from_secs(3),
        )
        .await;
    let counts: HashMap<String, usize> = id_counts(&delivered);
    for id in &accepted {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} delivered {:?} times",
            counts.get(id)
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.spool.as_ref().unwrap().depth() == 0
        })
        .await
    );
    assert_eq!(app.metric("sendtalk_relay_amqp_connected").await, Some(1.0));
}

/// Issue 16, finding 6: publishes in flight when the broker blocks the
/// connection, with a confirm timeout short enough that their deadline
/// passes while blocked, routable and unroutable ones mixed under
/// concurrency. A publish the client library has taken is never abandoned:
/// it stays tracked until the broker decides it, so after the alarm no
/// unroutable event was answered 200, every routable one arrives exactly
/// once, and every unroutable one arrives once a queue takes its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_in_flight_at_a_block_are_decided_by_the_broker_not_by_a_timer() {
    use futures_util::StreamExt as _;
    let node = PrivateRabbit::start().await;
    let mut options = Options::default()
        .env("AMQP__URI", node.amqp_uri())
        .env("AMQP__CONFIRM_TIMEOUT_MS", "1000")
        .env("WEBHOOK__ACCEPTED_STATUSES", "verified,failed");
    options.no_consumer = true;
    let app = spawn_app_with(options).await;
    let mut verified =
        TestConsumer::bind_on(&node.amqp_uri(), &app.exchange, "verification.verified").await;

    let ids: Vec<(String, &str)> = (0..400)
        .map(|i| {
            let status = if i % 2 == 0 { "verified" } else { "failed" };
            (unique(&format!("blk-{status}")), status)
        })
        .collect();
    let alarm = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.set_memory_alarm(true);
        tokio::time::sleep(Duration::from_secs(3)).await;
        node.set_memory_alarm(false);
    };
    let send = futures_util::stream::iter(ids.iter())
        .map(|(id, status)| {
            let app = &app;
            async move {
                let body = format!(
                    r#"{{"id":"{id}","userPhone":"{PHONE}","status":"{status}","verifiedTime":{}}}"#,
                    now_ms()
                );
                let a = app.post(&body).await;
                // Paced so that the load spans the alarm.
                tokio::time::sleep(Duration::from_millis(20)).await;
                (id.clone(), *status, a.status, a.result().to_string())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>();
    let ((), answers) = tokio::join!(alarm, send);
    let queued = answers.iter().filter(|a| a.2 == 202).count();
    assert!(queued > 0, "some events met the block: {answers:?}");
    for (id, status, code, result) in &answers {
        assert!(*code == 200 || *code == 202, "{id}: {code} {result}");
        if *status == "failed" {
            assert_ne!(
                result, "published",
                "{id}: an unroutable event answered published"
            );
        }
    }
    let routable: Vec<&String> = answers
        .iter()
        .filter(|a| a.1 == "verified")
        .map(|a| &a.0)
        .collect();
    let delivered = verified
        .collect(
            routable.len(),
            Duration::from_secs(40),
            Duration::from_secs(3),
        )
        .await;
    let counts = id_counts(&delivered);
    for id in &routable {
        assert_eq!(
            counts.get(*id),
            Some(&1),
            "{id} delivered {:?} times",
            counts.get(*id)
        );
    }
    // A queue for the other status: every unroutable event, once.
    let unroutable: Vec<&String> = answers
        .iter()
        .filter(|a| a.1 == "failed")
        .map(|a| &a.0)
        .collect();
    let mut failed =
        TestConsumer::bind_on(&node.amqp_uri(), &app.exchange, "verification.failed").await;
    let delivered = failed
        .collect(
            unroutable.len(),
            Duration::from_secs(90),
            Duration::from_secs(3),
        )
        .await;
    let counts = id_counts(&delivered);
    for id in &unroutable {
        assert!(counts.contains_key(*id), "{id} never delivered");
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.spool.as_ref().unwrap().depth() == 0
        })
        .await
    );
}

/// Issue 8, situation 2: with the broker cut and the spool's file system
/// full, webhooks are answered 503 with the claim released, readiness is 503
/// and `spool_errors_total` counts; once space is freed the spool reopens by
/// itself, readiness is 200 again, the refused id is accepted on retry, and
/// every event answered 202 reaches the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_with_503_and_recovers_without_restart() {
    let fs = SmallFs::mount(4 * 1024);
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut options = Options::default().env("AMQP__URI", broker.amqp_uri());
    options.spool_dir = Some(fs.path().join("spool"));
    let mut app = spawn_app_with(options).await;
    cut_broker(&app, &broker).await;

    let mut queued = Vec::new();
    for _ in 0..5 {
        let id = unique("before-full");
        let a = app.post(&event_body(&id)).await;
        assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
        queued.push(id);
    }

    fs.fill();
    let mut refused = None;
    for _ in 0..2000 {
        let id = unique("full");
        let a = app.post(&event_body(&id)).await;
        match a.status {
            202 => queued.push(id),
            503 => {
                assert_eq!(a.code(), "unavailable");
                assert!(a.headers.contains_key("retry-after"));
                refused = Some(id);
                break;
            }
            other => panic!("unexpected {other}: {:?}", a.json),
        }
    }
    let refused = refused.expect("a full disk ends in 503");
    let again = app.post(&event_body(&unique("still-full"))).await;
    assert_eq!(again.status, 503);
    assert_eq!(
        app.admin("/readyz").await.0,
        503,
        "nothing can take an event"
    );
    assert!(
        app.metric("sendtalk_relay_spool_errors_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );

    fs.free();
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.admin("/readyz").await.0 == 200
        })
        .await,
        "the spool reopens by itself once space is free"
    );
    // The claim was released: the sender's retry is accepted, not 409.
    let retry = app.post(&event_body(&refused)).await;
    assert_eq!(
        (retry.status, retry.result()),
        (202, "queued"),
        "{:?}",
        retry.json
    );
    queued.push(refused);

    broker.restore();
    let delivered = app
        .consumer()
        .collect(
            queued.len(),
            Duration::from_secs(30),
            Duration::from_secs(2),
        )
        .await;
    let lost = missing(&queued, &delivered);
    assert!(
        lost.is_empty(),
        "{} events answered 202 were lost: {lost:?}",
        lost.len()
    );
}

/// Issue 16, finding 1 (SPEC 5, stalled disk): the spool's file system is
/// frozen while the broker is down. The webhook waiting on the stalled
/// append gets 503 within the append's bound and `/readyz` turns 503. Once
/// the disk answers again the append that committed late is an ordinary
/// entry: `spool_depth` equals what is stored, everything drains when the
/// broker is back, and the next outage is answered 202, not "spool full".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_disk_answers_503_in_time_and_leaves_the_counts_right() {
    let fs = LoopFs::mount(64);
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut options = Options::default().env("AMQP__URI", broker.amqp_uri());
    options.spool_dir = Some(fs.path().join("spool"));
    let mut app = spawn_app_with(options).await;
    let spool = app.spool.clone().unwrap();
    cut_broker(&app, &broker).await;
    let first = unique("before-stall");
    let a = app.post(&event_body(&first)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);

    let frozen = fs.freeze();
    let stalled = unique("stalled");
    let started = Instant::now();
    let a = tokio::time::timeout(Duration::from_secs(10), app.post(&event_body(&stalled))).await;
    let waited = started.elapsed();
    let ready = tokio::time::timeout(Duration::from_secs(2), app.admin("/readyz")).await;
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(started.elapsed())).await;
    frozen.thaw();
    let a = a.expect("the webhook on a stalled disk is answered");
    assert_eq!((a.status, a.code()), (503, "unavailable"), "{:?}", a.json);
    assert!(waited < Duration::from_secs(8), "503 took {waited:?}");
    assert_eq!(
        ready.map(|r| r.0).ok(),
        Some(503),
        "neither the broker nor the stalled spool can take an event"
    );

    // The late append lands as an ordinary entry, counted by the store.
    let counted_right = || async {
        let stored = spool.stored_len().unwrap_or(u64::MAX);
        let gauge = app.metric("sendtalk_relay_spool_depth").await;
        stored == 2 && gauge == Some(2.0) && spool.depth() == 2
    };
    assert!(
        eventually(Duration::from_secs(10), counted_right).await,
        "depth {} (gauge {:?}), stored {:?}",
        spool.depth(),
        app.metric("sendtalk_relay_spool_depth").await,
        spool.stored_len()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.admin("/readyz").await.0 == 200
        })
        .await
    );

    broker.restore();
    let delivered = app
        .consumer()
        .collect(2, Duration::from_secs(30), Duration::from_millis(500))
        .await;
    let counts = id_counts(&delivered);
    assert!(
        counts.contains_key(&first) && counts.contains_key(&stalled),
        "{counts:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            spool.depth() == 0 && app.metric("sendtalk_relay_spool_depth").await == Some(0.0)
        })
        .await,
        "depth {} after the drain",
        spool.depth()
    );

    // The next outage is an ordinary one.
    cut_broker(&app, &broker).await;
    let later = unique("next-outage");
    let a = app.post(&event_body(&later)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    assert_eq!(spool.depth(), spool.stored_len().unwrap());
    broker.restore();
    let delivered = app
        .consumer()
        .collect(1, Duration::from_secs(30), Duration::from_millis(500))
        .await;
    assert_eq!(message_ids(&delivered), vec![later]);
    app.stop().await;
}

/// Found by the nemesis's 30-minute run (seed 30): a broker outage long
/// enough for the spool itself to fill its disk left entries that could
/// never drain (a copy-on-write store needs free pages to delete anything).
/// The spool keeps a disk reserve and releases it when it cannot reopen:
/// once the broker is back everything answered 202 drains, and the next
/// outage is answered 202 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spool_that_filled_its_own_disk_still_drains_and_takes_events_again() {
    let fs = SmallFs::mount(4 * 1024);
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut options = Options::default().env("AMQP__URI", broker.amqp_uri());
    options.spool_dir = Some(fs.path().join("spool"));
    let mut app = spawn_app_with(options).await;
    cut_broker(&app, &broker).await;
    let mut queued = Vec::new();
    let mut full = false;
    for i in 0..50_000 {
        let id = unique(&format!("fill-{i}"));
        let a = app.post(&event_body(&id)).await;
        match a.status {
            202 => queued.push(id),
            503 => {
                full = true;
                break;
            }
            other => panic!("unexpected {other}: {:?}", a.json),
        }
    }
    assert!(full, "the spool never filled its 4 MiB disk");
    assert!(queued.len() > 100, "only {} spooled", queued.len());

    broker.restore();
    let delivered = app
        .consumer()
        .collect(
            queued.len(),
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .await;
    let lost = missing(&queued, &delivered);
    assert!(
        lost.is_empty(),
        "{} of {} answered 202 not drained",
        lost.len(),
        queued.len()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.metric("sendtalk_relay_spool_depth").await == Some(0.0)
        })
        .await
    );

    cut_broker(&app, &broker).await;
    let next = unique("after-full");
    let a = app.post(&event_body(&next)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    broker.restore();
    let got = app
        .consumer()
        .collect(1, Duration::from_secs(30), Duration::from_millis(300))
        .await;
    assert_eq!(message_ids(&got), vec![next]);
    app.stop().await;
}

/// Cuts the relay's broker connection and waits until it reports it
/// (`amqp_connected` 0), so the next webhook meets the outage.
async fn cut_broker(app: &TestApp, broker: &FaultProxy) {
    broker.cut();
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.metric("sendtalk_relay_amqp_connected").await == Some(0.0)
        })
        .await,
        "the relay did not notice the broker cut"
    );
}
