//! A small fault-injecting TCP proxy for tests: put it between the service
//! and a real `redis-server`, then break the network on demand.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every accepted
//! connection to the upstream address (one upstream connection per client
//! connection). A cloneable [`ProxyHandle`] changes its behaviour at run time:
//!
//! - [`ProxyHandle::delay`]: every chunk travelling toward the client is held
//!   for this long after it arrived from upstream (a latency line: chunks stay
//!   in order and throughput is not capped).
//! - [`ProxyHandle::blackhole`]: connections are still accepted, and client
//!   bytes are read, but nothing is forwarded either way: requests and
//!   replies are discarded. Discarded bytes are gone for good, so a
//!   connection that lived through a blackhole is out of step with Redis
//!   after [`ProxyHandle::heal`] (stricter than TCP, which would deliver them
//!   late): exactly what a client that trusts reply order must survive.
//! - [`ProxyHandle::drop_all`]: closes every open connection at once, and
//!   closes new ones as soon as they are accepted, until healed.
//! - [`ProxyHandle::cut_mid_reply`]: from now until healed, every chunk
//!   toward the client is forwarded only in part (its first half), then the
//!   connection is closed; [`ProxyHandle::cut_next_replies`] does that for
//!   the next `n` chunks only.
//! - [`ProxyHandle::duplicate_next_replies`]: the next `n` chunks toward
//!   the client are delivered twice, so a pipelining client's next request
//!   receives a stale reply (one meant for an earlier request), and every
//!   reply after it on that connection is one request late.
//! - [`ProxyHandle::heal`]: back to a plain pipe (no delay, no cut, no
//!   duplicates).
//!
//! [`ProxyHandle::stats`] counts connections and bytes so tests can assert
//! that a fault really happened and that clients did not pile up.
//!
//! Everything runs as tasks on the caller's tokio runtime; dropping the
//! [`FaultProxy`] aborts them all (which closes every socket). Use a
//! multi-threaded runtime when the test also makes blocking calls.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// What the proxy does with traffic (besides delay and cuts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Accept and read, forward nothing.
    Blackhole,
    /// Close every connection, old and new.
    DropAll,
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted and forwarded (or blackholed).
    pub accepted: u64,
    /// Client connections closed right after accept (drop-all mode, or the
    /// upstream could not be reached).
    pub refused: u64,
    /// Client connections open now.
    pub open: u64,
    /// The most client connections ever open at once.
    pub peak_open: u64,
    /// Bytes forwarded client → upstream.
    pub to_upstream: u64,
    /// Bytes forwarded upstream → client.
    pub to_client: u64,
    /// Bytes read (either way) and thrown away in blackhole mode.
    pub discarded: u64,
    /// Connections closed in the middle of a reply chunk.
    pub cuts: u64,
    /// Chunks toward the client delivered twice.
    pub duplicated: u64,
}

