//! Request extractors: who is calling.
//!
//! API keys are compared in constant time: the presented key and every
//! configured key are hashed to 32 bytes and all of them are compared, so
//! neither the position nor the length of a match leaks through timing.
//! Admin and issuer rights are types (`AdminPrincipal`, `IssuerPrincipal`):
//! a handler that takes one cannot run for an unchecked caller.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::AppState;
use crate::config::Secret;
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Issuer,
    Admin,
}

/// The configured API keys, kept only as SHA-256 digests.
pub struct ApiKeys {
    issuer: Vec<[u8; 32]>,
    admin: Vec<[u8; 32]>,
}

impl ApiKeys {
    pub fn new(issuer: &[Secret], admin: &[Secret]) -> ApiKeys {
        let digest = |keys: &[Secret]| {
            keys.iter()
                .map(|k| Sha256::digest(k.expose().as_bytes()).into())
                .collect()
        };
        ApiKeys {
            issuer: digest(issuer),
            admin: digest(admin),
        }
    }

    /// The role of a presented key, if any; constant time over all keys.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let d: [u8; 32] = Sha256::digest(presented).into();
        let any = |keys: &[[u8; 32]]| {
            keys.iter()
                .fold(Choice::from(0), |acc, k| acc | k.ct_eq(&d))
        };
        let (admin, issuer) = (any(&self.admin), any(&self.issuer));
        if bool::from(admin) {
            Some(Role::Admin)
        } else if bool::from(issuer) {
            Some(Role::Issuer)
        } else {
            None
        }
    }
}

fn state(req: &HttpRequest) -> &AppState {
    req.app_data::<web::Data<AppState>>()
        .expect("AppState is registered")
}

/// More than one credential where one is expected (two `Authorization`
/// headers, or two cookies of the configured name): refused, never "the
/// first one wins", since a proxy and the backend may disagree on which one
/// that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate;

/// The credentials of `Authorization: Bearer <credentials>`, if present.
/// More than one `Authorization` header is `Err(Duplicate)`, whatever the
/// schemes.
pub fn bearer(req: &HttpRequest) -> Result<Option<&[u8]>, Duplicate> {
    let mut values = req.headers().get_all(header::AUTHORIZATION);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Duplicate);
    }
    let value = value.as_bytes();
    if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
        Ok(Some(value[7..].trim_ascii()))
    } else {
        Ok(None)
    }
}

/// Wrong API keys per peer: after `limit` failures within `window`, the
/// peer's refused calls get 429 until the window ends. A right key is never
/// counted and is accepted even from a blocked peer; other peers are not
/// affected. IPv6 peers count per /64
/// (one host usually holds a whole /64). In-process (per instance) and
/// bounded: at most `MAX_TRACKED_PEERS` addresses, pruned at most once per
/// second; past that, new addresses are not tracked until entries expire.
pub struct KeyFailures {
    limit: u32,
    window: Duration,
    state: Mutex<Tracked>,
}

#[derive(Default)]
struct Tracked {
    peers: HashMap<IpAddr, (u32, Instant)>,
    pruned: Option<Instant>,
}

const MAX_TRACKED_PEERS: usize = 100_000;

/// The address a peer is counted under.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

