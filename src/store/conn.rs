//! The connection layer: how the store reaches Redis, kept apart from what
//! it asks (the scripts and records in [`super`]).
//!
//! Request path: each HTTP worker thread keeps one multiplexed connection of
//! its own per store (requests on that worker are pipelined on it, and its
//! driver runs on the worker's own runtime, so a verify never hops threads).
//! Checking a connection out of a pool per request would cost
//! deadpool-redis's PING round trip each time. A broken or repeatedly
//! timing-out connection is dropped and the next call opens a fresh one, so
//! recovery needs no restart; after a failed opening none is tried for a
//! short backoff, so an outage costs one connection attempt per backoff, not
//! one per request.
//!
//! Bulk work (the logout-all purge, `CONFIG GET`) uses the deadpool-redis
//! pool, bounded in size and time, so it never queues ahead of verifies (in
//! Cluster mode the purge opens a cluster connection of its own instead).
//! Pub/sub opens its own connection per subscription.
//!
//! Every call is bounded by the timeout: pool wait, connect and reply.
//!
//! Three [`Topology`]s, each on redis-rs's (and deadpool-redis's) own
//! support:
//! - standalone: one Redis URL;
//! - Sentinel: every connection (request path, pool, pub/sub) is opened to
//!   the primary the sentinels name (`SentinelClient`, which also checks
//!   with `ROLE` that the node is a primary). A connection whose node
//!   answers `READONLY` (a demoted primary) is dropped at once, and
//!   [`ConnectionLayer::watch`] asks the sentinels every
//!   [`SENTINEL_POLL`] which node is the primary: when it changed, every
//!   connection opened before is abandoned, so nothing keeps talking to a
//!   demoted primary that is still reachable;
//! - Cluster: `ClusterClient`, routing each script by its key's slot.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, ErrorKind, ServerErrorKind, Value};

use super::StoreError;
use crate::metrics::Metrics;

/// After this many timeouts in a row the connection is replaced.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

/// How often [`ConnectionLayer::watch`] asks the sentinels for the primary.
pub const SENTINEL_POLL: Duration = Duration::from_millis(500);

/// Where the data lives, as configured.
#[derive(Clone)]
pub enum Topology {
    /// One Redis (`redis_url`).
    Standalone { url: String },
    /// A primary found through Sentinel: the sentinels' addresses and the
    /// master name they monitor. The first sentinel URL's username and
    /// password (if any) are used for the data nodes as well.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// A Redis Cluster, by its seed nodes.
    Cluster { nodes: Vec<String> },
}

/// How the layer opens a connection to the node that takes writes.
enum Target {
    Single(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

/// The bulk-work pool: deadpool-redis's plain or Sentinel pool.
enum BulkPool {
    Single(Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
}

static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// A connection to a single Redis or to a Redis Cluster. Both are
/// multiplexed and cheap to clone; the cluster one routes each script by its
/// key's slot (every per-user script touches one hash, so one slot).
#[derive(Clone)]
pub(super) enum Connection {
    /// A single Redis, or the primary Sentinel names: the multiplexed
    /// connection for everything, and the verify read's own, to the same
    /// node ([`super::reader`]).
    Single(MultiplexedConnection, super::reader::Reader),
    Cluster(ClusterConnection),
}

impl Connection {
    /// The verify read's own connection (not in Cluster mode).
    pub(super) fn reader(&self) -> Option<&super::reader::Reader> {
        match self {
            Connection::Single(_, reader) => Some(reader),
            Connection::Cluster(_) => None,
        }
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c, _) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c, _) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c, _) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection checked out of the bulk-work pool; back to the pool on
/// drop, or thrown away with [`Pooled::discard`].
pub(super) enum Pooled {
    Single(deadpool_redis::Connection),
    Sentinel(deadpool_redis::sentinel::Connection),
}

impl Pooled {
    /// Takes the connection out of the pool (it failed, timed out or
    /// answered out of step): the pool opens a fresh one instead.
    pub(super) fn discard(self) {
        match self {
            Pooled::Single(c) => drop(deadpool_redis::Connection::take(c)),
            Pooled::Sentinel(c) => drop(deadpool_redis::sentinel::Connection::take(c)),
        }
    }
}

impl redis::aio::ConnectionLike for Pooled {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Pooled::Single(c) => c.req_packed_command(cmd),
            Pooled::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Pooled::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Pooled::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Pooled::Single(c) => c.get_db(),
            Pooled::Sentinel(c) => c.get_db(),
        }
    }
}

