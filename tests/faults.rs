//! No loss under faults (SPEC 3-5): a TCP fault proxy stands between the
//! relay and RabbitMQ or Redis and cuts, blackholes and restores the
//! connection. Oracle everywhere: every id answered 2xx reaches a bound queue
//! (lost = 0), and an id answered with an error is never half-done.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::*;

const BROKER: &str = "127.0.0.1:5672";
const REDIS: &str = "127.0.0.1:6379";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

async fn app_behind(broker: &FaultProxy, redis: Option<&FaultProxy>, options: Options) -> TestApp {
    let mut options = options.env("AMQP__URI", broker.amqp_uri());
    if let Some(r) = redis {
        options = options.env("REDIS__URL", r.redis_url());
    }
    spawn_app_with(options).await
}

/// What a load run saw: the answer of every id it sent.
#[derive(Default, Debug)]
struct LoadResult {
    answers: HashMap<String, (u16, String)>,
}

impl LoadResult {
    fn accepted(&self) -> HashSet<String> {
        self.answers
            .iter()
            .filter(|(_, (s, _))| (200..300).contains(s))
            .map(|(id, _)| id.clone())
            .collect()
    }
    fn count(&self, status: u16) -> usize {
        self.answers.values().filter(|(s, _)| *s == status).count()
    }
}

/// Sends unique events from `workers` concurrent senders for `duration`.
async fn load(url: String, duration: Duration, workers: usize) -> LoadResult {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let id = unique(&format!("load{w}-{i}"));
                    i += 1;
                    let body = event_body(&id);
                    let sig = hmac_hex(SECRET, body.as_bytes());
                    let a = post_raw(
                        &client,
                        &url,
                        body.into_bytes(),
                        &[
                            ("content-type", "application/json"),
                            ("x-sendtalk-signature", &sig),
                        ],
                    )
                    .await;
                    seen.push((id, (a.status, a.result().to_string())));
                }
                seen
            })
        })
        .collect();
    let mut result = LoadResult::default();
    for t in tasks {
        result.answers.extend(t.await.unwrap());
    }
    result
}