impl KeyFailures {
    pub fn new(limit: u32, window: Duration) -> Self {
        KeyFailures {
            limit,
            window,
            state: Mutex::new(Tracked::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds until the peer may try again, if it is blocked now.
    pub fn blocked(&self, peer: IpAddr) -> Option<u64> {
        if self.limit == 0 {
            return None;
        }
        let state = self.lock();
        let (count, since) = state.peers.get(&bucket(peer))?;
        let elapsed = since.elapsed();
        (*count >= self.limit && elapsed < self.window)
            .then(|| (self.window - elapsed).as_secs().max(1))
    }

    pub fn record(&self, peer: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let peer = bucket(peer);
        let mut state = self.lock();
        if state.peers.len() >= MAX_TRACKED_PEERS
            && !state.peers.contains_key(&peer)
            && state
                .pruned
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            let window = self.window;
            state.peers.retain(|_, (_, since)| since.elapsed() < window);
            state.pruned = Some(Instant::now());
        }
        if state.peers.len() >= MAX_TRACKED_PEERS && !state.peers.contains_key(&peer) {
            return;
        }
        let entry = state.peers.entry(peer).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.window {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

/// The role of the caller's API key. A right key is accepted even while its
/// peer address is throttled (a shared NAT or proxy must not lock the login
/// backend out); only a refused call is answered 429 while the peer is
/// blocked, and only a wrong key counts as a failure.
fn role(req: &HttpRequest) -> Result<Option<Role>, ApiError> {
    let state = state(req);
    let peer = req.peer_addr().map(|a| a.ip());
    let presented = bearer(req);
    // Compare first, and always (even for a blocked peer), so that the
    // answer's timing does not depend on the throttle state either.
    let role = match presented {
        Ok(Some(key)) => state.api_keys.role_of(key),
        Ok(None) | Err(Duplicate) => None,
    };
    if role.is_some() {
        return Ok(role);
    }
    if let Some(retry_after) = peer.and_then(|ip| state.key_failures.blocked(ip)) {
        return Err(ApiError::TooManyRequests { retry_after });
    }
    if !matches!(presented, Ok(None)) {
        if let Some(ip) = peer {
            state.key_failures.record(ip);
        }
        tracing::warn!(target: "audit", action = "api_key", outcome = "refused", peer = ?peer);
    }
    Ok(None)
}

/// Whether the caller holds an admin key, for endpoints open to anyone that
/// tell admins more (`/readyz`). A wrong key counts as a failure as
/// anywhere; a throttled caller is answered as anonymous.
pub fn holds_admin_key(req: &HttpRequest) -> bool {
    matches!(role(req), Ok(Some(Role::Admin)))
}

/// The caller holds an admin key.
pub struct AdminPrincipal;

impl FromRequest for AdminPrincipal {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(match role(req) {
            Ok(Some(Role::Admin)) => Ok(AdminPrincipal),
            Ok(Some(Role::Issuer)) => Err(ApiError::Forbidden),
            Ok(None) => Err(ApiError::Unauthorized),
            Err(e) => Err(e),
        })
    }
}

/// The caller holds an issuer key (the login backend).
pub struct IssuerPrincipal;

impl FromRequest for IssuerPrincipal {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(match role(req) {
            Ok(Some(Role::Issuer)) => Ok(IssuerPrincipal),
            Ok(Some(Role::Admin)) => Err(ApiError::Forbidden),
            Ok(None) => Err(ApiError::Unauthorized),
            Err(e) => Err(e),
        })
    }
}

/// The caller holds an issuer or an admin key (introspection).
pub struct KeyHolder(#[allow(dead_code)] pub Role);

impl FromRequest for KeyHolder {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(role(req).and_then(|r| r.map(KeyHolder).ok_or(ApiError::Unauthorized)))
    }
}

/// A user's token, from `Authorization: Bearer`, else from the cookie.
/// Only its presence is checked here; `SessionService` checks the rest.
pub struct BearerToken(pub String);

impl BearerToken {
    pub fn from_request_parts(req: &HttpRequest) -> Result<BearerToken, ApiError> {
        if let Some(raw) = bearer(req).map_err(|Duplicate| ApiError::InvalidToken)? {
            return std::str::from_utf8(raw)
                .ok()
                .filter(|t| !t.is_empty())
                .map(|t| BearerToken(t.to_string()))
                .ok_or(ApiError::InvalidToken);
        }
        let state = state(req);
        let token = the_cookie(req, &state.cookie_name)
            .map_err(|Duplicate| ApiError::InvalidToken)?
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::InvalidToken)?;
        state.origin.check_cookie_request(req)?;
        Ok(BearerToken(token))
    }
}

/// The value of the one cookie named `name`, over every `Cookie` header;
/// two of that name are `Err(Duplicate)`. Unparsable cookie headers count
/// as no cookie (as `HttpRequest::cookie` does).
fn the_cookie(req: &HttpRequest, name: &str) -> Result<Option<String>, Duplicate> {
    let Ok(cookies) = req.cookies() else {
        return Ok(None);
    };
    let mut named = cookies.iter().filter(|c| c.name() == name);
    let first = named.next().map(|c| c.value().to_string());
    if named.next().is_some() {
        return Err(Duplicate);
    }
    Ok(first)
}

impl FromRequest for BearerToken {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(BearerToken::from_request_parts(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_told_apart_and_near_misses_refused() {
        let issuer = Secret::new("i".repeat(40));
        let admin = Secret::new("a".repeat(40));
        let keys = ApiKeys::new(std::slice::from_ref(&issuer), std::slice::from_ref(&admin));
        assert_eq!(keys.role_of(issuer.expose().as_bytes()), Some(Role::Issuer));
        assert_eq!(keys.role_of(admin.expose().as_bytes()), Some(Role::Admin));
        assert_eq!(keys.role_of("i".repeat(39).as_bytes()), None);
        assert_eq!(keys.role_of(b""), None);
    }

    #[test]
    fn failures_block_one_peer_for_the_window_only() {
        let f = KeyFailures::new(3, Duration::from_millis(200));
        let bad: IpAddr = "10.0.0.1".parse().unwrap();
        let good: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(f.blocked(bad), None);
            f.record(bad);
        }
        assert!(f.blocked(bad).is_some());
        assert_eq!(f.blocked(good), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(f.blocked(bad), None);
    }

    #[test]
    fn ipv6_peers_count_per_64() {
        let f = KeyFailures::new(2, Duration::from_secs(60));
        f.record("2001:db8:1:2::1".parse().unwrap());
        f.record("2001:db8:1:2:ffff::9".parse().unwrap());
        assert!(f.blocked("2001:db8:1:2::77".parse().unwrap()).is_some());
        assert!(f.blocked("2001:db8:1:3::1".parse().unwrap()).is_none());
    }
}
