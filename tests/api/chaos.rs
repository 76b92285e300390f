//! Chaos: the network to Redis and Redis itself misbehave while clients keep
//! calling. Each test checks what a client sees (status, error code,
//! identity headers), that every answer is bounded in time and that
//! connections do not pile up, and that the service recovers on its own
//! (no restart of the service).
//!
//! Network faults go through [`FaultProxy`] (between the service and a real
//! `redis-server`); Redis faults (LOADING, maxmemory, refused writes, ACLs,
//! CLIENT PAUSE) are made on the real server behind the proxy.
//! Distinct from `faults.rs` (one client; kill, pause, data loss).

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::fault_proxy::FaultProxy;
use crate::helpers::{
    Created, FAST_REDIS_TIMEOUT, TestApp, assert_error, eventually, spawn_app_on,
};
use crate::redis_server::TestRedis;

/// The rig runs a 1 s REDIS_TIMEOUT (`FAST_REDIS_TIMEOUT`); every answer
/// must come within this: the timeout plus what a loaded machine adds (a CPU
/// hog, a fault proxy and 100 concurrent requests). Faults that could make
/// an answer wait for Redis last at least twice as long (or forever), so
/// waiting is still told apart from a prompt 503.
const BOUND: Duration = Duration::from_secs(3);
/// A request still unanswered after this is a hang (the client's own
/// timeout is 10 s; this fails sooner and says so).
const HANG: Duration = Duration::from_secs(8);
/// Recovery on its own once the fault is gone: within this.
const RECOVERY: Duration = Duration::from_secs(20);

/// A real Redis, a proxy in front of it, and the service on the proxy.
struct Rig {
    app: TestApp,
    proxy: FaultProxy,
    redis: TestRedis,
}

async fn rig_with(redis: TestRedis, overrides: &[(&str, &str)]) -> Rig {
    let proxy = FaultProxy::for_port(redis.port()).await;
    // The timeout under test; an override given here wins.
    let mut settings = vec![("REDIS_TIMEOUT", FAST_REDIS_TIMEOUT)];
    settings.extend_from_slice(overrides);
    let app = spawn_app_on(&proxy.url(), &settings).await;
    Rig { app, proxy, redis }
}

async fn rig() -> Rig {
    rig_with(TestRedis::start(), &[]).await
}

/// `n` sessions of `n` distinct users, created 16 at a time (setup: not
/// a load test of creates).
async fn sessions(app: &TestApp, prefix: &str, n: usize) -> Vec<Created> {
    let mut all = Vec::with_capacity(n);
    for start in (0..n).step_by(16) {
        all.extend(
            join_all((start..n.min(start + 16)).map(|i| async move {
                let (user, device) = (format!("{prefix}-user-{i}"), format!("dev-{i}"));
                app.create(&user, &device).await
            }))
            .await,
        );
    }
    all
}

/// One verify as a gateway would send it, bounded by [`HANG`]. Checks what
/// must hold whatever the fault: a 200 names exactly the session of the
/// token sent; a 503 is `store_unavailable` with `Retry-After`. Returns the
/// status and how long the answer took.
async fn probe(app: &TestApp, s: &Created) -> (StatusCode, Duration) {
    let started = Instant::now();
    let res = tokio::time::timeout(
        HANG,
        app.request(Method::GET, "/v1/verify")
            .bearer_auth(&s.token)
            .send(),
    )
    .await
    .unwrap_or_else(|_| panic!("verify of {} hung for {HANG:?}", s.user_id))
    .expect("the service answers");
    let status = res.status();
    match status {
        StatusCode::OK => {
            let header = |name: &str| {
                res.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("<missing>")
                    .to_string()
            };
            let seen = (
                header("x-session-user"),
                header("x-session-id"),
                header("x-session-device"),
            );
            let sent = (s.user_id.clone(), s.session_id.clone(), s.device_id.clone());
            assert_eq!(seen, sent, "a 200 naming another session than the token's");
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            assert!(
                res.headers().get("retry-after").is_some(),
                "503 without Retry-After"
            );
            let body: Value = res.json().await.expect("a JSON error body");
            assert_eq!(body["error"], "store_unavailable", "{body}");
        }
        _ => {}
    }
    (status, started.elapsed())
}

