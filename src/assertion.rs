//! `X-Session-Assertion`: a signed identity for upstreams (opt-in,
//! `upstream_assertion`).
//!
//! Plain `X-Session-*` headers are only as trustworthy as the network: any
//! client that reaches the upstream directly can set them. With this on,
//! every successful verify (HTTP and gRPC) also carries a short-lived JWT,
//! signed with the active kid's Ed25519 key (`crate::jwks`, public halves at
//! `/.well-known/jwks.json`):
//!
//! ```json
//! {"iss": "<issuer>", "aud": "<upstream_assertion_audience>",
//!  "sub": "<user>", "sid": "<session>", "did": "<device>",
//!  "auth_time": <s>, "iat": <s>, "exp": <iat + upstream_assertion_lifetime>}
//! ```
//!
//! Signing on every verify would cost an Ed25519 signature per request, so
//! one assertion per session is reused while at least a third of its
//! lifetime is left, and as long as the session's `auth_time` and the active
//! kid are unchanged. The cache holds at least the last `verified_token_cache`
//! sessions' assertions and at most twice that (0: sign every time). It
//! never decides anything: an assertion is attached only after Redis
//! confirmed the session during this request.
//!
//! What an assertion proves: that sessiongate confirmed this session at
//! `iat` or later (at most `lifetime` before the upstream reads it). A
//! logout is final for the gateway at once; an upstream that accepts a
//! replayed assertion accepts it for at most its remaining lifetime.

use std::sync::Arc;

use actix_web::http::header::HeaderValue;
use serde::Serialize;

use crate::config::Settings;
use crate::jwks::AsymRing;
use crate::session::ActiveSession;
use crate::token::GenerationCache;

/// The claims of an assertion.
#[derive(Debug, Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    sid: &'a str,
    did: &'a str,
    auth_time: i64,
    iat: u64,
    exp: u64,
}

/// One signed assertion and what it was signed for.
struct Signed {
    header: HeaderValue,
    kid: Box<str>,
    auth_time_ms: i64,
    /// Reused until this time (s); signed anew after it.
    renew_at_s: u64,
}

/// Makes (and reuses) the assertions.
pub struct Assertions {
    issuer: String,
    audience: String,
    lifetime_s: u64,
    cache: Option<GenerationCache<Arc<Signed>>>,
}

impl Assertions {
    /// `None` when `upstream_assertion` is off.
    pub fn from_settings(settings: &Settings) -> Option<Assertions> {
        settings.upstream_assertion.then(|| {
            Assertions::new(
                &settings.issuer,
                &settings.upstream_assertion_audience,
                settings.upstream_assertion_lifetime.as_secs(),
                settings.verified_token_cache,
            )
        })
    }

    pub fn new(issuer: &str, audience: &str, lifetime_s: u64, cache: usize) -> Assertions {
        Assertions {
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            lifetime_s,
            cache: (cache > 0).then(|| GenerationCache::new(cache)),
        }
    }

