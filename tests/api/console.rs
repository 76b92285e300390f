//! The admin console under `/admin/`, over plain HTTP: sign-in and its
//! cookie, the security headers, CSRF and origin refusals, expiry and
//! tampering, and each page's action through the real service.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_KEY, ISSUER_KEY, TestApp, eventually, spawn_app, spawn_app_with};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The `Set-Cookie` header that sets `name`, if any.
fn set_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with(&format!("{name}=")))
}

/// The value part of a `Set-Cookie` line.
fn cookie_value(line: &str) -> String {
    let pair = line.split(';').next().unwrap();
    pair.split_once('=').unwrap().1.to_string()
}

/// The first hidden `csrf` field of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find(r#"name="csrf" value=""#).expect("a csrf field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

/// A signed-in console: its cookie and the CSRF token of its forms.
struct Console {
    cookie: String,
    csrf: String,
}

/// The sign-in form: the pre-sign-in cookie and the form's token.
async fn sign_in_form(app: &TestApp) -> (String, String) {
    let res = app
        .request(Method::GET, "/admin/login")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let line = set_cookie(res.headers(), "sessiongate_console_login").expect("a login cookie");
    let html = res.text().await.unwrap();
    (cookie_value(&line), csrf_of(&html))
}

async fn post_sign_in(app: &TestApp, key: &str) -> Response {
    let (nonce, csrf) = sign_in_form(app).await;
    app.request(Method::POST, "/admin/login")
        .header("cookie", format!("sessiongate_console_login={nonce}"))
        .form(&[("admin_key", key), ("csrf", &csrf)])
        .send()
        .await
        .unwrap()
}

async fn sign_in(app: &TestApp) -> Console {
    let res = post_sign_in(app, ADMIN_KEY).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()["location"], "/admin/");
    let line = set_cookie(res.headers(), "sessiongate_console").expect("a console cookie");
    let cookie = cookie_value(&line);
    let page = get(app, "/admin/", Some(&cookie)).await;
    assert_eq!(page.status(), StatusCode::OK);
    let csrf = csrf_of(&page.text().await.unwrap());
    Console { cookie, csrf }
}

async fn get(app: &TestApp, path: &str, cookie: Option<&str>) -> Response {
    let mut req = app.request(Method::GET, path);
    if let Some(c) = cookie {
        req = req.header("cookie", format!("sessiongate_console={c}"));
    }
    req.send().await.unwrap()
}

impl Console {
    async fn get(&self, app: &TestApp, path: &str) -> Response {
        get(app, path, Some(&self.cookie)).await
    }

    /// A form POST with this console's cookie; `form` is sent as given.
    async fn post(&self, app: &TestApp, path: &str, form: &[(&str, &str)]) -> Response {
        app.request(Method::POST, path)
            .header("cookie", format!("sessiongate_console={}", self.cookie))
            .form(form)
            .send()
            .await
            .unwrap()
    }
}

fn assert_security_headers(res: &Response, what: &str) {
    let h = res.headers();
    assert_eq!(h["content-security-policy"], CSP, "{what}");
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
    assert_eq!(h["cache-control"], "no-store", "{what}");
}

