//! `SessionService`: every use case, between the HTTP handlers and the store.
//!
//! Verify is the hot path: the token is checked in-process against the cached
//! key ring (no Redis call for a bad token), then one script confirms the
//! session in Redis. Nothing is answered "valid" unless Redis confirmed the
//! session during this call.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Settings;
use crate::domain::{DeviceId, InvalidInput, Metadata, SessionId, UserId, UserTag};
use crate::metrics::Metrics;
use crate::state::{Global, GlobalState};
use crate::store::{GlobalOp, Liveness, NewSession, Revoke, SessionRecord, Store, StoreError};
use crate::token::{Claims, TokenCodec, TokenError, VerifiedToken, kid_of, new_kid};
use crate::whereabouts::Seen;

/// Milliseconds since the Unix epoch, from this host's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a use case failed; `http::error` maps each to a status and code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid token: {0}")]
    InvalidToken(TokenError),
    #[error("session not alive")]
    SessionGone,
    #[error("password re-entry required (max_age {max_age}s)")]
    InsufficientAuth { max_age: u64 },
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<InvalidInput> for ServiceError {
    fn from(e: InvalidInput) -> Self {
        ServiceError::InvalidRequest(e.0)
    }
}

/// Session policy, from settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub idle: Duration,
    pub absolute: Duration,
    pub reauth_after: Duration,
    pub max_per_user: u32,
    pub touch: Duration,
    pub leeway: Duration,
}

/// A login to record.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub user: UserId,
    pub device: Option<DeviceId>,
    /// Seconds since the epoch; `None` means now.
    pub auth_time: Option<i64>,
    pub metadata: Metadata,
}

#[derive(Debug, Clone)]
pub struct CreatedSession {
    pub token: String,
    pub session: SessionId,
    pub user: UserId,
    pub device: DeviceId,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub auth_time_ms: i64,
}

/// A session confirmed alive by Redis during this request.
#[derive(Debug, Clone)]
pub struct ActiveSession {
    pub token: Arc<VerifiedToken>,
    /// The stored record, when asked for.
    pub record: Option<SessionRecord>,
}

/// How a verify should treat the re-authentication policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reauth {
    /// Apply `reauth_after`, tightened by the route's `max_age` if given.
    Enforce { max_age: Option<u64> },
    /// Session liveness only (logout, listing, introspection).
    Ignore,
}

pub struct SessionService {
    store: Arc<Store>,
    global: Arc<Global>,
    codec: TokenCodec,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// The highest epoch (and cutoff) a purge was asked for, and whether
    /// one runs: one purge at a time, which finishes with the latest epoch.
    purge_target: std::sync::atomic::AtomicI64,
    purge_cutoff: std::sync::atomic::AtomicI64,
    purge_running: std::sync::atomic::AtomicBool,
    /// `logout_all_purge_delay`: how long a purge waits before it starts.
    purge_delay: Duration,
    /// Correctly signed kids found in no ring of this deployment, even
    /// after a fresh read (see `check_token`).
    foreign_kids: std::sync::Mutex<HashSet<String>>,
}

/// Most foreign kids remembered (the set is cleared when full).
const MAX_FOREIGN_KIDS: usize = 1024;

