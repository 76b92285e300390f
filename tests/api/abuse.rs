//! HTTP abuse: header limits, slow clients, API-key guessing; the operator's
//! revoke-before command.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use crate::helpers::{ADMIN_KEY, ISSUER_KEY, assert_error, spawn_app, spawn_app_with};

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
    let attacker = client_from("127.0.0.2");
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
    // Blocked now: wrong and missing keys get 429 with Retry-After.
    for auth in [Some("x".repeat(40)), None] {
        let mut req = attacker.post(&logout_all);
        if let Some(key) = auth {
            req = req.bearer_auth(key);
        }
        let res = req.send().await.unwrap();
        assert!(res.headers().get("retry-after").is_some());
        assert_error(res, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
    }
    // Another caller is unaffected.
    let s = app.create("alice", "laptop").await;
    let res = app.admin_list("alice").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_right_key_is_accepted_from_a_throttled_address() {
    // A shared NAT: someone behind it sends 20 wrong keys; the login backend
    // and an operator behind the same address must still get in.
    let app = spawn_app_with(&[
        ("API_KEY_FAILURE_LIMIT", "5"),
        ("API_KEY_FAILURE_WINDOW", "60s"),
    ])
    .await;
    let nat = client_from("127.0.0.3");
    let sessions = format!("{}/v1/sessions", app.address);
    let mut throttled = 0;
    for _ in 0..20 {
        let res = nat
            .post(&sessions)
            .bearer_auth("y".repeat(40))
            .json(&serde_json::json!({"user_id": "mallory"}))
            .send()
            .await
            .unwrap();
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(res.headers().get("retry-after").is_some());
            throttled += 1;
        } else {
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        }
    }
    assert_eq!(throttled, 15, "the 6th to 20th wrong keys are throttled");
    // The right issuer key, from the throttled address, over and over.
    for i in 0..10 {
        let res = nat
            .post(&sessions)
            .bearer_auth(ISSUER_KEY)
            .json(&serde_json::json!({"user_id": format!("user-{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "login {i}");
    }
    let res = nat
        .get(format!("{}/v1/admin/users/user-0/sessions", app.address))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // A right key does not lift the block for wrong ones.
    let res = nat
        .post(&sessions)
        .bearer_auth("y".repeat(40))
        .json(&serde_json::json!({"user_id": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
    // Right keys never count: a busy backend on a fresh address is never
    // throttled, and its first wrong key is a plain 401.
    let backend = client_from("127.0.0.4");
    for i in 0..10 {
        let res = backend
            .post(&sessions)
            .bearer_auth(ISSUER_KEY)
            .json(&serde_json::json!({"user_id": format!("busy-{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let res = backend
        .post(&sessions)
        .bearer_auth("y".repeat(40))
        .json(&serde_json::json!({"user_id": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

/// A request with two `Authorization` headers.
fn two_authorizations(
    req: reqwest::RequestBuilder,
    first: &str,
    second: &str,
) -> reqwest::RequestBuilder {
    // `header` appends: both values are sent, as two header lines.
    req.header("authorization", format!("Bearer {first}"))
        .header("authorization", format!("Bearer {second}"))
}

#[tokio::test]
async fn two_authorization_headers_are_refused_never_first_wins() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let other = app.create("bob", "phone").await;
    let second = app.create("alice", "tablet").await;
    let logout_second = format!("/v1/sessions/{}", second.session_id);
    let pairs = [
        (s.token.as_str(), s.token.as_str()),
        (s.token.as_str(), "garbage"),
        ("garbage", s.token.as_str()),
        (s.token.as_str(), other.token.as_str()),
    ];
    let token_routes = [
        (Method::GET, "/v1/verify"),
        (Method::POST, "/v1/verify/some/tail"),
        (Method::GET, "/v1/sessions/current"),
        (Method::GET, "/v1/sessions"),
        (Method::DELETE, "/v1/sessions/current"),
        (Method::DELETE, "/v1/sessions"),
        (Method::DELETE, logout_second.as_str()),
    ];
    for (method, path) in &token_routes {
        for (first, second) in pairs {
            let req = two_authorizations(app.request(method.clone(), path), first, second);
            let res = req.send().await.unwrap();
            let www = res.headers().get("www-authenticate").cloned();
            assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
            assert!(
                www.unwrap().to_str().unwrap().contains("invalid_token"),
                "{method} {path}"
            );
        }
    }
    // Nothing was done: every session lives.
    for live in [&s, &other, &second] {
        assert_eq!(app.verify_status(&live.token).await, StatusCode::OK);
    }

    // API keys: two headers, even both right, are a refused key (401).
    let before = app.redis_cmd(&["DBSIZE"]);
    for (first, second) in [
        (ISSUER_KEY, ISSUER_KEY),
        (ISSUER_KEY, "z".repeat(40).as_str()),
    ] {
        let res = two_authorizations(app.request(Method::POST, "/v1/sessions"), first, second)
            .json(&serde_json::json!({"user_id": "carol"}))
            .send()
            .await
            .unwrap();
        assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let res = two_authorizations(
        app.request(Method::POST, "/v1/admin/logout-all"),
        ADMIN_KEY,
        ADMIN_KEY,
    )
    .send()
    .await
    .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(app.redis_cmd(&["DBSIZE"]), before, "nothing stored");
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn two_cookies_of_the_configured_name_are_refused() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let other = app.create("bob", "phone").await;
    let t = s.token.as_str();
    let get = |path: &str| app.request(Method::GET, path);
    for path in ["/v1/verify", "/v1/verify/x", "/v1/sessions/current"] {
        // One cookie of that name, among others: accepted.
        let res = get(path)
            .header("cookie", format!("theme=dark; session={t}; sessionx=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let twice = [
            vec![format!("session={t}; session={t}")],
            vec![format!("session={t}; session={}", other.token)],
            vec![format!("session=garbage; session={t}")],
            vec![format!("session={t}"), format!("session={t}")],
            vec![
                format!("theme=dark; session={t}"),
                format!("session=garbage"),
            ],
        ];
        for headers in twice {
            let mut req = get(path);
            for h in &headers {
                req = req.header("cookie", h);
            }
            let res = req.send().await.unwrap();
            assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
        }
    }
    // A logout with two cookies does nothing.
    let res = app
        .request(Method::DELETE, "/v1/sessions/current")
        .header("cookie", format!("session={t}; session={t}"))
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert_eq!(app.verify_status(t).await, StatusCode::OK);
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

/// `sessiongate serve` with the test keys and `extra` variables; it must
/// stop at start-up (before touching Redis: the URL points nowhere).
async fn serve_refused(extra: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"));
    cmd.arg("serve")
        .env("SESSIONGATE_ISSUER_KEYS", crate::helpers::ISSUER_KEY)
        .env("SESSIONGATE_ADMIN_KEYS", ADMIN_KEY)
        .env("SESSIONGATE_SIGNING_SECRET", crate::helpers::SIGNING_SECRET)
        .env("SESSIONGATE_REDIS_URL", "redis://127.0.0.1:1/0")
        .env("SESSIONGATE_LISTEN", "127.0.0.1:0")
        .env_remove("SESSIONGATE_CONFIG")
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("sessiongate stopped at start-up")
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "configuration error exit");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn an_unknown_sessiongate_variable_stops_start_up_naming_it() {
    let stderr = serve_refused(&[("SESSIONGATE_REDIS_ULR", "redis://10.0.0.1:6379/0")]).await;
    assert!(
        stderr.contains("SESSIONGATE_REDIS_ULR")
            && stderr.contains("did you mean SESSIONGATE_REDIS_URL?"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("10.0.0.1"),
        "the value was echoed: {stderr}"
    );
    let stderr = serve_refused(&[("SESSIONGATE_NO_SUCH_THING_AT_ALL", "1")]).await;
    assert!(
        stderr.contains("SESSIONGATE_NO_SUCH_THING_AT_ALL") && !stderr.contains("did you mean"),
        "{stderr}"
    );
    // A v1.1 variable this build does not implement is not ignored.
    for name in sessiongate::config::unsupported_v1_1_env() {
        let stderr = serve_refused(&[(name, "127.0.0.1:9191")]).await;
        assert!(
            stderr.contains(name) && stderr.contains("does not support"),
            "{stderr}"
        );
    }
    // The client-side names are allowed: the error is about the bad
    // setting, not about them.
    let stderr = serve_refused(&[
        ("SESSIONGATE_URL", "http://127.0.0.1:8080"),
        ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY),
        ("SESSIONGATE_ADMIN_KEY_FILE", "/nonexistent"),
        ("SESSIONGATE_WORKERS", "two"),
    ])
    .await;
    assert!(stderr.contains("SESSIONGATE_WORKERS"), "{stderr}");
    assert!(!stderr.contains("SESSIONGATE_URL"), "{stderr}");
}