    /// The assertion for a session Redis has just confirmed, whose
    /// password was last checked at `auth_time_ms`.
    pub fn header_for(
        &self,
        ring: &AsymRing,
        active: &ActiveSession,
        auth_time_ms: i64,
        now_ms: i64,
    ) -> HeaderValue {
        let now_s = (now_ms / 1000).max(0) as u64;
        let session = active.token.session.as_str();
        if let Some(cache) = &self.cache
            && let Some(hit) = cache.get(session)
            && now_s < hit.renew_at_s
            && hit.auth_time_ms == auth_time_ms
            && *hit.kid == *ring.active_kid()
        {
            return hit.header.clone();
        }
        let claims = AssertionClaims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: active.token.user.as_str(),
            sid: session,
            did: active.token.device.as_str(),
            auth_time: auth_time_ms.div_euclid(1000),
            iat: now_s,
            exp: now_s + self.lifetime_s,
        };
        let header = HeaderValue::from_str(&ring.sign_jwt(&claims))
            .expect("a compact JWS is a valid header value");
        if let Some(cache) = &self.cache {
            cache.insert(
                session.into(),
                Arc::new(Signed {
                    header: header.clone(),
                    kid: ring.active_kid().into(),
                    auth_time_ms,
                    // Reused while at least a third of the lifetime is left.
                    renew_at_s: now_s + self.lifetime_s - self.lifetime_s / 3,
                }),
            );
        }
        header
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DeviceId, SessionId, UserId};
    use crate::token::VerifiedToken;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn active(user: &str, device: &str) -> ActiveSession {
        let user = UserId::parse(user).unwrap();
        let session = SessionId::generate(&user.tag());
        let value = |v: &str| HeaderValue::from_str(v).unwrap();
        ActiveSession {
            token: Arc::new(VerifiedToken {
                identity_headers: [value(user.as_str()), value(session.as_str()), value(device)],
                user,
                session,
                device: DeviceId::parse(device).unwrap(),
                iat: 0,
                exp: 0,
                kid: "k1".into(),
            }),
            record: None,
        }
    }

    fn ring(active: &str) -> AsymRing {
        AsymRing::derive(SECRET, [("k1", None), ("k2", None)], active)
    }

    #[derive(serde::Deserialize, Debug)]
    struct Got {
        iss: String,
        aud: String,
        sub: String,
        sid: String,
        did: String,
        auth_time: i64,
        iat: u64,
        exp: u64,
    }

    fn decode(ring: &AsymRing, jwt: &HeaderValue) -> Got {
        let jwt = jwt.to_str().unwrap();
        let kid = jsonwebtoken::decode_header(jwt).unwrap().kid.unwrap();
        let x = ring
            .jwks(0)
            .keys
            .into_iter()
            .find(|k| k.kid == kid)
            .unwrap()
            .x;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&["https://app.example"]);
        v.set_issuer(&["sessiongate"]);
        v.validate_exp = false;
        jsonwebtoken::decode::<Got>(jwt, &DecodingKey::from_ed_components(&x).unwrap(), &v)
            .unwrap()
            .claims
    }

    #[test]
    fn an_assertion_carries_the_session_and_is_reused_until_renewal() {
        let a = Assertions::new("sessiongate", "https://app.example", 60, 16);
        let s = active("alice", "laptop");
        let r = ring("k1");
        let t0 = 1_700_000_000_000;
        let first = a.header_for(&r, &s, t0 - 3_600_500, t0);
        let got = decode(&r, &first);
        assert_eq!(
            (
                got.iss.as_str(),
                got.aud.as_str(),
                got.sub.as_str(),
                got.did.as_str()
            ),
            ("sessiongate", "https://app.example", "alice", "laptop")
        );
        assert_eq!(got.sid, s.token.session.as_str());
        assert_eq!(got.auth_time, (t0 - 3_600_500).div_euclid(1000));
        assert_eq!(got.exp, got.iat + 60);
        // Reused while two thirds of the lifetime have not passed.
        assert_eq!(a.header_for(&r, &s, t0 - 3_600_500, t0 + 39_000), first);
        // Renewed after that, with a fresh iat.
        let later = a.header_for(&r, &s, t0 - 3_600_500, t0 + 40_000);
        assert_ne!(later, first);
        assert_eq!(decode(&r, &later).iat, t0 as u64 / 1000 + 40);
        // A new password check, or a rotation, gives a new one at once.
        let reauthed = a.header_for(&r, &s, t0 + 40_500, t0 + 41_000);
        assert_ne!(reauthed, later);
        assert_eq!(decode(&r, &reauthed).auth_time, (t0 + 40_500) / 1000);
        let rotated = ring("k2");
        let after = a.header_for(&rotated, &s, t0 + 40_500, t0 + 41_000);
        assert_eq!(
            jsonwebtoken::decode_header(after.to_str().unwrap())
                .unwrap()
                .kid
                .as_deref(),
            Some("k2")
        );
        // Another session never gets this one's.
        let other = active("bob", "phone");
        let theirs = a.header_for(&rotated, &other, t0, t0 + 41_000);
        assert_eq!(decode(&rotated, &theirs).sub, "bob");
    }

    #[test]
    fn without_a_cache_every_verify_signs() {
        let a = Assertions::new("sessiongate", "https://app.example", 60, 0);
        let s = active("alice", "laptop");
        let r = ring("k1");
        let one = a.header_for(&r, &s, 0, 1_000_000);
        let two = a.header_for(&r, &s, 0, 2_000_000);
        assert_ne!(one, two);
    }
}
