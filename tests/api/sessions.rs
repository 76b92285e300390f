//! The session life cycle: create → verify → list → logout, per device.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::assert_error;
use crate::topology::Topo;

async fn create_then_verify_returns_identity_headers(t: Topo) {
    let app = t.app(&[]).await;
    let s = app.create("alice", "laptop").await;
    assert_eq!(s.user_id, "alice");
    assert_eq!(s.device_id, "laptop");
    assert!(s.body["created_at"].as_i64().unwrap() > 1_700_000_000);
    assert!(s.body["expires_at"].as_i64().unwrap() > s.body["created_at"].as_i64().unwrap());

    let res = app.verify(&s.token).await;
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers();
    assert_eq!(h["x-session-user"], "alice");
    assert_eq!(h["x-session-id"], s.session_id.as_str());
    assert_eq!(h["x-session-device"], "laptop");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h.get("x-request-id").is_some());
}

async fn logout_makes_the_same_token_fail_forever(t: Topo) {
    let app = t.app(&[]).await;
    let s = app.create("bob", "phone").await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    for _ in 0..3 {
        assert_error(
            app.verify(&s.token).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
    }
    // A second logout with the same copy of the token is refused too.
    assert_error(
        app.logout(&s.token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
}

async fn verify_accepts_any_method_and_a_tail_path(t: Topo) {
    let app = t.app(&[]).await;
    let s = app.create("carol", "tablet").await;
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
        let res = app
            .request(method.parse().unwrap(), "/v1/verify/api/orders/7?page=2")
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{method}");
        assert_eq!(res.headers()["x-session-user"], "carol");
    }
}

async fn token_is_taken_from_the_cookie_when_no_header(t: Topo) {
    let app = t.app(&[]).await;
    let s = app.create("dave", "browser").await;
    let res = app
        .request(reqwest::Method::GET, "/v1/verify")
        .header("cookie", format!("other=1; session={}", s.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-session-device"], "browser");
    // No header, no cookie: 401.
    let res = app
        .request(reqwest::Method::GET, "/v1/verify")
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
}

async fn current_session_and_listing_show_every_device(t: Topo) {
    let app = t.app(&[]).await;
    let laptop = app
        .create_body(json!({"user_id": "erin", "device_id": "laptop",
            "metadata": {"ip": "192.0.2.1", "user_agent": "Firefox"}}))
        .await;
    let phone = app.create("erin", "phone").await;
    app.create("frank", "laptop").await;

    let res = app.current(&laptop.token).await;
    assert_eq!(res.status(), StatusCode::OK);
    let cur: Value = res.json().await.unwrap();
    assert_eq!(cur["session_id"], laptop.session_id.as_str());
    assert_eq!(cur["user_id"], "erin");
    assert_eq!(cur["metadata"]["ip"], "192.0.2.1");
    assert_eq!(cur["current"], true);

    let res = app.list(&phone.token).await;
    assert_eq!(res.status(), StatusCode::OK);
    let list: Value = res.json().await.unwrap();
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{list}");
    for s in sessions {
        let is_phone = s["session_id"] == phone.session_id.as_str();
        assert_eq!(s["current"], is_phone);
        for field in [
            "device_id",
            "created_at",
            "last_seen_at",
            "auth_time",
            "metadata",
        ] {
            assert!(s.get(field).is_some(), "{field} missing in {s}");
        }
    }
}

async fn logout_everywhere_else_keeps_the_current_device(t: Topo) {
    let app = t.app(&[]).await;
    let a = app.create("gina", "a").await;
    let b = app.create("gina", "b").await;
    let c = app.create("gina", "c").await;
    let other_user = app.create("hank", "a").await;
    let res = app.logout_others(&b.token).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["revoked"], 2);
    assert_eq!(app.verify_status(&a.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&c.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&b.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&other_user.token).await, StatusCode::OK);
}

async fn logout_of_one_other_device_and_404_for_someone_elses(t: Topo) {
    let app = t.app(&[]).await;
    let mine = app.create("ivan", "laptop").await;
    let my_phone = app.create("ivan", "phone").await;
    let theirs = app.create("judy", "phone").await;

    let res = app.logout_one(&mine.token, &theirs.session_id).await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(app.verify_status(&theirs.token).await, StatusCode::OK);

    let res = app.logout_one(&mine.token, &my_phone.session_id).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.verify_status(&my_phone.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_status(&mine.token).await, StatusCode::OK);

    // Already gone: 404.
    let res = app.logout_one(&mine.token, &my_phone.session_id).await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    let res = app.logout_one(&mine.token, "not-a-session").await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
}

async fn same_device_login_replaces_the_older_session(t: Topo) {
    let app = t.app(&[]).await;
    let first = app.create("kate", "laptop").await;
    let second = app.create("kate", "laptop").await;
    assert_ne!(first.session_id, second.session_id);
    assert_eq!(
        app.verify_status(&first.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_status(&second.token).await, StatusCode::OK);
}

async fn device_id_defaults_to_a_random_one(t: Topo) {
    let app = t.app(&[]).await;
    let a = app.create_body(json!({"user_id": "leo"})).await;
    let b = app.create_body(json!({"user_id": "leo"})).await;
    assert!(!a.device_id.is_empty());
    assert_ne!(a.device_id, b.device_id);
    assert_eq!(app.verify_status(&a.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&b.token).await, StatusCode::OK);
}

async fn user_ids_with_key_syntax_and_unicode_stay_apart(t: Topo) {
    let app = t.app(&[]).await;
    let weird = ["a*", "ab", "{x}", "x", "a:b c", "ünïcødé", "a\\*"];
    let mut created = Vec::new();
    for user in weird {
        created.push(app.create(user, "d").await);
    }
    // Force-logout of "a*" must not touch "ab" (no glob), "{x}" not "x" (no hash tag).
    let res = app.admin_revoke_user("a*", None).await;
    assert_eq!(res.json::<Value>().await.unwrap()["revoked"], 1);
    let res = app.admin_revoke_user("{x}", None).await;
    assert_eq!(res.json::<Value>().await.unwrap()["revoked"], 1);
    for (user, s) in weird.iter().zip(&created) {
        let expected = if *user == "a*" || *user == "{x}" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        let res = app.verify(&s.token).await;
        assert_eq!(res.status(), expected, "{user}");
        if expected == StatusCode::OK {
            assert_eq!(res.headers()["x-session-user"].as_bytes(), user.as_bytes());
        }
    }
}

async fn the_tail_form_tolerates_the_apps_query_and_takes_max_age_from_a_header(t: Topo) {
    let app = t.app(&[]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let s = app
        .create_body(json!({"user_id": "mia", "device_id": "d", "auth_time": now - 600}))
        .await;
    // In the tail form a malformed max_age is the app's business: ignored.
    let res = app
        .verify_at("/v1/verify/shop/items?max_age=abc", &s.token)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    // A well-formed one still tightens (the contract allows it on both forms).
    let res = app
        .verify_at("/v1/verify/shop/items?max_age=60", &s.token)
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // The gateway's header tightens it.
    let res = app
        .request(reqwest::Method::GET, "/v1/verify/account/settings")
        .bearer_auth(&s.token)
        .header("x-sessiongate-max-age", "300")
        .send()
        .await
        .unwrap();
    let body = assert_error(
        res,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
    assert_eq!(body["max_age"], 300);
    // On the plain form the smaller of query and header wins.
    let res = app
        .request(reqwest::Method::GET, "/v1/verify?max_age=100000")
        .bearer_auth(&s.token)
        .header("x-sessiongate-max-age", "300")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app
        .request(reqwest::Method::GET, "/v1/verify")
        .bearer_auth(&s.token)
        .header("x-sessiongate-max-age", "soon")
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
}

async fn a_login_right_after_logout_all_is_alive(t: Topo) {
    let app = t.app(&[]).await;
    for i in 0..15 {
        assert_eq!(app.logout_all().await.status(), StatusCode::OK);
        let s = app.create(&format!("nina{i}"), "d").await;
        assert_eq!(
            app.verify_status(&s.token).await,
            StatusCode::OK,
            "round {i}"
        );
    }
}

crate::on_every_topology!(
    create_then_verify_returns_identity_headers,
    logout_makes_the_same_token_fail_forever,
    verify_accepts_any_method_and_a_tail_path,
    token_is_taken_from_the_cookie_when_no_header,
    current_session_and_listing_show_every_device,
    logout_everywhere_else_keeps_the_current_device,
    logout_of_one_other_device_and_404_for_someone_elses,
    same_device_login_replaces_the_older_session,
    device_id_defaults_to_a_random_one,
    user_ids_with_key_syntax_and_unicode_stay_apart,
    the_tail_form_tolerates_the_apps_query_and_takes_max_age_from_a_header,
    a_login_right_after_logout_all_is_alive,
);
