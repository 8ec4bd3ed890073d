//! Test support: start the relay on port 0 against the real Redis and
//! RabbitMQ with names of its own, sign requests independently of the
//! relay's code, consume what reached the broker, and cut connections with a
//! TCP fault proxy. Logs only when `TEST_LOG` is set.

#![allow(dead_code)]
// Test support panics on purpose: a failed set-up is a failed test.
#![allow(clippy::unwrap_used)]

pub mod failover;
pub mod loopfs;
pub mod proxy;
pub mod rabbit_node;
pub mod redis_nodes;
pub mod tmpfs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::StreamExt as _;
use hmac::{Hmac, Mac};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use sendtalk_relay::config::Settings;
use sendtalk_relay::startup::Application;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

pub const AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const SECRET: &str = "test-secret-7f3a";
pub const PHONE: &str = "6281212345678";
pub const WEBHOOK_PATH: &str = "/webhooks/sendtalk/verification";

pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
    }
}

/// Standard error of a child process the test starts: shown with `TEST_LOG`.
pub fn child_stderr() -> std::process::Stdio {
    if std::env::var("TEST_LOG").is_ok() {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// A valid webhook body for `id`, with the current `verifiedTime`.
pub fn event_body(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","userPhone":"{PHONE}","status":"verified","verifiedTime":{}}}"#,
        now_ms()
    )
}

/// `sha256=<hex HMAC>` computed here, not by the relay's own signer.
pub fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Standard Webhooks headers computed here.
pub fn standard_headers(secret: &str, body: &[u8], ts: i64) -> Vec<(String, String)> {
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        None => secret.as_bytes().to_vec(),
    };
    let id = unique("msg");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    vec![
        ("webhook-id".into(), id),
        ("webhook-timestamp".into(), ts.to_string()),
        ("webhook-signature".into(), format!("v1,{sig}")),
    ]
}

pub fn now_secs() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

/// What a test may change before the app is built.
#[derive(Default)]
pub struct Options {
    /// Extra `SENDTALK_RELAY__*` variables (they win over the defaults here).
    pub env: Vec<(String, String)>,
    /// Use this spool directory instead of a fresh one (restart tests).
    pub spool_dir: Option<PathBuf>,
    /// Redis key prefix to share with other instances.
    pub key_prefix: Option<String>,
    /// Exchange to share with other instances.
    pub exchange: Option<String>,
    /// Do not bind a consumer queue (unroutable tests).
    pub no_consumer: bool,
    /// A TOML file layered under the test environment.
    pub config_file: Option<PathBuf>,
}

impl Options {
    /// One of several replicas sharing `exchange` and the Redis `key_prefix`;
    /// the test binds its own consumer.
    pub fn replica_of(exchange: &str, key_prefix: &str) -> Self {
        Options {
            exchange: Some(exchange.to_string()),
            key_prefix: Some(key_prefix.to_string()),
            no_consumer: true,
            ..Options::default()
        }
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env
            .push((format!("SENDTALK_RELAY__{key}"), value.into()));
        self
    }
}

