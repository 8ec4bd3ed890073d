//! Every metric the relay exports (SPEC 6), in one registry per app instance
//! so that several instances in one test process do not share counters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Metric name prefix, fixed by the spec.
const NAMESPACE: &str = "sendtalk_relay";

/// Latency buckets from 1 ms to 10 s: a confirmed publish takes a few ms, a
/// confirm timeout up to `amqp.confirm_timeout_ms`.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Stage buckets start at 100 µs: a claim or a commit is one Redis round
/// trip of a few hundred µs, which the request buckets cannot tell apart.
const STAGE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How one webhook ended; the `outcome` label of `webhooks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 200 after the broker confirmed the event.
    Published,
    /// Answered 202 after the event was fsynced in the spool.
    Queued,
    /// Answered 200 `dropped`: the broker returned the event as unroutable
    /// and `amqp.on_unroutable = "drop"` lets it go.
    Dropped,
    /// Answered 200 without publishing: the id was already committed.
    Duplicate,
    /// Answered 409: another request holds the id's claim.
    InFlight,
    /// Answered 401: a missing or wrong signature, or a stale timestamp.
    RejectedAuth,
    /// Answered another 4xx: the request's media type, size, body, JSON or
    /// fields, or its path or method.
    RejectedPayload,
    /// Answered 503: the dedup store was down with `on_unavailable =
    /// "reject"`, or the event could be neither published nor spooled.
    Unavailable,
}

impl Outcome {
    /// Every outcome, so that each series exists (at zero) from start-up.
    pub const ALL: [Outcome; 8] = [
        Outcome::Published,
        Outcome::Queued,
        Outcome::Dropped,
        Outcome::Duplicate,
        Outcome::InFlight,
        Outcome::RejectedAuth,
        Outcome::RejectedPayload,
        Outcome::Unavailable,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Queued => "queued",
            Outcome::Dropped => "dropped",
            Outcome::Duplicate => "duplicate",
            Outcome::InFlight => "in_flight",
            Outcome::RejectedAuth => "rejected_auth",
            Outcome::RejectedPayload => "rejected_payload",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// One step of the webhook pipeline; the `stage` label of
/// `stage_duration_seconds`. Each is observed in exactly one place of
/// `routes/webhook.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The dedup claim (one Redis round trip, or the memory store).
    Claim,
    /// The publish up to its confirm (or failure), as the pipeline waits on it.
    Publish,
    /// The spool append after a failed publish, fsync included.
    Spool,
    /// The dedup commit after the event was made durable.
    Commit,
    /// The whole pipeline after the body was read, up to the answer.
    Total,
}

impl Stage {
    /// Every stage, in the order of their histograms (`Stage as usize`).
    pub const ALL: [Stage; 5] = [
        Stage::Claim,
        Stage::Publish,
        Stage::Spool,
        Stage::Commit,
        Stage::Total,
    ];

    /// The `stage` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Claim => "claim",
            Stage::Publish => "publish",
            Stage::Spool => "spool",
            Stage::Commit => "commit",
            Stage::Total => "total",
        }
    }
}

/// The children of `stage_duration_seconds`, resolved once and indexed by
/// `Stage as usize` (the order of [`Stage::ALL`]): the hot path observes
/// without a label look-up.
#[derive(Clone)]
struct StageHistograms([Histogram; 5]);

