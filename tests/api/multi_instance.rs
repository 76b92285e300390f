//! Several instances sharing one Redis: revocation reaches all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::Value;

use crate::fault_proxy::FaultProxy;
use crate::helpers::{TestApp, eventually, spawn_app_on, spawn_app_with};
use crate::topology::Topo;

/// Two instances on one topology, sharing the test's keys.
async fn pair(t: &Topo) -> (TestApp, TestApp) {
    (t.app(&[]).await, t.app(&[]).await)
}

/// The test's keys: one hash per user plus the global state (as `DBSIZE`
/// would say on a Redis of its own).
fn keys_of(t: &Topo) -> String {
    let global = t.key("global");
    let has_global = t.cmd(&global, &["EXISTS", &global]) == ":1\r\n";
    format!(":{}\r\n", t.user_keys().len() + usize::from(has_global))
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    json["kid"].as_str().unwrap().to_string()
}

async fn logout_on_one_instance_is_refused_at_once_on_the_other(t: Topo) {
    let (a, b) = pair(&t).await;
    let s = a.create("alice", "laptop").await;
    assert_eq!(b.verify_status(&s.token).await, StatusCode::OK);
    assert_eq!(a.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    // The very next request on B, no waiting.
    assert_eq!(b.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
}

async fn force_logout_of_a_user_is_refused_at_once_on_the_other(t: Topo) {
    let (a, b) = pair(&t).await;
    let s1 = a.create("bob", "laptop").await;
    let s2 = b.create("bob", "phone").await;
    let res = a.admin_revoke_user("bob", None).await;
    assert_eq!(res.json::<Value>().await.unwrap()["revoked"], 2);
    assert_eq!(b.verify_status(&s1.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(b.verify_status(&s2.token).await, StatusCode::UNAUTHORIZED);
}

/// Number of keys in Redis (each test owns its Redis): one hash per user
/// plus the global state.
/// Keys in Redis (as a `DBSIZE` reply) but for the lifecycle event
/// streams and tombstones (tests/api/events.rs).
fn app_keys(app: &TestApp) -> String {
    format!(":{}\r\n", crate::events::non_event_keys(app))
}

/// Subscribers of the events channel.
fn event_subscribers(app: &TestApp) -> String {
    app.redis_cmd(&["PUBSUB", "NUMSUB", "sg:events"])
}

/// A logout-all on A; B must refuse every pre-cutoff token within 1 s of
/// the acknowledgement, by the cutoff alone. The purge is held back on both
/// (`LOGOUT_ALL_PURGE_DELAY`), so each record is still in Redis when B
/// refuses its token: B's refusing script is what deletes it (verify drops
/// a record it finds dead), which shows B sent the new cutoff; a refusal of
/// a missing record would leave the key count unchanged. Measured from the
/// acknowledgement to the sending of each token's first refused request
/// (the cutoff only rises, so a token refused once stays refused); polled
/// with a generous deadline.
async fn cutoff_alone_reaches(a: &TestApp, b: &TestApp, keys_in_redis: &dyn Fn() -> String) {
    let mut sessions = Vec::new();
    for i in 0..5 {
        sessions.push(b.create(&format!("carol-{i}"), "laptop").await);
    }
    for s in &sessions {
        assert_eq!(b.verify_status(&s.token).await, StatusCode::OK);
    }
    // One hash per user, plus the global state.
    assert_eq!(keys_in_redis(), ":6\r\n");
    assert_eq!(a.logout_all().await.status(), StatusCode::OK);
    let acked = Instant::now();
    let mut latest = Duration::ZERO;
    for (i, s) in sessions.iter().enumerate() {
        assert_eq!(
            keys_in_redis(),
            format!(":{}\r\n", 6 - i),
            "a record went before B refused its token (purge not held back?)"
        );
        loop {
            let sent = acked.elapsed();
            let status = b.verify_status(&s.token).await;
            if status == StatusCode::UNAUTHORIZED {
                latest = latest.max(sent);
                break;
            }
            // 503 (a stale copy on a starved machine) refuses too; keep polling.
            assert!(
                status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                "B answered {status}"
            );
            assert!(
                acked.elapsed() < Duration::from_secs(30),
                "B still accepts a pre-cutoff token 30 s after the logout-all"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            keys_in_redis(),
            format!(":{}\r\n", 5 - i),
            "B's refusal did not find the record dead by the cutoff"
        );
    }
    assert!(
        latest <= Duration::from_secs(1),
        "B accepted a pre-cutoff token {latest:?} after the logout-all was acknowledged"
    );
    // New logins work on both.
    let fresh = b.create("carol-0", "laptop").await;
    assert_eq!(a.verify_status(&fresh.token).await, StatusCode::OK);
}

/// The pub/sub path alone: B's periodic re-read is 30 s away, so only the
/// event pushed by A can carry the cutoff within the second.
async fn logout_all_reaches_the_other_instance_by_pubsub_within_a_second(t: Topo) {
    let a = t.app(&[("LOGOUT_ALL_PURGE_DELAY", "1h")]).await;
    let b = t
        .app(&[
            ("LOGOUT_ALL_PURGE_DELAY", "1h"),
            ("STATE_REFRESH_INTERVAL", "30s"),
            ("STATE_MAX_STALENESS", "60s"),
        ])
        .await;
    // Both listeners subscribed before the logout-all.
    eventually(Duration::from_secs(10), || async {
        t.event_subscribers() == 2
    })
    .await;
    cutoff_alone_reaches(&a, &b, &|| keys_of(&t)).await;
}

/// The periodic re-read alone: B connects as a Redis user that may not
/// SUBSCRIBE, so it never hears an event; its re-read every 200 ms must
/// carry the cutoff within the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_reaches_the_other_instance_without_pubsub() {
    let a = spawn_app_with(&[("LOGOUT_ALL_PURGE_DELAY", "1h")]).await;
    let acl = a.redis_cmd(&[
        "ACL",
        "SETUSER",
        "nosub",
        "on",
        ">nosub-password-0123456789",
        "~*",
        "&*",
        "+@all",
        "-subscribe",
        "-psubscribe",
        "-ssubscribe",
    ]);
    assert_eq!(acl, "+OK\r\n");
    let url = a
        .redis_url
        .replace("redis://", "redis://nosub:nosub-password-0123456789@");
    let b = spawn_app_on(
        &url,
        &[
            ("LOGOUT_ALL_PURGE_DELAY", "1h"),
            ("STATE_REFRESH_INTERVAL", "200ms"),
            ("STATE_MAX_STALENESS", "1s"),
        ],
    )
    .await;
    // B tried to subscribe and was refused; A is the only subscriber.
    eventually(Duration::from_secs(10), || async {
        let refused = a
            .redis_cmd(&["INFO", "commandstats"])
            .lines()
            .find(|l| l.starts_with("cmdstat_subscribe:"))
            .and_then(|l| {
                l.split(',')
                    .find_map(|kv| kv.strip_prefix("rejected_calls="))
            })
            .is_some_and(|n| n.trim().parse::<u64>().unwrap_or(0) > 0);
        refused && event_subscribers(&a).ends_with(":1\r\n")
    })
    .await;
    cutoff_alone_reaches(&a, &b, &|| app_keys(&a)).await;
}

async fn key_rotation_reaches_the_other_instance_and_old_tokens_still_verify(t: Topo) {
    let (a, b) = pair(&t).await;
    let before = b.create("erin", "laptop").await;
    let old_kid = kid_of(&before.token);
    let res = a.rotate_keys().await;
    assert_eq!(res.status(), StatusCode::OK);
    let new_kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_kid, old_kid);
    // No time is promised for rotation; the periodic re-read brings it.
    eventually(Duration::from_secs(10), || async {
        kid_of(&b.create("erin", "phone").await.token) == new_kid
    })
    .await;
    let after = a.create("erin", "tablet").await;
    assert_eq!(kid_of(&after.token), new_kid);
    for app in [&a, &b] {
        assert_eq!(app.verify_status(&before.token).await, StatusCode::OK);
        assert_eq!(app.verify_status(&after.token).await, StatusCode::OK);
    }
}

/// 16 verifiers hammer a session on two instances while it is logged out:
/// no request that started after the logout was acknowledged may get 200.
/// The logout waits until the verifiers have seen the live session, and they
/// stop once enough requests were sent after the acknowledgement (not at
/// fixed times, which a loaded machine may miss).
async fn concurrent_verifiers_never_pass_after_an_acknowledged_logout(t: Topo) {
    let (a, b) = pair(&t).await;
    let a = Arc::new(a);
    let b = Arc::new(b);
    let s = a.create("frank", "laptop").await;
    let token = Arc::new(s.token.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let ok_seen = Arc::new(AtomicUsize::new(0));
    // Set right after the acknowledgement; a request started later counts
    // as "after" (its start is also compared with `acked` below).
    let acked_flag = Arc::new(AtomicBool::new(false));
    let sent_after = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let app = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (token, stop) = (token.clone(), stop.clone());
        let (ok_seen, acked_flag, sent_after) =
            (ok_seen.clone(), acked_flag.clone(), sent_after.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let after = acked_flag.load(Ordering::SeqCst);
                let started = Instant::now();
                let status = app.verify_status(&token).await;
                if status == StatusCode::OK {
                    ok_seen.fetch_add(1, Ordering::SeqCst);
                }
                if after {
                    sent_after.fetch_add(1, Ordering::SeqCst);
                }
                seen.push((started, status));
            }
            seen
        }));
    }
    eventually(Duration::from_secs(20), || async {
        ok_seen.load(Ordering::SeqCst) >= 16
    })
    .await;
    assert_eq!(a.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    let acked = Instant::now();
    acked_flag.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(20), || async {
        sent_after.load(Ordering::SeqCst) >= 32
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut before_ok = 0;
    let mut after = 0;
    for task in tasks {
        for (started, status) in task.await.unwrap() {
            assert!(
                status == StatusCode::OK || status == StatusCode::UNAUTHORIZED,
                "unexpected {status}"
            );
            if started > acked {
                after += 1;
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "200 after the logout was acknowledged"
                );
            } else if status == StatusCode::OK {
                before_ok += 1;
            }
        }
    }
    assert!(before_ok > 0, "the verifiers never saw the live session");
    assert!(
        after >= 32,
        "only {after} requests were sent after the logout"
    );
}

/// Calls of `HMGET` (the global state read) Redis served so far.
fn state_reads(app: &TestApp) -> u64 {
    app.command_counts().get("hmget").copied().unwrap_or(0)
}

/// Rotates on `app` and waits for the read its own event wakes there (its
/// listener, the only subscriber, is subscribed first).
async fn rotate_and_settle(app: &TestApp) -> String {
    eventually(Duration::from_secs(30), || async {
        event_subscribers(app).ends_with(":1\r\n")
    })
    .await;
    let reads = state_reads(app);
    let res = app.rotate_keys().await;
    assert_eq!(res.status(), StatusCode::OK);
    let kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(30), || async {
        state_reads(app) > reads
    })
    .await;
    kid
}