/// Whether a failed command means its connection must go: broken, or on a
/// node that no longer takes writes (`READONLY`: a demoted primary).
pub(super) fn connection_unusable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// One thread's request-path connection of one layer.
struct LocalConnection {
    layer: u64,
    /// Unique per opened connection, so stale timeouts are not held against
    /// a newer one.
    generation: u64,
    /// The layer's topology epoch when this was opened; a connection of an
    /// older epoch is never used again.
    epoch: u64,
    conn: Connection,
    timeouts: u32,
}

thread_local! {
    static LOCAL_CONNECTIONS: RefCell<Vec<LocalConnection>> = const { RefCell::new(Vec::new()) };
}

/// Delays the next connection attempt unless forgotten (on success).
struct BackoffOnDrop<'a>(&'a ConnectionLayer);

impl Drop for BackoffOnDrop<'_> {
    fn drop(&mut self) {
        let layer = self.0;
        let until = layer.clock.elapsed() + layer.reconnect_backoff;
        layer
            .next_connect_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }
}

/// Everything the store needs to reach Redis: the request path's per-thread
/// connections, the bulk-work pool and pub/sub.
pub(super) struct ConnectionLayer {
    id: u64,
    pool: BulkPool,
    target: Target,
    /// Bumped when the sentinels name another primary: every connection
    /// opened before is abandoned.
    epoch: AtomicU64,
    /// The primary (`host:port`) the last Sentinel lookup named.
    primary: std::sync::Mutex<Option<String>>,
    /// The addresses pub/sub may subscribe at (any node hears every
    /// PUBLISH in a cluster); tried in turn. Empty in Sentinel mode (the
    /// primary is asked for).
    event_urls: Vec<String>,
    next_event_url: AtomicU64,
    connection_config: AsyncConnectionConfig,
    reconnecting: tokio::sync::Mutex<()>,
    /// Monotonic origin for `next_connect_ms`.
    clock: std::time::Instant,
    next_connect_ms: AtomicU64,
    reconnect_backoff: Duration,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl ConnectionLayer {
    /// Sets up the pool; connects lazily, so a service can start while Redis
    /// is down (it answers 503 until Redis is back).
    pub(super) fn new(
        topology: &Topology,
        timeout: Duration,
        pool_size: usize,
        metrics: Arc<Metrics>,
    ) -> Result<ConnectionLayer, StoreError> {
        let bad = |e: redis::RedisError| StoreError::Connection(e.to_string());
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let (pool, target, event_urls) = match topology {
            Topology::Standalone { url } => (
                BulkPool::Single(single_pool(url, &config, timeout, pool_size)?),
                Target::Single(redis::Client::open(url.as_str()).map_err(bad)?),
                vec![url.clone()],
            ),
            Topology::Cluster { nodes } => (
                // Unused for commands in Cluster mode (the purge and the
                // durability check do not run there); kept for its status.
                BulkPool::Single(single_pool(&nodes[0], &config, timeout, pool_size)?),
                Target::Cluster(
                    ClusterClient::builder(nodes.iter().map(String::as_str))
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .build()
                        .map_err(bad)?,
                ),
                nodes.clone(),
            ),
            Topology::Sentinel { sentinels, master } => {
                let node_info = sentinel_node_info(&sentinels[0])?;
                let manager = deadpool_redis::sentinel::Manager::new(
                    sentinels.clone(),
                    master.clone(),
                    node_info.clone().map(Into::into),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                )
                .map_err(bad)?;
                let pool = deadpool_redis::sentinel::Pool::builder(manager)
                    .max_size(pool_size)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(Some(timeout))
                    .create_timeout(Some(timeout))
                    .recycle_timeout(Some(timeout))
                    .build()
                    .map_err(|e| StoreError::Connection(e.to_string()))?;
                let client = SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    node_info.map(|i| i.into_redis()),
                    SentinelServerType::Master,
                )
                .map_err(bad)?;
                (
                    BulkPool::Sentinel(pool),
                    Target::Sentinel(tokio::sync::Mutex::new(client)),
                    Vec::new(),
                )
            }
        };
        Ok(ConnectionLayer {
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            pool,
            target,
            epoch: AtomicU64::new(0),
            primary: std::sync::Mutex::new(None),
            event_urls,
            next_event_url: AtomicU64::new(0),
            // The request path's connections: every call on them is bounded
            // by `call`'s own timeout, so redis-rs's per-request timer (a
            // second one, 500 ms unless set) is off there.
            connection_config: config.set_response_timeout(None),
            reconnecting: tokio::sync::Mutex::new(()),
            clock: std::time::Instant::now(),
            next_connect_ms: AtomicU64::new(0),
            reconnect_backoff: timeout.min(Duration::from_millis(200)),
            timeout,
            metrics,
        })
    }

