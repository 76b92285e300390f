//! What sessiongate leaves in Redis: keys, TTLs, writes and round trips.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_with};

/// Every key in the app's Redis (SCAN; KEYS is disabled by redis.conf).
fn all_keys(app: &TestApp) -> Vec<String> {
    let reply = app.redis_cmd(&["SCAN", "0", "MATCH", "*", "COUNT", "10000"]);
    // RESP: *2 $1 0 *N $len key ...
    let lines: Vec<&str> = reply.split("\r\n").collect();
    assert_eq!(lines[2], "0", "one SCAN page is enough here: {reply}");
    lines[4..]
        .chunks(2)
        .filter_map(|c| c.get(1).map(|k| k.to_string()))
        .filter(|k| !k.is_empty())
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

#[tokio::test]
async fn verify_is_one_round_trip_and_does_not_write_within_the_touch_interval() {
    let app = spawn_app().await;
    let s = app.create("bob", "laptop").await;
    // Warm up: the first call after start may load the script.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    let before = counts(&app);
    for _ in 0..20 {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }
    let after = counts(&app);
    // One EVALSHA per verify; the script's inner HGETs are not round trips.
    assert_eq!(delta(&after, &before, "evalsha"), 20);
    assert_eq!(delta(&after, &before, "eval"), 0);
    assert_eq!(
        delta(&after, &before, "hset"),
        0,
        "verify wrote within the touch interval"
    );
    assert_eq!(delta(&after, &before, "pexpireat"), 0);
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
