//! Tokens: signing, strict verification, and the key ring.
//!
//! Signing keys derive from the signing secret and a key id with
//! HKDF-SHA256, so Redis only ever stores key ids. The ring (which kid signs,
//! which older kids still verify until they retire) lives in Redis and every
//! instance follows it.
//!
//! Verification refuses, without any Redis call: tokens over the size cap,
//! anything but three base64url parts, a header other than exactly
//! `{"alg","typ"?,"kid"}` (so `jku`, `jwk`, `x5u`, `crit`… are refused, never
//! followed), any `alg` but the configured one (`none` included), an unknown
//! or retired kid, a bad signature, missing or mistyped claims, `exp` past,
//! `nbf` or `iat` in the future (with at most 5 s leeway), and ids that do
//! not match each other (the session id carries its user's tag).
//!
//! One case is not a refusal: a well-formed kid this instance has never
//! seen, with a signature and claims that check out against the key derived
//! for it, is [`TokenError::UnseenKey`] (a rotation made by another
//! instance, not read here yet); the caller re-reads the ring once and
//! retries. A retired kid, or one an earlier ring held, is never that.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::domain::{DeviceId, SessionId, UserId};
use actix_web::http::header::HeaderValue;

/// The claims sessiongate writes and requires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub sid: String,
    pub did: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// A token that passed every in-process check; Redis decides the rest.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub user: UserId,
    pub session: SessionId,
    pub device: DeviceId,
    pub iat: u64,
    pub exp: u64,
    /// The key that signed it: checked against the ring on every use.
    pub kid: String,
    /// `X-Session-User`, `X-Session-Id`, `X-Session-Device`, built once per
    /// token (a cached token's verify copies no header text).
    pub identity_headers: [HeaderValue; 3],
}

/// The three identity headers, as slices of one buffer: a verify clones
/// them into its answer, and one shared buffer is one reference count to
/// touch (not three, each in its own allocation).
fn identity_headers(values: [&str; 3]) -> Result<[HeaderValue; 3], TokenError> {
    let all = bytes::Bytes::from(values.concat());
    let mut at = 0;
    let mut next = |v: &str| {
        let part = all.slice(at..at + v.len());
        at += v.len();
        HeaderValue::from_maybe_shared(part).map_err(|_| TokenError::Claims)
    };
    Ok([next(values[0])?, next(values[1])?, next(values[2])?])
}

/// Why a token was refused (for logs and metrics; the client only ever
/// sees `invalid_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token too large")]
    TooLarge,
    #[error("token malformed")]
    Malformed,
    #[error("token header refused")]
    Header,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("unknown or retired key id")]
    UnknownKey,
    /// Correctly signed with the key derived for a well-formed kid this
    /// instance has never seen: maybe a rotation another instance made, not
    /// read here yet. The caller may refresh the ring once and retry.
    #[error("key id not seen yet")]
    UnseenKey,
    #[error("signature or claims invalid")]
    Invalid,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("claims inconsistent")]
    Claims,
}

/// One signing key of the ring.
pub struct RingKey {
    pub kid: String,
    /// When the key stops verifying (ms); `None` while it is active.
    pub retire_at_ms: Option<i64>,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The set of keys tokens may be signed with.
pub struct KeyRing {
    pub active: String,
    keys: Vec<RingKey>,
    /// Kids an earlier copy of the ring held and this one no longer does
    /// (retired and dropped): refused as retired, never looked up again.
    gone: HashSet<String>,
    /// For deriving the key of a kid not in the ring (see `UnseenKey`).
    secret: Box<[u8]>,
    alg: Algorithm,
    /// The Ed25519 key of each kid, for what others verify (`jwks`).
    asym: crate::jwks::AsymRing,
}

/// What the ring says about a kid.
enum Lookup<'a> {
    Valid(&'a RingKey),
    /// Retired, or dropped after retiring: refused, no Redis call.
    Retired,
    /// Never seen by this instance.
    Unseen,
}

/// Most kids remembered as gone; a ring rotates rarely, so this is never
/// reached in practice, it only bounds memory.
const MAX_GONE_KIDS: usize = 4096;

#[derive(Deserialize)]
struct RingJson {
    active: String,
    keys: Vec<RingEntryJson>,
}

#[derive(Deserialize)]
struct RingEntryJson {
    kid: String,
    retire_at: f64,
}

impl KeyRing {
    /// Builds the ring from its stored JSON, deriving each key.
    pub fn from_json(json: &str, secret: &[u8], alg: Algorithm) -> Result<KeyRing, String> {
        let parsed: RingJson =
            serde_json::from_str(json).map_err(|e| format!("bad key ring: {e}"))?;
        let keys = parsed
            .keys
            .into_iter()
            .map(|k| {
                let material = derive_key(secret, &k.kid, alg);
                RingKey {
                    retire_at_ms: (k.retire_at > 0.0).then_some(k.retire_at as i64),
                    encoding: EncodingKey::from_secret(&material),
                    decoding: DecodingKey::from_secret(&material),
                    kid: k.kid,
                }
            })
            .collect::<Vec<_>>();
        if !keys.iter().any(|k| k.kid == parsed.active) {
            return Err("bad key ring: the active kid has no entry".into());
        }
        let asym = crate::jwks::AsymRing::derive(
            secret,
            keys.iter().map(|k| (k.kid.as_str(), k.retire_at_ms)),
            &parsed.active,
        );
        Ok(KeyRing {
            asym,
            active: parsed.active,
            keys,
            gone: HashSet::new(),
            secret: secret.into(),
            alg,
        })
    }

