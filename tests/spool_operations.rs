//! The operator's view of the spool (SPEC 5, 5.1): dead entries instead of
//! endless copies, and list / show / retry / drop through the admin API and
//! the `sendtalk-relay spool` command, against a real broker and Redis.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::proxy::FaultProxy;
use support::*;

const TOKEN: &str = "admin-token-test-5d1c";

fn broker_addr() -> SocketAddr {
    "127.0.0.1:5672".parse().unwrap()
}

/// A relay with an admin token, publishing through `broker`.
async fn app_behind(broker: &FaultProxy, options: Options) -> TestApp {
    spawn_app_with(
        options
            .env("AMQP__URI", broker.amqp_uri())
            .env("ADMIN__TOKENS", format!("old-token,{TOKEN}")),
    )
    .await
}

/// `method path` on the admin listener with `token`; (status, JSON body).
async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = app
        .client
        .request(method, format!("{}{path}", app.admin_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let (status, _, body) = call(app, reqwest::Method::GET, path, Some(TOKEN)).await;
    (status, body)
}

/// Spools one event per id while the broker is cut.
async fn spool_events(app: &TestApp, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| unique(&format!("op{i}"))).collect();
    for id in &ids {
        let a = app.post(&event_body(id)).await;
        assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    }
    ids
}

/// Runs the relay's `spool` command; (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = relay_command().arg("spool").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 17: a queue that nacks every copy beside a healthy one. After
/// `spool.max_attempts` refusals the entry is dead: counted, listed with
/// its last error, and no further copy reaches the healthy queue. Once the
/// refusing queue is gone, an operator's retry delivers it and empties the
/// spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_entry_becomes_dead_stops_producing_copies_and_is_delivered_once_retried() {
    use lapin::options::QueueDeleteOptions;
    let broker = FaultProxy::start(broker_addr()).await;
    let mut options = Options::default().env("SPOOL__MAX_ATTEMPTS", "3");
    options.no_consumer = true;
    let app = app_behind(&broker, options).await;
    let mut healthy = TestConsumer::bind(&app.exchange, "#").await;
    let conn = lapin::Connection::connect(AMQP_URI, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let full = bind_refusing_queue(&channel, &app.exchange).await;

    let id = unique("nacked");
    let a = app.post(&event_body(&id)).await;
    assert_eq!((a.status, a.result()), (202, "queued"), "{:?}", a.json);
    // Refused live (1), then retried after 1 s (2) and 2 s (3): dead.
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.metric("sendtalk_relay_spool_dead").await == Some(1.0)
        })
        .await,
        "the entry became dead"
    );
    assert_eq!(
        app.metric("sendtalk_relay_spool_dead_total").await,
        Some(1.0)
    );
    let before = healthy
        .collect(usize::MAX, Duration::from_secs(1), Duration::ZERO)
        .await;
    assert!(message_ids(&before).iter().filter(|m| **m == id).count() <= 3);
    // Dead: no copy at all in the next 12 s (the backoff alone would have
    // retried it after 4 and 8 s).
    let after = healthy
        .collect(usize::MAX, Duration::from_secs(12), Duration::ZERO)
        .await;
    assert_eq!(
        message_ids(&after).iter().filter(|m| **m == id).count(),
        0,
        "a dead entry is not retried by itself"
    );
    let (status, page) = get(&app, "/spool?state=dead").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["dead"], 1);
    let entry = &page["entries"][0];
    assert_eq!(entry["id"], id.as_str());
    assert_eq!(entry["state"], "dead");
    assert_eq!(entry["attempts"], 3);
    assert!(
        entry["lastError"].as_str().unwrap().contains("nack"),
        "{entry}"
    );
    let key = entry["key"].as_str().unwrap().to_string();

    // The operator removes the refusing queue, then retries.
    channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let (status, _, body) = call(
        &app,
        reqwest::Method::POST,
        &format!("/spool/{key}/retry"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let copies = healthy
        .collect(1, Duration::from_secs(15), Duration::from_secs(2))
        .await;
    assert_eq!(message_ids(&copies), std::slice::from_ref(&id));
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.spool.as_ref().unwrap().depth() == 0
        })
        .await,
        "the delivered entry left the spool"
    );
    assert_eq!(app.metric("sendtalk_relay_spool_dead").await, Some(0.0));
}

