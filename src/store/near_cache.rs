//! The opt-in near-cache (`near_cache_ttl`, off by default): records of
//! live sessions kept in-process for at most the TTL, so a verify may be
//! answered without Redis. Only a record a verify judged alive is kept; a
//! cached record is judged again on every hit (deadlines, cutoff, device,
//! password age, touch due), and a touch that is due goes to Redis.
//!
//! The bound, and why it holds: an entry is served only while younger than
//! the TTL, measured from when its read was *sent*. A revocation executed
//! in Redis at time W deletes the record; a read sent after W finds
//! nothing, and nothing is cached for it. So at any time after W + TTL,
//! every entry served was read after W: a revocation is seen by every
//! instance within the TTL of Redis executing it (so within the TTL of its
//! acknowledgement), whatever happens to the invalidations below. Refusals
//! are never cached.
//!
//! Invalidations make it much faster in the common case: one RESP3
//! connection per instance runs `CLIENT TRACKING ON BCAST PREFIX
//! <prefix>u{`, so Redis pushes the name of every user hash written (a
//! logout, a force-logout, a touch, a create) and the entries of that user
//! are dropped at once. Redis does not re-send invalidations a lost
//! connection missed (redis/redis#11767), so: everything is flushed when
//! that connection drops; it is pinged every TTL / 4, and nothing is served
//! or stored unless a ping sent within the last TTL was answered (an answer
//! comes after every invalidation queued before it); an entry is stored
//! only if no invalidation arrived while its read was in flight (the push
//! and the reply travel on different connections). A logout-all or a key
//! rotation (a new cutoff or ring in the global state) flushes at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most this many records are kept; when full, nothing more is stored
/// until an invalidation or a flush makes room (no eviction bookkeeping on
/// the hot path).
const MAX_ENTRIES: usize = 200_000;

/// A session id, inline (`SessionId` is always this long): a hit compares
/// it in the table's own slot, with no pointer to follow.
type SessionKey = [u8; crate::domain::SESSION_ID_CHARS];

fn session_key(session: &str) -> Option<SessionKey> {
    session.as_bytes().try_into().ok()
}

/// The cached records by session id, and which sessions each user hash
/// holds (for invalidations, which name user hashes; touched only by
/// stores, invalidations and flushes, never by a hit).
#[derive(Default)]
struct Entries {
    sessions: HashMap<SessionKey, Entry>,
    users: HashMap<Box<str>, Vec<SessionKey>>,
}

struct Entry {
    blob: std::sync::Arc<[u8]>,
    read_sent: Instant,
}

pub struct NearCache {
    ttl: Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    origin: Instant,
    entries: Mutex<Entries>,
    /// Bumped by every invalidation and flush; a read that saw it change
    /// while in flight is not stored.
    generation: AtomicU64,
    /// Serving allowed until this many µs after `origin` (0: not at all):
    /// the send time of the last answered ping plus the TTL.
    healthy_until_us: AtomicU64,
    /// The global state (cutoff, ring) the entries were read under.
    state: AtomicU64,
}

/// What a verify remembers between its read and storing the result.
#[derive(Debug, Clone, Copy)]
pub struct ReadTicket {
    generation: u64,
    sent: Instant,
}

impl NearCache {
    pub fn new(ttl: Duration, metrics: std::sync::Arc<crate::metrics::Metrics>) -> NearCache {
        NearCache {
            ttl,
            metrics,
            origin: Instant::now(),
            entries: Mutex::new(Entries::default()),
            generation: AtomicU64::new(0),
            healthy_until_us: AtomicU64::new(0),
            state: AtomicU64::new(0),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether serving is allowed at `now`.
    fn healthy_at(&self, now: Instant) -> bool {
        let now_us = now.saturating_duration_since(self.origin).as_micros() as u64;
        now_us < self.healthy_until_us.load(Ordering::Acquire)
    }

    /// A ping sent at `sent` on the invalidation connection was answered:
    /// every invalidation Redis queued before it has been applied.
    pub fn heartbeat(&self, sent: Instant) {
        let Some(since) = sent.checked_duration_since(self.origin) else {
            return;
        };
        let until = since + self.ttl;
        self.healthy_until_us
            .fetch_max(until.as_micros() as u64, Ordering::AcqRel);
        self.metrics
            .near_cache_up
            .set(i64::from(self.healthy_at(Instant::now())));
    }

    /// The invalidation connection is gone or silent: serve nothing, drop
    /// everything.
    pub fn down(&self) {
        self.healthy_until_us.store(0, Ordering::Release);
        self.metrics.near_cache_up.set(0);
        self.flush();
    }

    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.lock();
        guard.sessions.clear();
        guard.users.clear();
        self.metrics.near_cache_entries.set(0);
    }

    /// Redis wrote these user hashes.
    pub fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.lock();
        let Entries { sessions, users } = &mut *guard;
        for key in keys {
            if let Ok(key) = std::str::from_utf8(key)
                && let Some(gone) = users.remove(key)
            {
                for session in gone {
                    sessions.remove(&session);
                }
            }
        }
        self.metrics.near_cache_entries.set(sessions.len() as i64);
    }