/// The relay's metrics; cloned handles share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    webhooks: IntCounterVec,
    /// `request_duration_seconds`: the webhook route, once per answer.
    pub request_duration: Histogram,
    /// `publish_duration_seconds`: the publisher, once per publish attempt.
    pub publish_duration: Histogram,
    /// `spool_depth`: the spool, through [`Metrics::spool`].
    pub spool_depth: IntGauge,
    /// `spool_bytes`: the spool, through [`Metrics::spool`].
    pub spool_bytes: IntGauge,
    /// `amqp_connected`: the publisher, through [`Metrics::publisher`].
    pub amqp_connected: IntGauge,
    /// `redis_connected`: the Redis health probe started by `startup`.
    pub redis_connected: IntGauge,
    /// `dedup_skipped_total`: the webhook, when it publishes without a claim
    /// because the dedup store is down.
    pub dedup_skipped: IntCounter,
    /// `dedup_commit_failed_total`: the webhook, when a durable event's
    /// commit fails (a redelivery may then be published twice).
    pub dedup_commit_failed: IntCounter,
    /// `unroutable_total`: the publisher, when the broker returns an event.
    pub unroutable: IntCounter,
    /// `spool_errors_total`: the spool, through [`Metrics::spool`].
    pub spool_errors: IntCounter,
    /// `spool_dead`: the spool, through [`Metrics::spool`].
    pub spool_dead: IntGauge,
    /// `spool_dead_total`: the spool, through [`Metrics::spool`].
    pub spool_dead_total: IntCounter,
    /// `spool_oldest_age_seconds`: the spool, through [`Metrics::spool`].
    pub spool_oldest_age: IntGauge,
    /// `rate_limited_total`: the webhook route, when it refuses a request
    /// before reading its body (such a request is not in `webhooks_total`).
    pub rate_limited: IntCounter,
    // Lifecycle API (SPEC 9).
    api_requests: IntCounterVec,
    /// `sendtalk_requests_total`: the SendTalk client, through
    /// [`Metrics::sendtalk`].
    pub sendtalk_requests: IntCounterVec,
    /// `sendtalk_request_duration_seconds`: the SendTalk client, through
    /// [`Metrics::sendtalk`].
    pub sendtalk_duration: Histogram,
    /// `verifications_expired_total`: the expiry sweeper, once per published
    /// `expired` event.
    pub verifications_expired: IntCounter,
    /// `phone_mismatch_total`: the webhook's phone check.
    pub phone_mismatch: IntCounter,
    stage_duration: HistogramVec,
    stages: StageHistograms,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A fresh registry with every series registered, the labelled ones at
    /// zero, and `build_info` set.
    ///
    /// # Panics
    ///
    /// Never in practice: the definitions are static and their names unique;
    /// the `expect`s only catch a programming error in this function.
    pub fn new() -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE);
        let hist = |name: &str, help: &str| {
            HistogramOpts::new(name, help)
                .namespace(NAMESPACE)
                .buckets(LATENCY_BUCKETS.to_vec())
        };
        let webhooks = IntCounterVec::new(
            opts("webhooks_total", "Webhooks handled, by outcome."),
            &["outcome"],
        )
        .expect("static metric definition is valid");
        for outcome in Outcome::ALL {
            // Pre-create every series so dashboards see zeros, not gaps.
            webhooks.with_label_values(&[outcome.as_str()]);
        }
        let request_duration = Histogram::with_opts(hist(
            "request_duration_seconds",
            "Time from receiving a webhook to answering it.",
        ))
        .expect("static metric definition is valid");
        let publish_duration = Histogram::with_opts(hist(
            "publish_duration_seconds",
            "Time from publishing to the broker's confirm (or failure).",
        ))
        .expect("static metric definition is valid");
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "stage_duration_seconds",
                "Time one webhook spends in each pipeline stage (claim, publish, spool, commit, total).",
            )
            .namespace(NAMESPACE)
            .buckets(STAGE_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("static metric definition is valid");
        let stages = StageHistograms(
            Stage::ALL.map(|stage| stage_duration.with_label_values(&[stage.as_str()])),
        );
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(opts(name, help)).expect("static metric definition is valid")
        };
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(opts(name, help)).expect("static metric definition is valid")
        };
        let build_info = IntGaugeVec::new(
            opts("build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let api_requests = IntCounterVec::new(
            opts(
                "api_requests_total",
                "Lifecycle API requests, by endpoint (create, status) and outcome (created, replayed, ok or the error code).",
            ),
            &["endpoint", "outcome"],
        )
        .expect("static metric definition is valid");
        let sendtalk_requests = IntCounterVec::new(
            opts(
                "sendtalk_requests_total",
                "Calls to SendTalk's create API, by outcome.",
            ),
            &["outcome"],
        )
        .expect("static metric definition is valid");
        for (endpoint, outcome) in [("create", "created"), ("status", "ok")] {
            api_requests.with_label_values(&[endpoint, outcome]);
        }
        sendtalk_requests.with_label_values(&["created"]);
        let sendtalk_duration = Histogram::with_opts(hist(
            "sendtalk_request_duration_seconds",
            "Time of one call to SendTalk's create API.",
        ))
        .expect("static metric definition is valid");

        let metrics = Self {
            webhooks,
            request_duration,
            publish_duration,
            spool_depth: gauge("spool_depth", "Events waiting in the on-disk spool."),
            spool_bytes: gauge(
                "spool_bytes",
                "Bytes of events waiting in the on-disk spool.",
            ),
            amqp_connected: gauge(
                "amqp_connected",
                "Whether a confirmed channel to the broker is open (1) or not (0).",
            ),
            redis_connected: gauge(
                "redis_connected",
                "Whether the Redis dedup store answers (1) or not (0); 0 with the memory backend.",
            ),
            dedup_skipped: counter(
                "dedup_skipped_total",
                "Events published without a dedup check because the dedup store was unavailable.",
            ),
            dedup_commit_failed: counter(
                "dedup_commit_failed_total",
                "Events made durable whose dedup commit then failed.",
            ),
            unroutable: counter(
                "unroutable_total",
                "Events the broker returned as unroutable.",
            ),
            spool_errors: counter(
                "spool_errors_total",
                "Spool appends and removals refused by a storage error (disk full, read-only, EIO).",
            ),
            spool_dead: gauge(
                "spool_dead",
                "Spooled events no longer retried by themselves (refused spool.max_attempts times or older than spool.max_age_secs); they wait for an operator.",
            ),
            spool_dead_total: counter(
                "spool_dead_total",
                "Spooled events that became dead.",
            ),
            spool_oldest_age: gauge(
                "spool_oldest_age_seconds",
                "Age of the oldest event in the spool (0 when empty).",
            ),
            rate_limited: counter(
                "rate_limited_total",
                "Requests refused with 429 by the per-client rate limit (not in webhooks_total).",
            ),
            api_requests,
            sendtalk_requests,
            sendtalk_duration,
            verifications_expired: counter(
                "verifications_expired_total",
                "Pending verifications whose expired event this replica published.",
            ),
            phone_mismatch: counter(
                "phone_mismatch_total",
                "Webhooks whose userPhone differs from the phone the verification was created for.",
            ),
            stage_duration,
            stages,
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.webhooks.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.publish_duration.clone()),
            Box::new(metrics.spool_depth.clone()),
            Box::new(metrics.spool_bytes.clone()),
            Box::new(metrics.amqp_connected.clone()),
            Box::new(metrics.redis_connected.clone()),
            Box::new(metrics.dedup_skipped.clone()),
            Box::new(metrics.dedup_commit_failed.clone()),
            Box::new(metrics.unroutable.clone()),
            Box::new(metrics.spool_errors.clone()),
            Box::new(metrics.spool_dead.clone()),
            Box::new(metrics.spool_dead_total.clone()),
            Box::new(metrics.spool_oldest_age.clone()),
            Box::new(metrics.rate_limited.clone()),
            Box::new(metrics.api_requests.clone()),
            Box::new(metrics.sendtalk_requests.clone()),
            Box::new(metrics.sendtalk_duration.clone()),
            Box::new(metrics.verifications_expired.clone()),
            Box::new(metrics.phone_mismatch.clone()),
            Box::new(metrics.stage_duration.clone()),
            Box::new(build_info),
        ];
        for c in collectors {
            metrics
                .registry
                .register(c)
                .expect("metric names are unique");
        }
        metrics
    }

    /// The handles the publisher writes.
    pub fn publisher(&self) -> crate::publish::PublisherMetrics {
        crate::publish::PublisherMetrics {
            connected: self.amqp_connected.clone(),
            unroutable: self.unroutable.clone(),
            publish_duration: self.publish_duration.clone(),
        }
    }

    /// The handles the spool writes.
    pub fn spool(&self) -> crate::spool::SpoolMetrics {
        crate::spool::SpoolMetrics {
            depth: self.spool_depth.clone(),
            bytes: self.spool_bytes.clone(),
            errors: self.spool_errors.clone(),
            dead: self.spool_dead.clone(),
            dead_total: self.spool_dead_total.clone(),
            oldest_age: self.spool_oldest_age.clone(),
        }
    }

    /// The handles the SendTalk client writes.
    pub fn sendtalk(&self) -> crate::api::sendtalk::SendTalkMetrics {
        crate::api::sendtalk::SendTalkMetrics {
            requests: self.sendtalk_requests.clone(),
            duration: self.sendtalk_duration.clone(),
        }
    }

    /// Counts one lifecycle API request.
    pub fn api_request(&self, endpoint: &str, outcome: &str) {
        self.api_requests
            .with_label_values(&[endpoint, outcome])
            .inc();
    }

    /// Records `elapsed` for one webhook in `stage`.
    pub fn stage(&self, stage: Stage, elapsed: std::time::Duration) {
        self.stages.0[stage as usize].observe(elapsed.as_secs_f64());
    }

    /// Counts one answered webhook.
    pub fn webhook(&self, outcome: Outcome) {
        self.webhooks.with_label_values(&[outcome.as_str()]).inc();
    }

    /// How many webhooks ended with `outcome` so far, for tests that would
    /// rather not parse the exposition.
    pub fn webhook_count(&self, outcome: Outcome) -> u64 {
        self.webhooks.with_label_values(&[outcome.as_str()]).get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
