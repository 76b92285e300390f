//! A real, throwaway `redis-server` per test.
//!
//! [`TestRedis::start`] runs the project's own `redis.conf` (AOF with
//! `appendfsync always`, `noeviction`, renamed FLUSH*/KEYS…) on a free
//! loopback port, with its data and log in a fresh temporary directory, and
//! returns once the server answers `PING`. Dropping the handle SIGKILLs the
//! server and deletes the directory. Because the server is a real process,
//! tests can also crash it ([`TestRedis::kill9`]), bring it back on the same
//! port with its AOF ([`TestRedis::restart`]) or freeze it
//! ([`TestRedis::pause_ms`]) to see what the service does when Redis is slow.
//!
//! This module stands alone: it needs only `std`, `tempfile` and `libc`, and
//! speaks just enough RESP (over a plain `TcpStream`) to send one command and
//! read one reply, so tests can poke at the store without the service's own
//! Redis client.
//!
//! ```ignore
//! let redis = TestRedis::start();
//! assert_eq!(redis.cmd(&["SET", "k", "v"]), "+OK\r\n");
//! assert_eq!(redis.cmd(&["GET", "k"]), "$1\r\nv\r\n");
//! let app = spawn_app_with_redis_url(&redis.url());
//! ```
//!
//! Environment:
//! - `SESSIONGATE_REDIS_CONF`: the config file to run instead of the
//!   repository's `redis.conf` (useful when this file is reused elsewhere).
//! - `redis-server` must be on `PATH` (`scripts/test` installs it).
#![allow(dead_code)]

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to answer `PING` after it was spawned
/// (including loading its AOF after [`TestRedis::restart`]).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Read timeout of one [`TestRedis::cmd`] round trip.
const CMD_TIMEOUT: Duration = Duration::from_secs(5);
/// How many fresh ports [`TestRedis::start`] tries when another process
/// grabbed the chosen one between our probe and Redis's bind.
const PORT_ATTEMPTS: usize = 5;

/// A running `redis-server` owned by one test (or one test binary).
///
/// The server is SIGKILLed when the handle is dropped, and also when the
/// test process dies for any reason (it is spawned with
/// `PR_SET_PDEATHSIG = SIGKILL`), so a crashed test never leaves a
/// `redis-server` behind.
pub struct TestRedis {
    /// The server process; `None` after [`TestRedis::kill9`].
    child: Option<Child>,
    port: u16,
    /// Extra command-line arguments given to [`TestRedis::start_with`],
    /// repeated on [`TestRedis::restart`].
    extra_args: Vec<String>,
    /// Run a copy of the config in the data directory (see
    /// [`TestRedis::start_with_own_conf`]).
    own_conf: bool,
    /// Data directory (AOF), `redis.log` and `redis.stdout`; deleted on drop, after the
    /// server is killed (fields drop after `Drop::drop`).
    dir: tempfile::TempDir,
}

impl TestRedis {
    /// Starts the project's Redis on a free loopback port in a new temporary
    /// directory and waits until it answers `PING`.
    ///
    /// Panics (with the tail of the server's log) when `redis-server` cannot
    /// be run or is not ready within 30 s.
    pub fn start() -> TestRedis {
        TestRedis::start_with(&[])
    }

    /// Like [`TestRedis::start`], with extra `redis-server` arguments appended
    /// after the defaults, so they win: e.g. `&["--maxmemory", "1mb"]` or
    /// `&["--appendonly", "no"]`.
    ///
    /// The server runs `redis.conf --port P --dir D --daemonize no
    /// --logfile D/redis.log --save "" <extra_args…>`.
    pub fn start_with(extra_args: &[&str]) -> TestRedis {
        TestRedis::start_inner(extra_args, false)
    }

    /// Like [`TestRedis::start_with`], running a copy of the config file
    /// kept in the server's own directory: for servers something may
    /// `CONFIG REWRITE` (Sentinel does, when it reconfigures a node), which
    /// must never rewrite the repository's `redis.conf`.
    pub fn start_with_own_conf(extra_args: &[&str]) -> TestRedis {
        TestRedis::start_inner(extra_args, true)
    }

    fn start_inner(extra_args: &[&str], own_conf: bool) -> TestRedis {
        let dir = tempfile::Builder::new()
            .prefix("sessiongate-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut redis = TestRedis {
            child: None,
            port: 0,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            own_conf,
            dir,
        };
        if own_conf {
            fs::copy(config_path(), redis.dir.path().join("redis.conf"))
                .expect("copy the Redis config");
        }
        for _ in 0..PORT_ATTEMPTS {
            redis.port = free_port();
            redis.spawn();
            match redis.wait_ready() {
                Ok(()) => return redis,
                // Another process took the port between our probe and
                // Redis's bind: forget this attempt's log, try another port.
                Err(NotReady::Exited(_)) if redis.log_tail().contains("Address already in use") => {
                    let _ = fs::remove_file(redis.log_path());
                    let _ = fs::remove_file(redis.stdio_path());
                }
                Err(not_ready) => panic!("{}", redis.describe_failure(&not_ready)),
            }
        }
        panic!("redis-server found no free port in {PORT_ATTEMPTS} attempts")
    }

