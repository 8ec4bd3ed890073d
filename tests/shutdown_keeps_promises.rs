//! SIGTERM while webhooks are in flight (SPEC 6): work in progress is
//! tracked and awaited, never dropped with the HTTP workers, and keep-alive
//! connections are told to close (actix-web's graceful stop does that; this
//! test holds it to it).

mod support;

use std::time::Duration;

use support::proxy::FaultProxy;
use support::*;

const BROKER: &str = "127.0.0.1:5672";

/// A webhook still waiting for its confirm when shutdown starts is answered
/// within the grace period with `Connection: close`, and its dedup commit is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_flight_webhook_finishes_with_connection_close_and_its_commit() {
    let broker = FaultProxy::start(BROKER.parse().unwrap()).await;
    let app = spawn_app_with(
        Options::default()
            .env("AMQP__URI", broker.amqp_uri())
            .env("AMQP__CONFIRM_TIMEOUT_MS", "1500")
            .env("SHUTDOWN__GRACE_SECS", "10"),
    )
    .await;
    broker.blackhole();
    let id = unique("in-flight");
    let body = event_body(&id);
    let sig = hmac_hex(SECRET, body.as_bytes());
    let request = app
        .client
        .post(&app.url)
        .header("content-type", "application/json")
        .header("x-sendtalk-signature", sig)
        .body(body)
        .send();
    let stop = app.stop_token();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    let response = request.await.expect("answered within the grace period");
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(
        response
            .headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close")
    );
    // The commit runs right after the answer, tracked and awaited at shutdown.
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.redis_get(&id)
                .await
                .is_some_and(|record| record.contains("verified"))
        })
        .await,
        "committed, not left a lease"
    );
}
