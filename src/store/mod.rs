//! The Redis store: every session write is one atomic Lua script on one
//! user's hash (see [`keys`] for the schema and `lua/` for the scripts, each
//! with a header naming its KEYS, ARGV and reply). The hot path, verify, is
//! no script: a plain `HGET` of the record judged in-process ([`record`]),
//! and `lua/touch.lua` only when a write is due. How the store reaches
//! Redis (per-thread connections, reconnects, the bulk-work pool, pub/sub,
//! timeouts) is [`conn`]'s.
//!
//! Replies are matched to requests, not trusted by order: every script call
//! carries a nonce (a per-process counter) as its last argument and every
//! script echoes it first; verify's `HGET` is pipelined with `ECHO <nonce>`
//! and the echo is checked last. A reply without the caller's nonce (stale,
//! duplicated or crossed on the pipelined connection) fails the call with
//! [`StoreError::Protocol`] (a 503), is counted in
//! `sessiongate_redis_reply_mismatch_total`, and drops the connection.

mod conn;
pub mod events;
pub mod keys;
pub mod near_cache;
mod reader;
pub mod record;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{FromRedisValue, Script, Value};

pub use conn::Topology;
use conn::{ConnectionLayer, Pooled};

use crate::domain::{DeviceId, SessionId, UserId, UserTag};
use crate::metrics::Metrics;
use crate::whereabouts::Seen;
pub use keys::KeySchema;
pub use record::RedisClock;
use record::{Checks, Verdict};

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/prelude.lua"),
            include_str!(concat!("lua/", $file))
        ))
    };
}

/// The nonce of the next script call (unique within the process, which is
/// enough: a connection carries one process's requests).
static NEXT_NONCE: AtomicU64 = AtomicU64::new(1);

/// `EVALSHA <sha> 1 <key>`; the caller adds the script's arguments, then
/// [`Store::run_script`] adds the nonce.
/// `EVALSHA <sha> 2 <key> <event stream>`: a script that writes events.
fn evalsha_ev(script: &Script, key: &str, stream: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(2).arg(key).arg(stream);
    cmd
}

fn evalsha(script: &Script, key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(1).arg(key);
    cmd
}

/// Why the store could not answer. Every kind means 503 to the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach Redis: {0}")]
    Connection(String),
    #[error("Redis refused the command: {0}")]
    Refused(String),
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
    /// `WAIT` counted fewer replicas than required: the change may have
    /// been applied on the primary, and may be lost in a failover.
    #[error("only {got} of {wanted} Redis replicas confirmed the change")]
    NotReplicated { wanted: u32, got: i64 },
}

impl StoreError {
    fn from_redis(e: &redis::RedisError) -> StoreError {
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            StoreError::Connection(e.to_string())
        } else if e.is_timeout() {
            StoreError::Timeout(Duration::ZERO)
        } else {
            StoreError::Refused(e.to_string())
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Connection(_) => "connection",
            StoreError::Refused(_) => "refused",
            StoreError::Protocol(_) => "protocol",
            StoreError::NotReplicated { .. } => "not_replicated",
        }
    }
}

/// The Redis settings sessiongate's promises depend on, and the value each
/// must have (as in the project's `redis.conf`): every acknowledged write is
/// on disk before the reply (a logout survives a crash), and a full Redis
/// refuses writes instead of evicting a session record or the cutoff.
pub const DURABILITY_SETTINGS: [(&str, &str); 3] = [
    ("appendonly", "yes"),
    ("appendfsync", "always"),
    ("maxmemory-policy", "noeviction"),
];

/// What Redis said about one of [`DURABILITY_SETTINGS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingState {
    Holds,
    /// The value Redis has instead.
    Differs(String),
    /// `CONFIG GET` refused (an ACL, or a managed Redis renaming CONFIG),
    /// or not asked (Redis Cluster): why.
    CannotCheck(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingCheck {
    pub setting: &'static str,
    pub expected: &'static str,
    pub state: SettingState,
}

impl SettingCheck {
    /// The `sessiongate_redis_config_ok` value: 1, 0, or -1 (cannot check).
    pub fn gauge(&self) -> i64 {
        match self.state {
            SettingState::Holds => 1,
            SettingState::Differs(_) => 0,
            SettingState::CannotCheck(_) => -1,
        }
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The random part of the session id (its field in the user hash).
    pub field: String,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub auth_time_ms: i64,
    pub expires_ms: i64,
    pub device_id: String,
    pub metadata: String,
    /// Where the session was last used from, as the last touch recorded it
    /// (`None`: not recorded yet).
    pub last_ip: Option<String>,
    pub last_user_agent: Option<String>,
}

/// What verify learnt about a live session.
#[derive(Debug, Clone)]
pub struct LiveSession {
    /// The password check is older than the age the caller allowed.
    pub reauth_needed: bool,
    /// The whole record, when asked for.
    pub record: Option<SessionRecord>,
}

/// The time policy every script applies.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub idle_ms: i64,
    /// Sessions created at or before this are revoked (`revoke-before`).
    pub cutoff_ms: i64,
    /// Sessions stamped with an older logout-all epoch are revoked; a create
    /// stamps this one.
    pub epoch: i64,
}

#[derive(Debug, Clone, Copy)]
pub struct NewSession<'a> {
    pub user: &'a UserId,
    pub session: &'a SessionId,
    pub device: &'a DeviceId,
    pub auth_time_ms: Option<i64>,
    pub metadata: &'a str,
    pub absolute_ms: i64,
    pub max_per_user: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    pub created_ms: i64,
    pub expires_ms: i64,
    pub auth_time_ms: i64,
    pub replaced: i64,
    pub evicted: i64,
}

