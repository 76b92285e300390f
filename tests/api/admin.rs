//! Operator endpoints: API keys and roles, force logout (user, device,
//! session, everyone), key rotation and token introspection.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_KEY, ISSUER_KEY, SIGNING_SECRET, TestApp, assert_error, eventually, spawn_app,
    spawn_app_with,
};
use crate::topology::Topo;

/// Every user hash in the app's Redis (`SCAN`, since `KEYS` is disabled),
/// sorted.
pub(crate) fn user_hashes(app: &TestApp) -> Vec<String> {
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    loop {
        let reply = app.redis_cmd(&["SCAN", &cursor, "MATCH", "sg:u*", "COUNT", "1000"]);
        // "*2\r\n$1\r\n0\r\n*N\r\n$len\r\nkey\r\n…"
        let mut lines = reply.split("\r\n");
        assert_eq!(lines.next(), Some("*2"), "SCAN reply {reply:?}");
        lines.next();
        let next = lines.next().expect("a cursor").to_string();
        let n: usize = lines
            .next()
            .and_then(|l| l.strip_prefix('*'))
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("SCAN reply {reply:?}"));
        for _ in 0..n {
            lines.next();
            keys.push(lines.next().expect("a key").to_string());
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys
}

/// Every user hash of a topology test, sorted.
fn t_hashes(t: &Topo) -> Vec<String> {
    let mut keys = t.user_keys();
    keys.sort();
    keys
}

/// The `kid` of a JWT's header.
fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().expect("a kid header").to_string()
}

async fn json_of(res: reqwest::Response) -> Value {
    assert_eq!(res.status(), StatusCode::OK, "status");
    res.json().await.unwrap()
}

/// Every admin endpoint, as (method, path).
fn admin_endpoints(session_id: &str) -> Vec<(Method, String)> {
    vec![
        (Method::GET, "/v1/admin/users/alice/sessions".into()),
        (Method::DELETE, "/v1/admin/users/alice/sessions".into()),
        (
            Method::DELETE,
            "/v1/admin/users/alice/devices/laptop".into(),
        ),
        (Method::DELETE, format!("/v1/admin/sessions/{session_id}")),
        (Method::POST, "/v1/admin/logout-all".into()),
        (Method::POST, "/v1/admin/keys/rotate".into()),
    ]
}

/// `Authorization` values that must not pass for the admin key.
fn wrong_admin_credentials() -> Vec<Option<String>> {
    let mut changed = ADMIN_KEY.to_string();
    let last = changed.pop().unwrap();
    changed.push(if last == '0' { '1' } else { '0' });
    assert_eq!(changed.len(), ADMIN_KEY.len());
    vec![
        None,
        Some(format!("Bearer {changed}")),
        Some(format!("Bearer {}", &ADMIN_KEY[..ADMIN_KEY.len() - 1])),
        Some(format!("Bearer {}", &ADMIN_KEY[..8])),
        Some(format!("Bearer {ADMIN_KEY}x")),
        Some("Bearer ".into()),
        Some(format!("Basic {ADMIN_KEY}")),
        Some(format!(
            "Basic {}",
            STANDARD.encode(format!("admin:{ADMIN_KEY}"))
        )),
        Some(ADMIN_KEY.to_string()),
    ]
}

#[tokio::test]
async fn admin_endpoints_refuse_missing_and_wrong_keys_and_the_issuer_key() {
    // Dozens of wrong keys from one address: the per-address lockout (429)
    // is off here, so every answer shows the key check itself.
    let app = spawn_app_with(&[("API_KEY_FAILURE_LIMIT", "0")]).await;
    let s = app.create("alice", "laptop").await;
    let kid = kid_of(&s.token);
    for (method, path) in admin_endpoints(&s.session_id) {
        for auth in wrong_admin_credentials() {
            let mut req = app.request(method.clone(), &path);
            if let Some(value) = &auth {
                req = req.header("authorization", value);
            }
            let res = req.send().await.unwrap();
            let www = res.headers().get("www-authenticate").cloned();
            let body = assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
            assert!(www.is_some(), "{method} {path} with {auth:?}");
            assert!(!body.to_string().contains(ADMIN_KEY), "key echoed: {body}");
        }
        let res = app.issuer(method.clone(), &path).send().await.unwrap();
        let body = assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
        assert!(!body.to_string().contains(ISSUER_KEY), "key echoed: {body}");
    }
    // None of the refused calls did anything: the session lives, and new
    // tokens are still signed with the same key.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    let later = app.create("bob", "phone").await;
    assert_eq!(kid_of(&later.token), kid);
    let list = json_of(app.admin_list("alice").await).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test]
