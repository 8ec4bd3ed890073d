//! `rediss://` works in every `redis.mode` (SPEC 11): private servers that
//! speak TLS only, with a certificate from a test CA, and the relay binary
//! trusting that CA the way an operator would make it trust a private one
//! (`SSL_CERT_FILE`, read by the platform verifier's certificate loader).
//! Dedup must work: a first delivery is published, a second is a duplicate,
//! and the record is in Redis.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::process::{Child, Stdio};
use std::time::Duration;

use support::redis_nodes::{RedisCluster, RedisSentinels, RedisServer, TestTls};
use support::*;

/// The relay binary with the test's Redis settings and the test CA.
struct Relay {
    child: Child,
    /// Binds a queue, so that events are routed (published, not spooled).
    _consumer: TestConsumer,
    url: String,
    exchange: String,
    prefix: String,
}

impl Relay {
    async fn start(tls: &TestTls, redis: &[(&str, String)]) -> Relay {
        let exchange = unique("test.rtls");
        let prefix = format!("{}:", unique("test-rtls"));
        let spool = std::env::temp_dir().join(unique("rtls-spool"));
        let consumer = TestConsumer::bind(&exchange, "#").await;
        let mut cmd = relay_command();
        cmd.envs(base_env(&exchange, &prefix, &spool));
        let (port, admin) = listen_on_free_ports(&mut cmd);
        for (k, v) in redis {
            cmd.env(format!("SENDTALK_RELAY__{k}"), v);
        }
        let child = cmd
            .env("SSL_CERT_FILE", &tls.ca)
            .env("SENDTALK_RELAY__LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(if std::env::var("TEST_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        let relay = Relay {
            child,
            _consumer: consumer,
            url: format!("http://127.0.0.1:{port}{WEBHOOK_PATH}"),
            exchange,
            prefix,
        };
        // Ready means Redis answered a PING over TLS (`redis_connected`).
        let client = reqwest::Client::new();
        let metrics = format!("http://127.0.0.1:{admin}/metrics");
        let connected = eventually(Duration::from_secs(20), || {
            let client = client.clone();
            let metrics = metrics.clone();
            async move {
                let Ok(r) = client.get(metrics).send().await else {
                    return false;
                };
                let text = r.text().await.unwrap_or_default();
                metric(&text, "sendtalk_relay_redis_connected") == Some(1.0)
            }
        })
        .await;
        assert!(connected, "the relay reached Redis over TLS");
        relay
    }

    /// Publishes a fresh id, then delivers it again; returns the id.
    async fn publish_and_repeat(&self) -> String {
        let client = reqwest::Client::new();
        let id = unique("tls");
        let body = event_body(&id);
        let first = try_post_signed(&client, &self.url, &body).await.unwrap();
        assert_eq!(
            (first.status, first.result()),
            (200, "published"),
            "{:?}",
            first.json
        );
        let again = try_post_signed(&client, &self.url, &body).await.unwrap();
        assert_eq!((again.status, again.result()), (200, "duplicate"));
        id
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (exchange, prefix) = (self.exchange.clone(), self.prefix.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(cleanup_names(&exchange, &prefix));
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_redis_is_reached_with_rediss() {
    let server = RedisServer::start(true);
    let tls = server.tls().unwrap();
    let relay = Relay::start(tls, &[("REDIS__URL", server.node.url())]).await;
    assert!(server.node.url().starts_with("rediss://"));
    let id = relay.publish_and_repeat().await;
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("{}{id}", relay.prefix))
        .query(&mut server.node.connection())
        .unwrap();
    assert!(record.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_reached_with_rediss_seed_nodes() {
    let cluster = RedisCluster::start_with(true);
    let tls = cluster.tls().unwrap();
    let relay = Relay::start(
        tls,
        &[
            ("REDIS__MODE", "cluster".into()),
            ("REDIS__URLS", cluster.urls()),
        ],
    )
    .await;
    assert!(cluster.urls().starts_with("rediss://"));
    // Ids on every master: the client follows redirections over TLS too.
    for _ in 0..6 {
        let id = relay.publish_and_repeat().await;
        let record: Option<String> = redis::cmd("GET")
            .arg(format!("{}{{{id}}}", relay.prefix))
            .query(&mut cluster.client())
            .unwrap();
        assert!(record.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_master_is_found_and_reached_with_rediss() {
    let redis = RedisSentinels::start_with(true);
    let tls = redis.tls().unwrap();
    let relay = Relay::start(
        tls,
        &[
            ("REDIS__MODE", "sentinel".into()),
            ("REDIS__URLS", redis.urls()),
            ("REDIS__SENTINEL_SERVICE", redis.service.clone()),
        ],
    )
    .await;
    assert!(redis.urls().starts_with("rediss://"));
    let id = relay.publish_and_repeat().await;
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("{}{id}", relay.prefix))
        .query(&mut redis.master.connection())
        .unwrap();
    assert!(record.is_some(), "committed on the master over TLS");
}
