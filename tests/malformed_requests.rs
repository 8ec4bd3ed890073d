//! A table of malformed requests: wrong headers, bodies, encodings, sizes,
//! nesting, methods and paths. Each gets its documented 4xx with the right
//! code and field, the relay stays up, and nothing reaches the broker, Redis
//! or the quarantine.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::time::Duration;

use support::*;

struct Case {
    name: &'static str,
    method: &'static str,
    path_suffix: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    /// None: sign the body correctly; Some(value): send this signature header.
    signature: Option<String>,
    status: u16,
    code: &'static str,
    field: &'static str,
}

fn case(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
    field: &'static str,
) -> Case {
    Case {
        name,
        method: "POST",
        path_suffix: "",
        content_type: Some("application/json"),
        body: body.into(),
        signature: None,
        status,
        code,
        field,
    }
}

fn fields(id: &str, phone: &str, status: &str, time: &str) -> String {
    format!(r#"{{"id":{id},"userPhone":{phone},"status":{status},"verifiedTime":{time}}}"#)
}

fn cases() -> Vec<Case> {
    let now = now_ms().to_string();
    let ok_id = "\"mal-id\"";
    let ok_phone = "\"6281212345678\"";
    let ok_status = "\"verified\"";
    let f = |id: &str, phone: &str, status: &str, time: &str| fields(id, phone, status, time);
    let mut v = vec![
        // JSON syntax and shape
        case("empty body", "", 400, "invalid_json", ""),
        case("truncated object", "{\"id\":\"a\"", 400, "invalid_json", ""),
        case(
            "trailing garbage",
            format!("{} x", f(ok_id, ok_phone, ok_status, &now)),
            400,
            "invalid_json",
            "",
        ),
        case("single quotes", "{'id':'a'}", 400, "invalid_json", ""),
        case(
            "invalid utf-8",
            b"{\"id\":\"\xff\xfe\"}".to_vec(),
            400,
            "invalid_json",
            "",
        ),
        case(
            "utf-16 bom",
            b"\xfe\xff\x00{\x00}".to_vec(),
            400,
            "invalid_json",
            "",
        ),
        case(
            "nesting too deep",
            format!("{{\"a\":{}1{}}}", "[".repeat(300), "]".repeat(300)),
            400,
            "invalid_json",
            "",
        ),
        case("array", "[1,2,3]", 400, "invalid_payload", ""),
        case("string", "\"hello\"", 400, "invalid_payload", ""),
        case("null", "null", 400, "invalid_payload", ""),
        case("number", "42", 400, "invalid_payload", ""),
        case("empty object", "{}", 400, "invalid_payload", "id"),
        // id
        case(
            "id null",
            f("null", ok_phone, ok_status, &now),
            400,
            "invalid_payload",
            "id",
        ),
        case(
            "id number",
            f("12", ok_phone, ok_status, &now),
            400,
            "invalid_payload",
            "id",
        ),
        case(
            "id empty",
            f("\"\"", ok_phone, ok_status, &now),
            400,
            "invalid_payload",
            "id",
        ),
        case(
            "id with space",
            f("\"a b\"", ok_phone, ok_status, &now),
            400,
            "invalid_payload",
            "id",
        ),
        case(
            "id with newline",
            f("\"a\\nb\"", ok_phone, ok_status, &now),
            400,
            "invalid_payload",
            "id",
        ),
        case(
            "id non-ascii",
            f("\"caf\u{e9}\"", ok_phone, ok_status, &now),
            400,
            "invalid_payload",
            "id",
        ),
        case(
            "id 129 chars",
            f(
                &format!("\"{}\"", "a".repeat(129)),
                ok_phone,
                ok_status,
                &now,
            ),
            400,
            "invalid_payload",
            "id",
        ),
        case(
            "id object",
            f("{\"x\":1}", ok_phone, ok_status, &now),
            400,
            "invalid_payload",
            "id",
        ),
        // userPhone
        case(
            "phone missing",
            format!(r#"{{"id":"a","status":"verified","verifiedTime":{now}}}"#),
            400,
            "invalid_payload",
            "userPhone",
        ),
        case(
            "phone number type",
            f(ok_id, "6281212345678", ok_status, &now),
            400,
            "invalid_payload",
            "userPhone",
        ),
        case(
            "phone too short",
            f(ok_id, "\"1234\"", ok_status, &now),
            400,
            "invalid_payload",
            "userPhone",
        ),
        case(
            "phone too long",
            f(ok_id, "\"1234567890123456\"", ok_status, &now),
            400,
            "invalid_payload",
            "userPhone",
        ),
        case(
            "phone with plus",
            f(ok_id, "\"+6281212345678\"", ok_status, &now),
            400,
            "invalid_payload",
            "userPhone",
        ),
        case(
            "phone with dash",
            f(ok_id, "\"62-812-1234\"", ok_status, &now),
            400,
            "invalid_payload",
            "userPhone",
        ),
        case(
            "phone arabic digits",
            f(
                ok_id,
                "\"\u{661}\u{662}\u{663}\u{664}\u{665}\"",
                ok_status,
                &now,
            ),
            400,
            "invalid_payload",
            "userPhone",
        ),
        // status
        case(
            "status missing",
            format!(r#"{{"id":"a","userPhone":"6281212345","verifiedTime":{now}}}"#),
            400,
            "invalid_payload",
            "status",
        ),
        case(
            "status number",
            f(ok_id, ok_phone, "1", &now),
            400,
            "invalid_payload",
            "status",
        ),
        case(
            "status other",
            f(ok_id, ok_phone, "\"expired\"", &now),
            422,
            "unsupported_status",
            "status",
        ),
        case(
            "status wrong case",
            f(ok_id, ok_phone, "\"VERIFIED\"", &now),
            422,
            "unsupported_status",
            "status",
        ),
        // verifiedTime
        case(
            "time missing",
            r#"{"id":"a","userPhone":"6281212345","status":"verified"}"#.to_string(),
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        case(
            "time float",
            f(ok_id, ok_phone, ok_status, "1692847205385.0"),
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        case(
            "time exponent",
            f(ok_id, ok_phone, ok_status, "1.6e12"),
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        case(
            "time string",
            f(ok_id, ok_phone, ok_status, &format!("\"{now}\"")),
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        case(
            "time negative",
            f(ok_id, ok_phone, ok_status, "-1"),
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        case(
            "time zero",
            f(ok_id, ok_phone, ok_status, "0"),
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        case(
            "time huge",
            f(ok_id, ok_phone, ok_status, "123456789012345678901234567890"),
            400,
            "invalid_payload",
            "verifiedTime",
        ),
        case(
            "time too old",
            f(ok_id, ok_phone, ok_status, "1692847205385"),
            422,
            "stale_event",
            "verifiedTime",
        ),
        case(
            "time far future",
            f(
                ok_id,
                ok_phone,
                ok_status,
                &(now_ms() + 3_600_000).to_string(),
            ),
            422,
            "stale_event",
            "verifiedTime",
        ),
        // size
        case(
            "body over the limit",
            format!("{{\"pad\":\"{}\"}}", "a".repeat(66_000)),
            413,
            "payload_too_large",
            "",
        ),
    ];
    // Headers and signatures
    let valid = f(ok_id, ok_phone, ok_status, &now);
    v.push(Case {
        content_type: None,
        ..case(
            "no content type",
            valid.clone(),
            415,
            "unsupported_media_type",
            "",
        )
    });
    v.push(Case {
        content_type: Some("text/json"),
        ..case(
            "text/json",
            valid.clone(),
            415,
            "unsupported_media_type",
            "",
        )
    });
    v.push(Case {
        content_type: Some("application/x-www-form-urlencoded"),
        ..case("form", valid.clone(), 415, "unsupported_media_type", "")
    });
    v.push(Case {
        content_type: Some("multipart/form-data; boundary=x"),
        ..case(
            "multipart",
            valid.clone(),
            415,
            "unsupported_media_type",
            "",
        )
    });
    v.push(Case {
        signature: Some(String::new()),
        ..case(
            "empty signature",
            valid.clone(),
            401,
            "missing_signature",
            "",
        )
    });
    v.push(Case {
        signature: Some("sha256=".into()),
        ..case("prefix only", valid.clone(), 401, "invalid_signature", "")
    });
    v.push(Case {
        signature: Some("sha1=abcdef".into()),
        ..case(
            "other algorithm",
            valid.clone(),
            401,
            "invalid_signature",
            "",
        )
    });
    v.push(Case {
        signature: Some(hmac_hex(SECRET, b"{}")),
        ..case(
            "signature of another body",
            valid.clone(),
            401,
            "invalid_signature",
            "",
        )
    });
    v.push(Case {
        signature: Some(hmac_hex("", valid.as_bytes())),
        ..case(
            "empty-key signature",
            valid.clone(),
            401,
            "invalid_signature",
            "",
        )
    });
    v.push(Case {
        signature: Some(SECRET.into()),
        ..case(
            "secret instead of signature",
            valid.clone(),
            401,
            "invalid_signature",
            "",
        )
    });
    // Methods and paths
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        v.push(Case {
            method,
            ..case("wrong method", valid.clone(), 405, "method_not_allowed", "")
        });
    }
    v.push(Case {
        path_suffix: "/",
        ..case("trailing slash", valid.clone(), 404, "not_found", "")
    });
    v.push(Case {
        path_suffix: "x",
        ..case("longer path", valid.clone(), 404, "not_found", "")
    });
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_request_gets_its_4xx_and_nothing_is_published() {
    let quarantine_exchange = unique("test.mal.q");
    let exchange = unique("test.mal");
    let mut app = spawn_app_with(Options {
        exchange: Some(exchange.clone()),
        ..Options::default().env("AMQP__QUARANTINE_EXCHANGE", quarantine_exchange.clone())
    })
    .await;
    app.consumer = Some(TestConsumer::bind(&exchange, "#").await);
    let mut quarantine = TestConsumer::bind(&quarantine_exchange, "#").await;
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut authenticated_rejections = 0;
    for c in &cases {
        let url = format!("{}{}", app.url, c.path_suffix);
        let mut req = app.client.request(c.method.parse().unwrap(), &url);
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        let sig = c
            .signature
            .clone()
            .unwrap_or_else(|| hmac_hex(SECRET, &c.body));
        req = req.header("x-sendtalk-signature", sig);
        let r = req.body(c.body.clone()).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: answer is not JSON: {text}", c.name));
        assert_eq!(status, c.status, "{}: {json}", c.name);
        assert_eq!(json["error"]["code"], c.code, "{}", c.name);
        assert_eq!(json["error"]["field"], c.field, "{}", c.name);
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            c.name
        );
        if c.signature.is_none()
            && c.path_suffix.is_empty()
            && c.method == "POST"
            && c.status != 413
        {
            authenticated_rejections += 1;
        }
    }
    // Still alive and serving.
    let id = unique("alive");
    assert_eq!(app.post(&event_body(&id)).await.result(), "published");
    let msgs = app
        .consumer()
        .collect(1, Duration::from_secs(10), Duration::from_millis(500))
        .await;
    assert_eq!(
        message_ids(&msgs),
        vec![id],
        "only the valid event was published"
    );
    assert_eq!(app.redis_get("mal-id").await, None, "nothing reached Redis");
    // Every authenticated rejection, and nothing else, was quarantined.
    let held = quarantine
        .collect(
            authenticated_rejections,
            Duration::from_secs(10),
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(held.len(), authenticated_rejections);
    assert!(held.iter().all(|d| header(d, "x-reject-reason").is_some()));
    assert!(authenticated_rejections >= 30);
    cleanup_names(&quarantine_exchange, &app.key_prefix).await;
    cleanup_names(&exchange, &app.key_prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_stalls_mid_body_is_cut_off() {
    let app = spawn_app().await;
    let head = format!(
        "POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":"
    );
    // The relay answers (408) or closes; it does not wait forever.
    let text = raw_exchange(&app, head.as_bytes(), Duration::from_secs(20))
        .await
        .expect("the relay cut the stalled request");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // And keeps serving others.
    assert_eq!(
        app.post(&event_body(&unique("after-stall"))).await.status,
        200
    );
}
