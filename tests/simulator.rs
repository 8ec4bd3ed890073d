//! `sendtalk-sim`, the real binary, checked against SendTalk's documented
//! examples (copies in `tests/fixtures/`, from `shared/fixtures/`): the create
//! envelope for success, header and parameter errors, every documented
//! failure `reason`, `waLink` / `waMessage` / `qrCode`, and the webhook it
//! delivers to a receiver in this test, whose HMAC is recomputed here.
//!
//! Each test starts its own simulator on port 0 (the address is read from
//! its start-up log line) and its own receiver; no shared state, no sleeps
//! to wait for readiness. Simulator logs are shown when `TEST_LOG` is set.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CREATE_PATH: &str = "/api/v1/verification/create_whatsapp_verification";
const API_KEY: &str = "test-api-key-41";
const SECRET: &str = "test-webhook-secret-9c";
const WA_NUMBER: &str = "6281100099900";
const PHONE: &str = "6281212345678";

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A running simulator; killed when dropped.
struct Sim {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Sim {
    /// Starts the binary with the test's API key, secret and number, plus
    /// `args`. Variables of the caller's environment cannot leak in.
    fn start(args: &[&str]) -> Sim {
        let mut cmd = sim_command();
        cmd.args(["--listen", "127.0.0.1:0", "--api-key", API_KEY])
            .args(["--secret", SECRET, "--wa-number", WA_NUMBER])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining the pipe so that the simulator never blocks on it.
        std::thread::spawn(move || {
            let show = std::env::var("TEST_LOG").is_ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if show {
                    eprintln!("sim: {line}");
                }
                if let Some(rest) = line.split("listen=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("sendtalk-sim logged its listen address");
        Sim {
            child,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    async fn create_with(&self, key: Option<&str>, body: &Value) -> reqwest::Response {
        let mut request = self.http.post(format!("{}{CREATE_PATH}", self.base));
        if let Some(key) = key {
            request = request.header("API-Key", key);
        }
        request.json(body).send().await.unwrap()
    }

    /// The envelope answered to `body` with the right key (HTTP 200 always).
    async fn create(&self, body: &Value) -> Value {
        let response = self.create_with(Some(API_KEY), body).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// `data.verification` of a successful create.
    async fn verification(&self, phone: &str, language: &str) -> Value {
        let answer = self.create(&request(phone, language)).await;
        assert_eq!(answer["data"]["success"], true, "{answer}");
        answer["data"]["verification"].clone()
    }

    async fn complete(&self, id: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/sim/verifications/{id}/complete", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn deliveries(&self, id: &str) -> Vec<Value> {
        let url = format!("{}/sim/deliveries?verificationId={id}", self.base);
        let all: Value = self
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        all.as_array().unwrap().clone()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary, without the caller's `SENDTALK_SIM_*` variables.
fn sim_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sendtalk-sim"));
    for (name, _) in std::env::vars() {
        if name.starts_with("SENDTALK_SIM_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn request(phone: &str, language: &str) -> Value {
    json!({"userPhone": phone, "languageCode": language, "expiryMinutes": 10})
}

/// The JSON with every leaf replaced by its type: two answers of the same
/// shape have equal skeletons whatever their values.
fn skeleton(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), skeleton(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(skeleton).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => Value::Null,
    }
}

/// Percent-decoding of a query component (`+` is a space), written here
/// rather than borrowed from the simulator.
fn query_unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// A webhook receiver: raw HTTP/1.1 on a tokio listener, one request per
// connection, answering each request with the next reply of its plan (the
// last reply repeats).

#[derive(Clone, Copy)]
enum Reply {
    Status(u16),
    /// Never answer (the simulator's timeout must fire).
    Hang,
}

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(plan: Vec<Reply>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let Some(request) = read_request(&mut socket).await else {
                    continue;
                };
                let reply = {
                    let mut log = log.lock().unwrap();
                    log.push(request);
                    plan[(log.len() - 1).min(plan.len() - 1)]
                };
                tokio::spawn(async move {
                    match reply {
                        Reply::Hang => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        Reply::Status(code) => {
                            let body = format!(r#"{{"answer":{code}}}"#);
                            let head = format!(
                                "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = socket.write_all(head.as_bytes()).await;
                            let _ = socket.write_all(body.as_bytes()).await;
                            let _ = socket.shutdown().await;
                        }
                    }
                });
            }
        });
        Receiver { url, received }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(data[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Received {
        path,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------
// The create endpoint.

#[tokio::test]
async fn the_documented_request_gets_an_answer_shaped_like_the_documented_success() {
    let sim = Sim::start(&[]);
    let answer = sim
        .create(&fixture("create-verification-request.json"))
        .await;
    let documented = fixture("create-verification-response-ok.json");
    assert_eq!(skeleton(&answer), skeleton(&documented), "{answer}");
    assert_eq!(answer["status"], documented["status"]);
    assert_eq!(answer["error"], documented["error"]);
    for key in ["success", "message", "reason"] {
        assert_eq!(answer["data"][key], documented["data"][key], "data.{key}");
    }
    let id = answer["data"]["verification"]["id"].as_str().unwrap();
    let parsed = uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(parsed.get_version_num(), 4);
}

#[tokio::test]
async fn a_missing_api_key_gets_the_documented_header_error() {
    let sim = Sim::start(&[]);
    let response = sim.create_with(None, &request(PHONE, "id")).await;
    assert_eq!(response.status(), 200, "errors travel in the envelope");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        fixture("create-verification-response-missing-header.json")
    );
}

#[tokio::test]
async fn a_wrong_api_key_gets_status_401_and_code_40100() {
    let sim = Sim::start(&[]);
    let response = sim
        .create_with(Some("not-the-key"), &request(PHONE, "id"))
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], 401);
    assert_eq!(answer["error"]["code"], "40100");
    assert_eq!(answer["error"]["field"], "");
    assert_eq!(answer["data"], json!({}));
    assert_eq!(
        skeleton(&answer),
        skeleton(&fixture("create-verification-response-missing-header.json"))
    );
}

#[tokio::test]
async fn a_missing_user_phone_gets_the_documented_validation_error() {
    let sim = Sim::start(&[]);
    let answer = sim
        .create(&json!({"languageCode": "id", "expiryMinutes": 10}))
        .await;
    assert_eq!(
        answer,
        fixture("create-verification-response-missing-phone.json")
    );
}

#[tokio::test]
async fn every_bad_parameter_gets_code_40002_naming_its_field() {
    let sim = Sim::start(&[]);
    let cases = [
        (
            json!({"userPhone": "62-812", "languageCode": "id", "expiryMinutes": 10}),
            "userPhone",
        ),
        (
            json!({"userPhone": PHONE, "languageCode": "fr", "expiryMinutes": 10}),
            "languageCode",
        ),
        (
            json!({"userPhone": PHONE, "expiryMinutes": 10}),
            "languageCode",
        ),
        (
            json!({"userPhone": PHONE, "languageCode": "en", "expiryMinutes": 0}),
            "expiryMinutes",
        ),
        (
            json!({"userPhone": PHONE, "languageCode": "en"}),
            "expiryMinutes",
        ),
        (
            json!({"userPhone": PHONE, "languageCode": "en", "expiryMinutes": 5, "appURL": 7}),
            "appURL",
        ),
        (json!(["not", "an", "object"]), ""),
    ];
    for (body, field) in cases {
        let answer = sim.create(&body).await;
        assert_eq!(answer["status"], 400, "{body}");
        assert_eq!(answer["error"]["code"], "40002", "{body}");
        assert_eq!(answer["error"]["field"], field, "{body}");
        assert_eq!(answer["data"], json!({}));
    }
}

#[tokio::test]
async fn each_documented_failure_reason_is_reached_by_its_phone_suffix() {
    let sim = Sim::start(&[]);
    let documented = fixture("create-verification-response-ok.json");
    for (phone, reason) in [
        ("6281200000000", "invalid_recipient"),
        ("6281200000001", "insufficient_balance"),
        ("6281200000002", "config_disabled"),
    ] {
        let answer = sim.create(&request(phone, "en")).await;
        assert_eq!(answer["status"], 200, "{answer}");
        assert_eq!(answer["data"]["success"], false, "{answer}");
        assert_eq!(answer["data"]["reason"], reason, "{answer}");
        assert!(!answer["data"]["message"].as_str().unwrap().is_empty());
        // Same keys as a success, so a client reads both the same way.
        assert_eq!(skeleton(&answer), skeleton(&documented), "{answer}");
    }
}

#[tokio::test]
async fn wa_link_opens_the_business_number_with_the_escaped_message() {
    let sim = Sim::start(&[]);
    let v = sim.verification(PHONE, "id").await;
    let link = v["waLink"].as_str().unwrap();
    let prefix = format!("https://wa.me/{WA_NUMBER}?text=");
    let text = link.strip_prefix(&prefix).expect(link);
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+%".contains(&b)),
        "only unreserved characters, + and escapes: {text}"
    );
    // As in the documented link: newlines, colons and asterisks escaped.
    for escape in ["%0A", "%3A+", "%2A"] {
        assert!(text.contains(escape), "{escape} in {text}");
    }
    assert_eq!(query_unescape(text), v["waMessage"].as_str().unwrap());
}

#[tokio::test]
async fn messages_follow_the_language_code_and_carry_the_verification_id() {
    let sim = Sim::start(&[]);
    let documented = fixture("create-verification-response-ok.json");
    let documented_lines: Vec<&str> = documented["data"]["verification"]["waMessage"]
        .as_str()
        .unwrap()
        .lines()
        .collect();
    for (language, code_label, until_label) in [
        ("id", "Kode Verifikasi: ", "Berlaku sampai dengan: "),
        ("en", "Verification Code: ", "Valid until: "),
    ] {
        let v = sim.verification(PHONE, language).await;
        let message = v["waMessage"].as_str().unwrap();
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), documented_lines.len(), "{message}");
        let code = lines[2].strip_prefix(code_label).expect(message);
        assert!(lines[3].starts_with(until_label), "{message}");
        assert!(
            lines[5].starts_with('*') && lines[5].ends_with('*'),
            "{message}"
        );
        // The documented code is base64(base64("<id>:<random>")).
        let inner = BASE64.decode(code).unwrap();
        let plain = String::from_utf8(BASE64.decode(inner).unwrap()).unwrap();
        let id = v["id"].as_str().unwrap();
        assert!(plain.starts_with(&format!("{id}:")), "{plain}");
        if language == "id" {
            assert_eq!(lines[0], documented_lines[0]);
            assert_eq!(lines[5..], documented_lines[5..]);
        }
    }
}

#[tokio::test]
async fn the_qr_code_is_a_png_that_reads_back_as_the_wa_link() {
    let sim = Sim::start(&[]);
    let v = sim.verification(PHONE, "en").await;
    let png_bytes = BASE64.decode(v["qrCode"].as_str().unwrap()).unwrap();
    assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(frame.color_type, png::ColorType::Grayscale);
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    let (w, h) = (frame.width as usize, frame.height as usize);
    assert_eq!(w, h);
    assert!(w >= 100, "readable size: {w} px");
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| pixels[y * w + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1);
    let (_, content) = grids[0].decode().unwrap();
    assert_eq!(content, v["waLink"].as_str().unwrap());
}

#[tokio::test]
async fn create_delay_and_the_slow_phone_make_a_client_time_out() {
    let sim = Sim::start(&["--create-delay-ms", "300"]);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let error = impatient
        .post(format!("{}{CREATE_PATH}", sim.base))
        .header("API-Key", API_KEY)
        .json(&request(PHONE, "en"))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    let started = Instant::now();
    sim.verification(PHONE, "en").await;
    assert!(started.elapsed() >= Duration::from_millis(300));

    let sim = Sim::start(&["--slow-phone-delay-ms", "300"]);
    let started = Instant::now();
    sim.verification("6281200000005", "en").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn phone_suffixes_and_the_fault_flag_give_a_500_or_a_body_that_is_not_json() {
    let sim = Sim::start(&[]);
    let answer = sim
        .create_with(Some(API_KEY), &request("6281200000003", "en"))
        .await;
    assert_eq!(answer.status(), 500);
    assert!(serde_json::from_str::<Value>(&answer.text().await.unwrap()).is_err());
    let answer = sim
        .create_with(Some(API_KEY), &request("6281200000004", "en"))
        .await;
    assert_eq!(answer.status(), 200);
    assert!(serde_json::from_str::<Value>(&answer.text().await.unwrap()).is_err());

    for (fault, status) in [("http-500", 500), ("not-json", 200)] {
        let sim = Sim::start(&["--create-fault", fault]);
        let answer = sim.create_with(Some(API_KEY), &request(PHONE, "en")).await;
        assert_eq!(answer.status(), status, "{fault}");
        assert!(serde_json::from_str::<Value>(&answer.text().await.unwrap()).is_err());
    }
}

// ---------------------------------------------------------------------------
// Completing a verification: the webhook.

#[tokio::test]
async fn completing_delivers_the_documented_body_with_the_secret_header() {
    let receiver = Receiver::start(vec![Reply::Status(200)]).await;
    let sim = Sim::start(&["--webhook-url", &receiver.url]);
    let v = sim.verification(PHONE, "id").await;
    let id = v["id"].as_str().unwrap();
    let before = now_ms();
    let (status, summary) = sim.complete(id, None).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["delivered"], true);
    assert_eq!(summary["attempts"], 1);
    assert_eq!(summary["finalStatus"], 200);

    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/hook");
    assert_eq!(got[0].headers["x-secret-key"], SECRET);
    assert!(got[0].headers["content-type"].starts_with("application/json"));
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    let documented = fixture("webhook-verified.json");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&body),
        keys(&documented),
        "documented fields, in order"
    );
    assert_eq!(body["id"], id);
    assert_eq!(body["userPhone"], PHONE, "the phone given at create");
    assert_eq!(body["status"], "verified");
    let verified = body["verifiedTime"].as_u64().unwrap();
    assert!(verified >= before && verified <= now_ms(), "{verified}");
}

#[tokio::test]
async fn hmac_mode_signs_the_raw_body_and_the_header_can_be_renamed() {
    let receiver = Receiver::start(vec![Reply::Status(200)]).await;
    let sim = Sim::start(&["--webhook-url", &receiver.url, "--auth-mode", "hmac-sha256"]);
    let v = sim.verification(PHONE, "en").await;
    let (status, _) = sim.complete(v["id"].as_str().unwrap(), None).await;
    assert_eq!(status, 200);
    let got = receiver.received();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&got[0].body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(got[0].headers["x-sendtalk-signature"], expected);
    assert!(!got[0].headers.contains_key("x-secret-key"));

    let receiver = Receiver::start(vec![Reply::Status(204)]).await;
    let sim = Sim::start(&["--webhook-url", &receiver.url, "--header", "X-Hook-Key"]);
    let v = sim.verification(PHONE, "en").await;
    let (status, _) = sim.complete(v["id"].as_str().unwrap(), None).await;
    assert_eq!(status, 200, "any 2xx is a delivery");
    assert_eq!(receiver.received()[0].headers["x-hook-key"], SECRET);
}

#[tokio::test]
async fn a_failing_receiver_is_retried_until_it_answers_2xx() {
    let plan = vec![Reply::Status(500), Reply::Status(503), Reply::Status(200)];
    let receiver = Receiver::start(plan).await;
    let sim = Sim::start(&[
        "--webhook-url",
        &receiver.url,
        "--delivery-backoff-ms",
        "20",
    ]);
    let v = sim.verification(PHONE, "en").await;
    let id = v["id"].as_str().unwrap();
    let (status, summary) = sim.complete(id, None).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["attempts"], 3);

    let got = receiver.received();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|r| r.body == got[0].body),
        "a retry is the same event byte for byte"
    );
    let log = sim.deliveries(id).await;
    let seen: Vec<(u64, u64)> = log
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64().unwrap(),
                a["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [(1, 500), (2, 503), (3, 200)]);
    for attempt in &log {
        assert_eq!(attempt["verificationId"], id);
        assert_eq!(attempt["url"], receiver.url.as_str());
        assert_eq!(attempt["error"], Value::Null);
        let at = attempt["at"].as_str().unwrap();
        assert!(
            at.len() > 20 && at.as_bytes()[10] == b'T' && at.ends_with('Z'),
            "RFC 3339 UTC: {at}"
        );
    }
}

#[tokio::test]
async fn an_always_failing_receiver_gets_a_bounded_number_of_attempts() {
    let receiver = Receiver::start(vec![Reply::Status(503)]).await;
    let sim = Sim::start(&[
        "--webhook-url",
        &receiver.url,
        "--delivery-attempts",
        "3",
        "--delivery-backoff-ms",
        "10",
    ]);
    let v = sim.verification(PHONE, "en").await;
    let id = v["id"].as_str().unwrap();
    let (status, summary) = sim.complete(id, None).await;
    assert_eq!(status, 502, "{summary}");
    assert_eq!(summary["delivered"], false);
    assert_eq!(summary["attempts"], 3);
    assert_eq!(summary["finalStatus"], 503);
    assert_eq!(summary["finalResponseBody"], r#"{"answer":503}"#);
    assert_eq!(receiver.received().len(), 3);
    assert_eq!(sim.deliveries(id).await.len(), 3);
}

#[tokio::test]
async fn a_receiver_that_does_not_answer_times_out_and_is_retried() {
    let receiver = Receiver::start(vec![Reply::Hang, Reply::Status(200)]).await;
    let sim = Sim::start(&[
        "--webhook-url",
        &receiver.url,
        "--delivery-timeout-ms",
        "200",
        "--delivery-backoff-ms",
        "10",
    ]);
    let v = sim.verification(PHONE, "en").await;
    let id = v["id"].as_str().unwrap();
    let (status, summary) = sim.complete(id, None).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["attempts"], 2);
    let log = sim.deliveries(id).await;
    assert_eq!(log[0]["status"], Value::Null);
    assert!(
        log[0]["error"].as_str().unwrap().contains("timed out"),
        "{}",
        log[0]
    );
    assert_eq!(log[1]["status"], 200);
}

#[tokio::test]
async fn the_phone_can_be_overridden_to_test_a_mismatch() {
    let receiver = Receiver::start(vec![Reply::Status(200)]).await;
    let sim = Sim::start(&["--webhook-url", &receiver.url]);
    let v = sim.verification(PHONE, "en").await;
    let id = v["id"].as_str().unwrap();
    let (status, summary) = sim
        .complete(id, Some(json!({"userPhone": "628999000111"})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(summary["userPhone"], "628999000111");
    let body: Value = serde_json::from_slice(&receiver.received()[0].body).unwrap();
    assert_eq!(body["userPhone"], "628999000111");
}

#[tokio::test]
async fn an_unknown_verification_cannot_be_completed() {
    let sim = Sim::start(&[]);
    for id in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_string()] {
        let (status, answer) = sim.complete(&id, None).await;
        assert_eq!(status, 404);
        assert_eq!(answer["error"]["code"], "not_found");
        assert_eq!(answer["error"]["field"], "id");
    }
    assert!(sim.deliveries("").await.is_empty());
}

// ---------------------------------------------------------------------------
// Process and command line.

#[tokio::test]
async fn healthz_answers_200() {
    let sim = Sim::start(&[]);
    let response = sim
        .http
        .get(format!("{}/healthz", sim.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[test]
fn help_names_every_flag_with_its_environment_variable() {
    let output = sim_command().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "listen",
        "api-key",
        "webhook-url",
        "auth-mode",
        "header",
        "secret",
        "wa-number",
        "create-delay-ms",
        "create-fault",
    ] {
        assert!(help.contains(&format!("--{flag}")), "--{flag} in\n{help}");
        let var = format!("SENDTALK_SIM_{}", flag.replace('-', "_").to_uppercase());
        assert!(help.contains(&var), "{var} in\n{help}");
    }
    for trigger in ["0000", "0001", "0002", "0003", "0004", "0005", "40100"] {
        assert!(help.contains(trigger), "{trigger} documented in --help");
    }
}

#[test]
fn bad_flags_stop_start_up_with_exit_code_64_without_echoing_secrets() {
    let output = sim_command()
        .args(["--webhook-url", "https://relay.example/hook"])
        .args(["--secret", "do-not-print-me", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--webhook-url"), "{stderr}");
    assert!(!stderr.contains("do-not-print-me"), "{stderr}");
}
