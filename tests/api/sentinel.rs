//! A throwaway Redis Sentinel deployment for tests: one primary, two
//! replicas (the project's `redis.conf`, via [`TestRedis`]) and three
//! sentinels (`redis-server sentinel.conf --sentinel`), all on loopback
//! with their data in temporary directories, all SIGKILLed when the handle
//! drops (or the test process dies).
//!
//! ```ignore
//! let topo = SentinelTopology::start();
//! let app = topo.spawn_app(&[("REDIS_MIN_REPLICAS_ACK", "1")]).await;
//! let old = topo.kill9_primary();
//! let new = topo.wait_for_promotion(old, Duration::from_secs(30));
//! ```
//!
//! The sentinels declare a primary down after 1 s
//! ([`DOWN_AFTER_MS`]), so a kill -9 is followed by a promotion within
//! about 2 s. [`SentinelTopology::settings`] gives the `SESSIONGATE_*`
//! overrides (without the prefix) for `spawn_app_on` / `test_settings`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{TestApp, spawn_app_on};
use crate::redis_server::{
    TestRedis, free_port, kill_with_parent, send_command, spawn_from_long_lived_thread,
};

/// The master name the sentinels monitor.
pub const MASTER: &str = "sessiongate";
/// Sentinels' `down-after-milliseconds`.
pub const DOWN_AFTER_MS: u64 = 1000;
/// Generous bound on every wait of this module.
const SETTLE: Duration = Duration::from_secs(30);

