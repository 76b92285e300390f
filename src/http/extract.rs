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
use super::origin::{OriginPolicy, Original};
use crate::config::Secret;
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Issuer,
    Admin,
}

/// The configured API keys, kept only as SHA-256 digests.
///
/// A key may carry a name, `name:key` (name: 1 to 32 letters, digits,
/// `_ . -`; key: at least 32 characters), so that events and audit lines can
/// say who acted (`admin:<name>`) without ever showing the key. Such a key
/// is accepted presented either whole (`name:key`, as keys without a name
/// always were) or without its name (`key`).
pub struct ApiKeys {
    issuer: Vec<([u8; 32], u32)>,
    admin: Vec<([u8; 32], u32)>,
    /// Names by number; 0 is "no name".
    names: Vec<Option<String>>,
}

/// The name and the key of `name:key`, when the entry has that shape.
pub fn split_named_key(entry: &str) -> Option<(&str, &str)> {
    let (name, key) = entry.split_once(':')?;
    let name_ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    (name_ok && key.len() >= 32).then_some((name, key))
}

impl ApiKeys {
    pub fn new(issuer: &[Secret], admin: &[Secret]) -> ApiKeys {
        let mut names = vec![None];
        let mut digest = |keys: &[Secret]| {
            let mut out = Vec::new();
            for k in keys {
                let entry = k.expose();
                match split_named_key(entry) {
                    Some((name, key)) => {
                        names.push(Some(name.to_string()));
                        let n = (names.len() - 1) as u32;
                        out.push((Sha256::digest(entry.as_bytes()).into(), n));
                        out.push((Sha256::digest(key.as_bytes()).into(), n));
                    }
                    None => out.push((Sha256::digest(entry.as_bytes()).into(), 0)),
                }
            }
            out
        };
        let issuer = digest(issuer);
        let admin = digest(admin);
        ApiKeys {
            issuer,
            admin,
            names,
        }
    }

    /// The role of a presented key, if any; constant time over all keys.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        self.caller(presented).map(|c| c.role)
    }

    /// The role and name of a presented key, if any; every configured key
    /// is compared (constant time), and the name is selected without a
    /// branch on which key matched.
    pub fn caller(&self, presented: &[u8]) -> Option<Caller> {
        use subtle::ConditionallySelectable;
        let d: [u8; 32] = Sha256::digest(presented).into();
        let any = |keys: &[([u8; 32], u32)]| {
            keys.iter()
                .fold((Choice::from(0), 0u32), |(acc, name), (k, n)| {
                    let hit = k.ct_eq(&d);
                    (acc | hit, u32::conditional_select(&name, n, hit))
                })
        };
        let ((admin, admin_name), (issuer, issuer_name)) = (any(&self.admin), any(&self.issuer));
        let (role, name) = if bool::from(admin) {
            (Role::Admin, admin_name)
        } else if bool::from(issuer) {
            (Role::Issuer, issuer_name)
        } else {
            return None;
        };
        Some(Caller {
            role,
            name: self.names.get(name as usize).cloned().flatten(),
        })
    }
}

/// Who presented a right key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    pub name: Option<String>,
}

