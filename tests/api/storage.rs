//! What sessiongate leaves in Redis: keys, TTLs, writes and round trips.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_with};

/// Every key in the app's Redis (SCAN; KEYS is disabled by redis.conf),
/// but for the lifecycle event streams and tombstones (tests/api/events.rs).
fn all_keys(app: &TestApp) -> Vec<String> {
    let reply = app.redis_cmd(&["SCAN", "0", "MATCH", "*", "COUNT", "10000"]);
    // RESP: *2 $1 0 *N $len key ...
    let lines: Vec<&str> = reply.split("\r\n").collect();
    assert_eq!(lines[2], "0", "one SCAN page is enough here: {reply}");
    lines[4..]
        .chunks(2)
        .filter_map(|c| c.get(1).map(|k| k.to_string()))
        .filter(|k| !k.is_empty())
        .filter(|k| !crate::events::is_event_key(k))
        .collect()
}

fn int_reply(reply: &str) -> i64 {
    reply.trim().trim_start_matches(':').parse().unwrap()
}

fn counts(app: &TestApp) -> HashMap<String, u64> {
    app.command_counts()
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, cmd: &str) -> u64 {
    after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0)
}

#[tokio::test]
async fn every_session_key_has_a_ttl_within_the_absolute_lifetime() {
    let app = spawn_app_with(&[("ABSOLUTE_LIFETIME", "1h"), ("IDLE_TIMEOUT", "10m")]).await;
    for (user, device) in [("a", "1"), ("a", "2"), ("b", "1"), ("c{x}*", "1")] {
        app.create(user, device).await;
    }
    let keys = all_keys(&app);
    assert_eq!(
        keys.len(),
        4,
        "three user hashes and the global hash: {keys:?}"
    );
    for key in keys {
        let ttl = int_reply(&app.redis_cmd(&["PTTL", &key]));
        if key == "sg:global" {
            assert_eq!(ttl, -1, "the small global hash has no TTL");
        } else {
            assert!(key.starts_with("sg:u{") && key.ends_with('}'), "{key}");
            // Bounded by the idle timeout here, which is shorter than the lifetime.
            assert!(ttl > 0 && ttl <= 600_000, "{key} has PTTL {ttl}");
        }
    }
}

#[tokio::test]
async fn a_users_sessions_share_one_small_listpack_hash() {
    let app = spawn_app().await;
    for device in ["laptop", "phone", "tablet"] {
        app.create_body(json!({"user_id": "alice", "device_id": device,
            "metadata": {"ip": "203.0.113.9", "user_agent": "x".repeat(120)}}))
            .await;
    }
    let keys: Vec<String> = all_keys(&app)
        .into_iter()
        .filter(|k| k.starts_with("sg:u{"))
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        int_reply(&app.redis_cmd(&["HLEN", &keys[0]])),
        4,
        "3 sessions + the owner field"
    );
    assert_eq!(
        app.redis_cmd(&["OBJECT", "ENCODING", &keys[0]]),
        "$8\r\nlistpack\r\n"
    );
}

/// Every command Redis sees during 20 verifies, refresher paused, nothing
/// excluded: one HGET and one ECHO each (one pipelined round trip, no
/// script, no TIME); no write (HSET, PEXPIREAT) within the touch interval;
/// plus the test's INFO.
#[tokio::test]
async fn verify_is_one_round_trip_and_does_not_write_within_the_touch_interval() {
    let app = crate::tokens::spawn_app_with_refresher_paused().await;
    let s = app.create("bob", "laptop").await;
    // Warm up: the first call after start may load the script.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    let seen = crate::tokens::every_command_during(&app, || async {
        for _ in 0..20 {
            assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
        }
    })
    .await;
    let expected: std::collections::HashMap<String, u64> =
        [("hget", 20), ("echo", 20), ("info", 1)]
            .into_iter()
            .map(|(name, n)| (name.to_string(), n))
            .collect();
    assert_eq!(seen, expected, "every command during 20 verifies");
}

