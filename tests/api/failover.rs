//! Replicated Redis: `SESSIONGATE_REDIS_MIN_REPLICAS_ACK` (acknowledged
//! means replicated) and Sentinel failovers (kill -9 of the primary, a
//! primary partitioned away), on real `redis-server`s.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::{TestApp, assert_error, spawn_app_on};
use crate::redis_server::TestRedis;
use crate::sentinel::freeze;

/// A primary and one replica, no Sentinel: enough for `WAIT`.
fn primary_and_replica() -> (TestRedis, TestRedis) {
    let primary = TestRedis::start_with_own_conf(&["--repl-diskless-sync-delay", "0"]);
    let port = primary.port().to_string();
    let replica = TestRedis::start_with_own_conf(&["--replicaof", "127.0.0.1", &port]);
    let started = Instant::now();
    while !primary
        .cmd(&["INFO", "replication"])
        .contains("state=online")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "replica never in sync"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (primary, replica)
}

async fn assert_not_confirmed(res: reqwest::Response) {
    let body = assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("may have been applied"), "{message}");
    assert!(message.contains("safe to retry"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replica_acks_every_change_waits_for_a_replica_and_verify_never_does() {
    let (primary, replica) = primary_and_replica();
    let app = spawn_app_on(
        &primary.url(),
        &[("REDIS_MIN_REPLICAS_ACK", "1"), ("REDIS_TIMEOUT", "500ms")],
    )
    .await;
    let a = app.create("alice", "laptop").await;
    let b = app.create("alice", "phone").await;
    let c = app.create("carol", "laptop").await;
    assert_eq!(app.logout(&c.token).await.status(), StatusCode::NO_CONTENT);
    let waits = |app: &TestApp| app_waits(&primary, app);
    let before = waits(&app);
    assert!(before >= 2, "create and logout ran WAIT ({before})");

    freeze(&replica, true);
    // Verify never waits: still 200 at once while no replica answers.
    assert_eq!(app.verify_status(&a.token).await, StatusCode::OK);
    // Every acknowledged change is refused, saying it may have applied.
    assert_not_confirmed(app.logout(&a.token).await).await;
    let res = app.create_raw(serde_json::json!({"user_id": "dave"})).await;
    let body_text = {
        let body = assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
        assert!(
            body.get("token").is_none(),
            "no token for an unconfirmed create: {body}"
        );
        body.to_string()
    };
    assert!(body_text.contains("safe to retry"), "{body_text}");
    assert_not_confirmed(app.admin_revoke_device("alice", "phone").await).await;
    assert_not_confirmed(app.admin_revoke_user("alice", None).await).await;
    assert_not_confirmed(app.reauth(&b.session_id).await).await;
    assert_not_confirmed(app.rotate_keys().await).await;
    assert_not_confirmed(app.logout_all().await).await;
    freeze(&replica, false);

    // Back: the retries are acknowledged (each revocation is idempotent).
    let e = app.create("erin", "laptop").await;
    assert_eq!(app.logout(&e.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.reauth(&c.session_id).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(app.logout_all().await.status(), StatusCode::OK);
    for token in [&a.token, &b.token, &e.token] {
        assert_eq!(app.verify_status(token).await, StatusCode::UNAUTHORIZED);
    }
    // The verify calls above never ran WAIT: only changes did.
    let verifies_before = waits(&app);
    for _ in 0..5 {
        app.verify_status(&a.token).await;
    }
    assert_eq!(waits(&app), verifies_before, "verify must not WAIT");
}

/// How many `WAIT`s the primary has run (INFO commandstats).
fn app_waits(primary: &TestRedis, _app: &TestApp) -> u64 {
    let info = primary.cmd(&["INFO", "commandstats"]);
    crate::helpers::command_counts(&info)
        .get("wait")
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replica_acks_a_stopped_replica_changes_nothing() {
    let (primary, replica) = primary_and_replica();
    let app = spawn_app_on(&primary.url(), &[("REDIS_TIMEOUT", "500ms")]).await;
    let a = app.create("alice", "laptop").await;
    freeze(&replica, true);
    let b = app.create("bob", "laptop").await;
    assert_eq!(app.logout(&a.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.logout(&b.token).await.status(), StatusCode::NO_CONTENT);
    freeze(&replica, false);
    assert_eq!(
        app_waits(&primary, &app),
        0,
        "no WAIT with MIN_REPLICAS_ACK=0"
    );
}