/// SPEC 5.1 through the API: paging, one entry with its body and
/// properties, retry, drop, and every refusal with a JSON error naming the
/// field. The dropped entry is never published; the others are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_retry_and_drop_through_the_admin_api() {
    let broker = FaultProxy::start(broker_addr()).await;
    let mut app = app_behind(&broker, Options::default()).await;
    broker.cut();
    let ids = spool_events(&app, 5).await;

    // Paging, oldest first, two at a time.
    let mut listed = Vec::new();
    let mut path = "/spool?limit=2".to_string();
    loop {
        let (status, page) = get(&app, &path).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["depth"], 5);
        assert!(page["oldestAgeSecs"].as_u64().is_some());
        let text = page.to_string();
        assert!(!text.contains(PHONE), "no phone number in a listing");
        assert!(!text.contains("\"body\""), "no body in a listing");
        for e in page["entries"].as_array().unwrap() {
            assert_eq!(e["state"], "waiting");
            assert_eq!(e["routingKey"], "verification.verified");
            assert!(e["spooledAt"].as_str().unwrap().ends_with('Z'));
            listed.push((
                e["key"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            ));
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/spool?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(
        listed.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>(),
        ids
    );
    let (status, dead) = get(&app, "/spool?state=dead").await;
    assert_eq!(
        (status, dead["entries"].as_array().unwrap().len()),
        (200, 0)
    );

    // One entry, with its body and the properties it is published with.
    let (key, id) = listed[1].clone();
    let (status, entry) = get(&app, &format!("/spool/{key}")).await;
    assert_eq!(status, 200, "{entry}");
    assert!(entry["body"].as_str().unwrap().contains(&id));
    assert_eq!(entry["properties"]["messageId"], id.as_str());
    assert_eq!(
        entry["properties"]["headers"]["x-verification-id"],
        id.as_str()
    );
    assert_eq!(
        entry["properties"]["type"],
        "sendtalk.verification.verified"
    );

    // Refusals, each a JSON error.
    for (path, field) in [
        ("/spool?limit=0", "limit"),
        ("/spool?limit=1001", "limit"),
        ("/spool?after=abc", "after"),
        ("/spool?state=stuck", "state"),
        ("/spool?colour=red", "colour"),
    ] {
        let (status, body) = get(&app, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter");
        assert_eq!(body["error"]["field"], field, "{path}");
    }
    for path in ["/spool/999999", "/spool/not-a-key"] {
        let (status, body) = get(&app, path).await;
        assert_eq!(
            (status, body["error"]["field"].as_str()),
            (404, Some("key")),
            "{path}: {body}"
        );
    }
    for token in [None, Some("wrong"), Some("")] {
        let (status, headers, body) = call(&app, reqwest::Method::GET, "/spool", token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(headers["www-authenticate"], "Bearer");
    }
    // Rotation: the other configured token works too.
    let (status, _, _) = call(&app, reqwest::Method::GET, "/spool", Some("old-token")).await;
    assert_eq!(status, 200);
    let (status, _, body) = call(&app, reqwest::Method::PUT, "/spool", Some(TOKEN)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // Retry of a waiting entry, then drop of another.
    let (status, _, body) = call(
        &app,
        reqwest::Method::POST,
        &format!("/spool/{key}/retry"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (dropped_key, dropped_id) = listed[3].clone();
    let (status, _, _) = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/spool/{dropped_key}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 204);
    let (status, _, _) = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/spool/{dropped_key}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404, "dropped once only");
    assert_eq!(app.spool.as_ref().unwrap().depth(), 4);
    assert_eq!(app.metric("sendtalk_relay_spool_depth").await, Some(4.0));

    // The broker returns: the four are delivered, the dropped one never.
    broker.restore();
    let delivered = app
        .consumer()
        .collect(4, Duration::from_secs(30), Duration::from_secs(3))
        .await;
    let mut got = message_ids(&delivered);
    got.sort();
    let mut expected: Vec<String> = ids.iter().filter(|i| **i != dropped_id).cloned().collect();
    expected.sort();
    assert_eq!(got, expected);
    app.stop().await;
}

/// Without `admin.tokens` the spool operations do not exist: 404 on every
/// `/spool` path, with or without a token; the rest of the admin listener
/// is unchanged.
#[tokio::test]
async fn without_an_admin_token_the_spool_paths_are_404() {
    let app = spawn_app().await;
    for (method, path) in [
        (reqwest::Method::GET, "/spool"),
        (reqwest::Method::GET, "/spool/0"),
        (reqwest::Method::POST, "/spool/0/retry"),
        (reqwest::Method::DELETE, "/spool/0"),
    ] {
        let (status, _, body) = call(&app, method, path, Some(TOKEN)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    assert_eq!(app.admin("/healthz").await.0, 200);
    assert_eq!(
        app.metric("sendtalk_relay_spool_oldest_age_seconds").await,
        Some(0.0)
    );
}

/// The `spool` command: a table for `list`, the entry for `show`, exit 1
/// for an entry that does not exist, 69 when the relay cannot be reached;
/// and `list --dir` on a stopped relay's file (read-only), refused clearly
/// while the relay runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_command_lists_shows_retries_and_drops() {
    let broker = FaultProxy::start(broker_addr()).await;
    let mut app = app_behind(&broker, Options::default()).await;
    broker.cut();
    let ids = spool_events(&app, 3).await;
    let admin = app.admin_url.clone();
    let with = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(ToString::to_string).collect();
        all.extend([
            "--admin".into(),
            admin.clone(),
            "--token".into(),
            TOKEN.into(),
        ]);
        all
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&refs)
    };

    let (code, out, err) = tokio::task::block_in_place(|| run(with(&["list"])));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("KEY") && out.contains("STATE") && out.contains("LAST ERROR"),
        "{out}"
    );
    for id in &ids {
        assert!(out.contains(id.as_str()), "{id} in\n{out}");
    }
    assert!(out.contains("depth 3"), "{out}");
    let (code, out, _) = tokio::task::block_in_place(|| run(with(&["list", "--limit", "1"])));
    assert_eq!(code, 0);
    assert!(out.contains("more: --after"), "{out}");

    let key = get(&app, "/spool").await.1["entries"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, err) = tokio::task::block_in_place(|| run(with(&["show", &key])));
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["id"], ids[0].as_str());
    assert!(shown["body"].as_str().unwrap().contains(&ids[0]));

    let (code, _, err) = tokio::task::block_in_place(|| run(with(&["show", "424242"])));
    assert_eq!(code, 1, "missing entry: {err}");
    let (code, _, err) = tokio::task::block_in_place(|| run(with(&["retry", "424242"])));
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = tokio::task::block_in_place(|| run(with(&["retry", &key])));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("retried"), "{out}");
    let (code, out, err) = tokio::task::block_in_place(|| run(with(&["drop", &key])));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dropped"), "{out}");
    let (code, _, err) = tokio::task::block_in_place(|| run(with(&["drop", &key])));
    assert_eq!(code, 1, "{err}");
    let (code, _, err) =
        tokio::task::block_in_place(|| cli(&["list", "--admin", &admin, "--token", "wrong"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("401"), "{err}");

    // Nothing listens there.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) =
        tokio::task::block_in_place(|| cli(&["list", "--admin", &nowhere, "--token", TOKEN]));
    assert_eq!(code, 69, "{err}");

    // The running relay has the file: --dir says so.
    let dir = app.spool_dir.display().to_string();
    let (code, _, err) = tokio::task::block_in_place(|| cli(&["list", "--dir", &dir]));
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
    app.stop().await;
    drop(app.spool.take());
    // Stopped: the two entries left, read-only.
    let listed = eventually(Duration::from_secs(10), || {
        let dir = dir.clone();
        let ids = ids.clone();
        async move {
            let (code, out, _) = tokio::task::block_in_place(|| cli(&["list", "--dir", &dir]));
            code == 0
                && out.contains(ids[1].as_str())
                && out.contains(ids[2].as_str())
                && !out.contains(ids[0].as_str())
        }
    })
    .await;
    let (code, out, err) = tokio::task::block_in_place(|| cli(&["list", "--dir", &dir]));
    assert!(listed, "code {code}\n{out}\n{err}");
    assert!(out.contains("read-only"), "{out}");
    let missing = std::env::temp_dir().join(unique("no-spool"));
    let (code, _, err) =
        tokio::task::block_in_place(|| cli(&["list", "--dir", &missing.display().to_string()]));
    assert_eq!(code, 1);
    assert!(err.contains("no spool file"), "{err}");
}
