//! The admin console: server-rendered pages under `/admin/` for operators.
//!
//! Sign-in exchanges an admin key for a short-lived signed cookie
//! ([`auth`]); pages call `SessionService` directly (no HTTP to itself);
//! every action is a POST form with a CSRF token, answered by a redirect
//! (POST-redirect-GET), so nothing needs JavaScript. One small vendored
//! script (`assets/console.js`, served from here) refreshes the counters.
//! Every answer under `/admin/` carries a strict `Content-Security-Policy`,
//! `no-store` and `no-referrer`. The shipped gateway configurations never
//! forward `/admin/`: the console is for the private network only.

pub mod auth;
pub mod pages;

use std::collections::VecDeque;
use std::future::{Ready, ready};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, ContentType};
use actix_web::middleware::DefaultHeaders;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use serde::Deserialize;

use crate::config::Settings;
use crate::domain::{Metadata, SessionId, UserId};
use crate::http::AppState;
use crate::http::extract::Role;
use crate::session::{ServiceError, now_ms};
use crate::store::{Revoke, SessionRecord};
use auth::{COOKIE, ConsoleAuth, ConsoleSession, LOGIN_COOKIE};
use pages::{Counters, LOGOUT_ALL_PHRASE, Policy, Row};

/// The policy every console answer carries.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The console's own state, kept in `AppState`.
pub struct Console {
    pub auth: ConsoleAuth,
    idle: Duration,
    reauth_after: Duration,
    /// Verify counters sampled at most once a second, for the rates.
    samples: Mutex<VecDeque<(Instant, [u64; 6])>>,
}

impl Console {
    pub fn new(settings: &Settings) -> Console {
        Console {
            auth: ConsoleAuth::new(
                &settings.signing_secret,
                settings.console_session_ttl,
                &settings.admin_keys,
            ),
            idle: settings.idle_timeout,
            reauth_after: settings.reauth_after,
            samples: Mutex::new(VecDeque::new()),
        }
    }

    fn policy(&self) -> Policy {
        Policy {
            idle_ms: self.idle.as_millis() as i64,
            reauth_after_ms: self.reauth_after.as_millis() as i64,
            now_ms: now_ms(),
        }
    }

    /// Verifies per second by outcome since the newest sample at least 5 s
    /// old (else the oldest), and the window that covers.
    fn rates(&self, counts: &[(&'static str, u64); 6]) -> (Vec<(&'static str, f64)>, f64) {
        let now = Instant::now();
        let values = counts.map(|(_, n)| n);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(60))
            && samples.len() > 1
        {
            samples.pop_front();
        }
        let base = samples
            .iter()
            .rev()
            .find(|(t, _)| now.duration_since(*t) >= Duration::from_secs(5))
            .or(samples.front())
            .copied();
        if samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
        {
            samples.push_back((now, values));
        }
        drop(samples);
        let (window, rates) = match base {
            Some((t, old)) if now.duration_since(t) > Duration::from_millis(100) => {
                let w = now.duration_since(t).as_secs_f64();
                (
                    w,
                    counts
                        .iter()
                        .zip(old)
                        .map(|((label, n), o)| (*label, n.saturating_sub(o) as f64 / w))
                        .collect(),
                )
            }
            _ => (0.0, counts.iter().map(|(label, _)| (*label, 0.0)).collect()),
        };
        (rates, window)
    }
}

/// The console's routes, under `/admin`, with the security headers on every
/// answer (pages, redirects, errors).
pub fn scope() -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::scope("/admin")
        .wrap(
            DefaultHeaders::new()
                .add((header::CONTENT_SECURITY_POLICY, CSP))
                .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                .add((header::REFERRER_POLICY, "no-referrer"))
                .add((header::CACHE_CONTROL, "no-store"))
                .add((header::X_FRAME_OPTIONS, "DENY")),
        )
        .route("", web::get().to(|| async { see_other("/admin/") }))
        .route("/", web::get().to(dashboard))
        .route("/login", web::get().to(sign_in_form))
        .route("/login", web::post().to(sign_in))
        .route("/logout", web::post().to(sign_out))
        .route("/users", web::get().to(user_page))
        .route("/users/sign-out", web::post().to(user_sign_out))
        .route("/sessions/{session_id}", web::get().to(session_page))
        .route("/logout-all", web::get().to(logout_all_form))
        .route("/logout-all", web::post().to(logout_all))
        .route("/keys", web::get().to(keys_page))
        .route("/keys/rotate", web::post().to(rotate_key))
        .route("/counters.json", web::get().to(counters_json))
        .route(
            "/static/console.css",
            web::get().to(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/static/console.js",
            web::get().to(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .default_service(web::to(|| async {
            Err::<HttpResponse, _>(ConsoleError::NotFound("No such console page."))
        }))
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .body(body)
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

fn html(status: StatusCode, page: maud::Markup) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(ContentType::html())
        .body(page.into_string())
}

/// Why a console request failed; each renders as a page (or a redirect).
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("sign in first")]
    SignIn,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("too many wrong keys from this address; try again in {retry_after} s")]
    TooMany { retry_after: u64 },
    #[error("the session store is unavailable; try again shortly")]
    Store,
}

