//! One behaviour suite, every Redis topology.
//!
//! A [`Topo`] is what a behaviour test runs against: a Redis deployment
//! (standalone, Cluster, Sentinel) shared by every test of the binary that
//! uses that topology, plus a key prefix of the test's own, so tests share
//! the servers (start-up costs seconds on CI's 2 cores) but never each
//! other's keys, global state, logout-all epoch or events channel.
//!
//! A test is an ordinary `async fn name(t: Topo)`; [`on_every_topology!`]
//! turns a list of them into `name::standalone`, `name::cluster` and
//! `name::sentinel` tests (filter with `cargo test --test api ::cluster`).
//! Inside, `t.app(&[])` starts a sessiongate on the topology (with setting
//! overrides as for `spawn_app_with`), `t.app(..)` again starts a second
//! instance on the same keys, and `t.cmd(key, args)` sends a raw command to
//! the primary holding `key` (following `MOVED` in a Cluster).
//!
//! The shared servers live until the test binary exits (an `atexit` hook
//! kills them and removes their directories; `PR_SET_PDEATHSIG` kills them
//! if the process dies any other way). Tests that fault the servers (kill,
//! pause, partition) must not use a shared topology: they start their own
//! ([`TestCluster::start`]).

#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use crate::helpers::{TestApp, spawn_app_on};
use crate::redis_server::TestRedis;
use crate::sentinel::SentinelTopology;

/// Which deployment a [`Topo`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Standalone,
    Cluster,
    Sentinel,
}

/// A Redis Cluster of `primaries` primaries, each with `replicas` replicas,
/// on loopback, every slot assigned.
pub struct TestCluster {
    pub nodes: Vec<TestRedis>,
    pub node_timeout_ms: u64,
}

