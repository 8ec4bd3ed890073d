//! `Authorization: Bearer <token>` against a set of configured tokens, for
//! the lifecycle API (`api.tokens`) and the spool operations
//! (`admin.tokens`).

use actix_web::http::header;
use actix_web::HttpRequest;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// True when the request's bearer token is one of `tokens`. Each comparison
/// is constant-time over SHA-256 digests, so neither the content nor the
/// length of a token leaks, and every token is compared (rotation: any of
/// them may match).
pub fn authorized(req: &HttpRequest, tokens: &[SecretString]) -> bool {
    let Some(presented) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
    else {
        return false;
    };
    let presented = Sha256::digest(presented.as_bytes());
    let mut ok = subtle::Choice::from(0u8);
    for token in tokens {
        let expected = Sha256::digest(token.expose_secret().as_bytes());
        ok |= expected.as_slice().ct_eq(presented.as_slice());
    }
    bool::from(ok)
}