impl From<ServiceError> for ConsoleError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Store(cause) => {
                tracing::debug!(error = %cause, "session store unavailable (console)");
                ConsoleError::Store
            }
            ServiceError::NotFound => ConsoleError::NotFound("No such session."),
            other => ConsoleError::BadRequest(other.to_string()),
        }
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::SignIn => StatusCode::SEE_OTHER,
            ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            ConsoleError::Store => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let title = match self {
            ConsoleError::SignIn => return see_other("/admin/login"),
            ConsoleError::Forbidden(_) => "Refused",
            ConsoleError::BadRequest(_) => "Not understood",
            ConsoleError::NotFound(_) => "Not found",
            ConsoleError::TooMany { .. } => "Too many attempts",
            ConsoleError::Store => "Store unavailable",
        };
        let mut res = html(self.status_code(), pages::error(title, &self.to_string()));
        let retry = match self {
            ConsoleError::TooMany { retry_after } => Some(*retry_after),
            ConsoleError::Store => Some(1),
            _ => None,
        };
        if let Some(s) = retry {
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        res
    }
}

fn app(req: &HttpRequest) -> &AppState {
    req.app_data::<web::Data<AppState>>()
        .expect("AppState is registered")
}

/// A signed-in operator: a genuine, unexpired, not signed-out console
/// cookie. Handlers that take one cannot run for anyone else.
pub struct ConsoleAdmin(pub ConsoleSession);

impl FromRequest for ConsoleAdmin {
    type Error = ConsoleError;
    type Future = Ready<Result<Self, ConsoleError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let session = req
            .cookie(COOKIE)
            .and_then(|c| app(req).console.auth.check(c.value(), now_ms()));
        ready(session.map(ConsoleAdmin).ok_or(ConsoleError::SignIn))
    }
}

impl ConsoleAdmin {
    fn csrf(&self, state: &AppState) -> String {
        state.console.auth.csrf_for(&self.0)
    }

    /// The checks every console POST passes first: same-origin by the
    /// browser's own headers, and this session's CSRF token.
    fn check_post(
        &self,
        req: &HttpRequest,
        state: &AppState,
        csrf: Option<&str>,
    ) -> Result<(), ConsoleError> {
        if !auth::same_origin(req, &state.origin) {
            tracing::warn!(target: "audit", actor = "console", action = "post", path = req.path(), outcome = "refused", reason = "cross-site");
            return Err(ConsoleError::Forbidden(
                "This form came from another site; it was refused.",
            ));
        }
        if !state.console.auth.csrf_ok(&self.0, csrf) {
            tracing::warn!(target: "audit", actor = "console", action = "post", path = req.path(), outcome = "refused", reason = "csrf");
            return Err(ConsoleError::Forbidden(
                "The form's CSRF token is missing or wrong: reload the page and try again.",
            ));
        }
        Ok(())
    }
}

fn audit<T, E: std::fmt::Display>(action: &str, target: &str, result: &Result<T, E>) {
    match result {
        Ok(_) => {
            tracing::info!(target: "audit", actor = "console", action, target, outcome = "ok")
        }
        Err(e) => {
            tracing::warn!(target: "audit", actor = "console", action, target, outcome = "failed", error = %e)
        }
    }
}

#[derive(Debug, Deserialize)]
struct Done {
    done: Option<String>,
    n: Option<u64>,
}

impl Done {
    /// A fixed sentence for a known outcome; anything else shows nothing.
    fn text(&self) -> Option<String> {
        let n = self.n.unwrap_or(0);
        let plural = if n == 1 { "" } else { "s" };
        Some(match self.done.as_deref()? {
            "revoked" => format!("Signed out: {n} session{plural} revoked."),
            "logout_all" => {
                "Everyone was logged out: every token issued until now is refused.".into()
            }
            "rotated" => "The signing key was rotated.".into(),
            _ => return None,
        })
    }
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

// --- sign-in and sign-out ------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct SignInQuery {
    signed_out: Option<String>,
}

