//! Liveness, readiness, metrics and the OpenAPI document.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::store::{SettingCheck, SettingState};

#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    pub status: &'static str,
    /// `/readyz` to admin-key callers only: the Redis settings the
    /// durability promises depend on, as found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_settings: Option<Vec<RedisSetting>>,
}

/// One Redis setting as `/readyz` found it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RedisSetting {
    pub setting: &'static str,
    pub expected: &'static str,
    /// The value Redis has (absent when it cannot be checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    /// `ok`, `not as expected`, or `cannot check: …` (e.g. CONFIG refused).
    pub status: String,
}

impl From<SettingCheck> for RedisSetting {
    fn from(c: SettingCheck) -> Self {
        let (found, status) = match c.state {
            SettingState::Holds => (Some(c.expected.to_string()), "ok".to_string()),
            SettingState::Differs(found) => (Some(found), "not as expected".to_string()),
            SettingState::CannotCheck(why) => (None, format!("cannot check: {why}")),
        };
        RedisSetting {
            setting: c.setting,
            expected: c.expected,
            found,
            status,
        }
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Status)))]
pub async fn healthz() -> HttpResponse {
    // `Status { status: "ok" }`, serialised once (a probe polled often
    // costs no JSON encoding and no allocation).
    const BODY: &str = r#"{"status":"ok"}"#;
    HttpResponse::Ok()
        .insert_header((
            actix_web::http::header::CONTENT_TYPE,
            actix_web::http::header::HeaderValue::from_static("application/json"),
        ))
        .body(BODY)
}

/// What `/readyz` tells a caller without an admin key when not ready:
/// Redis's own words (which may name keys, users or its configuration) go
/// to the log and to admins only.
/// How often an anonymous `/readyz` may re-read Redis's durability settings.
const DURABILITY_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

pub const NOT_READY_GENERIC: &str = "the session store is unavailable";

/// Redis takes the service's scripts and writes, and the global state is
/// fresh; otherwise 503, with the reason for admin-key callers only. When
/// ready, also re-reads Redis's durability settings (gauges, a warning on
/// change; never a reason to be unready), listed to admin-key callers: on
/// every admin-key call, and at most every ten seconds for anyone else.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Status), (status = 503, body = ErrorBody)))]
pub async fn readyz(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let service = &state.service;
    let ready = match service.store().probe().await {
        Ok(()) => service.global().snapshot().map(|_| ()),
        Err(e) => Err(e),
    };
    match ready {
        Ok(()) if super::extract::holds_admin_key(&req) => {
            let redis_settings = Some(match service.store().check_durability(false).await {
                Ok(checks) => checks.into_iter().map(RedisSetting::from).collect(),
                Err(e) => vec![RedisSetting {
                    setting: "*",
                    expected: "",
                    found: None,
                    status: format!("cannot check: {e}"),
                }],
            });
            Ok(HttpResponse::Ok().json(Status {
                status: "ready",
                redis_settings,
            }))
        }
        Ok(()) => {
            // Anonymous probes (orchestrators poll this) re-read the
            // settings at most every ten seconds.
            service
                .store()
                .check_durability_if_due(DURABILITY_RECHECK)
                .await;
            Ok(HttpResponse::Ok().json(Status {
                status: "ready",
                redis_settings: None,
            }))
        }
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            if super::extract::holds_admin_key(&req) {
                Err(ApiError::NotReady(e.to_string()))
            } else {
                Err(ApiError::NotReady(NOT_READY_GENERIC.into()))
            }
        }
    }
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let status = state.service.store().pool_status();
    let m = &state.metrics;
    m.pool.with_label_values(&["size"]).set(status.size as i64);
    m.pool
        .with_label_values(&["available"])
        .set(status.available as i64);
    m.pool
        .with_label_values(&["waiting"])
        .set(status.waiting as i64);
    if let Some(age) = state.service.global().age() {
        m.state_age.set(age.as_secs_f64());
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(super::ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_static_healthz_body_is_status_ok_serialised() {
        let body = serde_json::to_string(&super::Status {
            status: "ok",
            redis_settings: None,
        })
        .unwrap();
        assert_eq!(body, r#"{"status":"ok"}"#);
    }
}
