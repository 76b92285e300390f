//! The global state every instance caches: the signing key ring, the
//! logout-all epoch and the cutoff (`revoke-before`). It lives in one small Redis hash; each instance keeps a
//! copy, refreshed when a change is announced on the events channel
//! (pub/sub) and, as a fallback, every `state_refresh_interval`.
//!
//! Fail closed: when the copy is older than `state_max_staleness` (Redis
//! unreachable, refresher stuck), `snapshot` refuses and verify answers 503;
//! it never carries on as if there were no cutoff. A verify checks the age
//! of the copy it used again after its Redis call answered (`still_valid`),
//! so a slow call cannot stretch the bound. When the state is missing
//! from Redis (first start, or Redis lost its data) it is initialised with a
//! new key id and a cutoff of "now", so nothing issued before is accepted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use jsonwebtoken::Algorithm;
use tokio::sync::Notify;

use crate::config::Secret;
use crate::store::{GlobalOp, GlobalRecord, RedisClock, Store, StoreError, StoredGlobal};
use crate::token::{KeyRing, new_kid};

/// One consistent copy of the global state.
pub struct GlobalState {
    pub cutoff_ms: i64,
    /// The logout-all epoch (only rises; see `store/lua/global.lua`).
    pub epoch: i64,
    pub ring: Arc<KeyRing>,
    ring_json: String,
    /// When the read that produced this copy was sent.
    pub fetched_at: Instant,
    /// Redis's clock, read by the newest read (see [`RedisClock`]): what
    /// verify judges a record's deadlines by. As fresh as the copy.
    pub clock: RedisClock,
}

impl GlobalState {
    /// Changes when the cutoff or the key ring does (the near-cache is
    /// flushed then).
    pub fn id(&self) -> u64 {
        (self.cutoff_ms as u64) ^ (Arc::as_ptr(&self.ring) as u64).rotate_left(32)
    }
}

pub struct Global {
    current: ArcSwapOption<GlobalState>,
    wake: Notify,
    /// One on-demand refresh at a time (`refresh_for_kid`).
    on_demand: tokio::sync::Mutex<()>,
    secret: Secret,
    alg: Algorithm,
    /// The oldest copy acted upon (`state_max_staleness`).
    max_age: Duration,
}

impl Global {
    pub fn new(secret: Secret, alg: Algorithm, max_staleness: Duration) -> Global {
        Global {
            current: ArcSwapOption::empty(),
            wake: Notify::new(),
            on_demand: tokio::sync::Mutex::new(()),
            secret,
            alg,
            // The copy's age is measured from when its read was sent, and
            // checked again once a verify's own Redis call has answered
            // (`still_valid`), so that call is inside the bound.
            max_age: max_staleness,
        }
    }

    /// The current copy, if fresh enough to act on.
    pub fn snapshot(&self) -> Result<Arc<GlobalState>, StoreError> {
        match self.current.load_full() {
            Some(state) if state.fetched_at.elapsed() <= self.max_age => Ok(state),
            Some(_) => Err(StoreError::Timeout(self.max_age)),
            None => Err(StoreError::Connection("global state not loaded yet".into())),
        }
    }

    /// The last copy read, however old: only for what staleness cannot
    /// make wrong (publishing public keys).
    pub fn latest(&self) -> Option<Arc<GlobalState>> {
        self.current.load_full()
    }

    /// Whether an answer computed with the copy `used` may still be given
    /// now: `used` is still within `state_max_staleness`, or the current
    /// copy is and holds the same cutoff and epoch. A verify checks this after its
    /// Redis call, so the call's own duration (up to `redis_timeout`)
    /// counts against the bound: a session created before a logout-all is
    /// never confirmed later than `state_max_staleness` after it, even when
    /// the refresher fails and the request connections do not.
    pub fn still_valid(&self, used: &GlobalState) -> Result<(), StoreError> {
        if used.fetched_at.elapsed() <= self.max_age {
            return Ok(());
        }
        match self.snapshot() {
            Ok(current) if current.cutoff_ms == used.cutoff_ms && current.epoch == used.epoch => {
                Ok(())
            }
            _ => Err(StoreError::Timeout(self.max_age)),
        }
    }

    /// Age of the cached copy, for metrics.
    pub fn age(&self) -> Option<Duration> {
        self.current.load().as_ref().map(|s| s.fetched_at.elapsed())
    }