/// Which sessions of a user to revoke.
#[derive(Debug, Clone, Copy)]
pub enum Revoke<'a> {
    /// The one session with this field.
    One(&'a str),
    /// Every session but the one with this field (`None`: every session).
    AllExcept(Option<&'a str>),
    /// Every session on this device.
    Device(&'a str),
    /// Every session the given liveness kills (the logout-all purge).
    Dead,
}

/// Operations on the global state hash.
#[derive(Debug, Clone, Copy)]
pub enum GlobalOp<'a> {
    /// Create what is missing, with this kid for a new ring.
    Init { kid: &'a str },
    /// Make `kid` active; the old active key retires after `retire_after_ms`.
    Rotate { kid: &'a str, retire_after_ms: i64 },
    /// Raise the global cutoff to `at_ms`, or to Redis's now.
    Cutoff { at_ms: Option<i64> },
}

/// The global state as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalRecord {
    pub cutoff_ms: i64,
    pub ring_json: String,
    pub now_ms: i64,
    /// The logout-all epoch (see `lua/global.lua`).
    pub epoch: i64,
}

/// The global state as read by [`Store::read_global`]; `None` where missing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredGlobal {
    pub cutoff_ms: Option<i64>,
    pub ring_json: Option<String>,
    pub epoch: Option<i64>,
    /// Redis's clock at the read (ms), for [`RedisClock`].
    pub now_ms: i64,
}

struct Scripts {
    touch: Script,
    create: Script,
    revoke: Script,
    reauth: Script,
    list: Script,
    global: Script,
    read: Script,
    epoch: Script,
    probe: Script,
}

pub struct Store {
    conn: ConnectionLayer,
    /// Replicas that must confirm every acknowledged change (`WAIT`); 0:
    /// no `WAIT`.
    min_replicas_ack: u32,
    /// `WAIT`'s own timeout, 2/5 of the Redis timeout: a shortfall is
    /// reported as such rather than as a timeout, even when the first try
    /// met `NOSCRIPT` (its `WAIT` still ran) and the pipeline ran twice.
    wait_ms: u64,
    /// Monotonic origin for `durability_checked_ms`.
    clock: std::time::Instant,
    /// When the durability settings were last read for an anonymous
    /// `/readyz` (ms on `clock`, 0: never), so callers without a key cannot
    /// make Redis run `CONFIG GET` more than once per interval.
    durability_checked_ms: AtomicU64,
    keys: KeySchema,
    scripts: Scripts,
    metrics: Arc<Metrics>,
    /// Lifecycle events (issue 10): how the scripts write them.
    events: events::EventConfig,
    /// The opt-in near-cache ([`near_cache`]); `None`: every verify reads Redis.
    near: Option<Arc<near_cache::NearCache>>,
    /// `<prefix>readyz-probe`, never set: in Sentinel mode a verify's read
    /// carries a `DEL` of it (see [`Store::read_record`]).
    probe_key: String,
}

impl Store {
    /// Sets up the pool; connects lazily, so a service can start while Redis
    /// is down (it answers 503 until Redis is back).
    /// `cluster_nodes` non-empty: Redis Cluster mode, with these seed nodes.
    pub fn new(
        url: &str,
        cluster_nodes: &[String],
        timeout: Duration,
        pool_size: usize,
        keys: KeySchema,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let topology = if cluster_nodes.is_empty() {
            Topology::Standalone {
                url: url.to_string(),
            }
        } else {
            Topology::Cluster {
                nodes: cluster_nodes.to_vec(),
            }
        };
        Store::open(&topology, timeout, pool_size, keys, metrics)
    }

    /// The store for the configured topology, with the settings' timeout,
    /// key prefix and replica acknowledgements; `pool_size` bulk-work
    /// connections. Connects lazily (see [`Store::new`]).
    pub fn from_settings(
        settings: &crate::config::Settings,
        pool_size: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let mut store = Store::open(
            &settings.redis_topology(),
            settings.redis_timeout,
            pool_size,
            KeySchema::new(&settings.key_prefix),
            metrics,
        )?;
        store.min_replicas_ack = settings.redis_min_replicas_ack;
        store.events = events::EventConfig::from_settings(settings);
        Ok(store)
    }

    /// Like [`Store::new`], for any [`Topology`].
    pub fn open(
        topology: &Topology,
        timeout: Duration,
        pool_size: usize,
        keys: KeySchema,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let keys = match topology {
            Topology::Cluster { .. } => keys.with_layout(keys::StreamLayout::PerSlot),
            _ => keys,
        };
        Ok(Store {
            conn: ConnectionLayer::new(topology, timeout, pool_size, metrics.clone())?,

            min_replicas_ack: 0,
            wait_ms: (timeout.as_millis() as u64 * 2 / 5).max(1),
            clock: std::time::Instant::now(),
            durability_checked_ms: AtomicU64::new(0),
            probe_key: format!("{}readyz-probe", keys.prefix()),
            keys,
            scripts: Scripts {
                touch: script!("touch.lua"),
                create: script!("create.lua"),
                revoke: script!("revoke.lua"),
                reauth: script!("reauth.lua"),
                list: script!("list.lua"),
                global: script!("global.lua"),
                read: Script::new(include_str!("lua/read.lua")),
                epoch: Script::new(include_str!("lua/epoch.lua")),
                probe: Script::new(include_str!("lua/probe.lua")),
            },
            metrics,
            events: events::EventConfig::default(),
            near: None,
        })
    }

    /// The same store, writing lifecycle events as `events` says.
    pub fn with_events(mut self, events: events::EventConfig) -> Store {
        self.events = events;
        self
    }

    /// Turns the near-cache on (`ttl` > 0; a single Redis only, not with
    /// Sentinel or Cluster) and returns its invalidation task, to be spawned.
    pub fn enable_near_cache(
        &mut self,
        ttl: Duration,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if ttl.is_zero() {
            return None;
        }
        let Some(info) = self.conn.single_connection_info() else {
            tracing::warn!(
                "near_cache_ttl is ignored with Redis Sentinel or Cluster: every verify reads Redis"
            );
            return None;
        };
        let cache = Arc::new(near_cache::NearCache::new(ttl, self.metrics.clone()));
        self.near = Some(cache.clone());
        Some(near_cache::run_invalidations(
            cache,
            info,
            self.keys.prefix().to_string(),
            self.conn.timeout(),
        ))
    }

    /// Drops this instance's near-cache entries of a user hash it just
    /// wrote (its own writes are seen at once, not when Redis's
    /// invalidation comes back).
    fn forget_locally(&self, key: &str) {
        if let Some(near) = &self.near {
            near.invalidate([key.as_bytes()]);
        }
    }

    /// Flushes the near-cache when the global state it was filled under
    /// changed (a logout-all, a key rotation).
    pub fn observe_state(&self, state_id: u64) {
        if let Some(near) = &self.near {
            near.observe_state(state_id);
        }
    }

    pub fn keys(&self) -> &KeySchema {
        &self.keys
    }

    /// Keeps the connections on the node that takes writes (Sentinel mode:
    /// follows the sentinels' primary; see `conn`). Other topologies:
    /// returns at once. Spawn it for the life of the store.
    pub async fn run_topology_watch(self: Arc<Self>) {
        self.conn.watch().await
    }

    pub fn pool_status(&self) -> deadpool_redis::Status {
        self.conn.pool_status()
    }

    /// Runs an `EVALSHA` command built in one go (no intermediate
    /// `ScriptInvocation` copies: the hot path) with a fresh nonce as its
    /// last argument, loading the script when Redis does not know it (first
    /// use, or after a restart). Returns the reply after its echoed nonce.
    async fn run_script(
        &self,
        script: &Script,
        cmd: redis::Cmd,
    ) -> Result<std::vec::IntoIter<Value>, StoreError> {
        self.run_script_waiting(script, cmd, 0, None).await
    }

    /// [`Store::run_script`], with `tail` (the event context) after the nonce.
    async fn run_script_tail(
        &self,
        script: &Script,
        cmd: redis::Cmd,
        tail: &str,
    ) -> Result<std::vec::IntoIter<Value>, StoreError> {
        self.run_script_waiting(script, cmd, 0, Some(tail)).await
    }

    /// [`Store::run_acknowledged`], with `tail` (the event context) after
    /// the nonce.
    async fn run_acknowledged_tail(
        &self,
        script: &Script,
        cmd: redis::Cmd,
        tail: &str,
    ) -> Result<std::vec::IntoIter<Value>, StoreError> {
        self.run_script_waiting(script, cmd, self.min_replicas_ack, Some(tail))
            .await
    }

    /// [`Store::run_script`] for a change the client is told is done: when
    /// `min_replicas_ack` > 0, pipelined with `WAIT n` on the same
    /// connection (so, in Cluster mode, to the node that took the write:
    /// redis-rs routes a pipeline by its first keyed command), in the same
    /// round trip; fewer confirmations fail it with
    /// [`StoreError::NotReplicated`].
    // Every acknowledged change writes events now (`run_acknowledged_tail`);
    // kept for a change without one.
    #[allow(dead_code)]
    async fn run_acknowledged(
        &self,
        script: &Script,
        cmd: redis::Cmd,
    ) -> Result<std::vec::IntoIter<Value>, StoreError> {
        self.run_script_waiting(script, cmd, self.min_replicas_ack, None)
            .await
    }

    async fn run_script_waiting(
        &self,
        script: &Script,
        mut cmd: redis::Cmd,
        replicas: u32,
        tail: Option<&str>,
    ) -> Result<std::vec::IntoIter<Value>, StoreError> {
        let nonce = NEXT_NONCE.fetch_add(1, Ordering::Relaxed);
        cmd.arg(nonce);
        if let Some(tail) = tail {
            cmd.arg(tail);
        }
        let cmd = &cmd;
        let (reply, acks): (Vec<Value>, i64) = if replicas == 0 {
            let reply = self
                .conn
                .call(
                    |mut conn| async move {
                        match evalsha_loading(&mut conn, script, cmd).await {
                            Err(e) if is_redirect(&e) => follow_ask(conn, script, cmd, &e).await,
                            other => other,
                        }
                    },
                    |reply: &Vec<Value>| is_nonce(reply.first(), nonce),
                )
                .await?;
            (reply, 0)
        } else {
            let wait_ms = self.wait_ms;
            self.conn
                .call(
                    |mut conn| async move {
                        evalsha_waiting(&mut conn, script, cmd, replicas, wait_ms).await
                    },
                    |(reply, _): &(Vec<Value>, i64)| is_nonce(reply.first(), nonce),
                )
                .await?
        };
        if acks < i64::from(replicas) {
            self.metrics.redis_error("not_replicated");
            return Err(StoreError::NotReplicated {
                wanted: replicas,
                got: acks,
            });
        }
        let mut it = reply.into_iter();
        it.next();
        Ok(it)
    }

    /// The hot path: one round trip, `HGET` of the record pipelined with
    /// `ECHO <nonce>`, the record judged in-process ([`record::judge`])
    /// by `clock`. The echo must be this call's nonce, else the connection
    /// is dropped and the call fails (a reply is never trusted for another
    /// request; the echo comes last, so a reply shifted by a duplicate or
    /// a stale one never passes for this call's read).
    ///
    /// Only when the judgement calls for a write does a second call follow
    /// (`lua/touch.lua`, which checks again by Redis's clock and writes
    /// only to a record it finds alive): the idle expiry is due to slide
    /// (at most once per touch interval per session; awaited, so a verify
    /// that answered has slid it, but bounded by what is left of the
    /// timeout and best effort: the session was confirmed by the read), or
    /// the record is dead (deleted, so expired records do not linger until
    /// their hash expires). `touch_ms` < 0 never writes; `max_auth_age_ms`
    /// < 0 skips the password-age check (a session failing it is reported,
    /// and not slid). `seen` says where the request came from; it is called
    /// only when the touch is due, and what it returns is recorded with it.
    #[allow(clippy::too_many_arguments)]
    pub async fn verify(
        &self,
        session: &SessionId,
        device: &DeviceId,
        live: Liveness,
        touch_ms: i64,
        max_auth_age_ms: i64,
        full: bool,
        clock: &RedisClock,
        seen_from: Option<&(dyn Fn() -> Seen + Sync)>,
    ) -> Result<Option<LiveSession>, StoreError> {
        let started = std::time::Instant::now();
        let cached = self
            .near
            .as_ref()
            .and_then(|n| n.get(session.as_str(), started));
        // A miss's ticket, taken before the read is sent (`started` is
        // earlier still); `None` on a hit or with the cache off.
        let ticket = match (&self.near, &cached) {
            (Some(near), None) => Some(near.ticket(started)),
            _ => None,
        };
        // The user hash's name: built only when Redis is asked (a hit that
        // needs no touch never does).
        let user_key = std::sync::OnceLock::new();
        let key = || -> &str { user_key.get_or_init(|| self.keys.user_of(session)) };
        let read;
        let mut read_time = None;
        let blob: &[u8] = match &cached {
            Some(blob) => blob,
            None => {
                read = match self.read_record(key(), session).await? {
                    Some(found) => found,
                    None => return Ok(None),
                };
                read_time = read.1;
                &read.0
            }
        };
        let rec = record::decode(blob).map_err(StoreError::Protocol)?;
        let checks = Checks {
            // The record's own node's clock when the read brought it
            // (Cluster), else Redis's clock as the refresher last read it.
            now_ms: read_time.unwrap_or_else(|| clock.upper_ms()),
            idle_ms: live.idle_ms,
            cutoff_ms: live.cutoff_ms,
            epoch: live.epoch,
            device_id: device.as_str(),
            max_auth_age_ms,
            touch_ms,
        };
        let (reauth_needed, mut last_seen_ms) = match record::judge(&rec, &checks) {
            Verdict::OtherDevice => return Ok(None),
            Verdict::Dead => {
                let none = Seen::default();
                // Boxed, as below: the rare write keeps its state out of
                // every verify's future (allocated and moved per request).
                let _ =
                    Box::pin(self.touch(key(), session, device, live, -1, &none, started)).await;
                return Ok(None);
            }
            Verdict::Alive {
                reauth_needed,
                touch_due,
            } => {
                let mut seen = rec.last_seen_ms;
                if let (Some(near), Some(ticket), false) = (&self.near, ticket, touch_due) {
                    near.put(key(), session.as_str(), blob, ticket);
                }
                if touch_due {
                    let from = seen_from.map(|f| f()).unwrap_or_default();
                    match Box::pin(self.touch(
                        key(),
                        session,
                        device,
                        live,
                        touch_ms,
                        &from,
                        started,
                    ))
                    .await
                    {
                        // Deleted meanwhile (a logout won the race): refused.
                        Ok(None) => return Ok(None),
                        Ok(Some(slid)) => seen = slid,
                        Err(_) => {}
                    }
                }
                (reauth_needed, seen)
            }
        };
        let record = if full {
            let text = |b: &[u8]| {
                String::from_utf8(b.to_vec())
                    .map_err(|_| StoreError::Protocol("a stored string is not UTF-8".into()))
            };
            last_seen_ms = last_seen_ms.max(rec.last_seen_ms);
            let (last_ip, last_user_agent) =
                record::whereabouts(blob).map_err(StoreError::Protocol)?;
            Some(SessionRecord {
                field: session.field().to_string(),
                created_ms: rec.created_ms,
                auth_time_ms: rec.auth_time_ms,
                last_seen_ms,
                expires_ms: rec.expires_ms,
                device_id: text(rec.device_id)?,
                metadata: text(rec.metadata)?,
                last_ip: last_ip.map(text).transpose()?,
                last_user_agent: last_user_agent.map(text).transpose()?,
            })
        } else {
            None
        };
        Ok(Some(LiveSession {
            reauth_needed,
            record,
        }))
    }

    /// One round trip: `HGET` of the record, then `ECHO` of a fresh nonce;
    /// returns the record and, in Cluster mode, the record's node's clock.
    ///
    /// - Sentinel mode: first a `DEL` of a key that is never set, a write
    ///   command that changes nothing. A replica, or a demoted primary that
    ///   has not learnt it yet, answers it `READONLY` (the connection is
    ///   dropped and the verify fails closed) rather than serving a record a
    ///   logout on the new primary already deleted; a primary that lost its
    ///   replicas refuses it too when `min-replicas-to-write` is set (the
    ///   guard against a partitioned old primary). A `HGET` alone would be
    ///   answered by any of them.
    /// - Cluster mode: a `TIME` (unkeyed, so it rides to the `HGET`'s node),
    ///   so the record is judged by the clock of the node that wrote its
    ///   deadlines, not by the global key's node.
    async fn read_record(
        &self,
        key: &str,
        session: &SessionId,
    ) -> Result<Option<(Vec<u8>, Option<i64>)>, StoreError> {
        let nonce = NEXT_NONCE.fetch_add(1, Ordering::Relaxed);
        let with_time = self.conn.is_cluster();
        let sentinel = self.conn.is_sentinel();
        let replies = if with_time { 3 } else { 2 };
        let mut reply: Vec<Value> = self
            .conn
            .call(
                |mut conn| async move {
                    if let Some(reader) = conn.reader() {
                        // Not Cluster: the same commands on the verify
                        // read's own connection. The probe's reply is
                        // checked there (an error fails the whole call),
                        // then left out, as redis-rs's `ignore` does.
                        let field = session.field().as_bytes();
                        let probe = self.probe_key.as_bytes();
                        let mut reply = reader
                            .query(2 + usize::from(sentinel), |out| {
                                if sentinel {
                                    reader::push_command(out, &[b"DEL", probe]);
                                }
                                reader::push_command(out, &[b"HGET", key.as_bytes(), field]);
                                let mut digits = [0; 20];
                                let nonce = reader::decimal(nonce, &mut digits);
                                reader::push_command(out, &[b"ECHO", nonce]);
                            })
                            .await?;
                        if sentinel {
                            reply.remove(0);
                        }
                        return Ok(reply);
                    }
                    // Cluster (the only mode without the read's own
                    // connection): routed by redis-rs, with the node's TIME.
                    let mut pipe = redis::pipe();
                    pipe.cmd("HGET").arg(key).arg(session.field());
                    if with_time {
                        pipe.cmd("TIME");
                    }
                    pipe.cmd("ECHO").arg(nonce);
                    match pipe.query_async::<Vec<Value>>(&mut conn).await {
                        Err(e) if is_redirect(&e) => ask_pipeline(conn, &pipe, replies, &e).await,
                        other => other,
                    }
                },
                |reply: &Vec<Value>| {
                    reply.len() == replies && is_nonce(reply.get(replies - 1), nonce)
                },
            )
            .await?;
        let now_ms = if with_time {
            Some(time_ms(reply.swap_remove(1))?)
        } else {
            None
        };
        match reply.swap_remove(0) {
            Value::Nil => Ok(None),
            Value::BulkString(blob) => Ok(Some((blob, now_ms))),
            other => Err(StoreError::Protocol(format!(
                "a session record that is not a string: {other:?}"
            ))),
        }
    }

    /// `lua/touch.lua` for a verify that began at `started`, bounded by
    /// what is left of its timeout: `Some(last_seen_ms)` when the record
    /// is alive, `None` when it is gone (or was dead, and is now deleted).
    /// A touch that slides the record records `seen` in it.
    #[allow(clippy::too_many_arguments)]
    async fn touch(
        &self,
        key: &str,
        session: &SessionId,
        device: &DeviceId,
        live: Liveness,
        touch_ms: i64,
        seen: &Seen,
        started: std::time::Instant,
    ) -> Result<Option<i64>, StoreError> {
        let left = self.conn.timeout().saturating_sub(started.elapsed());
        let tag = session.tag_str();
        let mut cmd = evalsha_ev(&self.scripts.touch, key, &self.keys.user_stream(tag));
        cmd.arg(session.field())
            .arg(device.as_str())
            .arg(live.idle_ms)
            .arg(touch_ms)
            .arg(live.cutoff_ms)
            .arg(live.epoch)
            .arg(&seen.ip)
            .arg(&seen.user_agent);
        // A dead record deleted here gets its session.revoked event.
        let ctx = self.event_context(tag, "system", "");
        let call = self.run_script_tail(&self.scripts.touch, cmd, &ctx);
        let mut it = tokio::time::timeout(left, call)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.conn.timeout())))?;
        match int(it.next())? {
            0 => Ok(None),
            1 => Ok(Some(int(it.next())?)),
            other => Err(StoreError::Protocol(format!(
                "touch status {other} is not 0 or 1"
            ))),
        }
    }

    pub async fn create(&self, new: NewSession<'_>, live: Liveness) -> Result<Created, StoreError> {
        self.create_as(new, live, "issuer").await
    }

    /// [`Store::create`], its events naming `actor`.
    pub async fn create_as(
        &self,
        new: NewSession<'_>,
        live: Liveness,
        actor: &str,
    ) -> Result<Created, StoreError> {
        let tag = new.session.tag_str();
        let key = self.keys.user(&new.session.user_tag());
        let mut cmd = evalsha_ev(&self.scripts.create, &key, &self.keys.user_stream(tag));
        cmd.arg(new.session.field())
            .arg(new.user.as_str())
            .arg(new.device.as_str())
            .arg(new.auth_time_ms.map(|t| t.to_string()).unwrap_or_default())
            .arg(new.metadata)
            .arg(live.idle_ms)
            .arg(new.absolute_ms)
            .arg(new.max_per_user)
            .arg(live.cutoff_ms)
            .arg(live.epoch);
        let ctx = self.event_context(tag, actor, "");
        let result = self
            .run_acknowledged_tail(&self.scripts.create, cmd, &ctx)
            .await;
        // It may have replaced or evicted records this instance has cached.
        self.forget_locally(&key);
        let mut it = result?;
        Ok(Created {
            created_ms: int(it.next())?,
            expires_ms: int(it.next())?,
            auth_time_ms: int(it.next())?,
            replaced: int(it.next())?,
            evicted: int(it.next())?,
        })
    }

    /// Revokes sessions of one user; returns how many live ones were removed.
    pub async fn revoke(
        &self,
        user: &UserTag,
        which: Revoke<'_>,
        live: Liveness,
    ) -> Result<u64, StoreError> {
        self.revoke_as(user, which, live, "admin", "admin_revoke")
            .await
    }

    /// [`Store::revoke`], its events naming `actor` and `reason` (one of
    /// the event reasons, see [`events`]).
    pub async fn revoke_as(
        &self,
        user: &UserTag,
        which: Revoke<'_>,
        live: Liveness,
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let key = self.keys.user(user);
        let cmd = self.revoke_cmd(&key, which, live);
        let ctx = self.event_context(user.as_str(), actor, reason);
        let result = self
            .run_acknowledged_tail(&self.scripts.revoke, cmd, &ctx)
            .await;
        // Refused here at once, whether or not the reply came back; other
        // instances hear of it by invalidation (or within the bound).
        self.forget_locally(&key);
        let mut it = result?;
        Ok(int(it.next())?.max(0) as u64)
    }

    fn revoke_cmd(&self, key: &str, which: Revoke<'_>, live: Liveness) -> redis::Cmd {
        let tag = self.keys.tag_of_user_key(key).unwrap_or("");
        let mut cmd = evalsha_ev(&self.scripts.revoke, key, &self.keys.user_stream(tag));
        match which {
            Revoke::One(field) => cmd.arg("one").arg(field),
            Revoke::AllExcept(keep) => cmd.arg("except").arg(keep.unwrap_or("")),
            Revoke::Device(device) => cmd.arg("device").arg(device),
            Revoke::Dead => cmd.arg("dead").arg(""),
        };
        cmd.arg(live.idle_ms).arg(live.cutoff_ms).arg(live.epoch);
        cmd
    }

    /// Records a fresh password check; `None` when the session is not alive.
    pub async fn reauth(
        &self,
        session: &SessionId,
        live: Liveness,
    ) -> Result<Option<i64>, StoreError> {
        self.reauth_as(session, live, "issuer").await
    }

    /// [`Store::reauth`], its event naming `actor`.
    pub async fn reauth_as(
        &self,
        session: &SessionId,
        live: Liveness,
        actor: &str,
    ) -> Result<Option<i64>, StoreError> {
        let tag = session.tag_str();
        let key = self.keys.user(&session.user_tag());
        let mut cmd = evalsha_ev(&self.scripts.reauth, &key, &self.keys.user_stream(tag));
        cmd.arg(session.field())
            .arg(live.idle_ms)
            .arg(live.cutoff_ms)
            .arg(live.epoch);
        let ctx = self.event_context(tag, actor, "");
        let result = self
            .run_acknowledged_tail(&self.scripts.reauth, cmd, &ctx)
            .await;
        self.forget_locally(&key);
        let mut it = result?;
        Ok(match int(it.next())? {
            1 => Some(int(it.next())?),
            _ => None,
        })
    }

    /// The live sessions of one user.
    pub async fn list(
        &self,
        user: &UserTag,
        live: Liveness,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let mut cmd = evalsha(&self.scripts.list, &self.keys.user(user));
        cmd.arg(live.idle_ms).arg(live.cutoff_ms).arg(live.epoch);
        let mut it = self.run_script(&self.scripts.list, cmd).await?;
        if !it.len().is_multiple_of(9) {
            return Err(StoreError::Protocol("list reply of odd length".into()));
        }
        let mut out = Vec::with_capacity(it.len() / 9);
        while let Some(field) = it.next() {
            out.push(SessionRecord {
                field: text(Some(field))?,
                created_ms: int(it.next())?,
                last_seen_ms: int(it.next())?,
                auth_time_ms: int(it.next())?,
                expires_ms: int(it.next())?,
                device_id: text(it.next())?,
                metadata: text(it.next())?,
                last_ip: Some(text(it.next())?).filter(|s| !s.is_empty()),
                last_user_agent: Some(text(it.next())?).filter(|s| !s.is_empty()),
            });
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.last_seen_ms));
        Ok(out)
    }

    /// Applies an operation to the global state and returns it.
    pub async fn global(&self, op: GlobalOp<'_>) -> Result<GlobalRecord, StoreError> {
        self.global_as(op, "admin").await
    }

    /// [`Store::global`], its event naming `actor`.
    pub async fn global_as(
        &self,
        op: GlobalOp<'_>,
        actor: &str,
    ) -> Result<GlobalRecord, StoreError> {
        let mut cmd = evalsha_ev(
            &self.scripts.global,
            self.keys.global(),
            &self.keys.global_stream(),
        );
        match op {
            GlobalOp::Init { kid } => cmd.arg("init").arg(kid).arg(0),
            GlobalOp::Rotate {
                kid,
                retire_after_ms,
            } => cmd.arg("rotate").arg(kid).arg(retire_after_ms),
            GlobalOp::Cutoff { at_ms } => cmd
                .arg("cutoff")
                .arg(at_ms.map(|t| t.to_string()).unwrap_or_default())
                .arg(0),
        };
        cmd.arg(self.keys.events());
        // A lost `init` fails closed (a new ring: tokens of the lost kid are
        // refused), so only rotations and cutoffs wait for replicas.
        let ctx = self.event_context("", actor, "");
        let mut it = match op {
            GlobalOp::Init { .. } => {
                self.run_script_tail(&self.scripts.global, cmd, &ctx)
                    .await?
            }
            _ => {
                self.run_acknowledged_tail(&self.scripts.global, cmd, &ctx)
                    .await?
            }
        };
        Ok(GlobalRecord {
            cutoff_ms: int(it.next())?,
            ring_json: text(it.next())?,
            now_ms: int(it.next())?,
            epoch: int(it.next())?,
        })
    }

    /// Reads the global state without changing it, and Redis's clock.
    pub async fn read_global(&self) -> Result<StoredGlobal, StoreError> {
        let cmd = evalsha(&self.scripts.read, self.keys.global());
        let mut it = self.run_script(&self.scripts.read, cmd).await?;
        let cutoff_ms = optional_int(it.next(), "global cutoff")?;
        let ring_json = match it.next() {
            Some(Value::Nil) | None => None,
            v => Some(text(v)?),
        };
        let epoch = optional_int(it.next(), "global epoch")?;
        let now_ms = int(it.next())?;
        Ok(StoredGlobal {
            cutoff_ms,
            ring_json,
            epoch,
            now_ms,
        })
    }

    /// The current logout-all epoch (`None`: the global state is missing).
    pub async fn read_epoch(&self) -> Result<Option<i64>, StoreError> {
        let cmd = evalsha(&self.scripts.epoch, self.keys.global());
        let mut it = self.run_script(&self.scripts.epoch, cmd).await?;
        optional_int(it.next(), "global epoch")
    }

    /// The readiness probe: a script issuing a write command that changes
    /// nothing (see `lua/probe.lua`), so Redis says whether it would take
    /// the service's scripts and writes.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let cmd = evalsha(&self.scripts.probe, &self.probe_key);
        self.run_script(&self.scripts.probe, cmd).await.map(|_| ())
    }

    /// Deletes every session `target` kills (created at or before its
    /// cutoff, or stamped with an epoch below its epoch), in bounded batches
    /// (`SCAN ... COUNT 200`, one script per user hash, a pause between
    /// batches), so a logout-all never blocks Redis. Verify already refuses
    /// those sessions; this only frees memory. Returns how many of them were
    /// alive by time alone (the sessions the logout-all revoked).
    ///
    /// All of it runs off the request path's per-thread connections: over
    /// the deadpool-redis pool on a single Redis, over a connection of its
    /// own in Redis Cluster mode. Its commands are not pipelined ahead of
    /// verifies, and its failures and timeouts are not counted against (nor
    /// can they replace) a request-path connection. A connection that fails,
    /// times out or answers out of step ends the purge (records expire by
    /// TTL); a pooled one is taken out of the pool.
    ///
    /// In Redis Cluster mode `SCAN` sees one node only, so the purge asks
    /// for the primaries (`CLUSTER NODES`) and scans each in turn; each
    /// user hash is then revoked on the node that owns its slot (a hash
    /// moved by a reshard meanwhile follows its `MOVED`).
    pub async fn purge(&self, target: Liveness) -> Result<u64, StoreError> {
        let result = if self.conn.is_cluster() {
            self.purge_on_cluster(target).await
        } else {
            self.purge_on_pool(target).await
        };
        if let Err(e) = &result {
            self.metrics.redis_error(e.kind());
        }
        result
    }

    async fn purge_on_pool(&self, target: Liveness) -> Result<u64, StoreError> {
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let mut conn = self.conn.pooled().await?;
            let batch = async {
                let (next, keys) = self.scan(&mut conn, cursor, None).await?;
                Ok::<_, StoreError>((next, self.purge_keys(&mut conn, &keys, target).await?))
            }
            .await;
            let (next, n) = match batch {
                Ok(done) => done,
                Err(e) => {
                    conn.discard();
                    return Err(e);
                }
            };
            drop(conn);
            removed += n;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The Cluster's primaries now (`CLUSTER NODES` of a random node).
    async fn primaries(
        &self,
        conn: &mut ClusterConnection,
    ) -> Result<Vec<(String, u16)>, StoreError> {
        let nodes = self
            .conn
            .bounded(async {
                conn.route_command(
                    redis::cmd("CLUSTER").arg("NODES").clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                )
                .await
                .map_err(|e| StoreError::from_redis(&e))
            })
            .await?;
        Ok(cluster_primaries(&text(Some(nodes))?))
    }

    /// The lowest clock (`TIME`, ms) of the primaries: of the one Redis, or
    /// of every Cluster primary.
    pub(crate) async fn lowest_primary_time_ms(&self) -> Result<u64, StoreError> {
        let time_ms = |v: Value| -> Result<u64, StoreError> {
            let parts: (String, String) = redis::from_redis_value(v)
                .map_err(|e| StoreError::Protocol(format!("TIME: {e}")))?;
            let s: u64 = parts.0.parse().unwrap_or(0);
            let us: u64 = parts.1.parse().unwrap_or(0);
            Ok(s * 1000 + us / 1000)
        };
        if !self.conn.is_cluster() {
            return time_ms(self.command(redis::cmd("TIME")).await?);
        }
        let mut conn = self.conn.cluster_bulk().await?;
        let primaries = self.primaries(&mut conn).await?;
        if primaries.is_empty() {
            return Err(StoreError::Protocol("no Cluster primary is up".into()));
        }
        let mut low = u64::MAX;
        for (host, port) in primaries {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let reply = self
                .conn
                .bounded(async {
                    conn.route_command(redis::cmd("TIME"), route)
                        .await
                        .map_err(|e| StoreError::from_redis(&e))
                })
                .await?;
            low = low.min(time_ms(reply)?);
        }
        Ok(low)
    }

    async fn purge_on_cluster(&self, target: Liveness) -> Result<u64, StoreError> {
        let mut conn = self.conn.cluster_bulk().await?;
        let primaries = self.primaries(&mut conn).await?;
        let mut removed = 0;
        for (host, port) in primaries {
            let mut cursor: u64 = 0;
            loop {
                let node = (host.as_str(), port);
                let (next, keys) = self.scan(&mut conn, cursor, Some(node)).await?;
                removed += self.purge_keys(&mut conn, &keys, target).await?;
                if next == 0 {
                    break;
                }
                cursor = next;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(removed)
    }

    /// One `SCAN` step over the user hashes, on `node` (Cluster) or on the
    /// connection's only node.
    async fn scan<C: ScanRoute>(
        &self,
        conn: &mut C,
        cursor: u64,
        node: Option<(&str, u16)>,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(self.keys.user_pattern())
            .arg("COUNT")
            .arg(200);
        let reply = self
            .conn
            .bounded(async {
                conn.scan_on(cmd, node)
                    .await
                    .map_err(|e| StoreError::from_redis(&e))
            })
            .await?;
        <(u64, Vec<String>)>::from_redis_value(reply)
            .map_err(|e| StoreError::Protocol(format!("SCAN reply: {e}")))
    }

    /// Runs the purge's revoke on each user hash in `keys`.
    async fn purge_keys<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        keys: &[String],
        target: Liveness,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        for key in keys {
            let mut cmd = self.revoke_cmd(key, Revoke::Dead, target);
            let nonce = NEXT_NONCE.fetch_add(1, Ordering::Relaxed);
            cmd.arg(nonce);
            let tag = self.keys.tag_of_user_key(key).unwrap_or("");
            cmd.arg(self.event_context(tag, "system", "logout_all"));
            let reply = self
                .conn
                .bounded(async {
                    evalsha_loading(conn, &self.scripts.revoke, &cmd)
                        .await
                        .map_err(|e| StoreError::from_redis(&e))
                })
                .await?;
            if !is_nonce(reply.first(), nonce) {
                self.metrics.reply_mismatch.inc();
                return Err(StoreError::Protocol(
                    "a reply for another request (nonce mismatch)".into(),
                ));
            }
            removed += int(reply.into_iter().nth(1))?.max(0) as u64;
        }
        Ok(removed)
    }

    /// Reads [`DURABILITY_SETTINGS`] from Redis (`CONFIG GET`, one pipelined
    /// round trip over the pool, off the request path), sets the
    /// `sessiongate_redis_config_ok` gauges and logs a warning for each
    /// setting that does not hold or cannot be checked: always when
    /// `log_all`, else only when its state changed since the last check.
    /// Fails only when Redis cannot be reached; a refused `CONFIG` is a
    /// result ("cannot check"), not an error.
    /// [`Store::check_durability`] at most once per `every` (the first call
    /// always runs; concurrent callers do not pile up): for probes anyone
    /// may send, which keep the gauges fresh without letting them multiply
    /// Redis's work.
    pub async fn check_durability_if_due(&self, every: Duration) {
        let now = self.clock.elapsed().as_millis() as u64 + 1;
        let last = self.durability_checked_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every.as_millis() as u64 {
            return;
        }
        if self
            .durability_checked_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let _ = self.check_durability(false).await;
        }
    }

    pub async fn check_durability(&self, log_all: bool) -> Result<Vec<SettingCheck>, StoreError> {
        self.durability_checked_ms.store(
            self.clock.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
        let checks = if self.conn.is_cluster() {
            DURABILITY_SETTINGS
                .iter()
                .map(|&(setting, expected)| SettingCheck {
                    setting,
                    expected,
                    state: SettingState::CannotCheck(
                        "not checked in Redis Cluster mode: check each node".into(),
                    ),
                })
                .collect()
        } else {
            self.read_durability().await?
        };
        for check in &checks {
            let gauge = self.metrics.config_ok.with_label_values(&[check.setting]);
            let changed = gauge.get() != check.gauge();
            gauge.set(check.gauge());
            if !(log_all || changed) {
                continue;
            }
            match &check.state {
                SettingState::Holds if log_all => {}
                SettingState::Holds => {
                    tracing::info!(setting = check.setting, "Redis setting now as expected")
                }
                SettingState::Differs(found) => tracing::warn!(
                    setting = check.setting,
                    expected = check.expected,
                    found = %found,
                    "Redis setting breaks sessiongate's durability promises"
                ),
                SettingState::CannotCheck(why) => tracing::warn!(
                    setting = check.setting,
                    expected = check.expected,
                    "cannot check a Redis setting: {why}"
                ),
            }
        }
        Ok(checks)
    }

    async fn read_durability(&self) -> Result<Vec<SettingCheck>, StoreError> {
        let mut pipe = redis::pipe();
        for (setting, _) in DURABILITY_SETTINGS {
            pipe.cmd("CONFIG").arg("GET").arg(setting);
        }
        let replies = self
            .conn
            .bounded(async {
                let mut conn = self.conn.pooled().await?;
                pipe.query_async::<Vec<Value>>(&mut conn)
                    .await
                    .map_err(|e| StoreError::from_redis(&e))
            })
            .await;
        let replies = match replies {
            Ok(replies) => replies.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(StoreError::Refused(why)) => {
                vec![Err(why); DURABILITY_SETTINGS.len()]
            }
            Err(e) => return Err(e),
        };
        Ok(DURABILITY_SETTINGS
            .iter()
            .zip(replies)
            .map(|(&(setting, expected), reply)| {
                let state = match reply {
                    Err(why) => SettingState::CannotCheck(format!("CONFIG refused ({why})")),
                    Ok(v) => match config_value(v, setting) {
                        Some(found) if found.eq_ignore_ascii_case(expected) => SettingState::Holds,
                        Some(found) => SettingState::Differs(found),
                        None => SettingState::CannotCheck(
                            "CONFIG GET did not return the setting".into(),
                        ),
                    },
                };
                SettingCheck {
                    setting,
                    expected,
                    state,
                }
            })
            .collect())
    }

    /// A pub/sub connection subscribed to the events channel.
    pub async fn subscribe_events(&self) -> Result<redis::aio::PubSub, StoreError> {
        self.conn.subscribe(self.keys.events()).await
    }
}

/// Runs an `EVALSHA` command, loading the script when Redis does not know
/// it (first use, or after a restart), then running it again.
async fn evalsha_loading<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    script: &Script,
    cmd: &redis::Cmd,
) -> redis::RedisResult<Vec<Value>> {
    match cmd.query_async::<Vec<Value>>(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// A script call the cluster client gave up on with `ASK` (its slot is
/// migrating and the key has moved): sent once more to the node `ASK` names,
/// as one pipeline `ASKING` + `EVALSHA`. The client's own redirect sends
/// `ASKING` and the command as two writes on a multiplexed connection, so
/// under load another request's command can come between them and use up
/// the `ASKING` (the target then answers `MOVED` back to the source, round
/// and round until the client's retries run out: seen in
/// `cluster::a_slot_resharded_under_load_gives_no_wrong_answer_and_no_5xx`).
async fn follow_ask(
    conn: conn::Connection,
    script: &Script,
    cmd: &redis::Cmd,
    ask: &redis::RedisError,
) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    pipe.add_command(cmd.clone());
    for attempt in 0..2 {
        match ask_pipeline(conn.clone(), &pipe, 1, ask).await {
            Err(e)
                if attempt == 0
                    && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                let conn::Connection::Cluster(mut cluster) = conn.clone() else {
                    return Err(e);
                };
                script.load_async(&mut cluster).await?;
            }
            Err(e) => return Err(e),
            Ok(mut replies) => {
                return Ok(Vec::<Value>::from_redis_value(
                    replies.pop().unwrap_or(Value::Nil),
                )?);
            }
        }
    }
    Err(ask.clone())
}

