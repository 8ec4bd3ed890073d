//! The spool operations on the admin listener (SPEC 5.1): list, show,
//! retry and drop entries, behind `admin.tokens`. [`SpoolOpError`] is the one
//! mapping from a failure to an HTTP answer.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};

use super::admin::AdminState;
use crate::publish::Sink;
use crate::spool::{Entry, EntryState, Found, PageQuery, Spool, SpoolError, PAGE_MAX};

/// A page's size when the caller does not say.
const DEFAULT_LIMIT: usize = 100;
/// `Retry-After` for 409: the drainer settles an entry within a confirm
/// timeout or so.
const BUSY_RETRY_SECS: u64 = 1;
/// `Retry-After` for 503: the spool's store reopens itself about once a
/// second once the disk answers.
const UNAVAILABLE_RETRY_SECS: u64 = 5;

/// Every way a spool operation can fail, each with exactly one answer.
#[derive(Debug, thiserror::Error)]
pub enum SpoolOpError {
    /// 404 on every `/spool` path: no admin token is configured, so the
    /// operations do not exist.
    #[error("not found")]
    Disabled,
    /// 401.
    #[error("a valid bearer token (admin.tokens) is required")]
    Unauthorized,
    /// 404: the relay runs without a spool.
    #[error("this relay has no spool (spool.enabled = false, or sink = \"stdout\")")]
    NoSpool,
    /// 400: a query parameter is wrong.
    #[error("{message}")]
    InvalidParameter {
        /// The parameter, as the caller spells it.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// 404: no entry with this key.
    #[error("no spool entry with key {0:?}")]
    NotFound(String),
    /// 409: the entry is taken right now.
    #[error("{0}")]
    Busy(&'static str),
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 503: the spool's store is failing; the cause is logged.
    #[error("the spool cannot be read right now: {0}")]
    Unavailable(#[from] SpoolError),
}

impl SpoolOpError {
    fn code(&self) -> &'static str {
        match self {
            SpoolOpError::Disabled | SpoolOpError::NoSpool | SpoolOpError::NotFound(_) => {
                "not_found"
            }
            SpoolOpError::Unauthorized => "unauthorized",
            SpoolOpError::InvalidParameter { .. } => "invalid_parameter",
            SpoolOpError::Busy(_) => "busy",
            SpoolOpError::MethodNotAllowed => "method_not_allowed",
            SpoolOpError::Unavailable(_) => "unavailable",
        }
    }

    fn field(&self) -> &str {
        match self {
            SpoolOpError::InvalidParameter { field, .. } => field,
            SpoolOpError::NotFound(_) => "key",
            _ => "",
        }
    }
}

impl ResponseError for SpoolOpError {
    fn status_code(&self) -> StatusCode {
        match self {
            SpoolOpError::Disabled | SpoolOpError::NoSpool | SpoolOpError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            SpoolOpError::Unauthorized => StatusCode::UNAUTHORIZED,
            SpoolOpError::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            SpoolOpError::Busy(_) => StatusCode::CONFLICT,
            SpoolOpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            SpoolOpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let SpoolOpError::Unavailable(e) = self {
            tracing::error!(error = %e, "spool operation failed");
        }
        let message = match self {
            SpoolOpError::Unavailable(_) => {
                "the spool cannot be read right now; retry later".into()
            }
            other => other.to_string(),
        };
        let mut response = HttpResponse::build(self.status_code());
        match self {
            SpoolOpError::Unauthorized => {
                response
                    .insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            SpoolOpError::Busy(_) => {
                response.insert_header((header::RETRY_AFTER, BUSY_RETRY_SECS));
            }
            SpoolOpError::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, UNAVAILABLE_RETRY_SECS));
            }
            _ => {}
        }
        response.json(serde_json::json!({
            "error": {"code": self.code(), "message": message, "field": self.field()}
        }))
    }
}

/// The spool, once the caller has shown an admin token.
fn authorize<'a>(req: &HttpRequest, state: &'a AdminState) -> Result<&'a Spool, SpoolOpError> {
    if state.tokens.is_empty() {
        return Err(SpoolOpError::Disabled);
    }
    if !super::bearer::authorized(req, &state.tokens) {
        return Err(SpoolOpError::Unauthorized);
    }
    state.spool.as_ref().ok_or(SpoolOpError::NoSpool)
}

/// A path's key: the entry's sequence number. Anything else names no entry.
fn key(raw: &str) -> Result<u64, SpoolOpError> {
    raw.parse()
        .map_err(|_| SpoolOpError::NotFound(raw.to_string()))
}

fn invalid(field: &str, message: impl Into<String>) -> SpoolOpError {
    SpoolOpError::InvalidParameter {
        field: field.into(),
        message: message.into(),
    }
}

