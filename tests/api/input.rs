//! Bad input on every endpoint: a clear 4xx with the JSON error body, and
//! nothing stored. And the boundaries that must still pass.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::admin::user_hashes;
use crate::helpers::{ADMIN_KEY, ISSUER_KEY, TestApp, assert_error, spawn_app};

/// Sends a raw `POST /v1/sessions` body (as given, with this content type).
async fn create_text(app: &TestApp, content_type: &str, body: &str) -> reqwest::Response {
    app.issuer(Method::POST, "/v1/sessions")
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// Asserts the admin listing of `user` is empty.
async fn assert_no_sessions(app: &TestApp, user: &str) {
    let res = app.admin_list(user).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body, json!({"sessions": []}), "sessions of {user:?}");
}

/// Sends one HTTP/1.1 request with a chunked body over a plain socket and
/// returns (status, headers and body as text).
fn raw_chunked_post(
    port: u16,
    path: &str,
    auth: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {auth}\r\n\
         Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before it read everything: ignore
    // write errors, read the answer.
    for chunk in body.chunks(1000) {
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|_| stream.write_all(chunk))
            .and_then(|_| stream.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    (status, text)
}

#[tokio::test]
async fn create_refuses_malformed_bodies_and_stores_nothing() {
    let app = spawn_app().await;
    let cases = [
        "{",
        "",
        "null",
        "[]",
        r#"[{"user_id": "u1"}]"#,
        r#""u1""#,
        r#"{"user_id": 5}"#,
        r#"{"user_id": null}"#,
        r#"{"user_id": ["u1"]}"#,
        r#"{"user_id": "u1", "auth_time": "x"}"#,
        r#"{"user_id": "u1", "auth_time": 1.5}"#,
        r#"{"user_id": "u1", "device_id": 7}"#,
        r#"{"user_id": "u1", "metadata": "x"}"#,
        r#"{"user_id": "u1", "metadata": []}"#,
        r#"{"user_id": "u1", "metadata": 3}"#,
        r#"{"device_id": "d"}"#,
        r#"{"user_id": "u1", "role": "admin"}"#,
        r#"{"user_id": "u1", "user_id": "u2"}"#,
        r#"{"user_id": "u1"} trailing"#,
    ];
    for body in cases {
        let res = create_text(&app, "application/json", body).await;
        let err = assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(!err.to_string().contains(ISSUER_KEY), "{err}");
    }
    // A fine body with the wrong content type, or none.
    let good = r#"{"user_id": "u1", "device_id": "d"}"#;
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let res = create_text(&app, ct, good).await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let res = app
        .issuer(Method::POST, "/v1/sessions")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;

    // Nesting past the parser's depth limit, and bytes that are not UTF-8.
    let deep = format!(
        r#"{{"user_id": "u1", "metadata": {{"k": {}{}}}}}"#,
        "[".repeat(500),
        "]".repeat(500)
    );
    let res = create_text(&app, "application/json", &deep).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    let res = app
        .issuer(Method::POST, "/v1/sessions")
        .header("content-type", "application/json")
        .body(b"{\"user_id\": \"u1\xff\"}".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;

    for user in ["u1", "u2"] {
        assert_no_sessions(&app, user).await;
    }
    assert_eq!(user_hashes(&app), Vec::<String>::new());
}

#[tokio::test]
async fn create_refuses_bad_ids_and_stores_nothing() {
    let app = spawn_app().await;
    let long = "a".repeat(129);
    let euro_129_bytes = "€".repeat(43);
    assert_eq!(euro_129_bytes.len(), 129);
    let bad_ids = [
        "",
        long.as_str(),
        euro_129_bytes.as_str(),
        "a\nb",
        "a\rb",
        "a\tb",
        "a\u{0}b",
        "a\u{7f}b",
        "a\u{85}b",
        "\u{1b}[31m",
    ];
    for bad in bad_ids {
        let res = app
            .create_raw(json!({"user_id": bad, "device_id": "d"}))
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
        let res = app
            .create_raw(json!({"user_id": "valid-user", "device_id": bad}))
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert_no_sessions(&app, "valid-user").await;
    assert_eq!(user_hashes(&app), Vec::<String>::new());
}

#[tokio::test]
async fn create_refuses_bad_metadata_and_stores_nothing() {
    let app = spawn_app().await;
    let mut seventeen = Map::new();
    for i in 0..17 {
        seventeen.insert(format!("k{i}"), json!(i));
    }
    // {"k":"…"} is 8 bytes plus the value: 4089 characters make 4097 bytes.
    let over = json!({"k": "x".repeat(4089)});
    assert_eq!(serde_json::to_string(&over).unwrap().len(), 4097);
    // Escapes count as serialized: 2045 quotes are 4098 bytes of JSON text.
    let escaped = json!({"k": "\"".repeat(2045)});
    assert_eq!(serde_json::to_string(&escaped).unwrap().len(), 4098);
    let cases = [
        Value::Object(seventeen),
        over,
        escaped,
        json!({"": "x"}),
        json!({"k".repeat(129): "x"}),
        json!({"a\nb": "x"}),
        json!({"a\u{0}": "x"}),
    ];
    for metadata in cases {
        let res = app
            .create_raw(json!({"user_id": "valid-user", "metadata": metadata}))
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert_no_sessions(&app, "valid-user").await;
    assert_eq!(user_hashes(&app), Vec::<String>::new());
}

#[tokio::test]
async fn create_refuses_an_auth_time_in_the_future() {
    let app = spawn_app().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for auth_time in [now + 3600, now + 60, i64::MAX, -1] {
        let res = app
            .create_raw(json!({"user_id": "valid-user", "auth_time": auth_time}))
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert_no_sessions(&app, "valid-user").await;
    assert_eq!(user_hashes(&app), Vec::<String>::new());
}

#[tokio::test]
async fn create_refuses_a_body_over_the_limit() {
    let app = spawn_app().await;
    // Valid JSON of 17 KiB (the metadata alone would be refused later; the
    // size must be refused first).
    let body =
        json!({"user_id": "valid-user", "metadata": {"pad": "x".repeat(17 * 1024)}}).to_string();
    assert!(body.len() > 16 * 1024);
    let res = create_text(&app, "application/json", &body).await;
    assert_error(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    // The same without a Content-Length (chunked), over a plain socket.
    let port = app.port;
    let raw = body.clone();
    let (status, text) = tokio::task::spawn_blocking(move || {
        raw_chunked_post(
            port,
            "/v1/sessions",
            ISSUER_KEY,
            "application/json",
            raw.as_bytes(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 413, "{text}");
    assert!(text.contains(r#""error":"payload_too_large""#), "{text}");

    // A chunked body under the limit is accepted.
    let small = json!({"user_id": "chunked-user", "device_id": "d"}).to_string();
    let (status, text) = tokio::task::spawn_blocking(move || {
        raw_chunked_post(
            port,
            "/v1/sessions",
            ISSUER_KEY,
            "application/json",
            small.as_bytes(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{text}");

    assert_no_sessions(&app, "valid-user").await;
    let res = app.admin_list("chunked-user").await;
    let list: Value = res.json().await.unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test]
async fn create_accepts_the_boundaries() {
    let app = spawn_app().await;
    let long = "a".repeat(128);
    let long_unicode = "é".repeat(64);
    assert_eq!(long_unicode.len(), 128);
    for (user, device) in [
        (long.as_str(), long.as_str()),
        (long_unicode.as_str(), "ünï-çødé 📱"),
        ("用户", "设备"),
        ("x", "y"),
    ] {
        let s = app
            .create_body(json!({"user_id": user, "device_id": device}))
            .await;
        assert_eq!(s.user_id, user);
        assert_eq!(s.device_id, device);
        let res = app.verify(&s.token).await;
        assert_eq!(res.status(), StatusCode::OK, "{user}");
        assert_eq!(res.headers()["x-session-user"].as_bytes(), user.as_bytes());
        assert_eq!(
            res.headers()["x-session-device"].as_bytes(),
            device.as_bytes()
        );
        let list: Value = app.admin_list(user).await.json().await.unwrap();
        assert_eq!(list["sessions"][0]["device_id"], device, "{list}");
    }

    // 16 entries, keys of 128 bytes.
    let mut sixteen = Map::new();
    for i in 0..15 {
        sixteen.insert(format!("k{i:02}"), json!({"nested": [i, "v"]}));
    }
    sixteen.insert("k".repeat(128), json!(null));
    let metadata = Value::Object(sixteen);
    app.create_body(json!({"user_id": "meta16", "metadata": metadata}))
        .await;
    let list: Value = app.admin_list("meta16").await.json().await.unwrap();
    assert_eq!(list["sessions"][0]["metadata"], metadata);

    // Exactly 4096 bytes of compact JSON.
    let exact = json!({"k": "x".repeat(4088)});
    assert_eq!(serde_json::to_string(&exact).unwrap().len(), 4096);
    app.create_body(json!({"user_id": "meta4096", "metadata": exact}))
        .await;
    let list: Value = app.admin_list("meta4096").await.json().await.unwrap();
    assert_eq!(list["sessions"][0]["metadata"], exact);

    // Multi-byte values count in bytes: 2044 × "é" is 4088 bytes.
    let exact = json!({"k": "é".repeat(2044)});
    assert_eq!(serde_json::to_string(&exact).unwrap().len(), 4096);
    app.create_body(json!({"user_id": "meta4096u", "metadata": exact}))
        .await;
    let over = json!({"k": "é".repeat(2045)});
    let res = app
        .create_raw(json!({"user_id": "meta4098u", "metadata": over}))
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;

    // An auth_time in the past, and now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for auth_time in [now - 3600, now] {
        let s = app
            .create_body(
                json!({"user_id": "timed", "device_id": format!("d{auth_time}"),
                "auth_time": auth_time}),
            )
            .await;
        assert_eq!(s.body["auth_time"], auth_time);
    }
}

#[tokio::test]
async fn token_endpoints_refuse_missing_garbage_and_basic_credentials() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let other = app.create("alice", "phone").await;
    let endpoints = [
        (Method::GET, "/v1/sessions/current".to_string()),
        (Method::DELETE, "/v1/sessions/current".to_string()),
        (Method::GET, "/v1/sessions".to_string()),
        (Method::DELETE, "/v1/sessions".to_string()),
        (Method::DELETE, format!("/v1/sessions/{}", other.session_id)),
        (Method::GET, "/v1/verify".to_string()),
    ];
    let credentials = [
        None,
        Some("Bearer garbage".to_string()),
        Some("Bearer ".to_string()),
        Some("Bearer a.b.c".to_string()),
        Some(format!("Basic {}", s.token)),
        Some(format!("Bearer {ISSUER_KEY}")),
        Some(format!("Bearer {ADMIN_KEY}")),
        Some(format!("Bearer {}", "x".repeat(5000))),
    ];
    for (method, path) in &endpoints {
        for auth in &credentials {
            let mut req = app.request(method.clone(), path);
            if let Some(value) = auth {
                req = req.header("authorization", value);
            }
            let res = req.send().await.unwrap();
            let www = res
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let err = assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
            assert!(
                www.starts_with("Bearer") && www.contains(r#"error="invalid_token""#),
                "{method} {path} {auth:?}: WWW-Authenticate {www:?}"
            );
            assert!(!err.to_string().contains(&s.token), "{err}");
        }
    }
    // A garbage token in the cookie is refused the same way (same-origin, so
    // the CSRF rule for unsafe methods does not decide first).
    for (method, path) in &endpoints {
        let res = app
            .request(method.clone(), path)
            .header("cookie", "session=garbage")
            .header("origin", &app.address)
            .send()
            .await
            .unwrap();
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
    // Nothing was logged out.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&other.token).await, StatusCode::OK);
}

#[tokio::test]
async fn admin_path_params_are_validated() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let long = "a".repeat(129);
    let bad_users = [long.as_str(), "%0A", "a%0Ab", "a%00", "%7F", "%C2%85"];
    for bad in bad_users {
        for (method, path) in [
            (Method::GET, format!("/v1/admin/users/{bad}/sessions")),
            (Method::DELETE, format!("/v1/admin/users/{bad}/sessions")),
            (
                Method::DELETE,
                format!("/v1/admin/users/{bad}/devices/laptop"),
            ),
            (
                Method::DELETE,
                format!("/v1/admin/users/alice/devices/{bad}"),
            ),
        ] {
            let res = app.admin(method.clone(), &path).send().await.unwrap();
            assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
        }
    }
    // Exactly 128 bytes is a valid (empty) user.
    let res = app.admin_list(&"a".repeat(128)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::GET, "/"),
        (Method::GET, "/nope"),
        (Method::GET, "/v1"),
        (Method::GET, "/v2/sessions"),
        (Method::GET, "/v1/admin"),
        (Method::GET, "/v1/admin/users/alice"),
        (Method::POST, "/v1/sessions/x/y/z"),
        (Method::GET, "/v1/admin/users/alice/sessions/extra"),
    ] {
        let res = app.admin(method, path).send().await.unwrap();
        assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    }
}

#[tokio::test]
async fn wrong_methods_on_known_routes_are_405_json() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::PUT, "/v1/sessions"),
        (Method::PATCH, "/v1/sessions"),
        (Method::POST, "/v1/sessions/current"),
        (Method::PUT, "/v1/sessions/current"),
        (Method::GET, "/v1/sessions/abc"),
        (Method::GET, "/v1/sessions/abc/reauth"),
        (Method::POST, "/v1/admin/users/alice/sessions"),
        (Method::GET, "/v1/admin/users/alice/devices/laptop"),
        (Method::PUT, "/v1/admin/sessions/abc"),
        (Method::POST, "/v1/admin/events"),
        (Method::GET, "/v1/admin/logout-all"),
        (Method::DELETE, "/v1/admin/keys/rotate"),
        (Method::GET, "/v1/introspect"),
    ] {
        let res = app.admin(method.clone(), path).send().await.unwrap();
        assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    }
}

/// RFC 9110 §15.5.6: a 405 answer MUST list the allowed methods in `Allow`.
#[tokio::test]
async fn method_not_allowed_lists_the_allowed_methods() {
    let app = spawn_app().await;
    for (method, path, allowed) in [
        (Method::PUT, "/v1/sessions", &["GET", "POST", "DELETE"][..]),
        (Method::GET, "/v1/admin/logout-all", &["POST"][..]),
        (Method::GET, "/v1/introspect", &["POST"][..]),
    ] {
        let res = app.admin(method.clone(), path).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
        let allow = res
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"));
        for m in allowed {
            assert!(allow.contains(m), "{method} {path}: Allow {allow:?}");
        }
    }
}

/// The operational endpoints are known routes too.
#[tokio::test]
async fn wrong_methods_on_operational_routes_are_405_json() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::POST, "/healthz"),
        (Method::DELETE, "/readyz"),
        (Method::POST, "/metrics"),
        (Method::PUT, "/openapi.json"),
    ] {
        let res = app.request(method, path).send().await.unwrap();
        assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    }
}

#[tokio::test]
async fn introspect_refuses_a_body_over_the_limit() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let padding = "x".repeat(17 * 1024);
    let res = app
        .issuer(Method::POST, "/v1/introspect")
        .form(&[("token", s.token.as_str()), ("token_type_hint", &padding)])
        .send()
        .await
        .unwrap();
    let err = assert_error(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(!err.to_string().contains(&s.token), "{err}");

    let port = app.port;
    let body = format!("token={}&token_type_hint={padding}", s.token);
    let (status, text) = tokio::task::spawn_blocking(move || {
        raw_chunked_post(
            port,
            "/v1/introspect",
            ISSUER_KEY,
            "application/x-www-form-urlencoded",
            body.as_bytes(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 413, "{text}");
    assert!(text.contains(r#""error":"payload_too_large""#), "{text}");
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn reauth_and_verify_refuse_bad_parameters() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let long = "a".repeat(200);
    for bad in ["abc", &s.session_id[..43], long.as_str(), "%0A"] {
        let res = app
            .issuer(Method::POST, &format!("/v1/sessions/{bad}/reauth"))
            .send()
            .await
            .unwrap();
        assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    }
    for query in [
        "max_age=abc",
        "max_age=-1",
        "max_age=1.5",
        "max_age=",
        "max_age=1&max_age=2",
        "max_age=99999999999999999999999",
    ] {
        let res = app
            .verify_at(&format!("/v1/verify?{query}"), &s.token)
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    // Other parameters (a gateway forwarding the original query) are ignored.
    let res = app.verify_at("/v1/verify?page=2&x=%ZZ", &s.token).await;
    assert_eq!(res.status(), StatusCode::OK);
}
