//! The binary as an operator uses it (SPEC 7-8): configuration errors exit
//! 64 naming the key, `check-config` redacts secrets, `sign` and `send-test`
//! act as a sender, and the logs never carry a secret or a full phone number.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn relay() -> Command {
    relay_command()
}

#[test]
fn an_unknown_environment_key_stops_start_up_with_exit_64_naming_it() {
    let out = relay()
        .env("SENDTALK_RELAY__HTTP__LISTN", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.listn"), "{err}");
}

#[test]
fn an_unknown_file_key_and_a_bad_value_exit_64_for_check_config_too() {
    let dir = std::env::temp_dir().join(unique("cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[auth]\nsecrets = [\"x\"]\n[spool]\nmax_byts = 1\n").unwrap();
    let out = relay()
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spool.max_byts"));

    std::fs::write(
        &file,
        "[auth]\nsecrets = [\"x\"]\n[dedup]\nttl_secs = \"soon\"\n",
    )
    .unwrap();
    let out = relay()
        .arg("check-config")
        .env("SENDTALK_RELAY_CONFIG", &file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dedup.ttl_secs"));

    let out = relay()
        .arg("check-config")
        .env("SENDTALK_RELAY__WEBHOOK__MAX_EVENT_AGE_SECS", "700000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("webhook.max_event_age_secs"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_redacted() {
    let out = relay()
        .arg("check-config")
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"),
        ])
        .env(
            "SENDTALK_RELAY__AUTH__SECRETS",
            "super-secret-1,super-secret-2",
        )
        .env(
            "SENDTALK_RELAY__AMQP__URI",
            "amqp://app:broker-pass@mq:5672/%2f",
        )
        .env("SENDTALK_RELAY__HTTP__MAX_BODY_BYTES", "1000")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("super-secret") && !text.contains("broker-pass"),
        "{text}"
    );
    assert!(text.contains("\"<redacted>\""));
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(
        parsed["http"]["max_body_bytes"].as_integer(),
        Some(1000),
        "env overrides the file"
    );
    assert_eq!(parsed["sink"].as_str(), Some("amqp"));
}

#[test]
fn help_describes_every_command() {
    let out = relay().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "serve",
        "check-config",
        "sign",
        "send-test",
        "--config",
        "SENDTALK_RELAY_CONFIG",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

/// Runs `sendtalk-relay sign ARGS` with `body` on standard input.
fn sign(args: &[&str], body: &[u8]) -> String {
    let mut child = relay()
        .arg("sign")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sign_prints_the_headers_a_sender_attaches() {
    let body = br#"{"id":"x"}"#;
    // The default mode sends the secret key itself (SPEC 2.1).
    let text = sign(&["--secret", "k3y"], body);
    assert_eq!(text.trim(), "X-Secret-Key: k3y");

    // Another mode brings its own default header.
    let text = sign(&["--mode", "hmac-sha256", "--secret", "k3y"], body);
    assert_eq!(
        text.trim(),
        format!("X-SendTalk-Signature: {}", hmac_hex("k3y", body))
    );

    let text = sign(
        &["--mode", "standard-webhooks", "--secret", "whsec_a2V5"],
        body,
    );
    for name in [
        "webhook-id: ",
        "webhook-timestamp: ",
        "webhook-signature: v1,",
    ] {
        assert!(text.contains(name), "{text}");
    }
}

struct Running {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self { child, stderr }
    }

    fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.stderr.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn terminate(mut self) -> (Option<i32>, String, String) {
        use std::io::Read;
        unsafe_kill(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().unwrap().clone();
        (status.code(), stdout, stderr)
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

#[test]
fn embedded_defaults_relay_a_send_test_event_to_stdout_and_logs_stay_clean() {
    let mut cmd = relay();
    let (port, _) = listen_on_free_ports(&mut cmd);
    let running = Running::start(cmd);
    assert!(running.wait_for_log("sendtalk-relay listening", Duration::from_secs(10)));
    assert!(running.stderr.lock().unwrap().contains("embedded defaults"));
    assert!(
        !running.stderr.lock().unwrap().contains("dev-secret\""),
        "the secret is never printed"
    );

    let url = format!("http://127.0.0.1:{port}/webhooks/sendtalk/verification");
    let out = relay()
        .args(["send-test", "--url", &url, "--id", "cli-event-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("200 ") && answer.contains("\"published\""),
        "{answer}"
    );
    let again = relay()
        .args(["send-test", "--url", &url, "--id", "cli-event-1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("duplicate"));
    let wrong = relay()
        .args(["send-test", "--url", &url, "--secret", "nope"])
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "a non-2xx answer exits non-zero");
    assert!(String::from_utf8_lossy(&wrong.stdout).starts_with("401 "));

    let (code, stdout, stderr) = running.terminate();
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{stdout}");
    assert_eq!(events[0]["message_id"], "cli-event-1");
    assert_eq!(events[0]["body"]["userPhone"], "6281212345678");
    // One JSON log line per webhook, with the phone masked.
    let webhook_lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "webhook")
        .collect();
    assert_eq!(webhook_lines.len(), 3, "{stderr}");
    assert_eq!(webhook_lines[0]["user_phone"], "6281****678");
    assert_eq!(webhook_lines[0]["verification_id"], "cli-event-1");
    assert!(
        webhook_lines[0]["latency_ms"].is_number() && webhook_lines[0]["request_id"].is_string()
    );
    assert!(
        !stderr.contains("6281212345678"),
        "full phone number in logs:\n{stderr}"
    );
    assert!(!stderr.contains("dev-secret"), "secret in logs");
    assert!(stderr.contains("stopped"));
}

#[test]
fn configured_secrets_never_reach_the_logs_even_at_debug_level() {
    let mut cmd = relay();
    let (port, _) = listen_on_free_ports(&mut cmd);
    cmd.env("SENDTALK_RELAY__AUTH__SECRETS", "very-private-key")
        .env("RUST_LOG", "debug");
    let running = Running::start(cmd);
    assert!(running.wait_for_log("sendtalk-relay listening", Duration::from_secs(10)));
    let url = format!("http://127.0.0.1:{port}/webhooks/sendtalk/verification");
    let out = relay()
        .args(["send-test", "--url", &url, "--secret", "very-private-key"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = relay()
        .args(["send-test", "--url", &url, "--secret", "guess"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let (code, _, stderr) = running.terminate();
    assert_eq!(code, Some(0));
    for secret in ["very-private-key", "guess", "6281212345678"] {
        assert!(!stderr.contains(secret), "{secret} leaked:\n{stderr}");
    }
}

/// SPEC 2.1: with no configuration the relay expects TapTalk's convention,
/// the secret key as is in `X-Secret-Key`; a request refused with
/// `missing_signature` logs the names of its headers (never their values),
/// at most once a minute.
#[test]
fn the_default_mode_takes_the_secret_in_x_secret_key_and_logs_unknown_header_names() {
    let mut cmd = relay();
    let (port, _) = listen_on_free_ports(&mut cmd);
    let running = Running::start(cmd);
    assert!(running.wait_for_log("sendtalk-relay listening", Duration::from_secs(10)));
    let url = format!("http://127.0.0.1:{port}/webhooks/sendtalk/verification");
    let body = format!(
        r#"{{"id":"{}","userPhone":"6281212345678","status":"verified","verifiedTime":{}}}"#,
        unique("xsk"),
        now_ms()
    );
    let post = |(name, value): (&str, &str)| {
        let headers = [
            ("content-type".to_string(), "application/json".to_string()),
            (name.to_string(), value.to_string()),
        ];
        post_blocking(&url, &body, &headers)
    };
    let ok = post(("X-Secret-Key", "dev-secret"));
    assert_eq!(ok, 200);
    let unknown = post(("X-Callback-Token", "value-never-logged-1"));
    assert_eq!(unknown, 401);
    let again = post(("X-Other-Token", "value-never-logged-2"));
    assert_eq!(again, 401);
    assert!(running.wait_for_log("x-callback-token", Duration::from_secs(5)));
    let (code, _, stderr) = running.terminate();
    assert_eq!(code, Some(0));
    assert!(
        !stderr.contains("value-never-logged"),
        "values are never logged"
    );
    assert_eq!(
        stderr.matches("headers it carried").count(),
        1,
        "at most one line a minute: {stderr}"
    );
    assert!(!stderr.contains("x-other-token"));
}

/// POSTs from a blocking test and returns the status code.
fn post_blocking(url: &str, body: &str, headers: &[(String, String)]) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut req = reqwest::Client::new().post(url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.body(body.to_string())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

/// SPEC 3: a lease that cannot outlive claim + confirm + spool write +
/// commit (with the bounds the relay enforces: 3 s, the confirm timeout,
/// 5 s, 3 s) is refused before start-up.
#[test]
fn a_lease_shorter_than_the_worst_case_pipeline_exits_64() {
    let check = |lease: &str, confirm_ms: &str| {
        relay()
            .arg("check-config")
            .env("SENDTALK_RELAY__DEDUP__LEASE_SECS", lease)
            .env("SENDTALK_RELAY__AMQP__CONFIRM_TIMEOUT_MS", confirm_ms)
            .output()
            .unwrap()
    };
    let out = check("16", "5000");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dedup.lease_secs"), "{err}");
    assert_eq!(check("17", "5000").status.code(), Some(0));
    assert_eq!(check("12", "500").status.code(), Some(0));
    assert_eq!(check("11", "500").status.code(), Some(64));

    // Issue 16, finding 10: with the lifecycle API the webhook also reads
    // the verification's phone (x-phone-match) while it holds the lease,
    // one more Redis call of at most 3 s.
    let with_api = |lease: &str| {
        relay()
            .arg("check-config")
            .env("SENDTALK_RELAY__DEDUP__LEASE_SECS", lease)
            .env("SENDTALK_RELAY__AMQP__CONFIRM_TIMEOUT_MS", "5000")
            .env("SENDTALK_RELAY__API__ENABLED", "true")
            .env(
                "SENDTALK_RELAY__API__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("SENDTALK_RELAY__API__TOKENS", "a-test-token-of-some-length")
            .env("SENDTALK_RELAY__SENDTALK__API_KEY", "key")
            .output()
            .unwrap()
    };
    let out = with_api("19");
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dedup.lease_secs") && err.contains("phone match"),
        "{err}"
    );
    let out = with_api("20");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate or key that does not parse is a configuration error:
/// exit 64 naming the key, before any socket is bound.
#[test]
fn an_unreadable_tls_certificate_or_key_exits_64_before_binding() {
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, "not a key\n").unwrap();
    let port = free_port();
    let out = relay()
        .env("SENDTALK_RELAY__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("SENDTALK_RELAY__HTTP__TLS_CERT_FILE", &cert)
        .env("SENDTALK_RELAY__HTTP__TLS_KEY_FILE", &key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.tls_cert_file"), "{err}");
    assert!(!err.contains("listening"), "nothing was bound: {err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// SPEC 11: the Redis mode's own keys are checked (exit 64 naming the key,
/// for `serve` and `check-config` alike) and `redis.urls` passwords are
/// redacted like `redis.url`'s.
#[test]
fn redis_cluster_and_sentinel_settings_are_validated_and_their_urls_redacted() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let run = |command: Option<&str>, vars: &[(&str, &str)]| {
        let mut cmd = relay();
        if let Some(command) = command {
            cmd.arg(command);
        }
        cmd.args(["--config", config])
            .env("SENDTALK_RELAY__AUTH__SECRETS", "s3cret")
            .env("SENDTALK_RELAY__HTTP__LISTEN", "127.0.0.1:0")
            .env("SENDTALK_RELAY__ADMIN__LISTEN", "127.0.0.1:0");
        for (k, v) in vars {
            cmd.env(format!("SENDTALK_RELAY__{k}"), v);
        }
        cmd.output().unwrap()
    };
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("REDIS__MODE", "shards")], "redis.mode"),
        (&[("REDIS__MODE", "cluster")], "redis.urls"),
        (
            &[
                ("REDIS__MODE", "cluster"),
                ("REDIS__URLS", "redis://a:7000,tcp://b:7001"),
            ],
            "redis.urls",
        ),
        (&[("REDIS__MODE", "sentinel")], "redis.urls"),
        (
            &[
                ("REDIS__MODE", "sentinel"),
                ("REDIS__URLS", "redis://s1:26379,redis://s2:26379"),
            ],
            "redis.sentinel_service",
        ),
    ];
    for (vars, key) in cases {
        for command in [None, Some("check-config")] {
            let out = run(command, vars);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{command:?} {vars:?}: {err}");
            assert!(err.contains(key), "{command:?} {vars:?}: {err}");
        }
    }
    let out = run(
        Some("check-config"),
        &[
            ("REDIS__MODE", "sentinel"),
            (
                "REDIS__URLS",
                "redis://:sentinel-pass@s1:26379,rediss://u:other-pass@s2:26379",
            ),
            ("REDIS__SENTINEL_SERVICE", "relay-master"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("sentinel-pass") && !text.contains("other-pass"),
        "{text}"
    );
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(parsed["redis"]["mode"].as_str(), Some("sentinel"));
    assert_eq!(
        parsed["redis"]["urls"][1].as_str(),
        Some("rediss://u:<redacted>@s2:26379")
    );
}

/// SPEC 8 (issue 20): `healthcheck` probes `/healthz` wherever the same
/// configuration puts the admin listener: 0 for a relay whose admin port
/// was moved, 1 for a closed port and for a listener that answers 404, each
/// within 2 s.
#[test]
fn healthcheck_follows_admin_listen_and_checks_the_status() {
    let admin = free_port();
    let http = free_port();
    let mut server = relay()
        .env("SENDTALK_RELAY__HTTP__LISTEN", format!("127.0.0.1:{http}"))
        .env(
            "SENDTALK_RELAY__ADMIN__LISTEN",
            format!("127.0.0.1:{admin}"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let check = |listen: String| {
        let started = Instant::now();
        let out = relay()
            .arg("healthcheck")
            .env("SENDTALK_RELAY__ADMIN__LISTEN", listen)
            .output()
            .unwrap();
        (
            out.status.code(),
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut up = check(format!("127.0.0.1:{admin}"));
    while up.0 != Some(0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        up = check(format!("127.0.0.1:{admin}"));
    }
    assert_eq!(up.0, Some(0), "{}", up.2);
    // 0.0.0.0 is probed on loopback.
    assert_eq!(check(format!("0.0.0.0:{admin}")).0, Some(0));
    let _ = server.kill();
    let _ = server.wait();

    let closed = check(format!("127.0.0.1:{}", free_port()));
    assert_eq!(closed.0, Some(1), "{}", closed.2);
    assert!(closed.1 < Duration::from_secs(3), "{:?}", closed.1);

    // A listener that answers, but not 200; and one that never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    let not_found = check(format!("127.0.0.1:{port}"));
    assert_eq!(not_found.0, Some(1), "{}", not_found.2);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = check(silent.local_addr().unwrap().to_string());
    assert_eq!(hung.0, Some(1), "{}", hung.2);
    assert!(hung.1 < Duration::from_secs(3), "{:?}", hung.1);
}