/// An `ASK` or `MOVED` the cluster client gave up on.
fn is_redirect(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::Ask | redis::ServerErrorKind::Moved)
    )
}

/// Sends `ASKING` and `pipe`'s commands as ONE pipeline to the node an
/// `ASK` redirection names (Cluster mode), and returns the `replies`
/// replies after `ASKING`'s; a command's error fails the call. See
/// [`follow_ask`] for why redis-rs's own redirection is not enough.
///
/// A `MOVED` that reached us (redis-rs spent its retries: during a
/// reshard's last step a request can bounce between a source that has
/// handed the slot over and nodes that do not know yet) gets the same one
/// more try, without `ASKING`, at the node it names, which has just said it
/// owns the slot.
async fn ask_pipeline(
    conn: conn::Connection,
    pipe: &redis::Pipeline,
    replies: usize,
    ask: &redis::RedisError,
) -> redis::RedisResult<Vec<Value>> {
    // `redirect_node` is ("host:port", slot).
    let target = ask
        .redirect_node()
        .and_then(|(addr, _slot)| addr.rsplit_once(':'))
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)));
    let (conn::Connection::Cluster(mut cluster), Some((host, port))) = (conn, target) else {
        return Err(ask.clone());
    };
    let route = SingleNodeRoutingInfo::ByAddress {
        host: host.to_string(),
        port,
    };
    let ask = ask.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Ask);
    let mut redirected = redis::pipe();
    if ask {
        redirected.cmd("ASKING");
    }
    for cmd in pipe.cmd_iter() {
        redirected.add_command(cmd.clone());
    }
    cluster
        .route_pipeline(redirected, usize::from(ask), replies, route)
        .await?
        .into_iter()
        .map(Value::extract_error)
        .collect()
}

