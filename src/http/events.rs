//! Lifecycle events for operators (issue 10): `GET /v1/admin/events` as JSON
//! pages or Server-Sent Events, a user's history, and one session's state
//! (live, or its tombstone).
//!
//! Pages and SSE share one cursor format (see `store::events::Cursor`): an
//! event's id is its position, so the JSON `next`, every SSE event's `id:`
//! and any event id are cursors: `?since=<next>` and `Last-Event-ID`
//! resume exactly after the last event received. Reasons
//! and actors are for operators only: verify's 401 stays `invalid_token`.

use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::AdminPrincipal;
use super::sessions::SessionView;
use crate::domain::{SessionId, UserId};
use crate::error::{ApiError, ErrorBody};
use crate::events::{Cursor, Event, Filter};
use crate::session::ServiceError;

/// How often an SSE stream with nothing to send looks for new events.
const SSE_POLL: Duration = Duration::from_millis(250);
/// The same on a Cluster, where one read costs an `XRANGE` per slot.
const SSE_POLL_MERGED: Duration = Duration::from_secs(1);
/// An idle SSE stream sends a comment this often (keeps proxies from
/// closing it).
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only this user's events.
    pub user_id: Option<String>,
    /// Only events of this type (e.g. `session.revoked`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<String>,
    /// Where to start: a `next` cursor from an earlier page, or Unix
    /// milliseconds (events at or after it). Default: the oldest retained.
    pub since: Option<String>,
    /// Most events per page (1..=1000, default 100).
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserEventQuery {
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<String>,
    /// A `next` cursor or Unix milliseconds, as for `/v1/admin/events`.
    pub since: Option<String>,
    /// Most events per page (1..=1000, default 100).
    pub limit: Option<usize>,
}

/// A page of events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// The cursor after this page: pass it as `since` for the next one.
    pub next: String,
}

fn cursor(since: Option<&str>) -> Result<Cursor, ApiError> {
    match since {
        None | Some("") => Ok(Cursor::start()),
        Some(t) => Cursor::parse(t).ok_or_else(|| {
            ApiError::InvalidRequest(
                "since is neither an event id nor Unix milliseconds (in range)".into(),
            )
        }),
    }
}

fn limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(100) {
        n @ 1..=1000 => Ok(n),
        _ => Err(ApiError::InvalidRequest(
            "limit must be between 1 and 1000".into(),
        )),
    }
}

fn filter(user_id: Option<String>, kind: Option<String>) -> Result<Filter, ApiError> {
    if let Some(u) = &user_id {
        UserId::parse(u).map_err(|e| ApiError::InvalidRequest(e.0))?;
    }
    Ok(Filter { user_id, kind })
}