impl SessionService {
    pub fn new(
        settings: &Settings,
        store: Arc<Store>,
        global: Arc<Global>,
        metrics: Arc<Metrics>,
    ) -> Self {
        SessionService {
            codec: TokenCodec::with_cache(
                settings.jwt_algorithm,
                &settings.issuer,
                settings.clock_leeway.as_secs(),
                settings.max_token_bytes,
                settings.verified_token_cache,
            )
            .with_max_lifetime(settings.absolute_lifetime),
            policy: Policy {
                idle: settings.idle_timeout,
                absolute: settings.absolute_lifetime,
                reauth_after: settings.reauth_after,
                max_per_user: settings.max_sessions_per_user,
                touch: settings.effective_touch_interval(),
                leeway: settings.clock_leeway,
            },
            store,
            global,
            metrics,
            purge_target: std::sync::atomic::AtomicI64::new(0),
            purge_cutoff: std::sync::atomic::AtomicI64::new(0),
            purge_running: std::sync::atomic::AtomicBool::new(false),
            purge_delay: settings.logout_all_purge_delay,
            foreign_kids: std::sync::Mutex::new(HashSet::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn global(&self) -> &Global {
        &self.global
    }

    pub fn issuer(&self) -> &str {
        self.codec.issuer()
    }

    fn liveness(&self, state: &GlobalState) -> Liveness {
        Liveness {
            idle_ms: self.policy.idle.as_millis() as i64,
            cutoff_ms: state.cutoff_ms,
            epoch: state.epoch,
        }
    }

    /// Records a login and returns its token. The token is only handed out
    /// after Redis stored the record.
    pub async fn create(&self, req: CreateRequest) -> Result<CreatedSession, ServiceError> {
        self.create_as(req, "issuer").await
    }

    /// [`SessionService::create`], its events naming `actor`.
    pub async fn create_as(
        &self,
        req: CreateRequest,
        actor: &str,
    ) -> Result<CreatedSession, ServiceError> {
        let now = now_ms();
        if let Some(t) = req.auth_time {
            if t < 0 {
                return Err(ServiceError::InvalidRequest(
                    "auth_time must not be negative".into(),
                ));
            }
            if t.saturating_mul(1000) > now + self.policy.leeway.as_millis() as i64 {
                return Err(ServiceError::InvalidRequest(
                    "auth_time must not be in the future".into(),
                ));
            }
        }
        let mut state = self.global.snapshot()?;
        let device = req.device.unwrap_or_else(DeviceId::random);
        let mut attempts = 0;
        let (session, created) = loop {
            attempts += 1;
            let session = SessionId::generate(&req.user.tag());
            let created = self
                .store
                .create_as(
                    NewSession {
                        user: &req.user,
                        session: &session,
                        device: &device,
                        auth_time_ms: req.auth_time.map(|t| t * 1000),
                        metadata: req.metadata.as_stored(),
                        absolute_ms: self.policy.absolute.as_millis() as i64,
                        max_per_user: self.policy.max_per_user,
                    },
                    self.liveness(&state),
                    actor,
                )
                .await?;
            if created.evicted > 0 {
                self.metrics
                    .revoked("evicted_over_cap", created.evicted as u64);
            }
            if created.replaced > 0 {
                self.metrics
                    .revoked("replaced_same_device", created.replaced as u64);
            }
            // The record carries the epoch this instance knew. Read after
            // the record was stored: if a logout-all raised the epoch past
            // it (one not heard of here yet, or one racing this login), the
            // record is dead on arrival and its token would never verify.
            // Learn the new state and store the login once more (the dead
            // record goes with the next create's pruning or the purge);
            // twice in a row, give up (503, safe to retry).
            match self.store.read_epoch().await? {
                Some(current) if current <= state.epoch => break (session, created),
                _ if attempts < 2 => {
                    self.global.refresh(&self.store).await?;
                    state = self.global.snapshot()?;
                }
                _ => {
                    return Err(ServiceError::Store(StoreError::Refused(
                        "a logout-all landed during this login twice; nothing usable was \
                         stored, retry"
                            .into(),
                    )));
                }
            }
        };
        self.metrics.sessions_created.inc();
        let claims = Claims {
            sub: req.user.as_str().to_string(),
            sid: session.as_str().to_string(),
            did: device.as_str().to_string(),
            iss: self.codec.issuer().to_string(),
            iat: (created.created_ms / 1000) as u64,
            exp: (created.expires_ms / 1000) as u64,
            nbf: None,
        };
        let token = self.codec.sign(&state.ring, &claims);
        Ok(CreatedSession {
            token,
            session,
            user: req.user,
            device,
            created_ms: created.created_ms,
            expires_ms: created.expires_ms,
            auth_time_ms: created.auth_time_ms,
        })
    }

    /// Checks a token in-process: no Redis call, except once for a
    /// correctly signed token of a kid this instance has not seen (a
    /// rotation made elsewhere, not read here yet): then the global state
    /// is re-read (coalesced with concurrent ones) and the check retried. A
    /// kid still unknown after a read sent after this request began belongs
    /// to no ring of this deployment: it is remembered and refused from
    /// then on without any Redis call.
    pub async fn check_token(
        &self,
        token: &str,
    ) -> Result<(Arc<VerifiedToken>, Arc<GlobalState>), ServiceError> {
        let since = Instant::now();
        let state = self.global.snapshot()?;
        match self.codec.verify(&state.ring, token, now_ms()) {
            Ok(verified) => return Ok((verified, state)),
            Err(TokenError::UnseenKey) => {}
            Err(e) => return Err(ServiceError::InvalidToken(e)),
        }
        let unknown = ServiceError::InvalidToken(TokenError::UnknownKey);
        let Some(kid) = kid_of(token) else {
            return Err(unknown);
        };
        if self.lock_foreign().contains(&kid) {
            return Err(unknown);
        }
        // Boxed: a rare path, kept out of every verify's future.
        Box::pin(self.global.refresh_for_kid(&self.store, &kid, since)).await?;
        let state = self.global.snapshot()?;
        match self.codec.verify(&state.ring, token, now_ms()) {
            Ok(verified) => Ok((verified, state)),
            Err(TokenError::UnseenKey) => {
                let mut foreign = self.lock_foreign();
                if foreign.len() >= MAX_FOREIGN_KIDS {
                    foreign.clear();
                }
                foreign.insert(kid);
                Err(unknown)
            }
            Err(e) => Err(ServiceError::InvalidToken(e)),
        }
    }

    fn lock_foreign(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.foreign_kids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The full check: token in-process, then one Redis round trip.
    pub async fn verify(
        &self,
        token: &str,
        reauth: Reauth,
        full_record: bool,
    ) -> Result<ActiveSession, ServiceError> {
        self.verify_from(token, reauth, full_record, None).await
    }

    /// [`SessionService::verify`], recording where the request came from
    /// (`seen`, called only when the throttled touch is due) in the record.
    pub async fn verify_from(
        &self,
        token: &str,
        reauth: Reauth,
        full_record: bool,
        seen: Option<&(dyn Fn() -> Seen + Sync)>,
    ) -> Result<ActiveSession, ServiceError> {
        let (verified, state) = self.check_token(token).await?;
        // Introspection and listing are not user activity: no touch, no
        // password-age policy. Verify is: touch, and enforce the policy in
        // the same round trip (a refused verify does not slide the expiry).
        let (touch_ms, limit_s) = match reauth {
            Reauth::Enforce { max_age } => {
                let mut limit_s = self.policy.reauth_after.as_secs();
                if let Some(max_age) = max_age {
                    limit_s = limit_s.min(max_age);
                }
                (self.policy.touch.as_millis() as i64, Some(limit_s))
            }
            Reauth::Ignore => (-1, None),
        };
        let max_auth_age_ms = limit_s.map_or(-1, |s| (s as i64).saturating_mul(1000));
        // A new cutoff or key ring flushes the near-cache (if on) at once.
        self.store.observe_state(state.id());
        let live = self
            .store
            .verify(
                &verified.session,
                &verified.device,
                self.liveness(&state),
                touch_ms,
                max_auth_age_ms,
                full_record,
                &state.clock,
                seen,
            )
            .await?
            .ok_or(ServiceError::SessionGone)?;
        // The call may have taken up to `redis_timeout`: the cutoff it was
        // judged by must still be within `state_max_staleness` now. (A
        // refusal stands whatever the state: the cutoff only rises. Anything
        // else, a re-authentication demand included, may rest on a cutoff
        // that spared a record a logout-all has killed.)
        self.global.still_valid(&state)?;
        if let (true, Some(max_age)) = (live.reauth_needed, limit_s) {
            return Err(ServiceError::InsufficientAuth { max_age });
        }
        Ok(ActiveSession {
            token: verified,
            record: live.record,
        })
    }

    /// The caller's live session, for the token holder's own endpoints:
    /// liveness only (no touch, no password-age policy), one round trip.
    pub async fn session_of(&self, token: &str) -> Result<ActiveSession, ServiceError> {
        self.verify(token, Reauth::Ignore, false).await
    }

    /// Logout on this device: the token's own session is deleted. Returns
    /// the session id (for the audit log).
    pub async fn logout_current(&self, token: &str) -> Result<SessionId, ServiceError> {
        let (verified, state) = self.check_token(token).await?;
        let n = self
            .store
            .revoke_as(
                &verified.session.user_tag(),
                Revoke::One(verified.session.field()),
                self.liveness(&state),
                "self",
                "logout",
            )
            .await?;
        if n == 0 {
            return Err(ServiceError::SessionGone);
        }
        self.metrics.revoked("logout", n);
        Ok(verified.session.clone())
    }

    /// Every live session of a user.
    pub async fn list(&self, user: &UserTag) -> Result<Vec<SessionRecord>, ServiceError> {
        let state = self.global.snapshot()?;
        Ok(self.store.list(user, self.liveness(&state)).await?)
    }

    /// Revokes sessions of one user; returns how many live ones went.
    /// `how` is the metrics label; the event's reason and default actor
    /// follow from it (see [`revocation`]).
    pub async fn revoke(
        &self,
        user: &UserTag,
        which: Revoke<'_>,
        how: &str,
    ) -> Result<u64, ServiceError> {
        self.revoke_as(user, which, how, None).await
    }

    /// [`SessionService::revoke`], its events naming `actor` (`None`: the
    /// default for `how`).
    pub async fn revoke_as(
        &self,
        user: &UserTag,
        which: Revoke<'_>,
        how: &str,
        actor: Option<&str>,
    ) -> Result<u64, ServiceError> {
        let state = self.global.snapshot()?;
        let (reason, default_actor) = revocation(how);
        let n = self
            .store
            .revoke_as(
                user,
                which,
                self.liveness(&state),
                actor.unwrap_or(default_actor),
                reason,
            )
            .await?;
        self.metrics.revoked(how, n);
        Ok(n)
    }

    /// The login backend re-checked the password.
    pub async fn reauth(&self, session: &SessionId) -> Result<i64, ServiceError> {
        self.reauth_as(session, "issuer").await
    }

    /// [`SessionService::reauth`], its event naming `actor`.
    pub async fn reauth_as(&self, session: &SessionId, actor: &str) -> Result<i64, ServiceError> {
        let state = self.global.snapshot()?;
        self.store
            .reauth_as(session, self.liveness(&state), actor)
            .await?
            .ok_or(ServiceError::NotFound)
    }

    /// Revokes every session created up to now (or up to `at_ms`), here at
    /// once and on other instances within `state_refresh_interval`: the
    /// epoch rises (and the cutoff), and a record stamped with an older
    /// epoch is dead whatever the nodes' clocks say. Records are then purged
    /// in the background, in bounded batches, on every primary.
    pub async fn logout_all(self: &Arc<Self>, at_ms: Option<i64>) -> Result<i64, ServiceError> {
        self.logout_all_as(at_ms, "admin").await
    }

    /// [`SessionService::logout_all`], its event naming `actor`.
    pub async fn logout_all_as(
        self: &Arc<Self>,
        at_ms: Option<i64>,
        actor: &str,
    ) -> Result<i64, ServiceError> {
        let started = std::time::Instant::now();
        let record = self
            .store
            .global_as(GlobalOp::Cutoff { at_ms }, actor)
            .await?;
        let (cutoff, epoch) = (record.cutoff_ms, record.epoch);
        self.global.apply(record, started)?;
        self.flush_near_cache();
        self.metrics.revoked("logout_all", 0);
        self.purge_cutoff.fetch_max(cutoff, Ordering::SeqCst);
        self.purge_target.fetch_max(epoch, Ordering::SeqCst);
        if !self.purge_running.swap(true, Ordering::SeqCst) {
            let this = Arc::clone(self);
            tokio::spawn(async move { this.purge_loop().await });
        }
        Ok(cutoff)
    }

    /// Purges up to the latest requested epoch (and cutoff), again while a
    /// later logout-all raised it meanwhile; one loop at a time.
    async fn purge_loop(self: Arc<Self>) {
        let mut done = 0;
        loop {
            if !self.purge_delay.is_zero() && self.purge_target.load(Ordering::SeqCst) > done {
                // Held back (`logout_all_purge_delay`); the cutoff already
                // refuses these sessions on every instance.
                tokio::time::sleep(self.purge_delay).await;
            }
            let target = self.purge_target.load(Ordering::SeqCst);
            if target <= done {
                self.purge_running.store(false, Ordering::SeqCst);
                // A logout-all may have raised the target and seen the flag
                // still set: take the work back if so.
                if self.purge_target.load(Ordering::SeqCst) > done
                    && !self.purge_running.swap(true, Ordering::SeqCst)
                {
                    continue;
                }
                return;
            }
            // Every record this epoch and cutoff kill; the count is of those
            // alive by time alone (the sessions the logout-all revoked).
            let live = Liveness {
                idle_ms: self.policy.idle.as_millis() as i64,
                cutoff_ms: self.purge_cutoff.load(Ordering::SeqCst),
                epoch: target,
            };
            match self.store.purge(live).await {
                Ok(n) => {
                    self.metrics.revoked("logout_all", n);
                    tracing::info!(purged = n, "logout-all purge finished");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "logout-all purge stopped; records expire by TTL")
                }
            }
            done = target;
        }
    }

    /// Starts signing with a new key; older keys verify until they retire.
    pub async fn rotate_key(&self) -> Result<String, ServiceError> {
        self.rotate_key_as("admin").await
    }

    /// [`SessionService::rotate_key`], its event naming `actor`.
    pub async fn rotate_key_as(&self, actor: &str) -> Result<String, ServiceError> {
        let started = std::time::Instant::now();
        let kid = new_kid();
        let retire_after = self.policy.absolute + self.policy.leeway + Duration::from_secs(1);
        let record = self
            .store
            .global_as(
                GlobalOp::Rotate {
                    kid: &kid,
                    retire_after_ms: retire_after.as_millis() as i64,
                },
                actor,
            )
            .await?;
        self.global.apply(record, started)?;
        self.flush_near_cache();
        Ok(kid)
    }

    /// After a logout-all or a rotation here: the near-cache (if on) holds
    /// nothing read under the previous state.
    fn flush_near_cache(&self) {
        if let Ok(state) = self.global.snapshot() {
            self.store.observe_state(state.id());
        }
    }

    /// Signs `claims` with the active kid's Ed25519 key: a compact JWS that
    /// anyone can verify against [`jwks`](Self::jwks) (upstream assertions,
    /// security event tokens). Fails closed like verify: 503 when the key
    /// ring copy is stale.
    pub fn sign_jwt<C: serde::Serialize + ?Sized>(
        &self,
        claims: &C,
    ) -> Result<String, ServiceError> {
        Ok(self.global.snapshot()?.ring.asym().sign_jwt(claims))
    }

    /// The current global state (its ring signs with `ring.asym()`), if
    /// fresh enough to act on.
    pub fn signing_state(&self) -> Result<Arc<GlobalState>, ServiceError> {
        Ok(self.global.snapshot()?)
    }

    /// The public keys of the kids not retired, from the last ring read
    /// (however old: a public key list is never made unsafe by age); `None`
    /// before the first read.
    pub fn jwks(&self) -> Option<crate::jwks::Jwks> {
        self.global
            .latest()
            .map(|state| state.ring.asym().jwks(now_ms()))
    }

    /// RFC 7662 introspection: `None` when the token is not active.
    pub async fn introspect(&self, token: &str) -> Result<Option<ActiveSession>, ServiceError> {
        match self.verify(token, Reauth::Ignore, true).await {
            Ok(active) => Ok(Some(active)),
            Err(ServiceError::Store(e)) => Err(ServiceError::Store(e)),
            Err(_) => Ok(None),
        }
    }
}

/// The event reason and the default actor of a revocation, from its
/// metrics label (`how`).
pub fn revocation(how: &str) -> (&str, &'static str) {
    match how {
        "logout" => ("logout", "self"),
        "logout_device" => ("logout_other_device", "self"),
        "logout_others" => ("logout_others", "self"),
        "admin_user" => ("force_logout_user", "admin"),
        "admin_device" => ("force_logout_device", "admin"),
        "admin_session" => ("admin_revoke", "admin"),
        other => (other, "admin"),
    }
}

/// What `SessionService` decides before any Redis call (found open by
/// `scripts/mutants`; see scripts/mutants.md). The rest of the service is
/// covered by the integration tests in tests/api, against a real Redis.
#[cfg(test)]
mod mutation_tests {
    use super::*;
    use crate::config::Secret;
    use crate::store::KeySchema;

    fn service() -> (SessionService, Settings) {
        let env = |k: &str| match k {
            "SESSIONGATE_ISSUER_KEYS" => Some("i".repeat(32)),
            "SESSIONGATE_ADMIN_KEYS" => Some("a".repeat(32)),
            "SESSIONGATE_SIGNING_SECRET" => Some("s".repeat(32)),
            "SESSIONGATE_ISSUER" => Some("auth.example".to_string()),
            _ => None,
        };
        let settings = Settings::load(&env).unwrap();
        let metrics = Arc::new(Metrics::new());
        // Connects lazily, and nothing here reaches it: with no global state
        // loaded, every use case that got past its input checks stops at
        // the snapshot (fail closed) before any Redis call.
        let store = Store::new(
            "redis://127.0.0.1:1",
            &[],
            Duration::from_millis(250),
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
        let service = SessionService::new(&settings, Arc::new(store), Arc::new(global), metrics);
        (service, settings)
    }

    fn login(auth_time: Option<i64>) -> CreateRequest {
        CreateRequest {
            user: UserId::parse("alice").unwrap(),
            device: None,
            auth_time,
            metadata: Metadata::default(),
        }
    }

    #[test]
    fn now_ms_is_the_wall_clock_in_milliseconds() {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let now = now_ms();
        // A day of slack: this checks the unit and the source, not timing.
        assert!((now - wall).abs() < 86_400_000, "{now} vs {wall}");
    }

    #[test]
    fn the_service_signs_as_the_configured_issuer() {
        let (service, settings) = service();
        assert_eq!(settings.issuer, "auth.example");
        assert_eq!(service.issuer(), "auth.example");
    }

    fn refused_as_input(r: &Result<CreatedSession, ServiceError>) -> bool {
        matches!(r, Err(ServiceError::InvalidRequest(_)))
    }

    #[tokio::test]
    async fn auth_time_must_be_between_the_epoch_and_now_plus_leeway() {
        let (service, settings) = service();
        let leeway_ms = settings.clock_leeway.as_millis() as i64;
        assert!(leeway_ms >= 2_000, "the test needs a leeway of 2 s or more");
        let r = service.create(login(Some(-1))).await;
        assert!(refused_as_input(&r), "{r:?}");
        let far = (now_ms() + leeway_ms) / 1000 + 3600;
        let r = service.create(login(Some(far))).await;
        assert!(refused_as_input(&r), "{r:?}");
        // Accepted as input: these reach the global-state snapshot, which
        // fails closed here (nothing loaded), so the error is a store one.
        let within_leeway = (now_ms() + leeway_ms / 2) / 1000;
        for ok in [0, now_ms() / 1000 - 3600, within_leeway] {
            let r = service.create(login(Some(ok))).await;
            assert!(
                matches!(r, Err(ServiceError::Store(_))),
                "auth_time {ok}: {r:?}"
            );
        }
        let r = service.create(login(None)).await;
        assert!(matches!(r, Err(ServiceError::Store(_))), "{r:?}");
    }
}