/// Sends a `SCAN` to one node: the connection's own, or (Cluster) the
/// primary at the given address.
trait ScanRoute {
    fn scan_on(
        &mut self,
        cmd: redis::Cmd,
        node: Option<(&str, u16)>,
    ) -> impl std::future::Future<Output = redis::RedisResult<Value>> + Send;
}

impl ScanRoute for Pooled {
    async fn scan_on(
        &mut self,
        cmd: redis::Cmd,
        _: Option<(&str, u16)>,
    ) -> redis::RedisResult<Value> {
        cmd.query_async(self).await
    }
}

impl ScanRoute for ClusterConnection {
    async fn scan_on(
        &mut self,
        cmd: redis::Cmd,
        node: Option<(&str, u16)>,
    ) -> redis::RedisResult<Value> {
        let routing = match node {
            Some((host, port)) => SingleNodeRoutingInfo::ByAddress {
                host: host.to_string(),
                port,
            },
            None => SingleNodeRoutingInfo::RandomPrimary,
        };
        self.route_command(cmd, RoutingInfo::SingleNode(routing))
            .await
    }
}

/// The `(host, port)` of every primary in a `CLUSTER NODES` reply that is
/// not failing (a failed one's slots are being taken over by a replica,
/// which then shows as a primary).
fn cluster_primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master")
                || flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"))
            {
                return None;
            }
            let addr = addr.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
}

