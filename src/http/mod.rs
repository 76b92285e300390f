//! The HTTP edge: routes, extractors, body limits and error shapes.
//! Handlers are thin: extract → authorise (by type) → call
//! `SessionService` → map to JSON.

pub mod admin;
pub mod events;
pub mod extract;
pub mod health;
pub mod introspect;
pub mod origin;
pub mod sessions;
pub mod verify;
pub mod wellknown;

use std::sync::Arc;

use actix_web::error::{JsonPayloadError, UrlencodedError};
use actix_web::{HttpRequest, web};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::session::SessionService;
use extract::ApiKeys;

/// What every handler shares, through `web::Data`.
pub struct AppState {
    pub service: Arc<SessionService>,
    pub api_keys: ApiKeys,
    pub metrics: Arc<Metrics>,
    pub cookie_name: String,
    pub origin: origin::OriginPolicy,
    pub key_failures: extract::KeyFailures,
    pub console: crate::console::Console,
    /// `X-Session-Assertion` on successful verifies, when on.
    pub assertions: Option<crate::assertion::Assertions>,
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sessiongate",
        description = "Revocable sessions for token-based apps: signed JWTs backed by Redis records."
    ),
    paths(
        verify::verify, verify::verify_tail_doc,
        sessions::create, sessions::current, sessions::logout, sessions::list,
        sessions::logout_others, sessions::logout_one, sessions::reauth,
        admin::list_user, admin::revoke_user, admin::revoke_device, admin::revoke_session,
        admin::logout_all, admin::rotate_key,
        events::events, events::user_events, events::session,
        introspect::introspect,
        health::healthz, health::readyz, health::metrics, health::openapi,
        wellknown::jwks,
    ),
    modifiers(&SecuritySchemes, &OperationIdPerMethod)
)]
pub struct ApiDoc;

/// utoipa gives every method of a `method(get, post, …)` path the handler's
/// one `operationId`, but an `operationId` must be unique in the document:
/// an id that occurs more than once becomes `<id>_<method>` on each.
struct OperationIdPerMethod;

impl Modify for OperationIdPerMethod {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        fn operations(
            item: &mut utoipa::openapi::PathItem,
        ) -> [(&'static str, &mut Option<utoipa::openapi::path::Operation>); 8] {
            [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("options", &mut item.options),
                ("head", &mut item.head),
                ("patch", &mut item.patch),
                ("trace", &mut item.trace),
            ]
        }
        let mut seen = std::collections::HashMap::<String, usize>::new();
        for item in openapi.paths.paths.values_mut() {
            for (_, op) in operations(item) {
                if let Some(id) = op.as_ref().and_then(|op| op.operation_id.clone()) {
                    *seen.entry(id).or_default() += 1;
                }
            }
        }
        for item in openapi.paths.paths.values_mut() {
            for (method, op) in operations(item) {
                if let Some(id) = op.as_mut().and_then(|op| op.operation_id.as_mut())
                    && seen[id.as_str()] > 1
                {
                    *id = format!("{id}_{method}");
                }
            }
        }
    }
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |format: &str, description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format(format)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "session_token",
            bearer("JWT", "A user's token (or the configured cookie)."),
        );
        components.add_security_scheme(
            "issuer_key",
            bearer("API key", "A key of the login backend."),
        );
        components.add_security_scheme("admin_key", bearer("API key", "An operator key."));
    }
}