    /// Installs a state read from Redis at `fetched_at`. A copy never moves
    /// backwards: the cutoff and the epoch only rise.
    pub fn apply(&self, record: GlobalRecord, fetched_at: Instant) -> Result<(), StoreError> {
        if record.now_ms <= 0 {
            return Err(StoreError::Protocol(
                "a global state read without Redis's time".into(),
            ));
        }
        let clock = RedisClock {
            redis_ms: record.now_ms,
            sent: fetched_at,
        };
        let previous = self.current.load_full();
        let parsed = match &previous {
            Some(p) if p.ring_json == record.ring_json => p.ring.clone(),
            _ => {
                let mut ring = KeyRing::from_json(
                    &record.ring_json,
                    self.secret.expose().as_bytes(),
                    self.alg,
                )
                .map_err(StoreError::Protocol)?;
                if let Some(p) = &previous {
                    ring.inherit_gone(&p.ring);
                }
                Arc::new(ring)
            }
        };
        // Atomic against concurrent applies (the refresher, a logout-all
        // handler). The cutoff only ever rises in Redis, so the cached one
        // never moves back, whatever order reads were answered in.
        self.current.rcu(|current| {
            let cutoff_ms = current
                .as_ref()
                .map_or(record.cutoff_ms, |c| c.cutoff_ms.max(record.cutoff_ms));
            let epoch = current
                .as_ref()
                .map_or(record.epoch, |c| c.epoch.max(record.epoch));
            let newer = current.as_ref().is_none_or(|c| fetched_at >= c.fetched_at);
            let (ring, ring_json, clock) = match current {
                Some(c) if !newer => (c.ring.clone(), c.ring_json.clone(), c.clock),
                _ => (parsed.clone(), record.ring_json.clone(), clock),
            };
            let fetched = current
                .as_ref()
                .map_or(fetched_at, |c| c.fetched_at.max(fetched_at));
            Some(Arc::new(GlobalState {
                cutoff_ms,
                epoch,
                ring,
                ring_json,
                fetched_at: fetched,
                clock,
            }))
        });
        Ok(())
    }

