//! `POST /v1/introspect`: RFC 7662 token introspection for the login
//! backend and operators. Introspecting is not user activity: it never
//! slides the idle expiry, and it reports `auth_time` rather than applying
//! the re-authentication policy.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::extract::KeyHolder;
use crate::error::{ApiError, ErrorBody};

/// The form body (`application/x-www-form-urlencoded`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct IntrospectForm {
    pub token: String,
    /// Accepted and ignored (RFC 7662 §2.1).
    pub token_type_hint: Option<String>,
}

/// RFC 7662 answer: only `active` when the token is not active.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntrospectBody {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
}

/// Introspect a token.
#[utoipa::path(
    post, path = "/v1/introspect", tag = "introspection",
    request_body(content = IntrospectForm, content_type = "application/x-www-form-urlencoded"),
    security(("issuer_key" = []), ("admin_key" = [])),
    responses((status = 200, body = IntrospectBody), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn introspect(
    _: KeyHolder,
    state: web::Data<AppState>,
    form: web::Form<IntrospectForm>,
) -> Result<HttpResponse, ApiError> {
    let body = match state.service.introspect(&form.token).await? {
        None => IntrospectBody {
            active: false,
            sub: None,
            sid: None,
            did: None,
            iss: None,
            exp: None,
            iat: None,
            auth_time: None,
            token_type: None,
        },
        Some(active) => {
            let t = active.token;
            IntrospectBody {
                active: true,
                sub: Some(t.user.as_str().to_string()),
                sid: Some(t.session.as_str().to_string()),
                did: Some(t.device.as_str().to_string()),
                iss: Some(state.service.issuer().to_string()),
                exp: Some(t.exp),
                iat: Some(t.iat),
                auth_time: active.record.as_ref().map(|r| r.auth_time_ms / 1000),
                token_type: Some("Bearer"),
            }
        }
    };
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(body))
}
