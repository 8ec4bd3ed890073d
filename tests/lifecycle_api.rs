//! The verification lifecycle API (SPEC 9) against the real Redis and
//! RabbitMQ, with SendTalk played by the `sendtalk-sim` binary or, for
//! answers the simulator does not give, by a stub HTTP server here.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::{json, Value};
use support::*;

const API_KEY: &str = "sendtalk-key-test";
const TOKEN_A: &str = "token-a-9f1c";
const TOKEN_B: &str = "token-b-77d0";

/// The relay with the API on, calling SendTalk at `base_url`.
fn api_options(base_url: &str) -> Options {
    Options::default()
        .env("API__ENABLED", "true")
        .env("API__LISTEN", "127.0.0.1:0")
        .env("API__TOKENS", format!("{TOKEN_A},{TOKEN_B}"))
        .env("SENDTALK__BASE_URL", base_url)
        .env("SENDTALK__API_KEY", API_KEY)
        .env("SENDTALK__TIMEOUT_MS", "1500")
}

fn api(app: &TestApp) -> String {
    app.api_url.clone().expect("API enabled")
}

async fn create_with(app: &TestApp, body: &str, headers: &[(&str, &str)]) -> Answer {
    let url = format!("{}/v1/verifications", api(app));
    let auth = format!("Bearer {TOKEN_A}");
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    all.extend_from_slice(headers);
    post_raw(&app.client, &url, body.as_bytes().to_vec(), &all).await
}

async fn create(app: &TestApp, body: &str) -> Answer {
    create_with(app, body, &[]).await
}

async fn get_status(app: &TestApp, id: &str, token: Option<&str>) -> Answer {
    let mut req = app
        .client
        .get(format!("{}/v1/verifications/{id}", api(app)));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let json = r.json().await.unwrap();
    Answer {
        status,
        headers,
        json,
    }
}