/// A running relay with its own exchange, Redis prefix, spool and consumer.
pub struct TestApp {
    pub url: String,
    pub admin_url: String,
    /// `http://<api.listen>` when the lifecycle API is enabled.
    pub api_url: Option<String>,
    pub exchange: String,
    pub key_prefix: String,
    pub spool_dir: PathBuf,
    pub client: reqwest::Client,
    pub consumer: Option<TestConsumer>,
    pub app_metrics: sendtalk_relay::metrics::Metrics,
    pub spool: Option<sendtalk_relay::spool::Spool>,
    pub publisher: Option<sendtalk_relay::publish::AmqpPublisher>,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    owns_names: bool,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub fn base_env(exchange: &str, prefix: &str, spool: &std::path::Path) -> Vec<(String, String)> {
    [
        ("SINK", "amqp".to_string()),
        ("HTTP__LISTEN", "127.0.0.1:0".into()),
        ("ADMIN__LISTEN", "127.0.0.1:0".into()),
        ("AUTH__SECRETS", SECRET.into()),
        // The tests sign with HMAC (computed here, independently of the
        // relay); the default secret-header mode has tests of its own.
        ("AUTH__MODE", "hmac-sha256".into()),
        ("DEDUP__BACKEND", "redis".into()),
        ("DEDUP__KEY_PREFIX", prefix.into()),
        ("REDIS__URL", REDIS_URL.into()),
        ("AMQP__URI", AMQP_URI.into()),
        ("AMQP__EXCHANGE", exchange.into()),
        ("AMQP__CONFIRM_TIMEOUT_MS", "2000".into()),
        ("SPOOL__DIR", spool.display().to_string()),
        ("LOG__FORMAT", "pretty".into()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("SENDTALK_RELAY__{k}"), v))
    .collect()
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    init_logs();
    let owns_names = options.exchange.is_none();
    let exchange = options
        .exchange
        .clone()
        .unwrap_or_else(|| unique("test.sendtalk"));
    let key_prefix = options
        .key_prefix
        .clone()
        .unwrap_or_else(|| format!("{}:", unique("test-relay")));
    let spool_dir = options
        .spool_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(unique("sendtalk-spool")));
    let consumer = if options.no_consumer {
        None
    } else {
        Some(TestConsumer::bind(&exchange, "#").await)
    };
    let mut env = base_env(&exchange, &key_prefix, &spool_dir);
    env.extend(options.env);
    let settings =
        Settings::load(options.config_file.as_deref(), env).expect("test settings are valid");
    let app = Application::build(settings).await.expect("app builds");
    let url = format!("http://{}{WEBHOOK_PATH}", app.webhook_addr());
    let admin_url = format!("http://{}", app.admin_addr());
    let api_url = app.api_addr().map(|a| format!("http://{a}"));
    let app_metrics = app.metrics().clone();
    let spool = app.spool().cloned();
    let publisher = app.publisher().cloned();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        url,
        admin_url,
        api_url,
        exchange,
        key_prefix,
        spool_dir,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap(),
        consumer,
        app_metrics,
        spool,
        publisher,
        shutdown,
        handle: Some(handle),
        owns_names,
    }
}

/// A response reduced to what tests look at.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: serde_json::Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
    pub fn field(&self) -> &str {
        self.json["error"]["field"].as_str().unwrap_or("<none>")
    }
    pub fn result(&self) -> &str {
        self.json["result"].as_str().unwrap_or("")
    }
}

impl TestApp {
    /// POSTs `body` signed with the test secret (hmac-sha256).
    pub async fn post(&self, body: &str) -> Answer {
        let sig = hmac_hex(SECRET, body.as_bytes());
        self.post_with(
            body,
            &[
                ("content-type", "application/json"),
                ("x-sendtalk-signature", &sig),
            ],
        )
        .await
    }

    /// POSTs `body` as JSON with one extra header (a signature or secret).
    pub async fn post_json(&self, body: &str, header: (&str, &str)) -> Answer {
        self.post_with(body, &[("content-type", "application/json"), header])
            .await
    }

    pub async fn post_with(&self, body: &str, headers: &[(&str, &str)]) -> Answer {
        post_raw(&self.client, &self.url, body.as_bytes().to_vec(), headers).await
    }

