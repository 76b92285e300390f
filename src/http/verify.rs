//! `ANY /v1/verify[/{tail}]`: the gateway check on every request.

use std::time::Instant;

use actix_web::http::header::{CACHE_CONTROL, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::extract::{BearerToken, TokenSource};
use crate::error::ApiError;
use crate::metrics::VerifyOutcome;
use crate::session::{ActiveSession, Reauth};

pub const X_SESSION_USER: HeaderName = HeaderName::from_static("x-session-user");
pub const X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
pub const X_SESSION_DEVICE: HeaderName = HeaderName::from_static("x-session-device");
/// The signed identity (`upstream_assertion`), see `crate::assertion`.
pub const X_SESSION_ASSERTION: HeaderName = HeaderName::from_static("x-session-assertion");
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
                ("X-Session-Assertion" = String, description = "with upstream_assertion on: a signed JWT (EdDSA, keys at /.well-known/jwks.json) of the identity for the upstream"),
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
    let result = match http_max_age(req, use_query) {
        Ok(max_age) => {
            // Where the request came from: worked out only when the touch is due.
            let (peer, headers, origin) = (req.peer_addr(), req.headers(), &state.origin);
            let seen = move || origin.seen_of(peer, headers);
            decide(state, req, max_age, Some(&seen)).await
        }
        Err(e) => Err(e),
    };
    record(state, started, &result);
    let decision = result?;
    let [user, session, device] = decision.active.token.identity_headers.clone();
    let mut answer = HttpResponse::Ok();
    answer
        .insert_header((X_SESSION_USER, user))
        .insert_header((X_SESSION_ID, session))
        .insert_header((X_SESSION_DEVICE, device))
        .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")));
    if let Some(assertion) = decision.assertion {
        answer.insert_header((X_SESSION_ASSERTION, assertion));
    }
    Ok(answer.finish())
}

/// A session confirmed alive, and what the gateway passes on.
pub struct Decision {
    pub active: ActiveSession,
    /// `X-Session-Assertion`, when `upstream_assertion` is on.
    pub assertion: Option<HeaderValue>,
}

/// Counts a check's outcome and duration (`sessiongate_verify_*`), for
/// either form.
pub fn record<T>(state: &AppState, started: Instant, result: &Result<T, ApiError>) {
    let outcome = match result {
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
}

/// The gateway check's decision, the same for `/v1/verify` and for Envoy's
/// gRPC `Check` (`crate::grpc`): the token from `source` (header, else the
/// cookie under the CSRF rule), then one Redis round trip, with `reauth_after`
/// tightened by the route's `max_age`. `seen` tells where the request came
/// from, recorded when the throttled touch is due.
pub async fn decide(
    state: &AppState,
    source: &(impl TokenSource + ?Sized),
    max_age: Option<u64>,
    seen: Option<&(dyn Fn() -> crate::whereabouts::Seen + Sync)>,
) -> Result<Decision, ApiError> {
    let BearerToken(token) = BearerToken::from_source(source, &state.cookie_name, &state.origin)?;
    // The assertion needs the session's auth_time: the record comes back
    // in the same round trip.
    let active = state
        .service
        .verify_from(
            &token,
            Reauth::Enforce { max_age },
            state.assertions.is_some(),
            seen,
        )
        .await
        .map_err(ApiError::from)?;
    let assertion = match (&state.assertions, &active.record) {
        (Some(assertions), Some(record)) => {
            let global = state.service.signing_state().map_err(ApiError::from)?;
            Some(assertions.header_for(
                global.ring.asym(),
                &active,
                record.auth_time_ms,
                crate::session::now_ms(),
            ))
        }
        (Some(_), None) => {
            return Err(ApiError::from(crate::session::ServiceError::Store(
                crate::store::StoreError::Protocol("verify returned no record".into()),
            )));
        }
        (None, _) => None,
    };
    Ok(Decision { active, assertion })
}

/// The route's password-age demand of an HTTP check: `?max_age=` and
/// `X-Sessiongate-Max-Age`, the smaller winning.
fn http_max_age(req: &HttpRequest, use_query: bool) -> Result<Option<u64>, ApiError> {
    let from_query = if use_query {
        max_age(req.query_string())?
    } else {
        tail_max_age(req.query_string())
    };
    let from_header = req
        .headers()
        .get(MAX_AGE_HEADER)
        .map(|v| max_age_header(v.as_bytes()))
        .transpose()?;
    Ok(tightest(from_query, from_header))
}

/// `max_age` in the query of the original request (the `{tail}` form, and
/// Envoy's gRPC check): it still tightens (the contract allows it on both
/// forms), but an unparseable one is the app's business and is ignored,
/// not a 400.
pub fn tail_max_age(query: &str) -> Option<u64> {
    max_age(query).ok().flatten()
}

/// An `X-Sessiongate-Max-Age` value: whole seconds, else a 400.
pub fn max_age_header(value: &[u8]) -> Result<u64, ApiError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "X-Sessiongate-Max-Age must be a whole number of seconds".into(),
            )
        })
}

/// Each demand can only tighten the policy: the smallest wins.
pub fn tightest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
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
