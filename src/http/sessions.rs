//! Session endpoints for the login backend (create, reauth) and for the
//! token holder (their own session and devices).

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::AppState;
use super::extract::{BearerToken, IssuerPrincipal};
use crate::domain::{DeviceId, Metadata, SessionId, UserId, UserTag};
use crate::error::{ApiError, ErrorBody};
use crate::session::{CreateRequest, Reauth};
use crate::store::{Revoke, SessionRecord};
use crate::whereabouts;

/// Body of `POST /v1/sessions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionBody {
    /// The user id (1..=128 bytes, no control characters).
    #[schema(example = "user-42")]
    pub user_id: String,
    /// The device id; a random one when absent. A second session for the same
    /// (user, device) replaces the first.
    #[schema(example = "laptop-7f3a")]
    pub device_id: Option<String>,
    /// When the user last proved their password (Unix seconds); now when absent.
    pub auth_time: Option<i64>,
    /// Free-form metadata (ip, user agent, label…): at most 16 entries, 4 KiB as JSON.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// Answer of `POST /v1/sessions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedBody {
    /// The signed JWT to hand to the user.
    pub token: String,
    pub session_id: String,
    pub user_id: String,
    pub device_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: the absolute end of the session and the token's `exp`.
    pub expires_at: i64,
    /// Unix seconds.
    pub auth_time: i64,
}

/// One session as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    pub session_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub device_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; updated at most once per touch interval.
    pub last_seen_at: i64,
    /// Unix seconds: the last password check.
    pub auth_time: i64,
    /// Unix seconds: the absolute end of the session.
    pub expires_at: i64,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The login's address, as the login backend gave it in `metadata.ip`
    /// (sessiongate sees only the backend's own address at login).
    #[schema(example = "192.0.2.7")]
    pub first_ip: Option<String>,
    /// The login's user agent, from `metadata.user_agent`.
    pub first_user_agent: Option<String>,
    /// The client address of the last verify that slid the idle expiry (at
    /// most once per touch interval), through trusted proxies only; `null`
    /// until a verify has.
    #[schema(example = "198.51.100.23")]
    pub last_ip: Option<String>,
    /// That verify's `User-Agent`, at most 256 bytes, control characters dropped.
    pub last_user_agent: Option<String>,
    /// Browser and system, from the last user agent (else the first):
    /// "Firefox on Linux", "Safari on iPhone"; `null` when not recognised.
    #[schema(example = "Firefox on Linux")]
    pub device_label: Option<String>,
    /// Whether this is the session of the token used for the call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<bool>,
}

