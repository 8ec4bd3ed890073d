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
                    .map(|r| r.status().as_u16() == 503)
                    .unwrap_or(false)
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
