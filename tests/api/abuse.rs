//! HTTP abuse: header limits, slow clients, API-key guessing; the operator's
//! revoke-before command.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::{ADMIN_KEY, assert_error, spawn_app, spawn_app_with};

#[tokio::test]
async fn oversized_headers_get_431() {
    let app = spawn_app().await;
    let res = app
        .request(reqwest::Method::GET, "/healthz")
        .header("x-filler", "a".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_error(
        res,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
    )
    .await;
    // Just under the limit passes.
    let res = app
        .request(reqwest::Method::GET, "/healthz")
        .header("x-filler", "a".repeat(10_000))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_slow_client_is_cut_off_after_the_header_timeout() {
    let app = spawn_app_with(&[("CLIENT_REQUEST_TIMEOUT", "1s")]).await;
    let port = app.port;
    let (took, answer) = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let started = Instant::now();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (
            started.elapsed(),
            String::from_utf8_lossy(&answer).to_string(),
        )
    })
    .await
    .unwrap();
    // The 1 s header timeout, plus what a loaded machine adds; a server that
    // never cuts the client off holds it for the whole 15 s read timeout.
    assert!(
        took < Duration::from_secs(5),
        "connection held for {took:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "unexpected answer {answer:?}"
    );
}

#[tokio::test]
async fn repeated_wrong_keys_get_429_for_that_address_only() {
    let app = spawn_app_with(&[
        ("API_KEY_FAILURE_LIMIT", "3"),
        ("API_KEY_FAILURE_WINDOW", "60s"),
    ])
    .await;
    let attacker = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let logout_all = format!("{}/v1/admin/logout-all", app.address);
    for _ in 0..3 {
        let res = attacker
            .post(&logout_all)
            .bearer_auth("x".repeat(40))
            .send()
            .await
            .unwrap();
        assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // Blocked now, even with the right key.
    let res = attacker
        .post(&logout_all)
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("retry-after").is_some());
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
    // Another caller is unaffected.
    let s = app.create("alice", "laptop").await;
    let res = app.admin_list("alice").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn revoke_before_command_revokes_every_earlier_session() {
    let app = spawn_app().await;
    let old = app.create("bob", "laptop").await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .arg("revoke-before")
        .arg("now")
        .env("SESSIONGATE_REDIS_URL", &app.redis_url)
        .env("SESSIONGATE_ISSUER_KEYS", crate::helpers::ISSUER_KEY)
        .env("SESSIONGATE_ADMIN_KEYS", ADMIN_KEY)
        .env("SESSIONGATE_SIGNING_SECRET", crate::helpers::SIGNING_SECRET)
        .env_remove("SESSIONGATE_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("cutoff"));
    // The running instance learns the cutoff as it learns a logout-all:
    // within 1 s of the command's end.
    let done = Instant::now();
    tokio::time::sleep_until((done + Duration::from_secs(1)).into()).await;
    assert_eq!(
        app.verify_status(&old.token).await,
        StatusCode::UNAUTHORIZED,
        "an earlier session still verified 1 s after revoke-before"
    );
    let fresh = app.create("bob", "laptop").await;
    assert_eq!(app.verify_status(&fresh.token).await, StatusCode::OK);
}

#[tokio::test]
async fn a_bad_setting_stops_start_up_naming_the_variable() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .arg("serve")
        .env("SESSIONGATE_ISSUER_KEYS", crate::helpers::ISSUER_KEY)
        .env("SESSIONGATE_ADMIN_KEYS", ADMIN_KEY)
        .env("SESSIONGATE_SIGNING_SECRET", "too-short")
        .env_remove("SESSIONGATE_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SESSIONGATE_SIGNING_SECRET"), "{stderr}");
    assert!(
        !stderr.contains("too-short"),
        "the secret was echoed: {stderr}"
    );
}