    /// Reads the state from Redis (initialising what is missing) and installs it.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let started = Instant::now();
        let record = match store.read_global().await? {
            StoredGlobal {
                cutoff_ms: Some(cutoff_ms),
                ring_json: Some(ring_json),
                epoch: Some(epoch),
                now_ms,
            } => GlobalRecord {
                cutoff_ms,
                ring_json,
                now_ms,
                epoch,
            },
            _ => {
                tracing::warn!(
                    "global state missing in Redis: initialising what is missing (new key id, cutoff and epoch now)"
                );
                store.global(GlobalOp::Init { kid: &new_kid() }).await?
            }
        };
        self.apply(record, started)?;
        if let Some(state) = self.current.load().as_ref() {
            store.observe_state(state.id());
        }
        Ok(())
    }

    /// Re-reads the state for a request that began at `since` and met a
    /// correctly signed token of `kid`, a kid not in the ring (a rotation
    /// another instance made, not heard of here yet). Coalesced: while one
    /// such read is in flight, others wait for it, and none is sent when
    /// the copy already knows `kid` or was read after `since`.
    pub async fn refresh_for_kid(
        &self,
        store: &Store,
        kid: &str,
        since: Instant,
    ) -> Result<(), StoreError> {
        let settled = || {
            self.current
                .load()
                .as_ref()
                .is_some_and(|s| s.fetched_at >= since || s.ring.knows(kid))
        };
        if settled() {
            return Ok(());
        }
        let _one_at_a_time = self.on_demand.lock().await;
        if settled() {
            return Ok(());
        }
        self.refresh(store).await
    }

    /// Asks the refresher to re-read now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Re-reads the state every `interval`, or at once when woken.
    /// Logs only on transitions (failing / recovered), not on every try.
    pub async fn run_refresher(self: Arc<Self>, store: Arc<Store>, interval: Duration) {
        let mut failing = false;
        loop {
            match self.refresh(&store).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("global state readable again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot refresh the global state; verify fails closed once it is stale");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Listens on the events channel and wakes the refresher on every
    /// message; reconnects with a short backoff when the connection drops.
    pub async fn run_listener(self: Arc<Self>, store: Arc<Store>) {
        let mut failing = false;
        loop {
            match store.subscribe_events().await {
                Ok(pubsub) => {
                    failing = false;
                    // Anything may have changed while we were not listening.
                    self.wake();
                    let mut messages = pubsub.into_on_message();
                    while messages.next().await.is_some() {
                        self.wake();
                    }
                    tracing::warn!("events subscription ended; reconnecting");
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot subscribe to events; re-reading periodically");
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The in-process half of the global state: staleness, ordering, the cutoff
/// that only rises (found open by `scripts/mutants`; see scripts/mutants.md).
/// The Redis half (refresh, refresher, listener) is covered by the
/// integration tests in tests/api.
#[cfg(test)]
mod mutation_tests {
    use super::*;

    fn ring(active: &str) -> String {
        format!(r#"{{"active":"{active}","keys":[{{"kid":"{active}","retire_at":0}}]}}"#)
    }

    fn record(cutoff_ms: i64, active: &str) -> GlobalRecord {
        GlobalRecord {
            cutoff_ms,
            ring_json: ring(active),
            now_ms: 1,
            epoch: cutoff_ms,
        }
    }

    fn global(max_staleness: Duration) -> Global {
        Global::new(Secret::new("s".repeat(32)), Algorithm::HS256, max_staleness)
    }

    fn ago(d: Duration) -> Instant {
        Instant::now()
            .checked_sub(d)
            .expect("the monotonic clock is older than the backdating")
    }

    #[test]
    fn nothing_is_acted_upon_before_the_first_read() {
        let g = global(Duration::from_secs(60));
        assert!(matches!(g.snapshot(), Err(StoreError::Connection(_))));
        assert!(g.age().is_none());
    }

    #[test]
    fn a_fresh_copy_is_served_and_a_stale_one_refused() {
        let g = global(Duration::from_secs(60));
        g.apply(record(1_000, "k1"), Instant::now()).unwrap();
        let s = g.snapshot().unwrap();
        assert_eq!(s.cutoff_ms, 1_000);
        assert_eq!(s.ring.active, "k1");
        assert!(g.age().unwrap() < Duration::from_secs(60));

        let g = global(Duration::from_secs(60));
        g.apply(record(1_000, "k1"), ago(Duration::from_secs(61)))
            .unwrap();
        assert!(matches!(g.snapshot(), Err(StoreError::Timeout(_))));
        assert!(g.age().unwrap() >= Duration::from_secs(61));
    }

    #[test]
    fn a_newer_read_installs_its_ring_and_an_older_one_does_not() {
        let g = global(Duration::from_secs(60));
        let t0 = ago(Duration::from_secs(2));
        g.apply(record(1_000, "k1"), t0).unwrap();
        g.apply(record(1_000, "k2"), ago(Duration::from_secs(1)))
            .unwrap();
        assert_eq!(
            g.snapshot().unwrap().ring.active,
            "k2",
            "a rotation was lost"
        );
        // A read sent before the current copy's (answered late): its ring
        // is older, so it is ignored.
        g.apply(record(1_000, "k1"), t0).unwrap();
        assert_eq!(g.snapshot().unwrap().ring.active, "k2");
        // The same ring read again stays.
        g.apply(record(1_000, "k2"), Instant::now()).unwrap();
        assert_eq!(g.snapshot().unwrap().ring.active, "k2");
    }

    #[test]
    fn the_cutoff_never_moves_back_and_a_bad_ring_is_refused() {
        let g = global(Duration::from_secs(60));
        g.apply(record(5_000, "k1"), ago(Duration::from_secs(1)))
            .unwrap();
        g.apply(record(3_000, "k1"), Instant::now()).unwrap();
        assert_eq!(g.snapshot().unwrap().cutoff_ms, 5_000);
        assert_eq!(g.snapshot().unwrap().epoch, 5_000);
        g.apply(record(9_000, "k1"), ago(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(g.snapshot().unwrap().cutoff_ms, 9_000);
        assert_eq!(g.snapshot().unwrap().epoch, 9_000);
        let bad = GlobalRecord {
            cutoff_ms: 10_000,
            ring_json: r#"{"active":"k9","keys":[]}"#.into(),
            now_ms: 1,
            epoch: 10_000,
        };
        assert!(matches!(
            g.apply(bad, Instant::now()),
            Err(StoreError::Protocol(_))
        ));
        assert_eq!(g.snapshot().unwrap().cutoff_ms, 9_000);
    }
}