async fn sign_in_form(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<SignInQuery>,
) -> HttpResponse {
    let auth = &state.console.auth;
    if req
        .cookie(COOKIE)
        .is_some_and(|c| auth.check(c.value(), now_ms()).is_some())
    {
        return see_other("/admin/");
    }
    let nonce = req
        .cookie(LOGIN_COOKIE)
        .map(|c| c.value().to_string())
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .unwrap_or_else(|| auth.login_nonce());
    let info = query.signed_out.as_ref().map(|_| "You are signed out.");
    let mut res = html(
        StatusCode::OK,
        pages::sign_in(&auth.login_csrf(&nonce), None, info),
    );
    let secure = auth::is_https(&req, &state.origin);
    res.add_cookie(&auth::cookie(
        LOGIN_COOKIE,
        nonce,
        Duration::from_secs(3600),
        secure,
    ))
    .expect("a valid cookie");
    res
}

#[derive(Deserialize)]
struct SignInForm {
    admin_key: Option<String>,
    csrf: Option<String>,
}

async fn sign_in(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<SignInForm>,
) -> Result<HttpResponse, ConsoleError> {
    let auth = &state.console.auth;
    if !auth::same_origin(&req, &state.origin) {
        tracing::warn!(target: "audit", actor = "console", action = "sign_in", outcome = "refused", reason = "cross-site");
        return Err(ConsoleError::Forbidden(
            "This form came from another site; it was refused.",
        ));
    }
    let nonce = req.cookie(LOGIN_COOKIE).map(|c| c.value().to_string());
    if !auth.login_csrf_ok(nonce.as_deref(), form.csrf.as_deref()) {
        tracing::warn!(target: "audit", actor = "console", action = "sign_in", outcome = "refused", reason = "csrf");
        return Err(ConsoleError::Forbidden(
            "The sign-in form's CSRF token is missing or wrong: reload the page and try again.",
        ));
    }
    let peer = req.peer_addr().map(|a| a.ip());
    let key = form.admin_key.as_deref().unwrap_or("").trim();
    let secure = auth::is_https(&req, &state.origin);
    // As on the API: the key is compared first (constant time, whatever the
    // throttle says), a right key is accepted even from a throttled address,
    // and only a refused sign-in waits.
    let role = state.api_keys.role_of(key.as_bytes());
    if role != Some(Role::Admin)
        && let Some(retry_after) = peer.and_then(|ip| state.key_failures.blocked(ip))
    {
        return Err(ConsoleError::TooMany { retry_after });
    }
    if role == Some(Role::Admin) {
        let session = auth.issue(now_ms(), key.as_bytes());
        tracing::info!(target: "audit", actor = "console", action = "sign_in", peer = ?peer, outcome = "ok");
        let mut res = see_other("/admin/");
        res.add_cookie(&auth::cookie(COOKIE, session.value, auth.ttl, secure))
            .expect("a valid cookie");
        res.add_cookie(&auth::removal(LOGIN_COOKIE, secure))
            .expect("a valid cookie");
        return Ok(res);
    }
    // A wrong key counts against the same per-address limit as the API's.
    if role.is_none()
        && let Some(ip) = peer
    {
        state.key_failures.record(ip);
    }
    tracing::warn!(target: "audit", actor = "console", action = "sign_in", peer = ?peer, outcome = "refused");
    let nonce = nonce.unwrap_or_default();
    Ok(html(
        StatusCode::UNAUTHORIZED,
        pages::sign_in(
            &auth.login_csrf(&nonce),
            Some("That is not an admin key. Nothing was stored; try again."),
            None,
        ),
    ))
}

