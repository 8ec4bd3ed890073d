//! The admin listener (SPEC 6): liveness, readiness through shutdown, and
//! metrics that move with the traffic.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::time::Duration;

use support::proxy::FaultProxy;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_and_latencies_in_prometheus_text() {
    let app = spawn_app().await;
    assert_eq!(app.admin("/healthz").await.0, 200);
    assert_eq!(app.admin("/readyz").await.0, 200);
    let id = unique("m");
    app.post(&event_body(&id)).await;
    app.post(&event_body(&id)).await;
    app.post_with("{}", &[("content-type", "application/json")])
        .await;
    let r = app
        .client
        .get(format!("{}/metrics", app.admin_url))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    let m = |name: &str| metric(&text, name);
    assert_eq!(
        m("sendtalk_relay_webhooks_total{outcome=\"published\"}"),
        Some(1.0)
    );
    assert_eq!(
        m("sendtalk_relay_webhooks_total{outcome=\"duplicate\"}"),
        Some(1.0)
    );
    assert_eq!(
        m("sendtalk_relay_webhooks_total{outcome=\"rejected_auth\"}"),
        Some(1.0)
    );
    assert_eq!(
        m("sendtalk_relay_request_duration_seconds_count"),
        Some(3.0)
    );
    assert_eq!(
        m("sendtalk_relay_publish_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(m("sendtalk_relay_amqp_connected"), Some(1.0));
    assert!(text.contains(&format!(
        "sendtalk_relay_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(!text.contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_readiness_503_and_lets_in_flight_webhooks_finish() {
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut app = spawn_app_with(Options::default().env("AMQP__URI", broker.amqp_uri())).await;
    // A silent broker keeps the next webhook in flight for the confirm timeout.
    broker.blackhole();
    let id = unique("inflight");
    let body = event_body(&id);
    let client = app.client.clone();
    let url = app.url.clone();
    let in_flight = tokio::spawn(async move { try_post_signed(&client, &url, &body).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin_client = app.client.clone();
    let ready_url = format!("{}/readyz", app.admin_url);
    app.stop_token().cancel();
    assert!(
        eventually(Duration::from_secs(2), || {
            let c = admin_client.clone();
            let u = ready_url.clone();
            async move {
                c.get(u)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 503)
            }
        })
        .await,
        "readiness goes 503 while the admin listener stays up"
    );
    let answer = in_flight
        .await
        .unwrap()
        .expect("the in-flight webhook was answered");
    assert_eq!((answer.status, answer.result()), (202, "queued"));
    app.stop().await;
    // The queued event is in the spool on disk for the next start.
    let spool = app.spool.as_ref().unwrap();
    assert_eq!(spool.stored_len().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_with_retry_after_and_others_still_pass() {
    let app = spawn_app_with(
        Options::default()
            .env("HTTP__RATE_LIMIT_PER_SEC", "1")
            .env("HTTP__RATE_LIMIT_BURST", "2")
            .env("HTTP__TRUSTED_PROXIES", "127.0.0.0/8"),
    )
    .await;
    let post_from = |client_ip: &'static str| {
        let app = &app;
        async move {
            let body = event_body(&unique("rl"));
            let sig = hmac_hex(SECRET, body.as_bytes());
            app.post_with(
                &body,
                &[
                    ("content-type", "application/json"),
                    ("x-sendtalk-signature", &sig),
                    ("x-forwarded-for", client_ip),
                ],
            )
            .await
        }
    };
    assert_eq!(post_from("198.51.100.7").await.status, 200);
    assert_eq!(post_from("198.51.100.7").await.status, 200);
    let limited = post_from("198.51.100.7").await;
    assert_eq!(
        (limited.status, limited.code(), limited.field()),
        (429, "rate_limited", "")
    );
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(
        post_from("198.51.100.8").await.status,
        200,
        "another client is not limited"
    );
    assert_eq!(
        app.metric("sendtalk_relay_rate_limited_total").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_listener_can_serve_https_itself() {
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut app = spawn_app_with(
        Options::default()
            .env("HTTP__TLS_CERT_FILE", cert.display().to_string())
            .env("HTTP__TLS_KEY_FILE", key.display().to_string()),
    )
    .await;
    let id = unique("tls");
    let body = event_body(&id);
    let url = app.url.replace("http://", "https://");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .args(["-H", "content-type: application/json"])
        .args([
            "-H",
            &format!(
                "x-sendtalk-signature: {}",
                hmac_hex(SECRET, body.as_bytes())
            ),
        ])
        .args(["--data-binary", &body, &url])
        .output()
        .expect("curl is installed");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("\"published\""),
        "{answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msgs = app
        .consumer()
        .collect(1, Duration::from_secs(10), Duration::from_millis(300))
        .await;
    assert_eq!(message_ids(&msgs), vec![id]);
    std::fs::remove_dir_all(dir).unwrap();
}