async fn get_status(app: &TestApp, path: &str) -> StatusCode {
    app.request(Method::GET, path)
        .send()
        .await
        .unwrap()
        .status()
}

/// The value of `field` in `INFO <section>`.
fn info(redis: &TestRedis, section: &str, field: &str) -> String {
    let text = redis.cmd(&["INFO", section]);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}: {text}"))
        .trim()
        .to_string()
}

/// Writes `count` keys `prefix:i` of `value_len` bytes with pipelined SETs
/// on one raw connection (batches of 1000), checking every reply.
fn fill(port: u16, prefix: &str, count: usize, value_len: usize) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to Redis");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut replies = BufReader::new(stream.try_clone().unwrap());
    let value = "v".repeat(value_len);
    let mut next = 0;
    while next < count {
        let end = (next + 1000).min(count);
        let mut batch = Vec::new();
        for i in next..end {
            let key = format!("{prefix}:{i}");
            batch.extend_from_slice(
                format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                    key.len(),
                    value.len()
                )
                .as_bytes(),
            );
        }
        stream.write_all(&batch).unwrap();
        for _ in next..end {
            let mut line = String::new();
            replies.read_line(&mut line).unwrap();
            assert_eq!(line, "+OK\r\n", "SET while filling");
        }
        next = end;
    }
}

/// The first line of Redis's answer to PING on a fresh connection
/// ("+PONG", "-LOADING ..."), or `None` when it cannot be reached in time.
async fn raw_ping(port: u16) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let attempt = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        conn.write_all(b"*1\r\n$4\r\nPING\r\n").await.ok()?;
        let mut line = String::new();
        tokio::io::BufReader::new(conn)
            .read_line(&mut line)
            .await
            .ok()?;
        Some(line.trim_end().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// Makes Redis full under `noeviction`: maxmemory just above what it uses,
/// then big values until a write is refused with OOM; then maxmemory 512 KiB
/// under what it uses, so that memory Redis gives back later (it shrinks
/// idle client buffers by ~60 KiB within a few hundred ms) cannot make room
/// again and make the test flaky.
fn fill_to_the_limit(redis: &TestRedis) {
    let used: u64 = info(redis, "memory", "used_memory").parse().unwrap();
    let limit = (used + 256 * 1024).to_string();
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "maxmemory", &limit]),
        "+OK\r\n"
    );
    let value = "m".repeat(32 * 1024);
    let full = (0..200).any(|i| {
        redis
            .cmd(&["SET", &format!("ballast:{i}"), &value])
            .starts_with("-OOM")
    });
    assert!(full, "Redis never reported OOM");
    let used: u64 = info(redis, "memory", "used_memory").parse().unwrap();
    let limit = (used - 512 * 1024).to_string();
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "maxmemory", &limit]),
        "+OK\r\n"
    );
    assert!(redis.cmd(&["SET", "probe", "x"]).starts_with("-OOM"));
}

