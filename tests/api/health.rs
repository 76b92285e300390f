//! Operations: liveness, readiness, metrics, the OpenAPI document and
//! request ids.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{
    ADMIN_KEY, FAST_REDIS_TIMEOUT, ISSUER_KEY, SIGNING_SECRET, TestApp, assert_error, eventually,
    spawn_app, spawn_app_on, spawn_app_with,
};
use crate::redis_server::TestRedis;

/// With a 1 s Redis timeout (`FAST_REDIS_TIMEOUT`), `/readyz` answers within this
/// on a loaded machine (generous), and well before a frozen Redis would.
const READY_BOUND: Duration = Duration::from_secs(3);

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

/// When Redis refuses the service's writes, `/readyz` gives Redis's own
/// words (here `NOREPLICAS`) to admin-key callers only; anonymous callers,
/// the login backend's key and a wrong key get a generic reason. The cause
/// is still counted in the metrics.
#[tokio::test]
async fn readyz_tells_redis_own_error_to_admin_key_callers_only() {
    let app = spawn_app().await;
    assert_eq!(get(&app, "/readyz").await.status(), StatusCode::OK);
    assert_eq!(
        app.redis_cmd(&["CONFIG", "SET", "min-replicas-to-write", "1"]),
        "+OK\r\n"
    );
    let generic = "not ready: the session store is unavailable";
    let callers: [(&str, Option<&str>); 4] = [
        ("anonymous", None),
        ("issuer key", Some(ISSUER_KEY)),
        (
            "wrong key",
            Some("not-a-key-0123456789abcdef0123456789abcd"),
        ),
        ("admin key", Some(ADMIN_KEY)),
    ];
    for (who, key) in callers {
        let mut req = app.request(Method::GET, "/readyz");
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let body = assert_error(
            req.send().await.unwrap(),
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
        )
        .await;
        let message = body["message"].as_str().unwrap();
        if who == "admin key" {
            assert!(message.contains("NOREPLICAS"), "{who}: {message:?}");
        } else {
            assert_eq!(message, generic, "{who}");
            assert!(!body.to_string().contains("NOREPLICAS"), "{who}: {body}");
        }
    }
    let text = metrics_text(&app).await;
    assert!(
        sample(&text, r#"sessiongate_redis_errors_total{kind="refused"}"#) >= 4.0,
        "the refusals are counted"
    );
    assert_eq!(
        app.redis_cmd(&["CONFIG", "SET", "min-replicas-to-write", "0"]),
        "+OK\r\n"
    );
    assert_eq!(get(&app, "/readyz").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn readyz_fails_fast_when_redis_dies_while_healthz_stays_up() {
    let app = spawn_app_with(&[("REDIS_TIMEOUT", FAST_REDIS_TIMEOUT)]).await;
    assert_eq!(get(&app, "/readyz").await.status(), StatusCode::OK);
    app.redis.as_ref().unwrap().lock().unwrap().kill9();

    for _ in 0..3 {
        let started = Instant::now();
        let res = get(&app, "/readyz").await;
        let took = started.elapsed();
        assert!(took < READY_BOUND, "readyz took {took:?}");
        assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
        let res = get(&app, "/healthz").await;
        assert_eq!(res.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn readyz_answers_503_promptly_when_redis_hangs() {
    let app = spawn_app_with(&[("REDIS_TIMEOUT", FAST_REDIS_TIMEOUT)]).await;
    assert_eq!(get(&app, "/readyz").await.status(), StatusCode::OK);
    // Frozen for twice the bound: a /readyz that waited for Redis fails it.
    app.redis.as_ref().unwrap().lock().unwrap().pause_ms(6000);
    let started = Instant::now();
    let res = get(&app, "/readyz").await;
    let took = started.elapsed();
    assert!(took < READY_BOUND, "readyz took {took:?}");
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert_eq!(get(&app, "/healthz").await.status(), StatusCode::OK);
    // Once Redis answers again, so does readiness.
    eventually(Duration::from_secs(20), || async {
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
    eventually(Duration::from_secs(20), || async {
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

/// The Redis settings as an admin-key caller of `/readyz` sees them:
/// setting -> (found, status).
async fn redis_settings(app: &TestApp) -> std::collections::HashMap<String, (Value, String)> {
    let res = app.admin(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "durability never makes /readyz fail"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    body["redis_settings"]
        .as_array()
        .unwrap_or_else(|| panic!("no redis_settings for the admin key: {body}"))
        .iter()
        .map(|s| {
            (
                s["setting"].as_str().unwrap().to_string(),
                (
                    s["found"].clone(),
                    s["status"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// The `sessiongate_redis_config_ok` gauge of each setting.
async fn config_gauges(app: &TestApp) -> [f64; 3] {
    let text = metrics_text(app).await;
    ["appendonly", "appendfsync", "maxmemory-policy"].map(|s| {
        sample(
            &text,
            &format!(r#"sessiongate_redis_config_ok{{setting="{s}"}}"#),
        )
    })
}

/// The project's redis.conf: every durability setting holds; anonymous
/// callers see only `{"status":"ready"}`.
#[tokio::test]
async fn durability_settings_of_the_project_redis_conf_hold() {
    let app = spawn_app().await;
    let res = get(&app, "/readyz").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        serde_json::json!({"status": "ready"})
    );
    let settings = redis_settings(&app).await;
    assert_eq!(settings.len(), 3, "{settings:?}");
    for (setting, found) in [
        ("appendonly", "yes"),
        ("appendfsync", "always"),
        ("maxmemory-policy", "noeviction"),
    ] {
        assert_eq!(
            settings[setting],
            (Value::from(found), "ok".to_string()),
            "{setting}"
        );
    }
    assert_eq!(config_gauges(&app).await, [1.0, 1.0, 1.0]);
}

/// A Redis with `appendfsync no` and `allkeys-lru` (it could lose an
/// acknowledged logout on a crash, and evict sessions or the cutoff): the
/// service still serves (it warns), the gauges say which settings fail,
/// and an admin sees the values found. Fixed at run time, the next
/// `/readyz` sees it.
#[tokio::test]
async fn durability_settings_that_break_the_promises_are_reported() {
    let redis =
        TestRedis::start_with(&["--appendfsync", "no", "--maxmemory-policy", "allkeys-lru"]);
    let app = spawn_app_on(&redis.url(), &[]).await;
    assert_eq!(config_gauges(&app).await, [1.0, 0.0, 0.0], "at start-up");
    let settings = redis_settings(&app).await;
    assert_eq!(
        settings["appendonly"],
        (Value::from("yes"), "ok".to_string())
    );
    assert_eq!(
        settings["appendfsync"],
        (Value::from("no"), "not as expected".to_string())
    );
    assert_eq!(
        settings["maxmemory-policy"],
        (Value::from("allkeys-lru"), "not as expected".to_string())
    );
    let s = app.create("dora", "laptop").await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);

    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "appendfsync", "always"]),
        "+OK\r\n"
    );
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "+OK\r\n"
    );
    // Anonymous probes (anyone can send them) re-read the settings at most
    // every ten seconds: 20 of them cost Redis at most one CONFIG GET round
    // (three settings) per started ten seconds, not one round each.
    let config_calls = || {
        crate::helpers::command_counts(&redis.cmd(&["INFO", "commandstats"]))
            .get("config|get")
            .copied()
            .unwrap_or(0)
    };
    let before = config_calls();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(get(&app, "/readyz").await.status(), StatusCode::OK);
    }
    let rounds = started.elapsed().as_secs() / 10 + 1;
    let calls = config_calls() - before;
    assert!(
        calls <= 3 * rounds,
        "20 anonymous probes ran {calls} CONFIG GETs in {rounds} ten-second period(s)"
    );
    // ...an admin-key probe always does.
    let settings = redis_settings(&app).await;
    assert_eq!(
        settings["appendfsync"],
        (Value::from("always"), "ok".to_string())
    );
    assert_eq!(config_gauges(&app).await, [1.0, 1.0, 1.0], "after the fix");
}

/// An ACL user without CONFIG (as on a managed Redis): the service serves,
/// and says it cannot check rather than failing or guessing.
#[tokio::test]
async fn durability_settings_cannot_be_checked_when_config_is_refused() {
    let redis = TestRedis::start();
    assert_eq!(
        redis.cmd(&[
            "ACL",
            "SETUSER",
            "sg",
            "on",
            ">sg-password",
            "~*",
            "&*",
            "+@all",
            "-config",
        ]),
        "+OK\r\n"
    );
    let url = format!("redis://sg:sg-password@127.0.0.1:{}/0", redis.port());
    let app = spawn_app_on(&url, &[]).await;
    let s = app.create("erin", "laptop").await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    assert_eq!(config_gauges(&app).await, [-1.0, -1.0, -1.0]);
    let settings = redis_settings(&app).await;
    assert_eq!(settings.len(), 3, "{settings:?}");
    for (setting, (found, status)) in &settings {
        assert_eq!(*found, Value::Null, "{setting}");
        assert!(
            status.starts_with("cannot check: CONFIG refused"),
            "{setting}: {status}"
        );
    }
    // Anonymous callers still get the plain answer.
    assert_eq!(
        get(&app, "/readyz").await.json::<Value>().await.unwrap(),
        serde_json::json!({"status": "ready"})
    );
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
