//! The 2xx promise when the broker refuses events (SPEC 4, 5): returns
//! attributed to the very publish they belong to under concurrency, and
//! refused entries retried with backoff instead of flooding healthy queues.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use support::*;

fn body_with_status(id: &str, status: &str) -> String {
    format!(
        r#"{{"id":"{id}","userPhone":"{PHONE}","status":"{status}","verifiedTime":{}}}"#,
        now_ms()
    )
}

/// Issue 8, situation 1: 1,200 webhooks from 48 concurrent senders, half of
/// them for a status no queue takes. Oracle: no unroutable id is answered
/// 200; every routable id is delivered exactly once; once a queue for the
/// other status exists, every unroutable id arrives there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn returns_are_attributed_to_their_own_publish_under_concurrent_load() {
    let mut options = Options::default().env("WEBHOOK__ACCEPTED_STATUSES", "verified,failed");
    options.no_consumer = true;
    let app = spawn_app_with(options).await;
    let mut verified_queue = TestConsumer::bind(&app.exchange, "verification.verified").await;

    let ids: Vec<(String, &str)> = (0..1200)
        .map(|i| {
            let status = if i % 2 == 0 { "verified" } else { "failed" };
            (unique(&format!("ret-{status}")), status)
        })
        .collect();
    let answers: Vec<(String, &str, u16, String)> = futures_util::stream::iter(ids.iter())
        .map(|(id, status)| {
            let app = &app;
            async move {
                let a = app.post(&body_with_status(id, status)).await;
                (id.clone(), *status, a.status, a.result().to_string())
            }
        })
        .buffer_unordered(48)
        .collect()
        .await;

    let mut wrongly_published = Vec::new();
    for (id, status, code, result) in &answers {
        match *status {
            "failed" => {
                if *code == 200 {
                    wrongly_published.push(id.clone());
                }
                assert!(*code == 202 && result == "queued", "{id}: {code} {result}");
            }
            _ => assert!(
                (*code == 200 && result == "published") || *code == 202,
                "{id}: {code} {result}"
            ),
        }
    }
    assert!(
        wrongly_published.is_empty(),
        "{} unroutable events answered 200",
        wrongly_published.len()
    );

    let delivered = verified_queue
        .collect(600, Duration::from_secs(30), Duration::from_secs(2))
        .await;
    let counts = id_counts(&delivered);
    for (id, status, _, _) in &answers {
        if *status == "verified" {
            assert_eq!(
                counts.get(id),
                Some(&1),
                "{id} delivered {:?} times",
                counts.get(id)
            );
        }
    }
    assert_eq!(
        counts.len(),
        600,
        "only verified ids reach the verified queue"
    );

    // The unroutable events sit in the spool; a queue bound now gets each once.
    let mut failed_queue = TestConsumer::bind(&app.exchange, "verification.failed").await;
    let delivered = failed_queue
        .collect(600, Duration::from_secs(40), Duration::from_secs(3))
        .await;
    let counts: HashMap<String, usize> = id_counts(&delivered);
    let missing: Vec<_> = answers
        .iter()
        .filter(|(id, status, _, _)| *status == "failed" && !counts.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} spooled events never arrived",
        missing.len()
    );
    assert!(
        counts.values().all(|n| *n == 1),
        "a spooled event arrived twice"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.spool.as_ref().unwrap().depth() == 0
        })
        .await,
        "the spool empties once every entry is routed"
    );
}