/// One sentinel process.
struct Sentinel {
    child: Child,
    port: u16,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One primary, two replicas and three sentinels.
pub struct SentinelTopology {
    /// Sentinels first, so they drop (stop failing over) before the nodes.
    sentinels: Vec<Sentinel>,
    /// The data nodes; index 0 was the first primary.
    nodes: Vec<TestRedis>,
    dir: tempfile::TempDir,
}

/// The text items of a RESP reply (arrays flattened; `$`/`*` headers
/// dropped), enough for the flat replies used here.
fn items(reply: &str) -> Vec<String> {
    reply
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with('$'))
        .map(|l| l.trim_start_matches([':', '+']).to_string())
        .collect()
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl SentinelTopology {
    /// Starts everything and returns once both replicas are in sync and
    /// every sentinel sees both replicas and the two other sentinels (so a
    /// failover can be agreed on at once). Blocking; a few seconds.
    pub fn start() -> SentinelTopology {
        let fast_sync = ["--repl-diskless-sync-delay", "0"];
        let primary = TestRedis::start_with_own_conf(&fast_sync);
        let port = primary.port().to_string();
        let mut nodes = vec![primary];
        for _ in 0..2 {
            nodes.push(TestRedis::start_with_own_conf(&[
                fast_sync[0],
                fast_sync[1],
                "--replicaof",
                "127.0.0.1",
                &port,
            ]));
        }
        let mut topo = SentinelTopology {
            sentinels: Vec::new(),
            nodes,
            dir: tempfile::Builder::new()
                .prefix("sessiongate-sentinel-")
                .tempdir()
                .expect("a temporary directory"),
        };
        topo.wait_replicas_online(2);
        let primary_port = topo.nodes[0].port();
        for i in 0..3 {
            let sentinel = topo.spawn_sentinel(i, primary_port);
            topo.sentinels.push(sentinel);
        }
        topo.wait_sentinels_agree();
        topo
    }

    fn spawn_sentinel(&self, i: usize, primary_port: u16) -> Sentinel {
        let dir = self.dir.path().join(format!("sentinel-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {port}\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                 sentinel resolve-hostnames no\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {MASTER} 5000\n\
                 sentinel parallel-syncs {MASTER} 2\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let mut command = Command::new("redis-server");
        command
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        kill_with_parent(&mut command);
        let child = spawn_from_long_lived_thread(command).expect("redis-server --sentinel runs");
        wait_until("a sentinel answering PING", SETTLE, || {
            send_command(port, &["PING"], Duration::from_secs(1)).is_ok_and(|r| r == "+PONG\r\n")
        });
        Sentinel { child, port }
    }

    fn sentinel_cmd(&self, i: usize, args: &[&str]) -> Option<String> {
        send_command(self.sentinels[i].port, args, Duration::from_secs(2)).ok()
    }

    /// The `SENTINEL MASTER` fields one sentinel reports.
    fn master_fields(&self, i: usize) -> Vec<String> {
        self.sentinel_cmd(i, &["SENTINEL", "MASTER", MASTER])
            .map(|r| items(&r))
            .unwrap_or_default()
    }

    fn field(fields: &[String], name: &str) -> Option<String> {
        fields
            .iter()
            .position(|f| f == name)
            .and_then(|i| fields.get(i + 1).cloned())
    }

    fn wait_sentinels_agree(&self) {
        wait_until(
            "every sentinel seeing 2 replicas and 2 other sentinels",
            SETTLE,
            || {
                (0..self.sentinels.len()).all(|i| {
                    let f = self.master_fields(i);
                    Self::field(&f, "num-slaves").as_deref() == Some("2")
                        && Self::field(&f, "num-other-sentinels").as_deref() == Some("2")
                })
            },
        );
    }

    /// Waits until the current primary reports `n` replicas online.
    pub fn wait_replicas_online(&self, n: usize) {
        wait_until("replicas online", SETTLE, || {
            let Some(primary) = self.nodes.iter().find(|r| is_primary(r)) else {
                return false;
            };
            primary
                .try_cmd(&["INFO", "replication"])
                .is_ok_and(|info| info.matches("state=online").count() >= n)
        });
    }

    /// The overrides (no `SESSIONGATE_` prefix) selecting this
    /// deployment.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("REDIS_SENTINELS", self.sentinel_urls()),
            ("REDIS_SENTINEL_MASTER", MASTER.to_string()),
        ]
    }

    /// The sentinels, as `SESSIONGATE_REDIS_SENTINELS` wants them.
    pub fn sentinel_urls(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A sessiongate in Sentinel mode on this deployment, with `overrides`.
    pub async fn spawn_app(&self, overrides: &[(&str, &str)]) -> TestApp {
        let settings = self.settings();
        let mut all: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(overrides);
        // REDIS_URL is dropped by test_settings in Sentinel mode.
        spawn_app_on("", &all).await
    }

    /// The primary's port as the first sentinel that answers names it.
    pub fn primary_port(&self) -> u16 {
        (0..self.sentinels.len())
            .find_map(|i| {
                let reply =
                    self.sentinel_cmd(i, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])?;
                items(&reply).get(1)?.parse().ok()
            })
            .expect("a sentinel names the primary")
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> &TestRedis {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .expect("a node on that port")
    }

    pub fn node_mut(&mut self, port: u16) -> &mut TestRedis {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .expect("a node on that port")
    }

    /// The current primary (per the sentinels).
    pub fn primary(&self) -> &TestRedis {
        self.node(self.primary_port())
    }

    /// The data nodes that are not the current primary.
    pub fn replicas(&self) -> Vec<&TestRedis> {
        let primary = self.primary_port();
        self.nodes.iter().filter(|n| n.port() != primary).collect()
    }

    /// SIGKILLs the current primary (a crash: no shutdown, no final
    /// fsync) and returns its port.
    pub fn kill9_primary(&mut self) -> u16 {
        let port = self.primary_port();
        self.node_mut(port).kill9();
        port
    }

    /// Waits until every sentinel names a primary other than `old` and that
    /// node says it is one (`ROLE`); returns its port.
    pub fn wait_for_promotion(&self, old: u16, within: Duration) -> u16 {
        let mut new = 0;
        wait_until("a promotion", within, || {
            let named: Vec<Option<u16>> = (0..self.sentinels.len())
                .map(|i| {
                    let reply =
                        self.sentinel_cmd(i, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])?;
                    items(&reply).get(1)?.parse().ok()
                })
                .collect();
            match named.first() {
                Some(Some(p)) if *p != old && named.iter().all(|n| *n == Some(*p)) => {
                    new = *p;
                    is_primary(self.node(*p))
                }
                _ => false,
            }
        });
        new
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) a data node's process.
    pub fn freeze(&self, port: u16, frozen: bool) {
        freeze(self.node(port), frozen)
    }

    /// Where the sentinels' configs and logs are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether a node answers `ROLE` as a primary.
pub fn is_primary(node: &TestRedis) -> bool {
    node.try_cmd(&["ROLE"])
        .is_ok_and(|r| items(&r).first().map(String::as_str) == Some("master"))
}

/// SIGSTOPs (`frozen`) or SIGCONTs any test Redis.
pub fn freeze(node: &TestRedis, frozen: bool) {
    let pid = node.pid().expect("the node runs") as libc::pid_t;
    let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
    // SAFETY: kill(2) on a child process we own.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}
