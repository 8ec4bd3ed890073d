//! Dedup through Redis Sentinel (SPEC 11): a private master, its replica and
//! three sentinels; the relay given `redis.mode = "sentinel"`, the sentinels
//! and the master name. The master is SIGKILLed under load: the sentinels
//! promote the replica, the relay finds it through them, and dedup works
//! again. Oracle: every id answered 2xx reaches the queue (SPEC 3: a
//! failover may forget a key, never lose an event).

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::time::{Duration, Instant};

use support::failover::{
    accepted_ids, delivered_without_loss, ids_first_sent_after, pair_load, post_settled,
    time_to_dedup_again,
};
use support::redis_nodes::RedisSentinels;
use support::*;

fn through_sentinels(redis: &RedisSentinels, options: Options) -> Options {
    options
        .env("REDIS__MODE", "sentinel")
        .env("REDIS__URLS", redis.urls())
        .env("REDIS__SENTINEL_SERVICE", redis.service.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_follows_the_promoted_replica_and_loses_nothing() {
    let mut redis = RedisSentinels::start();
    let exchange = unique("test.rsent");
    let prefix = format!("{}:", unique("test-rsent"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    let mut apps = Vec::new();
    for _ in 0..2 {
        let options = Options::replica_of(&exchange, &prefix);
        apps.push(spawn_app_with(through_sentinels(&redis, options)).await);
    }

    // Before the failover: dedup works through the sentinels, on the
    // master they name, with SPEC 3's key `prefix + id`.
    let id = unique("before");
    assert_eq!(
        post_settled(&apps[0], &event_body(&id)).await.result(),
        "published"
    );
    assert_eq!(
        post_settled(&apps[1], &event_body(&id)).await.result(),
        "duplicate"
    );
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}{id}"))
        .query(&mut redis.master.connection())
        .unwrap();
    assert!(record.is_some_and(|r| r.contains("verifiedTime")));

    // Six senders for 7 s, each id to one relay and then the other; the
    // master dies after 2 s.
    let urls: Vec<String> = apps.iter().map(|a| a.url.clone()).collect();
    let load = tokio::spawn(pair_load(urls, Instant::now() + Duration::from_secs(7), 6));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_master = redis.master.port();
    let killed = redis.kill_master();
    let (failover, probes) = time_to_dedup_again(
        &apps[1].url,
        killed,
        || unique("probe"),
        Duration::from_secs(30),
    )
    .await;
    let recovered = killed + failover;
    eprintln!("FAILOVER sentinel: {failover:?} from SIGKILL of the master to the first claim and commit on the promoted replica");
    let mut sent = load.await.unwrap();
    sent.extend(probes);
    assert_eq!(
        redis.current_master_port(),
        redis.replica.port(),
        "the sentinels promoted the replica (old master {old_master})"
    );

    // After the failover: a duplicate is answered `duplicate` by both
    // relays, and the record is on the new master.
    let id = unique("after");
    assert_eq!(
        post_settled(&apps[0], &event_body(&id)).await.result(),
        "published"
    );
    assert_eq!(
        post_settled(&apps[1], &event_body(&id)).await.result(),
        "duplicate"
    );
    assert_eq!(
        post_settled(&apps[0], &event_body(&id)).await.result(),
        "duplicate"
    );
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}{id}"))
        .query(&mut redis.replica.connection())
        .unwrap();
    assert!(record.is_some(), "committed on the promoted replica");

    let mut accepted = accepted_ids(&sent);
    accepted.insert(id.clone());
    let (delivered, _) = delivered_without_loss("sentinel", &mut consumer, &sent, &accepted).await;
    assert_eq!(delivered.copies.get(&id).map(Vec::len), Some(1));
    // Once the new master deduplicates, every id is delivered exactly once.
    for id in ids_first_sent_after(&sent, recovered) {
        if let Some(copies) = delivered.copies.get(&id) {
            assert_eq!(copies.len(), 1, "{id} sent after recovery: {copies:?}");
        }
    }
    drop(apps);
    cleanup_names(&exchange, &prefix).await;
}
