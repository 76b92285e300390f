//! Operator endpoints. Every handler takes an `AdminPrincipal`, and every
//! action writes an audit log line (target `audit`: action, target, outcome;
//! never a token or key).

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::AdminPrincipal;
use super::sessions::{Revoked, SessionList, SessionView};
use crate::domain::{DeviceId, SessionId, UserId};
use crate::error::{ApiError, ErrorBody};
use crate::store::Revoke;

fn user(path: &str) -> Result<UserId, ApiError> {
    UserId::parse(path).map_err(|e| ApiError::InvalidRequest(e.0))
}

/// List a user's sessions.
#[utoipa::path(
    get, path = "/v1/admin/users/{user_id}/sessions", tag = "admin",
    params(("user_id" = String, Path)),
    security(("admin_key" = [])),
    responses((status = 200, body = SessionList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn list_user(
    _: AdminPrincipal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = user(&path)?;
    let tag = user.tag();
    let sessions = state
        .service
        .list(&tag)
        .await?
        .into_iter()
        .map(|r| SessionView::new(&tag, r, None))
        .collect();
    Ok(HttpResponse::Ok().json(SessionList { sessions }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExceptQuery {
    /// A session of this user to keep (e.g. the one that just changed the password).
    pub except: Option<String>,
}

/// Force logout of a user on every device.
#[utoipa::path(
    delete, path = "/v1/admin/users/{user_id}/sessions", tag = "admin",
    params(("user_id" = String, Path), ExceptQuery),
    security(("admin_key" = [])),
    responses((status = 200, body = Revoked), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn revoke_user(
    admin: AdminPrincipal,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<ExceptQuery>,
) -> Result<HttpResponse, ApiError> {
    let user = user(&path)?;
    let tag = user.tag();
    let keep = match query.except.as_deref() {
        None => None,
        Some(raw) => {
            let sid = SessionId::parse(raw).map_err(|e| ApiError::InvalidRequest(e.0))?;
            if !sid.belongs_to(&tag) {
                return Err(ApiError::InvalidRequest(
                    "except names a session of another user".into(),
                ));
            }
            Some(sid)
        }
    };
    let result = state
        .service
        .revoke_as(
            &tag,
            Revoke::AllExcept(keep.as_ref().map(|s| s.field())),
            "admin_user",
            Some(&admin.actor),
        )
        .await;
    audit("revoke_user", user.as_str(), &result);
    let revoked = result?;
    Ok(HttpResponse::Ok().json(Revoked { revoked }))
}

/// Force logout of one device of a user.
#[utoipa::path(
    delete, path = "/v1/admin/users/{user_id}/devices/{device_id}", tag = "admin",
    params(("user_id" = String, Path), ("device_id" = String, Path)),
    security(("admin_key" = [])),
    responses((status = 200, body = Revoked), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn revoke_device(
    admin: AdminPrincipal,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (user_id, device_id) = path.into_inner();
    let user = user(&user_id)?;
    let device = DeviceId::parse(&device_id).map_err(|e| ApiError::InvalidRequest(e.0))?;
    let result = state
        .service
        .revoke_as(
            &user.tag(),
            Revoke::Device(device.as_str()),
            "admin_device",
            Some(&admin.actor),
        )
        .await;
    audit("revoke_device", user.as_str(), &result);
    let revoked = result?;
    Ok(HttpResponse::Ok().json(Revoked { revoked }))
}

/// Revoke one session by id.
#[utoipa::path(
    delete, path = "/v1/admin/sessions/{session_id}", tag = "admin",
    params(("session_id" = String, Path)),
    security(("admin_key" = [])),
    responses((status = 200, body = Revoked), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn revoke_session(
    admin: AdminPrincipal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let sid = SessionId::parse(&path).map_err(|e| ApiError::InvalidRequest(e.0))?;
    let result = state
        .service
        .revoke_as(
            &sid.user_tag(),
            Revoke::One(sid.field()),
            "admin_session",
            Some(&admin.actor),
        )
        .await;
    audit("revoke_session", sid.as_str(), &result);
    let revoked = result?;
    Ok(HttpResponse::Ok().json(Revoked { revoked }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LogoutAllBody {
    /// Sessions created at or before this instant (Unix milliseconds) are revoked.
    pub cutoff_ms: i64,
}

/// Force logout of every user.
#[utoipa::path(
    post, path = "/v1/admin/logout-all", tag = "admin",
    security(("admin_key" = [])),
    responses((status = 200, body = LogoutAllBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn logout_all(
    admin: AdminPrincipal,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = state.service.logout_all_as(None, &admin.actor).await;
    audit("logout_all", "*", &result);
    let cutoff_ms = result?;
    Ok(HttpResponse::Ok().json(LogoutAllBody { cutoff_ms }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedBody {
    /// The key id new tokens are signed with.
    pub kid: String,
}

/// Sign new tokens with a new key.
#[utoipa::path(
    post, path = "/v1/admin/keys/rotate", tag = "admin",
    security(("admin_key" = [])),
    responses((status = 200, body = RotatedBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn rotate_key(
    admin: AdminPrincipal,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = state.service.rotate_key_as(&admin.actor).await;
    audit("rotate_key", "*", &result);
    let kid = result?;
    Ok(HttpResponse::Ok().json(RotatedBody { kid }))
}

fn audit<T, E: std::fmt::Display>(action: &str, target: &str, result: &Result<T, E>) {
    match result {
        Ok(_) => tracing::info!(target: "audit", actor = "admin", action, target, outcome = "ok"),
        Err(e) => {
            tracing::warn!(target: "audit", actor = "admin", action, target, outcome = "failed", error = %e)
        }
    }
}
