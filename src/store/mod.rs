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
pub mod keys;
pub mod record;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::{FromRedisValue, Script, Value};

use conn::ConnectionLayer;
pub use conn::Topology;

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
    /// Sessions created at or before this are revoked (logout-all).
    pub cutoff_ms: i64,
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
    /// Every session created at or before this time (ms).
    CreatedBefore(i64),
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
}

struct Scripts {
    touch: Script,
    create: Script,
    revoke: Script,
    reauth: Script,
    list: Script,
    global: Script,
    read: Script,
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
        Ok(Store {
            conn: ConnectionLayer::new(topology, timeout, pool_size, metrics.clone())?,
            min_replicas_ack: 0,
            wait_ms: (timeout.as_millis() as u64 * 2 / 5).max(1),
            clock: std::time::Instant::now(),
            durability_checked_ms: AtomicU64::new(0),
            keys,
            scripts: Scripts {
                touch: script!("touch.lua"),
                create: script!("create.lua"),
                revoke: script!("revoke.lua"),
                reauth: script!("reauth.lua"),
                list: script!("list.lua"),
                global: script!("global.lua"),
                read: Script::new(include_str!("lua/read.lua")),
                probe: Script::new(include_str!("lua/probe.lua")),
            },
            metrics,
        })
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
        self.run_script_waiting(script, cmd, 0).await
    }

    /// [`Store::run_script`] for a change the client is told is done: when
    /// `min_replicas_ack` > 0, pipelined with `WAIT n` on the same
    /// connection (so, in Cluster mode, to the node that took the write:
    /// redis-rs routes a pipeline by its first keyed command), in the same
    /// round trip; fewer confirmations fail it with
    /// [`StoreError::NotReplicated`].
    async fn run_acknowledged(
        &self,
        script: &Script,
        cmd: redis::Cmd,
    ) -> Result<std::vec::IntoIter<Value>, StoreError> {
        self.run_script_waiting(script, cmd, self.min_replicas_ack)
            .await
    }

    async fn run_script_waiting(
        &self,
        script: &Script,
        mut cmd: redis::Cmd,
        replicas: u32,
    ) -> Result<std::vec::IntoIter<Value>, StoreError> {
        let nonce = NEXT_NONCE.fetch_add(1, Ordering::Relaxed);
        cmd.arg(nonce);
        let cmd = &cmd;
        let (reply, acks): (Vec<Value>, i64) = if replicas == 0 {
            let reply = self
                .conn
                .call(
                    |mut conn| async move { evalsha_loading(&mut conn, script, cmd).await },
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
        let key = self.keys.user_of(session);
        let nonce = NEXT_NONCE.fetch_add(1, Ordering::Relaxed);
        let mut pipe = redis::pipe();
        pipe.cmd("HGET")
            .arg(&key)
            .arg(session.field())
            .cmd("ECHO")
            .arg(nonce);
        let pipe = &pipe;
        let mut reply: Vec<Value> = self
            .conn
            .call(
                |mut conn| async move { pipe.query_async::<Vec<Value>>(&mut conn).await },
                |reply: &Vec<Value>| reply.len() == 2 && is_nonce(reply.get(1), nonce),
            )
            .await?;
        let blob = match reply.swap_remove(0) {
            Value::Nil => return Ok(None),
            Value::BulkString(blob) => blob,
            other => {
                return Err(StoreError::Protocol(format!(
                    "a session record that is not a string: {other:?}"
                )));
            }
        };
        let rec = record::decode(&blob).map_err(StoreError::Protocol)?;
        let checks = Checks {
            now_ms: clock.upper_ms(),
            idle_ms: live.idle_ms,
            cutoff_ms: live.cutoff_ms,
            device_id: device.as_str(),
            max_auth_age_ms,
            touch_ms,
        };
        let (reauth_needed, mut last_seen_ms) = match record::judge(&rec, &checks) {
            Verdict::OtherDevice => return Ok(None),
            Verdict::Dead => {
                let none = Seen::default();
                let _ = self
                    .touch(&key, session, device, live, -1, &none, started)
                    .await;
                return Ok(None);
            }
            Verdict::Alive {
                reauth_needed,
                touch_due,
            } => {
                let mut seen = rec.last_seen_ms;
                if touch_due {
                    let from = seen_from.map(|f| f()).unwrap_or_default();
                    match self
                        .touch(&key, session, device, live, touch_ms, &from, started)
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
                record::whereabouts(&blob).map_err(StoreError::Protocol)?;
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
        let mut cmd = evalsha(&self.scripts.touch, key);
        cmd.arg(session.field())
            .arg(device.as_str())
            .arg(live.idle_ms)
            .arg(touch_ms)
            .arg(live.cutoff_ms)
            .arg(&seen.ip)
            .arg(&seen.user_agent);
        let call = self.run_script(&self.scripts.touch, cmd);
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
        let mut cmd = evalsha(
            &self.scripts.create,
            &self.keys.user(&new.session.user_tag()),
        );
        cmd.arg(new.session.field())
            .arg(new.user.as_str())
            .arg(new.device.as_str())
            .arg(new.auth_time_ms.map(|t| t.to_string()).unwrap_or_default())
            .arg(new.metadata)
            .arg(live.idle_ms)
            .arg(new.absolute_ms)
            .arg(new.max_per_user)
            .arg(live.cutoff_ms);
        let mut it = self.run_acknowledged(&self.scripts.create, cmd).await?;
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
        self.revoke_key(&self.keys.user(user), which, live).await
    }

    async fn revoke_key(
        &self,
        key: &str,
        which: Revoke<'_>,
        live: Liveness,
    ) -> Result<u64, StoreError> {
        let cmd = self.revoke_cmd(key, which, live);
        let mut it = self.run_acknowledged(&self.scripts.revoke, cmd).await?;
        Ok(int(it.next())?.max(0) as u64)
    }

    fn revoke_cmd(&self, key: &str, which: Revoke<'_>, live: Liveness) -> redis::Cmd {
        let mut cmd = evalsha(&self.scripts.revoke, key);
        match which {
            Revoke::One(field) => cmd.arg("one").arg(field),
            Revoke::AllExcept(keep) => cmd.arg("except").arg(keep.unwrap_or("")),
            Revoke::Device(device) => cmd.arg("device").arg(device),
            Revoke::CreatedBefore(ms) => cmd.arg("before").arg(ms),
        };
        cmd.arg(live.idle_ms).arg(live.cutoff_ms);
        cmd
    }

    /// Records a fresh password check; `None` when the session is not alive.
    pub async fn reauth(
        &self,
        session: &SessionId,
        live: Liveness,
    ) -> Result<Option<i64>, StoreError> {
        let mut cmd = evalsha(&self.scripts.reauth, &self.keys.user(&session.user_tag()));
        cmd.arg(session.field())
            .arg(live.idle_ms)
            .arg(live.cutoff_ms);
        let mut it = self.run_acknowledged(&self.scripts.reauth, cmd).await?;
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
        cmd.arg(live.idle_ms).arg(live.cutoff_ms);
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
        let mut cmd = evalsha(&self.scripts.global, self.keys.global());
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
        let mut it = match op {
            GlobalOp::Init { .. } => self.run_script(&self.scripts.global, cmd).await?,
            _ => self.run_acknowledged(&self.scripts.global, cmd).await?,
        };
        Ok(GlobalRecord {
            cutoff_ms: int(it.next())?,
            ring_json: text(it.next())?,
            now_ms: int(it.next())?,
        })
    }

    /// Reads the global state without changing it, and Redis's clock:
    /// `(cutoff, ring, now_ms)`.
    pub async fn read_global(&self) -> Result<(Option<i64>, Option<String>, i64), StoreError> {
        let cmd = evalsha(&self.scripts.read, self.keys.global());
        let mut it = self.run_script(&self.scripts.read, cmd).await?;
        let cutoff = match it.next() {
            Some(Value::Nil) | None => None,
            Some(v) => Some(
                i64::from_redis_value(v)
                    .map_err(|e| StoreError::Protocol(format!("global cutoff: {e}")))?,
            ),
        };
        let ring = match it.next() {
            Some(Value::Nil) | None => None,
            v => Some(text(v)?),
        };
        Ok((cutoff, ring, int(it.next())?))
    }

    /// The readiness probe: a script issuing a write command that changes
    /// nothing (see `lua/probe.lua`), so Redis says whether it would take
    /// the service's scripts and writes.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let cmd = evalsha(
            &self.scripts.probe,
            &format!("{}readyz-probe", self.keys.prefix()),
        );
        self.run_script(&self.scripts.probe, cmd).await.map(|_| ())
    }

    /// Deletes every session created at or before `cutoff_ms`, in bounded
    /// batches (`SCAN ... COUNT 200`, one script per user hash, a pause
    /// between batches), so a logout-all never blocks Redis. Verify already
    /// refuses those sessions by the cutoff; this only frees memory.
    ///
    /// All of it runs over the deadpool-redis pool, never over the request
    /// path's per-thread connections: the purge's commands are not
    /// pipelined ahead of verifies, and its failures and timeouts are not
    /// counted against (nor can they replace) a request-path connection.
    /// A pooled connection that fails, times out or answers out of step is
    /// taken out of the pool, and the purge stops (records expire by TTL).
    ///
    /// In Redis Cluster mode `SCAN` would see one node only, so nothing is
    /// purged there: the cutoff refuses the sessions on every instance and
    /// their records expire by TTL.
    pub async fn purge_before(&self, cutoff_ms: i64, live: Liveness) -> Result<u64, StoreError> {
        if self.conn.is_cluster() {
            return Ok(0);
        }
        let result = self.purge_on_pool(cutoff_ms, live).await;
        if let Err(e) = &result {
            self.metrics.redis_error(e.kind());
        }
        result
    }

    async fn purge_on_pool(&self, cutoff_ms: i64, live: Liveness) -> Result<u64, StoreError> {
        let pattern = self.keys.user_pattern();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let mut conn = self.conn.pooled().await?;
            let scan = self
                .conn
                .bounded(async {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(200)
                        .query_async::<(u64, Vec<String>)>(&mut conn)
                        .await
                        .map_err(|e| StoreError::from_redis(&e))
                })
                .await;
            let (next, keys) = match scan {
                Ok(found) => found,
                Err(e) => {
                    conn.discard();
                    return Err(e);
                }
            };
            for key in keys {
                let mut cmd = self.revoke_cmd(&key, Revoke::CreatedBefore(cutoff_ms), live);
                let nonce = NEXT_NONCE.fetch_add(1, Ordering::Relaxed);
                cmd.arg(nonce);
                let reply = self
                    .conn
                    .bounded(async {
                        evalsha_loading(&mut conn, &self.scripts.revoke, &cmd)
                            .await
                            .map_err(|e| StoreError::from_redis(&e))
                    })
                    .await;
                let reply = match reply {
                    Ok(reply) if is_nonce(reply.first(), nonce) => reply,
                    Ok(_) => {
                        self.metrics.reply_mismatch.inc();
                        conn.discard();
                        return Err(StoreError::Protocol(
                            "a reply for another request (nonce mismatch)".into(),
                        ));
                    }
                    Err(e) => {
                        conn.discard();
                        return Err(e);
                    }
                };
                removed += int(reply.into_iter().nth(1))?.max(0) as u64;
            }
            drop(conn);
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
