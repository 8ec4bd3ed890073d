//! Unit tests of `metrics`.
use super::*;

#[test]
fn every_spec_metric_is_exported_with_the_prefix() {
    let text = Metrics::new().render();
    for name in [
        "sendtalk_relay_webhooks_total{outcome=\"published\"}",
        "sendtalk_relay_webhooks_total{outcome=\"in_flight\"}",
        "sendtalk_relay_request_duration_seconds_bucket",
        "sendtalk_relay_publish_duration_seconds_bucket",
        "sendtalk_relay_spool_depth",
        "sendtalk_relay_spool_bytes",
        "sendtalk_relay_amqp_connected",
        "sendtalk_relay_redis_connected",
        "sendtalk_relay_dedup_skipped_total",
        "sendtalk_relay_dedup_commit_failed_total",
        "sendtalk_relay_unroutable_total",
        "sendtalk_relay_spool_errors_total",
        "sendtalk_relay_build_info{version=",
        "sendtalk_relay_sendtalk_request_duration_seconds_bucket",
        "sendtalk_relay_verifications_expired_total",
        "sendtalk_relay_phone_mismatch_total",
        "sendtalk_relay_stage_duration_seconds_bucket{stage=\"claim\"",
        "sendtalk_relay_stage_duration_seconds_bucket{stage=\"publish\"",
        "sendtalk_relay_stage_duration_seconds_bucket{stage=\"spool\"",
        "sendtalk_relay_stage_duration_seconds_bucket{stage=\"commit\"",
        "sendtalk_relay_stage_duration_seconds_bucket{stage=\"total\"",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}