impl SessionView {
    pub fn new(tag: &UserTag, r: SessionRecord, current: Option<bool>) -> SessionView {
        let metadata = Metadata::to_json(&r.metadata);
        let first_ip = whereabouts::meta_str(&metadata, whereabouts::IP_KEYS).map(str::to_string);
        let first_user_agent =
            whereabouts::meta_str(&metadata, whereabouts::UA_KEYS).map(str::to_string);
        let device_label = r
            .last_user_agent
            .as_deref()
            .or(first_user_agent.as_deref())
            .and_then(whereabouts::device_label);
        SessionView {
            session_id: format!("{}{}", tag.as_str(), r.field),
            user_id: None,
            device_id: r.device_id,
            created_at: r.created_ms / 1000,
            last_seen_at: r.last_seen_ms / 1000,
            auth_time: r.auth_time_ms / 1000,
            expires_at: r.expires_ms / 1000,
            metadata,
            first_ip,
            first_user_agent,
            last_ip: r.last_ip,
            last_user_agent: r.last_user_agent,
            device_label,
            current,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    /// How many live sessions were revoked.
    pub revoked: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReauthBody {
    pub session_id: String,
    /// Unix seconds: now.
    pub auth_time: i64,
}

/// Create a session (login).
#[utoipa::path(
    post, path = "/v1/sessions", tag = "sessions",
    request_body = CreateSessionBody,
    security(("issuer_key" = [])),
    responses(
        (status = 201, body = CreatedBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub async fn create(
    issuer: IssuerPrincipal,
    state: web::Data<AppState>,
    body: web::Json<CreateSessionBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let req = CreateRequest {
        user: UserId::parse(&body.user_id).map_err(|e| ApiError::InvalidRequest(e.0))?,
        device: body
            .device_id
            .as_deref()
            .map(DeviceId::parse)
            .transpose()
            .map_err(|e| ApiError::InvalidRequest(e.0))?,
        auth_time: body.auth_time,
        metadata: Metadata::parse(body.metadata.as_ref())
            .map_err(|e| ApiError::InvalidRequest(e.0))?,
    };
    let created = state.service.create_as(req, &issuer.actor).await?;
    Ok(HttpResponse::Created()
        .insert_header(("Cache-Control", "no-store"))
        .json(CreatedBody {
            token: created.token,
            session_id: created.session.as_str().to_string(),
            user_id: created.user.as_str().to_string(),
            device_id: created.device.as_str().to_string(),
            created_at: created.created_ms / 1000,
            expires_at: created.expires_ms / 1000,
            auth_time: created.auth_time_ms / 1000,
        }))
}

/// The caller's own session.
#[utoipa::path(
    get, path = "/v1/sessions/current", tag = "sessions",
    security(("session_token" = [])),
    responses((status = 200, body = SessionView), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn current(
    token: BearerToken,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let active = state.service.verify(&token.0, Reauth::Ignore, true).await?;
    let record = active.record.ok_or(ApiError::StoreUnavailable)?;
    let mut view = SessionView::new(&active.token.user.tag(), record, Some(true));
    view.user_id = Some(active.token.user.as_str().to_string());
    Ok(HttpResponse::Ok().json(view))
}

/// Log out on this device: this token never verifies again.
#[utoipa::path(
    delete, path = "/v1/sessions/current", tag = "sessions",
    security(("session_token" = [])),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn logout(
    token: BearerToken,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let session = state.service.logout_current(&token.0).await?;
    tracing::info!(target: "audit", actor = "user", action = "logout", target = session.as_str(), outcome = "ok");
    Ok(HttpResponse::NoContent().finish())
}

/// The caller's sessions on every device.
#[utoipa::path(
    get, path = "/v1/sessions", tag = "sessions",
    security(("session_token" = [])),
    responses((status = 200, body = SessionList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn list(
    token: BearerToken,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let active = state.service.session_of(&token.0).await?;
    let tag = active.token.user.tag();
    let mine = active.token.session.field();
    let sessions = state
        .service
        .list(&tag)
        .await?
        .into_iter()
        .map(|r| {
            let current = r.field == mine;
            SessionView::new(&tag, r, Some(current))
        })
        .collect();
    Ok(HttpResponse::Ok().json(SessionList { sessions }))
}

/// Log out every other device of the caller (this one stays).
#[utoipa::path(
    delete, path = "/v1/sessions", tag = "sessions",
    security(("session_token" = [])),
    responses((status = 200, body = Revoked), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn logout_others(
    token: BearerToken,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let active = state.service.session_of(&token.0).await?;
    let t = &active.token;
    let revoked = state
        .service
        .revoke(
            &t.user.tag(),
            Revoke::AllExcept(Some(t.session.field())),
            "logout_others",
        )
        .await?;
    tracing::info!(target: "audit", actor = "user", action = "logout_others", target = t.user.as_str(), revoked, outcome = "ok");
    Ok(HttpResponse::Ok().json(Revoked { revoked }))
}

/// Log out one of the caller's devices.
#[utoipa::path(
    delete, path = "/v1/sessions/{session_id}", tag = "sessions",
    params(("session_id" = String, Path)),
    security(("session_token" = [])),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn logout_one(
    token: BearerToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let active = state.service.session_of(&token.0).await?;
    let tag = active.token.user.tag();
    let target = SessionId::parse(&path).map_err(|_| ApiError::NotFound)?;
    if !target.belongs_to(&tag) {
        return Err(ApiError::NotFound);
    }
    let n = state
        .service
        .revoke(&tag, Revoke::One(target.field()), "logout_device")
        .await?;
    if n == 0 {
        return Err(ApiError::NotFound);
    }
    tracing::info!(target: "audit", actor = "user", action = "logout_device", target = target.as_str(), outcome = "ok");
    Ok(HttpResponse::NoContent().finish())
}

/// The login backend re-checked the password: `auth_time` becomes now.
#[utoipa::path(
    post, path = "/v1/sessions/{session_id}/reauth", tag = "sessions",
    params(("session_id" = String, Path)),
    security(("issuer_key" = [])),
    responses((status = 200, body = ReauthBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn reauth(
    issuer: IssuerPrincipal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session = SessionId::parse(&path).map_err(|_| ApiError::NotFound)?;
    let auth_ms = state.service.reauth_as(&session, &issuer.actor).await?;
    Ok(HttpResponse::Ok().json(ReauthBody {
        session_id: session.as_str().to_string(),
        auth_time: auth_ms / 1000,
    }))
}