    /// Redis Cluster mode.
    /// Where the request path connects, with a single Redis (the
    /// near-cache's invalidation connection goes to the same one); `None`
    /// with Sentinel or Cluster.
    pub(super) fn single_connection_info(&self) -> Option<redis::ConnectionInfo> {
        match &self.target {
            Target::Single(client) => Some(client.get_connection_info().clone()),
            _ => None,
        }
    }

    /// The bound on every call.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    pub(super) fn is_sentinel(&self) -> bool {
        matches!(self.target, Target::Sentinel(_))
    }

    pub(super) fn pool_status(&self) -> deadpool_redis::Status {
        match &self.pool {
            BulkPool::Single(p) => p.status(),
            BulkPool::Sentinel(p) => p.status(),
        }
    }

    /// This thread's connection of the current epoch (one of an older epoch
    /// is dropped here).
    fn local_connection(&self) -> Option<(u64, Connection)> {
        let epoch = self.epoch.load(Ordering::Acquire);
        LOCAL_CONNECTIONS.with(|c| {
            let mut conns = c.borrow_mut();
            conns.retain(|l| l.layer != self.id || l.epoch == epoch);
            conns
                .iter()
                .find(|l| l.layer == self.id)
                .map(|l| (l.generation, l.conn.clone()))
        })
    }

    /// The primary the sentinels name now, connected to and checked
    /// (`ROLE`); remembers its address.
    async fn sentinel_primary(
        &self,
        client: &tokio::sync::Mutex<SentinelClient>,
    ) -> Result<redis::Client, StoreError> {
        let found = client.lock().await.async_get_client().await.map_err(|e| {
            tracing::debug!(error = %e, "Sentinel lookup of the primary failed");
            StoreError::from_redis(&e)
        })?;
        let addr = found.get_connection_info().addr().to_string();
        tracing::debug!(primary = %addr, "Sentinel names the primary");
        let mut primary = self.primary.lock().unwrap_or_else(|p| p.into_inner());
        if primary.as_deref() != Some(addr.as_str()) {
            if primary.is_some() {
                tracing::warn!(primary = %addr, "Sentinel names a new Redis primary");
                self.abandon_connections();
            }
            *primary = Some(addr);
        }
        Ok(found)
    }

    /// Stops using every connection opened so far: request-path ones (by
    /// epoch, on every thread) and the pool's idle ones.
    fn abandon_connections(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let BulkPool::Sentinel(pool) = &self.pool {
            pool.retain(|_, _| false);
        }
    }

    /// Sentinel mode: asks the sentinels for the primary every
    /// [`SENTINEL_POLL`], abandoning every connection when it changed
    /// (see the module doc). Other modes: returns at once. Run it as a
    /// background task for the life of the store.
    pub(super) async fn watch(&self) {
        let Target::Sentinel(client) = &self.target else {
            return;
        };
        loop {
            tokio::time::sleep(SENTINEL_POLL).await;
            let _ = self.bounded(self.sentinel_primary(client)).await;
        }
    }

    /// This thread's connection, opened when there is none. One opening at
    /// a time, and after a failed opening none for `reconnect_backoff`, so an
    /// outage costs a connection attempt per backoff, not one per request.
    async fn connection(&self) -> Result<(u64, Connection), StoreError> {
        if let Some(found) = self.local_connection() {
            return Ok(found);
        }
        let _guard = self.reconnecting.lock().await;
        if let Some(found) = self.local_connection() {
            return Ok(found);
        }
        if self.clock.elapsed().as_millis() < self.next_connect_ms.load(Ordering::Relaxed) as u128 {
            return Err(StoreError::Connection(
                "Redis unreachable; waiting before reconnecting".into(),
            ));
        }
        // Armed until the connection is up: a failure, or this future being
        // dropped at its deadline, delays the next attempt.
        let backoff = BackoffOnDrop(self);
        let epoch = self.epoch.load(Ordering::Acquire);
        let conn = match &self.target {
            Target::Single(client) => self.single(client).await?,
            Target::Sentinel(sentinel) => {
                self.single(&self.sentinel_primary(sentinel).await?).await?
            }
            Target::Cluster(cluster) => Connection::Cluster(
                cluster
                    .get_async_connection()
                    .await
                    .map_err(|e| StoreError::from_redis(&e))?,
            ),
        };
        // The primary changed while this one was opened: it may be the old
        // one, so the next call opens another.
        let epoch = if self.epoch.load(Ordering::Acquire) == epoch {
            epoch
        } else {
            u64::MAX
        };
        std::mem::forget(backoff);
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        LOCAL_CONNECTIONS.with(|c| {
            c.borrow_mut().push(LocalConnection {
                layer: self.id,
                generation,
                epoch,
                conn: conn.clone(),
                timeouts: 0,
            })
        });
        Ok((generation, conn))
    }

    /// Both connections to one node: the multiplexed one, and the verify
    /// read's.
    async fn single(&self, client: &redis::Client) -> Result<Connection, StoreError> {
        let multiplexed = client
            .get_multiplexed_async_connection_with_config(&self.connection_config)
            .await
            .map_err(|e| StoreError::from_redis(&e))?;
        let reader = super::reader::Reader::open(client.get_connection_info())
            .await
            .map_err(|e| StoreError::from_redis(&e))?;
        Ok(Connection::Single(multiplexed, reader))
    }

    /// Drops this thread's connection if it is still `generation`; the next
    /// call opens a new one.
    fn forget_connection(&self, generation: u64) {
        LOCAL_CONNECTIONS.with(|c| {
            c.borrow_mut()
                .retain(|l| !(l.layer == self.id && l.generation == generation))
        });
    }

    /// Counts a timeout against the connection that timed out; after
    /// `TIMEOUTS_BEFORE_RECONNECT` in a row it is replaced. Timeouts of
    /// requests sent on an older connection do not count against a new one.
    fn count_timeout(&self, generation: u64) {
        let worn_out = LOCAL_CONNECTIONS.with(|c| {
            let mut conns = c.borrow_mut();
            let Some(l) = conns
                .iter_mut()
                .find(|l| l.layer == self.id && l.generation == generation)
            else {
                return false;
            };
            l.timeouts += 1;
            l.timeouts >= TIMEOUTS_BEFORE_RECONNECT
        });
        if worn_out {
            self.forget_connection(generation);
        }
    }

    fn reset_timeouts(&self, generation: u64) {
        LOCAL_CONNECTIONS.with(|c| {
            if let Some(l) = c
                .borrow_mut()
                .iter_mut()
                .find(|l| l.layer == self.id && l.generation == generation)
            {
                l.timeouts = 0;
            }
        });
    }

    /// Runs `op` on this thread's connection, bounded by the timeout, and
    /// keeps the connection's health books. A reply failing `matches` (not
    /// the answer to this request) fails the call and drops the connection:
    /// its replies can no longer be matched to requests.
    pub(super) async fn call<T, F, Fut>(
        &self,
        op: F,
        matches: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        // The generation used (0: none yet); atomic only to keep the future Send.
        let used = AtomicU64::new(0);
        let attempt = async {
            let (generation, conn) = self.connection().await?;
            used.store(generation, Ordering::Relaxed);
            let reply = op(conn).await.map_err(|e| {
                if connection_unusable(&e) {
                    self.forget_connection(generation);
                }
                StoreError::from_redis(&e)
            })?;
            if !matches(&reply) {
                self.forget_connection(generation);
                self.metrics.reply_mismatch.inc();
                return Err(StoreError::Protocol(
                    "a reply for another request (nonce mismatch)".into(),
                ));
            }
            Ok(reply)
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        let used = Some(used.into_inner()).filter(|g| *g != 0);
        match (&result, used) {
            (Ok(_), Some(generation)) => self.reset_timeouts(generation),
            (Err(err), generation) => {
                self.metrics.redis_error(err.kind());
                if let (StoreError::Timeout(_), Some(generation)) = (err, generation) {
                    self.count_timeout(generation);
                }
            }
            _ => {}
        }
        result
    }

    /// A connection from the bulk-work pool, within the timeout.
    pub(super) async fn pooled(&self) -> Result<Pooled, StoreError> {
        self.bounded(async {
            match &self.pool {
                BulkPool::Single(p) => p.get().await.map(Pooled::Single),
                BulkPool::Sentinel(p) => p.get().await.map(Pooled::Sentinel),
            }
            .map_err(|e| StoreError::Connection(e.to_string()))
        })
        .await
    }

    /// Redis Cluster mode: a connection of its own for bulk work (the
    /// purge), within the timeout, never one of the request path's.
    pub(super) async fn cluster_bulk(&self) -> Result<ClusterConnection, StoreError> {
        let Target::Cluster(cluster) = &self.target else {
            return Err(StoreError::Connection("not in Redis Cluster mode".into()));
        };
        self.bounded(async {
            cluster
                .get_async_connection()
                .await
                .map_err(|e| StoreError::from_redis(&e))
        })
        .await
    }

    /// `op` bounded by the timeout (for work off the request path).
    pub(super) async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, op)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.timeout)))
    }

    /// A pub/sub connection subscribed to `channel`.
    pub(super) async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub, StoreError> {
        let attempt = async {
            let client = match &self.target {
                Target::Sentinel(sentinel) => self.sentinel_primary(sentinel).await?,
                _ => {
                    let n = self.next_event_url.fetch_add(1, Ordering::Relaxed) as usize;
                    let url = &self.event_urls[n % self.event_urls.len()];
                    redis::Client::open(url.as_str()).map_err(|e| StoreError::from_redis(&e))?
                }
            };
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            subscribed.await.map_err(|e| StoreError::from_redis(&e))
        };
        self.bounded(attempt).await
    }
}