async fn sign_out(
    req: HttpRequest,
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, ConsoleError> {
    admin.check_post(&req, &state, form.csrf.as_deref())?;
    state.console.auth.sign_out(&admin.0, now_ms());
    tracing::info!(target: "audit", actor = "console", action = "sign_out", outcome = "ok");
    let mut res = see_other("/admin/login?signed_out=1");
    res.add_cookie(&auth::removal(COOKIE, auth::is_https(&req, &state.origin)))
        .expect("a valid cookie");
    Ok(res)
}

// --- pages ----------------------------------------------------------------------------

async fn counters(state: &AppState) -> Counters {
    let m = &state.metrics;
    let counts = m.verify_counts();
    let (verify_per_second, window_seconds) = state.console.rates(&counts);
    let service = &state.service;
    let ready = match service.store().probe().await {
        Ok(()) => service.global().snapshot().map(|_| ()),
        Err(e) => Err(e),
    };
    let created = m.sessions_created.get();
    let revoked = m.revoked_total();
    Counters {
        active_sessions: created as i64 - revoked as i64,
        sessions_created: created,
        sessions_revoked: revoked,
        verify_per_second,
        window_seconds,
        redis_ready: ready.is_ok(),
        redis_detail: ready.err().map(|e| e.to_string()).unwrap_or_default(),
        at_ms: now_ms(),
    }
}

async fn dashboard(
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    done: web::Query<Done>,
) -> HttpResponse {
    let c = counters(&state).await;
    html(
        StatusCode::OK,
        pages::dashboard(&admin.csrf(&state), &c, done.text().as_deref()),
    )
}

async fn counters_json(admin: Option<ConsoleAdmin>, state: web::Data<AppState>) -> HttpResponse {
    if admin.is_none() {
        return HttpResponse::Unauthorized().json(
            serde_json::json!({"error": "unauthorized", "message": "sign in to the console"}),
        );
    }
    let c = counters(&state).await;
    HttpResponse::Ok().json(serde_json::json!({
        "active_sessions": c.active_sessions.max(0),
        "sessions_created": c.sessions_created,
        "sessions_revoked": c.sessions_revoked,
        "verify_per_second": c.verify_per_second.iter().map(|(k, v)| (k.to_string(), serde_json::json!(*v))).collect::<serde_json::Map<_, _>>(),
        "window_seconds": c.window_seconds,
        "redis": {"ready": c.redis_ready, "detail": c.redis_detail},
        "at": pages::fmt_utc(c.at_ms),
        "at_ms": c.at_ms,
    }))
}

fn row(tag: &crate::domain::UserTag, r: SessionRecord) -> Row {
    let metadata = Metadata::to_json(&r.metadata);
    let device_label = r
        .last_user_agent
        .as_deref()
        .or(crate::whereabouts::meta_str(
            &metadata,
            crate::whereabouts::UA_KEYS,
        ))
        .and_then(crate::whereabouts::device_label);
    Row {
        session_id: format!("{}{}", tag.as_str(), r.field),
        device_id: r.device_id,
        created_ms: r.created_ms,
        last_seen_ms: r.last_seen_ms,
        auth_time_ms: r.auth_time_ms,
        expires_ms: r.expires_ms,
        metadata,
        last_ip: r.last_ip,
        last_user_agent: r.last_user_agent,
        device_label,
    }
}

#[derive(Debug, Deserialize)]
struct UserQuery {
    user_id: Option<String>,
    done: Option<String>,
    n: Option<u64>,
}

fn parse_user(raw: &str) -> Result<UserId, ConsoleError> {
    UserId::parse(raw.trim()).map_err(|e| ConsoleError::BadRequest(format!("user id: {}", e.0)))
}

async fn user_page(
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    query: web::Query<UserQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let Some(raw) = query.user_id.as_deref().filter(|u| !u.trim().is_empty()) else {
        return Ok(see_other("/admin/"));
    };
    let user = parse_user(raw)?;
    let tag = user.tag();
    let mut rows: Vec<Row> = state
        .service
        .list(&tag)
        .await?
        .into_iter()
        .map(|r| row(&tag, r))
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.last_seen_ms));
    let done = Done {
        done: query.done.clone(),
        n: query.n,
    };
    Ok(html(
        StatusCode::OK,
        pages::user(
            &admin.csrf(&state),
            user.as_str(),
            &rows,
            &state.console.policy(),
            done.text().as_deref(),
        ),
    ))
}

#[derive(Deserialize)]
struct SignOutForm {
    csrf: Option<String>,
    user_id: Option<String>,
    /// `session` (this device), `others` (all but this one), `everywhere`.
    action: Option<String>,
    session_id: Option<String>,
}

