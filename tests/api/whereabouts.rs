//! Where sessions were used from: the throttled touch records the client's
//! address (through trusted proxies only) and user agent; listings show
//! them with the login's address and a device label.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, spawn_app_with};

const FIREFOX_LINUX: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
const SAFARI_IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) \
     AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";

/// A verify as a gateway sends it, with these extra headers.
async fn verify_with(app: &TestApp, token: &str, headers: &[(&str, &str)]) -> StatusCode {
    let mut req = app.request(Method::GET, "/v1/verify").bearer_auth(token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status()
}

/// The one session `GET /v1/sessions` lists for this token.
async fn listed(app: &TestApp, token: &str) -> Value {
    let res = app.list(token).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["sessions"].as_array().unwrap().len(), 1, "{body}");
    body["sessions"][0].clone()
}

/// Verifies with `headers` until a touch has recorded `ip` (the touch
/// interval is 1 ms, so nearly every verify is due), then returns the
/// listed session.
async fn touched(app: &TestApp, token: &str, headers: &[(&str, &str)], ip: &str) -> Value {
    eventually(Duration::from_secs(20), || async {
        assert_eq!(verify_with(app, token, headers).await, StatusCode::OK);
        listed(app, token).await["last_ip"] == ip
    })
    .await;
    listed(app, token).await
}

#[tokio::test]
async fn the_touch_records_the_last_address_and_user_agent_and_listings_label_them() {
    let app = spawn_app_with(&[("TRUSTED_PROXIES", "127.0.0.1"), ("TOUCH_INTERVAL", "1ms")]).await;
    let s = app
        .create_body(json!({"user_id": "alice", "device_id": "phone",
            "metadata": {"ip": "192.0.2.1", "user_agent": FIREFOX_LINUX}}))
        .await;
    // Before any verify: the login's address and agent, from the metadata.
    let before = listed(&app, &s.token).await;
    assert_eq!(before["first_ip"], "192.0.2.1");
    assert_eq!(before["first_user_agent"], FIREFOX_LINUX);
    assert_eq!(before["last_ip"], Value::Null);
    assert_eq!(before["last_user_agent"], Value::Null);
    assert_eq!(before["device_label"], "Firefox on Linux");

    let headers = [
        ("x-forwarded-for", "198.51.100.7"),
        ("user-agent", SAFARI_IPHONE),
    ];
    let after = touched(&app, &s.token, &headers, "198.51.100.7").await;
    assert_eq!(after["first_ip"], "192.0.2.1");
    assert_eq!(after["last_user_agent"], SAFARI_IPHONE);
    assert_eq!(after["device_label"], "Safari on iPhone");

    // The same in the operator's listing and in the caller's own session
    // (read by verify's record decoder, not the list script).
    let res = app.admin_list("alice").await;
    assert_eq!(res.status(), StatusCode::OK);
    let admin: Value = res.json().await.unwrap();
    let a = &admin["sessions"][0];
    assert_eq!(
        (&a["first_ip"], &a["last_ip"], &a["device_label"]),
        (
            &json!("192.0.2.1"),
            &json!("198.51.100.7"),
            &json!("Safari on iPhone")
        )
    );
    let current: Value = app.current(&s.token).await.json().await.unwrap();
    assert_eq!(current["last_ip"], "198.51.100.7");
    assert_eq!(current["last_user_agent"], SAFARI_IPHONE);

    // A later touch from elsewhere replaces them, and the record (grown
    // from 7 elements to 9 by the touch) still verifies.
    let moved = touched(
        &app,
        &s.token,
        &[("x-real-ip", "203.0.113.50"), ("user-agent", "curl/8.5.0")],
        "203.0.113.50",
    )
    .await;
    assert_eq!(moved["last_user_agent"], "curl/8.5.0");
    assert_eq!(
        moved["device_label"], "HTTP Library",
        "woothee's name for curl"
    );
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
    // 127.0.0.1 (the test client) is not a trusted proxy here.
    let app = spawn_app_with(&[("TRUSTED_PROXIES", "10.0.0.0/8"), ("TOUCH_INTERVAL", "1ms")]).await;
    let s = app.create("bob", "laptop").await;
    let spoof = [
        ("x-forwarded-for", "203.0.113.66"),
        ("x-real-ip", "203.0.113.67"),
        ("user-agent", FIREFOX_LINUX),
    ];
    let after = touched(&app, &s.token, &spoof, "127.0.0.1").await;
    assert_eq!(after["last_user_agent"], FIREFOX_LINUX);
    assert_eq!(after["first_ip"], Value::Null, "no metadata at login");
}

#[tokio::test]
async fn a_spoofed_forwarded_chain_is_read_right_to_left_through_trusted_proxies_only() {
    let app = spawn_app_with(&[
        ("TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8"),
        ("TOUCH_INTERVAL", "1ms"),
    ])
    .await;
    let s = app.create("carol", "laptop").await;
    // The client wrote "6.6.6.6, 10.9.9.9" itself; an edge proxy (10.0.0.5)
    // appended the client's real address, the gateway (127.0.0.1, the peer)
    // appended the edge proxy's. 10.9.9.9 left of the real address is the
    // client's own text and must not be believed.
    let chain = [
        ("x-forwarded-for", "6.6.6.6, 10.9.9.9, 198.51.100.200"),
        ("x-forwarded-for", "10.0.0.5"),
        ("x-real-ip", "203.0.113.1"),
    ];
    touched(&app, &s.token, &chain, "198.51.100.200").await;
    // A user agent is bounded: 256 bytes at most, tabs dropped.
    let long = format!("Agent\t{}", "x".repeat(600));
    let after = touched(
        &app,
        &s.token,
        &[("x-forwarded-for", "198.51.100.201"), ("user-agent", &long)],
        "198.51.100.201",
    )
    .await;
    let ua = after["last_user_agent"].as_str().unwrap();
    assert_eq!(ua.len(), 256);
    assert!(ua.starts_with("Agentxxx"), "{ua}");
}

/// Within the touch interval a verify writes nothing, whatever address and
/// agent it comes with: commands counted as in storage.rs.
#[tokio::test]
async fn a_verify_not_due_to_touch_records_nothing() {
    let app = spawn_app_with(&[("TRUSTED_PROXIES", "127.0.0.1"), ("TOUCH_INTERVAL", "1h")]).await;
    let s = app.create("dave", "laptop").await;
    let before = app.command_counts();
    for i in 0..10 {
        let ip = format!("198.51.100.{i}");
        let headers = [
            ("x-forwarded-for", ip.as_str()),
            ("user-agent", FIREFOX_LINUX),
        ];
        assert_eq!(verify_with(&app, &s.token, &headers).await, StatusCode::OK);
    }
    let after = app.command_counts();
    for cmd in ["hset", "evalsha", "eval"] {
        let n = after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0);
        assert_eq!(n, 0, "{cmd} during verifies within the touch interval");
    }
    let listed = listed(&app, &s.token).await;
    assert_eq!(listed["last_ip"], Value::Null);
    assert_eq!(listed["last_user_agent"], Value::Null);
}