/// `/readyz` must say the store is not usable: why (Redis's words) to an
/// admin-key caller only, a generic reason to anyone else.
async fn assert_not_ready(app: &TestApp, case: &str, why: &str) {
    let res = app.admin(Method::GET, "/readyz").send().await.unwrap();
    let body = assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(why), "{case}: /readyz said {message:?}");
    let res = app.request(Method::GET, "/readyz").send().await.unwrap();
    let body = assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert_eq!(
        body["message"], "not ready: the session store is unavailable",
        "{case}: anonymous /readyz"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_redis_gives_bounded_503s_under_concurrency_and_heals() {
    let Rig { app, proxy, redis } = rig().await;
    let live = sessions(&app, "bh", 50).await;
    // Revoked sessions too: after the heal, a reply meant for one of them
    // must never make a live token look revoked (or the reverse).
    let gone = sessions(&app, "bh-gone", 10).await;
    for s in &gone {
        assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(probe(&app, &live[0]).await.0, StatusCode::OK);

    let before = proxy.stats();
    proxy.blackhole();
    for s in &live[..3] {
        let (status, took) = probe(&app, s).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(took < BOUND, "503 took {took:?}");
    }
    let started = Instant::now();
    let answers = join_all(live.iter().map(|s| probe(&app, s))).await;
    let total = started.elapsed();
    for (status, took) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{answers:?}");
        assert!(*took < BOUND, "an answer took {took:?}");
    }
    // Concurrent, not one after the other (50 x 1 s would be 50 s).
    assert!(total < 2 * BOUND, "50 verifies took {total:?}");
    eventually(Duration::from_secs(10), || async {
        proxy.stats().discarded > before.discarded
    })
    .await;
    let during = proxy.stats();
    assert!(
        during.peak_open <= 16,
        "connections pile up during the blackhole: {before:?} -> {during:?}"
    );
    let res = app.create_raw(json!({"user_id": "bh-new"})).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;

    // Heal. Connections that lived through the blackhole lost requests, so
    // replies on them are out of step: whatever the service does about it,
    // a live token is never refused as revoked, a revoked one never
    // accepted, and a 200 always names the token's own session.
    // Rounds go on for at least 1.2 s, and until one round verifies every
    // live session (within RECOVERY).
    proxy.heal();
    let healed = Instant::now();
    let mut seen = Vec::new();
    let app = &app;
    loop {
        let mut all_live_ok = true;
        let answers = join_all(
            live.iter()
                .map(|s| (s, true))
                .chain(gone.iter().map(|s| (s, false)))
                .map(|(s, alive)| async move { (alive, probe(app, s).await) }),
        )
        .await;
        for (alive, (status, took)) in answers {
            assert!(took < BOUND, "an answer took {took:?} after the heal");
            if alive {
                assert!(
                    [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
                    "a live session answered {status} after the heal"
                );
                all_live_ok &= status == StatusCode::OK;
            } else {
                assert!(
                    [StatusCode::UNAUTHORIZED, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
                    "a revoked session answered {status} after the heal"
                );
            }
            seen.push(status);
        }
        if all_live_ok && healed.elapsed() >= Duration::from_millis(1200) {
            break;
        }
        assert!(
            healed.elapsed() < RECOVERY,
            "live sessions still refused {RECOVERY:?} after the heal: {seen:?}"
        );
    }
    drop(redis);
}

/// While connecting hangs (blackhole: the TCP connect succeeds, the
/// handshake is never answered), requests that find no connection must not
/// each open one: the store promises "one opening at a time, so an outage
/// does not cause a connection storm". 20 verifies arrive 10 ms apart; the
/// cached state is allowed to be 10 s old here, so verify keeps asking Redis
/// throughout (a stale state would refuse without asking, and hide a
/// storm); one shared attempt per REDIS_TIMEOUT would be ~2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_does_not_cause_a_connection_storm() {
    let Rig { app, proxy, redis } =
        rig_with(TestRedis::start(), &[("STATE_MAX_STALENESS", "10s")]).await;
    let all = sessions(&app, "storm", 20).await;
    assert_eq!(probe(&app, &all[0]).await.0, StatusCode::OK);
    proxy.blackhole();
    // The first timeout drops the service's connection.
    assert_eq!(
        probe(&app, &all[0]).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let before = proxy.stats();
    let app = &app;
    let answers = join_all(all.iter().enumerate().map(|(i, s)| async move {
        tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
        probe(app, s).await
    }))
    .await;
    for (status, took) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{answers:?}");
        assert!(*took < BOUND, "an answer took {took:?}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = proxy.stats();
    let opened = after.accepted - before.accepted;
    assert!(
        opened <= 8,
        "{opened} connections to Redis opened for 20 verifies in 200 ms \
         ({} open at once at the proxy): {before:?} -> {after:?}",
        after.peak_open
    );
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cut_mid_way_under_load_never_answer_with_another_identity() {
    let Rig { app, proxy, redis } = rig().await;
    let all = sessions(&app, "cut", 64).await;
    let stop = AtomicBool::new(false);
    // 32 verifiers, two sessions each, in a loop until told to stop.
    let verifiers = all.chunks(2).map(|mine| {
        let (app, stop) = (&app, &stop);
        async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for s in mine {
                    let (status, took) = probe(app, s).await;
                    assert!(took < BOUND, "an answer took {took:?}");
                    statuses.push(status);
                }
            }
            statuses
        }
    });
    let control = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Phase 1: single replies cut in half, one now and then, while
        // dozens of requests share the pipelined connection.
        for _ in 0..12 {
            proxy.cut_next_replies(1);
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        // Phase 2: every reply cut, for 300 ms and until two were cut.
        let cuts_before = proxy.stats().cuts;
        proxy.cut_mid_reply();
        tokio::time::sleep(Duration::from_millis(300)).await;
        eventually(Duration::from_secs(10), || async {
            proxy.stats().cuts >= cuts_before + 2
        })
        .await;
        // Phase 3: every connection reset, new ones closed at once, for
        // 300 ms and until one was refused.
        proxy.heal();
        proxy.drop_all();
        tokio::time::sleep(Duration::from_millis(300)).await;
        eventually(Duration::from_secs(10), || async {
            proxy.stats().refused >= 1
        })
        .await;
        proxy.heal();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
    };
    let (statuses, ()) = tokio::join!(join_all(verifiers), control);
    let statuses: Vec<StatusCode> = statuses.into_iter().flatten().collect();
    let stats = proxy.stats();
    let count = |code| statuses.iter().filter(|s| **s == code).count();
    eprintln!(
        "chaos: cut mid-reply: {} answers, {} x 200, {} x 503; proxy {stats:?}",
        statuses.len(),
        count(StatusCode::OK),
        count(StatusCode::SERVICE_UNAVAILABLE)
    );
    for status in &statuses {
        assert!(
            [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(status),
            "a valid session answered {status} while replies were cut"
        );
    }
    assert!(stats.cuts >= 2, "the proxy cut too little: {stats:?}");
    assert!(stats.refused >= 1, "drop-all refused nothing: {stats:?}");
    assert!(
        count(StatusCode::SERVICE_UNAVAILABLE) > 0,
        "no fault was seen"
    );
    assert!(
        stats.peak_open <= 16,
        "connections pile up: {} open at once",
        stats.peak_open
    );
    // Recovered without a restart: every session verifies, as itself.
    eventually(RECOVERY, || async {
        join_all(all.iter().map(|s| probe(&app, s)))
            .await
            .iter()
            .all(|(status, _)| *status == StatusCode::OK)
    })
    .await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_above_the_timeout_gives_prompt_503_and_below_it_200() {
    // A 1 s timeout: 50 ms of latency stays well below it on a loaded
    // machine, 8 s stays far above it (and above BOUND).
    let Rig { app, proxy, redis } = rig_with(TestRedis::start(), &[("REDIS_TIMEOUT", "1s")]).await;
    let s = app.create("slow-user", "laptop").await;
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);

    proxy.delay(Duration::from_secs(8));
    for _ in 0..4 {
        let (status, took) = probe(&app, &s).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(took < BOUND, "503 took {took:?}");
    }

    proxy.delay(Duration::from_millis(50));
    eventually(RECOVERY, || async {
        probe(&app, &s).await.0 == StatusCode::OK
    })
    .await;
    for _ in 0..5 {
        let (status, took) = probe(&app, &s).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            took >= Duration::from_millis(50) && took < BOUND,
            "a 200 through 50 ms of latency took {took:?}"
        );
    }
    proxy.heal();
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);
    drop(redis);
}

/// A restart that has to load its data: Redis answers `-LOADING` to every
/// command meanwhile. A verify must then be 503 (the session is not known
/// to be gone), never 401.
///
/// Loading speed: a dataset that really takes ≥ 1 s to load is hundreds of
/// MB, too heavy for a shared test machine (`DEBUG RELOAD`/`DEBUG SLEEP` are
/// disabled in the project's redis.conf). So Redis runs with its hidden test
/// setting `key-load-delay` (µs slept per key loaded) and 10 000 small keys:
/// ≈ 3–6 s of LOADING (long enough for several answers on a loaded machine). `CONFIG SET key-load-delay` works too, but does not
/// survive the restart, so it is a start argument (which `TestRedis`
/// repeats on restart). `loading-process-events-interval-bytes 1024` makes
/// Redis answer clients often while loading (with the default 2 MB it would
/// stay silent: the blackhole case, not this one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loading_its_dataset_answers_503_never_401_then_200() {
    let redis = TestRedis::start_with(&[
        "--key-load-delay",
        "300",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    let port = redis.port();
    let Rig {
        app,
        proxy,
        mut redis,
    } = rig_with(redis, &[]).await;
    let s = app.create("loading-user", "laptop").await;
    let kept = app.create("loading-kept", "phone").await;
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "appendfsync", "no"]),
        "+OK\r\n"
    );
    tokio::task::spawn_blocking(move || fill(port, "filler", 10_000, 64))
        .await
        .unwrap();
    // Compact the AOF into an RDB preamble: Redis then answers clients every
    // 1 KiB loaded (loading-process-events-interval-bytes); replaying plain
    // AOF commands it answers only every 1024 commands (~150 ms here).
    assert!(redis.cmd(&["BGREWRITEAOF"]).starts_with('+'));
    let rewrite = Instant::now();
    while info(&redis, "persistence", "aof_rewrite_in_progress") != "0"
        || info(&redis, "persistence", "aof_rewrite_scheduled") != "0"
    {
        assert!(
            rewrite.elapsed() < Duration::from_secs(30),
            "BGREWRITEAOF never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        info(&redis, "persistence", "aof_last_bgrewrite_status"),
        "ok"
    );
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "appendfsync", "always"]),
        "+OK\r\n"
    );
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);

    // Crash, and come back with the AOF (restart waits for the end of LOADING).
    let restarting = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    });
    let started = Instant::now();
    while !raw_ping(port)
        .await
        .is_some_and(|r| r.starts_with("-LOADING"))
    {
        assert!(
            !restarting.is_finished() && started.elapsed() < Duration::from_secs(30),
            "Redis was never seen LOADING"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut answered_while_loading = 0;
    let mut logout_refused = false;
    loop {
        let before = raw_ping(port).await;
        if !before.as_deref().is_some_and(|r| r.starts_with("-LOADING")) {
            break;
        }
        let (status, took) = probe(&app, &s).await;
        assert_ne!(
            status,
            StatusCode::UNAUTHORIZED,
            "401 for a live session while LOADING"
        );
        assert!(took < BOUND, "verify took {took:?} while LOADING");
        let after = raw_ping(port).await;
        if after.is_some_and(|r| r.starts_with("-LOADING")) {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            answered_while_loading += 1;
            if !logout_refused {
                let res = app.logout(&kept.token).await;
                assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
                let res = app.create_raw(json!({"user_id": "loading-new"})).await;
                assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
                logout_refused = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let redis = restarting.await.unwrap();
    let loaded_after = started.elapsed();
    eprintln!(
        "chaos: LOADING lasted about {loaded_after:?}; {answered_while_loading} verifies answered 503 meanwhile"
    );
    assert!(
        answered_while_loading >= 5,
        "only {answered_while_loading} verifies answered while LOADING ({loaded_after:?})"
    );
    eventually(RECOVERY, || async {
        let status = probe(&app, &s).await.0;
        assert_ne!(
            status,
            StatusCode::UNAUTHORIZED,
            "401 for a live session after LOADING"
        );
        status == StatusCode::OK
    })
    .await;
    // The refused logout did not happen behind the client's back.
    assert_eq!(probe(&app, &kept).await.0, StatusCode::OK);
    let keys = info(&redis, "keyspace", "db0");
    let keys: usize = keys
        .strip_prefix("keys=")
        .and_then(|k| k.split(',').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("db0 {keys}"));
    assert!(keys > 10_000, "the data did not come back: {keys} keys");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_redis_refuses_new_sessions_but_verifies_and_logs_out() {
    let Rig { app, proxy, redis } = rig().await;
    let s = app.create("mem-user", "laptop").await;
    let leaving = app.create("mem-leaving", "phone").await;
    // Warm: the verify script is in Redis's script cache, as in production.
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);
    fill_to_the_limit(&redis);

    let res = app.create_raw(json!({"user_id": "mem-new"})).await;
    let body = assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert!(
        body.get("token").is_none(),
        "a token without a record: {body}"
    );
    // Reads (and deletes) are allowed under noeviction.
    let (status, took) = probe(&app, &s).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "verify of a live session with Redis full"
    );
    assert!(took < BOUND);
    assert_eq!(app.current(&s.token).await.status(), StatusCode::OK);
    assert_eq!(app.list(&s.token).await.status(), StatusCode::OK);
    let res = app.logout(&leaving.token).await;
    assert_eq!(
        res.status(),
        StatusCode::NO_CONTENT,
        "logout with Redis full"
    );
    assert_eq!(probe(&app, &leaving).await.0, StatusCode::UNAUTHORIZED);

    assert_eq!(redis.cmd(&["CONFIG", "SET", "maxmemory", "2gb"]), "+OK\r\n");
    let fresh = app.create("mem-new", "laptop").await;
    assert_eq!(probe(&app, &fresh).await.0, StatusCode::OK);
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);
    drop(proxy);
}

/// Like the test above, for a session whose idle expiry is due to slide
/// (verify then writes `last_seen_at`): with Redis full that write is
/// refused, but the session is alive and confirmed, so the gateway must
/// still get 200 (the touch is an optimisation, not part of the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_redis_still_verifies_a_session_whose_touch_is_due() {
    let Rig { app, proxy, redis } =
        rig_with(TestRedis::start(), &[("TOUCH_INTERVAL", "100ms")]).await;
    let s = app.create("touch-user", "laptop").await;
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);
    fill_to_the_limit(&redis);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, took) = probe(&app, &s).await;
    assert!(took < BOUND);
    assert!(
        redis.cmd(&["SET", "probe", "x"]).starts_with("-OOM"),
        "Redis is no longer full: the test proves nothing"
    );
    assert_eq!(
        status,
        StatusCode::OK,
        "verify of a live session whose touch is due, with Redis full (noeviction)"
    );
    assert_eq!(redis.cmd(&["CONFIG", "SET", "maxmemory", "2gb"]), "+OK\r\n");
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);
    drop(proxy);
}

