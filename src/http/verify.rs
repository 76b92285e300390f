//! `ANY /v1/verify[/{tail}]`: the gateway check on every request.

use std::time::Instant;

use actix_web::http::header::{CACHE_CONTROL, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::extract::BearerToken;
use crate::error::ApiError;
use crate::metrics::VerifyOutcome;
use crate::session::Reauth;

pub const X_SESSION_USER: HeaderName = HeaderName::from_static("x-session-user");
pub const X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
pub const X_SESSION_DEVICE: HeaderName = HeaderName::from_static("x-session-device");
/// A route's password-age demand sent as a header (tighten-only), for
/// gateways that cannot add a query parameter (Envoy `ext_authz`).
pub const MAX_AGE_HEADER: HeaderName = HeaderName::from_static("x-sessiongate-max-age");

/// `?max_age=`: an optional query parameter. (Without `parameter_in`,
/// utoipa's actix integration declares a handler-less `IntoParams` a
/// required *path* parameter.)
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VerifyQuery {
    /// Demand a password check at most this many seconds old for this route
    /// (it can only tighten `reauth_after`).
    pub max_age: Option<u64>,
}

/// Verify a user's token: signature in-process, then the session in Redis.
#[utoipa::path(
    method(get, head, post, put, patch, delete, options),
    path = "/v1/verify",
    tag = "verify",
    params(
        VerifyQuery,
        ("X-Sessiongate-Max-Age" = Option<u64>, Header, description = "the same demand as max_age, as a header; the smaller wins"),
    ),
    security(("session_token" = [])),
    description = "Any method is accepted, and `/v1/verify/{tail}` behaves the same \
        (for gateways that append the original path). The token comes from \
        `Authorization: Bearer`, else from the configured cookie.",
    responses(
        (status = 200, description = "The session is alive",
            headers(
                ("X-Session-User" = String, description = "user id"),
                ("X-Session-Id" = String, description = "session id"),
                ("X-Session-Device" = String, description = "device id"),
            )),
        (status = 400, description = "Bad max_age", body = crate::error::ErrorBody),
        (status = 401, description = "invalid_token or insufficient_user_authentication", body = crate::error::ErrorBody),
        (status = 403, description = "forbidden: a cookie-carried token on a cross-site unsafe request", body = crate::error::ErrorBody),
        (status = 503, description = "store_unavailable", body = crate::error::ErrorBody),
    )
)]
pub async fn verify(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    checked(&req, &state, true).await
}

/// `/v1/verify/{tail}`: the query string there is the original request's
/// (the app's): a `max_age` in it still tightens, a malformed one is
/// ignored; a gateway can also send `X-Sessiongate-Max-Age`.
pub async fn verify_tail(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    checked(&req, &state, false).await
}

async fn checked(
    req: &HttpRequest,
    state: &AppState,
    use_query: bool,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let result = verify_inner(req, state, use_query).await;
    let outcome = match &result {
        Ok(_) => VerifyOutcome::Ok,
        Err(ApiError::InvalidToken) => VerifyOutcome::InvalidToken,
        Err(ApiError::InsufficientAuth { .. }) => VerifyOutcome::InsufficientAuth,
        Err(ApiError::StoreUnavailable) => VerifyOutcome::StoreUnavailable,
        Err(ApiError::CrossSite) => VerifyOutcome::Forbidden,
        Err(_) => VerifyOutcome::BadRequest,
    };
    state
        .metrics
        .verify(outcome, started.elapsed().as_secs_f64());
    result
}

async fn verify_inner(
    req: &HttpRequest,
    state: &AppState,
    use_query: bool,
) -> Result<HttpResponse, ApiError> {
    let from_query = if use_query {
        max_age(req.query_string())?
    } else {
        // The tail form's query is the original request's: a max_age there
        // still tightens (the contract allows it on both forms), but an
        // unparseable one is the app's business and is ignored, not a 400.
        max_age(req.query_string()).ok().flatten()
    };
    let from_header = match req.headers().get(MAX_AGE_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::InvalidRequest(
                        "X-Sessiongate-Max-Age must be a whole number of seconds".into(),
                    )
                })?,
        ),
    };
    // Each can only tighten the policy: the smallest wins.
    let max_age = match (from_query, from_header) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let BearerToken(token) = BearerToken::from_request_parts(req)?;
    // Where the request came from: worked out only when the touch is due.
    let (peer, headers, origin) = (req.peer_addr(), req.headers(), &state.origin);
    let seen = move || origin.seen_of(peer, headers);
    let active = state
        .service
        .verify_from(&token, Reauth::Enforce { max_age }, false, Some(&seen))
        .await
        .map_err(ApiError::from)?;
    let [user, session, device] = active.token.identity_headers.clone();
    Ok(HttpResponse::Ok()
        .insert_header((X_SESSION_USER, user))
        .insert_header((X_SESSION_ID, session))
        .insert_header((X_SESSION_DEVICE, device))
        .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .finish())
}

/// The same check, for gateways that append the original path (Envoy
/// `ext_authz` with `path_prefix: /v1/verify`). Served by [`verify`].
#[utoipa::path(
    method(get, head, post, put, patch, delete, options),
    path = "/v1/verify/{tail}",
    operation_id = "verify_tail",
    tag = "verify",
    params(
        ("tail" = String, Path, description = "the original request path (ignored)"),
        VerifyQuery,
        ("X-Sessiongate-Max-Age" = Option<u64>, Header, description = "password age demanded for this route, in seconds; the smaller of it and max_age wins (a malformed max_age in this form's query is ignored)"),
    ),
    security(("session_token" = [])),
    responses(
        (status = 200, description = "The session is alive (same headers as /v1/verify)"),
        (status = 400, body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody),
    )
)]
#[allow(dead_code)]
fn verify_tail_doc() {}

/// Reads `max_age` from the query string, ignoring every other parameter
/// (gateways may forward the original request's query).
fn max_age(query: &str) -> Result<Option<u64>, ApiError> {
    // Cheap pre-check; "max" also catches a percent-encoded "max%5Fage".
    if !query.contains("max") {
        return Ok(None);
    }
    let parsed: VerifyQuery = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .map_err(|_| ApiError::InvalidRequest("malformed query string".into()))
        .and_then(|pairs| {
            let mut max_age = None;
            for (k, v) in pairs {
                if k == "max_age" {
                    if max_age.is_some() {
                        return Err(ApiError::InvalidRequest("max_age given twice".into()));
                    }
                    max_age = Some(v.parse::<u64>().map_err(|_| {
                        ApiError::InvalidRequest("max_age must be a whole number of seconds".into())
                    })?);
                }
            }
            Ok(VerifyQuery { max_age })
        })?;
    Ok(parsed.max_age)
}

#[cfg(test)]
mod tests {
    use super::max_age;

    #[test]
    fn max_age_is_read_alone_and_strictly() {
        assert_eq!(max_age("").unwrap(), None);
        assert_eq!(max_age("page=2&x=y").unwrap(), None);
        assert_eq!(max_age("max_age=300").unwrap(), Some(300));
        assert_eq!(max_age("a=1&max_age=0").unwrap(), Some(0));
        assert!(max_age("max_age=-1").is_err());
        assert!(max_age("max_age=abc").is_err());
        assert!(max_age("max_age=1&max_age=2").is_err());
    }
}
