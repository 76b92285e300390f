//! `GET /.well-known/jwks.json`: the public keys of what sessiongate signs
//! for others to verify (upstream assertions, security event tokens).

use actix_web::http::header::{CACHE_CONTROL, HeaderValue};
use actix_web::{HttpResponse, web};

use super::AppState;
use crate::error::ApiError;

/// How long a verifier may keep the key set. A rotation makes a new kid
/// active at once, so a verifier that meets an unknown `kid` fetches the
/// set again (PyJWT's `PyJWKClient`, jose's `createRemoteJWKSet` do); this
/// bounds how stale the set of one that does not may get.
pub const JWKS_CACHE_CONTROL: &str = "public, max-age=60";

/// The JWK Set (RFC 7517) of the asymmetric keys: one Ed25519 key per kid
/// of the key ring not yet retired; rotated with `POST /v1/admin/keys/rotate`.
#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "operations",
    responses(
        (status = 200, description = "The public keys (RFC 7517 JWK Set, RFC 8037 Ed25519 keys)",
            body = crate::jwks::Jwks,
            headers(("Cache-Control" = String, description = "public, max-age=60"))),
        (status = 503, description = "store_unavailable: the key ring was never read yet", body = crate::error::ErrorBody),
    )
)]
pub async fn jwks(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let keys = state.service.jwks().ok_or(ApiError::StoreUnavailable)?;
    Ok(HttpResponse::Ok()
        .insert_header((CACHE_CONTROL, HeaderValue::from_static(JWKS_CACHE_CONTROL)))
        .json(keys))
}
