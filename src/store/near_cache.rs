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

/// By user hash key: that user's cached records (usually one or two), and
/// how many records there are in all.
type Entries = (HashMap<Box<str>, Vec<Entry>>, usize);

struct Entry {
    field: Box<str>,
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
            entries: Mutex::new((HashMap::new(), 0)),
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

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    fn healthy(&self) -> bool {
        self.now_us() < self.healthy_until_us.load(Ordering::Acquire)
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
        self.metrics.near_cache_up.set(i64::from(self.healthy()));
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
        guard.0.clear();
        guard.1 = 0;
        self.metrics.near_cache_entries.set(0);
    }

    /// Redis wrote these user hashes.
    pub fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.lock();
        let (map, count) = &mut *guard;
        for key in keys {
            if let Ok(key) = std::str::from_utf8(key)
                && let Some(gone) = map.remove(key)
            {
                *count -= gone.len();
            }
        }
        self.metrics.near_cache_entries.set(*count as i64);
    }

    /// Flushes when the global state the entries were read under changed
    /// (a logout-all raised the cutoff, a rotation changed the ring).
    pub fn observe_state(&self, state_id: u64) {
        if self.state.swap(state_id, Ordering::AcqRel) != state_id {
            self.flush();
        }
    }

    /// The cached record of `field` in `key`, if it may be served.
    pub fn get(&self, key: &str, field: &str) -> Option<std::sync::Arc<[u8]>> {
        if !self.healthy() {
            return None;
        }
        let guard = self.lock();
        let entry = guard.0.get(key)?.iter().find(|e| &*e.field == field)?;
        let fresh = entry.read_sent.elapsed() < self.ttl;
        if fresh {
            self.metrics.near_cache_hits.inc();
        }
        fresh.then(|| entry.blob.clone())
    }

    /// Taken just before a read is sent.
    pub fn ticket(&self) -> ReadTicket {
        ReadTicket {
            generation: self.generation.load(Ordering::Acquire),
            sent: Instant::now(),
        }
    }

    /// Stores a record a verify judged alive, unless an invalidation or a
    /// flush happened since `ticket` (the read may predate a write whose
    /// invalidation was already applied), or serving is not allowed now.
    pub fn put(&self, key: &str, field: &str, blob: &[u8], ticket: ReadTicket) {
        if !self.healthy() {
            return;
        }
        let mut guard = self.lock();
        if self.generation.load(Ordering::Acquire) != ticket.generation {
            return;
        }
        let (map, count) = &mut *guard;
        let list = map.entry(Box::from(key)).or_default();
        let entry = Entry {
            field: Box::from(field),
            blob: std::sync::Arc::from(blob),
            read_sent: ticket.sent,
        };
        if let Some(old) = list.iter_mut().find(|e| &*e.field == field) {
            *old = entry;
        } else if *count < MAX_ENTRIES {
            list.push(entry);
            *count += 1;
            self.metrics.near_cache_entries.set(*count as i64);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().1
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

    fn healthy_cache(ttl: Duration) -> NearCache {
        let c = NearCache::new(ttl, Default::default());
        c.heartbeat(Instant::now());
        c
    }

    #[test]
    fn serves_only_while_younger_than_the_ttl_and_healthy() {
        let c = healthy_cache(Duration::from_secs(60));
        let t = c.ticket();
        c.put("k", "f", b"rec", t);
        assert_eq!(c.get("k", "f").as_deref(), Some(&b"rec"[..]));
        assert_eq!(c.get("k", "g"), None);
        // A read sent more than a TTL ago is not served.
        let old = ReadTicket {
            generation: t.generation,
            sent: Instant::now() - Duration::from_secs(61),
        };
        c.put("k", "f", b"rec", old);
        assert_eq!(c.get("k", "f"), None);
        // Not healthy (no answered ping within the TTL): nothing served or stored.
        let c = NearCache::new(Duration::from_secs(60), Default::default());
        c.put("k", "f", b"rec", c.ticket());
        assert_eq!(c.len(), 0);
        c.heartbeat(Instant::now() - Duration::from_secs(61));
        c.put("k", "f", b"rec", c.ticket());
        assert_eq!(c.len(), 0);
        c.heartbeat(Instant::now());
        c.put("k", "f", b"rec", c.ticket());
        assert!(c.get("k", "f").is_some());
        c.down();
        assert_eq!(c.get("k", "f"), None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn an_invalidation_during_the_read_keeps_its_result_out() {
        let c = healthy_cache(Duration::from_secs(60));
        let t = c.ticket();
        c.invalidate([&b"other"[..]]);
        c.put("k", "f", b"rec", t);
        assert_eq!(c.get("k", "f"), None);
        c.put("k", "f", b"rec", c.ticket());
        c.put("k", "g", b"rec2", c.ticket());
        c.put("j", "f", b"rec3", c.ticket());
        c.invalidate([&b"k"[..]]);
        assert_eq!(c.get("k", "f"), None);
        assert_eq!(c.get("k", "g"), None);
        assert!(c.get("j", "f").is_some());
        assert_eq!(c.len(), 1);
        // A new global state flushes; the same one does not.
        c.observe_state(7);
        assert_eq!(c.len(), 0);
        c.put("j", "f", b"rec3", c.ticket());
        c.observe_state(7);
        assert_eq!(c.len(), 1);
        c.flush();
        assert_eq!(c.get("j", "f"), None);
    }
}
