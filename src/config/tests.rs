//! Loading as a whole: the layers, the embedded defaults, unknown keys, bad
//! values naming their key, and settings that never print a secret.

use super::test_support::env;
use super::*;
use std::path::PathBuf;

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config.example.toml")
}

#[test]
fn embedded_defaults_use_memory_stdout_loopback_and_the_dev_secret() {
    let s = Settings::load(None, env(&[])).unwrap();
    assert_eq!(s.sink, SinkKind::Stdout);
    assert_eq!(s.dedup.backend(), DedupBackend::Memory);
    assert!(s.http.listen.ip().is_loopback());
    assert!(s.using_dev_secret);
}

#[test]
fn example_file_parses_and_documents_every_key() {
    let s = Settings::load(Some(&example()), env(&[])).unwrap();
    assert_eq!(s.sink, SinkKind::Amqp);
    let text = std::fs::read_to_string(example()).unwrap();
    for key in default_keys().keys() {
        let leaf = key.rsplit('.').next().unwrap();
        let documented =
            text.contains(&format!("{leaf} =")) || text.contains(&format!("[[{key}]]"));
        assert!(documented, "config.example.toml does not document `{key}`");
    }
}

#[test]
fn environment_overrides_the_file_and_splits_lists() {
    let s = Settings::load(
        Some(&example()),
        env(&[
            ("SENDTALK_RELAY__AMQP__URI", "amqp://a:1/%2f,amqp://b:2/%2f"),
            ("SENDTALK_RELAY__AUTH__SECRETS", "one,two"),
            ("SENDTALK_RELAY__HTTP__MAX_BODY_BYTES", "1234"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    let uris: Vec<String> = s.amqp.uris.iter().map(ToString::to_string).collect();
    assert_eq!(uris, vec!["amqp://a:1/%2f", "amqp://b:2/%2f"]);
    assert_eq!(s.auth.secrets.len(), 2);
    assert_eq!(s.http.max_body_bytes, 1234);
}

#[test]
fn unknown_environment_key_is_rejected_naming_it() {
    let err = Settings::load(None, env(&[("SENDTALK_RELAY__HTTP__BOGUS", "1")])).unwrap_err();
    assert_eq!(err.key, "http.bogus", "{err}");
    let err = Settings::load(None, env(&[("SENDTALK_RELAY__NOPE", "1")])).unwrap_err();
    assert_eq!(err.key, "nope", "{err}");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("SENDTALK_RELAY__AUTH__MODE", "rot13", "auth.mode"),
        ("SENDTALK_RELAY__HTTP__LISTEN", "nowhere", "http.listen"),
        (
            "SENDTALK_RELAY__WEBHOOK__MAX_EVENT_AGE_SECS",
            "999999999",
            "webhook.max_event_age_secs",
        ),
        ("SENDTALK_RELAY__AMQP__URI", "http://x", "amqp.uri"),
        (
            "SENDTALK_RELAY__AMQP__ROUTING_KEY",
            "v.{nope}",
            "amqp.routing_key",
        ),
        ("SENDTALK_RELAY__DEDUP__TTL_SECS", "ten", "dedup.ttl_secs"),
    ];
    for (var, value, key) in cases {
        let err = Settings::load(None, env(&[(var, value)])).unwrap_err();
        assert_eq!(err.key, key, "{var}={value}: {err}");
    }
}

#[test]
fn debug_output_never_shows_a_secret() {
    let s = Settings::load(
        None,
        env(&[
            (
                "SENDTALK_RELAY__AUTH__SECRETS",
                "auth-secret-1,auth-secret-2",
            ),
            ("SENDTALK_RELAY__API__ENABLED", "true"),
            ("SENDTALK_RELAY__API__TOKENS", "api-token-1"),
            ("SENDTALK_RELAY__SENDTALK__API_KEY", "sendtalk-key-1"),
            (
                "SENDTALK_RELAY__AMQP__URI",
                "amqp://user:broker-pw-1@h:5672/%2f,amqps://u:broker-pw-2@h2:5671/v",
            ),
            ("SENDTALK_RELAY__DEDUP__BACKEND", "redis"),
            ("SENDTALK_RELAY__REDIS__URL", "redis://:redis-pw-1@h:6379"),
        ]),
    )
    .unwrap();
    let cluster = Settings::load(
        None,
        env(&[
            ("SENDTALK_RELAY__DEDUP__BACKEND", "redis"),
            ("SENDTALK_RELAY__REDIS__MODE", "cluster"),
            (
                "SENDTALK_RELAY__REDIS__URLS",
                "redis://:seed-pw-1@a:7000,redis://:seed-pw-1@b:7001",
            ),
        ]),
    )
    .unwrap();
    let printed = format!("{s:?}\n{s:#?}\n{cluster:?}");
    for secret in [
        "auth-secret-1",
        "auth-secret-2",
        "api-token-1",
        "sendtalk-key-1",
        "broker-pw-1",
        "broker-pw-2",
        "redis-pw-1",
        "seed-pw-1",
    ] {
        assert!(!printed.contains(secret), "`{secret}` in {printed}");
    }
    // The non-secret parts are still there to debug with.
    assert!(printed.contains("h2"), "{printed}");
}

/// SPEC 7 (issue 20): configured by environment alone, as containers are,
/// real backends' keys choose the real backends.
#[test]
fn amqp_and_redis_keys_in_the_environment_choose_the_real_backends() {
    let s = Settings::load(
        None,
        env(&[
            (
                "SENDTALK_RELAY__AMQP__URI",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            ("SENDTALK_RELAY__AMQP__EXCHANGE", "env.only"),
            ("SENDTALK_RELAY__REDIS__URL", "redis://127.0.0.1:6379"),
        ]),
    )
    .unwrap();
    assert_eq!(s.sink, SinkKind::Amqp);
    assert_eq!(s.dedup.backend(), DedupBackend::Redis);
    assert!(s.ignored_keys.is_empty());
    // Only one of them: only that one changes.
    let s = Settings::load(None, env(&[("SENDTALK_RELAY__AMQP__EXCHANGE", "x")])).unwrap();
    assert_eq!(s.sink, SinkKind::Amqp);
    assert_eq!(s.dedup.backend(), DedupBackend::Memory);
    let s = Settings::load(
        None,
        env(&[("SENDTALK_RELAY__REDIS__URL", "redis://127.0.0.1:6379")]),
    )
    .unwrap();
    assert_eq!(s.sink, SinkKind::Stdout);
    assert_eq!(s.dedup.backend(), DedupBackend::Redis);
}

#[test]
fn amqp_and_redis_keys_in_a_file_choose_the_real_backends() {
    let dir = std::env::temp_dir().join(format!("cfg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        "[http]\nlisten = \"127.0.0.1:8080\"\n[auth]\nsecrets = [\"a-secret-for-tests\"]\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n",
    )
    .unwrap();
    let s = Settings::load(Some(&file), env(&[])).unwrap();
    assert_eq!(s.dedup.backend(), DedupBackend::Redis);
    // An explicit memory choice in the file, redis keys from the environment.
    std::fs::write(
        &file,
        "sink = \"stdout\"\n[auth]\nsecrets = [\"a-secret-for-tests\"]\n[dedup]\nbackend = \"memory\"\n[amqp]\nexchange = \"ignored\"\n",
    )
    .unwrap();
    let s = Settings::load(
        Some(&file),
        env(&[("SENDTALK_RELAY__REDIS__URL", "redis://127.0.0.1:6379")]),
    )
    .unwrap();
    assert_eq!(s.sink, SinkKind::Stdout);
    assert_eq!(s.dedup.backend(), DedupBackend::Memory);
    assert_eq!(
        s.ignored_keys,
        vec![
            IgnoredKeys {
                because: "sink = \"stdout\"",
                keys: vec!["amqp.exchange".to_string()],
            },
            IgnoredKeys {
                because: "dedup.backend = \"memory\"",
                keys: vec!["redis.url".to_string()],
            },
        ]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_explicit_demo_choice_in_the_environment_is_honoured_and_names_what_it_ignores() {
    let s = Settings::load(
        None,
        env(&[
            ("SENDTALK_RELAY__SINK", "stdout"),
            ("SENDTALK_RELAY__AMQP__URI", "amqp://127.0.0.1:5672/%2f"),
            ("SENDTALK_RELAY__DEDUP__BACKEND", "memory"),
            ("SENDTALK_RELAY__REDIS__URL", "redis://127.0.0.1:6379"),
        ]),
    )
    .unwrap();
    assert_eq!(s.sink, SinkKind::Stdout);
    assert_eq!(s.dedup.backend(), DedupBackend::Memory);
    let named: Vec<_> = s.ignored_keys.iter().flat_map(|i| i.keys.clone()).collect();
    assert_eq!(named, ["amqp.uri", "redis.url"]);
}
