//! Time and count policies, with short durations: the sliding idle timeout,
//! the absolute lifetime, re-authentication age (`reauth_after`, `max_age`,
//! `POST /v1/sessions/{id}/reauth`), and the per-user session cap, also
//! under concurrent creates.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::future::join_all;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{TestApp, assert_error};
use crate::topology::Topo;

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// The session ids of a user, as the admin lists them.
async fn admin_session_ids(app: &TestApp, user: &str) -> Vec<String> {
    let res = app.admin_list(user).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    body["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("no sessions array in {body}"))
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_string())
        .collect()
}

async fn admin_devices(app: &TestApp, user: &str) -> BTreeSet<String> {
    let res = app.admin_list(user).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["device_id"].as_str().unwrap().to_string())
        .collect()
}

fn www_authenticate(res: &Response) -> String {
    res.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Asserts 401 `insufficient_user_authentication` with `max_age` both in
/// `WWW-Authenticate` (RFC 9470) and in the body.
async fn assert_insufficient(res: Response, max_age: u64) {
    let header = www_authenticate(&res);
    assert!(
        header.starts_with("Bearer ")
            && header.contains(r#"error="insufficient_user_authentication""#),
        "WWW-Authenticate {header:?}"
    );
    let params: Vec<&str> = header["Bearer ".len()..]
        .split(',')
        .map(str::trim)
        .collect();
    assert!(
        params.contains(&format!("max_age={max_age}").as_str()),
        "max_age={max_age} in WWW-Authenticate {header:?}"
    );
    let body = assert_error(
        res,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
    assert_eq!(body["max_age"], max_age, "{body}");
}

/// A well-formed session id for `user` that no create ever returned.
fn fresh_session_id(user: &str) -> String {
    let digest = Sha256::digest(user.as_bytes());
    format!(
        "{}{}",
        URL_SAFE_NO_PAD.encode(&digest[..16]),
        URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes())
    )
}

// --- idle timeout ----------------------------------------------------------------

async fn idle_timeout_slides_with_each_verify_and_ends_an_idle_session(t: Topo) {
    // Effective touch interval: min(1 s, 4 s / 10) = 400 ms. A 4 s idle
    // timeout leaves the busy session's verifies (every 0.5 s) more than 3 s
    // of slack on a loaded machine.
    let app = t
        .app(&[("IDLE_TIMEOUT", "4s"), ("TOUCH_INTERVAL", "1s")])
        .await;
    let busy = app.create("ida", "busy").await;
    let idle = app.create("ida", "idle").await;
    assert_eq!(app.verify_status(&busy.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&idle.token).await, StatusCode::OK);

    // Verified every 0.5 s for 6 s: longer than the idle timeout, still alive.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            app.verify_status(&busy.token).await,
            StatusCode::OK,
            "busy session at {:?}",
            started.elapsed()
        );
    }
    // The other one was left alone for 6 s > 4 s.
    assert_error(
        app.verify(&idle.token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    assert_eq!(
        admin_devices(&app, "ida").await,
        BTreeSet::from(["busy".to_string()])
    );

    // Now the busy one rests for 5 s > 4 s: gone, and it stays gone.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    for _ in 0..2 {
        assert_error(
            app.verify(&busy.token).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
    }
    assert!(admin_session_ids(&app, "ida").await.is_empty());
}

// --- absolute lifetime ---------------------------------------------------------

async fn absolute_lifetime_ends_a_session_even_when_it_is_busy(t: Topo) {
    let app = t
        .app(&[("ABSOLUTE_LIFETIME", "4s"), ("IDLE_TIMEOUT", "1h")])
        .await;
    let before_create = Instant::now();
    let s = app.create("abe", "laptop").await;
    let after_create = Instant::now();

    // The token's exp is the session's absolute end.
    let claims = claims_of(&s.token);
    assert_eq!(claims["exp"], s.body["expires_at"]);
    assert_eq!(claims["iat"], s.body["created_at"]);
    let lifetime = s.body["expires_at"].as_i64().unwrap() - s.body["created_at"].as_i64().unwrap();
    assert_eq!(lifetime, 4, "expires_at - created_at");

    // Verified every 200 ms: 200 while surely before the end (the record was
    // created after `before_create`), 401 once surely after it (created
    // before `after_create`), whatever the scheduling. A 4 s lifetime leaves
    // room for several answers on each side on a loaded machine.
    let (mut alive, mut gone) = (0, 0);
    while after_create.elapsed() < Duration::from_millis(7000) {
        let sent_since_create = after_create.elapsed();
        let res = app.verify(&s.token).await;
        let answered_since_start = before_create.elapsed();
        if answered_since_start < Duration::from_millis(3800) {
            assert_eq!(res.status(), StatusCode::OK, "at {answered_since_start:?}");
            alive += 1;
        } else if sent_since_create > Duration::from_millis(4200) {
            assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
            gone += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(alive >= 3 && gone >= 2, "alive {alive}, gone {gone}");
    assert!(admin_session_ids(&app, "abe").await.is_empty());
}

// --- re-authentication -------------------------------------------------------------

async fn reauth_after_demands_a_fresh_password_and_reauth_restores_the_same_token(t: Topo) {
    // 3 s: the checks right after the reauth below must run before the
    // password is old again, which a loaded machine may not do within 1 s.
    let app = t.app(&[("REAUTH_AFTER", "3s")]).await;
    let s = app.create("rita", "laptop").await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);

    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_insufficient(app.verify(&s.token).await, 3).await;
    assert_insufficient(app.verify_at("/v1/verify/api/orders", &s.token).await, 3).await;
    // The session itself is alive: its holder can still see it.
    assert_eq!(app.current(&s.token).await.status(), StatusCode::OK);

    let before = now_s();
    let res = app.reauth(&s.session_id).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["session_id"], s.session_id.as_str());
    let auth_time = body["auth_time"].as_i64().unwrap();
    assert!(
        (before - 1..=now_s() + 1).contains(&auth_time),
        "auth_time {auth_time}, now {before}"
    );

    // The very same token verifies again, and the session shows the new time.
    let res = app.verify(&s.token).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-session-id"], s.session_id.as_str());
    let current: Value = app.current(&s.token).await.json().await.unwrap();
    assert_eq!(current["auth_time"], auth_time, "{current}");

    // …until the password is old again.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_insufficient(app.verify(&s.token).await, 3).await;
}

async fn reauth_refuses_unknown_revoked_and_wrongly_keyed_calls(t: Topo) {
    let app = t.app(&[]).await;
    let kept = app.create("rex", "laptop").await;
    let revoked = app.create("rex", "phone").await;
    assert_eq!(
        app.logout(&revoked.token).await.status(),
        StatusCode::NO_CONTENT
    );

    let unknown = fresh_session_id("rex");
    for (what, sid) in [
        ("unknown session", unknown.as_str()),
        ("revoked session", revoked.session_id.as_str()),
        ("malformed id", "not-a-session"),
    ] {
        let res = app.reauth(sid).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{what}");
        assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    }
    // A revoked session is not brought back by a reauth.
    assert_eq!(
        app.verify_status(&revoked.token).await,
        StatusCode::UNAUTHORIZED
    );

    let path = format!("/v1/sessions/{}/reauth", kept.session_id);
    let res = app.admin(Method::POST, &path).send().await.unwrap();
    assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
    let res = app.request(Method::POST, &path).send().await.unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let res = app
        .request(Method::POST, &path)
        .bearer_auth("not-the-issuer-key-0123456789abcdef0123")
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // A user's own token is not an issuer key either.
    let res = app
        .request(Method::POST, &path)
        .bearer_auth(&kept.token)
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(app.verify_status(&kept.token).await, StatusCode::OK);
}

async fn an_old_auth_time_fails_a_route_max_age_but_passes_plain_verify(t: Topo) {
    // Default reauth_after: 12 h.
    let app = t.app(&[]).await;
    let auth_time = now_s() - 3600;
    let s = app
        .create_body(json!({"user_id": "olga", "device_id": "laptop", "auth_time": auth_time}))
        .await;
    assert_eq!(s.body["auth_time"], auth_time, "{}", s.body);

    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    assert_insufficient(app.verify_at("/v1/verify?max_age=300", &s.token).await, 300).await;
    // The tail form takes the route's demand from a header (its query
    // string is the app's and is ignored).
    assert_insufficient(
        app.request(reqwest::Method::GET, "/v1/verify/admin/panel?x=1")
            .bearer_auth(&s.token)
            .header("x-sessiongate-max-age", "300")
            .send()
            .await
            .unwrap(),
        300,
    )
    .await;
    // A route demanding less than the password's age passes.
    for max_age in [7200, 86_400, 10 * 86_400] {
        let res = app
            .verify_at(&format!("/v1/verify?max_age={max_age}"), &s.token)
            .await;
        assert_eq!(res.status(), StatusCode::OK, "max_age={max_age}");
    }
    // Once re-authenticated, the strict route passes too.
    assert_eq!(app.reauth(&s.session_id).await.status(), StatusCode::OK);
    let res = app.verify_at("/v1/verify?max_age=300", &s.token).await;
    assert_eq!(res.status(), StatusCode::OK);
}

async fn an_auth_time_in_the_future_is_refused_and_nothing_is_stored(t: Topo) {
    let app = t.app(&[]).await;
    for auth_time in [now_s() + 3600, now_s() + 60, i64::MAX / 1000, i64::MAX] {
        let res = app
            .create_raw(json!({"user_id": "fred", "device_id": "laptop", "auth_time": auth_time}))
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert!(admin_session_ids(&app, "fred").await.is_empty());

    // Within the clock leeway it is accepted, but never stored as later than
    // the session's creation.
    let s = app
        .create_body(json!({"user_id": "fred", "device_id": "laptop", "auth_time": now_s() + 2}))
        .await;
    let (auth, created) = (
        s.body["auth_time"].as_i64().unwrap(),
        s.body["created_at"].as_i64().unwrap(),
    );
    assert!(
        auth <= created,
        "auth_time {auth} after created_at {created}"
    );
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

async fn route_max_age_passes_for_a_fresh_session_and_bad_values_are_400(t: Topo) {
    let app = t.app(&[]).await;
    let s = app.create("maxi", "laptop").await;
    for path in [
        "/v1/verify?max_age=300",
        "/v1/verify?page=2&max_age=300&x=y",
        "/v1/verify/api/orders/7?max_age=300",
        "/v1/verify?max_age=18446744073709551615",
    ] {
        assert_eq!(
            app.verify_at(path, &s.token).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    for bad in [
        "abc",
        "-1",
        "1.5",
        "",
        "1e3",
        "0x10",
        "+5",
        " 5",
        "99999999999999999999999",
    ] {
        let path = format!("/v1/verify?max_age={}", bad.replace(' ', "%20"));
        let res = app.verify_at(&path, &s.token).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let res = app
        .verify_at("/v1/verify?max_age=300&max_age=600", &s.token)
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    // In the tail form the query is the app's own: ignored, never a 400.
    let res = app.verify_at("/v1/verify/x?max_age=abc", &s.token).await;
    assert_eq!(res.status(), StatusCode::OK);
    // A refused max_age did not harm the session.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

// --- session cap -------------------------------------------------------------------

async fn one_session_over_the_cap_evicts_the_least_recently_used(t: Topo) {
    // Effective touch interval: min(1 s, 10 s / 10) = 1 s.
    let app = t
        .app(&[
            ("MAX_SESSIONS_PER_USER", "3"),
            ("IDLE_TIMEOUT", "10s"),
            ("TOUCH_INTERVAL", "1s"),
        ])
        .await;
    let a = app.create("cap", "a").await;
    let b = app.create("cap", "b").await;
    let c = app.create("cap", "c").await;
    let other = app.create("someone-else", "a").await;

    // After a touch interval, a and c are used: b is the least recently used.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(app.verify_status(&a.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&c.token).await, StatusCode::OK);

    let d = app.create("cap", "d").await;
    assert_error(
        app.verify(&b.token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    for s in [&a, &c, &d, &other] {
        assert_eq!(
            app.verify_status(&s.token).await,
            StatusCode::OK,
            "{}",
            s.device_id
        );
    }
    assert_eq!(
        admin_devices(&app, "cap").await,
        BTreeSet::from(["a".to_string(), "c".into(), "d".into()])
    );
    assert_eq!(admin_session_ids(&app, "cap").await.len(), 3);
    // The evicted session is gone for reauth too.
    assert_error(
        app.reauth(&b.session_id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

async fn a_new_login_on_a_known_device_at_the_cap_evicts_nobody(t: Topo) {
    let app = t.app(&[("MAX_SESSIONS_PER_USER", "3")]).await;
    let a = app.create("relog", "a").await;
    let b = app.create("relog", "b").await;
    let c = app.create("relog", "c").await;
    // At the cap, logging in again on device b replaces b's session only.
    let b2 = app.create("relog", "b").await;
    assert_eq!(app.verify_status(&b.token).await, StatusCode::UNAUTHORIZED);
    for s in [&a, &c, &b2] {
        assert_eq!(
            app.verify_status(&s.token).await,
            StatusCode::OK,
            "{}",
            s.device_id
        );
    }
    assert_eq!(admin_session_ids(&app, "relog").await.len(), 3);
    // The replaced session cannot be brought back by a reauth.
    assert_error(
        app.reauth(&b.session_id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

async fn parallel_creates_one_over_the_cap_leave_exactly_the_cap(t: Topo) {
    const CAP: usize = 5;
    let app = t.app(&[("MAX_SESSIONS_PER_USER", "5")]).await;
    let devices: Vec<String> = (0..=CAP).map(|i| format!("device-{i}")).collect();
    let created = join_all(devices.iter().map(|d| app.create("para", d))).await;

    let ids = admin_session_ids(&app, "para").await;
    assert_eq!(ids.len(), CAP, "{ids:?}");
    let statuses = join_all(created.iter().map(|s| app.verify_status(&s.token))).await;
    let failed: Vec<&str> = created
        .iter()
        .zip(&statuses)
        .filter(|(_, status)| **status != StatusCode::OK)
        .map(|(s, _)| s.device_id.as_str())
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "tokens failing: {failed:?}, statuses {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::UNAUTHORIZED)
    );
    // The listed sessions are exactly the tokens that verify.
    let live: BTreeSet<&str> = created
        .iter()
        .zip(&statuses)
        .filter(|(_, status)| **status == StatusCode::OK)
        .map(|(s, _)| s.session_id.as_str())
        .collect();
    assert_eq!(live, ids.iter().map(String::as_str).collect());
}

async fn parallel_creates_on_one_device_leave_exactly_one_session(t: Topo) {
    let app = t.app(&[]).await;
    let created = join_all((0..8).map(|_| app.create("solo", "the-phone"))).await;
    let distinct: BTreeSet<&str> = created.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(distinct.len(), 8);

    let statuses = join_all(created.iter().map(|s| app.verify_status(&s.token))).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 1, "statuses {statuses:?}");
    let ids = admin_session_ids(&app, "solo").await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let survivor = created
        .iter()
        .zip(&statuses)
        .find(|(_, status)| **status == StatusCode::OK)
        .map(|(s, _)| s.session_id.clone())
        .unwrap();
    assert_eq!(ids[0], survivor);
}

crate::on_every_topology!(
    idle_timeout_slides_with_each_verify_and_ends_an_idle_session,
    absolute_lifetime_ends_a_session_even_when_it_is_busy,
    reauth_after_demands_a_fresh_password_and_reauth_restores_the_same_token,
    reauth_refuses_unknown_revoked_and_wrongly_keyed_calls,
    an_old_auth_time_fails_a_route_max_age_but_passes_plain_verify,
    an_auth_time_in_the_future_is_refused_and_nothing_is_stored,
    route_max_age_passes_for_a_fresh_session_and_bad_values_are_400,
    one_session_over_the_cap_evicts_the_least_recently_used,
    a_new_login_on_a_known_device_at_the_cap_evicts_nobody,
    parallel_creates_one_over_the_cap_leave_exactly_the_cap,
    parallel_creates_on_one_device_leave_exactly_one_session,
);