/// Writes refused by Redis (`min-replicas-to-write 1` with no replica:
/// every write answers NOREPLICAS, reads work): no create, no logout, and
/// never a 204 for a logout that did not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_norreplicas_never_acknowledge_a_logout() {
    let Rig { app, proxy, redis } = rig().await;
    let s = app.create("norepl-user", "laptop").await;
    let s2 = app.create("norepl-user", "phone").await;
    let other = app.create("norepl-other", "phone").await;
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "min-replicas-to-write", "1"]),
        "+OK\r\n"
    );
    assert!(redis.cmd(&["SET", "k", "v"]).starts_with("-NOREPLICAS"));

    let res = app.logout(&s.token).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    let res = app.logout_others(&s.token).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    let res = app.admin_revoke_user(&other.user_id, None).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    let res = app.create_raw(json!({"user_id": "norepl-new"})).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    // Reads still work.
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);
    assert_not_ready(&app, "writes fail with NOREPLICAS", "NOREPLICAS").await;

    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "min-replicas-to-write", "0"]),
        "+OK\r\n"
    );
    // Nothing that answered 503 happened.
    assert_eq!(probe(&app, &s).await.0, StatusCode::OK);
    assert_eq!(probe(&app, &s2).await.0, StatusCode::OK);
    assert_eq!(probe(&app, &other).await.0, StatusCode::OK);
    assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(probe(&app, &s).await.0, StatusCode::UNAUTHORIZED);
    drop(proxy);
}

