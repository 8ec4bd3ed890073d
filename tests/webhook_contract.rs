//! The HTTP and message contract of SPEC 2-4 against the real Redis and
//! RabbitMQ: every row of the response table, the message properties, and
//! deduplication.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_event_is_published_once_with_every_property_of_the_contract() {
    let mut app = spawn_app().await;
    let id = unique("evt");
    let body = event_body(&id);
    let answer = app
        .post_with(
            &body,
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("x-sendtalk-signature", &hmac_hex(SECRET, body.as_bytes())),
                ("x-request-id", "req-123"),
            ],
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.json);
    assert_eq!(
        answer.json,
        serde_json::json!({"result": "published", "id": id})
    );
    assert_eq!(answer.headers["x-request-id"], "req-123");

    let msgs = app.consumer().collect(1, WAIT, QUIET).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.data, body.as_bytes(), "body is relayed byte for byte");
    assert_eq!(m.routing_key.as_str(), "verification.verified");
    let p = &m.properties;
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), id);
    assert_eq!(
        p.kind().as_ref().unwrap().as_str(),
        "sendtalk.verification.verified"
    );
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), "sendtalk-relay");
    let ts = p.timestamp().unwrap();
    assert!(
        (i64::try_from(ts).unwrap() - now_secs()).abs() < 30,
        "timestamp is the receive time"
    );
    assert_eq!(header(m, "x-request-id").as_deref(), Some("req-123"));
    assert_eq!(header(m, "x-dedup").as_deref(), Some("checked"));
    let received = header(m, "x-received-at").unwrap();
    assert!(
        received.ends_with('Z') && received.len() == 24,
        "RFC 3339 with ms: {received}"
    );

    // After the commit the key holds the status and verifiedTime.
    let record: serde_json::Value =
        serde_json::from_str(&app.redis_get(&id).await.unwrap()).unwrap();
    assert_eq!(record["status"], "verified");
    assert!(record["verifiedTime"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_is_acknowledged_but_not_republished() {
    let mut app = spawn_app().await;
    let id = unique("dup");
    let body = event_body(&id);
    assert_eq!(app.post(&body).await.result(), "published");
    let again = app.post(&body).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.json,
        serde_json::json!({"result": "duplicate", "id": id})
    );
    let msgs = app
        .consumer()
        .collect(2, Duration::from_secs(2), QUIET)
        .await;
    assert_eq!(message_ids(&msgs), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_being_processed_elsewhere_is_answered_409_with_retry_after() {
    let mut app = spawn_app().await;
    let id = unique("busy");
    app.redis_set(&id, "lease:someone-else", 30).await;
    let answer = app.post(&event_body(&id)).await;
    assert_eq!(answer.status, 409);
    assert_eq!(answer.code(), "in_flight");
    assert_eq!(answer.field(), "");
    assert!(answer.headers.contains_key("retry-after"));
    assert!(app.consumer().next(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_deliveries_of_one_id_give_exactly_one_message() {
    let mut app = spawn_app().await;
    let id = unique("race");
    let body = event_body(&id);
    let answers = futures_util::future::join_all((0..50).map(|_| app.post(&body))).await;
    let published = answers.iter().filter(|a| a.result() == "published").count();
    assert_eq!(
        published,
        1,
        "{:?}",
        answers.iter().map(|a| &a.json).collect::<Vec<_>>()
    );
    for a in &answers {
        assert!(
            a.result() == "published" || a.result() == "duplicate" || a.code() == "in_flight",
            "unexpected answer {:?}",
            a.json
        );
    }
    let msgs = app
        .consumer()
        .collect(1, WAIT, Duration::from_secs(1))
        .await;
    assert_eq!(message_ids(&msgs), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_sharing_redis_publish_each_id_exactly_once() {
    let exchange = unique("test.shared");
    let prefix = format!("{}:", unique("test-shared"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(spawn_app_with(Options::replica_of(&exchange, &prefix)).await);
    }
    let ids: Vec<String> = (0..20).map(|i| unique(&format!("shared{i}"))).collect();
    let bodies: Vec<String> = ids.iter().map(|id| event_body(id)).collect();
    // Every id goes to every instance, interleaved, all at once; ids that
    // meet an in-flight claim are retried, as SendTalk would.
    let sends = bodies.iter().flat_map(|body| {
        apps.iter().map(move |app| async move {
            for _ in 0..50 {
                let a = app.post(body).await;
                if a.status != 409 {
                    return a;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("still in flight");
        })
    });
    let answers = futures_util::future::join_all(sends).await;
    assert!(answers.iter().all(|a| a.status == 200), "all answered 200");
    let msgs = consumer
        .collect(ids.len(), WAIT, Duration::from_secs(1))
        .await;
    let counts = id_counts(&msgs);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id} published exactly once");
    }
    assert_eq!(msgs.len(), ids.len());
    drop(apps);
    cleanup_names(&exchange, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_has_its_status_code_and_field_and_publishes_nothing() {
    let mut app = spawn_app().await;
    let fresh = now_ms();
    let old = fresh - 604_800_000 - 60_000;
    let future = fresh + 600_000;
    let too_big = format!(r#"{{"id":"x","pad":"{}"}}"#, "a".repeat(70_000));
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    // (body, content type, expected status, code, field)
    let cases: Vec<(String, &str, u16, &str, &str)> = vec![
        (
            "{not json".into(),
            "application/json",
            400,
            "invalid_json",
            "",
        ),
        (deep, "application/json", 400, "invalid_json", ""),
        ("[]".into(), "application/json", 400, "invalid_payload", ""),
        (
            format!(r#"{{"userPhone":"{PHONE}","status":"verified","verifiedTime":{fresh}}}"#),
            "application/json",
            400,
            "invalid_payload",
            "id",
        ),
        (
            format!(
                r#"{{"id":"a b","userPhone":"{PHONE}","status":"verified","verifiedTime":{fresh}}}"#
            ),
            "application/json",
            400,
            "invalid_payload",
            "id",
        ),
        (
            format!(
                r#"{{"id":"a","userPhone":"12ab5","status":"verified","verifiedTime":{fresh}}}"#
            ),
            "application/json",
            400,
            "invalid_payload",
            "userPhone",
        ),
        (
            format!(r#"{{"id":"a","userPhone":"{PHONE}","verifiedTime":{fresh}}}"#),
            "application/json",
            400,
            "invalid_payload",
            "status",
        ),
        (
            format!(r#"{{"id":"a","userPhone":"{PHONE}","status":"verified","verifiedTime":1.0}}"#),
            "application/json",
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        (
            format!(
                r#"{{"id":"a","userPhone":"{PHONE}","status":"verified","verifiedTime":1e12}}"#
            ),
            "application/json",
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        (
            format!(
                r#"{{"id":"a","userPhone":"{PHONE}","status":"verified","verifiedTime":"{fresh}"}}"#
            ),
            "application/json",
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        (
            format!(
                r#"{{"id":"a","userPhone":"{PHONE}","status":"pending","verifiedTime":{fresh}}}"#
            ),
            "application/json",
            422,
            "unsupported_status",
            "status",
        ),
        (
            format!(
                r#"{{"id":"a","userPhone":"{PHONE}","status":"verified","verifiedTime":{old}}}"#
            ),
            "application/json",
            422,
            "stale_event",
            "verifiedTime",
        ),
        (
            format!(
                r#"{{"id":"a","userPhone":"{PHONE}","status":"verified","verifiedTime":{future}}}"#
            ),
            "application/json",
            422,
            "stale_event",
            "verifiedTime",
        ),
        (
            event_body("a"),
            "text/plain",
            415,
            "unsupported_media_type",
            "",
        ),
        (too_big, "application/json", 413, "payload_too_large", ""),
    ];
    for (body, content_type, status, code, field) in cases {
        let sig = hmac_hex(SECRET, body.as_bytes());
        let a = app
            .post_with(
                &body,
                &[
                    ("content-type", content_type),
                    ("x-sendtalk-signature", &sig),
                ],
            )
            .await;
        let shown: String = body.chars().take(80).collect();
        assert_eq!(a.status, status, "{shown}: {:?}", a.json);
        assert_eq!(a.code(), code, "{shown}");
        assert_eq!(a.field(), field, "{shown}");
    }
    // Missing content type.
    let body = event_body("nct");
    let sig = hmac_hex(SECRET, body.as_bytes());
    let a = app
        .post_with(&body, &[("x-sendtalk-signature", &sig)])
        .await;
    assert_eq!((a.status, a.code()), (415, "unsupported_media_type"));
    assert!(
        app.consumer().next(QUIET).await.is_none(),
        "nothing published"
    );
    assert!(
        app.app_metrics
            .webhook_count(sendtalk_relay::metrics::Outcome::RejectedPayload)
            >= 16
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_run_in_the_specified_order() {
    let app = spawn_app().await;
    // Too large beats a missing signature.
    let big = "x".repeat(70_000);
    let a = app
        .post_with(&big, &[("content-type", "application/json")])
        .await;
    assert_eq!((a.status, a.code()), (413, "payload_too_large"));
    // Authentication beats media type and JSON syntax.
    let a = app
        .post_with("{oops", &[("content-type", "text/plain")])
        .await;
    assert_eq!((a.status, a.code()), (401, "missing_signature"));
    // Media type beats JSON syntax.
    let sig = hmac_hex(SECRET, b"{oops");
    let a = app
        .post_with(
            "{oops",
            &[
                ("content-type", "text/plain"),
                ("x-sendtalk-signature", &sig),
            ],
        )
        .await;
    assert_eq!((a.status, a.code()), (415, "unsupported_media_type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_larger_than_the_limit_is_refused_before_it_is_read() {
    let app = spawn_app_with(Options::default().env("HTTP__MAX_BODY_BYTES", "100")).await;
    // Declare a huge length but send only a little: the relay must answer
    // from the header alone instead of waiting for the rest.
    let head = format!(
        "POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{{\"id\":"
    );
    let text = raw_exchange(&app, head.as_bytes(), Duration::from_secs(5))
        .await
        .expect("answered in time");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_get_json_errors() {
    let app = spawn_app().await;
    let r = app.client.get(&app.url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"]["code"], "method_not_allowed");
    let r = app
        .client
        .post(format!("{}/extra", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"]["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_example_is_accepted_once_its_time_is_fresh() {
    let mut app = spawn_app().await;
    // A copy of the provider's documented example (shared/fixtures).
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/webhook-verified.json"
    ))
    .unwrap();
    // As documented (2023) it is a replay.
    let stale = app.post(&fixture).await;
    assert_eq!(
        (stale.status, stale.code(), stale.field()),
        (422, "stale_event", "verifiedTime")
    );
    let id = unique("fixture");
    let fresh = fixture
        .replace("1692847205385", &now_ms().to_string())
        .replace("fc0977f2-baa9-476d-8a3d-128c622d5ff6", &id);
    assert_eq!(app.post(&fresh).await.result(), "published");
    let msgs = app.consumer().collect(1, WAIT, QUIET).await;
    assert_eq!(msgs[0].data, fresh.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_kept_in_the_published_body() {
    let mut app = spawn_app().await;
    let id = unique("extra");
    let body = format!(
        r#"{{"id":"{id}","userPhone":"{PHONE}","status":"verified","verifiedTime":{},"channel":{{"name":"wa","n":[1,2]}}}}"#,
        now_ms()
    );
    assert_eq!(app.post(&body).await.result(), "published");
    let msgs = app.consumer().collect(1, WAIT, QUIET).await;
    assert_eq!(msgs[0].data, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_but_authenticated_body_goes_to_the_quarantine_exchange() {
    let exchange = unique("test.quar");
    let quarantine = format!("{exchange}.quarantine");
    let mut watcher = TestConsumer::bind(&quarantine, "#").await;
    let mut app = spawn_app_with(Options {
        exchange: Some(exchange.clone()),
        ..Options::default().env("AMQP__QUARANTINE_EXCHANGE", quarantine.clone())
    })
    .await;
    app.consumer = Some(TestConsumer::bind(&exchange, "#").await);
    let body = format!(
        r#"{{"id":"q1","userPhone":"1","status":"verified","verifiedTime":{}}}"#,
        now_ms()
    );
    let a = app.post(&body).await;
    assert_eq!((a.status, a.field()), (400, "userPhone"));
    let q = watcher.collect(1, WAIT, QUIET).await;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].data, body.as_bytes());
    assert_eq!(
        header(&q[0], "x-reject-reason").as_deref(),
        Some("invalid_payload")
    );
    // Unauthenticated bodies never reach it.
    let a = app
        .post_json(&body, ("x-sendtalk-signature", "sha256=00"))
        .await;
    assert_eq!(a.status, 401);
    assert!(watcher.next(QUIET).await.is_none());
    assert!(app.consumer().next(QUIET).await.is_none());
    cleanup_names(&exchange, &app.key_prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_queues_are_declared_and_bound() {
    let queue = unique("test.owned");
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        format!("[auth]\nsecrets = [\"{SECRET}\"]\n[[amqp.queues]]\nname = \"{queue}\"\nbinding_key = \"verification.#\"\n"),
    )
    .unwrap();
    let app = spawn_app_with(Options {
        config_file: Some(file),
        ..Options::default()
    })
    .await;
    assert_eq!(app.post(&event_body(&unique("decl"))).await.status, 200);
    let conn = lapin::Connection::connect(AMQP_URI, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let declared = ch
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        declared.message_count(),
        1,
        "the owned queue received the event"
    );
    ch.queue_delete(
        queue.as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
