//! Several instances sharing one Redis: revocation reaches all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_on};

async fn pair() -> (TestApp, TestApp) {
    let a = spawn_app().await;
    let b = spawn_app_on(&a.redis_url, &[]).await;
    (a, b)
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    json["kid"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn logout_on_one_instance_is_refused_at_once_on_the_other() {
    let (a, b) = pair().await;
    let s = a.create("alice", "laptop").await;
    assert_eq!(b.verify_status(&s.token).await, StatusCode::OK);
    assert_eq!(a.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    // The very next request on B, no waiting.
    assert_eq!(b.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn force_logout_of_a_user_is_refused_at_once_on_the_other() {
    let (a, b) = pair().await;
    let s1 = a.create("bob", "laptop").await;
    let s2 = b.create("bob", "phone").await;
    let res = a.admin_revoke_user("bob", None).await;
    assert_eq!(res.json::<Value>().await.unwrap()["revoked"], 2);
    assert_eq!(b.verify_status(&s1.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(b.verify_status(&s2.token).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn logout_all_reaches_the_other_instance_within_a_second() {
    let (a, b) = pair().await;
    let s = b.create("carol", "laptop").await;
    assert_eq!(b.verify_status(&s.token).await, StatusCode::OK);
    let started = Instant::now();
    assert_eq!(a.logout_all().await.status(), StatusCode::OK);
    // At once on the instance that served it.
    assert_eq!(a.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
    let took = eventually(Duration::from_secs(1), || async {
        b.verify_status(&s.token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(1), "took {took:?}");
    // New logins work on both.
    let fresh = b.create("carol", "laptop").await;
    assert_eq!(a.verify_status(&fresh.token).await, StatusCode::OK);
}

#[tokio::test]
async fn logout_all_reaches_the_other_instance_without_pubsub() {
    let (a, b) = pair().await;
    let s = b.create("dan", "laptop").await;
    // Cut every pub/sub connection: only the periodic re-read is left (the
    // listener reconnects after a while, but not within this test's window).
    a.redis_cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(a.logout_all().await.status(), StatusCode::OK);
    eventually(Duration::from_secs(1), || async {
        b.verify_status(&s.token).await == StatusCode::UNAUTHORIZED
    })
    .await;
}

#[tokio::test]
async fn key_rotation_reaches_the_other_instance_and_old_tokens_still_verify() {
    let (a, b) = pair().await;
    let before = b.create("erin", "laptop").await;
    let old_kid = kid_of(&before.token);
    let res = a.rotate_keys().await;
    assert_eq!(res.status(), StatusCode::OK);
    let new_kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_kid, old_kid);
    eventually(Duration::from_secs(1), || async {
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verifiers_never_pass_after_an_acknowledged_logout() {
    let (a, b) = pair().await;
    let a = Arc::new(a);
    let b = Arc::new(b);
    let s = a.create("frank", "laptop").await;
    let token = Arc::new(s.token.clone());
    let stop_at = Instant::now() + Duration::from_millis(900);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let app = if i % 2 == 0 { a.clone() } else { b.clone() };
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < stop_at {
                let started = Instant::now();
                let status = app.verify_status(&token).await;
                seen.push((started, status));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    let acked = Instant::now();
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
    assert!(after > 0, "no request was sent after the logout");
}
