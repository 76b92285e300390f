//! Fail closed on a stale global state: only the refresher is broken (its
//! read, `HMGET` of the global hash, is denied by an ACL rule; the session
//! scripts read with `HGET` inside `EVALSHA` and keep working).

use std::time::Duration;

use reqwest::{Method, StatusCode};

use crate::helpers::{TestApp, assert_error, eventually, spawn_app_on, spawn_app_with};

/// `sessiongate_global_state_age_seconds` from `/metrics`.
async fn state_age(app: &TestApp) -> f64 {
    let text = app
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("sessiongate_global_state_age_seconds "))
        .expect("the state age gauge")
        .trim()
        .parse()
        .unwrap()
}

/// Calls to `HMGET` that Redis refused (ACL), from `INFO commandstats`.
fn refused_hmgets(app: &TestApp) -> u64 {
    app.redis_cmd(&["INFO", "commandstats"])
        .lines()
        .find(|l| l.starts_with("cmdstat_hmget:"))
        .and_then(|l| {
            l.split(',')
                .find_map(|kv| kv.strip_prefix("rejected_calls="))
        })
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_closed_once_the_cached_state_is_stale_and_recovers() {
    let app = spawn_app_with(&[
        ("STATE_REFRESH_INTERVAL", "100ms"),
        ("STATE_MAX_STALENESS", "1s"),
    ])
    .await;
    // A second instance as another Redis user, whose refresher keeps working:
    // it shows the session scripts still run while the first one refuses.
    app.redis_cmd(&[
        "ACL",
        "SETUSER",
        "healthy",
        "on",
        ">healthy-password-0123456789",
        "~*",
        "&*",
        "+@all",
    ]);
    let other = spawn_app_on(
        &app.redis_url
            .replace("redis://", "redis://healthy:healthy-password-0123456789@"),
        &[],
    )
    .await;
    let s = app.create("alice", "laptop").await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);

    // Only the refresher's read fails from now on (for the default user).
    assert_eq!(
        app.redis_cmd(&["ACL", "SETUSER", "default", "-hmget"]),
        "+OK\r\n"
    );
    eventually(Duration::from_secs(30), || async {
        app.verify_status(&s.token).await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(
        refused_hmgets(&app) > 0,
        "the refresher's read was not refused"
    );
    let age = state_age(&app).await;
    assert!(age > 1.0, "503 with a copy only {age} s old");
    assert_error(
        app.verify(&s.token).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    )
    .await;
    // Meanwhile the scripts work: the same session verifies elsewhere.
    assert_eq!(other.verify_status(&s.token).await, StatusCode::OK);

    // The refresher can read again: back to 200.
    assert_eq!(
        app.redis_cmd(&["ACL", "SETUSER", "default", "+hmget"]),
        "+OK\r\n"
    );
    eventually(Duration::from_secs(30), || async {
        app.verify_status(&s.token).await == StatusCode::OK
    })
    .await;
    assert!(state_age(&app).await < 1.0);
}