    /// Flushes when the global state the entries were read under changed
    /// (a logout-all raised the cutoff, a rotation changed the ring).
    pub fn observe_state(&self, state_id: u64) {
        if self.state.swap(state_id, Ordering::AcqRel) != state_id {
            self.flush();
        }
    }

    /// The cached record of `session`, if it may be served at `now`: the
    /// caller's time, taken in the same synchronous stretch just before
    /// (no await in between), so it lags the real time by microseconds.
    pub fn get(&self, session: &str, now: Instant) -> Option<std::sync::Arc<[u8]>> {
        if !self.healthy_at(now) {
            return None;
        }
        let session = session_key(session)?;
        let guard = self.lock();
        let entry = guard.sessions.get(&session)?;
        // An entry read before `now - ttl` is too old; a read sent after
        // `now` (a store that raced this hit) is young enough.
        let fresh = now.saturating_duration_since(entry.read_sent) < self.ttl;
        if fresh {
            self.metrics.near_cache_hits.inc();
        }
        fresh.then(|| entry.blob.clone())
    }

    /// Taken before a read is sent; `sent` is a time taken no later than
    /// the read is sent (an earlier one only shortens the entry's life).
    pub fn ticket(&self, sent: Instant) -> ReadTicket {
        ReadTicket {
            generation: self.generation.load(Ordering::Acquire),
            sent,
        }
    }

    /// Stores the record of `session` (in the user hash `key`) that a
    /// verify judged alive, unless an invalidation or a flush happened
    /// since `ticket` (the read may predate a write whose invalidation was
    /// already applied), or serving is not allowed now.
    pub fn put(&self, key: &str, session: &str, blob: &[u8], ticket: ReadTicket) {
        let Some(session) = session_key(session) else {
            return;
        };
        if !self.healthy_at(Instant::now()) {
            return;
        }
        let mut guard = self.lock();
        if self.generation.load(Ordering::Acquire) != ticket.generation {
            return;
        }
        let Entries { sessions, users } = &mut *guard;
        let entry = Entry {
            blob: std::sync::Arc::from(blob),
            read_sent: ticket.sent,
        };
        if let Some(old) = sessions.get_mut(&session) {
            *old = entry;
            return;
        }
        if sessions.len() >= MAX_ENTRIES {
            return;
        }
        sessions.insert(session, entry);
        match users.get_mut(key) {
            Some(list) => list.push(session),
            None => {
                users.insert(Box::from(key), vec![session]);
            }
        }
        self.metrics.near_cache_entries.set(sessions.len() as i64);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().sessions.len()
    }
}