    pub async fn admin(&self, path: &str) -> (u16, String) {
        let url = format!("{}{path}", self.admin_url);
        // A pooled connection the server closed while idle (keep-alive
        // timeout) fails once with IncompleteMessage: ask again on a new one.
        let r = match self.client.get(&url).send().await {
            Ok(r) => r,
            Err(_) => self.client.get(&url).send().await.unwrap(),
        };
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// How many messages reached the consumer, waiting for up to `expected`
    /// and a short quiet period after them to catch extras.
    pub async fn delivered(&mut self, expected: usize) -> usize {
        self.consumer()
            .collect(
                expected,
                Duration::from_secs(10),
                Duration::from_millis(400),
            )
            .await
            .len()
    }

    pub fn consumer(&mut self) -> &mut TestConsumer {
        self.consumer.as_mut().expect("app has a consumer")
    }

    pub async fn redis_get(&self, id: &str) -> Option<String> {
        let client = redis::Client::open(REDIS_URL).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("GET")
            .arg(format!("{}{id}", self.key_prefix))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    pub async fn redis_set(&self, id: &str, value: &str, ttl_secs: u64) {
        let client = redis::Client::open(REDIS_URL).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(format!("{}{id}", self.key_prefix))
            .arg(value)
            .arg("EX")
            .arg(ttl_secs)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// The token that stops this app (to trigger shutdown without waiting).
    pub fn stop_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the relay gracefully and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let exchange = self.exchange.clone();
        let prefix = self.key_prefix.clone();
        let spool_dir = self.spool_dir.clone();
        let owns = self.owns_names;
        // Clean-up needs async clients; run it on a runtime of its own so it
        // also works while the test's runtime is shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if owns {
                    cleanup_names(&exchange, &prefix).await;
                }
            });
            let _ = std::fs::remove_dir_all(spool_dir);
        })
        .join();
    }
}