/// Keys the relay wrote under the app's prefix.
async fn redis_keys(prefix: &str) -> Vec<String> {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.extend(keys);
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

// ---------------------------------------------------------------- simulator

struct Sim {
    child: Child,
    url: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sendtalk-sim` on `port`, delivering signed webhooks to `webhook_url`.
async fn start_sim(port: u16, webhook_url: &str, api_key: &str) -> Sim {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sendtalk-sim"));
    for (name, _) in std::env::vars() {
        if name.starts_with("SENDTALK_SIM_") {
            cmd.env_remove(name);
        }
    }
    let child = cmd
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--api-key", api_key])
        .args(["--webhook-url", webhook_url])
        .args(["--auth-mode", "hmac-sha256"])
        .args(["--secret", SECRET])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let up = eventually(Duration::from_secs(10), || {
        let req = client.get(format!("{url}/healthz")).send();
        async move { req.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    assert!(up, "simulator did not start");
    Sim { child, url }
}

/// A relay with the API on and a simulator wired both ways.
async fn relay_and_sim(sim_key: &str) -> (TestApp, Sim) {
    let port = free_port();
    let app = spawn_app_with(api_options(&format!("http://127.0.0.1:{port}"))).await;
    let sim = start_sim(port, &app.url, sim_key).await;
    (app, sim)
}

// ---------------------------------------------------------------- stub

/// A stand-in SendTalk for answers the simulator does not give; answers by
/// the last four digits of `userPhone`, counts every call.
struct Stub {
    url: String,
    calls: Arc<AtomicUsize>,
    handle: actix_web::dev::ServerHandle,
}

impl Drop for Stub {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        drop(handle.stop(false));
    }
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stub(delay: Duration) -> Stub {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(move || {
        let counted = counted.clone();
        App::new().route(
            "/api/v1/verification/create_whatsapp_verification",
            web::post().to(move |body: web::Json<Value>| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let phone = body["userPhone"].as_str().unwrap_or("").to_string();
                    let tail = &phone[phone.len().saturating_sub(4)..];
                    match tail {
                        "1000" => HttpResponse::Ok()
                            .json(fixture("create-verification-response-missing-phone.json")),
                        "1001" => HttpResponse::Ok()
                            .json(fixture("create-verification-response-missing-header.json")),
                        "1002" => HttpResponse::Forbidden().body("forbidden"),
                        "1003" => HttpResponse::Ok()
                            .json(json!({"status": 200, "error": {}, "data": {"success": true}})),
                        "1004" => HttpResponse::Ok().json(json!({
                            "status": 403,
                            "error": {"code": "40300", "message": "forbidden", "field": ""},
                            "data": {}
                        })),
                        // SendTalk's failures as it writes them: empty
                        // objects where there is nothing (SPEC 9.1).
                        "1005" | "1006" | "1007" => {
                            let reason = match tail {
                                "1005" => "invalid_recipient",
                                "1006" => "insufficient_balance",
                                _ => "config_disabled",
                            };
                            HttpResponse::Ok().json(json!({
                                "status": 200,
                                "error": {},
                                "data": {"success": false, "message": {}, "reason": reason, "verification": {}}
                            }))
                        }
                        // A success with a null error, an empty reason object
                        // and a null message: the branch needs none of them.
                        "1008" => {
                            let mut ok = fixture("create-verification-response-ok.json");
                            ok["error"] = Value::Null;
                            ok["data"]["reason"] = json!({});
                            ok["data"]["message"] = Value::Null;
                            ok["data"]["verification"]["id"] =
                                json!(uuid::Uuid::new_v4().to_string());
                            HttpResponse::Ok().json(ok)
                        }
                        _ => {
                            let mut ok = fixture("create-verification-response-ok.json");
                            ok["data"]["verification"]["id"] =
                                json!(uuid::Uuid::new_v4().to_string());
                            HttpResponse::Ok().json(ok)
                        }
                    }
                }
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .disable_signals()
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Stub { url, calls, handle }
}

fn request_body(phone: &str) -> String {
    json!({"userPhone": phone, "languageCode": "id", "expiryMinutes": 10, "appURL": "https://web.taptalk.io"})
        .to_string()
}

/// Creates one verification per phone and checks each answer's status,
/// error code and field.
async fn assert_creates_answer(app: &TestApp, cases: &[(&str, u16, &str, &str)]) {
    for &(phone, status, code, field) in cases {
        let a = create(app, &request_body(phone)).await;
        assert_eq!(
            (a.status, a.code(), a.field()),
            (status, code, field),
            "{phone}: {:?}",
            a.json
        );
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn the_seven_step_flow_runs_from_create_to_verified_through_the_simulator() {
    let (mut app, sim) = relay_and_sim(API_KEY).await;
    let created = create_with(
        &app,
        &request_body(PHONE),
        &[("x-request-id", "req-create-1")],
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let id = created.json["id"].as_str().unwrap().to_string();
    assert_eq!(
        created.headers["location"].to_str().unwrap(),
        format!("/v1/verifications/{id}")
    );
    for field in ["waLink", "waMessage", "qrCode", "createdAt", "expiresAt"] {
        assert!(
            created.json[field].is_string(),
            "{field}: {:?}",
            created.json
        );
    }
    assert_eq!(created.json["status"], "pending");
    assert_eq!(created.json["languageCode"], "id");

    // The pending event.
    let pending = app.consumer().next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        pending.properties.message_id().as_ref().unwrap().as_str(),
        format!("{id}:pending")
    );
    assert_eq!(
        pending.properties.kind().as_ref().unwrap().as_str(),
        "sendtalk.verification.pending"
    );
    assert_eq!(pending.routing_key.as_str(), "verification.pending");
    assert_eq!(header(&pending, "x-verification-id").unwrap(), id);
    assert_eq!(header(&pending, "x-request-id").unwrap(), "req-create-1");
    assert_eq!(header(&pending, "x-dedup"), None);
    let body: Value = serde_json::from_slice(&pending.data).unwrap();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["userPhone"], PHONE);
    assert_eq!(body["status"], "pending");
    assert_eq!(body["expiresAt"], created.json["expiresAt"]);

    let before = get_status(&app, &id, Some(TOKEN_A)).await;
    assert_eq!(before.status, 200);
    assert_eq!(before.json["status"], "pending");
    assert_eq!(before.json["verifiedTime"], Value::Null);

    // The user sends the WhatsApp message: the simulator calls the webhook.
    let done = app
        .client
        .post(format!("{}/sim/verifications/{id}/complete", sim.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        done.status().as_u16(),
        200,
        "{}",
        done.text().await.unwrap()
    );
    let verified = app.consumer().next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        verified.properties.message_id().as_ref().unwrap().as_str(),
        id
    );
    assert_eq!(header(&verified, "x-phone-match").unwrap(), "true");
    assert_eq!(header(&verified, "x-verification-id").unwrap(), id);
    assert_eq!(header(&verified, "x-dedup").unwrap(), "checked");

    let after = get_status(&app, &id, Some(TOKEN_B)).await;
    assert_eq!(after.json["status"], "verified", "{:?}", after.json);
    assert_eq!(after.json["userPhone"], PHONE);
    assert!(after.json["verifiedTime"].as_u64().unwrap() > 0);
    assert_eq!(after.json["createdAt"], created.json["createdAt"]);
    assert!(app
        .consumer()
        .drain(Duration::from_millis(300))
        .await
        .is_empty());
}

#[tokio::test]
async fn provider_refusals_from_the_simulator_map_to_the_table_and_publish_nothing() {
    let (mut app, _sim) = relay_and_sim(API_KEY).await;
    let cases = [
        ("6281200000000", 422, "invalid_recipient", "userPhone"),
        ("6281200000001", 503, "provider_insufficient_balance", ""),
        ("6281200000002", 503, "provider_disabled", ""),
        ("6281200000003", 502, "provider_error", ""),
        ("6281200000004", 502, "provider_error", ""),
    ];
    for (phone, status, code, field) in cases {
        let a = create(&app, &request_body(phone)).await;
        assert_eq!(
            (a.status, a.code(), a.field()),
            (status, code, field),
            "{phone}: {:?}",
            a.json
        );
        if status == 503 {
            assert!(a.headers.contains_key("retry-after"));
        }
    }
    assert!(app
        .consumer()
        .drain(Duration::from_millis(500))
        .await
        .is_empty());
    let text = app.admin("/metrics").await.1;
    assert_eq!(
        metric(
            &text,
            "sendtalk_relay_sendtalk_requests_total{outcome=\"invalid_recipient\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_wrong_api_key_is_the_operators_fault_answered_502_provider_unauthorized() {
    let (app, _sim) = relay_and_sim("another-key").await;
    let a = create(&app, &request_body(PHONE)).await;
    assert_eq!(
        (a.status, a.code()),
        (502, "provider_unauthorized"),
        "{:?}",
        a.json
    );
}

#[tokio::test]
async fn undocumented_and_unauthorized_answers_from_a_stub_map_to_the_table() {
    let stub = stub(Duration::ZERO);
    let mut app = spawn_app_with(api_options(&stub.url)).await;
    let cases = [
        (
            "6281200001000",
            422,
            "provider_validation_failed",
            "userPhone",
        ),
        ("6281200001001", 502, "provider_unauthorized", ""),
        ("6281200001002", 502, "provider_unauthorized", ""),
        ("6281200001003", 502, "provider_error", ""),
        ("6281200001004", 502, "provider_unauthorized", ""),
    ];
    assert_creates_answer(&app, &cases).await;
    assert!(app
        .consumer()
        .drain(Duration::from_millis(500))
        .await
        .is_empty());
    assert!(redis_keys(&app.key_prefix).await.is_empty());
}

#[tokio::test]
async fn failures_written_with_empty_objects_map_to_their_reasons_and_a_success_with_null_parts_is_read(
) {
    let stub = stub(Duration::ZERO);
    let mut app = spawn_app_with(api_options(&stub.url)).await;
    let cases = [
        ("6281200001005", 422, "invalid_recipient", "userPhone"),
        ("6281200001006", 503, "provider_insufficient_balance", ""),
        ("6281200001007", 503, "provider_disabled", ""),
    ];
    assert_creates_answer(&app, &cases).await;
    let a = create(&app, &request_body("6281200001008")).await;
    assert_eq!(a.status, 201, "{:?}", a.json);
    assert_eq!(a.json["status"], "pending");
    let pending = app
        .consumer()
        .collect(1, Duration::from_secs(5), Duration::from_millis(300))
        .await;
    assert_eq!(
        pending.len(),
        1,
        "only the success publishes (its pending event)"
    );
}

#[tokio::test]
async fn a_sendtalk_that_does_not_answer_in_time_gets_504_once_and_nothing_is_stored() {
    let stub = stub(Duration::from_secs(4));
    let mut app = spawn_app_with(api_options(&stub.url)).await;
    let started = std::time::Instant::now();
    let a = create(&app, &request_body(PHONE)).await;
    assert_eq!(
        (a.status, a.code()),
        (504, "provider_timeout"),
        "{:?}",
        a.json
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not bounded by sendtalk.timeout_ms"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stub.calls.load(Ordering::SeqCst),
        1,
        "the create is never retried"
    );
    assert!(redis_keys(&app.key_prefix).await.is_empty());
    assert!(app
        .consumer()
        .drain(Duration::from_millis(300))
        .await
        .is_empty());
}

#[tokio::test]
async fn local_validation_names_the_field_and_never_calls_sendtalk() {
    let stub = stub(Duration::ZERO);
    let app = spawn_app_with(api_options(&stub.url)).await;
    let long_url = format!("https://x.example/{}", "a".repeat(2048));
    let cases = [
        ("{not json".to_string(), "invalid_json", ""),
        ("[1]".to_string(), "invalid_payload", ""),
        (json!({}).to_string(), "invalid_payload", "userPhone"),
        (
            json!({"userPhone": "62812"}).to_string(),
            "invalid_payload",
            "userPhone",
        ),
        (
            json!({"userPhone": "1234"}).to_string(),
            "invalid_payload",
            "userPhone",
        ),
        (
            json!({"userPhone": "+6281212345678"}).to_string(),
            "invalid_payload",
            "userPhone",
        ),
        (
            json!({"userPhone": PHONE, "languageCode": "fr"}).to_string(),
            "invalid_payload",
            "languageCode",
        ),
        (
            json!({"userPhone": PHONE, "expiryMinutes": 0}).to_string(),
            "invalid_payload",
            "expiryMinutes",
        ),
        (
            json!({"userPhone": PHONE, "expiryMinutes": 1441}).to_string(),
            "invalid_payload",
            "expiryMinutes",
        ),
        (
            json!({"userPhone": PHONE, "expiryMinutes": 1.5}).to_string(),
            "invalid_payload",
            "expiryMinutes",
        ),
        (
            json!({"userPhone": PHONE, "appURL": "ftp://x.example"}).to_string(),
            "invalid_payload",
            "appURL",
        ),
        (
            json!({"userPhone": PHONE, "appURL": long_url}).to_string(),
            "invalid_payload",
            "appURL",
        ),
    ];
    for (body, code, field) in cases {
        let a = create(&app, &body).await;
        if body.contains("\"62812\"") {
            // 5 digits is valid: it reaches SendTalk.
            assert_eq!(a.status, 201, "{body}: {:?}", a.json);
            continue;
        }
        assert_eq!(
            (a.status, a.code(), a.field()),
            (400, code, field),
            "{body}: {:?}",
            a.json
        );
    }
    assert_eq!(
        stub.calls.load(Ordering::SeqCst),
        1,
        "only the valid request called SendTalk"
    );
    let bad_key = create_with(
        &app,
        &request_body(PHONE),
        &[("idempotency-key", "has space")],
    )
    .await;
    assert_eq!((bad_key.status, bad_key.field()), (400, "Idempotency-Key"));
    assert_eq!(stub.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_idempotency_key_replays_refuses_another_body_and_reports_a_running_request() {
    let stub = stub(Duration::from_millis(800));
    let mut app = spawn_app_with(api_options(&stub.url)).await;
    let key = unique("idem");
    let body = json!({"userPhone": PHONE, "languageCode": "en", "expiryMinutes": 5}).to_string();
    let same_body_reordered =
        "{ \"expiryMinutes\": 5, \"languageCode\": \"en\", \"userPhone\": \"6281212345678\" }";

    let with_key = [("idempotency-key", key.as_str())];
    let (first, concurrent) = tokio::join!(create_with(&app, &body, &with_key), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        create_with(&app, &body, &with_key).await
    });
    assert_eq!(first.status, 201, "{:?}", first.json);
    assert_eq!((concurrent.status, concurrent.code()), (409, "in_flight"));
    assert!(concurrent.headers.contains_key("retry-after"));

    let replay = create_with(&app, same_body_reordered, &[("idempotency-key", &key)]).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.json, first.json);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.headers["location"], first.headers["location"]);

    let other = json!({"userPhone": PHONE, "languageCode": "id", "expiryMinutes": 5}).to_string();
    let reused = create_with(&app, &other, &[("idempotency-key", &key)]).await;
    assert_eq!(
        (reused.status, reused.code()),
        (422, "idempotency_key_reused")
    );

    assert_eq!(stub.calls.load(Ordering::SeqCst), 1, "SendTalk called once");
    let events = app.consumer().drain(Duration::from_millis(500)).await;
    assert_eq!(events.len(), 1, "one pending event");
}

#[tokio::test]
async fn a_stored_504_is_replayed_as_504_without_calling_sendtalk_again() {
    let stub = stub(Duration::from_secs(3));
    let app = spawn_app_with(api_options(&stub.url)).await;
    let key = unique("idem");
    let first = create_with(&app, &request_body(PHONE), &[("idempotency-key", &key)]).await;
    assert_eq!(first.status, 504);
    let again = create_with(&app, &request_body(PHONE), &[("idempotency-key", &key)]).await;
    assert_eq!((again.status, again.code()), (504, "provider_timeout"));
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(stub.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
#[allow(clippy::float_cmp)] // the summed counters hold a whole number, exact in an f64
async fn two_replicas_publish_exactly_one_expired_event_per_unverified_verification() {
    use sendtalk_relay::api::store::Record;
    let stub = stub(Duration::ZERO);
    let exchange = unique("test.sendtalk");
    let prefix = format!("{}:", unique("test-relay"));
    let mut consumer = TestConsumer::bind(&exchange, "verification.expired").await;
    let shared = |base: &str| {
        let mut o = api_options(base).env("API__EXPIRY_CHECK_SECS", "1");
        o.exchange = Some(exchange.clone());
        o.key_prefix = Some(prefix.clone());
        o.no_consumer = true;
        o
    };
    let one = spawn_app_with(shared(&stub.url)).await;
    let two = spawn_app_with(shared(&stub.url)).await;

    // Records as the create stores them, with an expiry a moment away
    // (expiryMinutes cannot go below one minute).
    let store = redis_store(&prefix);
    let now = now_ms();
    let ids: Vec<String> = (0..5).map(|_| unique("exp")).collect();
    for id in &ids {
        store
            .create_pending(&Record::pending(id, PHONE, now, now + 500))
            .await
            .unwrap();
    }
    let verified = unique("verified");
    store
        .create_pending(&Record::pending(&verified, PHONE, now, now + 500))
        .await
        .unwrap();
    store.mark_verified(&verified, PHONE, now).await.unwrap();

    let deliveries = consumer
        .collect(
            ids.len(),
            Duration::from_secs(8),
            Duration::from_millis(2500),
        )
        .await;
    let counts = id_counts(&deliveries);
    for id in &ids {
        assert_eq!(counts.get(&format!("{id}:expired")), Some(&1), "{counts:?}");
    }
    assert_eq!(
        counts.len(),
        ids.len(),
        "nothing for the verified one: {counts:?}"
    );
    let d = &deliveries[0];
    assert_eq!(header(d, "x-dedup"), None);
    let body: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(body["status"], "expired");

    let seen = get_status(&one, &ids[0], Some(TOKEN_A)).await;
    assert_eq!(seen.json["status"], "expired");
    let seen = get_status(&two, &verified, Some(TOKEN_A)).await;
    assert_eq!(seen.json["status"], "verified");
    let total = one
        .metric("sendtalk_relay_verifications_expired_total")
        .await
        .unwrap()
        + two
            .metric("sendtalk_relay_verifications_expired_total")
            .await
            .unwrap();
    assert_eq!(total, ids.len() as f64);
    drop(one);
    drop(two);
    cleanup_names(&exchange, &prefix).await;
}

#[tokio::test]
async fn a_webhook_from_another_phone_is_relayed_with_phone_match_false_and_counted() {
    let (mut app, sim) = relay_and_sim(API_KEY).await;
    let created = create(&app, &request_body(PHONE)).await;
    let id = created.json["id"].as_str().unwrap().to_string();
    let _pending = app.consumer().next(Duration::from_secs(10)).await.unwrap();
    let done = app
        .client
        .post(format!("{}/sim/verifications/{id}/complete", sim.url))
        .json(&json!({"userPhone": "6289999999999"}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status().as_u16(), 200);
    let verified = app.consumer().next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(header(&verified, "x-phone-match").unwrap(), "false");
    assert_eq!(
        app.metric("sendtalk_relay_phone_mismatch_total").await,
        Some(1.0)
    );

    // An id never created through the API: no x-phone-match, status from the webhook.
    let other = unique("elsewhere");
    assert_eq!(app.post(&event_body(&other)).await.status, 200);
    let plain = app.consumer().next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(header(&plain, "x-phone-match"), None);
    assert_eq!(header(&plain, "x-verification-id").unwrap(), other);
    let seen = get_status(&app, &other, Some(TOKEN_A)).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.json["status"], "verified");
    assert_eq!(seen.json["userPhone"], PHONE);
    assert_eq!(seen.json["createdAt"], Value::Null);
    assert_eq!(
        get_status(&app, "never-seen", Some(TOKEN_A)).await.status,
        404
    );
}

#[tokio::test]
async fn bearer_tokens_are_required_and_every_listed_token_is_accepted() {
    let stub = stub(Duration::ZERO);
    let app = spawn_app_with(api_options(&stub.url)).await;
    let url = format!("{}/v1/verifications", api(&app));
    let body = request_body(PHONE).into_bytes();
    for headers in [
        vec![("content-type", "application/json")],
        vec![
            ("content-type", "application/json"),
            ("authorization", "Bearer wrong"),
        ],
        vec![
            ("content-type", "application/json"),
            ("authorization", TOKEN_A),
        ],
    ] {
        let a = post_raw(&app.client, &url, body.clone(), &headers).await;
        assert_eq!((a.status, a.code()), (401, "unauthorized"));
        assert_eq!(a.headers["www-authenticate"], "Bearer");
    }
    assert_eq!(stub.calls.load(Ordering::SeqCst), 0);
    assert_eq!(get_status(&app, "x", None).await.status, 401);
    assert_eq!(get_status(&app, "x", Some("nope")).await.status, 401);
    // Rotation: both configured tokens work.
    assert_eq!(get_status(&app, "x", Some(TOKEN_A)).await.status, 404);
    assert_eq!(get_status(&app, "x", Some(TOKEN_B)).await.status, 404);
}

#[tokio::test]
async fn openapi_json_documents_every_route() {
    let stub = stub(Duration::ZERO);
    let app = spawn_app_with(api_options(&stub.url)).await;
    let doc: Value = app
        .client
        .get(format!("{}/openapi.json", api(&app)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(doc["paths"]["/v1/verifications"]["post"].is_object());
    assert!(doc["paths"]["/v1/verifications/{id}"]["get"].is_object());
    assert!(doc["paths"][WEBHOOK_PATH]["post"].is_object());
}

#[tokio::test]
async fn the_api_listener_is_not_bound_unless_enabled() {
    let app = spawn_app().await;
    assert!(app.api_url.is_none());
}

#[tokio::test]
async fn with_the_memory_backend_the_api_creates_reads_and_replays_in_process() {
    let stub = stub(Duration::ZERO);
    let mut app = spawn_app_with(api_options(&stub.url).env("DEDUP__BACKEND", "memory")).await;
    let key = unique("idem");
    let created = create_with(&app, &request_body(PHONE), &[("idempotency-key", &key)]).await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let id = created.json["id"].as_str().unwrap();
    let replay = create_with(&app, &request_body(PHONE), &[("idempotency-key", &key)]).await;
    assert_eq!(replay.json, created.json);
    assert_eq!(stub.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        get_status(&app, id, Some(TOKEN_A)).await.json["status"],
        "pending"
    );
    let pending = app.consumer().next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        pending.properties.message_id().as_ref().unwrap().as_str(),
        format!("{id}:pending")
    );
    assert!(
        redis_keys(&app.key_prefix).await.is_empty(),
        "nothing in Redis"
    );
}

#[tokio::test]
async fn other_methods_and_paths_get_json_405_and_404() {
    let stub = stub(Duration::ZERO);
    let app = spawn_app_with(api_options(&stub.url)).await;
    let r = app
        .client
        .delete(format!("{}/v1/verifications/x", api(&app)))
        .bearer_auth(TOKEN_A)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let r = app
        .client
        .get(format!("{}/nope", api(&app)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn an_expiry_claimed_by_a_replica_that_died_is_published_by_another_and_a_late_webhook_still_verifies(
) {
    use sendtalk_relay::api::store::{ExpiryClaim, Record};
    let stub = stub(Duration::ZERO);
    let prefix = format!("{}:", unique("test-relay"));
    let mut options = api_options(&stub.url).env("API__EXPIRY_CHECK_SECS", "1");
    options.key_prefix = Some(prefix.clone());
    let store = redis_store(&prefix);
    let id = unique("orphan");
    let now = now_ms();
    store
        .create_pending(&Record::pending(&id, PHONE, now - 60_000, now - 1))
        .await
        .unwrap();
    // A replica claims the expiry and dies before publishing.
    let claimed = store
        .claim_expiry(&id, now, Duration::from_secs(2), "dead-replica")
        .await
        .unwrap();
    assert!(matches!(claimed, ExpiryClaim::Claimed(_)));

    let mut app = spawn_app_with(options).await;
    let expired = app
        .consumer()
        .next(Duration::from_secs(8))
        .await
        .expect("expired event");
    assert_eq!(
        expired.properties.message_id().as_ref().unwrap().as_str(),
        format!("{id}:expired")
    );
    assert_eq!(
        get_status(&app, &id, Some(TOKEN_A)).await.json["status"],
        "expired"
    );

    // The provider is the authority: a late webhook still verifies.
    assert_eq!(app.post(&event_body(&id)).await.status, 200);
    let verified = app.consumer().next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        verified.properties.message_id().as_ref().unwrap().as_str(),
        id
    );
    assert_eq!(header(&verified, "x-phone-match").unwrap(), "true");
    assert_eq!(
        get_status(&app, &id, Some(TOKEN_A)).await.json["status"],
        "verified"
    );
    assert!(
        app.consumer()
            .drain(Duration::from_millis(1500))
            .await
            .is_empty(),
        "expired once"
    );
}

#[tokio::test]
async fn with_redis_down_the_api_answers_503_and_an_idempotent_create_never_calls_sendtalk() {
    let stub = stub(Duration::ZERO);
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let app = spawn_app_with(api_options(&stub.url).env("REDIS__URL", closed)).await;
    let keyed = create_with(&app, &request_body(PHONE), &[("idempotency-key", "k-1")]).await;
    assert_eq!(
        (keyed.status, keyed.code()),
        (503, "unavailable"),
        "{:?}",
        keyed.json
    );
    assert!(keyed.headers.contains_key("retry-after"));
    assert_eq!(stub.calls.load(Ordering::SeqCst), 0);
    // Without a key SendTalk is called, but a record that cannot be stored
    // is not answered 201.
    let plain = create(&app, &request_body(PHONE)).await;
    assert_eq!((plain.status, plain.code()), (503, "unavailable"));
    assert_eq!(get_status(&app, "some-id", Some(TOKEN_A)).await.status, 503);
}