/// Keeps the invalidation connection up while the process runs: RESP3,
/// `CLIENT TRACKING ON BCAST PREFIX <prefix>u{`, a ping every TTL / 4
/// (answered within TTL / 2, else the connection counts as silent). Every
/// drop, silence or failure flushes the cache and stops serving from it
/// until the next answered ping on a new connection.
pub async fn run_invalidations(
    cache: std::sync::Arc<NearCache>,
    info: redis::ConnectionInfo,
    prefix: String,
    timeout: Duration,
) {
    let mut failing = false;
    loop {
        match listen(&cache, &info, &prefix, timeout).await {
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "near-cache invalidations lost; serving from Redis only until they are back");
            }
            Err(_) => {}
        }
        cache.down();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn listen(
    cache: &NearCache,
    info: &redis::ConnectionInfo,
    prefix: &str,
    timeout: Duration,
) -> Result<(), String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    let client =
        redis::Client::open(info.clone().set_redis_settings(resp3)).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_push_sender(tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let sent = Instant::now();
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(format!("{prefix}u{{"))
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    cache.flush();
    cache.heartbeat(sent);
    let every = (cache.ttl / 4).max(Duration::from_millis(5));
    let patience = (cache.ttl / 2).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            push = rx.recv() => match push {
                None => return Err("the invalidation connection closed".into()),
                Some(push) => match push.kind {
                    redis::PushKind::Invalidate => match push.data.first() {
                        Some(redis::Value::Array(keys)) => cache.invalidate(keys.iter().filter_map(|k| match k {
                            redis::Value::BulkString(b) => Some(b.as_slice()),
                            _ => None,
                        })),
                        // nil: Redis flushed everything (FLUSHALL, FLUSHDB).
                        _ => cache.flush(),
                    },
                    redis::PushKind::Disconnection => {
                        return Err("the invalidation connection dropped".into());
                    }
                    _ => {}
                },
            },
            _ = tick.tick() => {
                let sent = Instant::now();
                match tokio::time::timeout(patience, redis::cmd("PING").query_async::<String>(&mut conn)).await {
                    Ok(Ok(_)) => cache.heartbeat(sent),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err(format!("no answer to a ping within {patience:?}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session id of user tag `u` (one letter, repeated) and random part `r`.
    fn sid(u: char, r: char) -> String {
        let tag: String = std::iter::repeat_n(u, 22).collect();
        let random: String = std::iter::repeat_n(r, 22).collect();
        format!("{tag}{random}")
    }

    fn healthy_cache(ttl: Duration) -> NearCache {
        let c = NearCache::new(ttl, Default::default());
        c.heartbeat(Instant::now());
        c
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn serves_only_while_younger_than_the_ttl_and_healthy() {
        let (f, g) = (sid('k', 'f'), sid('k', 'g'));
        let c = healthy_cache(Duration::from_secs(60));
        let t = c.ticket(now());
        c.put("k", &f, b"rec", t);
        assert_eq!(c.get(&f, now()).as_deref(), Some(&b"rec"[..]));
        assert_eq!(c.get(&g, now()), None);
        // Judged a TTL or more after its read was sent: not served (the
        // cache is still healthy then: pinged after that read).
        let c2 = NearCache::new(Duration::from_secs(60), Default::default());
        let sent = Instant::now() - Duration::from_secs(30);
        c2.heartbeat(Instant::now());
        c2.put("k", &f, b"rec", c2.ticket(sent));
        assert!(c2.get(&f, sent + Duration::from_secs(59)).is_some());
        assert_eq!(c2.get(&f, sent + Duration::from_secs(60)), None);
        // A read sent more than a TTL ago is not served.
        let old = ReadTicket {
            generation: t.generation,
            sent: Instant::now() - Duration::from_secs(61),
        };
        c.put("k", &f, b"rec", old);
        assert_eq!(c.get(&f, now()), None);
        // Not healthy (no answered ping within the TTL): nothing served or stored.
        let c = NearCache::new(Duration::from_secs(60), Default::default());
        c.put("k", &f, b"rec", c.ticket(now()));
        assert_eq!(c.len(), 0);
        c.heartbeat(Instant::now() - Duration::from_secs(61));
        c.put("k", &f, b"rec", c.ticket(now()));
        assert_eq!(c.len(), 0);
        let pinged = Instant::now();
        c.heartbeat(pinged);
        c.put("k", &f, b"rec", c.ticket(now()));
        assert!(c.get(&f, now()).is_some());
        // Healthy only until a TTL after the last answered ping was sent.
        assert_eq!(c.get(&f, pinged + Duration::from_secs(61)), None);
        c.down();
        assert_eq!(c.get(&f, now()), None);
        assert_eq!(c.len(), 0);
        // Only a session id's shape is kept.
        let c = healthy_cache(Duration::from_secs(60));
        c.put("k", "short", b"rec", c.ticket(now()));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn an_invalidation_during_the_read_keeps_its_result_out() {
        let (kf, kg, jf) = (sid('k', 'f'), sid('k', 'g'), sid('j', 'f'));
        let c = healthy_cache(Duration::from_secs(60));
        let t = c.ticket(now());
        c.invalidate([&b"other"[..]]);
        c.put("k", &kf, b"rec", t);
        assert_eq!(c.get(&kf, now()), None);
        c.put("k", &kf, b"rec", c.ticket(now()));
        c.put("k", &kg, b"rec2", c.ticket(now()));
        c.put("j", &jf, b"rec3", c.ticket(now()));
        // A record read again replaces the entry, under the same user.
        c.put("k", &kf, b"rec1", c.ticket(now()));
        assert_eq!(c.get(&kf, now()).as_deref(), Some(&b"rec1"[..]));
        assert_eq!(c.len(), 3);
        c.invalidate([&b"k"[..]]);
        assert_eq!(c.get(&kf, now()), None);
        assert_eq!(c.get(&kg, now()), None);
        assert!(c.get(&jf, now()).is_some());
        assert_eq!(c.len(), 1);
        // A new global state flushes; the same one does not.
        c.observe_state(7);
        assert_eq!(c.len(), 0);
        c.put("j", &jf, b"rec3", c.ticket(now()));
        c.observe_state(7);
        assert_eq!(c.len(), 1);
        c.flush();
        assert_eq!(c.get(&jf, now()), None);
        // After a flush, a user's sessions are gone from the index too: an
        // invalidation of it finds nothing stale to remove.
        c.put("k", &kf, b"rec", c.ticket(now()));
        c.invalidate([&b"k"[..]]);
        assert_eq!(c.len(), 0);
    }
}