    /// Remembers as gone every kid `previous` knew that this ring does not.
    pub fn inherit_gone(&mut self, previous: &KeyRing) {
        let dropped = previous
            .keys
            .iter()
            .map(|k| &k.kid)
            .chain(previous.gone.iter())
            .filter(|kid| !self.keys.iter().any(|k| &k.kid == *kid));
        for kid in dropped {
            if self.gone.len() >= MAX_GONE_KIDS {
                break;
            }
            self.gone.insert(kid.clone());
        }
    }

    /// The asymmetric (Ed25519) keys of the same kids: sign what others
    /// verify with `asym().sign_jwt(..)`, publish `asym().jwks(now)`.
    pub fn asym(&self) -> &crate::jwks::AsymRing {
        &self.asym
    }

    /// Whether this instance has seen `kid` (valid, retired or dropped).
    pub fn knows(&self, kid: &str) -> bool {
        self.gone.contains(kid) || self.keys.iter().any(|k| k.kid == kid)
    }

    fn lookup(&self, kid: &str, now_ms: i64) -> Lookup<'_> {
        match self.keys.iter().find(|k| k.kid == kid) {
            Some(k) if k.retire_at_ms.is_none_or(|t| t > now_ms) => Lookup::Valid(k),
            Some(_) => Lookup::Retired,
            None if self.gone.contains(kid) => Lookup::Retired,
            None => Lookup::Unseen,
        }
    }

    fn get(&self, kid: &str, now_ms: i64) -> Option<&RingKey> {
        match self.lookup(kid, now_ms) {
            Lookup::Valid(k) => Some(k),
            _ => None,
        }
    }

    fn active_key(&self) -> &RingKey {
        self.keys
            .iter()
            .find(|k| k.kid == self.active)
            .expect("checked in from_json")
    }
}

/// Whether `kid` has the shape [`new_kid`] gives (16 base64url characters):
/// only such kids are worth deriving a key for when unseen.
fn well_formed_kid(kid: &str) -> bool {
    kid.len() == 16
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The `kid` of a token's header, if it has one (no other check).
pub fn kid_of(token: &str) -> Option<String> {
    let header = URL_SAFE_NO_PAD.decode(token.split('.').next()?).ok()?;
    let header: StrictHeader = serde_json::from_slice(&header).ok()?;
    Some(header.kid)
}

/// A new random key id.
pub fn new_kid() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the OS random generator is available");
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn derive_key(secret: &[u8], kid: &str, alg: Algorithm) -> Vec<u8> {
    let len = match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    };
    let mut out = vec![0u8; len];
    Hkdf::<Sha256>::new(Some(b"sessiongate/v1"), secret)
        .expand(format!("jwt-signing-key:{kid}").as_bytes(), &mut out)
        .expect("HKDF output length is valid");
    out
}

/// The exact header sessiongate accepts; any other member is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictHeader {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    kid: String,
}

type Entries<V> = HashMap<Box<str>, V>;

/// A bounded map that keeps what is in use: entries go into `young`; when it
/// holds `capacity` entries it becomes `old` (the previous `old` is
/// retired). A hit in `old` moves the entry back to `young`. So at least the
/// last `capacity` distinct tokens stay, at most twice that is held, there
/// is no full-cache miss storm, and tokens in steady use stay.
///
/// A retired generation is handed back to the caller rather than dropped
/// here, so its up to `capacity` entries are freed outside the lock.
struct TwoGenerations<V> {
    young: Entries<V>,
    old: Entries<V>,
}

