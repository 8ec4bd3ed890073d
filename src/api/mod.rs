//! The verification lifecycle API (SPEC 9): steps 2-3 (create a
//! verification through SendTalk) and 7 (read its status) of SendTalk's
//! flow, on a listener of its own, and the lifecycle events (`pending`,
//! `expired`) published beside the webhook's `verified` message.
//!
//! This module owns everything of SPEC 9 except binding the listener
//! (`startup`) and the two hooks the webhook calls ([`Lifecycle::phone_match`]
//! before publishing, [`Lifecycle::record_verified`] once the event is
//! durable):
//! - [`settings`]: the `[api]` and `[sendtalk]` configuration sections.
//! - [`routes`]: the handlers, bearer-token auth, idempotency keys and
//!   [`routes::ApiError`], the one mapping from a failure to an answer.
//! - [`sendtalk`]: the SendTalk client and the reading of its envelope.
//! - [`store`]: verification records, the expiry index and idempotency keys
//!   (Redis or memory).
//! - [`expiry`]: the sweeper that publishes one `expired` event per
//!   verification that passes its expiry unverified.
//! - [`openapi`]: the OpenAPI 3.1 document served at `/openapi.json`.

pub mod expiry;
pub mod openapi;
pub mod routes;
pub mod sendtalk;
pub mod settings;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use secrecy::SecretString;

use crate::durable::{make_durable, Durable, NotDurable};
use crate::message::{DedupMark, Envelope};
use crate::metrics::Metrics;
use crate::publish::Sink;
use crate::spool::Spool;
use sendtalk::SendTalkClient;
use store::{Record, Status, Store};

/// Everything the API, the sweeper and the webhook's hooks share; built once
/// by `startup`.
pub struct Lifecycle {
    /// Records, the expiry index and idempotency keys; shared with the
    /// sweeper, so a status written by one is read by the other.
    pub store: Store,
    /// Calls SendTalk's create API; the only holder of the API key.
    pub sendtalk: SendTalkClient,
    /// `api.tokens` + `api.token_files`: every one is accepted (rotation).
    pub tokens: Vec<SecretString>,
    /// The same sink and spool as the webhook: the same guarantees.
    pub sink: Arc<Sink>,
    /// `None` when `spool.enabled` is off or the sink is not AMQP: an event
    /// the broker cannot take then fails instead of being queued.
    pub spool: Option<Spool>,
    /// The process's registry handles (the API's counters live beside the
    /// webhook's).
    pub metrics: Metrics,
    /// `sendtalk.default_language`, for a create request without `languageCode`.
    pub default_language: String,
    /// `sendtalk.default_expiry_minutes`, for a create request without
    /// `expiryMinutes`.
    pub default_expiry_minutes: u32,
    /// How long one replica holds the expiry of one verification while it
    /// publishes the `expired` event (`dedup.lease_secs`: the same worst
    /// case of a publish).
    pub expiry_lease: Duration,
    /// `api.expiry_check_secs`.
    pub expiry_check: Duration,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("store", &self.store)
            .field("sendtalk", &self.sendtalk)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// Publishes a lifecycle event (`pending` or `expired`) with the
    /// webhook's confirm-or-spool guarantee (SPEC 9.3).
    pub async fn publish_event(
        &self,
        record: &Record,
        status: Status,
        request_id: &str,
    ) -> Result<Durable, NotDurable> {
        let body = serde_json::json!({
            "id": record.id,
            "userPhone": record.user_phone,
            "status": status.as_str(),
            "createdAt": record.created_at_ms.map(rfc3339),
            "expiresAt": record.expires_at_ms.map(rfc3339),
        });
        let envelope = Envelope {
            body: Bytes::from(body.to_string()),
            message_id: format!("{}:{}", record.id, status.as_str()),
            status: status.as_str().to_string(),
            request_id: request_id.to_string(),
            received_at_ms: store::now_ms(),
            dedup: DedupMark::Omitted,
            verification_id: Some(record.id.clone()),
            phone_match: None,
        };
        make_durable(&self.sink, self.spool.as_ref(), &envelope, None).await
    }

    /// For the webhook, before it publishes: whether `user_phone` is the
    /// phone the verification was created for; `None` for an id not created
    /// through the API, or when the store cannot tell right now (the
    /// webhook is relayed regardless; the header is then left out).
    pub async fn phone_match(&self, id: &str, user_phone: &str) -> Option<bool> {
        let created_for = match self.store.created_phone(id).await {
            Ok(phone) => phone?,
            Err(e) => {
                tracing::warn!(verification_id = id, error = %e, "could not read the verification record; x-phone-match left out");
                return None;
            }
        };
        let created_for = created_for.as_str();
        let matched = created_for == user_phone;
        if !matched {
            self.metrics.phone_mismatch.inc();
            tracing::warn!(
                verification_id = id,
                created_for = crate::telemetry::mask_phone(created_for),
                verified_by = crate::telemetry::mask_phone(user_phone),
                "webhook phone differs from the phone the verification was created for; relayed with x-phone-match: false"
            );
        }
        Some(matched)
    }

    /// For the webhook, once its event is durable: the record turns
    /// `verified`. A failure only makes the status look-up lag; it is logged.
    pub async fn record_verified(&self, id: &str, user_phone: &str, verified_time_ms: u64) {
        if let Err(e) = self
            .store
            .mark_verified(id, user_phone, verified_time_ms)
            .await
        {
            tracing::warn!(verification_id = id, error = %e, "could not mark the verification record verified");
        }
    }
}

pub use crate::message::rfc3339;