/// `state`, `limit` and `after`; any other parameter is refused, so a
/// misspelt filter does not silently list everything.
fn page_query(params: &[(String, String)]) -> Result<PageQuery, SpoolOpError> {
    let mut query = PageQuery {
        state: None,
        after: None,
        limit: DEFAULT_LIMIT,
    };
    for (name, value) in params {
        match name.as_str() {
            "state" => {
                query.state = Some(
                    value
                        .parse::<EntryState>()
                        .map_err(|e| invalid("state", e))?,
                );
            }
            "limit" => {
                query.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=PAGE_MAX).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            "limit",
                            format!("limit must be a whole number from 1 to {PAGE_MAX}"),
                        )
                    })?;
            }
            "after" => {
                query.after = Some(value.parse().map_err(|_| {
                    invalid(
                        "after",
                        "after must be the `next` cursor of a previous page",
                    )
                })?);
            }
            other => {
                return Err(invalid(
                    other,
                    format!("unknown parameter {other:?}: expected state, limit or after"),
                ))
            }
        }
    }
    Ok(query)
}

fn summary(sink: &Sink, entry: &Entry) -> serde_json::Value {
    serde_json::to_value(entry.summary(sink.routing_key(&entry.envelope))).unwrap_or_default()
}

/// `GET /spool`: one page, oldest first, with the spool's counts.
pub async fn list(
    req: HttpRequest,
    state: web::Data<AdminState>,
    params: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse, SpoolOpError> {
    let spool = authorize(&req, &state)?;
    let query = page_query(&params)?;
    let page = spool.page(query).await?;
    let entries: Vec<_> = page
        .entries
        .iter()
        .map(|e| summary(&state.sink, e))
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "depth": spool.depth(),
        "bytes": spool.bytes(),
        "dead": spool.dead(),
        "oldestAgeSecs": spool.oldest_age().as_secs(),
        "entries": entries,
        "next": page.next.map(|k| k.to_string()),
    })))
}

/// `GET /spool/{key}`: the entry with its body and message properties.
pub async fn show(
    req: HttpRequest,
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, SpoolOpError> {
    let spool = authorize(&req, &state)?;
    let key = key(&path)?;
    let entry = spool
        .entry(key)
        .await?
        .ok_or_else(|| SpoolOpError::NotFound(path.to_string()))?;
    let mut body = summary(&state.sink, &entry);
    body["body"] = String::from_utf8_lossy(&entry.envelope.body)
        .into_owned()
        .into();
    body["properties"] = Sink::message_properties(&entry.envelope);
    Ok(HttpResponse::Ok().json(body))
}

/// `POST /spool/{key}/retry`: attempted at once, attempts reset.
pub async fn retry(
    req: HttpRequest,
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, SpoolOpError> {
    let spool = authorize(&req, &state)?;
    match spool.retry(key(&path)?).await? {
        Found::Missing => Err(SpoolOpError::NotFound(path.to_string())),
        Found::Busy(why) => Err(SpoolOpError::Busy(why)),
        Found::Done(entry) => Ok(HttpResponse::Accepted().json(serde_json::json!({
            "key": path.as_str(),
            "id": entry.envelope.verification_id(),
            "state": "waiting",
        }))),
    }
}

/// `DELETE /spool/{key}`: removed, never published.
pub async fn drop_entry(
    req: HttpRequest,
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, SpoolOpError> {
    let spool = authorize(&req, &state)?;
    match spool.drop_entry(key(&path)?).await? {
        Found::Missing => Err(SpoolOpError::NotFound(path.to_string())),
        Found::Busy(why) => Err(SpoolOpError::Busy(why)),
        Found::Done(_) => Ok(HttpResponse::NoContent().finish()),
    }
}

/// Any other method on a `/spool` path; still 404 or 401 first, so the
/// paths' existence is not told to a caller without a token.
pub async fn method_not_allowed(
    req: HttpRequest,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, SpoolOpError> {
    authorize(&req, &state)?;
    Err(SpoolOpError::MethodNotAllowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn a_bad_parameter_is_named() {
        let field = |pairs: &[(&str, &str)]| match page_query(&params(pairs)) {
            Err(SpoolOpError::InvalidParameter { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(&[("limit", "0")]), "limit");
        assert_eq!(field(&[("limit", "1001")]), "limit");
        assert_eq!(field(&[("limit", "ten")]), "limit");
        assert_eq!(field(&[("after", "abc")]), "after");
        assert_eq!(field(&[("state", "stuck")]), "state");
        assert_eq!(field(&[("sate", "dead")]), "sate");
    }

    #[test]
    fn defaults_and_good_values_parse() {
        let q = page_query(&params(&[])).unwrap();
        assert_eq!((q.limit, q.after, q.state), (100, None, None));
        let q = page_query(&params(&[
            ("limit", "1000"),
            ("after", "7"),
            ("state", "dead"),
        ]))
        .unwrap();
        assert_eq!(
            (q.limit, q.after, q.state),
            (1000, Some(7), Some(EntryState::Dead))
        );
    }
}
