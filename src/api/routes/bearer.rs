//! The lifecycle API's bearer tokens (`api.tokens`, `api.token_files`):
//! `Authorization: Bearer <token>` checked against every configured one.

use actix_web::http::header;
use actix_web::HttpRequest;
use secrecy::ExposeSecret as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::ApiError;
use crate::api::Lifecycle;

/// Checks `Authorization: Bearer <token>` against every configured token.
/// Each comparison is constant-time over SHA-256 digests, so neither the
/// content nor the length of a token leaks, and every token is compared.
pub(super) fn authorize(req: &HttpRequest, api: &Lifecycle) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    let presented = Sha256::digest(presented.as_bytes());
    let mut ok = subtle::Choice::from(0u8);
    for token in &api.tokens {
        let expected = Sha256::digest(token.expose_secret().as_bytes());
        ok |= expected.as_slice().ct_eq(presented.as_slice());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}