/// ACLs taking rights away from the service's user: (a) no write commands
/// (the scripts run, their writes get NOPERM), (b) no scripts at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_refusing_writes_or_scripts_gives_503_and_no_phantom_logout() {
    let Rig { app, proxy, redis } = rig().await;
    let s = app.create("acl-user", "laptop").await;

    // (a) -@write
    assert_eq!(
        redis.cmd(&["ACL", "SETUSER", "default", "-@write"]),
        "+OK\r\n"
    );
    assert!(redis.cmd(&["SET", "k", "v"]).starts_with("-NOPERM"));
    let res = app.logout(&s.token).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    let res = app.create_raw(json!({"user_id": "acl-new"})).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert_eq!(
        probe(&app, &s).await.0,
        StatusCode::OK,
        "read-only verify under -@write"
    );
    assert_not_ready(&app, "the ACL forbids writes", "can't run this command").await;
    assert_eq!(
        redis.cmd(&["ACL", "SETUSER", "default", "+@all"]),
        "+OK\r\n"
    );
    assert_eq!(
        probe(&app, &s).await.0,
        StatusCode::OK,
        "the logout did not happen"
    );

    // (b) -eval -evalsha: every change is a script. Verify reads with a
    // plain HGET, but the state refresher's read is a script too, so verify
    // fails closed once the cached state is older than state_max_staleness;
    // every probe on the way answers within the bound, never a hang.
    assert_eq!(
        redis.cmd(&["ACL", "SETUSER", "default", "-eval", "-evalsha"]),
        "+OK\r\n"
    );
    crate::helpers::eventually(Duration::from_secs(20), || async {
        let (status, took) = probe(&app, &s).await;
        assert!(took < BOUND, "a verify took {took:?}");
        assert!(
            matches!(status, StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE),
            "{status}"
        );
        status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let res = app.logout(&s.token).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    let res = app.create_raw(json!({"user_id": "acl-new"})).await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert_not_ready(&app, "the ACL forbids EVAL/EVALSHA", "no permissions").await;
    assert_eq!(
        redis.cmd(&["ACL", "SETUSER", "default", "+@all"]),
        "+OK\r\n"
    );
    // Serving again once the refresher has read the state (the logout
    // that answered 503 did not happen): never 401 on the way.
    crate::helpers::eventually(Duration::from_secs(20), || async {
        let status = probe(&app, &s).await.0;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "the logout did happen");
        status == StatusCode::OK
    })
    .await;
    assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(probe(&app, &s).await.0, StatusCode::UNAUTHORIZED);
    drop(proxy);
}