/// Waits until every accepted id was delivered; returns (lost, duplicated).
async fn deliveries(
    consumer: &mut TestConsumer,
    accepted: &HashSet<String>,
    within: Duration,
) -> (Vec<String>, Vec<String>) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && !accepted.iter().all(|id| counts.contains_key(id)) {
        if let Some(d) = consumer.next(Duration::from_millis(500)).await {
            *counts
                .entry(message_ids(std::slice::from_ref(&d))[0].clone())
                .or_insert(0) += 1;
        }
    }
    for d in consumer.drain(Duration::from_millis(700)).await {
        *counts
            .entry(message_ids(std::slice::from_ref(&d))[0].clone())
            .or_insert(0) += 1;
    }
    let lost = accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .cloned()
        .collect();
    let dup = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    (lost, dup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_answers_202_and_the_spool_drains_when_it_returns() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(&broker, None, Options::default()).await;
    broker.cut();
    let ids: Vec<String> = (0..10).map(|i| unique(&format!("out{i}"))).collect();
    for id in &ids {
        let a = app.post(&event_body(id)).await;
        assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    }
    assert_eq!(app.spool.as_ref().unwrap().depth(), 10);
    assert!(app.metric("sendtalk_relay_spool_depth").await == Some(10.0));
    assert_eq!(
        app.admin("/readyz").await.0,
        200,
        "ready: the spool can take events"
    );
    // A queued event was committed: a retry is a duplicate, not a second copy.
    let again = app.post(&event_body(&ids[0])).await;
    assert_eq!((again.status, again.result()), (200, "duplicate"));

    broker.restore();
    let accepted: HashSet<String> = ids.iter().cloned().collect();
    let (lost, dup) = deliveries(app.consumer(), &accepted, Duration::from_secs(30)).await;
    assert!(lost.is_empty(), "lost {lost:?}");
    assert!(dup.is_empty(), "duplicated {dup:?}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.spool.as_ref().unwrap().depth() == 0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_spool_disabled_a_broker_outage_answers_503_and_releases_the_claim() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(
        &broker,
        None,
        Options::default().env("SPOOL__ENABLED", "false"),
    )
    .await;
    broker.cut();
    let id = unique("nospool");
    let a = app.post(&event_body(&id)).await;
    assert_eq!((a.status, a.code(), a.field()), (503, "unavailable", ""));
    assert!(a.headers.contains_key("retry-after"));
    assert!(
        !a.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("amqp"),
        "5xx bodies stay generic"
    );
    assert_eq!(
        app.redis_get(&id).await,
        None,
        "claim released: nothing half-done"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.admin("/readyz").await.0 == 503
        })
        .await
    );

    broker.restore();
    assert!(
        eventually(Duration::from_secs(15), || async {
            app.admin("/readyz").await.0 == 200
        })
        .await
    );
    let retry = app.post(&event_body(&id)).await;
    assert_eq!(
        retry.result(),
        "published",
        "the sender's retry goes through"
    );
    assert_eq!(
        message_ids(
            &app.consumer()
                .collect(1, Duration::from_secs(10), Duration::from_millis(500))
                .await
        ),
        vec![id]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_under_load_loses_nothing() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(&broker, None, Options::default()).await;
    let url = app.url.clone();
    let run = tokio::spawn(load(url, Duration::from_secs(4), 8));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    broker.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.restore();
    let result = run.await.unwrap();
    assert!(
        result.count(202) > 0,
        "the cut was felt: {} queued",
        result.count(202)
    );
    assert!(result.count(200) > 0);
    assert_eq!(
        result.accepted().len(),
        result.answers.len(),
        "every webhook was made durable"
    );
    let (lost, dup) = deliveries(app.consumer(), &result.accepted(), Duration::from_secs(40)).await;
    assert!(
        lost.is_empty(),
        "lost {} of {}: {lost:?}",
        lost.len(),
        result.answers.len()
    );
    // A publish in flight when the socket died may have reached the broker
    // before its confirm was lost: at-least-once, and only for queued ids.
    for id in &dup {
        assert_eq!(
            result.answers[id].0, 202,
            "{id} duplicated although confirmed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_confirming_gets_events_spooled_and_delivered_later() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(&broker, None, Options::default()).await;
    broker.blackhole();
    let id = unique("silent");
    let started = Instant::now();
    let a = app.post(&event_body(&id)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "waited for the confirm timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    broker.restore();
    let accepted = HashSet::from([id]);
    let (lost, _) = deliveries(app.consumer(), &accepted, Duration::from_secs(40)).await;
    assert!(lost.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_unreachable_at_start_up_is_used_once_it_appears() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    broker.cut();
    let mut app = app_behind(&broker, None, Options::default()).await;
    assert_eq!(app.metric("sendtalk_relay_amqp_connected").await, Some(0.0));
    let early = unique("early");
    assert_eq!(app.post(&event_body(&early)).await.status, 202);
    broker.restore();
    assert!(
        eventually(Duration::from_secs(15), || async {
            app.metric("sendtalk_relay_amqp_connected").await == Some(1.0)
        })
        .await
    );
    let late = unique("late");
    assert_eq!(app.post(&event_body(&late)).await.result(), "published");
    let accepted = HashSet::from([early, late]);
    let (lost, dup) = deliveries(app.consumer(), &accepted, Duration::from_secs(20)).await;
    assert!(
        lost.is_empty() && dup.is_empty(),
        "lost {lost:?} dup {dup:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_publish_policy_publishes_marked_skipped() {
    let redis = FaultProxy::start(addr(REDIS)).await;
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(&broker, Some(&redis), Options::default()).await;
    let before = unique("before");
    assert_eq!(app.post(&event_body(&before)).await.result(), "published");
    redis.cut();
    let during = unique("during");
    let a = app.post(&event_body(&during)).await;
    assert_eq!((a.status, a.result()), (200, "published"), "{:?}", a.json);
    let msgs = app
        .consumer()
        .collect(2, Duration::from_secs(10), Duration::from_millis(300))
        .await;
    assert_eq!(message_ids(&msgs), vec![before, during]);
    assert_eq!(header(&msgs[1], "x-dedup").as_deref(), Some("skipped"));
    assert_eq!(
        app.metric("sendtalk_relay_dedup_skipped_total").await,
        Some(1.0)
    );
    // The Redis pinger is the gauge's one writer; it notices within a second.
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.metric("sendtalk_relay_redis_connected").await == Some(0.0)
        })
        .await
    );
    redis.restore();
    assert!(
        eventually(Duration::from_secs(15), || async {
            app.metric("sendtalk_relay_redis_connected").await == Some(1.0)
        })
        .await
    );
    let after = unique("after");
    assert_eq!(app.post(&event_body(&after)).await.result(), "published");
    assert_eq!(
        app.post(&event_body(&after)).await.result(),
        "duplicate",
        "dedup works again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_reject_policy_answers_503_and_publishes_nothing() {
    let redis = FaultProxy::start(addr(REDIS)).await;
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(
        &broker,
        Some(&redis),
        Options::default().env("DEDUP__ON_UNAVAILABLE", "reject"),
    )
    .await;
    redis.cut();
    let a = app.post(&event_body(&unique("rej"))).await;
    assert_eq!((a.status, a.code()), (503, "unavailable"));
    assert!(a.headers.contains_key("retry-after"));
    assert!(app
        .consumer()
        .next(Duration::from_millis(500))
        .await
        .is_none());
    redis.restore();
    let id = unique("back");
    assert!(
        eventually(Duration::from_secs(15), || {
            let app = &app;
            let id = id.clone();
            async move { app.post(&event_body(&id)).await.status == 200 }
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cut_under_load_loses_nothing() {
    let redis = FaultProxy::start(addr(REDIS)).await;
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(&broker, Some(&redis), Options::default()).await;
    let run = tokio::spawn(load(app.url.clone(), Duration::from_secs(3), 8));
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restore();
    let result = run.await.unwrap();
    assert_eq!(result.accepted().len(), result.answers.len());
    let (lost, dup) = deliveries(app.consumer(), &result.accepted(), Duration::from_secs(20)).await;
    assert!(lost.is_empty(), "lost {lost:?}");
    assert!(dup.is_empty(), "unique ids are never duplicated: {dup:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_event_is_kept_in_the_spool_until_a_queue_is_bound() {
    let mut app = spawn_app_with(Options {
        no_consumer: true,
        ..Options::default()
    })
    .await;
    let id = unique("noroute");
    let a = app.post(&event_body(&id)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    assert!(app.metric("sendtalk_relay_unroutable_total").await == Some(1.0));
    app.consumer = Some(TestConsumer::bind(&app.exchange, "#").await);
    // The drainer retries unroutable entries after a pause.
    let msgs = app
        .consumer()
        .collect(1, Duration::from_secs(45), Duration::from_millis(300))
        .await;
    assert_eq!(message_ids(&msgs), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_sharing_redis_deliver_100_ids_once_each_except_across_an_ambiguous_cut() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    let exchange = unique("test.trio");
    let prefix = format!("{}:", unique("test-trio"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        let options = Options::replica_of(&exchange, &prefix);
        apps.push(Arc::new(app_behind(&broker, None, options).await));
    }
    let ids: Vec<String> = (0..100).map(|i| unique(&format!("trio{i}"))).collect();
    let mut sends = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        for app in &apps {
            let app = app.clone();
            let body = event_body(id);
            let id = id.clone();
            let delay = Duration::from_millis((n as u64) * 20);
            sends.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                loop {
                    let a = app.post(&body).await;
                    if a.status != 409 && a.status != 503 {
                        return (id, a.status);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    broker.cut();
    tokio::time::sleep(Duration::from_millis(800)).await;
    broker.restore();
    let mut queued = HashSet::new();
    for s in sends {
        let (id, status) = s.await.unwrap();
        assert!((200..300).contains(&status));
        if status == 202 {
            queued.insert(id);
        }
    }
    let accepted: HashSet<String> = ids.iter().cloned().collect();
    let (lost, dup) = deliveries(&mut consumer, &accepted, Duration::from_secs(40)).await;
    assert!(lost.is_empty(), "lost {lost:?}");
    // SPEC 3: exactly one message per id while the broker answers in time.
    // A publish in flight when the connection is cut may have been routed
    // before its confirm was lost; it is spooled (202) and published again
    // with the same message_id. Only such ids may appear twice.
    for id in &dup {
        assert!(
            queued.contains(id),
            "{id} duplicated although every answer for it was a confirmed 200"
        );
    }
    drop(apps);
    cleanup_names(&exchange, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_and_releases_the_claim() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(
        &broker,
        None,
        Options::default().env("SPOOL__MAX_BYTES", "600"),
    )
    .await;
    broker.cut();
    let first = unique("fits");
    assert_eq!(app.post(&event_body(&first)).await.status, 202);
    let second = unique("full");
    let a = app.post(&event_body(&second)).await;
    assert_eq!((a.status, a.code()), (503, "unavailable"), "{:?}", a.json);
    assert!(a.headers.contains_key("retry-after"));
    assert_eq!(app.redis_get(&second).await, None, "claim released");
    assert_eq!(
        app.admin("/readyz").await.0,
        503,
        "neither broker nor spool can take an event"
    );
    broker.restore();
    let accepted = HashSet::from([first]);
    let (lost, _) = deliveries(app.consumer(), &accepted, Duration::from_secs(20)).await;
    assert!(lost.is_empty());
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.admin("/readyz").await.0 == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_broker_in_the_uri_list_is_used_when_the_first_is_down() {
    let down = FaultProxy::start(addr(BROKER)).await;
    down.cut();
    let uris = format!("{},{AMQP_URI}", down.amqp_uri());
    let mut app = spawn_app_with(Options::default().env("AMQP__URI", uris)).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            app.metric("sendtalk_relay_amqp_connected").await == Some(1.0)
        })
        .await
    );
    let id = unique("failover");
    assert_eq!(app.post(&event_body(&id)).await.result(), "published");
    let msgs = app
        .consumer()
        .collect(1, Duration::from_secs(10), Duration::from_millis(300))
        .await;
    assert_eq!(message_ids(&msgs), vec![id]);
}

/// A confirm that misses `confirm_timeout_ms` is parked with its channel,
/// not dropped into the client library's dropped-confirm list (where lapin
/// keeps it until a channel error): the parked count falls back to zero
/// once the broker answers or the connection is replaced, the spooled
/// copies drain, and nothing answered 202 is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_missed_under_a_slow_broker_are_settled_not_abandoned() {
    let broker = FaultProxy::start(addr(BROKER)).await;
    let mut app = app_behind(
        &broker,
        None,
        Options::default().env("AMQP__CONFIRM_TIMEOUT_MS", "1000"),
    )
    .await;
    broker.blackhole();
    let ids: Vec<String> = (0..5).map(|i| unique(&format!("slow-{i}"))).collect();
    let bodies: Vec<String> = ids.iter().map(|id| event_body(id)).collect();
    let answers = futures_util::future::join_all(bodies.iter().map(|b| app.post(b))).await;
    for a in &answers {
        assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    }
    let publisher = app.publisher.clone().unwrap();
    assert!(publisher.late_confirms() <= ids.len());
    broker.restore();
    assert!(
        eventually(Duration::from_secs(15), || async {
            publisher.late_confirms() == 0 && app.spool.as_ref().unwrap().depth() == 0
        })
        .await,
        "parked confirms settle and the spool drains"
    );
    let msgs = app
        .consumer()
        .collect(
            ids.len(),
            Duration::from_secs(10),
            Duration::from_millis(500),
        )
        .await;
    let counts = id_counts(&msgs);
    for id in &ids {
        let n = counts.get(id).copied().unwrap_or(0);
        assert!((1..=2).contains(&n), "{id} delivered {n} times");
    }
}
