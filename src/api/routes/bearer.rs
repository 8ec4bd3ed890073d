//! The lifecycle API's bearer tokens (`api.tokens`, `api.token_files`).

use actix_web::HttpRequest;

use super::ApiError;
use crate::api::Lifecycle;

/// Checks `Authorization: Bearer <token>` against every configured token.
pub(super) fn authorize(req: &HttpRequest, api: &Lifecycle) -> Result<(), ApiError> {
    if crate::routes::bearer::authorized(req, &api.tokens) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}