/// Deletes a test's exchange and Redis keys.
pub async fn cleanup_names(exchange: &str, prefix: &str) {
    if let Ok(conn) = Connection::connect(AMQP_URI, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
            let _ = ch
                .exchange_delete(
                    format!("{exchange}.quarantine").into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
    if let Ok(client) = redis::Client::open(REDIS_URL) {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            // SCAN, not KEYS: never block the shared Redis, even after a soak.
            let mut cursor: u64 = 0;
            loop {
                let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                else {
                    break;
                };
                if !keys.is_empty() {
                    let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
}

pub async fn post_raw(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Answer {
    try_post(client, url, body, headers)
        .await
        .expect("relay answers")
}

/// Like [`post_raw`], but `None` when the connection fails (a relay that is
/// shutting down); a non-JSON answer still fails the test.
pub async fn try_post(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Option<Answer> {
    let mut req = client.post(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.body(body).send().await.ok()?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.ok()?;
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("answer is not JSON: {status} {text:?}"));
    Some(Answer {
        status,
        headers,
        json,
    })
}

/// POSTs a body signed with the test secret.
pub async fn try_post_signed(client: &reqwest::Client, url: &str, body: &str) -> Option<Answer> {
    let sig = hmac_hex(SECRET, body.as_bytes());
    try_post(
        client,
        url,
        body.as_bytes().to_vec(),
        &[
            ("content-type", "application/json"),
            ("x-sendtalk-signature", &sig),
        ],
    )
    .await
}

/// A consumer with its own exclusive queue bound to an exchange.
pub struct TestConsumer {
    _conn: Connection,
    pub channel: Channel,
    consumer: lapin::Consumer,
    pub queue: String,
}

impl TestConsumer {
    pub async fn bind(exchange: &str, binding: &str) -> Self {
        Self::bind_on(AMQP_URI, exchange, binding).await
    }

    /// Like [`Self::bind`], on the broker at `uri` (a private node).
    pub async fn bind_on(uri: &str, exchange: &str, binding: &str) -> Self {
        let conn = Connection::connect(uri, ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable");
        let channel = conn.create_channel().await.unwrap();
        declare_exchange(&channel, exchange).await;
        let queue = unique("test.q");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            _conn: conn,
            channel,
            consumer,
            queue,
        }
    }

    /// The next message, or `None` after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Delivery> {
        match tokio::time::timeout(within, self.consumer.next()).await {
            Ok(Some(Ok(d))) => {
                d.ack(BasicAckOptions::default()).await.unwrap();
                Some(d)
            }
            _ => None,
        }
    }

    /// Everything that arrives until nothing has come for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Some(d) = self.next(quiet).await {
            out.push(d);
        }
        out
    }

    /// Collects until `n` messages arrived or `within` passed, then waits
    /// `quiet` more to catch extras.
    pub async fn collect(&mut self, n: usize, within: Duration, quiet: Duration) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self.next(left).await {
                Some(d) => out.push(d),
                None => break,
            }
        }
        out.extend(self.drain(quiet).await);
        out
    }
}

pub async fn declare_exchange(channel: &Channel, exchange: &str) {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

pub fn message_ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| {
            d.properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// How many times each message id was delivered.
/// The ids of `ids` that no delivery carries.
pub fn missing<'a>(ids: &'a [String], deliveries: &[Delivery]) -> Vec<&'a String> {
    let counts = id_counts(deliveries);
    ids.iter().filter(|id| !counts.contains_key(*id)).collect()
}

pub fn id_counts(deliveries: &[Delivery]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in message_ids(deliveries) {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

pub fn header(d: &Delivery, name: &str) -> Option<String> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
        .and_then(sendtalk_relay::publish::header_text)
}

/// The value of one sample in Prometheus text (`name` with its labels, if any).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

impl TestApp {
    /// One metric sample read from the admin listener.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric(&self.admin("/metrics").await.1, name)
    }
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The path of the relay binary built for these tests.
pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sendtalk-relay"))
}

/// The relay binary as a command, with no inherited `SENDTALK_RELAY*` or
/// `RUST_LOG` variables: each test states its whole configuration.
pub fn relay_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(relay_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("SENDTALK_RELAY") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A loopback port that was free a moment ago (for relay processes, which
/// must be told their port up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Points a relay command at fresh loopback ports; returns (webhook, admin).
pub fn listen_on_free_ports(cmd: &mut std::process::Command) -> (u16, u16) {
    let (port, admin) = (free_port(), free_port());
    cmd.env("SENDTALK_RELAY__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "SENDTALK_RELAY__ADMIN__LISTEN",
            format!("127.0.0.1:{admin}"),
        );
    (port, admin)
}

/// Sends raw bytes to the relay's webhook listener and returns what comes
/// back within `within` ("" when the relay closed the connection).
pub async fn raw_exchange(app: &TestApp, request: &[u8], within: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .ok()?
        .unwrap_or(0);
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A no-ack consumer on the existing queue `queue`.
pub async fn consume_no_ack(channel: &Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            unique("test-consumer").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// Counts the message ids `consumer` receives (a no-ack consumer) until
/// every id of `want` is in and nothing more came for `quiet`, or `within`
/// passed: the per-id oracle of the tests that read a named queue.
pub async fn count_ids(
    consumer: &mut lapin::Consumer,
    want: &[String],
    within: Duration,
    quiet: Duration,
) -> HashMap<String, usize> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen: HashMap<String, usize> = HashMap::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let wait = if want.iter().all(|id| seen.contains_key(id)) {
            left.min(quiet)
        } else {
            left
        };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default();
                *seen.entry(id).or_insert(0) += 1;
            }
            _ => return seen,
        }
    }
}

/// Declares a queue that refuses every message (`x-max-length = 0`,
/// `reject-publish`, so the broker nacks) and binds it to `exchange` for
/// every key; returns its name.
pub async fn bind_refusing_queue(channel: &Channel, exchange: &str) -> String {
    use lapin::types::{AMQPValue, LongString};
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let name = unique("full.q");
    channel
        .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    name
}

/// The lifecycle store on the shared Redis under `prefix`, as the relay
/// builds it: tests and benches insert records with an expiry of their own.
pub fn redis_store(prefix: &str) -> sendtalk_relay::api::store::Store {
    use sendtalk_relay::api::store::{RedisStore, Store, StorePolicy};
    Store::Redis(Box::new(
        RedisStore::new(
            &sendtalk_relay::config::RedisSettings::standalone(REDIS_URL).unwrap(),
            StorePolicy {
                key_prefix: prefix.to_string(),
                ttl: Duration::from_secs(600),
                idempotency_ttl: Duration::from_secs(600),
                running_ttl: Duration::from_secs(10),
            },
        )
        .unwrap(),
    ))
}
