//! Fail closed on a stale global state: only the refresher is broken (its
//! read, `HMGET` of the global hash, is denied by an ACL rule; the session
//! reads are plain `HGET`s and the session scripts keep working).

use std::time::Duration;

use reqwest::{Method, StatusCode};

use crate::fault_proxy::FaultProxy;
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
}

/// The bound includes the verify's own Redis call. B's refresher fails
/// (HMGET denied to its Redis user) while its request connections work, but
/// slowly: every reply to B comes 4 s late, longer than B's 3 s staleness
/// bound and shorter than its 6 s Redis timeout. A logs everyone out (purge
/// held back, so the records stay and B's old cutoff would find them alive).
/// Every verify sent to B after the acknowledgement could only be confirmed
/// more than 4 s later, past the bound: none may answer 200. Before the fix
/// those whose copy was still fresh when sent answered 200, 4 s after the
/// logout-all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_cutoff_token_is_never_confirmed_past_the_bound_even_by_a_slow_call() {
    let a = spawn_app_with(&[("LOGOUT_ALL_PURGE_DELAY", "1h")]).await;
    let port: u16 = a
        .redis_url
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches("/0")
        .parse()
        .unwrap();
    a.redis_cmd(&[
        "ACL",
        "SETUSER",
        "slow",
        "on",
        ">slow-password-0123456789",
        "~*",
        "&*",
        "+@all",
    ]);
    let proxy = FaultProxy::for_port(port).await;
    let b = spawn_app_on(
        &format!("redis://slow:slow-password-0123456789@{}/0", proxy.addr()),
        &[
            ("LOGOUT_ALL_PURGE_DELAY", "1h"),
            ("REDIS_TIMEOUT", "6s"),
            ("STATE_REFRESH_INTERVAL", "250ms"),
            ("STATE_MAX_STALENESS", "3s"),
        ],
    )
    .await;
    let b = std::sync::Arc::new(b);
    let s = b.create("alice", "laptop").await;
    assert_eq!(b.verify_status(&s.token).await, StatusCode::OK);

    assert_eq!(
        a.redis_cmd(&["ACL", "SETUSER", "slow", "-hmget"]),
        "+OK\r\n"
    );
    proxy.delay(Duration::from_secs(4));
    assert_eq!(a.logout_all().await.status(), StatusCode::OK);
    let mut verifies = Vec::new();
    // Half of them on a route demanding a fresh password (max_age=0): a
    // re-authentication demand would rest on the same stale cutoff, so it
    // is a 503 too, never a 401 insufficient_user_authentication.
    for i in 0..10 {
        let b = b.clone();
        let token = s.token.clone();
        let path = if i % 2 == 0 {
            "/v1/verify"
        } else {
            "/v1/verify?max_age=0"
        };
        verifies.push(tokio::spawn(async move {
            (path, b.verify_at(path, &token).await.status())
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for v in verifies {
        let (path, status) = v.await.unwrap();
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path} sent after the logout-all was answered {status}"
        );
    }
    // The record was there all along (B's old cutoff found it alive).
    assert_eq!(crate::events::non_event_keys(&a), 2);

    // Healed: B learns the cutoff and refuses the token.
    proxy.heal();
    a.redis_cmd(&["ACL", "SETUSER", "slow", "+hmget"]);
    eventually(Duration::from_secs(30), || async {
        b.verify_status(&s.token).await == StatusCode::UNAUTHORIZED
    })
    .await;
}
