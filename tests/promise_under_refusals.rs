//! The 2xx promise when the broker refuses events (SPEC 4, 5): returns
//! attributed to the very publish they belong to under concurrency, and
//! refused entries retried with backoff instead of flooding healthy queues.

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
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let node = rabbit_node::PrivateRabbit::start().await;
    let mut options = Options::default().env("AMQP__URI", node.amqp_uri());
    options.no_consumer = true;
    let app = spawn_app_with(options).await;
    let mut healthy = TestConsumer::bind_on(&node.amqp_uri(), &app.exchange, "#").await;

    let conn = lapin::Connection::connect(&node.amqp_uri(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let full = unique("full.q");
    channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    channel
        .queue_bind(
            full.as_str().into(),
            app.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

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
