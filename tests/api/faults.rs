//! Redis slow, down, restarted or emptied: fail closed, bounded, and recover
//! without restarting the service.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::{
    FAST_REDIS_TIMEOUT, TestApp, assert_error, eventually, spawn_app, spawn_app_with,
};

fn redis(app: &TestApp) -> std::sync::MutexGuard<'_, crate::redis_server::TestRedis> {
    app.redis.as_ref().unwrap().lock().unwrap()
}

/// These tests run with a 1 s Redis timeout; an answer must come
/// within it plus what a loaded machine adds (generous: a CPU hog, eight
/// test threads), and well before Redis itself would have answered.
const BOUND: Duration = Duration::from_secs(3);
/// How long Redis stays frozen: twice [`BOUND`], so an answer that waited
/// for Redis cannot pass for a prompt one.
const PAUSE_MS: u64 = 6000;
/// Recovery after Redis is back: on its own, within this.
const RECOVERY: Duration = Duration::from_secs(20);

async fn spawn_fast_app() -> TestApp {
    spawn_app_with(&[("REDIS_TIMEOUT", FAST_REDIS_TIMEOUT)]).await
}

#[tokio::test]
async fn paused_redis_gives_503_within_the_bound_and_recovers() {
    let app = spawn_fast_app().await;
    let s = app.create("alice", "laptop").await;
    redis(&app).pause_ms(PAUSE_MS);
    let started = Instant::now();
    let res = app.verify(&s.token).await;
    let took = started.elapsed();
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert!(took < BOUND, "503 took {took:?}");
    // Creates and logouts are refused too; nothing answers "done".
    let res = app.create_raw(serde_json::json!({"user_id": "bob"})).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Recovery without a restart.
    eventually(RECOVERY, || async {
        app.verify_status(&s.token).await == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn killed_redis_gives_503_never_200_and_recovers_after_restart() {
    let app = spawn_fast_app().await;
    let s = app.create("carol", "laptop").await;
    redis(&app).kill9();
    for _ in 0..5 {
        let started = Instant::now();
        let res = app.verify(&s.token).await;
        assert!(started.elapsed() < BOUND);
        assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    }
    assert_eq!(
        app.logout(&s.token).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let res = app.create_raw(serde_json::json!({"user_id": "dave"})).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = res.text().await.unwrap();
    assert!(
        !body.contains("token\""),
        "a token without a stored record: {body}"
    );
    let ready = app
        .request(reqwest::Method::GET, "/readyz")
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let health = app
        .request(reqwest::Method::GET, "/healthz")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    redis(&app).restart();
    eventually(RECOVERY, || async {
        app.verify_status(&s.token).await == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn acknowledged_logout_and_create_survive_kill_9() {
    let app = spawn_app().await;
    let gone = app.create("erin", "laptop").await;
    let kept = app.create("erin", "phone").await;
    assert_eq!(
        app.logout(&gone.token).await.status(),
        StatusCode::NO_CONTENT
    );
    let late = app.create("frank", "laptop").await;
    // No pause: kill right after the acknowledgements.
    redis(&app).kill9();
    redis(&app).restart();
    eventually(RECOVERY, || async {
        app.verify_status(&kept.token).await == StatusCode::OK
    })
    .await;
    assert_eq!(app.verify_status(&late.token).await, StatusCode::OK);
    assert_eq!(
        app.verify_status(&gone.token).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn redis_restarted_empty_refuses_every_earlier_token_and_keeps_serving() {
    let app = spawn_app().await;
    let old = app.create("gina", "laptop").await;
    {
        let mut r = redis(&app);
        r.kill9();
        // Data lost: remove the AOF before the restart.
        for entry in std::fs::read_dir(r.dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            }
        }
        r.restart();
    }
    // Once the state is re-initialised, new logins work and the old token is
    // refused. A create that works is not the sign of it: the empty Redis
    // takes creates (signed with the cached key ring) before this instance's
    // refresher re-initialises the state, whose cutoff "now" then revokes
    // them (see the report on issue 13). So wait for the new key id in
    // Redis, then for this instance to sign with it.
    let new_kid = eventually_value(RECOVERY, || {
        let reply = redis(&app).try_cmd(&["HGET", "sg:global", "ring"]).ok()?;
        let json = reply.lines().nth(1)?;
        let ring: serde_json::Value = serde_json::from_str(json).ok()?;
        Some(ring["active"].as_str()?.to_string())
    })
    .await;
    eventually(RECOVERY, || async {
        let res = app.create_raw(serde_json::json!({"user_id": "hank"})).await;
        if res.status() != StatusCode::CREATED {
            return false;
        }
        let body: serde_json::Value = res.json().await.unwrap();
        kid_of(body["token"].as_str().unwrap()) == new_kid
    })
    .await;
    assert_eq!(
        app.verify_status(&old.token).await,
        StatusCode::UNAUTHORIZED
    );
    let fresh = app.create("gina", "laptop").await;
    assert_eq!(app.verify_status(&fresh.token).await, StatusCode::OK);
}

/// The `kid` in a token's header.
fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_string()
}

/// Polls `read` every 20 ms until it gives a value, or panics after `within`.
async fn eventually_value<T>(within: Duration, mut read: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = read() {
            return value;
        }
        assert!(started.elapsed() < within, "no value within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