/// [`evalsha_loading`] pipelined with `WAIT replicas wait_ms`, in one round
/// trip: the script's reply and the replicas that confirmed it.
async fn evalsha_waiting<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    script: &Script,
    cmd: &redis::Cmd,
    replicas: u32,
    wait_ms: u64,
) -> redis::RedisResult<(Vec<Value>, i64)> {
    let mut pipe = redis::pipe();
    pipe.add_command(cmd.clone())
        .cmd("WAIT")
        .arg(replicas)
        .arg(wait_ms);
    match pipe.query_async::<(Vec<Value>, i64)>(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            pipe.query_async(conn).await
        }
        other => other,
    }
}

/// The value in a `CONFIG GET <setting>` reply (a flat array, or a map with
/// RESP3).
fn config_value(v: Value, setting: &str) -> Option<String> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            let mut it = items.into_iter();
            std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
        }
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    pairs.into_iter().find_map(|(k, v)| {
        let k = String::from_redis_value(k).ok()?;
        k.eq_ignore_ascii_case(setting)
            .then(|| String::from_redis_value(v).ok())
            .flatten()
    })
}

/// Whether a reply element is this nonce, echoed as text (no allocation).
/// Milliseconds from a `TIME` reply (`[seconds, microseconds]`).
fn time_ms(v: Value) -> Result<i64, StoreError> {
    let parts: Vec<i64> = redis::from_redis_value(v)
        .map_err(|e| StoreError::Protocol(format!("a TIME reply: {e}")))?;
    match parts[..] {
        [secs, micros] => Ok(secs * 1000 + micros / 1000),
        _ => Err(StoreError::Protocol(
            "a TIME reply of other than two parts".into(),
        )),
    }
}

fn is_nonce(v: Option<&Value>, nonce: u64) -> bool {
    match v {
        Some(Value::BulkString(bytes)) => {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
                == Some(nonce)
        }
        _ => false,
    }
}

/// An integer stored as text (`HGET`), `None` when missing.
fn optional_int(v: Option<Value>, what: &str) -> Result<Option<i64>, StoreError> {
    match v {
        Some(Value::Nil) | None => Ok(None),
        Some(v) => i64::from_redis_value(v)
            .map(Some)
            .map_err(|e| StoreError::Protocol(format!("{what}: {e}"))),
    }
}

fn int(v: Option<Value>) -> Result<i64, StoreError> {
    match v {
        Some(Value::Int(i)) => Ok(i),
        other => Err(StoreError::Protocol(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

fn text(v: Option<Value>) -> Result<String, StoreError> {
    match v {
        Some(Value::BulkString(bytes)) => String::from_utf8(bytes)
            .map_err(|_| StoreError::Protocol("a stored string is not UTF-8".into())),
        Some(Value::SimpleString(s)) => Ok(s),
        other => Err(StoreError::Protocol(format!(
            "expected a string, got {other:?}"
        ))),
    }
}