/// `token` with its header's kid replaced (the signature no longer fits).
fn with_kid(token: &str, kid: &str) -> String {
    let (header, rest) = token.split_once('.').unwrap();
    let mut json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    json["kid"] = Value::String(kid.to_string());
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(json.to_string()))
}

/// A rotation made on A that B has not heard of (B may not SUBSCRIBE and
/// re-reads only every 120 s): a token A signs with the new kid verifies on
/// B at once, B reading the global state once for it, and once for 20
/// concurrent requests; a token of an unseen kid whose signature does not
/// check out costs B no read and no script call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_a_kid_rotated_in_elsewhere_verifies_at_once() {
    let a = spawn_app_with(&[
        ("STATE_REFRESH_INTERVAL", "120s"),
        ("STATE_MAX_STALENESS", "240s"),
    ])
    .await;
    a.redis_cmd(&[
        "ACL",
        "SETUSER",
        "nosub",
        "on",
        ">nosub-password-0123456789",
        "~*",
        "&*",
        "+@all",
        "-subscribe",
        "-psubscribe",
        "-ssubscribe",
    ]);
    // B's Redis traffic goes through a proxy, so its replies can be slowed
    // enough for concurrent requests to overlap.
    let port: u16 = a
        .redis_url
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches("/0")
        .parse()
        .unwrap();
    let proxy = FaultProxy::for_port(port).await;
    let url = format!("redis://nosub:nosub-password-0123456789@{}/0", proxy.addr());
    let b = Arc::new(
        spawn_app_on(
            &url,
            &[
                ("STATE_REFRESH_INTERVAL", "120s"),
                ("STATE_MAX_STALENESS", "240s"),
                ("REDIS_TIMEOUT", "5s"),
            ],
        )
        .await,
    );
    let before = b.create("gina", "laptop").await;
    assert_eq!(b.verify_status(&before.token).await, StatusCode::OK);

    let new_kid = rotate_and_settle(&a).await;
    let fresh = a.create("gina", "phone").await;
    assert_eq!(kid_of(&fresh.token), new_kid);
    // A bad signature under the unseen kid: no state read, no session read.
    let reads = state_reads(&a);
    let scripts = a.command_counts().get("echo").copied().unwrap_or(0);
    let forged = with_kid(&before.token, &new_kid);
    assert_eq!(b.verify_status(&forged).await, StatusCode::UNAUTHORIZED);
    assert_eq!(state_reads(&a), reads, "a bad signature made B re-read");
    assert_eq!(
        a.command_counts().get("echo").copied().unwrap_or(0),
        scripts
    );
    // The fresh token: at once, one read.
    assert_eq!(b.verify_status(&fresh.token).await, StatusCode::OK);
    assert_eq!(state_reads(&a), reads + 1, "B's reads for the unseen kid");
    // B signs with it now too.
    assert_eq!(kid_of(&b.create("gina", "tablet").await.token), new_kid);

    // Again, with 20 concurrent requests overlapping (every reply to B
    // held 300 ms): still one read.
    let newer_kid = rotate_and_settle(&a).await;
    let fresh = a.create("gina", "desk").await;
    assert_eq!(kid_of(&fresh.token), newer_kid);
    let reads = state_reads(&a);
    proxy.delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let b = b.clone();
        let token = fresh.token.clone();
        tasks.push(tokio::spawn(async move { b.verify_status(&token).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        state_reads(&a),
        reads + 1,
        "B's reads for 20 concurrent requests"
    );
}

crate::on_every_topology!(
    logout_on_one_instance_is_refused_at_once_on_the_other,
    force_logout_of_a_user_is_refused_at_once_on_the_other,
    logout_all_reaches_the_other_instance_by_pubsub_within_a_second,
    key_rotation_reaches_the_other_instance_and_old_tokens_still_verify,
    concurrent_verifiers_never_pass_after_an_acknowledged_logout,
);