async fn issuer_endpoints_refuse_the_admin_key_and_no_key() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let create = || {
        app.request(Method::POST, "/v1/sessions")
            .json(&json!({"user_id": "mallory", "device_id": "d"}))
    };
    let reauth = || {
        app.request(
            Method::POST,
            &format!("/v1/sessions/{}/reauth", s.session_id),
        )
    };

    let res = create().bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
    let res = create().send().await.unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let res = create()
        .bearer_auth(&ISSUER_KEY[..ISSUER_KEY.len() - 1])
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let res = create()
        .header("authorization", format!("Basic {ISSUER_KEY}"))
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // A user's token is no API key either.
    let res = create().bearer_auth(&s.token).send().await.unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;

    let res = reauth().bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
    let res = reauth().send().await.unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;

    // Nothing was created for mallory.
    let list = json_of(app.admin_list("mallory").await).await;
    assert_eq!(list, json!({"sessions": []}));
    // The issuer key itself works.
    assert_eq!(app.reauth(&s.session_id).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn introspect_accepts_both_keys_and_refuses_others() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    for key in [ISSUER_KEY, ADMIN_KEY] {
        let body = json_of(app.introspect(&s.token, key).await).await;
        assert_eq!(body["active"], true, "{body}");
    }
    let res = app
        .request(Method::POST, "/v1/introspect")
        .form(&[("token", s.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let res = app
        .introspect(&s.token, &ADMIN_KEY[..ADMIN_KEY.len() - 1])
        .await;
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // A user's own token does not let it introspect.
    let res = app.introspect(&s.token, &s.token).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

async fn admin_lists_a_users_sessions_without_current(t: Topo) {
    let app = t.app(&[]).await;
    let laptop = app
        .create_body(json!({"user_id": "alice", "device_id": "laptop",
            "metadata": {"ip": "192.0.2.7"}}))
        .await;
    let phone = app.create("alice", "phone").await;
    app.create("bob", "laptop").await;

    let list = json_of(app.admin_list("alice").await).await;
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{list}");
    let mut ids: Vec<&str> = sessions
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = vec![laptop.session_id.as_str(), phone.session_id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    for s in sessions {
        assert!(s.get("current").is_none(), "current in {s}");
        for field in [
            "device_id",
            "created_at",
            "last_seen_at",
            "auth_time",
            "metadata",
        ] {
            assert!(s.get(field).is_some(), "{field} missing in {s}");
        }
        if s["session_id"] == laptop.session_id.as_str() {
            assert_eq!(s["device_id"], "laptop");
            assert_eq!(s["metadata"], json!({"ip": "192.0.2.7"}));
        } else {
            assert_eq!(s["device_id"], "phone");
        }
    }

    let list = json_of(app.admin_list("nobody").await).await;
    assert_eq!(list, json!({"sessions": []}));
}

async fn admin_force_logout_of_a_user_revokes_every_token_and_only_theirs(t: Topo) {
    let app = t.app(&[]).await;
    let a = app.create("alice", "a").await;
    let b = app.create("alice", "b").await;
    let c = app.create("alice", "c").await;
    let bob = app.create("bob", "a").await;

    let res = app.admin_revoke_user("alice", None).await;
    assert_eq!(json_of(res).await, json!({"revoked": 3}));
    for s in [&a, &b, &c] {
        assert_error(
            app.verify(&s.token).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
    }
    assert_eq!(app.verify_status(&bob.token).await, StatusCode::OK);
    let list = json_of(app.admin_list("alice").await).await;
    assert_eq!(list, json!({"sessions": []}));
    // Nothing of alice is left in Redis.
    assert_eq!(t_hashes(&t), vec![t.hash_of(&bob.session_id)]);

    // Again: nothing left to revoke.
    let res = app.admin_revoke_user("alice", None).await;
    assert_eq!(json_of(res).await, json!({"revoked": 0}));
    let res = app.admin_revoke_user("nobody", None).await;
    assert_eq!(json_of(res).await, json!({"revoked": 0}));
}

async fn admin_force_logout_except_keeps_one_session(t: Topo) {
    let app = t.app(&[]).await;
    let a = app.create("alice", "a").await;
    let b = app.create("alice", "b").await;
    let c = app.create("alice", "c").await;
    let bob = app.create("bob", "a").await;

    let res = app.admin_revoke_user("alice", Some(&b.session_id)).await;
    assert_eq!(json_of(res).await, json!({"revoked": 2}));
    assert_eq!(app.verify_status(&a.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&b.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&c.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&bob.token).await, StatusCode::OK);
    let list = json_of(app.admin_list("alice").await).await;
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{list}");
    assert_eq!(sessions[0]["session_id"], b.session_id.as_str());
}

async fn admin_force_logout_refuses_a_bad_except(t: Topo) {
    let app = t.app(&[]).await;
    let a = app.create("alice", "a").await;
    let bob = app.create("bob", "a").await;

    // A session of another user: refused, and nothing revoked.
    let res = app.admin_revoke_user("alice", Some(&bob.session_id)).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;

    let mut bad_char = a.session_id.clone();
    bad_char.replace_range(30..31, "*");
    let malformed = [
        "".to_string(),
        "abc".to_string(),
        a.session_id[..43].to_string(),
        format!("{}A", a.session_id),
        bad_char,
        format!("{}&except={}", a.session_id, a.session_id),
    ];
    for except in &malformed {
        let res = app
            .admin(
                Method::DELETE,
                &format!("/v1/admin/users/alice/sessions?except={except}"),
            )
            .send()
            .await
            .unwrap();
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert_eq!(app.verify_status(&a.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&bob.token).await, StatusCode::OK);
}

async fn admin_force_logout_of_one_device(t: Topo) {
    let app = t.app(&[]).await;
    let laptop = app.create("alice", "laptop").await;
    let phone = app.create("alice", "phone").await;
    let bobs_laptop = app.create("bob", "laptop").await;

    let res = app.admin_revoke_device("alice", "laptop").await;
    assert_eq!(json_of(res).await, json!({"revoked": 1}));
    assert_error(
        app.verify(&laptop.token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    assert_eq!(app.verify_status(&phone.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&bobs_laptop.token).await, StatusCode::OK);

    for (user, device) in [("alice", "laptop"), ("alice", "tablet"), ("nobody", "x")] {
        let res = app.admin_revoke_device(user, device).await;
        assert_eq!(json_of(res).await, json!({"revoked": 0}), "{user}/{device}");
    }
    assert_eq!(app.verify_status(&phone.token).await, StatusCode::OK);
}

async fn admin_revokes_one_session_by_id(t: Topo) {
    let app = t.app(&[]).await;
    let a = app.create("alice", "a").await;
    let b = app.create("alice", "b").await;

    let res = app.admin_revoke_session(&a.session_id).await;
    assert_eq!(json_of(res).await, json!({"revoked": 1}));
    assert_eq!(app.verify_status(&a.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&b.token).await, StatusCode::OK);
    let res = app.admin_revoke_session(&a.session_id).await;
    assert_eq!(json_of(res).await, json!({"revoked": 0}));

    for bad in ["abc", &a.session_id[..43], &format!("{}A", a.session_id)] {
        let res = app.admin_revoke_session(bad).await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert_eq!(app.verify_status(&b.token).await, StatusCode::OK);
}

async fn logout_all_revokes_every_earlier_token_at_once_and_purges_them(t: Topo) {
    let app = t.app(&[]).await;
    let mut old = Vec::new();
    for user in ["alice", "bob", "carol"] {
        for device in ["laptop", "phone"] {
            old.push(app.create(user, device).await);
        }
    }
    for s in &old {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }

    let res = app.logout_all().await;
    let body = json_of(res).await;
    let cutoff = body["cutoff_ms"].as_i64().expect("cutoff_ms");
    let created_ms = old[0].body["created_at"].as_i64().unwrap() * 1000;
    assert!(cutoff >= created_ms, "cutoff {cutoff} before creation");

    // At once, on this instance: no waiting.
    for s in &old {
        assert_error(
            app.verify(&s.token).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
        let body = json_of(app.introspect(&s.token, ADMIN_KEY).await).await;
        assert_eq!(body, json!({"active": false}));
    }

    let fresh = app.create("dave", "laptop").await;
    assert_eq!(app.verify_status(&fresh.token).await, StatusCode::OK);
    // An old user logging in again is fine too.
    let again = app.create("alice", "laptop").await;
    assert_eq!(app.verify_status(&again.token).await, StatusCode::OK);

    // The background purge removes the revoked users' records; the new
    // sessions stay.
    let mut expected = vec![t.hash_of(&fresh.session_id), t.hash_of(&again.session_id)];
    expected.sort();
    eventually(Duration::from_secs(5), || {
        let hashes = t_hashes(&t);
        let done = hashes == expected;
        async move { done }
    })
    .await;
    let alice = json_of(app.admin_list("alice").await).await;
    let sessions = alice["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{alice}");
    assert_eq!(sessions[0]["session_id"], again.session_id.as_str());
    assert_eq!(app.verify_status(&fresh.token).await, StatusCode::OK);
}

async fn key_rotation_signs_new_tokens_with_a_new_kid_and_old_ones_still_verify(t: Topo) {
    let app = t.app(&[]).await;
    let before = app.create("alice", "laptop").await;
    let kid0 = kid_of(&before.token);

    let body = json_of(app.rotate_keys().await).await;
    let kid1 = body["kid"].as_str().expect("kid").to_string();
    assert_ne!(kid1, kid0);
    assert_eq!(app.verify_status(&before.token).await, StatusCode::OK);

    let after = app.create("bob", "laptop").await;
    assert_eq!(kid_of(&after.token), kid1);
    assert_eq!(app.verify_status(&after.token).await, StatusCode::OK);

    let body = json_of(app.rotate_keys().await).await;
    let kid2 = body["kid"].as_str().expect("kid").to_string();
    assert_ne!(kid2, kid1);
    assert_ne!(kid2, kid0);
    let latest = app.create("carol", "laptop").await;
    assert_eq!(kid_of(&latest.token), kid2);
    // Neither older key is retired yet (retirement is a lifetime away).
    for s in [&before, &after, &latest] {
        let res = app.verify(&s.token).await;
        assert_eq!(res.status(), StatusCode::OK, "{}", s.user_id);
        assert_eq!(res.headers()["x-session-user"], s.user_id.as_str());
        let body = json_of(app.introspect(&s.token, ISSUER_KEY).await).await;
        assert_eq!(body["active"], true, "{body}");
    }
}

async fn introspect_describes_an_active_token(t: Topo) {
    let app = t.app(&[]).await;
    let auth_time = before_now(120);
    let s = app
        .create_body(json!({"user_id": "alice", "device_id": "laptop", "auth_time": auth_time}))
        .await;
    let res = app.introspect(&s.token, ISSUER_KEY).await;
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.unwrap();
    assert!(!text.contains(&s.token), "token echoed: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["active"], true);
    assert_eq!(body["sub"], "alice");
    assert_eq!(body["sid"], s.session_id.as_str());
    assert_eq!(body["did"], "laptop");
    assert_eq!(body["iss"], app.settings.issuer.as_str());
    assert_eq!(body["exp"], s.body["expires_at"]);
    assert_eq!(body["iat"], s.body["created_at"]);
    assert_eq!(body["auth_time"], auth_time);
    assert!(body.get("token").is_none(), "{body}");
}

async fn introspect_reports_auth_time_instead_of_enforcing_reauth(t: Topo) {
    let app = t.app(&[]).await;
    // 13 h ago: past the default 12 h reauth_after.
    let auth_time = before_now(13 * 3600);
    let s = app
        .create_body(json!({"user_id": "alice", "device_id": "laptop", "auth_time": auth_time}))
        .await;
    assert_error(
        app.verify(&s.token).await,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
    let body = json_of(app.introspect(&s.token, ADMIN_KEY).await).await;
    assert_eq!(body["active"], true, "{body}");
    assert_eq!(body["auth_time"], auth_time);
}

/// Unix seconds, `secs` ago.
fn before_now(secs: i64) -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - secs
}

/// A well-signed token for `s` (same kid, same ids) that expired a minute ago.
fn expired_copy_of(s: &crate::helpers::Created) -> String {
    use sessiongate::token::{Claims, KeyRing, TokenCodec};
    let kid = kid_of(&s.token);
    let ring = KeyRing::from_json(
        &format!(r#"{{"active":"{kid}","keys":[{{"kid":"{kid}","retire_at":0}}]}}"#),
        SIGNING_SECRET.as_bytes(),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    let codec = TokenCodec::new(jsonwebtoken::Algorithm::HS256, "sessiongate", 5, 4096);
    let now = before_now(0) as u64;
    codec.sign(
        &ring,
        &Claims {
            sub: s.user_id.clone(),
            sid: s.session_id.clone(),
            did: s.device_id.clone(),
            iss: "sessiongate".into(),
            iat: now - 600,
            exp: now - 60,
            nbf: None,
        },
    )
}

async fn introspect_answers_only_active_false_for_dead_tokens(t: Topo) {
    let app = t.app(&[]).await;
    let revoked = app.create("alice", "laptop").await;
    assert_eq!(
        app.logout(&revoked.token).await.status(),
        StatusCode::NO_CONTENT
    );
    let live = app.create("bob", "laptop").await;
    let expired = expired_copy_of(&live);
    // The forged copy is genuine but for its exp: the verify refuses it too.
    assert_eq!(app.verify_status(&expired).await, StatusCode::UNAUTHORIZED);
    let gone = app.create("carol", "laptop").await;
    assert_eq!(
        t.cmd(
            &t.hash_of(&gone.session_id),
            &["DEL", &t.hash_of(&gone.session_id)]
        ),
        ":1\r\n"
    );
    // One signature character changed (not the last, whose low bits are padding).
    let mut tampered = live.token.clone();
    let at = tampered.len() - 5;
    let c = if &tampered[at..at + 1] == "A" {
        "B"
    } else {
        "A"
    };
    tampered.replace_range(at..at + 1, c);

    let dead = [
        revoked.token.as_str(),
        expired.as_str(),
        gone.token.as_str(),
        tampered.as_str(),
        "garbage",
        "a.b.c",
        "",
    ];
    for token in dead {
        for key in [ISSUER_KEY, ADMIN_KEY] {
            let res = app.introspect(token, key).await;
            assert_eq!(res.status(), StatusCode::OK, "{token:?}");
            let text = res.text().await.unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&text).unwrap(),
                json!({"active": false}),
                "{token:?}"
            );
            if !token.is_empty() {
                assert!(!text.contains(token), "token echoed: {text}");
            }
        }
    }
    // The live one is still active, and introspection changed nothing.
    let body = json_of(app.introspect(&live.token, ISSUER_KEY).await).await;
    assert_eq!(body["active"], true);
    assert_eq!(app.verify_status(&live.token).await, StatusCode::OK);
}

#[tokio::test]
async fn introspect_refuses_bad_bodies_without_echoing_the_token() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;

    // No token field.
    let res = app
        .issuer(Method::POST, "/v1/introspect")
        .form(&[("token_type_hint", "access_token")])
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    // Empty body.
    let res = app
        .issuer(Method::POST, "/v1/introspect")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    // JSON instead of a form.
    let res = app
        .issuer(Method::POST, "/v1/introspect")
        .json(&json!({"token": s.token}))
        .send()
        .await
        .unwrap();
    let body = assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(!body.to_string().contains(&s.token), "token echoed: {body}");
    // A form body labelled as something else.
    let res = app
        .issuer(Method::POST, "/v1/introspect")
        .header("content-type", "text/plain")
        .body(format!("token={}", s.token))
        .send()
        .await
        .unwrap();
    let body = assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(!body.to_string().contains(&s.token), "token echoed: {body}");
    // The token twice: a parse error that must not quote it.
    let res = app
        .issuer(Method::POST, "/v1/introspect")
        .form(&[("token", s.token.as_str()), ("token", s.token.as_str())])
        .send()
        .await
        .unwrap();
    let body = assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(!body.to_string().contains(&s.token), "token echoed: {body}");
}

async fn introspection_does_not_slide_the_idle_timer(t: Topo) {
    // 6 s, so the checks between the sleeps have seconds of slack on a
    // loaded machine; the effective touch interval is 600 ms.
    let app = t.app(&[("IDLE_TIMEOUT", "6s")]).await;
    let introspected = app.create("alice", "laptop").await;
    let verified = app.create("bob", "laptop").await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    for _ in 0..3 {
        let body = json_of(app.introspect(&introspected.token, ISSUER_KEY).await).await;
        assert_eq!(body["active"], true);
    }
    assert_eq!(app.verify_status(&verified.token).await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    // 7 s after creation: the introspected session idled out, the verified
    // one was slid at 3 s.
    let body = json_of(app.introspect(&introspected.token, ISSUER_KEY).await).await;
    assert_eq!(body, json!({"active": false}));
    assert_eq!(app.verify_status(&verified.token).await, StatusCode::OK);
}

async fn admin_paths_address_ids_with_reserved_characters_exactly(t: Topo) {
    let app = t.app(&[]).await;
    // Percent-encoded in the path; "a%2Fb" and "a/b" are different users.
    let users = [
        "a/b", "a%2Fb", "a+b", "100%", "%41", "A", "a b", "a?b#c", "ü",
    ];
    let mut created = Vec::new();
    for user in users {
        created.push(app.create(user, "d/e+f%").await);
        app.create(user, "other").await;
    }
    for (user, s) in users.iter().zip(&created) {
        let list = json_of(app.admin_list(user).await).await;
        let sessions = list["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 2, "{user:?}: {list}");
        let res = app.admin_revoke_device(user, "d/e+f%").await;
        assert_eq!(json_of(res).await, json!({"revoked": 1}), "{user:?}");
        assert_eq!(
            app.verify_status(&s.token).await,
            StatusCode::UNAUTHORIZED,
            "{user:?}"
        );
    }
    let res = app.admin_revoke_user("a/b", None).await;
    assert_eq!(json_of(res).await, json!({"revoked": 1}));
    let list = json_of(app.admin_list("a%2Fb").await).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{list}");
}

/// Milliseconds since the epoch, from this host's clock (Redis runs here too).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn a_rotated_out_key_retires_a_whole_token_lifetime_plus_leeway_later(t: Topo) {
    // Retiring earlier would refuse a token signed just before the rotation
    // while it is still within its absolute lifetime (plus clock leeway).
    let app = t
        .app(&[("ABSOLUTE_LIFETIME", "1h"), ("CLOCK_LEEWAY", "5s")])
        .await;
    let kid0 = kid_of(&app.create("alice", "laptop").await.token);
    let before = wall_ms();
    json_of(app.rotate_keys().await).await;
    let after = wall_ms();
    let reply = t.cmd(&t.key("global"), &["HGET", &t.key("global"), "ring"]);
    // "$len\r\n{json}\r\n"
    let json = reply.split("\r\n").nth(1).expect("a bulk string");
    let ring: Value = serde_json::from_str(json).unwrap();
    let old = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid0.as_str())
        .unwrap_or_else(|| panic!("the old kid is still in {ring}"));
    let retire_at = old["retire_at"].as_f64().unwrap() as i64;
    let lifetime_plus_leeway_and_1s = 3_600_000 + 5_000 + 1_000;
    assert!(
        (before + lifetime_plus_leeway_and_1s..=after + lifetime_plus_leeway_and_1s)
            .contains(&retire_at),
        "retire_at {retire_at}, rotation between {before} and {after}"
    );
}

async fn logout_all_purges_records_that_nobody_presents_again(t: Topo) {
    // The other logout-all test verifies every old token, and a verify of a
    // dead session deletes its record itself: the purge must be seen alone.
    let app = t.app(&[]).await;
    for user in ["erin", "frank"] {
        for device in ["laptop", "phone"] {
            app.create(user, device).await;
        }
    }
    assert_eq!(t_hashes(&t).len(), 2);
    json_of(app.logout_all().await).await;
    eventually(Duration::from_secs(10), || {
        let left = t_hashes(&t);
        async move { left.is_empty() }
    })
    .await;
    // A second logout-all later purges what was created in between.
    app.create("grace", "laptop").await;
    assert_eq!(t_hashes(&t).len(), 1);
    json_of(app.logout_all().await).await;
    eventually(Duration::from_secs(10), || {
        let left = t_hashes(&t);
        async move { left.is_empty() }
    })
    .await;
}

crate::on_every_topology!(
    admin_lists_a_users_sessions_without_current,
    admin_force_logout_of_a_user_revokes_every_token_and_only_theirs,
    admin_force_logout_except_keeps_one_session,
    admin_force_logout_refuses_a_bad_except,
    admin_force_logout_of_one_device,
    admin_revokes_one_session_by_id,
    logout_all_revokes_every_earlier_token_at_once_and_purges_them,
    key_rotation_signs_new_tokens_with_a_new_kid_and_old_ones_still_verify,
    introspect_describes_an_active_token,
    introspect_reports_auth_time_instead_of_enforcing_reauth,
    introspect_answers_only_active_false_for_dead_tokens,
    introspection_does_not_slide_the_idle_timer,
    admin_paths_address_ids_with_reserved_characters_exactly,
    a_rotated_out_key_retires_a_whole_token_lifetime_plus_leeway_later,
    logout_all_purges_records_that_nobody_presents_again,
);