impl<V: Clone> TwoGenerations<V> {
    fn new() -> Self {
        TwoGenerations {
            young: HashMap::new(),
            old: HashMap::new(),
        }
    }

    fn get(&mut self, token: &str, capacity: usize) -> (Option<V>, Option<Entries<V>>) {
        if let Some(hit) = self.young.get(token) {
            return (Some(hit.clone()), None);
        }
        let Some((key, hit)) = self.old.remove_entry(token) else {
            return (None, None);
        };
        let retired = self.insert(key, hit.clone(), capacity);
        (Some(hit), retired)
    }

    #[must_use = "the retired generation is to be dropped outside the lock"]
    fn insert(&mut self, token: Box<str>, value: V, capacity: usize) -> Option<Entries<V>> {
        let retired = if self.young.len() >= capacity {
            Some(std::mem::replace(
                &mut self.old,
                std::mem::take(&mut self.young),
            ))
        } else {
            None
        };
        self.young.insert(token, value);
        retired
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// [`TwoGenerations`] behind its lock. The lock is held only to move maps
/// around; a retired generation is dropped after the lock is released, so
/// freeing thousands of entries never stalls other verifies.
pub(crate) struct GenerationCache<V> {
    inner: Mutex<TwoGenerations<V>>,
    capacity: usize,
}

impl<V: Clone> GenerationCache<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        GenerationCache {
            inner: Mutex::new(TwoGenerations::new()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TwoGenerations<V>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn get(&self, token: &str) -> Option<V> {
        // The guard is a temporary: released at the end of this statement.
        let (hit, retired) = self.lock().get(token, self.capacity);
        drop(retired);
        hit
    }

    pub(crate) fn insert(&self, token: Box<str>, value: V) {
        let retired = self.lock().insert(token, value, self.capacity);
        drop(retired);
    }
}

/// Signs and verifies tokens with a fixed policy.
///
/// Verified tokens are remembered (exact token text → its checked claims) in
/// a bounded cache, so a token seen before skips decoding, JSON and HMAC.
/// Only the signature and claim checks are cached — never the session's
/// state, which Redis decides on every request — and on every hit the
/// signing key must still be in the ring and `exp` still ahead.
pub struct TokenCodec {
    alg: Algorithm,
    alg_name: &'static str,
    issuer: String,
    leeway_s: u64,
    max_bytes: usize,
    validation: Validation,
    cache: GenerationCache<Arc<VerifiedToken>>,
    cache_capacity: usize,
    max_lifetime_s: Option<u64>,
}

impl TokenCodec {
    pub fn new(alg: Algorithm, issuer: &str, leeway_s: u64, max_bytes: usize) -> TokenCodec {
        Self::with_cache(alg, issuer, leeway_s, max_bytes, 0)
    }

    /// A codec remembering up to `cache_capacity` verified tokens (0: none).
    pub fn with_cache(
        alg: Algorithm,
        issuer: &str,
        leeway_s: u64,
        max_bytes: usize,
        cache_capacity: usize,
    ) -> TokenCodec {
        let mut validation = Validation::new(alg);
        validation.leeway = leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_issuer(&[issuer]);
        validation.required_spec_claims = ["exp", "iss", "sub"]
            .into_iter()
            .map(String::from)
            .collect::<HashSet<_>>();
        let alg_name = match alg {
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
            _ => "HS256",
        };
        TokenCodec {
            alg,
            alg_name,
            issuer: issuer.to_string(),
            leeway_s,
            max_bytes,
            validation,
            cache: GenerationCache::new(cache_capacity),
            cache_capacity,
            max_lifetime_s: None,
        }
    }

    /// Refuses tokens whose `exp` lies more than `lifetime` (plus leeway)
    /// after their `iat`: sessiongate never issues such tokens.
    pub fn with_max_lifetime(mut self, lifetime: std::time::Duration) -> TokenCodec {
        self.max_lifetime_s = Some(lifetime.as_secs());
        self
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Signs claims with the ring's active key.
    pub fn sign(&self, ring: &KeyRing, claims: &Claims) -> String {
        let key = ring.active_key();
        let mut header = Header::new(self.alg);
        header.kid = Some(key.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &key.encoding).expect("HMAC signing cannot fail")
    }

    /// Every in-process check of a presented token.
    pub fn verify(
        &self,
        ring: &KeyRing,
        token: &str,
        now_ms: i64,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        if token.len() > self.max_bytes {
            return Err(TokenError::TooLarge);
        }
        if self.cache_capacity == 0 {
            return self.verify_uncached(ring, token, now_ms).map(Arc::new);
        }
        if let Some(hit) = self.cache.get(token) {
            ring.get(&hit.kid, now_ms).ok_or(TokenError::UnknownKey)?;
            if hit.exp.saturating_add(self.leeway_s) < (now_ms / 1000).max(0) as u64 {
                return Err(TokenError::Expired);
            }
            return Ok(hit);
        }
        let verified = Arc::new(self.verify_uncached(ring, token, now_ms)?);
        self.cache.insert(token.into(), verified.clone());
        Ok(verified)
    }

    #[cfg(test)]
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, TwoGenerations<Arc<VerifiedToken>>> {
        self.cache.lock()
    }

    fn verify_uncached(
        &self,
        ring: &KeyRing,
        token: &str,
        now_ms: i64,
    ) -> Result<VerifiedToken, TokenError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| TokenError::Malformed)?;
        let header: StrictHeader =
            serde_json::from_slice(&header_json).map_err(|_| TokenError::Header)?;
        if header.alg != self.alg_name {
            return Err(TokenError::Algorithm);
        }
        if header.typ.as_deref().is_some_and(|t| t != "JWT") {
            return Err(TokenError::Header);
        }
        let derived;
        let (key, unseen) = match ring.lookup(&header.kid, now_ms) {
            Lookup::Valid(k) => (&k.decoding, false),
            // Only a kid of our shape, and only after its signature and
            // every claim check out against the key derived for it, is
            // reported as unseen (worth a refresh): garbage never is.
            Lookup::Unseen if well_formed_kid(&header.kid) => {
                derived =
                    DecodingKey::from_secret(&derive_key(&ring.secret, &header.kid, ring.alg));
                (&derived, true)
            }
            Lookup::Unseen | Lookup::Retired => return Err(TokenError::UnknownKey),
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    jsonwebtoken::errors::ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    _ => TokenError::Invalid,
                }
            })?;
        let claims = data.claims;
        let now_s = (now_ms / 1000).max(0) as u64;
        if claims.iat > now_s.saturating_add(self.leeway_s) {
            return Err(TokenError::NotYetValid);
        }
        if claims.exp.saturating_add(self.leeway_s) < now_s {
            return Err(TokenError::Expired);
        }
        if let Some(lifetime) = self.max_lifetime_s
            && claims.exp
                > claims
                    .iat
                    .saturating_add(lifetime)
                    .saturating_add(self.leeway_s)
        {
            return Err(TokenError::Claims);
        }
        let user = UserId::parse(&claims.sub).map_err(|_| TokenError::Claims)?;
        let session = SessionId::parse(&claims.sid).map_err(|_| TokenError::Claims)?;
        let device = DeviceId::parse(&claims.did).map_err(|_| TokenError::Claims)?;
        if !session.belongs_to(&user.tag()) {
            return Err(TokenError::Claims);
        }
        let identity_headers =
            identity_headers([user.as_str(), session.as_str(), device.as_str()])?;
        if unseen {
            return Err(TokenError::UnseenKey);
        }
        Ok(VerifiedToken {
            identity_headers,
            user,
            session,
            device,
            iat: claims.iat,
            exp: claims.exp,
            kid: header.kid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn ring() -> KeyRing {
        KeyRing::from_json(
            r#"{"active":"k2","keys":[{"kid":"k1","retire_at":5000},{"kid":"k2","retire_at":0}]}"#,
            SECRET,
            Algorithm::HS256,
        )
        .unwrap()
    }

    fn claims(now_s: u64) -> Claims {
        let user = UserId::parse("alice").unwrap();
        Claims {
            sub: "alice".into(),
            sid: SessionId::generate(&user.tag()).as_str().into(),
            did: "laptop".into(),
            iss: "sessiongate".into(),
            iat: now_s,
            exp: now_s + 60,
            nbf: None,
        }
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[test]
    fn round_trip_and_derived_keys_differ_per_kid() {
        let codec = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, 4096);
        let ring = ring();
        let now = now_ms();
        let token = codec.sign(&ring, &claims(now as u64 / 1000));
        let ok = codec.verify(&ring, &token, now).unwrap();
        assert_eq!(ok.user.as_str(), "alice");
        assert_ne!(
            derive_key(SECRET, "k1", Algorithm::HS256),
            derive_key(SECRET, "k2", Algorithm::HS256)
        );
    }

    #[test]
    fn retired_kid_and_other_issuer_are_refused() {
        let codec = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, 4096);
        let ring = ring();
        let now = now_ms();
        // k1 retired at t=5000 ms.
        let old = KeyRing::from_json(
            r#"{"active":"k1","keys":[{"kid":"k1","retire_at":0}]}"#,
            SECRET,
            Algorithm::HS256,
        )
        .unwrap();
        let token = codec.sign(&old, &claims(now as u64 / 1000));
        assert_eq!(
            codec.verify(&ring, &token, now).unwrap_err(),
            TokenError::UnknownKey
        );
        let mut c = claims(now as u64 / 1000);
        c.iss = "someone-else".into();
        let token = codec.sign(&ring, &c);
        assert_eq!(
            codec.verify(&ring, &token, now).unwrap_err(),
            TokenError::Invalid
        );
    }

    #[test]
    fn iat_in_future_and_expired_are_refused() {
        let codec = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, 4096);
        let ring = ring();
        let now = now_ms();
        let mut c = claims(now as u64 / 1000 + 60);
        c.exp += 600;
        let token = codec.sign(&ring, &c);
        assert_eq!(
            codec.verify(&ring, &token, now).unwrap_err(),
            TokenError::NotYetValid
        );
        let mut c = claims(now as u64 / 1000 - 600);
        c.exp = now as u64 / 1000 - 10;
        let token = codec.sign(&ring, &c);
        assert_eq!(
            codec.verify(&ring, &token, now).unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn cached_tokens_still_honour_key_retirement_and_expiry() {
        let codec = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 0, 4096, 8);
        let now = now_ms();
        let ring_k2 = ring();
        let mut c = claims(now as u64 / 1000);
        c.exp = now as u64 / 1000 + 2;
        let token = codec.sign(&ring_k2, &c);
        assert!(codec.verify(&ring_k2, &token, now).is_ok());
        assert!(codec.verify(&ring_k2, &token, now).is_ok(), "cached hit");
        // Past exp: refused although cached.
        assert_eq!(
            codec.verify(&ring_k2, &token, now + 5_000).unwrap_err(),
            TokenError::Expired
        );
        // k2 no longer in the ring: refused although cached.
        let other = KeyRing::from_json(
            r#"{"active":"k3","keys":[{"kid":"k3","retire_at":0}]}"#,
            SECRET,
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            codec.verify(&other, &token, now).unwrap_err(),
            TokenError::UnknownKey
        );
        // A tampered copy is not a cache hit.
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(codec.verify(&ring_k2, &tampered, now).is_err());
        // The cache stays bounded.
        for i in 0..20 {
            let mut c = claims(now as u64 / 1000);
            c.did = format!("d{i}");
            let t = codec.sign(&ring_k2, &c);
            assert!(codec.verify(&ring_k2, &t, now).is_ok());
        }
        assert!(codec.lock_cache().len() <= 16);
    }

    #[test]
    fn a_token_in_steady_use_stays_cached_while_others_pass_through() {
        let codec = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 5, 4096, 8);
        let ring = ring();
        let now = now_ms();
        let hot = codec.sign(&ring, &claims(now as u64 / 1000));
        codec.verify(&ring, &hot, now).unwrap();
        for i in 0..50 {
            let mut c = claims(now as u64 / 1000);
            c.did = format!("d{i}");
            codec.verify(&ring, &codec.sign(&ring, &c), now).unwrap();
            if i % 3 == 0 {
                codec.verify(&ring, &hot, now).unwrap();
            }
            let cache = codec.lock_cache();
            assert!(cache.len() <= 16);
            assert!(
                cache.young.contains_key(hot.as_str()) || cache.old.contains_key(hot.as_str()),
                "the hot token was evicted at {i}"
            );
        }
    }

    mod freed_outside_the_lock {
        use super::super::GenerationCache;
        use std::sync::LazyLock;
        use std::sync::atomic::{AtomicUsize, Ordering};

        static CACHE: LazyLock<GenerationCache<Probe>> = LazyLock::new(|| GenerationCache::new(2));
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        static DROPPED_UNDER_LOCK: AtomicUsize = AtomicUsize::new(0);

        /// Records, when dropped, whether the cache's lock was held.
        #[derive(Clone)]
        struct Probe;

        impl Drop for Probe {
            fn drop(&mut self) {
                DROPPED.fetch_add(1, Ordering::SeqCst);
                if CACHE.inner.try_lock().is_err() {
                    DROPPED_UNDER_LOCK.fetch_add(1, Ordering::SeqCst);
                }
            }
        }

        #[test]
        fn a_retired_generation_is_freed_outside_the_lock() {
            // Capacity 2: a, b fill young; c retires nothing (old was
            // empty); d, then e retires {a, b}.
            for key in ["a", "b", "c", "d", "e"] {
                CACHE.insert(key.into(), Probe);
            }
            assert_eq!(DROPPED.load(Ordering::SeqCst), 2, "a and b were freed");
            // A hit in old ({c, d}) moves it to a full young ({e, f}):
            // young becomes old and {d} is retired.
            CACHE.insert("f".into(), Probe);
            let hit = CACHE.get("c");
            assert!(hit.is_some());
            drop(hit);
            assert_eq!(
                DROPPED.load(Ordering::SeqCst),
                4,
                "d and the hit's copy were freed"
            );
            assert_eq!(
                DROPPED_UNDER_LOCK.load(Ordering::SeqCst),
                0,
                "entries were freed while the cache was locked"
            );
        }
    }

    #[test]
    fn an_unseen_well_formed_kid_is_reported_only_when_its_signature_holds() {
        let codec = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 5, 4096, 8);
        let now = now_ms();
        let ring = ring();
        let elsewhere = |kid: &str| {
            KeyRing::from_json(
                &format!(r#"{{"active":"{kid}","keys":[{{"kid":"{kid}","retire_at":0}}]}}"#),
                SECRET,
                Algorithm::HS256,
            )
            .unwrap()
        };
        let token = codec.sign(&elsewhere("abcdefghijklmnop"), &claims(now as u64 / 1000));
        assert_eq!(
            codec.verify(&ring, &token, now).unwrap_err(),
            TokenError::UnseenKey
        );
        // Not cached as valid: still unseen.
        assert_eq!(
            codec.verify(&ring, &token, now).unwrap_err(),
            TokenError::UnseenKey
        );
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(
            codec.verify(&ring, &tampered, now).unwrap_err(),
            TokenError::Invalid
        );
        // A kid not of our shape is never worth a refresh.
        let odd = codec.sign(&elsewhere("short"), &claims(now as u64 / 1000));
        assert_eq!(
            codec.verify(&ring, &odd, now).unwrap_err(),
            TokenError::UnknownKey
        );
        // A kid an earlier ring held is gone, not unseen.
        let mut newer = elsewhere("qrstuvwxyz012345");
        newer.inherit_gone(&ring);
        let k2 = codec.sign(&ring, &claims(now as u64 / 1000));
        assert_eq!(
            codec.verify(&newer, &k2, now).unwrap_err(),
            TokenError::UnknownKey
        );
        assert!(newer.knows("k1") && newer.knows("k2") && !newer.knows("abcdefghijklmnop"));
    }

    #[test]
    fn sid_of_another_user_is_refused() {
        let codec = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, 4096);
        let ring = ring();
        let now = now_ms();
        let mut c = claims(now as u64 / 1000);
        c.sub = "mallory".into();
        let token = codec.sign(&ring, &c);
        assert_eq!(
            codec.verify(&ring, &token, now).unwrap_err(),
            TokenError::Claims
        );
    }
}

