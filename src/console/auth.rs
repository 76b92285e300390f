//! Console sign-in: the admin key is exchanged for a short-lived signed
//! cookie, and every form carries a CSRF token bound to that cookie.
//!
//! The cookie is `<expires_ms>.<nonce>.<mac>`: an HMAC-SHA256 over the
//! first two parts with a key derived from the signing secret under its own
//! HKDF label, so it cannot be forged, extended or moved to another
//! deployment, and the admin key itself never reaches the browser. Sign-out
//! clears the cookie and remembers its nonce until its expiry (in this
//! process; the cookie is short-lived, so another instance accepts a copy of
//! it at most until then).
//!
//! CSRF: a form's token is an HMAC of the cookie under a second derived key,
//! so it is only valid with that very cookie. The sign-in form, before any
//! session exists, is bound the same way to a random pre-sign-in cookie.
//! Unsafe requests must also be same-origin by `Origin` and
//! `Sec-Fetch-Site`, when the browser sends them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::header;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;
use crate::http::origin::OriginPolicy;

/// The console session cookie.
pub const COOKIE: &str = "sessiongate_console";
/// The pre-sign-in cookie the sign-in form's CSRF token is bound to.
pub const LOGIN_COOKIE: &str = "sessiongate_console_login";
/// Every console cookie is scoped to the console's paths.
pub const COOKIE_PATH: &str = "/admin";

const HKDF_SALT: &[u8] = b"sessiongate/console/v1";
const MAX_SIGNED_OUT: usize = 100_000;

type HmacSha256 = Hmac<Sha256>;

/// A verified console session (its cookie value and when it ends).
#[derive(Debug, Clone)]
pub struct ConsoleSession {
    pub value: String,
    pub expires_ms: i64,
    nonce: String,
}

pub struct ConsoleAuth {
    cookie_key: [u8; 32],
    csrf_key: [u8; 32],
    pub ttl: Duration,
    /// Fingerprints of the configured admin keys (see [`ConsoleAuth::fingerprint`]):
    /// a cookie names the key it was signed in with, and is refused once
    /// that key is no longer configured.
    admin_keys: Vec<String>,
    /// Nonces of signed-out sessions → their expiry (ms).
    signed_out: Mutex<HashMap<String, i64>>,
}

fn derive(secret: &Secret, label: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(HKDF_SALT), secret.expose().as_bytes())
        .expand(label.as_bytes(), &mut out)
        .expect("32 bytes is a valid HKDF output length");
    out
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
        // A separator no part can contain, so (a, bc) and (ab, c) differ.
        m.update(b"\n");
    }
    m
}