/// Sticky value of `cut_remaining`: cut every chunk until healed.
const CUT_ALWAYS: u64 = u64::MAX;

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    discarded: AtomicU64,
    cuts: AtomicU64,
    duplicated: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    /// Chunks toward the client still to be cut ([`CUT_ALWAYS`]: all).
    cut_remaining: AtomicU64,
    /// Chunks toward the client still to be delivered twice.
    duplicate_remaining: AtomicU64,
    /// The tasks of open connections (finished ones are pruned on insert).
    connections: Mutex<Vec<AbortHandle>>,
    counters: Counters,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    fn delay(&self) -> Duration {
        *self.delay.lock().unwrap()
    }

    /// Whether the chunk about to be written must be cut (consumes one cut).
    fn take_cut(&self) -> bool {
        self.cut_remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                CUT_ALWAYS => Some(CUT_ALWAYS),
                n => Some(n - 1),
            })
            .is_ok()
    }

    /// Whether the chunk about to be written goes twice (consumes one).
    fn take_duplicate(&self) -> bool {
        self.duplicate_remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn abort_connections(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Controls a running [`FaultProxy`]; cheap to clone and to move into tasks.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl ProxyHandle {
    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A Redis URL pointing at the proxy: `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Holds every chunk toward the client for `latency` (on top of any
    /// other mode). Chunks already in flight keep the delay they got.
    pub fn delay(&self, latency: Duration) {
        *self.shared.delay.lock().unwrap() = latency;
    }

    /// Accepts and reads, answers nothing, forwards nothing.
    pub fn blackhole(&self) {
        *self.shared.mode.lock().unwrap() = Mode::Blackhole;
    }

    /// Closes every open connection now, and each new one as it is accepted,
    /// until [`ProxyHandle::heal`].
    pub fn drop_all(&self) {
        *self.shared.mode.lock().unwrap() = Mode::DropAll;
        self.shared.abort_connections();
    }

    /// Until healed: forward only the first half of each chunk toward the
    /// client, then close that connection.
    pub fn cut_mid_reply(&self) {
        self.shared
            .cut_remaining
            .store(CUT_ALWAYS, Ordering::SeqCst);
    }

    /// Like [`ProxyHandle::cut_mid_reply`], for the next `n` chunks only
    /// (replaces any pending count).
    pub fn cut_next_replies(&self, n: u64) {
        self.shared
            .cut_remaining
            .store(n.min(CUT_ALWAYS - 1), Ordering::SeqCst);
    }

    /// Delivers each of the next `n` chunks toward the client twice
    /// (replaces any pending count): a stale reply for whatever request is
    /// next in line on that connection.
    pub fn duplicate_next_replies(&self, n: u64) {
        self.shared.duplicate_remaining.store(n, Ordering::SeqCst);
    }

    /// Back to a plain pipe: forward both ways, no delay, no cuts, no duplicates.
    /// Connections that survived a blackhole stay open (and out of step).
    pub fn heal(&self) {
        *self.shared.mode.lock().unwrap() = Mode::Pass;
        *self.shared.delay.lock().unwrap() = Duration::ZERO;
        self.shared.cut_remaining.store(0, Ordering::SeqCst);
        self.shared.duplicate_remaining.store(0, Ordering::SeqCst);
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::SeqCst),
            refused: c.refused.load(Ordering::SeqCst),
            open: c.open.load(Ordering::SeqCst),
            peak_open: c.peak_open.load(Ordering::SeqCst),
            to_upstream: c.to_upstream.load(Ordering::SeqCst),
            to_client: c.to_client.load(Ordering::SeqCst),
            discarded: c.discarded.load(Ordering::SeqCst),
            cuts: c.cuts.load(Ordering::SeqCst),
            duplicated: c.duplicated.load(Ordering::SeqCst),
        }
    }
}

/// The running proxy; its tasks stop (and its sockets close) when dropped.
pub struct FaultProxy {
    handle: ProxyHandle,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (e.g. a `TestRedis` on
    /// `127.0.0.1:port`), passing traffic through until told otherwise.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(Mode::Pass),
            delay: Mutex::new(Duration::ZERO),
            cut_remaining: AtomicU64::new(0),
            duplicate_remaining: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultProxy {
            handle: ProxyHandle { shared, addr },
            accept_task,
        }
    }

    /// A proxy in front of `redis-server` on `127.0.0.1:port`.
    pub async fn for_port(port: u16) -> FaultProxy {
        FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    /// A handle to control the proxy from elsewhere (another task).
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl Deref for FaultProxy {
    type Target = ProxyHandle;

    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.handle.shared.abort_connections();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if shared.mode() == Mode::DropAll {
            shared.counters.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        shared.counters.accepted.fetch_add(1, Ordering::SeqCst);
        let open = shared.counters.open.fetch_add(1, Ordering::SeqCst) + 1;
        shared.counters.peak_open.fetch_max(open, Ordering::SeqCst);
        let guard = OpenGuard(shared.clone());
        let task = tokio::spawn(serve(client, shared.clone(), guard));
        let mut connections = shared.connections.lock().unwrap();
        connections.retain(|t| !t.is_finished());
        connections.push(task.abort_handle());
    }
}

/// Decrements the open-connection count however the task ends (abort too).
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.counters.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One client connection: runs until either side closes, a cut, or abort.
async fn serve(client: TcpStream, shared: Arc<Shared>, _open: OpenGuard) {
    let _ = client.set_nodelay(true);
    let upstream = match TcpStream::connect(shared.upstream).await {
        Ok(upstream) => upstream,
        Err(_) => {
            // Nothing to forward to: the client sees a closed connection.
            shared.counters.refused.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::select! {
        _ = to_upstream(client_read, upstream_write, &shared) => {}
        _ = to_client(upstream_read, client_write, &shared) => {}
    }
}

/// Client → upstream, undelayed; discarded while blackholed.
async fn to_upstream(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if shared.mode() == Mode::Blackhole {
            shared
                .counters
                .discarded
                .fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        shared
            .counters
            .to_upstream
            .fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// Upstream → client through a latency line: a reader stamps each chunk
/// with its due time, a writer sends it then (or cuts it, or drops it).
/// Ends when the writer ends: after the reader saw EOF and the line
/// drained, on a write error, or on a cut.
async fn to_client(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let (line_in, mut line_out) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if shared.mode() == Mode::Blackhole {
                shared
                    .counters
                    .discarded
                    .fetch_add(n as u64, Ordering::SeqCst);
                continue;
            }
            let due = Instant::now() + shared.delay();
            if line_in.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
        // Closing the line lets the writer drain it and finish.
        drop(line_in);
        std::future::pending::<()>().await;
    };
    let writer = async {
        while let Some((due, chunk)) = line_out.recv().await {
            tokio::time::sleep_until(due).await;
            if shared.mode() == Mode::Blackhole {
                shared
                    .counters
                    .discarded
                    .fetch_add(chunk.len() as u64, Ordering::SeqCst);
                continue;
            }
            if shared.take_cut() {
                let part = &chunk[..chunk.len() / 2];
                let _ = to.write_all(part).await;
                let _ = to.flush().await;
                shared
                    .counters
                    .to_client
                    .fetch_add(part.len() as u64, Ordering::SeqCst);
                shared.counters.cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            shared
                .counters
                .to_client
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if shared.take_duplicate() {
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
                shared.counters.duplicated.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

#[cfg(test)]
mod tests {
    //! The proxy itself, against a real Redis, with raw RESP.

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::{Instant, timeout};

    use super::{FaultProxy, Mode};
    use crate::redis_server::TestRedis;

    const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

    /// Sends PING, reads until "+PONG\r\n", EOF or `within`; returns what came.
    async fn ping(conn: &mut TcpStream, within: Duration) -> Vec<u8> {
        conn.write_all(PING).await.unwrap();
        let mut got = Vec::new();
        let _ = timeout(within, async {
            let mut buf = [0u8; 64];
            while !got.ends_with(b"\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        got
    }

    /// Whether the peer closed the connection within `within`.
    async fn closed(conn: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            timeout(within, conn.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_mode_does_what_it_says_and_heal_undoes_it() {
        let redis = TestRedis::start();
        let proxy = FaultProxy::for_port(redis.port()).await;
        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(ping(&mut conn, Duration::from_secs(10)).await, b"+PONG\r\n");

        // Delay: the answer comes, late.
        proxy.delay(Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(ping(&mut conn, Duration::from_secs(10)).await, b"+PONG\r\n");
        assert!(started.elapsed() >= Duration::from_millis(150));
        proxy.heal();

        // Blackhole: connect works, nothing answers, even on a new connection.
        proxy.blackhole();
        assert_eq!(proxy.mode(), Mode::Blackhole);
        assert!(ping(&mut conn, Duration::from_millis(200)).await.is_empty());
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            ping(&mut fresh, Duration::from_millis(200))
                .await
                .is_empty()
        );
        assert!(proxy.stats().discarded >= 2 * PING.len() as u64);
        proxy.heal();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            ping(&mut fresh, Duration::from_secs(10)).await,
            b"+PONG\r\n"
        );

        // Cut: half a reply, then the connection is closed; one cut only.
        proxy.cut_next_replies(1);
        assert_eq!(ping(&mut fresh, Duration::from_secs(10)).await, b"+PO");
        assert!(closed(&mut fresh, Duration::from_secs(10)).await);
        assert_eq!(proxy.stats().cuts, 1);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            ping(&mut fresh, Duration::from_secs(10)).await,
            b"+PONG\r\n"
        );

        // Duplicate: the next reply comes twice, so the PING after it reads
        // the stale copy; one duplicate only.
        proxy.duplicate_next_replies(1);
        fresh
            .write_all(b"*2\r\n$4\r\nECHO\r\n$1\r\na\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = timeout(Duration::from_secs(2), async {
            let mut buf = [0u8; 64];
            while got.len() < 2 * b"$1\r\na\r\n".len() {
                match fresh.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert_eq!(got, b"$1\r\na\r\n$1\r\na\r\n");
        assert_eq!(proxy.stats().duplicated, 1);
        assert_eq!(ping(&mut fresh, Duration::from_secs(2)).await, b"+PONG\r\n");

        // Drop all: open connections close, new ones are closed at once.
        let open_before = proxy.stats().open;
        assert!(open_before >= 1, "{:?}", proxy.stats());
        proxy.drop_all();
        assert!(closed(&mut fresh, Duration::from_secs(10)).await);
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(closed(&mut refused, Duration::from_secs(10)).await);
        assert!(proxy.stats().refused >= 1);
        crate::helpers::eventually(Duration::from_secs(10), || async {
            proxy.stats().open == 0
        })
        .await;

        proxy.heal();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            ping(&mut fresh, Duration::from_secs(10)).await,
            b"+PONG\r\n"
        );
        let stats = proxy.stats();
        assert!(stats.to_upstream > 0 && stats.to_client > 0, "{stats:?}");

        // Dropping the proxy closes what is still open.
        drop(proxy);
        assert!(closed(&mut fresh, Duration::from_secs(10)).await);
    }
}
