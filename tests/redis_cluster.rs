//! Dedup on a Redis Cluster (SPEC 11): a private six-node cluster (three
//! masters, three replicas), the relay given `redis.mode = "cluster"` and
//! the seed nodes. Keys are `prefix{id}`, so every key of one verification
//! lives in one slot and the Lua scripts run on whichever master owns it.
//! Oracle: every id answered 2xx reaches the queue; an id is delivered twice
//! only if its key lived on the master that was killed (SPEC 3: a failover
//! may forget a key, never lose an event).

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use support::failover::{
    accepted_ids, delivered_without_loss, ids_first_sent_after, pair_load, time_to_dedup_again,
};
use support::redis_nodes::{key_slot, RedisCluster};
use support::*;

const WAIT: Duration = Duration::from_secs(10);

fn on_cluster(cluster: &RedisCluster, options: Options) -> Options {
    options
        .env("REDIS__MODE", "cluster")
        .env("REDIS__URLS", cluster.urls())
}

/// The key the relay uses for `id` in cluster mode (the README's layout).
fn cluster_key(prefix: &str, id: &str) -> String {
    format!("{prefix}{{{id}}}")
}

/// Fresh ids, `per_master` of them on each master's slots.
fn ids_on_every_master(
    prefix: &str,
    owners: &[u16],
    masters: &[u16],
    per_master: usize,
) -> Vec<(String, u16)> {
    let mut picked: HashMap<u16, Vec<String>> = HashMap::new();
    while masters
        .iter()
        .any(|m| picked.get(m).map_or(0, Vec::len) < per_master)
    {
        let id = unique("slot");
        let owner = owners[usize::from(key_slot(&cluster_key(prefix, &id)))];
        let ids = picked.entry(owner).or_default();
        if ids.len() < per_master {
            ids.push(id);
        }
    }
    picked
        .into_iter()
        .flat_map(|(m, ids)| ids.into_iter().map(move |id| (id, m)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_and_the_in_flight_answer_work_on_every_master_of_a_cluster() {
    let cluster = RedisCluster::start();
    let mut app = spawn_app_with(on_cluster(&cluster, Options::default())).await;
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "three masters");
    let owners = cluster.slot_owners();
    let ids = ids_on_every_master(&app.key_prefix, &owners, &masters, 4);

    for (id, _) in &ids {
        let a = app.post(&event_body(id)).await;
        assert_eq!((a.status, a.result()), (200, "published"), "{:?}", a.json);
        let again = app.post(&event_body(id)).await;
        assert_eq!(
            (again.status, again.result()),
            (200, "duplicate"),
            "{:?}",
            again.json
        );
    }
    // The layout of the README: the committed record sits at `prefix{id}`
    // on the master owning the id's slot; `prefix + id` is never written.
    let mut conn = cluster.client();
    for (id, master) in &ids {
        let key = cluster_key(&app.key_prefix, id);
        let record: Option<String> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
        let record = record.unwrap_or_else(|| panic!("{key} holds the record"));
        assert!(record.contains("\"status\":\"verified\""), "{record}");
        let bare: Option<String> = redis::cmd("GET")
            .arg(format!("{}{id}", app.key_prefix))
            .query(&mut conn)
            .unwrap();
        assert_eq!(bare, None);
        let owner = owners[usize::from(key_slot(&key))];
        assert_eq!(owner, *master);
        let on_owner: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut cluster.node(owner).connection())
            .unwrap();
        assert_eq!(on_owner, 1, "{key} lives on the master owning its slot");
    }

    // An id held by another replica's lease, on each master: 409.
    let busy = ids_on_every_master(&app.key_prefix, &owners, &masters, 1);
    for (id, _) in &busy {
        let _: () = redis::cmd("SET")
            .arg(cluster_key(&app.key_prefix, id))
            .arg("lease:someone-else")
            .arg("EX")
            .arg(30)
            .query(&mut conn)
            .unwrap();
        let a = app.post(&event_body(id)).await;
        assert_eq!((a.status, a.code()), (409, "in_flight"), "{:?}", a.json);
        assert!(a.headers.contains_key("retry-after"));
    }

    let msgs = app
        .consumer()
        .collect(ids.len(), WAIT, Duration::from_secs(1))
        .await;
    let counts = id_counts(&msgs);
    for (id, _) in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id} published exactly once");
    }
    for (id, _) in &busy {
        assert_eq!(counts.get(id), None, "{id} was in flight elsewhere");
    }
    assert!(msgs
        .iter()
        .all(|d| header(d, "x-dedup").as_deref() == Some("checked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_one_cluster_publish_interleaved_duplicates_once() {
    let cluster = RedisCluster::start();
    let exchange = unique("test.rcluster");
    let prefix = format!("{}:", unique("test-rcluster"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        let options = Options::replica_of(&exchange, &prefix);
        apps.push(spawn_app_with(on_cluster(&cluster, options)).await);
    }
    let ids: Vec<String> = (0..30).map(|i| unique(&format!("trio{i}"))).collect();
    let bodies: Vec<String> = ids.iter().map(|id| event_body(id)).collect();
    // Every id to every relay, all at once; an in-flight answer is retried
    // as SendTalk would.
    let sends = bodies.iter().flat_map(|body| {
        apps.iter().map(move |app| async move {
            for _ in 0..100 {
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
    assert!(
        answers.iter().all(|a| a.status == 200),
        "{:?}",
        answers.iter().map(|a| &a.json).collect::<Vec<_>>()
    );
    let published = answers.iter().filter(|a| a.result() == "published").count();
    assert_eq!(published, ids.len(), "one relay published each id");
    let msgs = consumer
        .collect(ids.len(), WAIT, Duration::from_secs(1))
        .await;
    let counts = id_counts(&msgs);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id} published exactly once");
    }
    assert_eq!(msgs.len(), ids.len());
    let slots: HashSet<u16> = ids
        .iter()
        .map(|id| key_slot(&cluster_key(&prefix, id)))
        .collect();
    assert!(slots.len() > 20, "ids spread over many slots");
    drop(apps);
    cleanup_names(&exchange, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_loses_nothing_and_duplicates_only_its_own_keys() {
    let mut cluster = RedisCluster::start();
    let exchange = unique("test.rfail");
    let prefix = format!("{}:", unique("test-rfail"));
    let mut consumer = TestConsumer::bind(&exchange, "#").await;
    let mut apps = Vec::new();
    for _ in 0..2 {
        let options = Options::replica_of(&exchange, &prefix);
        apps.push(spawn_app_with(on_cluster(&cluster, options)).await);
    }
    let owners = cluster.slot_owners();
    let victim = cluster.masters()[0];
    let slot_of = |id: &str| usize::from(key_slot(&cluster_key(&prefix, id)));

    // Six senders for 7 s, each id to one relay and then the other; the
    // master of a third of the slots dies after 2 s.
    let urls: Vec<String> = apps.iter().map(|a| a.url.clone()).collect();
    let load = tokio::spawn(pair_load(urls, Instant::now() + Duration::from_secs(7), 6));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = cluster.kill(victim);
    let pick = || loop {
        let id = unique("probe");
        if owners[slot_of(&id)] == victim {
            return id;
        }
    };
    let (failover, probes) =
        time_to_dedup_again(&apps[0].url, killed, pick, Duration::from_secs(30)).await;
    let recovered = killed + failover;
    eprintln!("FAILOVER cluster: {failover:?} from SIGKILL of master {victim} to the first claim and commit on its promoted replica");
    let mut sent = load.await.unwrap();
    sent.extend(probes);
    cluster.wait_ready(Duration::from_secs(20));
    assert!(
        !cluster.masters().contains(&victim),
        "a replica took over the slots"
    );

    let accepted = accepted_ids(&sent);
    let (delivered, dup) = delivered_without_loss("cluster", &mut consumer, &sent, &accepted).await;
    for id in &dup {
        assert_eq!(
            owners[slot_of(id)],
            victim,
            "{id} duplicated although its key lived on a master that never failed"
        );
    }
    // Once the new master deduplicates, every id is delivered exactly once.
    for id in ids_first_sent_after(&sent, recovered) {
        if let Some(copies) = delivered.copies.get(&id) {
            assert_eq!(copies.len(), 1, "{id} sent after recovery: {copies:?}");
        }
    }
    drop(apps);
    cleanup_names(&exchange, &prefix).await;
}