#[tokio::test]
async fn verify_writes_once_per_touch_interval_and_slides_the_expiry() {
    // idle 40 s → effective touch interval 4 s: the 10 verifies below must
    // fit in one interval, which a loaded machine does in 4 s but not always
    // in 1 s.
    let app = spawn_app_with(&[("IDLE_TIMEOUT", "40s"), ("TOUCH_INTERVAL", "4s")]).await;
    let s = app.create("carol", "laptop").await;
    let key = all_keys(&app)
        .into_iter()
        .find(|k| k.starts_with("sg:u{"))
        .unwrap();
    // Let the touch interval pass (time passing, not synchronisation).
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let ttl_before = int_reply(&app.redis_cmd(&["PTTL", &key]));
    let before = counts(&app);
    for _ in 0..10 {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }
    let after = counts(&app);
    assert_eq!(delta(&after, &before, "hset"), 1, "exactly one touch");
    let ttl_after = int_reply(&app.redis_cmd(&["PTTL", &key]));
    assert!(
        ttl_after > ttl_before + 1000,
        "expiry slid: {ttl_before} -> {ttl_after}"
    );
}

#[tokio::test]
async fn the_last_logout_leaves_no_key_behind() {
    let app = spawn_app().await;
    let a = app.create("dave", "laptop").await;
    let b = app.create("dave", "phone").await;
    assert_eq!(app.logout(&a.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        all_keys(&app)
            .iter()
            .filter(|k| k.starts_with("sg:u{"))
            .count(),
        1
    );
    assert_eq!(app.logout(&b.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(all_keys(&app), vec!["sg:global".to_string()]);
}

#[tokio::test]
async fn idle_sessions_vanish_from_redis_by_ttl() {
    let app = spawn_app_with(&[("IDLE_TIMEOUT", "1s")]).await;
    app.create("erin", "laptop").await;
    app.create("frank", "laptop").await;
    assert_eq!(all_keys(&app).len(), 3);
    // Redis expires them 1 s after the last write; waited for generously.
    eventually(Duration::from_secs(15), || async {
        all_keys(&app) == vec!["sg:global".to_string()]
    })
    .await;
}

#[tokio::test]
async fn create_with_a_key_prefix_keeps_deployments_apart() {
    let a = spawn_app_with(&[("KEY_PREFIX", "one:")]).await;
    let b = crate::helpers::spawn_app_on(&a.redis_url, &[("KEY_PREFIX", "two:")]).await;
    let s = a.create("gina", "laptop").await;
    // Different prefix: a different key ring, so B refuses A's token.
    assert_eq!(b.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(a.verify_status(&s.token).await, StatusCode::OK);
    let keys = all_keys(&a);
    assert!(
        keys.iter()
            .all(|k| k.starts_with("one:") || k.starts_with("two:")),
        "{keys:?}"
    );
}

/// Redis's `MONITOR` stream, read on its own thread.
struct Monitor {
    lines: std::sync::mpsc::Receiver<String>,
}

impl Monitor {
    fn start(port: u16) -> Monitor {
        use std::io::{BufRead, BufReader, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.write_all(b"*1\r\n$7\r\nMONITOR\r\n").unwrap();
        let mut reader = BufReader::new(conn);
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert_eq!(ok, "+OK\r\n");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Monitor { lines }
    }

    /// Every line up to a fence command sent now (so nothing in flight before
    /// it is missed), as `(client address, [command, args…])`; lines of
    /// commands run inside scripts (`[0 lua]`) are left out.
    fn finish(self, app: &TestApp) -> Vec<(String, Vec<String>)> {
        let fence = format!("fence-{}", uuid::Uuid::new_v4());
        app.redis_cmd(&["ECHO", &fence]);
        let mut out = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("MONITOR lines up to the fence");
            if line.contains(&fence) {
                return out;
            }
            let Some((client, args)) = line.split_once("] ") else {
                continue;
            };
            let client = client.rsplit(' ').next().unwrap().to_string();
            if client == "lua" {
                continue;
            }
            let args = args
                .split(' ')
                .map(|a| a.trim_matches('"').to_ascii_lowercase())
                .collect();
            out.push((client, args));
        }
    }
}

/// The logout-all purge runs its SCANs and per-user scripts over the pool,
/// never over the request path's connection (so its commands do not queue
/// ahead of verifies there, and its failures and timeouts cannot count
/// against it or replace it). Watched with MONITOR: the clients that carry
/// verifies and creates never carry a purge command, and every purge script
/// comes from a client that also ran the purge's SCAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logout_all_purge_runs_over_the_pool_not_the_request_path_connection() {
    const USERS: usize = 60;
    let app = spawn_app().await;
    let old: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..USERS {
            v.push(app.create(&format!("purged-{i}"), "laptop").await);
        }
        v
    };
    let port = app.redis.as_ref().unwrap().lock().unwrap().port();
    let monitor = Monitor::start(port);
    for s in old.iter().take(5) {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }
    assert_eq!(app.logout_all().await.status(), StatusCode::OK);
    let survivor = app.create("survivor", "laptop").await;
    // Verifies keep coming while the purge runs; it is done when only the
    // survivor's hash is left.
    eventually(Duration::from_secs(30), || async {
        assert_eq!(app.verify_status(&survivor.token).await, StatusCode::OK);
        all_keys(&app)
            .iter()
            .filter(|k| k.starts_with("sg:u{"))
            .count()
            == 1
    })
    .await;
    assert_eq!(app.verify_status(&survivor.token).await, StatusCode::OK);
    let lines = monitor.finish(&app);

    let is_purge_script = |args: &[String]| {
        args.first().is_some_and(|c| c == "evalsha") && args.get(5).is_some_and(|m| m == "dead")
    };
    let scan_clients: HashSet<&str> = lines
        .iter()
        // The purge's SCANs match user hashes; the test's own match "*".
        .filter(|(_, args)| args[0] == "scan" && args.get(3).is_some_and(|m| m.starts_with("sg:u")))
        .map(|(c, _)| c.as_str())
        .collect();
    let purge_clients: HashSet<&str> = lines
        .iter()
        .filter(|(_, args)| is_purge_script(args))
        .map(|(c, _)| c.as_str())
        .collect();
    let request_clients: HashSet<&str> = lines
        .iter()
        .filter(|(_, args)| {
            args[0] == "evalsha"
                && args.get(3).is_some_and(|k| k.starts_with("sg:u{"))
                && !is_purge_script(args)
        })
        .map(|(c, _)| c.as_str())
        .collect();
    let purge_scripts = lines.iter().filter(|(_, a)| is_purge_script(a)).count();
    assert!(
        purge_scripts >= USERS,
        "{purge_scripts} purge scripts for {USERS} users"
    );
    assert!(!request_clients.is_empty(), "no verify seen");
    assert!(!scan_clients.is_empty(), "no purge SCAN seen");
    assert!(
        purge_clients.is_subset(&scan_clients),
        "purge scripts from {purge_clients:?}, its SCANs from {scan_clients:?}"
    );
    assert!(
        purge_clients.is_disjoint(&request_clients) && scan_clients.is_disjoint(&request_clients),
        "the purge ran on a request-path connection: purge {purge_clients:?}, \
         SCAN {scan_clients:?}, verifies and creates {request_clients:?}"
    );
}

/// Verify reads with a plain `HGET` and judges in-process; a record it
/// finds dead (here: revoked by a logout-all whose purge has not run) is
/// deleted on the way by touch.lua, as verify.lua used to, and the hash
/// goes with its last session.
#[tokio::test]
async fn a_verify_that_finds_a_dead_record_deletes_it() {
    let app = spawn_app_with(&[("LOGOUT_ALL_PURGE_DELAY", "1h")]).await;
    let laptop = app.create("hal", "laptop").await;
    let phone = app.create("hal", "phone").await;
    let key = all_keys(&app)
        .into_iter()
        .find(|k| k.starts_with("sg:u{"))
        .unwrap();
    assert_eq!(app.logout_all().await.status(), StatusCode::OK);
    assert_eq!(int_reply(&app.redis_cmd(&["HLEN", &key])), 3);
    assert_eq!(
        app.verify_status(&laptop.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        int_reply(&app.redis_cmd(&["HLEN", &key])),
        2,
        "the dead record verify found is still there"
    );
    assert_eq!(
        app.verify_status(&phone.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.redis_cmd(&["EXISTS", &key]), ":0\r\n");
}

/// touch.lua, run directly (verify sends it only when a touch is due or
/// the record is dead): it writes nothing where there is no record (a
/// logout that won the race stays a logout), slides a live one, keeping
/// elements a later schema appends, and deletes a dead one.
#[tokio::test]
async fn the_touch_script_never_recreates_a_record_and_keeps_later_elements() {
    let app = spawn_app().await;
    let touch = concat!(
        include_str!("../../src/store/lua/prelude.lua"),
        include_str!("../../src/store/lua/touch.lua")
    );
    let key = "sg:u{touch-test}";
    let stream = "sg:ev{touch-test}";
    // KEYS: user hash, event stream. ARGV: field, device, idle, touch
    // interval, cutoff, epoch, client address, user agent, nonce, event
    // context.
    let ctx = r#"{"s":"1","a":"system","m":"1000","t":"","r":"0","g":"tag","o":""}"#;
    let run_from = |field: &str, touch_ms: &str, ip: &str, ua: &str| {
        app.redis_cmd(&[
            "EVAL", touch, "2", key, stream, field, "laptop", "60000", touch_ms, "0", "0", ip, ua,
            "n1", ctx,
        ])
    };
    let run = |field: &str, touch_ms: &str| run_from(field, touch_ms, "", "");
    // No hash at all, then a hash without the field.
    assert_eq!(run("f1", "0"), "*2\r\n$2\r\nn1\r\n:0\r\n");
    assert_eq!(app.redis_cmd(&["EXISTS", key]), ":0\r\n");
    let seed = "local t = redis.call('TIME') \
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
        redis.call('HSET', KEYS[1], '!u', 'u', ARGV[1], cmsgpack.pack({now - 5000, now - 5000, now - 5000, now + tonumber(ARGV[2]), 'laptop', '', 42})) \
        return now";
    app.redis_cmd(&["EVAL", seed, "1", key, "f2", "3600000"]);
    assert_eq!(run("f1", "0"), "*2\r\n$2\r\nn1\r\n:0\r\n");
    assert_eq!(int_reply(&app.redis_cmd(&["HLEN", key])), 2);
    // Alive, touch due: slid to now, the seventh element kept.
    let before = app.redis_cmd(&["HGET", key, "f2"]);
    let reply = run("f2", "1000");
    assert!(reply.starts_with("*3\r\n$2\r\nn1\r\n:1\r\n:"), "{reply}");
    assert_ne!(app.redis_cmd(&["HGET", key, "f2"]), before, "not slid");
    let read = "local r = cmsgpack.unpack(redis.call('HGET', KEYS[1], ARGV[1])) return {#r, r[7]}";
    assert_eq!(
        app.redis_cmd(&["EVAL", read, "1", key, "f2"]),
        "*2\r\n:7\r\n:42\r\n"
    );
    // Not due (just slid): nothing written, not even where it came from.
    let slid = app.redis_cmd(&["HGET", key, "f2"]);
    assert!(run_from("f2", "60000", "192.0.2.1", "curl").starts_with("*3\r\n$2\r\nn1\r\n:1\r\n:"));
    assert_eq!(app.redis_cmd(&["HGET", key, "f2"]), slid);
    // Due, with an address and agent: recorded as elements 8 and 9.
    let read_all = "local r = cmsgpack.unpack(redis.call('HGET', KEYS[1], ARGV[1])) \
        return {#r, r[7], r[8], r[9]}";
    eventually(Duration::from_secs(20), || async {
        run_from("f2", "1", "192.0.2.1", "curl");
        app.redis_cmd(&["EVAL", read_all, "1", key, "f2"])
            == "*4\r\n:9\r\n:42\r\n$9\r\n192.0.2.1\r\n$4\r\ncurl\r\n"
    })
    .await;
    // A later touch without them slides the record and keeps them.
    let seen = "return cmsgpack.unpack(redis.call('HGET', KEYS[1], ARGV[1]))[2]";
    let first = app.redis_cmd(&["EVAL", seen, "1", key, "f2"]);
    eventually(Duration::from_secs(20), || async {
        run("f2", "1");
        app.redis_cmd(&["EVAL", seen, "1", key, "f2"]) != first
    })
    .await;
    assert_eq!(
        app.redis_cmd(&["EVAL", read_all, "1", key, "f2"]),
        "*4\r\n:9\r\n:42\r\n$9\r\n192.0.2.1\r\n$4\r\ncurl\r\n"
    );
    // Dead (past its lifetime): deleted, and the hash with it.
    app.redis_cmd(&["EVAL", seed, "1", key, "f3", "-1"]);
    app.redis_cmd(&["HDEL", key, "f2"]);
    assert_eq!(app.redis_cmd(&["XLEN", stream]), ":0\r\n");
    assert_eq!(run("f3", "-1"), "*2\r\n$2\r\nn1\r\n:0\r\n");
    assert_eq!(app.redis_cmd(&["EXISTS", key]), ":0\r\n");
    // Its one event: revoked, lifetime expired, by the system.
    let event = app.redis_cmd(&["XRANGE", stream, "-", "+"]);
    assert!(
        event.starts_with("*1\r\n")
            && event.contains("session.revoked")
            && event.contains("lifetime_expired")
            && event.contains("tagf3"),
        "{event}"
    );
}

/// A create that runs twice (a Redis Cluster client resends a command whose
/// connection dropped after Redis ran it) keeps the session it hands out:
/// its own field is not taken for an older session on the same device.
#[test]
fn a_create_run_twice_keeps_its_own_session() {
    let redis = crate::redis_server::TestRedis::start();
    let script = concat!(
        include_str!("../../src/store/lua/prelude.lua"),
        include_str!("../../src/store/lua/create.lua")
    );
    let (key, field) = ("t:u{tag}", "QQ_SvuDaoL8NmW1Kwuf8Lg");
    // KEYS: user hash, event stream. ARGV: field, user, device, auth_time,
    // metadata, idle ms, lifetime ms, cap, cutoff ms, epoch, nonce, event
    // context.
    let ctx = r#"{"s":"1","a":"issuer","m":"1000","t":"","r":"0","g":"tag","o":""}"#;
    let create = [
        "EVAL",
        script,
        "2",
        key,
        "t:ev{tag}",
        field,
        "alice",
        "laptop",
        "",
        "",
        "600000",
        "600000",
        "10",
        "0",
        "0",
        "7",
        ctx,
    ];
    for run in 0..2 {
        let reply = redis.cmd(&create);
        assert!(reply.starts_with('*'), "run {run}: {reply}");
    }
    assert_eq!(
        redis.cmd(&["HEXISTS", key, field]).trim(),
        ":1",
        "the second run deleted the session the first one created"
    );
}

/// With a single Redis, the verify read has a connection of its own
/// (`src/store/reader.rs`): it logs in as the URL's user and reads the
/// URL's database, like the connections redis-rs opens. Here the default
/// user may connect but touch no key, so a verify connection that skipped
/// `AUTH` would answer 503, and one that skipped `SELECT` would find no
/// record (401).
#[tokio::test]
async fn the_verify_connection_logs_in_as_the_urls_user_and_reads_its_database() {
    let redis = crate::redis_server::TestRedis::start();
    let user = [
        "ACL",
        "SETUSER",
        "gate",
        "on",
        ">gate-password",
        "~*",
        "&*",
        "+@all",
    ];
    assert_eq!(redis.cmd(&user), "+OK\r\n");
    let default = ["ACL", "SETUSER", "default", "resetkeys", "resetchannels"];
    assert_eq!(redis.cmd(&default), "+OK\r\n");
    let url = format!("redis://gate:gate-password@127.0.0.1:{}/3", redis.port());
    let app = crate::helpers::spawn_app_on(&url, &[]).await;
    let a = app.create("alice", "laptop").await;
    let b = app.create("alice", "phone").await;
    assert_eq!(app.verify_status(&a.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&b.token).await, StatusCode::OK);
    // A logout through the other connection is seen by the next read.
    assert_eq!(app.logout(&a.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.verify_status(&a.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&b.token).await, StatusCode::OK);
}

/// The verify read's connection, killed by Redis (`CLIENT KILL`), is
/// replaced: the verifies in flight fail closed (503), later ones succeed.
#[tokio::test]
async fn a_killed_verify_connection_is_replaced() {
    let app = spawn_app().await;
    let created = app.create("alice", "laptop").await;
    assert_eq!(app.verify_status(&created.token).await, StatusCode::OK);
    // Every client connection but the killer's own (SKIPME yes by default).
    app.redis_cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
    let seen = std::sync::Mutex::new(HashSet::new());
    eventually(Duration::from_secs(30), || async {
        let status = app.verify_status(&created.token).await;
        seen.lock().unwrap().insert(status);
        status == StatusCode::OK
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
        "only 200 or 503 while reconnecting: {seen:?}"
    );
}