fn random_b64(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random generator is available");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether `presented` (base64url) is the MAC of `parts`, in constant time.
fn mac_ok(key: &[u8; 32], parts: &[&[u8]], presented: &str) -> bool {
    match URL_SAFE_NO_PAD.decode(presented) {
        Ok(raw) => mac(key, parts).verify_slice(&raw).is_ok(),
        Err(_) => false,
    }
}

impl ConsoleAuth {
    pub fn new(secret: &Secret, ttl: Duration, admin_keys: &[Secret]) -> ConsoleAuth {
        let cookie_key = derive(secret, "console-session-cookie");
        ConsoleAuth {
            admin_keys: admin_keys
                .iter()
                .map(|k| Self::fingerprint(&cookie_key, k.expose().as_bytes()))
                .collect(),
            cookie_key,
            csrf_key: derive(secret, "console-csrf-token"),
            ttl,
            signed_out: Mutex::new(HashMap::new()),
        }
    }

    /// A short keyed fingerprint of an admin key: names it in a cookie
    /// without revealing anything about it.
    fn fingerprint(cookie_key: &[u8; 32], admin_key: &[u8]) -> String {
        let tag = mac(cookie_key, &[b"admin-key", admin_key])
            .finalize()
            .into_bytes();
        URL_SAFE_NO_PAD.encode(&tag[..12])
    }

    /// A new session cookie value for a sign-in with `admin_key`, valid
    /// until now + ttl and while that key stays configured.
    pub fn issue(&self, now_ms: i64, admin_key: &[u8]) -> ConsoleSession {
        let expires_ms = now_ms + self.ttl.as_millis() as i64;
        let nonce = random_b64(16);
        let key = Self::fingerprint(&self.cookie_key, admin_key);
        let payload = format!("{expires_ms}.{key}.{nonce}");
        let tag = mac(&self.cookie_key, &[b"session", payload.as_bytes()])
            .finalize()
            .into_bytes();
        ConsoleSession {
            value: format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag)),
            expires_ms,
            nonce,
        }
    }

    /// The session a cookie value stands for, if it is genuine, unexpired,
    /// signed in with an admin key still configured, and not signed out.
    pub fn check(&self, value: &str, now_ms: i64) -> Option<ConsoleSession> {
        let (payload, tag) = value.rsplit_once('.')?;
        if !mac_ok(&self.cookie_key, &[b"session", payload.as_bytes()], tag) {
            return None;
        }
        let mut parts = payload.splitn(3, '.');
        let (expires, key, nonce) = (parts.next()?, parts.next()?, parts.next()?);
        let expires_ms: i64 = expires.parse().ok()?;
        if expires_ms <= now_ms {
            return None;
        }
        if !self.admin_keys.iter().any(|k| k == key) {
            return None;
        }
        if self.lock().contains_key(nonce) {
            return None;
        }
        Some(ConsoleSession {
            value: value.to_string(),
            expires_ms,
            nonce: nonce.to_string(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.signed_out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a session: its cookie is refused from now on, here.
    pub fn sign_out(&self, session: &ConsoleSession, now_ms: i64) {
        let mut out = self.lock();
        out.retain(|_, expires| *expires > now_ms);
        if out.len() < MAX_SIGNED_OUT {
            out.insert(session.nonce.clone(), session.expires_ms);
        }
    }

    /// The CSRF token of the forms shown to this session.
    pub fn csrf_for(&self, session: &ConsoleSession) -> String {
        let tag = mac(&self.csrf_key, &[b"csrf", session.value.as_bytes()])
            .finalize()
            .into_bytes();
        URL_SAFE_NO_PAD.encode(tag)
    }

    pub fn csrf_ok(&self, session: &ConsoleSession, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| mac_ok(&self.csrf_key, &[b"csrf", session.value.as_bytes()], p))
    }

    /// A new pre-sign-in nonce (the value of `LOGIN_COOKIE`).
    pub fn login_nonce(&self) -> String {
        random_b64(16)
    }

    /// The sign-in form's CSRF token for a pre-sign-in nonce.
    pub fn login_csrf(&self, nonce: &str) -> String {
        let tag = mac(&self.csrf_key, &[b"login", nonce.as_bytes()])
            .finalize()
            .into_bytes();
        URL_SAFE_NO_PAD.encode(tag)
    }

    pub fn login_csrf_ok(&self, nonce: Option<&str>, presented: Option<&str>) -> bool {
        match (nonce, presented) {
            (Some(n), Some(p)) if !n.is_empty() => {
                mac_ok(&self.csrf_key, &[b"login", n.as_bytes()], p)
            }
            _ => false,
        }
    }
}

/// Whether the browser reached us over https: the TLS listener itself, or a
/// trusted gateway's `X-Forwarded-Proto` (nobody else's is believed).
pub fn is_https(req: &HttpRequest, origin: &OriginPolicy) -> bool {
    if origin.trusted(req)
        && let Some(proto) = req
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
    {
        return proto.eq_ignore_ascii_case("https");
    }
    req.app_config().secure()
}

/// A console cookie with every attribute the console requires.
pub fn cookie(
    name: &'static str,
    value: String,
    max_age: Duration,
    secure: bool,
) -> Cookie<'static> {
    Cookie::build(name, value)
        .path(COOKIE_PATH)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(actix_web::cookie::time::Duration::seconds(
            max_age.as_secs() as i64,
        ))
        .finish()
}

/// A cookie that deletes `name` (same attributes, expired).
pub fn removal(name: &'static str, secure: bool) -> Cookie<'static> {
    let mut c = cookie(name, String::new(), Duration::ZERO, secure);
    c.make_removal();
    c
}

/// Refuses an unsafe request that a browser marked as cross-site.
/// `Sec-Fetch-Site`, when sent, must be `same-origin`; it is decisive,
/// because under `Referrer-Policy: no-referrer` browsers send `Origin: null`
/// even for a same-origin form. An `Origin` naming a host must be this host;
/// `Origin: null` without `Sec-Fetch-Site` (a sandboxed frame, an old
/// browser) is refused. Non-browser clients send neither (the CSRF token
/// still applies to them).
pub fn same_origin(req: &HttpRequest, origin: &OriginPolicy) -> bool {
    let headers = req.headers();
    let fetch_site = headers.get("sec-fetch-site");
    if fetch_site.is_some_and(|site| site.as_bytes() != b"same-origin") {
        return false;
    }
    let Some(given) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(given) = given.to_str() else {
        return false;
    };
    if given == "null" {
        return fetch_site.is_some();
    }
    let Some((scheme, authority)) = given.trim_end_matches('/').split_once("://") else {
        return false;
    };
    let trusted = origin.trusted(req);
    let forwarded = |name: &str| trusted.then(|| headers.get(name)?.to_str().ok()).flatten();
    let host = forwarded("x-forwarded-host").or_else(|| headers.get(header::HOST)?.to_str().ok());
    let want_scheme = if is_https(req, origin) {
        "https"
    } else {
        "http"
    };
    host.is_some_and(|h| h.eq_ignore_ascii_case(authority))
        && scheme.eq_ignore_ascii_case(want_scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"admin-key-0123456789abcdef0123456789abc";

    fn auth() -> ConsoleAuth {
        ConsoleAuth::new(
            &Secret::new("s".repeat(40)),
            Duration::from_secs(60),
            &[Secret::new(String::from_utf8(KEY.to_vec()).unwrap())],
        )
    }

    #[test]
    fn a_cookie_is_refused_once_its_admin_key_is_removed() {
        let secret = Secret::new("s".repeat(40));
        let ttl = Duration::from_secs(60);
        let other = Secret::new("another-admin-key-0123456789abcdef0123");
        let both = ConsoleAuth::new(
            &secret,
            ttl,
            &[
                Secret::new(String::from_utf8(KEY.to_vec()).unwrap()),
                other.clone(),
            ],
        );
        let s = both.issue(1_000, KEY);
        assert!(both.check(&s.value, 1_000).is_some());
        // Same secret, the key that signed in is gone (rotated out after a leak).
        let rotated = ConsoleAuth::new(&secret, ttl, &[other]);
        assert!(rotated.check(&s.value, 1_000).is_none());
        assert!(
            !s.value.contains("admin-key"),
            "the key itself is not in the cookie"
        );
    }

    #[test]
    fn a_cookie_checks_until_expiry_and_not_after_tampering() {
        let a = auth();
        let s = a.issue(1_000, KEY);
        assert!(a.check(&s.value, 1_000).is_some());
        assert!(a.check(&s.value, 60_999).is_some());
        assert!(a.check(&s.value, 61_000).is_none(), "expired");
        // A later expiry with the old MAC.
        let (_, rest) = s.value.split_once('.').unwrap();
        assert!(a.check(&format!("99999999999.{rest}"), 1_000).is_none());
        // Another secret's cookie.
        let other = ConsoleAuth::new(
            &Secret::new("t".repeat(40)),
            Duration::from_secs(60),
            &[Secret::new(String::from_utf8(KEY.to_vec()).unwrap())],
        );
        assert!(other.check(&s.value, 1_000).is_none());
        assert!(a.check("", 1_000).is_none());
        assert!(a.check("1.2.3", 1_000).is_none());
        assert!(a.check("1.2.3.4", 1_000).is_none());
    }

    #[test]
    fn csrf_tokens_bind_to_their_session_and_sign_out_sticks() {
        let a = auth();
        let s1 = a.issue(1_000, KEY);
        let s2 = a.issue(1_000, KEY);
        let t1 = a.csrf_for(&s1);
        assert!(a.csrf_ok(&s1, Some(&t1)));
        assert!(!a.csrf_ok(&s2, Some(&t1)));
        assert!(!a.csrf_ok(&s1, None));
        assert!(!a.csrf_ok(&s1, Some("")));
        let n = a.login_nonce();
        assert!(a.login_csrf_ok(Some(&n), Some(&a.login_csrf(&n))));
        assert!(!a.login_csrf_ok(None, Some(&a.login_csrf(&n))));
        assert!(!a.login_csrf_ok(Some(&n), Some(&t1)));
        a.sign_out(&s1, 2_000);
        assert!(a.check(&s1.value, 2_000).is_none());
        assert!(a.check(&s2.value, 2_000).is_some());
    }
}