/// Redis frozen (CLIENT PAUSE) under a burst: 100 concurrent verifies all
/// get 503 promptly, none waits for Redis, connections do not pile up, the
/// process stays up, and it serves again once Redis does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_under_a_burst_answers_every_verify_503_promptly() {
    let Rig { app, proxy, redis } = rig().await;
    let all = sessions(&app, "burst", 20).await;
    let before = proxy.stats();
    // Frozen for twice BOUND: an answer that waited for Redis fails it.
    redis.pause_ms(6000);
    let paused = Instant::now();
    let answers = join_all((0..100).map(|i| probe(&app, &all[i % all.len()]))).await;
    let total = paused.elapsed();
    for (status, took) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{answers:?}");
        assert!(*took < BOUND, "an answer took {took:?}");
    }
    assert!(
        total < Duration::from_secs(5),
        "100 verifies took {total:?}: not all answered while Redis was paused"
    );
    assert_eq!(get_status(&app, "/healthz").await, StatusCode::OK);
    let during = proxy.stats();
    assert!(
        during.accepted - before.accepted <= 10 && during.peak_open <= 10,
        "connections pile up while Redis is paused: {before:?} -> {during:?}"
    );
    eventually(RECOVERY, || async {
        join_all(all.iter().map(|s| probe(&app, s)))
            .await
            .iter()
            .all(|(status, _)| *status == StatusCode::OK)
    })
    .await;
}

