//! Scale-out on a RabbitMQ cluster (SPEC 11): three private nodes joined into
//! one cluster, a quorum queue declared by the relay (`[[amqp.queues]]
//! quorum = true`), and the relay given the three URIs. The node the relay
//! is connected to is stopped under load; the relay moves to the next one and
//! every event answered 2xx is in the quorum queue.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use support::rabbit_node::PrivateRabbit;
use support::*;

/// Three nodes, the second and third joined to the first.
async fn cluster() -> Vec<PrivateRabbit> {
    let (a, b, c) = tokio::join!(
        PrivateRabbit::start(),
        PrivateRabbit::start(),
        PrivateRabbit::start()
    );
    for node in [&b, &c] {
        node.ctl(&["stop_app"]);
        node.ctl(&["join_cluster", a.node_name()]);
        node.ctl(&["start_app"]);
    }
    let status = a.ctl(&["cluster_status"]);
    for node in [&b, &c] {
        assert!(status.contains(node.node_name()), "{status}");
    }
    vec![a, b, c]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_moves_to_the_next_node_and_the_quorum_queue_keeps_every_event() {
    let mut nodes = cluster().await;
    let queue = unique("quorum.q");
    let dir = std::env::temp_dir().join(unique("cluster-cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nsecrets = [\"{SECRET}\"]\n\n[[amqp.queues]]\nname = \"{queue}\"\nbinding_key = \"#\"\nquorum = true\n"
        ),
    )
    .unwrap();
    let uris: Vec<String> = nodes.iter().map(PrivateRabbit::amqp_uri).collect();
    let mut options = Options::default().env("AMQP__URI", uris.join(","));
    options.no_consumer = true;
    options.config_file = Some(config);
    let app = spawn_app_with(options).await;

    // Load from 8 senders; the first node (the one in use) stops after 2 s.
    let deadline = Instant::now() + Duration::from_secs(8);
    let senders: Vec<_> = (0..8)
        .map(|w| {
            let client = app.client.clone();
            let url = app.url.clone();
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let id = unique(&format!("cl-{w}-{i}"));
                    i += 1;
                    if let Some(a) = try_post_signed(&client, &url, &event_body(&id)).await {
                        if (200..300).contains(&a.status) {
                            accepted.push(id);
                        }
                    }
                }
                accepted
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped_at = Instant::now();
    tokio::task::block_in_place(|| nodes[0].stop());
    let mut accepted = HashSet::new();
    for s in senders {
        accepted.extend(s.await.unwrap());
    }
    // The relay is back on another node: a fresh event is published. The
    // bound leaves room for the quorum queue's new leader on a loaded
    // machine: in a full suite (three nodes booting in 10.7 s each) 20 s
    // ran out once.
    assert!(
        eventually(Duration::from_secs(40), || async {
            app.post(&event_body(&unique("after"))).await.result() == "published"
        })
        .await,
        "the relay publishes through the next node"
    );
    eprintln!(
        "failover: publishing again {:?} after the stop began",
        stopped_at.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.spool.as_ref().unwrap().depth() == 0
        })
        .await,
        "the spool drains to the surviving nodes"
    );

    let conn =
        lapin::Connection::connect(&nodes[1].amqp_uri(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = HashSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        if let Some(id) = d.properties.message_id() {
            seen.insert(id.to_string());
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let lost: Vec<_> = accepted.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(!accepted.is_empty());
    assert!(
        lost.is_empty(),
        "{} of {} accepted events lost",
        lost.len(),
        accepted.len()
    );
    eprintln!(
        "accepted {}, in the quorum queue {}",
        accepted.len(),
        seen.len()
    );
    std::fs::remove_dir_all(dir).unwrap();
}
