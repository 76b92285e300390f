//! Operations: liveness, readiness, metrics, the OpenAPI document and
//! request ids.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{
    ADMIN_KEY, ISSUER_KEY, SIGNING_SECRET, TestApp, assert_error, eventually, spawn_app,
};

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.request(Method::GET, path).send().await.unwrap()
}

async fn metrics_text(app: &TestApp) -> String {
    let res = get(app, "/metrics").await;
    assert_eq!(res.status(), StatusCode::OK);
    let ct = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    res.text().await.unwrap()
}

/// The value of the sample named exactly `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_with_redis_up() {
    let app = spawn_app().await;
    let res = get(&app, "/healthz").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("x-request-id").is_some());
    let res = get(&app, "/readyz").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
}

#[tokio::test]
async fn readyz_fails_fast_when_redis_dies_while_healthz_stays_up() {
    let app = spawn_app().await;
    assert_eq!(get(&app, "/readyz").await.status(), StatusCode::OK);
    app.redis.as_ref().unwrap().lock().unwrap().kill9();

    for _ in 0..3 {
        let started = Instant::now();
        let res = get(&app, "/readyz").await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "readyz took {took:?}");
        assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
        let res = get(&app, "/healthz").await;
        assert_eq!(res.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn readyz_answers_503_within_a_second_when_redis_hangs() {
    let app = spawn_app().await;
    assert_eq!(get(&app, "/readyz").await.status(), StatusCode::OK);
    app.redis.as_ref().unwrap().lock().unwrap().pause_ms(3000);
    let started = Instant::now();
    let res = get(&app, "/readyz").await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "readyz took {took:?}");
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert_eq!(get(&app, "/healthz").await.status(), StatusCode::OK);
    // Once Redis answers again, so does readiness.
    eventually(Duration::from_secs(6), || async {
        get(&app, "/readyz").await.status() == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn readyz_recovers_when_redis_comes_back() {
    let app = spawn_app().await;
    let redis = app.redis.clone().unwrap();
    redis.lock().unwrap().kill9();
    let res = get(&app, "/readyz").await;
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    redis.lock().unwrap().restart();
    eventually(Duration::from_secs(5), || async {
        get(&app, "/readyz").await.status() == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn metrics_count_verify_outcomes_and_show_the_pool() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let text = metrics_text(&app).await;
    let ok_before = sample(&text, r#"sessiongate_verify_total{result="ok"}"#);
    let bad_before = sample(&text, r#"sessiongate_verify_total{result="invalid_token"}"#);

    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    let text = metrics_text(&app).await;
    assert_eq!(
        sample(&text, r#"sessiongate_verify_total{result="ok"}"#),
        ok_before + 2.0
    );
    assert_eq!(
        sample(&text, r#"sessiongate_verify_total{result="invalid_token"}"#),
        bad_before
    );

    assert_eq!(app.verify_status("garbage").await, StatusCode::UNAUTHORIZED);
    let text = metrics_text(&app).await;
    assert_eq!(
        sample(&text, r#"sessiongate_verify_total{result="invalid_token"}"#),
        bad_before + 1.0
    );
    assert_eq!(
        sample(&text, r#"sessiongate_verify_total{result="ok"}"#),
        ok_before + 2.0
    );
    assert!(
        text.contains("sessiongate_verify_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(
        sample(&text, "sessiongate_verify_duration_seconds_count") >= 3.0,
        "{text}"
    );
    assert!(
        text.contains("sessiongate_redis_pool_connections{"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE sessiongate_verify_total counter"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_never_show_tokens_or_keys() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    app.verify(&s.token).await;
    app.verify(&format!("{}x", s.token)).await;
    app.introspect(&s.token, ISSUER_KEY).await;
    app.admin_list("alice").await;
    app.request(Method::GET, "/v1/admin/users/alice/sessions")
        .bearer_auth(format!("{ADMIN_KEY}x"))
        .send()
        .await
        .unwrap();
    let text = metrics_text(&app).await;
    let signature = s.token.rsplit('.').next().unwrap();
    for secret in [
        s.token.as_str(),
        signature,
        ISSUER_KEY,
        ADMIN_KEY,
        SIGNING_SECRET,
        "alice",
        s.session_id.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret:?} in metrics:\n{text}");
    }
}

#[tokio::test]
async fn openapi_documents_every_path_method_and_security_scheme() {
    let app = spawn_app().await;
    let res = get(&app, "/openapi.json").await;
    assert_eq!(res.status(), StatusCode::OK);
    let doc: Value = res.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "openapi {}",
        doc["openapi"]
    );
    let expected: &[(&str, &[&str])] = &[
        ("/v1/sessions", &["post", "get", "delete"]),
        ("/v1/verify", &["get"]),
        ("/v1/sessions/current", &["get", "delete"]),
        ("/v1/sessions/{session_id}", &["delete"]),
        ("/v1/sessions/{session_id}/reauth", &["post"]),
        ("/v1/admin/users/{user_id}/sessions", &["get", "delete"]),
        ("/v1/admin/users/{user_id}/devices/{device_id}", &["delete"]),
        ("/v1/admin/sessions/{session_id}", &["delete"]),
        ("/v1/admin/logout-all", &["post"]),
        ("/v1/admin/keys/rotate", &["post"]),
        ("/v1/introspect", &["post"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
    ];
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in expected {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} missing; paths: {:?}", paths.keys()));
        for method in *methods {
            assert!(item.get(*method).is_some(), "{method} {path} missing");
        }
    }
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes");
    for name in ["issuer_key", "admin_key", "session_token"] {
        assert!(schemes.contains_key(name), "{name} missing in {schemes:?}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
    // Each protected operation names the scheme that guards it.
    let security = |path: &str, method: &str| doc["paths"][path][method]["security"].to_string();
    assert!(security("/v1/sessions", "post").contains("issuer_key"));
    assert!(security("/v1/admin/logout-all", "post").contains("admin_key"));
    assert!(security("/v1/sessions/current", "get").contains("session_token"));
    assert!(security("/v1/introspect", "post").contains("issuer_key"));
    assert!(security("/v1/introspect", "post").contains("admin_key"));
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let answers = [
        get(&app, "/healthz").await,
        get(&app, "/readyz").await,
        get(&app, "/metrics").await,
        get(&app, "/openapi.json").await,
        app.verify(&s.token).await,
        app.verify("garbage").await,
        get(&app, "/nope").await,
        app.request(Method::PUT, "/v1/sessions")
            .send()
            .await
            .unwrap(),
        app.admin_list("alice").await,
        app.admin(Method::POST, "/v1/sessions")
            .send()
            .await
            .unwrap(),
        app.create_raw(serde_json::json!({"user_id": ""})).await,
        app.issuer(Method::POST, "/v1/sessions")
            .header("content-type", "application/json")
            .body("x".repeat(20_000))
            .send()
            .await
            .unwrap(),
    ];
    let mut ids = Vec::new();
    for res in answers {
        let id = res
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{} {} without x-request-id", res.status(), res.url()))
            .to_str()
            .unwrap()
            .to_string();
        assert!(!id.is_empty());
        ids.push(id);
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "request ids repeat: {ids:?}");
}

#[tokio::test]
async fn a_plain_request_id_is_echoed_and_a_hostile_one_replaced() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    for path in ["/healthz", "/v1/verify", "/nope"] {
        let res = app
            .request(Method::GET, path)
            .bearer_auth(&s.token)
            .header("x-request-id", "abc-123")
            .send()
            .await
            .unwrap();
        assert_eq!(res.headers()["x-request-id"], "abc-123", "{path}");
    }
    let long = "a".repeat(200);
    for hostile in [
        "abc 123",
        "abc\t123",
        long.as_str(),
        "a\"b",
        "<script>",
        "a,b",
        "",
    ] {
        let res = app
            .request(Method::GET, "/healthz")
            .header("x-request-id", hostile)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
        assert!(!id.is_empty(), "{hostile:?}");
        assert_ne!(id, hostile, "{hostile:?} echoed");
        assert!(
            id.len() <= 64
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c)),
            "replacement {id:?} for {hostile:?}"
        );
    }
}

/// The value of a sample, 0 when the series does not exist yet.
fn sample_or_zero(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_sessions_evicted_over_the_cap_and_replaced_on_a_device() {
    let app = crate::helpers::spawn_app_with(&[("MAX_SESSIONS_PER_USER", "2")]).await;
    let evicted = r#"sessiongate_sessions_revoked_total{how="evicted_over_cap"}"#;
    let replaced = r#"sessiongate_sessions_revoked_total{how="replaced_same_device"}"#;
    app.create("capped", "a").await;
    app.create("capped", "b").await;
    let text = metrics_text(&app).await;
    assert_eq!(sample_or_zero(&text, evicted), 0.0);
    assert_eq!(sample_or_zero(&text, replaced), 0.0);
    // A third device: one session over the cap is evicted.
    app.create("capped", "c").await;
    let text = metrics_text(&app).await;
    assert_eq!(sample_or_zero(&text, evicted), 1.0);
    assert_eq!(sample_or_zero(&text, replaced), 0.0);
    // A new login on a known device replaces that device's session.
    app.create("capped", "c").await;
    let text = metrics_text(&app).await;
    assert_eq!(sample_or_zero(&text, evicted), 1.0);
    assert_eq!(sample_or_zero(&text, replaced), 1.0);
}