/// The value of an unlabelled counter in `/metrics` (0 when absent).
async fn counter(app: &TestApp, name: &str) -> u64 {
    let text = app
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// Stale replies: the proxy delivers reply chunks twice, so the requests
/// pipelined behind them on the connection each read a reply meant for an
/// earlier request (of another session, alive or logged out). Every answer
/// must still be right for the token sent, or 503: a logged-out token is
/// never 200 on a live session's reply, a live one never 401 on a dead
/// one's. The service drops the out-of-step connection (the nonce echo) and
/// counts the mismatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_replies_are_refused_never_answered_for_another_request() {
    const ROUNDS: usize = 40;
    let Rig { app, proxy, redis } = rig().await;
    // Set-up one call at a time (a burst of fsynced writes on a loaded
    // disk can outlast the 250 ms timeout; that is not under test here).
    let mut live = Vec::new();
    let mut dead = Vec::new();
    for i in 0..32 {
        let s = app.create(&format!("dup-user-{i}"), "laptop").await;
        if i % 2 == 0 {
            live.push(s);
        } else {
            assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
            dead.push(s);
        }
    }
    let tokens: Vec<(&Created, bool)> = live
        .iter()
        .map(|s| (s, true))
        .chain(dead.iter().map(|s| (s, false)))
        .collect();
    let mismatches_before = counter(&app, "sessiongate_redis_reply_mismatch_total").await;
    let done = AtomicBool::new(false);
    // 32 verifiers (16 live tokens, 16 logged out), ROUNDS verifies each.
    let verifiers = tokens.iter().map(|&(s, alive)| {
        let app = &app;
        async move {
            let mut seen = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                // Not timed beyond probe's hang check: what is under test is
                // whose reply an answer came from (a loaded machine can make
                // any answer slow).
                let (status, _) = probe(app, s).await;
                let right = if alive {
                    StatusCode::OK
                } else {
                    StatusCode::UNAUTHORIZED
                };
                assert!(
                    status == right || status == StatusCode::SERVICE_UNAVAILABLE,
                    "{} (alive: {alive}) answered {status} while replies were duplicated",
                    s.user_id
                );
                seen.push(status);
            }
            seen
        }
    });
    let control = async {
        // One duplicated chunk every 20 ms while the verifiers run.
        while !done.load(Ordering::SeqCst) {
            proxy.duplicate_next_replies(1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.heal();
    };
    let all = async {
        let seen = join_all(verifiers).await;
        done.store(true, Ordering::SeqCst);
        seen
    };
    let (seen, ()) = tokio::join!(all, control);
    let seen: Vec<StatusCode> = seen.into_iter().flatten().collect();
    let stats = proxy.stats();
    let mismatches =
        counter(&app, "sessiongate_redis_reply_mismatch_total").await - mismatches_before;
    let unavailable = seen
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    eprintln!(
        "chaos: duplicated replies: {} answers checked, {unavailable} x 503, \
         {mismatches} mismatches counted; proxy {stats:?}",
        seen.len()
    );
    assert_eq!(seen.len(), tokens.len() * ROUNDS, "answers checked");
    assert!(
        stats.duplicated >= 5,
        "the proxy duplicated too little: {stats:?}"
    );
    assert!(mismatches >= 1, "no mismatch counted ({stats:?})");
    assert!(unavailable >= 1, "no verify saw the fault");
    // Recovered without a restart: every token answers as itself again.
    eventually(Duration::from_secs(10), || async {
        let mut right = true;
        for &(s, alive) in &tokens {
            let want = if alive {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            right &= probe(&app, s).await.0 == want;
        }
        right
    })
    .await;
    drop(redis);
}
