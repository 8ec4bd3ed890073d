//! SPEC 2.1 end to end: the three modes, rotation, wrong secrets, signatures
//! over another body, stale timestamps; nothing unauthenticated is published.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::time::Duration;

use base64::Engine as _;
use support::*;

const QUIET: Duration = Duration::from_millis(400);

fn standard_secret(raw: &[u8]) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_mode_accepts_hex_and_base64_from_every_rotated_secret() {
    let mut app =
        spawn_app_with(Options::default().env("AUTH__SECRETS", "old-secret,new-secret")).await;
    for (i, secret) in ["old-secret", "new-secret"].iter().enumerate() {
        let body = event_body(&unique(&format!("rot{i}")));
        let hex_sig = hmac_hex(secret, body.as_bytes());
        let a = app
            .post_json(&body, ("x-sendtalk-signature", &hex_sig))
            .await;
        assert_eq!(a.status, 200, "{secret}: {:?}", a.json);
    }
    // base64 without prefix
    let body = event_body(&unique("b64"));
    let raw =
        hex::decode(hmac_hex("new-secret", body.as_bytes()).trim_start_matches("sha256=")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let a = app.post_json(&body, ("x-sendtalk-signature", &b64)).await;
    assert_eq!(a.status, 200, "{:?}", a.json);
    assert_eq!(app.delivered(3).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_mode_rejects_missing_wrong_and_misapplied_signatures() {
    let mut app = spawn_app().await;
    let body = event_body(&unique("bad"));
    let other = event_body(&unique("other"));
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![], "missing_signature"),
        (
            vec![("x-sendtalk-signature", String::new())],
            "missing_signature",
        ),
        (
            vec![(
                "x-sendtalk-signature",
                hmac_hex("wrong-secret", body.as_bytes()),
            )],
            "invalid_signature",
        ),
        (
            vec![("x-sendtalk-signature", hmac_hex(SECRET, other.as_bytes()))],
            "invalid_signature",
        ),
        (
            vec![("x-sendtalk-signature", "sha256=nothex".into())],
            "invalid_signature",
        ),
        (
            vec![("x-other-header", hmac_hex(SECRET, body.as_bytes()))],
            "missing_signature",
        ),
    ];
    for (headers, code) in cases {
        let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        h.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
        let a = app.post_with(&body, &h).await;
        assert_eq!(
            (a.status, a.code(), a.field()),
            (401, code, ""),
            "{headers:?}"
        );
    }
    assert!(app.consumer().next(QUIET).await.is_none());
    let (_, metrics) = app.admin("/metrics").await;
    assert!(
        metrics.contains("sendtalk_relay_webhooks_total{outcome=\"rejected_auth\"} 6"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks_mode_checks_signature_and_timestamp_window() {
    let old = standard_secret(b"old key bytes");
    let new = standard_secret(b"new key bytes");
    let mut app = spawn_app_with(
        Options::default()
            .env("AUTH__MODE", "standard-webhooks")
            .env("AUTH__SECRETS", format!("{old},{new}")),
    )
    .await;
    let post = |body: String, headers: Vec<(String, String)>| {
        let app = &app;
        async move {
            let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
            h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            app.post_with(&body, &h).await
        }
    };
    for secret in [&old, &new] {
        let body = event_body(&unique("sw"));
        let a = post(
            body.clone(),
            standard_headers(secret, body.as_bytes(), now_secs()),
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.json);
    }
    // Several signatures in one header, one of them valid.
    let body = event_body(&unique("multi"));
    let mut h = standard_headers(&new, body.as_bytes(), now_secs());
    h[2].1 = format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {}", h[2].1);
    assert_eq!(post(body, h).await.status, 200);

    let body = event_body(&unique("stale"));
    let stale = post(
        body.clone(),
        standard_headers(&new, body.as_bytes(), now_secs() - 301),
    )
    .await;
    assert_eq!((stale.status, stale.code()), (401, "stale_timestamp"));
    let future = post(
        body.clone(),
        standard_headers(&new, body.as_bytes(), now_secs() + 301),
    )
    .await;
    assert_eq!((future.status, future.code()), (401, "stale_timestamp"));
    let wrong = post(
        body.clone(),
        standard_headers(&standard_secret(b"nope"), body.as_bytes(), now_secs()),
    )
    .await;
    assert_eq!((wrong.status, wrong.code()), (401, "invalid_signature"));
    let mut partial = standard_headers(&new, body.as_bytes(), now_secs());
    partial.remove(0);
    let missing = post(body, partial).await;
    assert_eq!((missing.status, missing.code()), (401, "missing_signature"));
    assert_eq!(app.delivered(3).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_header_mode_compares_the_secret_itself() {
    let mut app = spawn_app_with(
        Options::default()
            .env("AUTH__MODE", "secret-header")
            .env("AUTH__HEADER", "X-Webhook-Secret")
            .env("AUTH__SECRETS", "s1,s2"),
    )
    .await;
    let body = event_body(&unique("sh"));
    let ok = app.post_json(&body, ("x-webhook-secret", "s2")).await;
    assert_eq!(ok.status, 200);
    let bad = app.post_json(&body, ("x-webhook-secret", "s3")).await;
    assert_eq!((bad.status, bad.code()), (401, "invalid_signature"));
    let none = app
        .post_with(&body, &[("content-type", "application/json")])
        .await;
    assert_eq!((none.status, none.code()), (401, "missing_signature"));
    assert_eq!(app.delivered(1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_can_come_from_mounted_files() {
    let dir = std::env::temp_dir().join(unique("secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), "file-secret\n").unwrap();
    let app = spawn_app_with(
        Options::default()
            .env("AUTH__SECRETS", "")
            .env("AUTH__SECRET_FILES", dir.join("key").display().to_string()),
    )
    .await;
    let body = event_body(&unique("file"));
    let sig = hmac_hex("file-secret", body.as_bytes());
    let a = app.post_json(&body, ("x-sendtalk-signature", &sig)).await;
    assert_eq!(a.status, 200, "{:?}", a.json);
    std::fs::remove_dir_all(dir).unwrap();
}
