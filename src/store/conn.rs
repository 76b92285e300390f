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

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Value};

use super::StoreError;
use crate::metrics::Metrics;

/// After this many timeouts in a row the connection is replaced.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// A connection to a single Redis or to a Redis Cluster. Both are
/// multiplexed and cheap to clone; the cluster one routes each script by its
/// key's slot (every per-user script touches one hash, so one slot).
#[derive(Clone)]
pub(super) enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
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
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection checked out of the bulk-work pool; back to the pool on
/// drop, or thrown away with [`Pooled::discard`].
pub(super) struct Pooled(deadpool_redis::Connection);

impl Pooled {
    /// Takes the connection out of the pool (it failed, timed out or
    /// answered out of step): the pool opens a fresh one instead.
    pub(super) fn discard(self) {
        let _ = deadpool_redis::Connection::take(self.0);
    }
}

impl redis::aio::ConnectionLike for Pooled {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// One thread's request-path connection of one layer.
struct LocalConnection {
    layer: u64,
    /// Unique per opened connection, so stale timeouts are not held against
    /// a newer one.
    generation: u64,
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
    pool: Pool,
    client: redis::Client,
    /// Set in Redis Cluster mode: commands go through it instead of `client`.
    cluster: Option<ClusterClient>,
    /// The addresses pub/sub may subscribe at (any node hears every
    /// PUBLISH in a cluster); tried in turn.
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
    /// `cluster_nodes` non-empty: Redis Cluster mode, with these seed nodes.
    pub(super) fn new(
        url: &str,
        cluster_nodes: &[String],
        timeout: Duration,
        pool_size: usize,
        metrics: Arc<Metrics>,
    ) -> Result<ConnectionLayer, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let manager = Manager::new_with_config(url, config.clone())
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        let client = redis::Client::open(url).map_err(|e| StoreError::Connection(e.to_string()))?;
        let cluster = if cluster_nodes.is_empty() {
            None
        } else {
            Some(
                ClusterClient::builder(cluster_nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(|e| StoreError::Connection(e.to_string()))?,
            )
        };
        let event_urls = if cluster_nodes.is_empty() {
            vec![url.to_string()]
        } else {
            cluster_nodes.to_vec()
        };
        Ok(ConnectionLayer {
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            pool,
            client,
            cluster,
            event_urls,
            next_event_url: AtomicU64::new(0),
            connection_config: config,
            reconnecting: tokio::sync::Mutex::new(()),
            clock: std::time::Instant::now(),
            next_connect_ms: AtomicU64::new(0),
            reconnect_backoff: timeout.min(Duration::from_millis(200)),
            timeout,
            metrics,
        })
    }

    /// Redis Cluster mode.
    pub(super) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    pub(super) fn pool_status(&self) -> deadpool_redis::Status {
        self.pool.status()
    }

    fn local_connection(&self) -> Option<(u64, Connection)> {
        LOCAL_CONNECTIONS.with(|c| {
            c.borrow()
                .iter()
                .find(|l| l.layer == self.id)
                .map(|l| (l.generation, l.conn.clone()))
        })
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
        let conn = match &self.cluster {
            None => Connection::Single(
                self.client
                    .get_multiplexed_async_connection_with_config(&self.connection_config)
                    .await
                    .map_err(|e| StoreError::from_redis(&e))?,
            ),
            Some(cluster) => Connection::Cluster(
                cluster
                    .get_async_connection()
                    .await
                    .map_err(|e| StoreError::from_redis(&e))?,
            ),
        };
        std::mem::forget(backoff);
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        LOCAL_CONNECTIONS.with(|c| {
            c.borrow_mut().push(LocalConnection {
                layer: self.id,
                generation,
                conn: conn.clone(),
                timeouts: 0,
            })
        });
        Ok((generation, conn))
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
                let err = StoreError::from_redis(&e);
                if matches!(err, StoreError::Connection(_)) || e.is_unrecoverable_error() {
                    self.forget_connection(generation);
                }
                err
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
            self.pool
                .get()
                .await
                .map(Pooled)
                .map_err(|e| StoreError::Connection(e.to_string()))
        })
        .await
    }

    /// Redis Cluster mode: a connection of its own for bulk work (the
    /// purge), within the timeout, never one of the request path's.
    pub(super) async fn cluster_bulk(&self) -> Result<ClusterConnection, StoreError> {
        let Some(cluster) = &self.cluster else {
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
        let n = self.next_event_url.fetch_add(1, Ordering::Relaxed) as usize;
        let url = &self.event_urls[n % self.event_urls.len()];
        let attempt = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(StoreError::from_redis(&e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}