/// Registers every route, with JSON errors for bad bodies and unknown routes.
pub fn configure(cfg: &mut web::ServiceConfig, body_limit: usize) {
    let not_allowed = |allow: &'static str| {
        web::to(move || async move { Err::<String, _>(ApiError::MethodNotAllowed { allow }) })
    };
    cfg.app_data(
        web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(json_error),
    )
    .app_data(
        web::FormConfig::default()
            .limit(body_limit)
            .error_handler(form_error),
    )
    .app_data(web::PayloadConfig::new(body_limit))
    .app_data(web::PathConfig::default().error_handler(|_, _| ApiError::NotFound.into()))
    .app_data(
        web::QueryConfig::default()
            .error_handler(|_, _| ApiError::InvalidRequest("malformed query string".into()).into()),
    )
    // The hot path first, as a static path (matched by comparison, not by
    // the router's regex engine); the `{tail}` form right after.
    .service(web::resource("/v1/verify").route(web::route().to(verify::verify)))
    // The liveness probe next (polled often; matched before the
    // `{tail}` regex and the other dynamic routes).
    .service(
        web::resource("/healthz")
            .route(web::get().to(health::healthz))
            .route(web::head().to(health::healthz))
            .default_service(not_allowed("GET, HEAD")),
    )
    .service(web::resource("/v1/verify/{tail:.*}").route(web::route().to(verify::verify_tail)))
    .service(
        web::resource("/v1/sessions")
            .route(web::post().to(sessions::create))
            .route(web::get().to(sessions::list))
            .route(web::delete().to(sessions::logout_others))
            .default_service(not_allowed("GET, POST, DELETE")),
    )
    .service(
        web::resource("/v1/sessions/current")
            .route(web::get().to(sessions::current))
            .route(web::delete().to(sessions::logout))
            .default_service(not_allowed("GET, DELETE")),
    )
    .service(
        web::resource("/v1/sessions/{session_id}")
            .route(web::delete().to(sessions::logout_one))
            .default_service(not_allowed("DELETE")),
    )
    .service(
        web::resource("/v1/sessions/{session_id}/reauth")
            .route(web::post().to(sessions::reauth))
            .default_service(not_allowed("POST")),
    )
    .service(
        web::resource("/v1/admin/users/{user_id}/sessions")
            .route(web::get().to(admin::list_user))
            .route(web::delete().to(admin::revoke_user))
            .default_service(not_allowed("GET, DELETE")),
    )
    .service(
        web::resource("/v1/admin/users/{user_id}/devices/{device_id}")
            .route(web::delete().to(admin::revoke_device))
            .default_service(not_allowed("DELETE")),
    )
    .service(
        web::resource("/v1/admin/sessions/{session_id}")
            .route(web::get().to(events::session))
            .route(web::delete().to(admin::revoke_session))
            .default_service(not_allowed("GET, DELETE")),
    )
    .service(
        web::resource("/v1/admin/events")
            .route(web::get().to(events::events))
            .default_service(not_allowed("GET")),
    )
    .service(
        web::resource("/v1/admin/users/{user_id}/events")
            .route(web::get().to(events::user_events))
            .default_service(not_allowed("GET")),
    )
    .service(
        web::resource("/v1/admin/logout-all")
            .route(web::post().to(admin::logout_all))
            .default_service(not_allowed("POST")),
    )
    .service(
        web::resource("/v1/admin/keys/rotate")
            .route(web::post().to(admin::rotate_key))
            .default_service(not_allowed("POST")),
    )
    .service(
        web::resource("/v1/introspect")
            .route(web::post().to(introspect::introspect))
            .default_service(not_allowed("POST")),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(health::readyz))
            .route(web::head().to(health::readyz))
            .default_service(not_allowed("GET, HEAD")),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(health::metrics))
            .route(web::head().to(health::metrics))
            .default_service(not_allowed("GET, HEAD")),
    )
    .service(
        web::resource("/.well-known/jwks.json")
            .route(web::get().to(wellknown::jwks))
            .route(web::head().to(wellknown::jwks))
            .default_service(not_allowed("GET, HEAD")),
    )
    // The admin console's pages (own error pages and security headers).
    .service(crate::console::scope())
    .service(
        web::resource("/openapi.json")
            .route(web::get().to(health::openapi))
            .route(web::head().to(health::openapi))
            .default_service(not_allowed("GET, HEAD")),
    )
    .default_service(web::to(|| async { Err::<String, _>(ApiError::NoRoute) }));
}

fn json_error(err: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let api = match &err {
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            ApiError::PayloadTooLarge
        }
        JsonPayloadError::ContentType => {
            ApiError::InvalidRequest("the body must be application/json".into())
        }
        JsonPayloadError::Deserialize(e) => {
            ApiError::InvalidRequest(format!("malformed JSON: {e}"))
        }
        _ => ApiError::InvalidRequest("malformed request body".into()),
    };
    api.into()
}

fn form_error(err: UrlencodedError, _: &HttpRequest) -> actix_web::Error {
    let api = match &err {
        UrlencodedError::Overflow { .. } => ApiError::PayloadTooLarge,
        UrlencodedError::ContentType => {
            ApiError::InvalidRequest("the body must be application/x-www-form-urlencoded".into())
        }
        // The form carries a token: never echo its parse error.
        _ => ApiError::InvalidRequest("malformed form body (token is required)".into()),
    };
    api.into()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use utoipa::OpenApi;

    use super::ApiDoc;

    /// Two rules of OpenAPI that `openapi-spec-validator` enforces (and
    /// `scripts/openapi-check` runs it): operation ids are unique, and path
    /// parameters are exactly the path template's names.
    #[test]
    fn operation_ids_are_unique_and_path_parameters_match_the_template() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let mut ids = HashMap::<String, usize>::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if let Some(id) = op["operationId"].as_str() {
                    *ids.entry(id.to_string()).or_default() += 1;
                }
                let params = op["parameters"].as_array().cloned().unwrap_or_default();
                for p in &params {
                    let name = p["name"].as_str().unwrap();
                    if p["in"] == "path" {
                        assert!(
                            path.contains(&format!("{{{name}}}")),
                            "{method} {path}: path parameter {name} is not in the path"
                        );
                        assert_eq!(p["required"], true, "{method} {path}: {name}");
                    }
                }
                for name in path.split('{').skip(1).filter_map(|s| s.split('}').next()) {
                    assert!(
                        params
                            .iter()
                            .any(|p| p["in"] == "path" && p["name"] == name),
                        "{method} {path}: {name} is not declared"
                    );
                }
            }
        }
        let repeated: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
        assert!(repeated.is_empty(), "repeated operation ids: {repeated:?}");
        // The verify paths serve seven methods each, under distinct ids.
        assert!(ids.contains_key("verify_get") && ids.contains_key("verify_tail_patch"));
    }

    #[test]
    fn max_age_is_an_optional_query_parameter_of_both_verify_forms() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in ["/v1/verify", "/v1/verify/{tail}"] {
            for method in ["get", "head", "post", "put", "patch", "delete", "options"] {
                let params = doc["paths"][path][method]["parameters"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{method} {path} has no parameters"));
                let max_age = params
                    .iter()
                    .find(|p| p["name"] == "max_age")
                    .unwrap_or_else(|| panic!("{method} {path}: no max_age"));
                assert_eq!(max_age["in"], "query", "{method} {path}");
                assert_ne!(max_age["required"], true, "{method} {path}");
            }
        }
    }
}