#[tokio::test]
async fn the_console_cookie_is_httponly_strict_scoped_and_secure_only_behind_trusted_https() {
    let app = spawn_app_with(&[("TRUSTED_PROXIES", "127.0.0.1")]).await;
    let res = post_sign_in(&app, ADMIN_KEY).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let line = set_cookie(res.headers(), "sessiongate_console").unwrap();
    let attrs: Vec<&str> = line.split(';').map(str::trim).collect();
    for want in ["HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age=1800"] {
        assert!(attrs.contains(&want), "{want} in {line}");
    }
    assert!(!attrs.contains(&"Secure"), "plain http: {line}");
    assert!(!line.contains(ADMIN_KEY), "the key is not in the cookie");
    // The pre-sign-in cookie is removed.
    let login = set_cookie(res.headers(), "sessiongate_console_login").unwrap();
    assert!(login.contains("Max-Age=0"), "{login}");

    // Behind a trusted gateway on https: Secure.
    let (nonce, csrf) = sign_in_form(&app).await;
    let res = app
        .request(Method::POST, "/admin/login")
        .header("cookie", format!("sessiongate_console_login={nonce}"))
        .header("x-forwarded-proto", "https")
        .form(&[("admin_key", ADMIN_KEY), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    let line = set_cookie(res.headers(), "sessiongate_console").unwrap();
    assert!(line.split(';').any(|a| a.trim() == "Secure"), "{line}");

    // An untrusted peer's X-Forwarded-Proto is not believed either way.
    let app = spawn_app_with(&[("CONSOLE_SESSION_TTL", "15m")]).await;
    let (nonce, csrf) = sign_in_form(&app).await;
    let res = app
        .request(Method::POST, "/admin/login")
        .header("cookie", format!("sessiongate_console_login={nonce}"))
        .header("x-forwarded-proto", "https")
        .form(&[("admin_key", ADMIN_KEY), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    let line = set_cookie(res.headers(), "sessiongate_console").unwrap();
    assert!(!line.split(';').any(|a| a.trim() == "Secure"), "{line}");
    assert!(line.contains("Max-Age=900"), "the TTL setting: {line}");
}

#[tokio::test]
async fn every_console_answer_carries_a_strict_csp_and_no_store() {
    let app = spawn_app().await;
    let c = sign_in(&app).await;
    let cases = [
        ("/admin/", None, StatusCode::SEE_OTHER),
        ("/admin", None, StatusCode::SEE_OTHER),
        ("/admin/login", None, StatusCode::OK),
        ("/admin/", Some(c.cookie.as_str()), StatusCode::OK),
        (
            "/admin/users?user_id=nobody",
            Some(&c.cookie),
            StatusCode::OK,
        ),
        ("/admin/logout-all", Some(&c.cookie), StatusCode::OK),
        ("/admin/keys", Some(&c.cookie), StatusCode::OK),
        (
            "/admin/no-such-page",
            Some(&c.cookie),
            StatusCode::NOT_FOUND,
        ),
        (
            "/admin/sessions/not-an-id",
            Some(&c.cookie),
            StatusCode::BAD_REQUEST,
        ),
        ("/admin/counters.json", Some(&c.cookie), StatusCode::OK),
        ("/admin/counters.json", None, StatusCode::UNAUTHORIZED),
        ("/admin/static/console.js", None, StatusCode::OK),
        ("/admin/static/console.css", None, StatusCode::OK),
    ];
    for (path, cookie, status) in cases {
        let res = get(&app, path, cookie).await;
        assert_eq!(res.status(), status, "{path}");
        assert_security_headers(&res, path);
        let ct = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = res.text().await.unwrap();
        if ct.starts_with("text/html") {
            // No inline script or style: the CSP would block them anyway.
            assert!(!body.contains("<script>"), "{path}");
            assert!(!body.contains("style="), "{path}");
            assert!(!body.contains("<style"), "{path}");
            assert!(body.contains(r#"<meta name="viewport""#), "{path}");
        }
    }
    // A refused POST too.
    let res = c.post(&app, "/admin/keys/rotate", &[]).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_security_headers(&res, "refused POST");
}

#[tokio::test]
async fn a_wrong_admin_key_is_refused_and_counted_against_the_key_failure_limit() {
    let app = spawn_app_with(&[("API_KEY_FAILURE_LIMIT", "3")]).await;
    // An issuer key is not an admin key (refused, not counted).
    let res = post_sign_in(&app, ISSUER_KEY).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(set_cookie(res.headers(), "sessiongate_console").is_none());
    for _ in 0..3 {
        let res = post_sign_in(&app, "not-the-admin-key-0123456789abcdef0123").await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert!(set_cookie(res.headers(), "sessiongate_console").is_none());
        let body = res.text().await.unwrap();
        assert!(body.contains("not an admin key"), "{body}");
        assert!(!body.contains("not-the-admin-key"), "the key is not echoed");
    }
    // Past the limit: a wrong key waits, on the console and the API...
    let res = post_sign_in(&app, "not-the-admin-key-0123456789abcdef0123").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key("retry-after"));
    assert!(set_cookie(res.headers(), "sessiongate_console").is_none());
    let res = app
        .request(Method::GET, "/v1/admin/users/anyone/sessions")
        .bearer_auth("not-the-admin-key-0123456789abcdef0123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // ...while the right key is still accepted from the same address (a
    // shared NAT must not lock the operators out).
    let res = post_sign_in(&app, ADMIN_KEY).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert!(set_cookie(res.headers(), "sessiongate_console").is_some());
    assert_eq!(app.admin_list("anyone").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn posts_without_the_sessions_csrf_token_or_from_another_site_are_refused() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let c = sign_in(&app).await;
    let other = sign_in(&app).await;
    let sid = s.session_id.as_str();
    let form = |csrf: &'static str| -> Vec<(&str, &str)> {
        let mut f = vec![
            ("user_id", "alice"),
            ("action", "session"),
            ("session_id", sid),
        ];
        if !csrf.is_empty() {
            f.push(("csrf", csrf));
        }
        f
    };
    let path = "/admin/users/sign-out";

    let missing = c.post(&app, path, &form("")).await;
    assert_eq!(missing.status(), StatusCode::FORBIDDEN, "no token");
    assert!(missing.text().await.unwrap().contains("CSRF"));
    let mut wrong = form("");
    wrong.push(("csrf", &other.csrf));
    assert_eq!(
        c.post(&app, path, &wrong).await.status(),
        StatusCode::FORBIDDEN,
        "another session's token"
    );
    let mut right = form("");
    right.push(("csrf", &c.csrf));
    for headers in [
        &[("origin", "https://evil.example")][..],
        &[("origin", "null")],
        &[("sec-fetch-site", "cross-site")],
        &[("sec-fetch-site", "same-site")],
        &[
            ("sec-fetch-site", "same-origin"),
            ("origin", "https://evil.example"),
        ],
        &[("sec-fetch-site", "cross-site"), ("origin", "null")],
    ] {
        let mut req = app
            .request(Method::POST, path)
            .header("cookie", format!("sessiongate_console={}", c.cookie));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let res = req.form(&right).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{headers:?}");
    }
    // Without the console cookie the token alone does nothing.
    let res = app
        .request(Method::POST, path)
        .form(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()["location"], "/admin/login");
    // Every refusal left the session alone.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);

    // The sign-in form needs its token and its pre-sign-in cookie.
    let (nonce, csrf) = sign_in_form(&app).await;
    for (cookie, token) in [
        (nonce.as_str(), ""),
        ("", csrf.as_str()),
        ("other", csrf.as_str()),
    ] {
        let res = app
            .request(Method::POST, "/admin/login")
            .header("cookie", format!("sessiongate_console_login={cookie}"))
            .form(&[("admin_key", ADMIN_KEY), ("csrf", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{cookie:?} {token:?}");
        assert!(set_cookie(res.headers(), "sessiongate_console").is_none());
    }

    // Same-origin by Origin, with the token: accepted (a second session, so
    // the revocation below is still to do).
    let other_device = app.create("alice", "phone").await;
    let res = app
        .request(Method::POST, path)
        .header("cookie", format!("sessiongate_console={}", c.cookie))
        .header("origin", &app.address)
        .form(&[
            ("csrf", c.csrf.as_str()),
            ("user_id", "alice"),
            ("action", "session"),
            ("session_id", &other_device.session_id),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        app.verify_status(&other_device.token).await,
        StatusCode::UNAUTHORIZED
    );
    // What a browser sends for a same-origin form under no-referrer
    // (Origin: null, Sec-Fetch-Site: same-origin), with the token: done.
    let res = app
        .request(Method::POST, path)
        .header("cookie", format!("sessiongate_console={}", c.cookie))
        .header("origin", "null")
        .header("sec-fetch-site", "same-origin")
        .form(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        res.headers()["location"],
        "/admin/users?user_id=alice&done=revoked&n=1"
    );
    assert_eq!(app.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_console_cookie_is_refused_after_expiry_tampering_and_sign_out() {
    let app = spawn_app_with(&[("CONSOLE_SESSION_TTL", "1s")]).await;
    let c = sign_in(&app).await;
    let refused = |res: &Response| {
        res.status() == StatusCode::SEE_OTHER && res.headers()["location"] == "/admin/login"
    };

    // Tampered: a later expiry under the old MAC, a changed MAC, garbage.
    let (expiry, rest) = c.cookie.split_once('.').unwrap();
    let later = format!("{}.{rest}", expiry.parse::<i64>().unwrap() + 3_600_000);
    let mut flipped = c.cookie.clone();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [later.as_str(), &flipped, "1.2.3", ""] {
        assert!(refused(&get(&app, "/admin/", Some(bad)).await), "{bad:?}");
        assert_eq!(
            get(&app, "/admin/counters.json", Some(bad)).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }

    // Expired: the same cookie stops working by itself.
    eventually(Duration::from_secs(15), || async {
        refused(&c.get(&app, "/admin/").await)
    })
    .await;
    assert_eq!(
        c.get(&app, "/admin/counters.json").await.status(),
        StatusCode::UNAUTHORIZED
    );

    // Signed out: the cookie is cleared and a kept copy is refused.
    let app = spawn_app().await;
    let c = sign_in(&app).await;
    let res = c.post(&app, "/admin/logout", &[("csrf", &c.csrf)]).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()["location"], "/admin/login?signed_out=1");
    let removal = set_cookie(res.headers(), "sessiongate_console").unwrap();
    assert!(removal.contains("Max-Age=0"), "{removal}");
    assert!(refused(&c.get(&app, "/admin/").await));
}

#[tokio::test]
async fn a_user_page_lists_sessions_and_signs_out_one_the_others_or_all() {
    let app = spawn_app().await;
    let laptop = app
        .create_body(json!({"user_id": "bob", "device_id": "laptop",
            "metadata": {"ip": "203.0.113.7", "user_agent": "Firefox/140 <b>x</b>"}}))
        .await;
    let phone = app.create("bob", "phone").await;
    let tablet = app.create("bob", "tablet").await;
    let carol = app.create("carol", "laptop").await;
    let c = sign_in(&app).await;

    let page = c.get(&app, "/admin/users?user_id=bob").await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    for want in [
        "Sessions of bob",
        "3 live sessions",
        "203.0.113.7",
        "Firefox/140 &lt;b&gt;x&lt;/b&gt;",
        laptop.session_id.as_str(),
        phone.session_id.as_str(),
        "Sign out this device",
        "Sign out everywhere but this one",
        "Sign out everywhere",
        "Password age",
    ] {
        assert!(html.contains(want), "{want} in {html}");
    }
    assert!(!html.contains(&carol.session_id));

    // Everywhere but the laptop.
    let res = c
        .post(
            &app,
            "/admin/users/sign-out",
            &[
                ("csrf", &c.csrf),
                ("user_id", "bob"),
                ("action", "others"),
                ("session_id", &laptop.session_id),
            ],
        )
        .await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let next = res.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(next, "/admin/users?user_id=bob&done=revoked&n=2");
    let html = c.get(&app, &next).await.text().await.unwrap();
    assert!(html.contains("2 sessions revoked"), "{html}");
    assert!(html.contains("1 live session."), "{html}");
    assert_eq!(app.verify_status(&laptop.token).await, StatusCode::OK);
    assert_eq!(
        app.verify_status(&phone.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.verify_status(&tablet.token).await,
        StatusCode::UNAUTHORIZED
    );

    // A session of another user cannot be named through bob.
    let res = c
        .post(
            &app,
            "/admin/users/sign-out",
            &[
                ("csrf", &c.csrf),
                ("user_id", "bob"),
                ("action", "session"),
                ("session_id", &carol.session_id),
            ],
        )
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.verify_status(&carol.token).await, StatusCode::OK);

    // Everywhere.
    let res = c
        .post(
            &app,
            "/admin/users/sign-out",
            &[
                ("csrf", &c.csrf),
                ("user_id", "bob"),
                ("action", "everywhere"),
            ],
        )
        .await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        app.verify_status(&laptop.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_status(&carol.token).await, StatusCode::OK);
}

#[tokio::test]
async fn session_detail_logout_all_confirmation_key_rotation_and_counters() {
    let app = spawn_app().await;
    let s = app
        .create_body(json!({"user_id": "dana", "device_id": "phone",
            "metadata": {"label": "work phone"}}))
        .await;
    let c = sign_in(&app).await;

    // Detail: the live record, and history said to be unavailable.
    let res = c
        .get(
            &app,
            &format!("/admin/sessions/{}?user_id=dana", s.session_id),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let html = res.text().await.unwrap();
    assert!(html.contains("work phone"), "{html}");
    assert!(html.contains("History not available"), "{html}");
    let ended = app.create("dana", "old-laptop").await;
    app.admin_revoke_session(&ended.session_id).await;
    let res = c
        .get(&app, &format!("/admin/sessions/{}", ended.session_id))
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert!(res.text().await.unwrap().contains("History not available"));

    // Counters: numbers of this instance, updated as verifies happen.
    let first: Value = c
        .get(&app, "/admin/counters.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["redis"]["ready"], true, "{first}");
    assert_eq!(first["active_sessions"], 1, "{first}");
    for _ in 0..5 {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }
    eventually(Duration::from_secs(15), || async {
        let now: Value = c
            .get(&app, "/admin/counters.json")
            .await
            .json()
            .await
            .unwrap();
        now["verify_per_second"]["ok"].as_f64().unwrap() > 0.0
    })
    .await;

    // Logout-all: refused unless the phrase is typed exactly.
    for typed in ["", "yes", "log out"] {
        let res = c
            .post(
                &app,
                "/admin/logout-all",
                &[("csrf", &c.csrf), ("confirm", typed)],
            )
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{typed:?}");
        assert!(res.text().await.unwrap().contains("Nothing was done"));
    }
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    let res = c
        .post(
            &app,
            "/admin/logout-all",
            &[("csrf", &c.csrf), ("confirm", "log out everyone")],
        )
        .await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()["location"], "/admin/?done=logout_all");
    assert_eq!(app.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
    // The console itself stays signed in.
    assert_eq!(c.get(&app, "/admin/").await.status(), StatusCode::OK);

    // Key rotation: new tokens carry the new kid shown on the page.
    let kid_on = |html: &str| {
        let at = html.find("data-kid>").unwrap() + 9;
        html[at..].split('<').next().unwrap().to_string()
    };
    let before = kid_on(&c.get(&app, "/admin/keys").await.text().await.unwrap());
    let res = c
        .post(&app, "/admin/keys/rotate", &[("csrf", &c.csrf)])
        .await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()["location"], "/admin/keys?done=rotated");
    let html = c
        .get(&app, "/admin/keys?done=rotated")
        .await
        .text()
        .await
        .unwrap();
    let after = kid_on(&html);
    assert_ne!(before, after);
    assert!(html.contains("The signing key was rotated."));
    let fresh = app.create("dana", "laptop").await;
    let header = fresh.token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&base64_url_decode(header)).unwrap();
    assert_eq!(header["kid"], after.as_str());
}

fn base64_url_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

/// Redis down: the pages that need it answer 503 (with Retry-After) within
/// the timeout, the overview says Redis is not ready, nothing hangs.
#[tokio::test]
async fn with_redis_down_the_console_answers_503_and_shows_redis_not_ready() {
    let app = spawn_app().await;
    let s = app.create("gina", "laptop").await;
    let c = sign_in(&app).await;
    app.redis.as_ref().unwrap().lock().unwrap().kill9();

    let res = c.get(&app, "/admin/users?user_id=gina").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    assert_security_headers(&res, "503 page");
    assert!(res.text().await.unwrap().contains("unavailable"));
    let res = c
        .post(
            &app,
            "/admin/users/sign-out",
            &[
                ("csrf", &c.csrf),
                ("user_id", "gina"),
                ("action", "session"),
                ("session_id", &s.session_id),
            ],
        )
        .await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let counters: Value = c
        .get(&app, "/admin/counters.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(counters["redis"]["ready"], false, "{counters}");
    let html = c.get(&app, "/admin/").await.text().await.unwrap();
    assert!(html.contains("not ready"), "{html}");
}

// --- in a real browser -----------------------------------------------------------------

/// The Python with Playwright (`SESSIONGATE_TEST_PYTHON`, else the venv
/// scripts/test creates) and Debian's Chromium: both must be there; a
/// missing one fails the test with what to run. (Also used by the gateway
/// browser tests.)
pub(crate) fn browser_tools() -> (std::path::PathBuf, std::path::PathBuf) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("SESSIONGATE_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("var/venv/bin/python"));
    let chromium = std::env::var_os("SESSIONGATE_TEST_CHROMIUM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(
        python.exists(),
        "no Python with Playwright at {} (SESSIONGATE_TEST_PYTHON): run scripts/test, \
         which creates var/venv with playwright",
        python.display()
    );
    assert!(
        chromium.exists(),
        "no Chromium at {} (SESSIONGATE_TEST_CHROMIUM): run scripts/test, which installs \
         Debian's chromium package",
        chromium.display()
    );
    (python, chromium)
}

/// Where the screenshots go: `<target dir>/browser-artifacts/<name>`, emptied.
pub(crate) fn artifacts_dir(name: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("browser-artifacts").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the artefacts directory");
    dir
}

/// tests/browser/console.py in headless Chromium: sign in (a wrong key
/// first), live counters, find a user, revoke a device and see its token
/// refused, a form without its CSRF token refused, key rotation, logout-all
/// through the typed confirmation, a phone-sized screen, sign-out, and the
/// same actions with JavaScript off. Screenshots under
/// target/browser-artifacts/console/.
#[tokio::test]
async fn browser_the_console_works_in_headless_chromium() {
    let (python, chromium) = browser_tools();
    let app = spawn_app().await;
    let victim = app
        .create_body(json!({"user_id": "erin", "device_id": "iphone",
            "metadata": {"ip": "198.51.100.23",
                "user_agent": "Mozilla/5.0 (iPhone) Mobile Safari/604.1"}}))
        .await;
    let kept = app
        .create_body(json!({"user_id": "erin", "device_id": "work-laptop",
            "metadata": {"ip": "203.0.113.9", "user_agent": "Mozilla/5.0 (X11) Firefox/140.0",
                "label": "work laptop"}}))
        .await;
    let nojs = app.create("frank", "desktop").await;
    let artifacts = artifacts_dir("console");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/console.py");

    let mut command = tokio::process::Command::new(&python);
    command
        .arg(&script)
        .env("CONSOLE_URL", &app.address)
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("CHROMIUM", &chromium)
        .env("ARTIFACTS", &artifacts)
        .env("USER_ID", "erin")
        .env("VICTIM_SID", &victim.session_id)
        .env("VICTIM_TOKEN", &victim.token)
        .env("KEPT_SID", &kept.session_id)
        .env("KEPT_TOKEN", &kept.token)
        .env("NOJS_USER", "frank")
        .env("NOJS_TOKEN", &nojs.token)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), command.output())
        .await
        .expect("the browser test finishes within 240 s")
        .expect("run the browser test script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "console.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for step in [
        "OK wrong admin key refused",
        "OK signed in",
        "OK counters update without a reload",
        "OK found the user",
        "OK revoked a device; its token is refused",
        "OK session detail",
        "OK missing CSRF token refused",
        "OK rotated the signing key",
        "OK logout-all through the confirmation",
        "OK fits a phone screen",
        "OK signed out",
        "OK works without JavaScript",
        "OK no console errors or CSP violations",
    ] {
        assert!(stdout.lines().any(|l| l == step), "{step:?} in:\n{stdout}");
    }
    // What the browser did holds for the service: every token is refused.
    for token in [&victim.token, &kept.token, &nojs.token] {
        assert_eq!(app.verify_status(token).await, StatusCode::UNAUTHORIZED);
    }
    let shots = stdout
        .lines()
        .filter(|l| l.starts_with("SCREENSHOT "))
        .count();
    assert_eq!(shots, 12, "{stdout}");
    for line in stdout.lines().filter_map(|l| l.strip_prefix("SCREENSHOT ")) {
        let size = std::fs::metadata(line).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "{line}: {size} bytes");
    }
}

/// The user page shows where each session was used from: the login's
/// address, the last touch's address and agent, and the device label.
#[tokio::test]
async fn a_user_page_shows_the_device_label_first_and_last_ip() {
    let app = spawn_app_with(&[("TRUSTED_PROXIES", "127.0.0.1"), ("TOUCH_INTERVAL", "1ms")]).await;
    let s = app
        .create_body(json!({"user_id": "vera", "device_id": "phone",
            "metadata": {"ip": "192.0.2.44"}}))
        .await;
    let safari = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 \
                  (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
    eventually(Duration::from_secs(20), || async {
        let res = app
            .request(Method::GET, "/v1/verify")
            .bearer_auth(&s.token)
            .header("x-forwarded-for", "198.51.100.77")
            .header("user-agent", safari)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let list: Value = app.list(&s.token).await.json().await.unwrap();
        list["sessions"][0]["last_ip"] == "198.51.100.77"
    })
    .await;
    let c = sign_in(&app).await;
    let html = c
        .get(&app, "/admin/users?user_id=vera")
        .await
        .text()
        .await
        .unwrap();
    for want in [
        r#"<dd class="device-label">Safari on iPhone</dd>"#,
        r#"<dd class="first-ip">192.0.2.44</dd>"#,
        r#"<dd class="last-ip">198.51.100.77</dd>"#,
    ] {
        assert!(html.contains(want), "{want} in {html}");
    }
}