impl Caller {
    /// The actor of events: `admin`, `admin:<name>`, `issuer`, `issuer:<name>`.
    pub fn actor(&self) -> String {
        let role = match self.role {
            Role::Admin => "admin",
            Role::Issuer => "issuer",
        };
        match &self.name {
            Some(name) => format!("{role}:{name}"),
            None => role.to_string(),
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
    Ok(bearer_credentials(value.as_bytes()))
}

/// The credentials of one `Authorization` value, if its scheme is Bearer.
pub fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(value[7..].trim_ascii())
    } else {
        None
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
    caller(req).map(|c| c.map(|c| c.role))
}

fn caller(req: &HttpRequest) -> Result<Option<Caller>, ApiError> {
    let state = state(req);
    let peer = req.peer_addr().map(|a| a.ip());
    let presented = bearer(req);
    // Compare first, and always (even for a blocked peer), so that the
    // answer's timing does not depend on the throttle state either.
    let role = match presented {
        Ok(Some(key)) => state.api_keys.caller(key),
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

/// The caller holds an admin key; `actor` names it for events
/// (`admin` or `admin:<name>`).
pub struct AdminPrincipal {
    pub actor: String,
}

impl FromRequest for AdminPrincipal {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(match caller(req) {
            Ok(Some(c)) if c.role == Role::Admin => Ok(AdminPrincipal { actor: c.actor() }),
            Ok(Some(_)) => Err(ApiError::Forbidden),
            Ok(None) => Err(ApiError::Unauthorized),
            Err(e) => Err(e),
        })
    }
}

/// The caller holds an issuer key (the login backend); `actor` names it
/// for events (`issuer` or `issuer:<name>`).
pub struct IssuerPrincipal {
    pub actor: String,
}

impl FromRequest for IssuerPrincipal {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(match caller(req) {
            Ok(Some(c)) if c.role == Role::Issuer => Ok(IssuerPrincipal { actor: c.actor() }),
            Ok(Some(_)) => Err(ApiError::Forbidden),
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

/// Where a user's token and the original request's description come from:
/// an HTTP request to sessiongate, or Envoy's gRPC `CheckRequest`
/// (`crate::grpc`). [`BearerToken::from_source`] applies the one rule to
/// either.
pub trait TokenSource {
    /// The credentials of `Authorization: Bearer`, if any; more than one
    /// `Authorization` header is `Err(Duplicate)`.
    fn bearer(&self) -> Result<Option<&[u8]>, Duplicate>;
    /// The value of the one cookie named `name` (two are `Err(Duplicate)`).
    fn cookie(&self, name: &str) -> Result<Option<String>, Duplicate>;
    /// The original request as the CSRF rule sees it (asked only for a
    /// cookie-carried token while `csrf_protection` is on).
    fn original(&self, policy: &OriginPolicy) -> Result<Original<'_>, ApiError>;
}

impl TokenSource for HttpRequest {
    fn bearer(&self) -> Result<Option<&[u8]>, Duplicate> {
        bearer(self)
    }

    fn cookie(&self, name: &str) -> Result<Option<String>, Duplicate> {
        cookie_in(
            self.headers()
                .get_all(header::COOKIE)
                .map(|value| value.as_bytes()),
            name,
        )
    }

    fn original(&self, policy: &OriginPolicy) -> Result<Original<'_>, ApiError> {
        policy.original_of(self)
    }
}

impl BearerToken {
    pub fn from_request_parts(req: &HttpRequest) -> Result<BearerToken, ApiError> {
        let state = state(req);
        Self::from_source(req, &state.cookie_name, &state.origin)
    }

    /// The rule, whatever the transport: the `Authorization` header wins;
    /// else the cookie, and then the CSRF rule on the original request.
    pub fn from_source(
        source: &(impl TokenSource + ?Sized),
        cookie_name: &str,
        origin: &OriginPolicy,
    ) -> Result<BearerToken, ApiError> {
        if let Some(raw) = source
            .bearer()
            .map_err(|Duplicate| ApiError::InvalidToken)?
        {
            return std::str::from_utf8(raw)
                .ok()
                .filter(|t| !t.is_empty())
                .map(|t| BearerToken(t.to_string()))
                .ok_or(ApiError::InvalidToken);
        }
        let token = source
            .cookie(cookie_name)
            .map_err(|Duplicate| ApiError::InvalidToken)?
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::InvalidToken)?;
        if origin.csrf_protection {
            origin.check_original(&source.original(origin)?)?;
        }
        Ok(BearerToken(token))
    }
}

/// The value of the one cookie named `name`, over every `Cookie` header
/// value; two of that name are `Err(Duplicate)`. A header that is not UTF-8
/// makes it no cookie at all, and a pair that does not parse is skipped (as
/// `HttpRequest::cookies` does).
pub fn cookie_in<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    name: &str,
) -> Result<Option<String>, Duplicate> {
    let mut found = None;
    for value in values {
        let Ok(text) = std::str::from_utf8(value) else {
            return Ok(None);
        };
        for pair in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let Ok(cookie) = actix_web::cookie::Cookie::parse_encoded(pair) else {
                continue;
            };
            if cookie.name() == name {
                if found.is_some() {
                    return Err(Duplicate);
                }
                found = Some(cookie.value().to_string());
            }
        }
    }
    Ok(found)
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

/// Branches and boundaries the first tests left open (found by
/// `scripts/mutants`; see scripts/mutants.md).
#[cfg(test)]
mod mutation_tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn bearer_of(value: &str) -> Option<Vec<u8>> {
        let req = TestRequest::default()
            .insert_header((header::AUTHORIZATION, value))
            .to_http_request();
        bearer(&req).ok().flatten().map(<[u8]>::to_vec)
    }

    #[test]
    fn bearer_takes_the_credentials_of_a_bearer_header_only() {
        assert_eq!(
            bearer_of("Bearer abc.def").as_deref(),
            Some(&b"abc.def"[..])
        );
        assert_eq!(bearer_of("bEaReR  tok  ").as_deref(), Some(&b"tok"[..]));
        assert_eq!(bearer_of("Bearer x").as_deref(), Some(&b"x"[..]));
        // The scheme alone, another scheme, or no header: no credentials.
        assert_eq!(bearer_of("Bearer "), None);
        assert_eq!(bearer_of("Bearer"), None);
        assert_eq!(bearer_of("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_of("Bearerxtoken"), None);
        let req = TestRequest::default().to_http_request();
        assert!(matches!(bearer(&req), Ok(None)));
    }

    #[test]
    fn a_named_key_is_accepted_whole_or_bare_and_names_its_actor() {
        let named = Secret::new(format!("ops-team:{}", "n".repeat(32)));
        let plain = Secret::new("p".repeat(40));
        let colon = Secret::new(format!("x:{}", "c".repeat(10)) + &"c".repeat(25));
        let keys = ApiKeys::new(
            std::slice::from_ref(&plain),
            &[named.clone(), colon.clone()],
        );
        let who = |k: &str| keys.caller(k.as_bytes()).map(|c| c.actor());
        assert_eq!(who(named.expose()).as_deref(), Some("admin:ops-team"));
        assert_eq!(who(&"n".repeat(32)).as_deref(), Some("admin:ops-team"));
        assert_eq!(who(plain.expose()).as_deref(), Some("issuer"));
        assert_eq!(who(&"n".repeat(31)), None);
        assert_eq!(who("ops-team:"), None);
        // A key that happened to hold a colon is still accepted whole.
        assert_eq!(who(colon.expose()).as_deref(), Some("admin:x"));
        // A name shape with too short a key part: an unnamed key, whole only.
        let short = Secret::new(format!("y:{}", "s".repeat(31)));
        let keys = ApiKeys::new(&[], std::slice::from_ref(&short));
        assert_eq!(
            keys.caller(short.expose().as_bytes())
                .map(|c| c.actor())
                .as_deref(),
            Some("admin")
        );
        assert_eq!(keys.caller("s".repeat(31).as_bytes()), None);
    }

    #[test]
    fn a_key_listed_twice_keeps_its_role() {
        let k = Secret::new("k".repeat(40));
        let other = Secret::new("o".repeat(40));
        let keys = ApiKeys::new(&[], &[k.clone(), other, k.clone()]);
        assert_eq!(keys.role_of(k.expose().as_bytes()), Some(Role::Admin));
        let keys = ApiKeys::new(&[k.clone(), k.clone()], &[]);
        assert_eq!(keys.role_of(k.expose().as_bytes()), Some(Role::Issuer));
    }

    #[test]
    fn ipv6_peers_are_bucketed_by_their_64_and_mapped_v4_as_v4() {
        let b = |s: &str| bucket(s.parse().unwrap());
        assert_eq!(b("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), b("2001:db8:1:2::"));
        assert_ne!(b("2001:db8:1:2::1"), b("2001:db8:1:3::1"));
        // Bit 64 is the lowest bit of the prefix: it separates buckets.
        assert_ne!(b("2001:db8:1:2::1"), b("2001:db8:1:3::1"));
        assert_ne!(b("2001:db8:1:0::1"), b("2001:db8:1:1::1"));
        assert_eq!(b("::ffff:10.0.0.1"), b("10.0.0.1"));
        assert_eq!(b("10.0.0.1"), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn retry_after_counts_down_from_the_window() {
        let f = KeyFailures::new(1, Duration::from_secs(90));
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        f.record(peer);
        // Let the clock move (not a synchronisation: any elapsed time works).
        std::thread::sleep(Duration::from_millis(5));
        let retry = f.blocked(peer).expect("blocked after one failure");
        assert!((1..90).contains(&retry), "retry_after = {retry}");
    }

    fn backdated(by: Duration) -> Instant {
        Instant::now()
            .checked_sub(by)
            .expect("the monotonic clock is older than the backdating")
    }

    /// Fills the table to `MAX_TRACKED_PEERS - 1` entries whose window
    /// ended (`expired`) or not, without waiting for a real window.
    fn fill(f: &KeyFailures, expired: bool) {
        let since = if expired {
            backdated(f.window + Duration::from_secs(1))
        } else {
            Instant::now()
        };
        let mut state = f.lock();
        for i in 0..(MAX_TRACKED_PEERS as u32 - 1) {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            state.peers.insert(ip, (1, since));
        }
    }

    #[test]
    fn a_full_table_of_expired_peers_is_pruned_and_live_blocks_survive() {
        let f = KeyFailures::new(2, Duration::from_secs(60));
        fill(&f, true);
        // The last entry is a live block (two failures just now): full.
        let blocked_peer: IpAddr = "192.0.2.1".parse().unwrap();
        f.lock().peers.insert(blocked_peer, (2, Instant::now()));
        assert_eq!(f.lock().peers.len(), MAX_TRACKED_PEERS);
        assert!(f.blocked(blocked_peer).is_some());
        // The table is full: a new peer prunes the expired entries…
        let newcomer: IpAddr = "192.0.2.2".parse().unwrap();
        f.record(newcomer);
        f.record(newcomer);
        assert!(
            f.blocked(newcomer).is_some(),
            "the newcomer was not tracked"
        );
        // …and the live ones stay.
        assert!(f.blocked(blocked_peer).is_some(), "a live block was pruned");
        assert_eq!(f.lock().peers.len(), 2);
    }

    #[test]
    fn pruning_runs_at_most_once_a_second() {
        let f = KeyFailures::new(1, Duration::from_secs(60));
        fill(&f, true);
        let live: IpAddr = "192.0.2.1".parse().unwrap();
        f.lock().peers.insert(live, (1, Instant::now()));
        // A prune just ran: a new peer of a full table is not tracked.
        f.lock().pruned = Some(Instant::now());
        let late: IpAddr = "192.0.2.2".parse().unwrap();
        f.record(late);
        assert!(f.blocked(late).is_none());
        // Over a second later the next new peer prunes again and is tracked.
        f.lock().pruned = Some(backdated(Duration::from_secs(2)));
        f.record(late);
        assert!(f.blocked(late).is_some());
    }

    #[test]
    fn only_a_full_table_is_pruned_so_the_next_full_table_can_prune_at_once() {
        let f = KeyFailures::new(1, Duration::from_secs(60));
        fill(&f, true);
        // Not full yet (one slot left): no prune, so the once-a-second
        // budget is not spent on it…
        f.record("192.0.2.1".parse().unwrap());
        // …and when the table is full of expired entries (again), the next
        // new peer prunes at once and counts.
        fill(&f, true);
        let newcomer: IpAddr = "192.0.2.2".parse().unwrap();
        f.record(newcomer);
        assert!(f.blocked(newcomer).is_some());
    }

    #[test]
    fn a_full_table_of_live_peers_still_counts_known_peers_and_no_new_ones() {
        let f = KeyFailures::new(2, Duration::from_secs(60));
        fill(&f, false);
        let known: IpAddr = "10.0.0.0".parse().unwrap(); // the first filled entry
        let last: IpAddr = "192.0.2.1".parse().unwrap();
        f.record(last); // the table is now full
        assert_eq!(f.lock().peers.len(), MAX_TRACKED_PEERS);
        f.record(known);
        assert!(
            f.blocked(known).is_some(),
            "a known peer's failure was not counted"
        );
        let newcomer: IpAddr = "192.0.2.2".parse().unwrap();
        f.record(newcomer);
        f.record(newcomer);
        assert!(f.blocked(newcomer).is_none());
        assert_eq!(f.lock().peers.len(), MAX_TRACKED_PEERS);
    }
}

/// The extractors on real requests, with a real `AppState` (its Redis is
/// never called: these checks all happen before any Redis call).
#[cfg(test)]
mod extractor_tests {
    use std::sync::Arc;

    use actix_web::test::TestRequest;

    use super::*;
    use crate::config::Settings;
    use crate::http::origin::OriginPolicy;
    use crate::metrics::Metrics;
    use crate::session::SessionService;
    use crate::state::Global;
    use crate::store::{KeySchema, Store};

    const ISSUER_KEY: &str = "issuer-key-0123456789abcdef0123456789";
    const ADMIN_KEY: &str = "admin-key-0123456789abcdef0123456789ab";

    fn app_state() -> web::Data<AppState> {
        let env = |k: &str| match k {
            "SESSIONGATE_ISSUER_KEYS" => Some(ISSUER_KEY.to_string()),
            "SESSIONGATE_ADMIN_KEYS" => Some(ADMIN_KEY.to_string()),
            "SESSIONGATE_SIGNING_SECRET" => Some("s".repeat(32)),
            _ => None,
        };
        let settings = Settings::load(&env).unwrap();
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_millis(250);
        // Connects lazily: nothing here reaches it.
        let store = Store::new(
            "redis://127.0.0.1:1",
            &[],
            timeout,
            1,
            KeySchema::new("unit:"),
            metrics.clone(),
        )
        .unwrap();
        let global = Global::new(
            Secret::new("s".repeat(32)),
            settings.jwt_algorithm,
            Duration::from_secs(5),
        );
        let service = SessionService::new(
            &settings,
            Arc::new(store),
            Arc::new(global),
            metrics.clone(),
        );
        web::Data::new(AppState {
            service: Arc::new(service),
            api_keys: ApiKeys::new(&[Secret::new(ISSUER_KEY)], &[Secret::new(ADMIN_KEY)]),
            metrics,
            cookie_name: "session".into(),
            origin: OriginPolicy {
                csrf_protection: true,
                allowed_origins: vec![],
                trusted_proxies: vec![],
            },
            key_failures: KeyFailures::new(3, Duration::from_secs(60)),
            console: crate::console::Console::new(&settings),
            assertions: None,
        })
    }

    fn request(state: &web::Data<AppState>, key: Option<&str>) -> HttpRequest {
        let mut req = TestRequest::post()
            .app_data(state.clone())
            .peer_addr("192.0.2.7:4000".parse().unwrap());
        if let Some(key) = key {
            req = req.insert_header((header::AUTHORIZATION, format!("Bearer {key}")));
        }
        req.to_http_request()
    }

    fn extract<T: FromRequest<Future = Ready<Result<T, ApiError>>>>(
        req: &HttpRequest,
    ) -> Result<T, ApiError> {
        T::from_request(req, &mut Payload::None).into_inner()
    }

    #[test]
    fn each_principal_accepts_its_key_only() {
        let s = app_state();
        let admin = request(&s, Some(ADMIN_KEY));
        let issuer = request(&s, Some(ISSUER_KEY));
        let none = request(&s, None);
        assert!(extract::<AdminPrincipal>(&admin).is_ok());
        assert!(matches!(
            extract::<AdminPrincipal>(&issuer),
            Err(ApiError::Forbidden)
        ));
        assert!(matches!(
            extract::<AdminPrincipal>(&none),
            Err(ApiError::Unauthorized)
        ));
        assert!(extract::<IssuerPrincipal>(&issuer).is_ok());
        assert!(matches!(
            extract::<IssuerPrincipal>(&admin),
            Err(ApiError::Forbidden)
        ));
        assert!(matches!(
            extract::<IssuerPrincipal>(&none),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            extract::<KeyHolder>(&admin),
            Ok(KeyHolder(Role::Admin))
        ));
        assert!(matches!(
            extract::<KeyHolder>(&issuer),
            Ok(KeyHolder(Role::Issuer))
        ));
        assert!(matches!(
            extract::<KeyHolder>(&none),
            Err(ApiError::Unauthorized)
        ));
    }

    #[test]
    fn wrong_keys_are_refused_and_counted_until_429() {
        let s = app_state();
        let wrong = request(&s, Some("not-a-key"));
        for _ in 0..3 {
            assert!(matches!(
                extract::<AdminPrincipal>(&wrong),
                Err(ApiError::Unauthorized)
            ));
        }
        assert!(matches!(
            extract::<AdminPrincipal>(&wrong),
            Err(ApiError::TooManyRequests { .. })
        ));
        assert!(matches!(
            extract::<IssuerPrincipal>(&wrong),
            Err(ApiError::TooManyRequests { .. })
        ));
        assert!(matches!(
            extract::<KeyHolder>(&wrong),
            Err(ApiError::TooManyRequests { .. })
        ));
    }

    fn token_of(req: &HttpRequest) -> Result<String, ApiError> {
        extract::<BearerToken>(req).map(|t| t.0)
    }

    #[test]
    fn the_token_comes_from_the_header_else_the_cookie() {
        let s = app_state();
        let header_token = TestRequest::get()
            .app_data(s.clone())
            .insert_header((header::AUTHORIZATION, "Bearer abc.def.ghi"))
            .cookie(actix_web::cookie::Cookie::new("session", "from-cookie"))
            .to_http_request();
        assert_eq!(token_of(&header_token).unwrap(), "abc.def.ghi");
        let blank = TestRequest::get()
            .app_data(s.clone())
            .insert_header((header::AUTHORIZATION, "Bearer    "))
            .to_http_request();
        assert!(matches!(token_of(&blank), Err(ApiError::InvalidToken)));
        let cookie = TestRequest::get()
            .app_data(s.clone())
            .cookie(actix_web::cookie::Cookie::new("session", "from-cookie"))
            .to_http_request();
        assert_eq!(token_of(&cookie).unwrap(), "from-cookie");
        let empty_cookie = TestRequest::get()
            .app_data(s.clone())
            .cookie(actix_web::cookie::Cookie::new("session", ""))
            .to_http_request();
        assert!(matches!(
            token_of(&empty_cookie),
            Err(ApiError::InvalidToken)
        ));
        let other_cookie = TestRequest::get()
            .app_data(s.clone())
            .cookie(actix_web::cookie::Cookie::new("other", "x"))
            .to_http_request();
        assert!(matches!(
            token_of(&other_cookie),
            Err(ApiError::InvalidToken)
        ));
        // A cookie token on a cross-site unsafe request: the CSRF rule.
        let cross = TestRequest::post()
            .app_data(s.clone())
            .insert_header(("host", "site.test"))
            .insert_header(("origin", "https://evil.test"))
            .cookie(actix_web::cookie::Cookie::new("session", "from-cookie"))
            .to_http_request();
        assert!(matches!(token_of(&cross), Err(ApiError::CrossSite)));
    }
}