async fn user_sign_out(
    req: HttpRequest,
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    form: web::Form<SignOutForm>,
) -> Result<HttpResponse, ConsoleError> {
    admin.check_post(&req, &state, form.csrf.as_deref())?;
    let user = parse_user(form.user_id.as_deref().unwrap_or(""))?;
    let tag = user.tag();
    let session = || -> Result<SessionId, ConsoleError> {
        let sid = SessionId::parse(form.session_id.as_deref().unwrap_or(""))
            .map_err(|e| ConsoleError::BadRequest(format!("session id: {}", e.0)))?;
        if !sid.belongs_to(&tag) {
            return Err(ConsoleError::BadRequest(
                "that session belongs to another user".into(),
            ));
        }
        Ok(sid)
    };
    let (action, result) = match form.action.as_deref() {
        Some("session") => {
            let sid = session()?;
            let r = state
                .service
                .revoke(&tag, Revoke::One(sid.field()), "admin_session")
                .await;
            ("revoke_session", r)
        }
        Some("others") => {
            let sid = session()?;
            let r = state
                .service
                .revoke(&tag, Revoke::AllExcept(Some(sid.field())), "admin_user")
                .await;
            ("revoke_user_except", r)
        }
        Some("everywhere") => {
            let r = state
                .service
                .revoke(&tag, Revoke::AllExcept(None), "admin_user")
                .await;
            ("revoke_user", r)
        }
        _ => {
            return Err(ConsoleError::BadRequest(
                "unknown action (session, others or everywhere)".into(),
            ));
        }
    };
    audit(action, user.as_str(), &result);
    let n = result?;
    Ok(see_other(&format!(
        "/admin/users?user_id={}&done=revoked&n={n}",
        pages::url_encode(user.as_str())
    )))
}

#[derive(Debug, Deserialize)]
struct SessionQuery {
    user_id: Option<String>,
}

async fn session_page(
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<SessionQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let csrf = admin.csrf(&state);
    let sid = SessionId::parse(&path)
        .map_err(|e| ConsoleError::BadRequest(format!("session id: {}", e.0)))?;
    let tag = sid.user_tag();
    // The user id is only shown when it is this session's user.
    let user = query
        .user_id
        .as_deref()
        .and_then(|u| UserId::parse(u).ok())
        .filter(|u| sid.belongs_to(&u.tag()));
    let user = user.as_ref().map(UserId::as_str);
    let found = state
        .service
        .list(&tag)
        .await?
        .into_iter()
        .find(|r| r.field == sid.field());
    Ok(match found {
        Some(r) => html(
            StatusCode::OK,
            pages::session(&csrf, user, &row(&tag, r), &state.console.policy()),
        ),
        None => html(StatusCode::NOT_FOUND, pages::session_gone(&csrf, user)),
    })
}

async fn logout_all_form(admin: ConsoleAdmin, state: web::Data<AppState>) -> HttpResponse {
    html(StatusCode::OK, pages::logout_all(&admin.csrf(&state), None))
}

#[derive(Deserialize)]
struct LogoutAllForm {
    csrf: Option<String>,
    confirm: Option<String>,
}

async fn logout_all(
    req: HttpRequest,
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    form: web::Form<LogoutAllForm>,
) -> Result<HttpResponse, ConsoleError> {
    admin.check_post(&req, &state, form.csrf.as_deref())?;
    let typed = form.confirm.as_deref().unwrap_or("").trim();
    if typed != LOGOUT_ALL_PHRASE {
        tracing::info!(target: "audit", actor = "console", action = "logout_all", outcome = "not_confirmed");
        return Ok(html(
            StatusCode::BAD_REQUEST,
            pages::logout_all(
                &admin.csrf(&state),
                Some(&format!(
                    "Nothing was done: type “{LOGOUT_ALL_PHRASE}” exactly to confirm."
                )),
            ),
        ));
    }
    let result = state.service.logout_all(None).await;
    audit("logout_all", "*", &result);
    result?;
    Ok(see_other("/admin/?done=logout_all"))
}

async fn keys_page(
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    done: web::Query<Done>,
) -> HttpResponse {
    let kid = state
        .service
        .global()
        .snapshot()
        .ok()
        .map(|s| s.ring.active.clone());
    html(
        StatusCode::OK,
        pages::keys(&admin.csrf(&state), kid.as_deref(), done.text().as_deref()),
    )
}

async fn rotate_key(
    req: HttpRequest,
    admin: ConsoleAdmin,
    state: web::Data<AppState>,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, ConsoleError> {
    admin.check_post(&req, &state, form.csrf.as_deref())?;
    let result = state.service.rotate_key().await;
    audit("rotate_key", "*", &result);
    result?;
    Ok(see_other("/admin/keys?done=rotated"))
}
