//! The OpenAPI 3.1 document (SPEC 9.4), generated with utoipa from the
//! handlers' annotations, so that it cannot drift from them. The webhook
//! endpoint of SPEC 2 is described here too; its path follows
//! `http.webhook_path`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes::{CreateBodyDoc, CreatedBody, ErrorBody, ErrorDetail, StatusBody};

/// The path the webhook is documented under before `http.webhook_path` is
/// substituted.
const WEBHOOK_DOC_PATH: &str = "/webhooks/sendtalk/verification";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sendtalk-relay",
        description = "SendTalk WhatsApp Verification relay: the lifecycle API (on api.listen) and the webhook endpoint (on http.listen)."
    ),
    paths(super::routes::create, super::routes::status, webhook),
    components(schemas(CreateBodyDoc, CreatedBody, StatusBody, ErrorBody, ErrorDetail, WebhookBody, WebhookAnswer)),
    modifiers(&BearerAuth),
    tags((name = "verifications", description = "SPEC 9"), (name = "webhook", description = "SPEC 2"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// SendTalk's webhook body (unknown extra fields are allowed and kept).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct WebhookBody {
    #[schema(example = "fc0977f2-baa9-476d-8a3d-128c622d5ff6")]
    id: String,
    #[schema(rename = "userPhone", example = "628124630350")]
    user_phone: String,
    #[schema(example = "verified")]
    status: String,
    /// Unix milliseconds.
    #[schema(rename = "verifiedTime", example = 1_692_847_205_385_u64)]
    verified_time: u64,
}

/// A webhook's 2xx answer.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct WebhookAnswer {
    /// `published`, `queued` or `duplicate`.
    result: String,
    id: String,
}

/// SendTalk's webhook (SPEC 2), on the public listener.
#[utoipa::path(
    post,
    path = "/webhooks/sendtalk/verification",
    tag = "webhook",
    request_body(content = WebhookBody, content_type = "application/json"),
    responses(
        (status = 200, description = "published (confirmed by the broker) or duplicate", body = WebhookAnswer),
        (status = 202, description = "queued: spooled durably, published later", body = WebhookAnswer),
        (status = 400, description = "invalid_json / invalid_payload", body = ErrorBody),
        (status = 401, description = "missing_signature / invalid_signature / stale_timestamp", body = ErrorBody),
        (status = 409, description = "in_flight", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 422, description = "unsupported_status / stale_event", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn webhook() {}

/// The document as JSON, with the configured webhook path.
pub fn document(webhook_path: &str) -> String {
    let mut doc = ApiDoc::openapi();
    if webhook_path != WEBHOOK_DOC_PATH {
        if let Some(item) = doc.paths.paths.remove(WEBHOOK_DOC_PATH) {
            doc.paths.paths.insert(webhook_path.to_string(), item);
        }
    }
    doc.to_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"could not render the document: {e}\"}}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&super::document("/hook")).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in ["/v1/verifications", "/v1/verifications/{id}", "/hook"] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
    }
}