    /// Whether the server process runs (not [`TestRedis::kill9`]ed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL for `SESSIONGATE_REDIS_URL`: `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's process id, while it runs (for SIGSTOP / SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's data directory (holds `appendonlydir/` and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends one command on a fresh connection and returns the raw text of
    /// the first reply, exactly as Redis sent it: `"+OK\r\n"`, `":3\r\n"`,
    /// `"$1\r\nv\r\n"`, `"$-1\r\n"`, `"*2\r\n$1\r\na\r\n$1\r\nb\r\n"`,
    /// `"-ERR …\r\n"` (an error reply is returned, not a panic).
    ///
    /// Panics when the server cannot be reached or does not answer within
    /// 5 s; use [`TestRedis::try_cmd`] to observe that instead.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis command {args:?} on port {}: {e}", self.port))
    }

    /// Like [`TestRedis::cmd`], but returns connection errors and timeouts
    /// (e.g. while the server is killed or paused).
    pub fn try_cmd(&self, args: &[&str]) -> io::Result<String> {
        send_command(self.port, args, CMD_TIMEOUT)
    }

    /// SIGKILLs the server (no shutdown, no final fsync: a crash) and reaps
    /// it. Does nothing if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // kill() is SIGKILL on Unix; it fails only if the process was
            // already reaped, which cannot happen while we own `child`.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same directory (so
    /// it reloads its AOF) and the same arguments, and waits until it answers
    /// `PING` (a `-LOADING` reply counts as not ready yet). A server that is
    /// still running is SIGKILLed first, so this is "crash and come back".
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        if let Err(not_ready) = self.wait_ready() {
            panic!("{}", self.describe_failure(&not_ready));
        }
    }

    /// Makes the server stop answering every client (reads and writes) for
    /// `ms` milliseconds: `CLIENT PAUSE ms ALL`. Returns at once.
    pub fn pause_ms(&self, ms: u64) {
        let reply = self.cmd(&["CLIENT", "PAUSE", &ms.to_string(), "ALL"]);
        assert_eq!(reply, "+OK\r\n", "CLIENT PAUSE {ms} ALL");
    }

    /// The last lines of the server's log and of its stdout/stderr, for
    /// failure messages.
    pub fn log_tail(&self) -> String {
        let mut tail = last_lines(&self.log_path(), 30);
        let stdio = last_lines(&self.stdio_path(), 10);
        if !stdio.is_empty() {
            tail.push_str("\n--- stdout/stderr ---\n");
            tail.push_str(&stdio);
        }
        tail
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Where redis-server's stdout and stderr go (normally empty: it logs to
    /// `redis.log`; start-up errors land here).
    fn stdio_path(&self) -> PathBuf {
        self.dir.path().join("redis.stdout")
    }

    /// Spawns `redis-server` with this handle's port, directory and arguments.
    fn spawn(&mut self) {
        let conf = if self.own_conf {
            self.dir.path().join("redis.conf")
        } else {
            config_path()
        };
        assert!(
            conf.is_file(),
            "Redis config {} not found (set SESSIONGATE_REDIS_CONF to override)",
            conf.display()
        );
        let mut command = Command::new("redis-server");
        command
            .arg(&conf)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--daemonize")
            .arg("no")
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--save")
            .arg("")
            .args(&self.extra_args)
            .stdin(Stdio::null());
        // Redis reports a bad argument or config line on stderr before it
        // opens its log file: keep that in the directory too, for failures.
        let stdio = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stdio_path())
            .expect("create redis-server's output file");
        let stdio_err = stdio.try_clone().expect("clone a file handle");
        command.stdout(stdio).stderr(stdio_err);
        kill_with_parent(&mut command);
        let child = spawn_from_long_lived_thread(command).unwrap_or_else(|e| {
            panic!("cannot run redis-server (is it installed? scripts/test installs it): {e}")
        });
        self.child = Some(child);
    }

    /// Polls `PING` until the server answers `+PONG`, it exits, or
    /// [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self) -> Result<(), NotReady> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(NotReady::Exited(Some(status)));
                }
            } else {
                return Err(NotReady::Exited(None));
            }
            // "-LOADING …" while the AOF loads, a refused connection before
            // the listener is up: both mean "not yet".
            if let Ok(reply) = send_command(self.port, &["PING"], Duration::from_secs(1))
                && reply == "+PONG\r\n"
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NotReady::TimedOut);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn describe_failure(&self, not_ready: &NotReady) -> String {
        let what = match not_ready {
            NotReady::Exited(Some(status)) => format!("exited ({status})"),
            NotReady::Exited(None) => "exited".to_string(),
            NotReady::TimedOut => format!("did not answer PING within {READY_TIMEOUT:?}"),
        };
        format!(
            "redis-server on port {} {what}; log {}:\n{}",
            self.port,
            self.log_path().display(),
            self.log_tail()
        )
    }
}

