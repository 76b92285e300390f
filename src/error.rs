//! One error type at the HTTP edge: each variant has a status, a stable code
//! and a safe sentence. The cause chain goes to the log, never to the client;
//! no error body or log line carries a token, key or secret. Every 401 has a
//! `WWW-Authenticate` header, every 503 a `Retry-After`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::session::ServiceError;
use crate::store::StoreError;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code: `invalid_request`, `invalid_token`,
    /// `insufficient_user_authentication`, `unauthorized`, `forbidden`,
    /// `not_found`, `payload_too_large`, `store_unavailable`, …
    #[schema(example = "invalid_token")]
    pub error: &'static str,
    /// A sentence for a person.
    pub message: String,
    /// For `insufficient_user_authentication`: the password age allowed, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the token is missing, invalid, expired or revoked")]
    InvalidToken,
    #[error("the password must be entered again")]
    InsufficientAuth { max_age: u64 },
    #[error("a valid API key is required")]
    Unauthorized,
    #[error("this key may not use this endpoint")]
    Forbidden,
    #[error("a cross-site request may not use the session cookie")]
    CrossSite,
    #[error("no such session")]
    NotFound,
    #[error("no such endpoint")]
    NoRoute,
    #[error("method not allowed; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("the request body is too large")]
    PayloadTooLarge,
    #[error("the request headers are too large")]
    HeadersTooLarge,
    #[error("too many failed API keys from this address; try again later")]
    TooManyRequests { retry_after: u64 },
    #[error("the session store is unavailable; try again shortly")]
    StoreUnavailable,
    /// A change Redis applied (or may have) but too few replicas confirmed
    /// (`SESSIONGATE_REDIS_MIN_REPLICAS_ACK`): a 503 like any store failure.
    #[error(
        "too few Redis replicas confirmed the change in time: it may have been applied, \
         and it is safe to retry (a new session's token was not issued)"
    )]
    NotReplicated,
    /// `/readyz` only: why the store is not usable (Redis's own words for
    /// admin-key callers, a generic reason for anyone else).
    #[error("not ready: {0}")]
    NotReady(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidToken => "invalid_token",
            ApiError::InsufficientAuth { .. } => "insufficient_user_authentication",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden | ApiError::CrossSite => "forbidden",
            ApiError::NotFound | ApiError::NoRoute => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::HeadersTooLarge => "headers_too_large",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::StoreUnavailable | ApiError::NotReplicated | ApiError::NotReady(_) => {
                "store_unavailable"
            }
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidRequest(msg) => ApiError::InvalidRequest(msg),
            ServiceError::InvalidToken(reason) => {
                tracing::debug!(%reason, "token refused");
                ApiError::InvalidToken
            }
            ServiceError::SessionGone => ApiError::InvalidToken,
            ServiceError::InsufficientAuth { max_age } => ApiError::InsufficientAuth { max_age },
            ServiceError::NotFound => ApiError::NotFound,
            ServiceError::Store(StoreError::NotReplicated { wanted, got }) => {
                tracing::warn!(
                    wanted,
                    got,
                    "a change was not confirmed by enough Redis replicas"
                );
                ApiError::NotReplicated
            }
            ServiceError::Store(cause) => {
                // Debug only: an outage would otherwise log every request; the
                // refresher logs the transition and metrics count the errors.
                tracing::debug!(error = %cause, "session store unavailable");
                ApiError::StoreUnavailable
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidToken | ApiError::InsufficientAuth { .. } | ApiError::Unauthorized => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden | ApiError::CrossSite => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::StoreUnavailable | ApiError::NotReplicated | ApiError::NotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        res.insert_header((header::CACHE_CONTROL, "no-store"));
        let max_age = match self {
            ApiError::InvalidToken => {
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                ));
                None
            }
            ApiError::InsufficientAuth { max_age } => {
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    format!(
                        r#"Bearer error="insufficient_user_authentication", error_description="A more recent password check is required", max_age={max_age}"#
                    ),
                ));
                Some(*max_age)
            }
            ApiError::Unauthorized => {
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="sessiongate""#),
                ));
                None
            }
            ApiError::StoreUnavailable | ApiError::NotReplicated | ApiError::NotReady(_) => {
                res.insert_header((header::RETRY_AFTER, "1"));
                None
            }
            ApiError::MethodNotAllowed { allow } => {
                res.insert_header((header::ALLOW, *allow));
                None
            }
            ApiError::TooManyRequests { retry_after } => {
                res.insert_header((header::RETRY_AFTER, retry_after.to_string()));
                None
            }
            _ => None,
        };
        res.json(ErrorBody {
            error: self.code(),
            message: self.to_string(),
            max_age,
        })
    }
}
