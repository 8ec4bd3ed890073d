//! What the webhook reads off the HTTP request before the pipeline: the
//! body (bounded in size and time), the request id, the headers as the pure
//! `auth` module sees them, and the rate-limited header-name diagnostic.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;

use super::RelayError;

/// A sender that trickles its body is cut off after this long; SendTalk
/// sends ~150 bytes at once.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// First allocation for a body; SendTalk's events are ~150 bytes.
const INITIAL_BODY_CAPACITY: usize = 1024;
/// At most one header-name diagnostic per this many seconds (SPEC 2.1).
const UNKNOWN_SCHEME_LOG_EVERY_SECS: i64 = 60;
/// Longest `X-Request-Id` taken from the caller; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// `auth` reads headers through this; it knows nothing of actix.
impl crate::auth::Headers for header::HeaderMap {
    fn get(&self, name: &str) -> Option<&[u8]> {
        header::HeaderMap::get(self, name).map(HeaderValue::as_bytes)
    }
}

/// Every answer carries the request id the log line and the message carry.
pub(crate) fn with_request_id(mut response: HttpResponse, request_id: &str) -> HttpResponse {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), value);
    }
    response
}

/// Reads the body, refusing it as soon as it is known to exceed `max`.
pub(super) fn read_body(
    mut payload: web::Payload,
    content_length: Option<&HeaderValue>,
    max: usize,
) -> impl std::future::Future<Output = Result<Bytes, RelayError>> {
    let declared = content_length
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    async move {
        if declared.is_some_and(|len| len > max as u64) {
            return Err(RelayError::PayloadTooLarge(max));
        }
        let read = async {
            // Sized for a typical event, not from Content-Length: a declared
            // length is only a claim until the bytes arrive.
            let mut buffer = BytesMut::with_capacity(INITIAL_BODY_CAPACITY.min(max));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| RelayError::BodyRead(e.to_string()))?;
                if buffer.len() + chunk.len() > max {
                    return Err(RelayError::PayloadTooLarge(max));
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(buffer.freeze())
        };
        tokio::time::timeout(BODY_READ_TIMEOUT, read)
            .await
            .unwrap_or(Err(RelayError::BodyTimeout))
    }
}

/// Takes the caller's `X-Request-Id` when it is short and printable,
/// otherwise makes a new one (the lifecycle API takes it the same way).
pub(crate) fn request_id(req: &HttpRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.bytes().all(|b| (0x21..=0x7e).contains(&b))
        })
        .map_or_else(|| crate::ids::random_uuid().to_string(), String::from)
}

/// Logs the header names (never values) of a request refused with
/// `missing_signature`, at most once a minute, so that an operator can see
/// how the provider really sends its secret (SPEC 2.1).
#[derive(Debug, Default)]
pub struct UnknownSchemeLog {
    /// Unix seconds of the last line; 0 before the first.
    last_secs: std::sync::atomic::AtomicI64,
}

impl UnknownSchemeLog {
    pub(super) fn headers_seen(&self, headers: &header::HeaderMap, now_secs: i64) {
        use std::sync::atomic::Ordering;
        let last = self.last_secs.load(Ordering::Acquire);
        if last != 0 && now_secs - last < UNKNOWN_SCHEME_LOG_EVERY_SECS {
            return;
        }
        if self
            .last_secs
            .compare_exchange(last, now_secs, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let mut names: Vec<&str> = headers.keys().map(header::HeaderName::as_str).collect();
        names.sort_unstable();
        names.dedup();
        tracing::warn!(
            header_names = names.join(","),
            "webhook refused with missing_signature; these are the headers it carried (names only, at most once a minute)"
        );
    }
}
