//! The opt-in near-cache (`NEAR_CACHE_TTL`): a revocation is seen on every
//! instance within the bound, invalidations make it faster, a lost
//! invalidation connection and a logout-all flush it.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_on};

/// A metric's value from `/metrics` (0 when absent).
async fn metric(app: &TestApp, name: &str) -> f64 {
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
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn echoes(app: &TestApp) -> u64 {
    app.command_counts().get("echo").copied().unwrap_or(0)
}

async fn cached_instance(a: &TestApp, url: &str, ttl: &str) -> TestApp {
    let b = spawn_app_on(url, &[("NEAR_CACHE_TTL", ttl)]).await;
    eventually(Duration::from_secs(30), || async {
        metric(&b, "sessiongate_near_cache_up").await == 1.0
    })
    .await;
    // A's Redis counts B's reads too.
    let _ = a;
    b
}

/// Verifies `token` on `b` until it is in the near-cache: a verify that
/// sent no read to Redis.
async fn until_cached(a: &TestApp, b: &TestApp, token: &str) {
    eventually(Duration::from_secs(30), || async {
        assert_eq!(b.verify_status(token).await, StatusCode::OK);
        let before = echoes(a);
        assert_eq!(b.verify_status(token).await, StatusCode::OK);
        echoes(a) == before
    })
    .await;
}

/// With a 2 s bound: every verify on B sent more than 2 s after A
/// acknowledged the logout is refused (the bound holds whatever the
/// invalidations do), and B refuses eventually.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_another_instance_is_seen_within_the_bound() {
    let a = spawn_app().await;
    let b = cached_instance(&a, &a.redis_url, "2s").await;
    let s = a.create("nc-bound", "laptop").await;
    until_cached(&a, &b, &s.token).await;
    assert!(metric(&b, "sessiongate_near_cache_hits_total").await >= 1.0);

    assert_eq!(a.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    let acked = Instant::now();
    let bound = Duration::from_secs(2);
    loop {
        let sent = Instant::now();
        let status = b.verify_status(&s.token).await;
        if status == StatusCode::OK {
            assert!(
                sent < acked + bound,
                "B accepted a session revoked {:?} before the request",
                sent - acked
            );
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            break;
        }
        assert!(acked.elapsed() < Duration::from_secs(30), "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And it stays refused.
    assert_eq!(b.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
}

/// With a 60 s bound, B still refuses a logout made on A at once, well
/// inside the bound: Redis pushed the invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_drops_the_entry_long_before_the_bound() {
    let a = spawn_app().await;
    let b = cached_instance(&a, &a.redis_url, "60s").await;
    let s = a.create("nc-push", "laptop").await;
    let other = a.create("nc-push", "phone").await;
    until_cached(&a, &b, &s.token).await;
    until_cached(&a, &b, &other.token).await;
    assert_eq!(a.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    eventually(Duration::from_secs(30), || async {
        b.verify_status(&s.token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    // The other session of that user is read again, and cached again.
    until_cached(&a, &b, &other.token).await;
}

/// B's invalidation connection is killed and cannot come back (its Redis
/// user may no longer run CLIENT): B must stop serving from the cache, so a
/// logout made meanwhile (whose invalidation nobody receives) is refused at
/// once although the 60 s bound is far away. Then it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_invalidation_connection_flushes_the_cache() {
    let a = spawn_app().await;
    a.redis_cmd(&[
        "ACL",
        "SETUSER",
        "nc",
        "on",
        ">nc-password-0123456789",
        "~*",
        "&*",
        "+@all",
    ]);
    let url = a
        .redis_url
        .replace("redis://", "redis://nc:nc-password-0123456789@");
    let b = cached_instance(&a, &url, "60s").await;
    let s = a.create("nc-drop", "laptop").await;
    until_cached(&a, &b, &s.token).await;

    assert_eq!(a.redis_cmd(&["ACL", "SETUSER", "nc", "-client"]), "+OK\r\n");
    let list = a.redis_cmd(&["CLIENT", "LIST"]);
    let tracking: Vec<&str> = list
        .lines()
        .filter(|l| {
            l.contains(" user=nc ")
                && l.split(' ')
                    .any(|kv| kv.starts_with("flags=") && kv.contains('t'))
        })
        .filter_map(|l| l.split(' ').find_map(|kv| kv.strip_prefix("id=")))
        .collect();
    assert_eq!(tracking.len(), 1, "B's tracking connection in {list}");
    a.redis_cmd(&["CLIENT", "KILL", "ID", tracking[0]]);
    // B noticed: it tried to track again and was refused.
    eventually(Duration::from_secs(30), || async {
        a.redis_cmd(&["ACL", "LOG"]).contains("client|tracking")
    })
    .await;
    assert_eq!(a.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        b.verify_status(&s.token).await,
        StatusCode::UNAUTHORIZED,
        "B served a revoked session from a cache whose invalidations were lost"
    );
    assert_eq!(metric(&b, "sessiongate_near_cache_up").await, 0.0);

    assert_eq!(a.redis_cmd(&["ACL", "SETUSER", "nc", "+client"]), "+OK\r\n");
    eventually(Duration::from_secs(30), || async {
        metric(&b, "sessiongate_near_cache_up").await == 1.0
    })
    .await;
    let fresh = a.create("nc-drop", "phone").await;
    until_cached(&a, &b, &fresh.token).await;
}

/// A logout-all on A empties B's cache as soon as B hears of the new
/// cutoff, before any verify on B (the purge is held back, so no record is
/// written meanwhile and no invalidation comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_all_flushes_the_cache() {
    let a = crate::helpers::spawn_app_with(&[("LOGOUT_ALL_PURGE_DELAY", "1h")]).await;
    let b = spawn_app_on(
        &a.redis_url,
        &[("NEAR_CACHE_TTL", "60s"), ("LOGOUT_ALL_PURGE_DELAY", "1h")],
    )
    .await;
    eventually(Duration::from_secs(30), || async {
        metric(&b, "sessiongate_near_cache_up").await == 1.0
    })
    .await;
    let s = a.create("nc-all", "laptop").await;
    until_cached(&a, &b, &s.token).await;
    assert_eq!(metric(&b, "sessiongate_near_cache_entries").await, 1.0);
    assert_eq!(a.logout_all().await.status(), StatusCode::OK);
    eventually(Duration::from_secs(30), || async {
        metric(&b, "sessiongate_near_cache_entries").await == 0.0
    })
    .await;
    assert_eq!(b.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
}