fn single_pool(
    url: &str,
    config: &AsyncConnectionConfig,
    timeout: Duration,
    pool_size: usize,
) -> Result<Pool, StoreError> {
    let manager = Manager::new_with_config(url, config.clone())
        .map_err(|e| StoreError::Connection(e.to_string()))?;
    Pool::builder(manager)
        .max_size(pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| StoreError::Connection(e.to_string()))
}

/// The data nodes' credentials in Sentinel mode: those of the first
/// sentinel URL (`redis://user:pass@host:port`), if it has any.
fn sentinel_node_info(first_sentinel: &str) -> Result<Option<NodeInfo>, StoreError> {
    use redis::IntoConnectionInfo;
    let info = first_sentinel
        .into_connection_info()
        .map_err(|e| StoreError::Connection(e.to_string()))?;
    let redis = info.redis_settings();
    Ok(
        (redis.username().is_some() || redis.password().is_some()).then(|| NodeInfo {
            username: redis.username().map(str::to_string),
            password: redis.password().map(str::to_string),
        }),
    )
}

/// Credentials for the data nodes, convertible into both redis-rs's and
/// deadpool-redis's Sentinel node settings.
#[derive(Clone)]
struct NodeInfo {
    username: Option<String>,
    password: Option<String>,
}

impl NodeInfo {
    fn into_redis(self) -> redis::sentinel::SentinelNodeConnectionInfo {
        let mut info = redis::RedisConnectionInfo::default();
        if let Some(u) = self.username {
            info = info.set_username(u);
        }
        if let Some(p) = self.password {
            info = info.set_password(p);
        }
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info)
    }
}

impl From<NodeInfo> for deadpool_redis::sentinel::SentinelNodeConnectionInfo {
    fn from(n: NodeInfo) -> Self {
        deadpool_redis::sentinel::SentinelNodeConnectionInfo {
            tls_mode: None,
            redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                username: n.username,
                password: n.password,
                ..Default::default()
            }),
        }
    }
}