impl TestCluster {
    /// Starts the nodes and `redis-cli --cluster create`s them; returns
    /// once every node reports `cluster_state:ok` and every replica is in
    /// sync with its primary.
    pub fn start(primaries: usize, replicas: usize, node_timeout_ms: u64) -> TestCluster {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<TestRedis> = (0..primaries * (1 + replicas))
            .map(|_| {
                TestRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = TestCluster {
            nodes,
            node_timeout_ms,
        };
        cluster.wait_healthy(Duration::from_secs(60));
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and every
    /// replica's link to its primary is up.
    pub fn wait_healthy(&self, within: Duration) {
        let started = Instant::now();
        loop {
            let healthy = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                let info = n.try_cmd(&["CLUSTER", "INFO"]).unwrap_or_default();
                let repl = n.try_cmd(&["INFO", "replication"]).unwrap_or_default();
                info.contains("cluster_state:ok")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
            if healthy {
                return;
            }
            assert!(
                started.elapsed() < within,
                "cluster not healthy within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `SESSIONGATE_REDIS_CLUSTER_NODES`: every node, as seeds.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url().trim_end_matches("/0").to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node on this port.
    pub fn node(&self, port: u16) -> Option<&TestRedis> {
        self.nodes.iter().find(|n| n.port() == port)
    }

    /// The running nodes that are primaries now.
    pub fn primaries(&self) -> Vec<&TestRedis> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .filter(|n| {
                n.try_cmd(&["INFO", "replication"])
                    .is_ok_and(|r| r.contains("role:master"))
            })
            .collect()
    }

    /// The primary that owns `key`'s slot now, as the cluster says
    /// (`CLUSTER KEYSLOT`, then `CLUSTER NODES` of a live node); waits up to
    /// 30 s while no live primary owns it (a failover in progress).
    pub fn primary_of(&self, key: &str) -> &TestRedis {
        let started = Instant::now();
        loop {
            if let Some(owner) = self.owner_of(key) {
                return owner;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no live primary owns {key:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn owner_of(&self, key: &str) -> Option<&TestRedis> {
        let asked = self.nodes.iter().find(|n| n.is_running())?;
        let slot: u16 = asked
            .try_cmd(&["CLUSTER", "KEYSLOT", key])
            .ok()?
            .trim()
            .strip_prefix(':')?
            .parse()
            .ok()?;
        let nodes = asked.try_cmd(&["CLUSTER", "NODES"]).ok()?;
        nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                return None;
            }
            let owns = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
            });
            let port: u16 = fields[1].split(['@', ',']).next()?.rsplit_once(':')?.1.parse().ok()?;
            owns.then(|| self.node(port)).flatten().filter(|n| n.is_running())
        })
    }

    /// A command to the primary holding `key`, following `MOVED` (and
    /// retrying through `ASK` and failovers for up to 30 s).
    pub fn cmd(&self, key: &str, args: &[&str]) -> String {
        let started = Instant::now();
        let mut node = self.primary_of(key);
        loop {
            let reply = node
                .try_cmd(args)
                .unwrap_or_else(|e| format!("-IO {e}\r\n"));
            let moved = reply
                .strip_prefix("-MOVED ")
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|addr| addr.rsplit_once(':'))
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .and_then(|port| self.node(port));
            match moved {
                Some(next) => node = next,
                None if reply.starts_with("-ASK")
                    || reply.starts_with("-IO")
                    || reply.starts_with("-TRYAGAIN")
                    || reply.starts_with("-CLUSTERDOWN") =>
                {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "{args:?} on {key:?}: {reply}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                    node = self.primary_of(key);
                }
                None => return reply,
            }
        }
    }
}

/// The deployments shared by the behaviour suite, started on first use.
static STANDALONE: Mutex<Option<Arc<TestRedis>>> = Mutex::new(None);
static CLUSTER: Mutex<Option<Arc<TestCluster>>> = Mutex::new(None);
static SENTINEL: Mutex<Option<Arc<SentinelTopology>>> = Mutex::new(None);
static CLEANUP: Once = Once::new();

extern "C" fn stop_shared_topologies() {
    // At exit every test is over: these are the last handles, so dropping
    // them kills the servers and deletes their directories.
    if let Ok(mut s) = STANDALONE.lock() {
        s.take();
    }
    if let Ok(mut c) = CLUSTER.lock() {
        c.take();
    }
    if let Ok(mut s) = SENTINEL.lock() {
        s.take();
    }
}

fn shared<T>(slot: &Mutex<Option<Arc<T>>>, start: impl FnOnce() -> T) -> Arc<T> {
    CLEANUP.call_once(|| unsafe {
        libc::atexit(stop_shared_topologies);
    });
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    guard.get_or_insert_with(|| Arc::new(start())).clone()
}

/// A unique key prefix per test (the shared servers belong to this process).
fn fresh_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("t{}:", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[derive(Clone)]
enum Backend {
    Standalone(Arc<TestRedis>),
    Cluster(Arc<TestCluster>),
    Sentinel(Arc<SentinelTopology>),
}

/// One test's view of a shared topology: its servers and its own prefix.
#[derive(Clone)]
pub struct Topo {
    pub kind: Kind,
    backend: Backend,
    prefix: String,
}

impl Topo {
    /// One Redis (the project's `redis.conf`).
    pub fn standalone() -> Topo {
        Topo {
            kind: Kind::Standalone,
            backend: Backend::Standalone(shared(&STANDALONE, TestRedis::start)),
            prefix: fresh_prefix(),
        }
    }

    /// Three primaries. No replicas: the behaviour suite is about routing
    /// every operation by slot; replicas and failover are the fault tests'
    /// (tests/api/cluster.rs), on clusters of their own.
    pub fn cluster() -> Topo {
        Topo {
            kind: Kind::Cluster,
            backend: Backend::Cluster(shared(&CLUSTER, || TestCluster::start(3, 0, 5000))),
            prefix: fresh_prefix(),
        }
    }

    /// One primary, two replicas, three sentinels (tests/api/sentinel.rs).
    pub fn sentinel() -> Topo {
        Topo {
            kind: Kind::Sentinel,
            backend: Backend::Sentinel(shared(&SENTINEL, SentinelTopology::start)),
            prefix: fresh_prefix(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Standalone => "standalone",
            Kind::Cluster => "cluster",
            Kind::Sentinel => "sentinel",
        }
    }

    /// This test's key prefix (`SESSIONGATE_KEY_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key of this test: the prefix, then `suffix` (e.g. `"global"`).
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// The hash holding a session's user (from its id's 22-character tag).
    pub fn hash_of(&self, session_id: &str) -> String {
        format!("{}u{{{}}}", self.prefix, &session_id[..22])
    }

    /// The settings that point a sessiongate at this topology and prefix.
    fn env(&self) -> (String, Vec<(&'static str, String)>) {
        let mut env = vec![("KEY_PREFIX", self.prefix.clone())];
        let url = match &self.backend {
            Backend::Standalone(redis) => redis.url(),
            Backend::Cluster(cluster) => {
                env.push(("REDIS_CLUSTER_NODES", cluster.seeds()));
                // Cluster mode refuses a REDIS_URL beside it.
                String::new()
            }
            Backend::Sentinel(sentinel) => {
                env.extend(sentinel.settings());
                // As the README recommends with replicas: every
                // acknowledged change is on a replica too.
                env.push(("REDIS_MIN_REPLICAS_ACK", "1".to_string()));
                // REDIS_URL is dropped by test_settings in Sentinel mode.
                String::new()
            }
        };
        (url, env)
    }

    /// The `SESSIONGATE_*` variables for this topology and prefix (for a
    /// `sessiongate` command run by a test).
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let (url, env) = self.env();
        std::iter::once(("REDIS_URL", url))
            .filter(|(_, url)| !url.is_empty())
            .chain(env)
            .map(|(k, v)| (format!("SESSIONGATE_{k}"), v))
            .collect()
    }

    /// A sessiongate on this topology and prefix; `overrides` as for
    /// `spawn_app_with` (they win over the topology's own settings). Call
    /// again for another instance sharing the same state.
    pub async fn app(&self, overrides: &[(&str, &str)]) -> TestApp {
        let (url, env) = self.env();
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(overrides);
        spawn_app_on(&url, &all).await
    }

    /// A raw command to the primary holding `key` (raw RESP reply text, as
    /// `TestRedis::cmd`).
    pub fn cmd(&self, key: &str, args: &[&str]) -> String {
        match &self.backend {
            Backend::Standalone(redis) => redis.cmd(args),
            Backend::Cluster(cluster) => cluster.cmd(key, args),
            Backend::Sentinel(sentinel) => sentinel.primary().cmd(args),
        }
    }

    /// Subscribers of this test's events channel, on every node (a Cluster
    /// node counts only its own clients' subscriptions).
    pub fn event_subscribers(&self) -> u64 {
        let channel = self.key("events");
        let nodes: Vec<&TestRedis> = match &self.backend {
            Backend::Standalone(redis) => vec![redis],
            Backend::Cluster(cluster) => cluster.nodes.iter().filter(|n| n.is_running()).collect(),
            Backend::Sentinel(sentinel) => std::iter::once(sentinel.primary())
                .chain(sentinel.replicas())
                .collect(),
        };
        nodes
            .iter()
            .map(|n| {
                // "*2\r\n$len\r\nchannel\r\n:N\r\n"
                let reply = n.cmd(&["PUBSUB", "NUMSUB", &channel]);
                reply
                    .split("\r\n")
                    .find_map(|l| l.strip_prefix(':'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Every key of this test's user hashes, on every primary.
    pub fn user_keys(&self) -> Vec<String> {
        let pattern = format!("{}u*", self.prefix);
        let nodes: Vec<&TestRedis> = match &self.backend {
            Backend::Standalone(redis) => vec![redis],
            Backend::Cluster(cluster) => cluster.primaries(),
            Backend::Sentinel(sentinel) => vec![sentinel.primary()],
        };
        let mut keys = Vec::new();
        for node in nodes {
            let mut cursor = "0".to_string();
            loop {
                let reply = node.cmd(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"]);
                let lines: Vec<&str> = reply.split("\r\n").collect();
                // *2, $n, cursor, *k, then $len / key pairs.
                cursor = lines[2].to_string();
                keys.extend(
                    lines[4..]
                        .iter()
                        .filter(|l| !l.starts_with('$') && !l.is_empty())
                        .map(|k| k.to_string()),
                );
                if cursor == "0" {
                    break;
                }
            }
        }
        keys
    }
}

/// Generates, for each `async fn name(t: Topo)` listed, a module `name`
/// with one `#[tokio::test]` per topology: `name::standalone`,
/// `name::cluster`, `name::sentinel`. Each runs the same body.
#[macro_export]
macro_rules! on_every_topology {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn standalone() {
                    super::$name($crate::topology::Topo::standalone()).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() {
                    super::$name($crate::topology::Topo::cluster()).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sentinel() {
                    super::$name($crate::topology::Topo::sentinel()).await
                }
            }
        )+
    };
}