/// Boundaries and branches the first tests left open (found by
/// `scripts/mutants`; see scripts/mutants.md). `now_ms` is passed in, so
/// every boundary is exact; jsonwebtoken's own `exp` check uses the real
/// clock, so the tokens here expire well after the real now.
#[cfg(test)]
mod mutation_tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn real_now_s() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn ring_with(alg: Algorithm, json: &str) -> KeyRing {
        KeyRing::from_json(json, SECRET, alg).unwrap()
    }

    fn one_key_ring(alg: Algorithm) -> KeyRing {
        ring_with(
            alg,
            r#"{"active":"k1","keys":[{"kid":"k1","retire_at":0}]}"#,
        )
    }

    fn claims(iat: u64, exp: u64) -> Claims {
        let user = UserId::parse("alice").unwrap();
        Claims {
            sub: "alice".into(),
            sid: SessionId::generate(&user.tag()).as_str().into(),
            did: "laptop".into(),
            iss: "sessiongate".into(),
            iat,
            exp,
            nbf: None,
        }
    }

    fn codec(leeway_s: u64) -> TokenCodec {
        TokenCodec::new(Algorithm::HS256, "sessiongate", leeway_s, 4096)
    }

    #[test]
    fn a_key_verifies_until_its_retirement_instant_and_not_at_it() {
        let t = real_now_s();
        let retire_at_ms = (t as i64 + 100) * 1000;
        let signing = one_key_ring(Algorithm::HS256);
        let ring = ring_with(
            Algorithm::HS256,
            &format!(
                r#"{{"active":"k2","keys":[{{"kid":"k1","retire_at":{retire_at_ms}}},{{"kid":"k2","retire_at":0}}]}}"#
            ),
        );
        let codec = codec(5);
        let token = codec.sign(&signing, &claims(t, t + 600));
        assert!(codec.verify(&ring, &token, retire_at_ms - 1000).is_ok());
        assert!(codec.verify(&ring, &token, retire_at_ms - 1).is_ok());
        assert_eq!(
            codec.verify(&ring, &token, retire_at_ms).unwrap_err(),
            TokenError::UnknownKey
        );
        // The same for a token already in the verified-token cache.
        let cached = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 5, 4096, 8);
        assert!(cached.verify(&ring, &token, retire_at_ms - 1).is_ok());
        assert_eq!(
            cached.verify(&ring, &token, retire_at_ms).unwrap_err(),
            TokenError::UnknownKey
        );
    }

    #[test]
    fn new_kids_are_random_url_safe_and_16_characters() {
        let a = new_kid();
        let b = new_kid();
        assert_ne!(a, b);
        for kid in [&a, &b] {
            assert_eq!(kid.len(), 16, "{kid}");
            assert_eq!(URL_SAFE_NO_PAD.decode(kid).unwrap().len(), 12);
        }
    }

    #[test]
    fn derived_keys_are_as_long_as_the_hash_output() {
        // RFC 7518 §3.2: an HMAC key at least as long as the hash output.
        assert_eq!(derive_key(SECRET, "k", Algorithm::HS256).len(), 32);
        assert_eq!(derive_key(SECRET, "k", Algorithm::HS384).len(), 48);
        assert_eq!(derive_key(SECRET, "k", Algorithm::HS512).len(), 64);
        // One HKDF stream: the shorter keys are prefixes of the longer.
        let k512 = derive_key(SECRET, "k", Algorithm::HS512);
        assert_eq!(derive_key(SECRET, "k", Algorithm::HS256), k512[..32]);
        assert_ne!(
            derive_key(b"another secret", "k", Algorithm::HS256),
            k512[..32]
        );
    }

    #[test]
    fn hs384_and_hs512_codecs_accept_their_own_tokens_and_refuse_the_others() {
        let t = real_now_s();
        let now_ms = t as i64 * 1000;
        let algs = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        for alg in algs {
            let ring = one_key_ring(alg);
            let codec = TokenCodec::new(alg, "sessiongate", 5, 4096);
            let token = codec.sign(&ring, &claims(t, t + 60));
            assert!(codec.verify(&ring, &token, now_ms).is_ok(), "{alg:?}");
            for other in algs.into_iter().filter(|a| *a != alg) {
                let other_codec = TokenCodec::new(other, "sessiongate", 5, 4096);
                assert_eq!(
                    other_codec
                        .verify(&one_key_ring(other), &token, now_ms)
                        .unwrap_err(),
                    TokenError::Algorithm,
                    "{alg:?} token on a {other:?} codec"
                );
            }
        }
    }

    #[test]
    fn a_cache_hit_returns_the_remembered_verification_and_capacity_0_remembers_nothing() {
        let t = real_now_s();
        let now_ms = t as i64 * 1000;
        let ring = one_key_ring(Algorithm::HS256);
        let cached = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 5, 4096, 8);
        let token = cached.sign(&ring, &claims(t, t + 60));
        let first = cached.verify(&ring, &token, now_ms).unwrap();
        let second = cached.verify(&ring, &token, now_ms).unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second verify was not a hit"
        );
        assert_eq!(cached.lock_cache().len(), 1);

        let uncached = codec(5);
        let first = uncached.verify(&ring, &token, now_ms).unwrap();
        let second = uncached.verify(&ring, &token, now_ms).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(uncached.lock_cache().len(), 0);
    }

    #[test]
    fn the_size_cap_is_inclusive() {
        let t = real_now_s();
        let now_ms = t as i64 * 1000;
        let ring = one_key_ring(Algorithm::HS256);
        let token = codec(5).sign(&ring, &claims(t, t + 60));
        let at_cap = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, token.len());
        assert!(at_cap.verify(&ring, &token, now_ms).is_ok());
        let under = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, token.len() - 1);
        assert_eq!(
            under.verify(&ring, &token, now_ms).unwrap_err(),
            TokenError::TooLarge
        );
    }

    #[test]
    fn exp_plus_leeway_is_the_last_accepted_second_cached_or_not() {
        let t = real_now_s();
        let exp = t + 100;
        let ring = one_key_ring(Algorithm::HS256);
        for capacity in [0, 8] {
            let codec = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 5, 4096, capacity);
            let token = codec.sign(&ring, &claims(t, exp));
            // Fill the cache (when there is one) first.
            assert!(codec.verify(&ring, &token, t as i64 * 1000).is_ok());
            let last_ms = (exp as i64 + 5) * 1000 + 999;
            assert!(
                codec.verify(&ring, &token, last_ms).is_ok(),
                "capacity {capacity}"
            );
            assert_eq!(
                codec.verify(&ring, &token, last_ms + 1).unwrap_err(),
                TokenError::Expired,
                "capacity {capacity}"
            );
        }
        // With no leeway, exp itself is the last second.
        let codec = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 0, 4096, 8);
        let token = codec.sign(&ring, &claims(t, exp));
        assert!(codec.verify(&ring, &token, exp as i64 * 1000 + 999).is_ok());
        assert!(codec.verify(&ring, &token, exp as i64 * 1000 + 999).is_ok());
        assert_eq!(
            codec
                .verify(&ring, &token, (exp as i64 + 1) * 1000)
                .unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn iat_may_lead_the_clock_by_the_leeway_and_no_more() {
        let t = real_now_s();
        let ring = one_key_ring(Algorithm::HS256);
        let codec = codec(5);
        let token = codec.sign(&ring, &claims(t, t + 600));
        // now_s + leeway == iat: accepted.
        assert!(codec.verify(&ring, &token, (t as i64 - 5) * 1000).is_ok());
        // One second earlier: iat is too far ahead.
        assert_eq!(
            codec
                .verify(&ring, &token, (t as i64 - 6) * 1000 + 999)
                .unwrap_err(),
            TokenError::NotYetValid
        );
    }

    #[test]
    fn nbf_in_the_future_is_not_yet_valid() {
        let t = real_now_s();
        let ring = one_key_ring(Algorithm::HS256);
        let codec = codec(5);
        let mut c = claims(t, t + 600);
        c.nbf = Some(t + 300);
        let token = codec.sign(&ring, &c);
        assert_eq!(
            codec.verify(&ring, &token, t as i64 * 1000).unwrap_err(),
            TokenError::NotYetValid
        );
    }

    #[test]
    fn the_lifetime_cap_allows_exactly_lifetime_plus_leeway() {
        let t = real_now_s();
        let now_ms = t as i64 * 1000;
        let ring = one_key_ring(Algorithm::HS256);
        let codec = codec(5).with_max_lifetime(std::time::Duration::from_secs(60));
        for (exp, ok) in [(t + 10, true), (t + 65, true), (t + 66, false)] {
            let token = codec.sign(&ring, &claims(t, exp));
            let got = codec.verify(&ring, &token, now_ms);
            if ok {
                assert!(got.is_ok(), "exp = iat + {}", exp - t);
            } else {
                assert_eq!(
                    got.unwrap_err(),
                    TokenError::Claims,
                    "exp = iat + {}",
                    exp - t
                );
            }
        }
        // Without the cap the long-lived token passes.
        let token = codec.sign(&ring, &claims(t, t + 66));
        assert!(self::codec(5).verify(&ring, &token, now_ms).is_ok());
    }

    #[test]
    fn tokens_carry_and_require_the_codecs_issuer() {
        let t = real_now_s();
        let ring = one_key_ring(Algorithm::HS256);
        let codec = TokenCodec::new(Algorithm::HS256, "auth.example", 5, 4096);
        assert_eq!(codec.issuer(), "auth.example");
        let mut c = claims(t, t + 60);
        c.iss = codec.issuer().to_string();
        let token = codec.sign(&ring, &c);
        assert!(codec.verify(&ring, &token, t as i64 * 1000).is_ok());
    }
}