/// Issue 8, situation 3: a second queue that refuses every message
/// (`x-max-length = 0`, `reject-publish`) makes the broker nack. The event is
/// spooled (202) and retried with per-entry backoff, so the healthy queue
/// gets a handful of copies in 20 s, not one a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nacking_queue_does_not_flood_the_other_queues() {
    let node = rabbit_node::PrivateRabbit::start().await;
    let mut options = Options::default().env("AMQP__URI", node.amqp_uri());
    options.no_consumer = true;
    let app = spawn_app_with(options).await;
    let mut healthy = TestConsumer::bind_on(&node.amqp_uri(), &app.exchange, "#").await;

    let conn = lapin::Connection::connect(&node.amqp_uri(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    bind_refusing_queue(&channel, &app.exchange).await;

    let id = unique("nacked");
    let a = app.post(&event_body(&id)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);

    let copies = healthy
        .collect(usize::MAX, Duration::from_secs(20), Duration::ZERO)
        .await;
    let n = message_ids(&copies).iter().filter(|m| **m == id).count();
    // The first publish, then retries after 1, 2, 4 and 8 s of backoff.
    assert!(n >= 1, "the healthy queue got the event");
    assert!(
        n <= 6,
        "{n} copies in 20 s: the refused entry is not backed off"
    );
    assert!(
        app.spool.as_ref().unwrap().depth() >= 1,
        "the refused entry is kept"
    );
}

/// Issue 16, finding 4: with `amqp.on_unroutable = "drop"` an event no
/// queue takes is answered 200 `dropped` (outcome `dropped`), never
/// `published`; a routable one is still `published`, and the spool keeps
/// nothing.
#[tokio::test]
async fn a_dropped_unroutable_event_is_answered_dropped_not_published() {
    let mut options = Options::default()
        .env("WEBHOOK__ACCEPTED_STATUSES", "verified,failed")
        .env("AMQP__ON_UNROUTABLE", "drop");
    options.no_consumer = true;
    let app = spawn_app_with(options).await;
    let mut verified_queue = TestConsumer::bind(&app.exchange, "verification.verified").await;

    let unroutable = unique("drop-failed");
    let a = app.post(&body_with_status(&unroutable, "failed")).await;
    assert_eq!((a.status, a.result()), (200, "dropped"), "{:?}", a.json);
    let routable = unique("drop-verified");
    let a = app.post(&body_with_status(&routable, "verified")).await;
    assert_eq!((a.status, a.result()), (200, "published"), "{:?}", a.json);

    let got = verified_queue
        .collect(1, Duration::from_secs(5), Duration::from_millis(300))
        .await;
    assert_eq!(message_ids(&got), vec![routable]);
    let metrics = app.admin("/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            "sendtalk_relay_webhooks_total{outcome=\"dropped\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "sendtalk_relay_unroutable_total"),
        Some(1.0)
    );
    assert_eq!(
        app.spool.as_ref().map(sendtalk_relay::spool::Spool::depth),
        Some(0)
    );
}

/// Whether `exchange` exists on the shared broker (a passive declare on a
/// channel of its own: a missing exchange closes that channel only).
async fn exchange_exists(exchange: &str) -> bool {
    let conn = lapin::Connection::connect(AMQP_URI, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let exists = channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "done".into()).await;
    exists
}

async fn delete_exchange(exchange: &str) {
    let conn = lapin::Connection::connect(AMQP_URI, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .exchange_delete(
            exchange.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// A consumer on a queue the relay declared (`[[amqp.queues]]`), and the
/// queue's deletion at the end.
struct NamedQueue {
    conn: lapin::Connection,
    consumer: lapin::Consumer,
    name: String,
}

impl NamedQueue {
    async fn consume(name: &str) -> NamedQueue {
        let conn = lapin::Connection::connect(AMQP_URI, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let consumer = consume_no_ack(&channel, name).await;
        NamedQueue {
            conn,
            consumer,
            name: name.to_string(),
        }
    }

    async fn delete(self) {
        let channel = self.conn.create_channel().await.unwrap();
        let _ = channel
            .queue_delete(
                self.name.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// Issue 16, finding 2 (SPEC 4, one recovery path): the exchange is deleted
/// under a running relay. The channel the broker closes (404) is handled
/// like a lost connection: events are spooled meanwhile (202, never lost),
/// the exchange and the relay's queue binding are declared again within a
/// few seconds, and everything answered 2xx reaches the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_exchange_is_declared_again_and_nothing_answered_2xx_is_lost() {
    let queue = unique("test.redeclare.q");
    let file = std::env::temp_dir()
        .join(unique("redeclare"))
        .with_extension("toml");
    std::fs::write(
        &file,
        format!("[[amqp.queues]]\nname = \"{queue}\"\nbinding_key = \"#\"\n"),
    )
    .unwrap();
    let options = Options {
        no_consumer: true,
        config_file: Some(file.clone()),
        ..Options::default()
    };
    let mut app = spawn_app_with(options).await;
    let mut consumer = NamedQueue::consume(&queue).await;

    let mut accepted = Vec::new();
    let first = unique("before-delete");
    let a = app.post(&event_body(&first)).await;
    assert_eq!((a.status, a.result()), (200, "published"), "{:?}", a.json);
    accepted.push(first);

    delete_exchange(&app.exchange).await;
    let deleted_at = std::time::Instant::now();
    for i in 0..20 {
        let id = unique(&format!("after-delete-{i}"));
        let a = app.post(&event_body(&id)).await;
        assert!(
            matches!(a.status, 200 | 202),
            "{id}: {} {:?}",
            a.status,
            a.json
        );
        accepted.push(id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || exchange_exists(&app.exchange)).await,
        "the exchange was not declared again {:?} after its deletion",
        deleted_at.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.metric("sendtalk_relay_amqp_connected").await == Some(1.0)
        })
        .await
    );
    let healed = unique("healed");
    let a = app.post(&event_body(&healed)).await;
    assert_eq!((a.status, a.result()), (200, "published"), "{:?}", a.json);
    accepted.push(healed);

    let seen = count_ids(
        &mut consumer.consumer,
        &accepted,
        Duration::from_secs(30),
        Duration::from_millis(300),
    )
    .await;
    let lost: Vec<_> = accepted
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "answered 2xx and lost: {lost:?}");
    app.stop().await;
    consumer.delete().await;
    let _ = std::fs::remove_file(file);
}

/// Issue 16, finding 3: `amqp.quarantine_exchange` names an exchange that
/// does not exist (`amqp.declare = false`, so nothing creates it). Valid and
/// invalid bodies sent together: every valid event is still answered 200
/// `published` (the quarantine publish never shares a channel with them),
/// every invalid one gets its 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_quarantine_exchange_never_hurts_valid_events() {
    let options = Options::default().env("AMQP__DECLARE", "false").env(
        "AMQP__QUARANTINE_EXCHANGE",
        unique("test.missing-quarantine"),
    );
    let mut app = spawn_app_with(options).await;
    let ids: Vec<String> = (0..60).map(|i| unique(&format!("valid-{i}"))).collect();
    let valid = futures_util::stream::iter(ids.iter())
        .map(|id| {
            let app = &app;
            async move { app.post(&event_body(id)).await }
        })
        .buffer_unordered(30);
    let invalid = futures_util::stream::iter(0..60)
        .map(|i| {
            let app = &app;
            async move {
                let body = format!(r#"{{"id":"bad-{i}","userPhone":"not-a-phone","status":"verified","verifiedTime":{}}}"#, now_ms());
                app.post(&body).await
            }
        })
        .buffer_unordered(30);
    let (valid, invalid): (Vec<Answer>, Vec<Answer>) =
        futures_util::future::join(valid.collect(), invalid.collect()).await;
    let not_published: Vec<_> = valid
        .iter()
        .filter(|a| (a.status, a.result()) != (200, "published"))
        .map(|a| (a.status, a.json.clone()))
        .collect();
    assert!(
        not_published.is_empty(),
        "{} of 60 valid events not published at once: {not_published:?}",
        not_published.len()
    );
    assert!(
        invalid.iter().all(|a| a.status == 400),
        "{:?}",
        invalid.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let delivered = app
        .consumer()
        .collect(60, Duration::from_secs(10), Duration::from_millis(300))
        .await;
    assert_eq!(id_counts(&delivered).len(), 60);
}

/// SPEC 4: with `amqp.declare = false` a missing exchange keeps
/// `amqp_connected` at 0 and readiness's `"broker"` false (events spool,
/// 202) until someone declares it; then the relay connects and drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_declare_off_a_missing_exchange_keeps_the_broker_unready_until_it_exists() {
    let mut options = Options::default().env("AMQP__DECLARE", "false");
    options.no_consumer = true;
    let app = spawn_app_with(options).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.metric("sendtalk_relay_amqp_connected").await, Some(0.0));
    let (_, ready) = app.admin("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["broker"], false, "{ready}");
    let id = unique("no-exchange");
    let a = app.post(&event_body(&id)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);

    let mut consumer = TestConsumer::bind(&app.exchange, "#").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.metric("sendtalk_relay_amqp_connected").await == Some(1.0)
        })
        .await,
        "connected once the exchange exists"
    );
    let got = consumer
        .collect(1, Duration::from_secs(10), Duration::from_millis(300))
        .await;
    assert_eq!(message_ids(&got), vec![id]);
    cleanup_names(&app.exchange, &app.key_prefix).await;
}