impl Drop for TestRedis {
    /// SIGKILLs and reaps the server; the temporary directory goes next.
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Why a spawned server is not usable.
enum NotReady {
    /// The process ended (status, when we reaped it ourselves).
    Exited(Option<ExitStatus>),
    TimedOut,
}

/// The last `n` lines of a text file ("" when it cannot be read).
fn last_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `SESSIONGATE_REDIS_CONF` if set, else the repository's `redis.conf`.
fn config_path() -> PathBuf {
    std::env::var_os("SESSIONGATE_REDIS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/redis.conf")))
}

/// A loopback port that was free a moment ago: bind port 0, read the port
/// the kernel chose, release it. Another process may take it before Redis
/// binds; [`TestRedis::start_with`] retries on "Address already in use".
///
/// Never above 55535: a cluster-enabled `redis-server` also listens on its
/// port + 10000 (the cluster bus) and refuses to start on a higher port
/// ("port number too high"), which the kernel's ephemeral range (up to
/// 60999 by default) would otherwise hand out now and then.
pub fn free_port() -> u16 {
    const HIGHEST: u16 = 55_535;
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("bind 127.0.0.1:0 to find a free port");
        if port <= HIGHEST {
            return port;
        }
    }
}

/// Asks the kernel to SIGKILL the child when its parent thread dies, so a
/// test process that crashes or is killed takes its servers (Redis, the
/// gateways) with it.
pub fn kill_with_parent(command: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid); it allocates nothing
    // unless it fails, in which case the child exits before exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then the
            // signal will never come, so do not start at all.
            if libc::getppid() != parent {
                return Err(io::Error::other(
                    "the test exited before its server started",
                ));
            }
            Ok(())
        });
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from one thread that lives as long as the test process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not the process. libtest runs each test on its own thread, so a server
/// spawned directly from a test would be killed when that test's thread
/// ends, even if the handle lives on (a server shared by a whole test binary
/// through a `static`, or one started from a short-lived helper thread).
/// Spawning from this thread ties the server's life to the process instead.
pub fn spawn_from_long_lived_thread(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("test-redis-spawner".to_string())
            .spawn(move || {
                // Runs until the process exits: the sender lives in a static.
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the redis-server spawner thread");
        requests
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| io::Error::other("redis-server spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("redis-server spawner thread is gone"))?
}

/// Connects to 127.0.0.1:`port`, sends `args` as one RESP array and returns
/// the first reply's raw bytes as text.
pub fn send_command(port: u16, args: &[&str], timeout: Duration) -> io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;

    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;

    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    read_reply(&mut reader, &mut raw)?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// Reads one complete RESP2/RESP3 reply (nested aggregates included) from
/// `reader`, appending its raw bytes to `raw`.
fn read_reply(reader: &mut impl BufRead, raw: &mut Vec<u8>) -> io::Result<()> {
    let start = raw.len();
    reader.read_until(b'\n', raw)?;
    let line = &raw[start..];
    if !line.ends_with(b"\r\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a reply",
        ));
    }
    let kind = line[0];
    let header = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let count = || -> io::Result<i64> {
        header.parse::<i64>().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad length {header:?}"))
        })
    };
    match kind {
        // Simple string, error, integer; RESP3 null, double, boolean, big number.
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(()),
        // Bulk string; RESP3 bulk error and verbatim string. -1 is null.
        b'$' | b'!' | b'=' => {
            let len = count()?;
            if len >= 0 {
                let mut body = vec![0; len as usize + 2];
                io::Read::read_exact(reader, &mut body)?;
                raw.extend_from_slice(&body);
            }
            Ok(())
        }
        // Array; RESP3 set and push. -1 is null.
        b'*' | b'~' | b'>' => {
            for _ in 0..count()?.max(0) {
                read_reply(reader, raw)?;
            }
            Ok(())
        }
        // RESP3 map (key, value pairs); an attribute is followed by the reply it annotates.
        b'%' | b'|' => {
            for _ in 0..2 * count()?.max(0) {
                read_reply(reader, raw)?;
            }
            if kind == b'|' {
                read_reply(reader, raw)?;
            }
            Ok(())
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown RESP type byte {:?}", other as char),
        )),
    }
}