fn wants_sse(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// Session lifecycle events: JSON pages, or Server-Sent Events when asked
/// for (`Accept: text/event-stream`; resume with `Last-Event-ID`).
#[utoipa::path(
    get, path = "/v1/admin/events", tag = "admin",
    params(EventQuery, ("Last-Event-ID" = Option<String>, Header, description = "SSE: resume after this event (its `id:` line)")),
    security(("admin_key" = [])),
    responses(
        (status = 200, body = EventPage, description = "a page of events (with `Accept: text/event-stream` instead: an endless `text/event-stream` of `id: <cursor>` / `data: <event JSON>` messages, not described here so that generated clients and fuzzers stay on the JSON form)"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn events(
    _: AdminPrincipal,
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<EventQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let limit = limit(query.limit)?;
    let filter = filter(query.user_id, query.kind)?;
    if wants_sse(&req) {
        let resume = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty());
        let start = cursor(resume.or(query.since.as_deref()))?;
        return Ok(sse(state, start, filter));
    }
    page(&state, cursor(query.since.as_deref())?, &filter, limit).await
}

/// One user's history (oldest first), paged like `/v1/admin/events`.
#[utoipa::path(
    get, path = "/v1/admin/users/{user_id}/events", tag = "admin",
    params(("user_id" = String, Path), UserEventQuery),
    security(("admin_key" = [])),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn user_events(
    _: AdminPrincipal,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<UserEventQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let limit = limit(query.limit)?;
    let filter = filter(Some(path.into_inner()), query.kind)?;
    page(&state, cursor(query.since.as_deref())?, &filter, limit).await
}

async fn page(
    state: &AppState,
    start: Cursor,
    filter: &Filter,
    limit: usize,
) -> Result<HttpResponse, ApiError> {
    let (events, next) = state
        .service
        .store()
        .read_events(&start, filter, limit)
        .await
        .map_err(ServiceError::from)?;
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(EventPage {
            events,
            next: next.encode(),
        }))
}

struct SseState {
    app: web::Data<AppState>,
    cursor: Cursor,
    filter: Filter,
    last_write: Instant,
    first: bool,
}

fn sse(app: web::Data<AppState>, start: Cursor, filter: Filter) -> HttpResponse {
    let state = SseState {
        app,
        cursor: start,
        filter,
        last_write: Instant::now(),
        first: true,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.first {
            s.first = false;
            // Tells EventSource clients how soon to reconnect.
            return Some((Ok::<_, actix_web::Error>(Bytes::from("retry: 1000\n\n")), s));
        }
        loop {
            let read = s
                .app
                .service
                .store()
                .read_events(&s.cursor, &s.filter, 100)
                .await;
            match read {
                Ok((events, next)) => {
                    // An event's id is the cursor just after it; events the
                    // filter consumed move the cursor too, but an id is
                    // only sent with an event.
                    let mut out = String::new();
                    for event in &events {
                        out.push_str("id: ");
                        out.push_str(&event.id);
                        out.push_str("\ndata: ");
                        out.push_str(&serde_json::to_string(event).expect("an event serialises"));
                        out.push_str("\n\n");
                    }
                    s.cursor = next;
                    if !out.is_empty() {
                        s.last_write = Instant::now();
                        return Some((Ok(Bytes::from(out)), s));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "SSE: cannot read events; retrying");
                }
            }
            if s.last_write.elapsed() >= SSE_KEEPALIVE {
                s.last_write = Instant::now();
                return Some((Ok(Bytes::from(": keep-alive\n\n")), s));
            }
            let poll = if s.app.service.store().keys().stream_count() > 1 {
                SSE_POLL_MERGED
            } else {
                SSE_POLL
            };
            tokio::time::sleep(poll).await;
        }
    });
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream)
}

/// One session as the audit trail sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionState {
    /// `live` or `ended`.
    pub state: String,
    /// The live session (when `state` is `live`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionView>,
    pub session_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// When it ended (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<i64>,
    /// Why it ended (the revocation reason of its event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The token's `exp` (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// The id of the event that ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

/// One session: live, or its tombstone (kept for `tombstone_retention`).
#[utoipa::path(
    get, path = "/v1/admin/sessions/{session_id}", tag = "admin",
    params(("session_id" = String, Path)),
    security(("admin_key" = [])),
    responses((status = 200, body = SessionState), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody))
)]
pub async fn session(
    _: AdminPrincipal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let sid = SessionId::parse(&path).map_err(|e| ApiError::InvalidRequest(e.0))?;
    let tag = sid.user_tag();
    let live = state
        .service
        .list(&tag)
        .await?
        .into_iter()
        .find(|r| r.field == sid.field());
    let body = if let Some(record) = live {
        let device = record.device_id.clone();
        SessionState {
            state: "live".into(),
            session: Some(SessionView::new(&tag, record, None)),
            session_id: sid.as_str().to_string(),
            user_id: None,
            device_id: Some(device),
            ended_at: None,
            reason: None,
            actor: None,
            exp: None,
            event_id: None,
        }
    } else {
        let tomb = state
            .service
            .store()
            .tombstone(&sid)
            .await
            .map_err(ServiceError::from)?
            .ok_or(ApiError::NotFound)?;
        SessionState {
            state: "ended".into(),
            session: None,
            session_id: sid.as_str().to_string(),
            user_id: Some(tomb.user_id),
            device_id: Some(tomb.device_id),
            ended_at: Some(tomb.ended_at / 1000),
            reason: Some(tomb.reason),
            actor: Some(tomb.actor),
            exp: Some(tomb.exp),
            event_id: Some(tomb.event_id),
        }
    };
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(body))
}
