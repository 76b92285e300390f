//! sessiongate behind real gateways: the shipped nginx and Caddy
//! configurations (config/gateways/) run by real `nginx` and `caddy`
//! processes, in front of an app that echoes what reaches it; and the check
//! requests of the Envoy example, sent to sessiongate directly.
//!
//! Every scenario runs once per gateway (`gateway::nginx::…`,
//! `gateway::caddy::…`). sessiongate trusts the gateway's X-Forwarded-*
//! headers (`TRUSTED_PROXIES=127.0.0.1`), as the configurations require.

mod browser;
mod harness;

use std::time::Duration;

use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_KEY, Created, ISSUER_KEY, TestApp, assert_error, eventually, spawn_app_with,
};
use harness::{Gateway, Kind, Upstream, identity_like, raw_request, received};

/// Runs each scenario `fn(Kind)` as a test for nginx and one for Caddy.
macro_rules! on_every_gateway {
    ($($scenario:ident),* $(,)?) => {
        mod nginx {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(super::Kind::Nginx).await
            })*
        }
        mod caddy {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(super::Kind::Caddy).await
            })*
        }
    };
}

on_every_gateway!(
    a_valid_token_reaches_the_app_with_sessiongates_identity,
    spoofed_identity_headers_never_reach_the_app,
    the_signed_assertion_reaches_the_app_and_a_clients_own_never_does,
    missing_malformed_and_revoked_tokens_get_401_and_never_reach_the_app,
    an_expired_token_gets_401,
    a_stale_password_gets_401_insufficient_user_authentication,
    the_max_age_route_demands_a_fresh_password_and_others_do_not,
    logout_through_the_gateway_ends_the_session,
    redis_down_gives_5xx_and_never_app_content,
    sessiongate_down_gives_5xx_and_never_app_content,
    a_cookie_token_works_and_cross_site_unsafe_requests_are_refused,
    admin_and_key_endpoints_are_unreachable_through_the_gateway,
    the_admin_console_is_unreachable_through_the_gateway,
    public_routes_reach_the_app_unchecked_and_without_identity,
    a_refused_page_load_is_redirected_to_the_login_page,
    a_page_load_gets_a_try_again_page_when_the_check_is_unavailable,
    the_clients_own_address_and_agent_are_recorded_not_the_gateways_or_a_spoofed_one,
);

/// sessiongate (on its own Redis), the echoing app, and a gateway between
/// the client and both.
struct Stack {
    app: TestApp,
    upstream: Upstream,
    gateway: Gateway,
}

impl Stack {
    async fn start(kind: Kind) -> Stack {
        Stack::start_with(kind, &[]).await
    }

    async fn start_with(kind: Kind, overrides: &[(&str, &str)]) -> Stack {
        let mut settings = vec![("TRUSTED_PROXIES", "127.0.0.1")];
        settings.extend_from_slice(overrides);
        let app = spawn_app_with(&settings).await;
        let upstream = Upstream::start();
        let gateway =
            Gateway::start(kind, &format!("127.0.0.1:{}", app.port), &upstream.address).await;
        Stack {
            app,
            upstream,
            gateway,
        }
    }

    /// A request to the gateway.
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.app.client.request(method, self.gateway.url(path))
    }

    fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.request(Method::GET, path).bearer_auth(token)
    }

    /// The browser origin of the site the gateway serves.
    fn origin(&self) -> String {
        self.gateway.address.clone()
    }
}

/// The app's echo of a request that reached it (asserting 200 from the app).
async fn reached(res: Response) -> Value {
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "answer: {text}");
    let echo: Value = serde_json::from_str(&text).expect("the app's JSON echo");
    assert_eq!(echo["from"], "app", "{echo}");
    echo
}

/// The app saw exactly sessiongate's identity for `s`: each header once.
fn assert_identity(echo: &Value, s: &Created) {
    assert_eq!(
        received(echo, "x-session-user"),
        [s.user_id.as_str()],
        "{echo}"
    );
    assert_eq!(
        received(echo, "x-session-id"),
        [s.session_id.as_str()],
        "{echo}"
    );
    assert_eq!(
        received(echo, "x-session-device"),
        [s.device_id.as_str()],
        "{echo}"
    );
}

/// A refusal from the gateway: `status`, JSON `error` = `code`, never
/// cacheable; a 401 carries exactly one WWW-Authenticate naming `code`.
async fn assert_refused(res: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(res.status(), status);
    let h = res.headers().clone();
    assert_eq!(h["cache-control"], "no-store");
    if status == StatusCode::UNAUTHORIZED {
        let www: Vec<_> = h.get_all("www-authenticate").iter().collect();
        assert_eq!(www.len(), 1, "one WWW-Authenticate: {www:?}");
        let www = www[0].to_str().unwrap();
        assert!(
            www.starts_with("Bearer ") && www.contains(&format!("error=\"{code}\"")),
            "{www}"
        );
    }
    let body: Value = res.json().await.expect("a JSON body");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["from"].is_null(), "app content: {body}");
    body
}

/// A 5xx from the gateway that is not the app's answer.
async fn assert_unavailable(res: Response) {
    let status = res.status();
    let body = res.text().await.unwrap();
    assert!(status.is_server_error(), "{status}: {body}");
    assert!(!body.contains(r#""from":"app""#), "app content: {body}");
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// --- scenarios, on every gateway ------------------------------------------------

/// What the gateway passes on for where sessions are used from: the client
/// connects from 127.0.0.2 (the gateway and sessiongate talk over
/// 127.0.0.1, the one trusted proxy) with a spoofed X-Forwarded-For; the
/// touch (every verify here) must record 127.0.0.2 and its User-Agent.
async fn the_clients_own_address_and_agent_are_recorded_not_the_gateways_or_a_spoofed_one(
    kind: Kind,
) {
    let st = Stack::start_with(kind, &[("TOUCH_INTERVAL", "1ms")]).await;
    let s = st.app.create("uma", "laptop").await;
    let client = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let agent = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
    let last = || async {
        let list: Value = st.app.list(&s.token).await.json().await.unwrap();
        list["sessions"][0].clone()
    };
    eventually(Duration::from_secs(20), || async {
        let res = client
            .get(st.gateway.url("/orders"))
            .bearer_auth(&s.token)
            .header("x-forwarded-for", "203.0.113.66")
            .header("x-real-ip", "203.0.113.67")
            .header("user-agent", agent)
            .send()
            .await
            .unwrap();
        reached(res).await;
        last().await["last_ip"] != Value::Null
    })
    .await;
    let listed = last().await;
    assert_eq!(listed["last_ip"], "127.0.0.2", "{listed}");
    assert_eq!(listed["last_user_agent"], agent);
    assert_eq!(listed["device_label"], "Firefox on Linux");
}

async fn a_valid_token_reaches_the_app_with_sessiongates_identity(kind: Kind) {
    let st = Stack::start(kind).await;
    let s = st.app.create("alice", "laptop").await;

    let echo = reached(st.get("/orders/7?page=2", &s.token).send().await.unwrap()).await;
    assert_identity(&echo, &s);
    assert_eq!(echo["uri"], "/orders/7?page=2");
    assert_eq!(
        received(&echo, "authorization"),
        [format!("Bearer {}", s.token)]
    );

    // Method and body reach the app; the check never eats the body, and the
    // query (even one with a `max_age` that is the app's) is not sessiongate's.
    let res = st
        .request(Method::POST, "/orders?max_age=soon")
        .bearer_auth(&s.token)
        .json(&json!({"item": 42}))
        .send()
        .await
        .unwrap();
    let echo = reached(res).await;
    assert_identity(&echo, &s);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], r#"{"item":42}"#);
    assert_eq!(st.upstream.hits(), 2);
}

async fn spoofed_identity_headers_never_reach_the_app(kind: Kind) {
    let st = Stack::start(kind).await;
    let s = st.app.create("alice", "laptop").await;
    let spoof = |req: reqwest::RequestBuilder| {
        req.header("X-Session-User", "mallory")
            .header("x-session-user", "mallory-2")
            .header("X-SESSION-USER", "mallory-3")
            .header("X_Session_User", "mallory-4")
            .header("x_session-user", "mallory-5")
            .header("X-Session_User", "mallory-6")
            .header("X-Session-Id", "forged-session")
            .header("X-Session-Device", "forged-device")
            .header("X-Session-Device", "forged-device-2")
            .header("X_SESSION_ID", "forged-session-2")
            .header("X-Session-Roles", "admin")
            .header("X-Session-Assertion", "forged.jwt.value")
    };

    // With a valid token: the app sees sessiongate's identity and nothing else.
    let echo = reached(spoof(st.get("/orders", &s.token)).send().await.unwrap()).await;
    assert_identity(&echo, &s);
    let identity = identity_like(&echo);
    let mut names: Vec<&str> = identity.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    match kind {
        Kind::Caddy => assert_eq!(
            names,
            ["x-session-device", "x-session-id", "x-session-user"],
            "{identity:?}"
        ),
        // nginx replaces the names it sets and drops `_` names, but cannot
        // clear by prefix: a name sessiongate never sends (X-Session-Roles)
        // passes. README (gateways): trust only the three.
        Kind::Nginx => assert_eq!(
            names,
            [
                "x-session-device",
                "x-session-id",
                "x-session-roles",
                "x-session-user"
            ],
            "{identity:?}"
        ),
    }
    for (name, value) in &identity {
        assert!(
            !value.contains("mallory") && !value.contains("forged"),
            "{name}: {value}"
        );
    }

    // Without a token: 401, and the app is never called.
    let res = spoof(st.request(Method::GET, "/orders"))
        .send()
        .await
        .unwrap();
    assert_refused(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert_eq!(st.upstream.hits(), 1);
}

/// With `upstream_assertion` on, the app receives sessiongate's signed
/// assertion (the one `/v1/verify` gives for the session), once, and never
/// the one the client sent.
async fn the_signed_assertion_reaches_the_app_and_a_clients_own_never_does(kind: Kind) {
    let st = Stack::start_with(kind, &crate::assertion::ASSERTION_ON).await;
    let s = st.app.create("alice", "laptop").await;
    let echo = reached(
        st.get("/orders", &s.token)
            .header("X-Session-Assertion", "forged.jwt.value")
            .header("x-session-assertion", "forged-2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_identity(&echo, &s);
    let got = received(&echo, "x-session-assertion");
    let res = st.app.verify(&s.token).await;
    let direct = res.headers()["x-session-assertion"].to_str().unwrap();
    assert_eq!(got, [direct], "{echo}");
}

async fn missing_malformed_and_revoked_tokens_get_401_and_never_reach_the_app(kind: Kind) {
    let st = Stack::start(kind).await;
    let revoked = st.app.create("bob", "phone").await;
    assert_eq!(
        st.app.logout(&revoked.token).await.status(),
        StatusCode::NO_CONTENT
    );
    // Signed by someone else: valid shape, wrong signature.
    let mut parts: Vec<String> = revoked.token.split('.').map(String::from).collect();
    parts[2] = "c2lnbmVkLWJ5LXNvbWVvbmUtZWxzZQ".into();
    let forged = parts.join(".");

    let missing = st.request(Method::GET, "/orders");
    let cases = [
        ("missing", missing),
        ("malformed", st.get("/orders", "not-a-token")),
        (
            "empty bearer",
            st.request(Method::GET, "/orders")
                .header("authorization", "Bearer "),
        ),
        ("forged", st.get("/orders", &forged)),
        ("revoked", st.get("/orders", &revoked.token)),
        (
            "revoked, POST",
            st.request(Method::POST, "/orders")
                .bearer_auth(&revoked.token),
        ),
    ];
    for (what, req) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_refused(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
    assert_eq!(st.upstream.hits(), 0);
}

async fn an_expired_token_gets_401(kind: Kind) {
    // 3 s: the first request must get through the gateway before the end,
    // which a loaded machine may not manage within 1 s.
    let st = Stack::start_with(kind, &[("ABSOLUTE_LIFETIME", "3s")]).await;
    let s = st.app.create("carol", "laptop").await;
    reached(st.get("/orders", &s.token).send().await.unwrap()).await;
    eventually(Duration::from_secs(20), || async {
        st.app.verify_status(&s.token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    let res = st.get("/orders", &s.token).send().await.unwrap();
    assert_refused(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert_eq!(st.upstream.hits(), 1);
}

async fn a_stale_password_gets_401_insufficient_user_authentication(kind: Kind) {
    // 3 s, for the same reason as the lifetime above.
    let st = Stack::start_with(kind, &[("REAUTH_AFTER", "3s")]).await;
    let s = st.app.create("dave", "laptop").await;
    reached(st.get("/orders", &s.token).send().await.unwrap()).await;
    eventually(Duration::from_secs(20), || async {
        st.app.verify_status(&s.token).await == StatusCode::UNAUTHORIZED
    })
    .await;

    let res = st.get("/orders", &s.token).send().await.unwrap();
    assert_refused(
        res,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
    assert_eq!(st.upstream.hits(), 1);

    // The login backend re-checks the password: the same token passes again.
    assert_eq!(st.app.reauth(&s.session_id).await.status(), StatusCode::OK);
    assert_identity(
        &reached(st.get("/orders", &s.token).send().await.unwrap()).await,
        &s,
    );
}

async fn the_max_age_route_demands_a_fresh_password_and_others_do_not(kind: Kind) {
    let st = Stack::start(kind).await;
    let old = st
        .app
        .create_body(json!({"user_id": "erin", "device_id": "laptop", "auth_time": now_s() - 600}))
        .await;
    let fresh = st.app.create("erin", "phone").await;

    let res = st.get("/account/email", &old.token).send().await.unwrap();
    let www = res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(www.contains("max_age=300"), "{www}");
    assert_refused(
        res,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
    assert_eq!(st.upstream.hits(), 0);

    // The same session on an ordinary route, and a fresh one on the strict route.
    assert_identity(
        &reached(st.get("/orders", &old.token).send().await.unwrap()).await,
        &old,
    );
    let echo = reached(st.get("/account/email", &fresh.token).send().await.unwrap()).await;
    assert_identity(&echo, &fresh);
    assert_eq!(echo["uri"], "/account/email");

    // A client's own max_age cannot loosen the route.
    let res = st
        .get("/account/email?max_age=100000", &old.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(st.upstream.hits(), 2);
}

async fn logout_through_the_gateway_ends_the_session(kind: Kind) {
    let st = Stack::start(kind).await;
    let laptop = st.app.create("frank", "laptop").await;
    let phone = st.app.create("frank", "phone").await;

    // The user's own endpoints are served through the gateway.
    let res = st.get("/v1/sessions", &laptop.token).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let list: Value = res.json().await.unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 2, "{list}");
    let res = st
        .get("/v1/sessions/current", &laptop.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap()["session_id"],
        laptop.session_id.as_str()
    );

    // Log out the phone from the laptop, then the laptop itself.
    let res = st
        .request(
            Method::DELETE,
            &format!("/v1/sessions/{}", phone.session_id),
        )
        .bearer_auth(&laptop.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = st
        .request(Method::DELETE, "/v1/sessions/current")
        .bearer_auth(&laptop.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    for token in [&laptop.token, &phone.token] {
        let res = st.get("/orders", token).send().await.unwrap();
        assert_refused(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
    let res = st
        .get("/v1/sessions/current", &laptop.token)
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert_eq!(st.upstream.hits(), 0);
}

async fn redis_down_gives_5xx_and_never_app_content(kind: Kind) {
    let st = Stack::start(kind).await;
    let s = st.app.create("gina", "laptop").await;
    reached(st.get("/orders", &s.token).send().await.unwrap()).await;

    st.app.redis.as_ref().unwrap().lock().unwrap().kill9();
    for path in ["/orders", "/account/email"] {
        assert_unavailable(st.get(path, &s.token).send().await.unwrap()).await;
    }
    assert_unavailable(
        st.request(Method::GET, "/orders")
            .header("cookie", format!("session={}", s.token))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st.upstream.hits(), 1);
}

async fn sessiongate_down_gives_5xx_and_never_app_content(kind: Kind) {
    let app = spawn_app_with(&[]).await;
    let s = app.create("hank", "laptop").await;
    let upstream = Upstream::start();
    // Nothing listens there.
    let closed = format!("127.0.0.1:{}", harness::free_port());
    let gateway = Gateway::start(kind, &closed, &upstream.address).await;

    for path in ["/orders", "/account/email"] {
        let res = app
            .client
            .get(gateway.url(path))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert_unavailable(res).await;
    }
    let res = app.client.get(gateway.url("/orders")).send().await.unwrap();
    assert_unavailable(res).await;
    assert_eq!(upstream.hits(), 0);
}

async fn a_cookie_token_works_and_cross_site_unsafe_requests_are_refused(kind: Kind) {
    let st = Stack::start(kind).await;
    assert_eq!(st.app.settings.cookie_name, "session");
    let s = st.app.create("ivan", "browser").await;
    let cookie = format!("theme=dark; session={}", s.token);
    let with_cookie =
        |method: Method, path: &str| st.request(method, path).header("cookie", cookie.as_str());

    // Safe methods need no Origin.
    assert_identity(
        &reached(with_cookie(Method::GET, "/orders").send().await.unwrap()).await,
        &s,
    );

    // An unsafe request from another site: 403, the app never called; also
    // when the client sends its own X-Forwarded-* to pass as same-origin GET.
    let evil = [
        with_cookie(Method::POST, "/orders").header("origin", "https://evil.example"),
        with_cookie(Method::DELETE, "/orders/7").header("origin", "https://evil.example"),
        with_cookie(Method::POST, "/orders").header("referer", "https://evil.example/page"),
        with_cookie(Method::POST, "/orders"),
        with_cookie(Method::POST, "/orders")
            .header("origin", "https://evil.example")
            .header("x-forwarded-method", "GET")
            .header("x-original-method", "GET")
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-proto", "https"),
    ];
    for req in evil {
        let res = req.send().await.unwrap();
        assert_refused(res, StatusCode::FORBIDDEN, "forbidden").await;
    }
    assert_eq!(st.upstream.hits(), 1);

    // The same requests from the site itself pass.
    let res = with_cookie(Method::POST, "/orders")
        .header("origin", st.origin())
        .body("item=42")
        .send()
        .await
        .unwrap();
    let echo = reached(res).await;
    assert_identity(&echo, &s);
    assert_eq!(echo["body"], "item=42");
    let res = with_cookie(Method::DELETE, "/orders/7")
        .header("referer", format!("{}/orders", st.origin()))
        .send()
        .await
        .unwrap();
    assert_identity(&reached(res).await, &s);

    // A bearer token is exempt: browsers never attach one on their own.
    let res = st
        .request(Method::POST, "/orders")
        .bearer_auth(&s.token)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_identity(&reached(res).await, &s);

    // Logout through the gateway follows the same rule.
    let res = with_cookie(Method::DELETE, "/v1/sessions/current")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
    assert_eq!(st.app.verify_status(&s.token).await, StatusCode::OK);
    let res = with_cookie(Method::DELETE, "/v1/sessions/current")
        .header("origin", st.origin())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        st.app.verify_status(&s.token).await,
        StatusCode::UNAUTHORIZED
    );
}

async fn admin_and_key_endpoints_are_unreachable_through_the_gateway(kind: Kind) {
    let st = Stack::start(kind).await;
    let s = st.app.create("judy", "laptop").await;
    let admin = format!("Authorization: Bearer {ADMIN_KEY}");
    let issuer = format!("Authorization: Bearer {ISSUER_KEY}");

    // Spellings of POST /v1/admin/logout-all, sent byte for byte.
    let logout_all = [
        "/v1/admin/logout-all",
        "//v1/admin/logout-all",
        "/v1//admin/logout-all",
        "/v1/%61dmin/logout-all",
        "/v1/admin/../admin/logout-all",
        "/v1/x/%2e%2e/admin/logout-all",
        "/v1/x/%2E%2E/admin/logout-all",
        "/V1/ADMIN/logout-all",
        "/v1/Admin/logout-all",
        "/v1/admin%2flogout-all",
        "/v1/admin%2Flogout-all",
        "/v1/sessions/../admin/logout-all",
        "/v1/sessions/%2e%2e/admin/logout-all",
        "/v1/sessions/..%2fadmin/logout-all",
        "/v1/admin/logout-all?x=1",
    ];
    for target in logout_all {
        for auth in [admin.as_str(), issuer.as_str()] {
            let res = raw_request(st.gateway.port, "POST", target, &[auth]).await;
            assert_eq!(res.status, 404, "POST {target}: {res:?}");
            assert!(!res.body.contains("\"revoked\""), "POST {target}: {res:?}");
        }
    }
    // The other admin endpoints, the key-only ones, and path tricks that land
    // on /v1/sessions for the gateway but on an admin route for a server that
    // does not resolve `..` itself.
    let others = [
        ("DELETE", "/v1/admin/users/judy/sessions"),
        ("GET", "/v1/admin/users/judy/sessions"),
        ("DELETE", "/v1/admin/users/judy/devices/laptop"),
        ("DELETE", "/V1/ADMIN/USERS/judy/sessions"),
        ("DELETE", &format!("/v1/admin/sessions/{}", s.session_id)),
        (
            "DELETE",
            "/v1/admin/users/x%2f..%2f..%2f..%2f..%2fv1%2fsessions/sessions",
        ),
        (
            "DELETE",
            "/v1/admin/users/judy/devices/l%2f..%2f..%2f..%2f..%2f..%2f..%2fv1%2fsessions%2fx",
        ),
        ("POST", "/v1/admin/keys/rotate"),
        ("POST", "/v1/introspect"),
        ("POST", "/v1/sessions"),
        ("POST", &format!("/v1/sessions/{}/reauth", s.session_id)),
        ("GET", "/v1/verify"),
        ("GET", "/v1/verify/orders"),
    ];
    for (method, target) in others {
        for auth in [admin.as_str(), issuer.as_str()] {
            let res = raw_request(st.gateway.port, method, target, &[auth]).await;
            assert!(
                matches!(res.status, 401 | 404),
                "{method} {target}: {res:?}"
            );
            assert!(
                !res.body.contains("\"revoked\""),
                "{method} {target}: {res:?}"
            );
            assert!(!res.body.contains("\"kid\""), "{method} {target}: {res:?}");
            assert!(
                !res.body.contains("\"token\""),
                "{method} {target}: {res:?}"
            );
        }
    }

    // Nothing happened: the session lives and the key ring is unchanged.
    assert_eq!(st.app.verify_status(&s.token).await, StatusCode::OK);
    let listed: Value = st.app.admin_list("judy").await.json().await.unwrap();
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(st.upstream.hits(), 0);
    // (And the probe works: the real call, made directly, logs everyone out.)
    assert_eq!(st.app.logout_all().await.status(), StatusCode::OK);
    assert_eq!(
        st.app.verify_status(&s.token).await,
        StatusCode::UNAUTHORIZED
    );
}

/// sessiongate's console (`/admin/`) is for the private network: the
/// gateway answers 404 for every spelling, even to a caller with a live
/// session and an admin key, and passes nothing to sessiongate or the app.
async fn the_admin_console_is_unreachable_through_the_gateway(kind: Kind) {
    let st = Stack::start(kind).await;
    let s = st.app.create("ivan", "laptop").await;
    let token = format!("Authorization: Bearer {}", s.token);
    let targets = [
        ("GET", "/admin/"),
        ("GET", "/admin"),
        ("GET", "/admin/login"),
        ("POST", "/admin/login"),
        ("POST", "/admin/logout-all"),
        ("GET", "/admin/counters.json"),
        ("GET", "/admin/static/console.js"),
        ("GET", "/ADMIN/"),
        ("GET", "/Admin/login"),
        ("GET", "//admin/"),
        ("GET", "/%61dmin/"),
        ("GET", "/x/../admin/"),
        ("GET", "/x/%2e%2e/admin/"),
        ("GET", "/admin/?user_id=ivan"),
    ];
    for (method, target) in targets {
        for auth in [
            token.as_str(),
            &format!("Authorization: Bearer {ADMIN_KEY}"),
        ] {
            let res = raw_request(st.gateway.port, method, target, &[auth]).await;
            assert_eq!(res.status, 404, "{method} {target}: {res:?}");
            assert!(
                !res.body.contains("sessiongate console"),
                "{method} {target}: {res:?}"
            );
            assert!(!res.body.contains(r#""from":"app""#), "{method} {target}");
        }
    }
    assert_eq!(st.upstream.hits(), 0);
    // (The console itself is up, on sessiongate's own listener.)
    let res = st
        .app
        .request(Method::GET, "/admin/login")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.text().await.unwrap().contains("sessiongate console"));
}

/// What a browser sends when it loads a page.
const NAVIGATION_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

/// The login page, its logout and static files are public: they reach the app
/// with or without a session, and never with an identity (a client's own
/// X-Session-* are dropped; a live token's identity is not looked up). Paths
/// that only look public (`/static/../orders`, `/LOGIN`, `/login/x`) are
/// checked like any other.
async fn public_routes_reach_the_app_unchecked_and_without_identity(kind: Kind) {
    let st = Stack::start(kind).await;
    let s = st.app.create("olga", "laptop").await;
    let spoof = |req: reqwest::RequestBuilder| {
        req.header("X-Session-User", "mallory")
            .header("X_Session_User", "mallory-2")
            .header("X-Session-Id", "forged")
            .header("X-Session-Device", "forged")
            .header("X-Session-Assertion", "forged.jwt.value")
    };
    let cases = [
        (Method::GET, "/login"),
        (Method::GET, "/login?return=/orders?page=2&x=1"),
        (Method::POST, "/login"),
        (Method::POST, "/logout"),
        (Method::GET, "/static/app.css"),
        (Method::GET, "/static/img/logo.svg"),
    ];
    let mut hits = 0;
    for (method, path) in cases {
        for token in [None, Some(s.token.as_str())] {
            let mut req = spoof(st.request(method.clone(), path));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let echo = reached(req.send().await.unwrap()).await;
            hits += 1;
            assert_eq!(echo["uri"], path, "{method} {path}");
            // (nginx drops the `_` spelling and empties the three names;
            // Caddy deletes every spelling.)
            let identity = identity_like(&echo);
            assert!(identity.is_empty(), "{method} {path}: {identity:?}");
        }
    }
    assert_eq!(st.upstream.hits(), hits);

    // Only looks public: checked (401 without a session), never the app.
    let lookalikes = [
        "/static/../orders",
        "/static/%2e%2e/orders",
        "/static/..%2forders",
        "/static/..%2Forders",
        "/static/%2E%2E/orders",
        "/login/../orders",
        "/login/x",
        "/loginx",
        "/LOGIN",
        "/Static/app.css",
        "/logout/",
        "/x/../orders",
    ];
    for target in lookalikes {
        let res = raw_request(st.gateway.port, "GET", target, &["X-Session-User: mallory"]).await;
        assert_eq!(res.status, 401, "GET {target}: {res:?}");
        assert!(!res.body.contains(r#""from":"app""#), "GET {target}");
    }
    // Spellings that clean up to a public path may be served, but the app
    // then receives the plain path, never the raw one.
    for target in [
        "/static/./app.css",
        "/static//app.css",
        "//login",
        "/static/x/../app.css",
    ] {
        let res = raw_request(st.gateway.port, "GET", target, &[]).await;
        if res.status == 200 {
            let echo: Value = serde_json::from_str(&res.body).unwrap();
            hits += 1;
            let uri = echo["uri"].as_str().unwrap();
            assert!(
                uri == "/static/app.css" || uri == "/login",
                "GET {target} reached the app as {uri}"
            );
        } else {
            assert_eq!(res.status, 401, "GET {target}: {res:?}");
        }
    }
    assert_eq!(st.upstream.hits(), hits);
}

/// A refused page load (GET asking for text/html) is sent to the login page
/// with the request URI, exactly as it came, after `return=`; the gateway
/// does not vet it (the login page does). Everything else keeps the JSON 401.
async fn a_refused_page_load_is_redirected_to_the_login_page(kind: Kind) {
    let st = Stack::start(kind).await;
    let revoked = st.app.create("pat", "laptop").await;
    assert_eq!(
        st.app.logout(&revoked.token).await.status(),
        StatusCode::NO_CONTENT
    );
    let old = st
        .app
        .create_body(json!({"user_id": "pat", "device_id": "phone", "auth_time": now_s() - 600}))
        .await;
    let cookie = |token: &str| format!("{}={token}", st.app.settings.cookie_name);
    let accept = format!("Accept: {NAVIGATION_ACCEPT}");

    let cases = [
        ("/orders", None, "/orders"),
        (
            "/orders/7?page=2&sort=asc",
            None,
            "/orders/7?page=2&sort=asc",
        ),
        ("/a%20b?q=%26&r=%2F", None, "/a%20b?q=%26&r=%2F"),
        ("/orders", Some(cookie(&revoked.token)), "/orders"),
        (
            "/account/email?tab=1",
            Some(cookie(&old.token)),
            "/account/email?tab=1",
        ),
        ("//evil.example/x", None, "//evil.example/x"),
        ("/", None, "/"),
    ];
    for (target, cookie, back) in cases {
        let mut headers = vec![accept.as_str()];
        let cookie_line = cookie.map(|c| format!("Cookie: {c}"));
        if let Some(c) = &cookie_line {
            headers.push(c);
        }
        let res = raw_request(st.gateway.port, "GET", target, &headers).await;
        assert_eq!(res.status, 303, "GET {target}: {res:?}");
        let head = res.head.to_ascii_lowercase();
        let location = res
            .head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Location: ")
                    .or(l.strip_prefix("location: "))
            })
            .unwrap_or_else(|| panic!("no Location: {res:?}"));
        assert_eq!(location, format!("/login?return={back}"), "GET {target}");
        assert!(head.contains("cache-control: no-store"), "{res:?}");
        assert!(!res.body.contains(r#""from":"app""#), "GET {target}");
    }

    // Not a page load: JSON 401 as before (an API client, a fetch, a POST
    // form, a stylesheet).
    let not_pages = [
        st.request(Method::GET, "/orders"),
        st.request(Method::GET, "/orders")
            .header("accept", "application/json"),
        st.request(Method::GET, "/static-ish.css")
            .header("accept", "text/css,*/*;q=0.1"),
        st.request(Method::POST, "/orders")
            .header("accept", NAVIGATION_ACCEPT),
        st.request(Method::DELETE, "/orders/7")
            .header("accept", NAVIGATION_ACCEPT),
        st.request(Method::GET, "/orders")
            .header("accept", "application/json")
            .header("cookie", cookie(&revoked.token)),
    ];
    for req in not_pages {
        assert_refused(
            req.send().await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
    }
    // A live session's page load is not redirected.
    let live = st.app.create("pat", "desktop").await;
    let res = st
        .request(Method::GET, "/orders")
        .header("accept", NAVIGATION_ACCEPT)
        .header("cookie", cookie(&live.token))
        .send()
        .await
        .unwrap();
    assert_identity(&reached(res).await, &live);
    // A cross-site POST with the cookie stays a 403, however it asks.
    let res = st
        .request(Method::POST, "/orders")
        .header("accept", NAVIGATION_ACCEPT)
        .header("cookie", cookie(&live.token))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_refused(res, StatusCode::FORBIDDEN, "forbidden").await;
    assert_eq!(st.upstream.hits(), 1);
}

/// A page load that cannot be checked (Redis down: sessiongate's 503;
/// sessiongate unreachable) gets a plain "try again" page with 503 and
/// Retry-After, never the app; an API request gets the JSON 503 (nginx) or
/// sessiongate's own (Caddy) or Caddy's bare 502.
async fn a_page_load_gets_a_try_again_page_when_the_check_is_unavailable(kind: Kind) {
    async fn assert_try_again(res: Response) {
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let h = res.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with("text/html"),
            "{h:?}"
        );
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["retry-after"], "1");
        let body = res.text().await.unwrap();
        assert!(body.contains("Try again"), "{body}");
        assert!(!body.contains(r#""from":"app""#), "{body}");
    }
    let st = Stack::start(kind).await;
    let s = st.app.create("quinn", "laptop").await;
    let cookie = format!("{}={}", st.app.settings.cookie_name, s.token);
    st.app.redis.as_ref().unwrap().lock().unwrap().kill9();
    for path in ["/orders", "/account/email"] {
        let res = st
            .request(Method::GET, path)
            .header("accept", NAVIGATION_ACCEPT)
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_try_again(res).await;
    }
    let res = st.get("/orders", &s.token).send().await.unwrap();
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert_eq!(st.upstream.hits(), 0);

    // sessiongate unreachable.
    let upstream = Upstream::start();
    let closed = format!("127.0.0.1:{}", harness::free_port());
    let gateway = Gateway::start(kind, &closed, &upstream.address).await;
    let res = st
        .app
        .client
        .get(gateway.url("/orders"))
        .header("accept", NAVIGATION_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_try_again(res).await;
    let res = st
        .app
        .client
        .get(gateway.url("/orders"))
        .send()
        .await
        .unwrap();
    assert_unavailable(res).await;
    assert_eq!(upstream.hits(), 0);
}

// --- sessiongate directly ------------------------------------------------------

/// No verify answer may be stored by a cache between gateway and sessiongate.
#[tokio::test]
async fn every_verify_answer_is_marked_no_store() {
    let app = spawn_app_with(&[("TRUSTED_PROXIES", "127.0.0.1")]).await;
    let s = app.create("kate", "laptop").await;
    let old = app
        .create_body(json!({"user_id": "kate", "device_id": "phone", "auth_time": now_s() - 600}))
        .await;
    let cases = [
        (
            "ok",
            app.request(Method::GET, "/v1/verify").bearer_auth(&s.token),
            200,
        ),
        (
            "ok, tail",
            app.request(Method::POST, "/v1/verify/a/b?c=d")
                .bearer_auth(&s.token),
            200,
        ),
        ("no token", app.request(Method::GET, "/v1/verify"), 401),
        (
            "bad token",
            app.request(Method::GET, "/v1/verify").bearer_auth("x.y.z"),
            401,
        ),
        (
            "stale password",
            app.request(Method::GET, "/v1/verify?max_age=300")
                .bearer_auth(&old.token),
            401,
        ),
        (
            "bad max_age",
            app.request(Method::GET, "/v1/verify?max_age=soon")
                .bearer_auth(&s.token),
            400,
        ),
        (
            "cross-site cookie",
            app.request(Method::POST, "/v1/verify")
                .header("cookie", format!("session={}", s.token))
                .header("origin", "https://evil.example"),
            403,
        ),
    ];
    for (what, req, status) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{what}");
        assert_eq!(res.headers()["cache-control"], "no-store", "{what}");
    }
    app.redis.as_ref().unwrap().lock().unwrap().kill9();
    let res = app.verify(&s.token).await;
    assert_eq!(res.headers()["cache-control"], "no-store", "store down");
    assert_error(res, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
}

/// The check requests of Envoy's HTTP ext_authz form (`http_service` with
/// `path_prefix: /v1/verify`, the README's alternative to the gRPC form that
/// config/gateways/envoy.yaml uses; tests/api/grpc.rs tests that one): the
/// original method, `/v1/verify` + the original path and query, the original
/// Host, and only the allowed headers (authorization, cookie, origin,
/// referer). sessiongate needs no trusted proxy for them.
#[tokio::test]
async fn envoy_check_requests_get_the_answers_the_example_relies_on() {
    let app = spawn_app_with(&[]).await;
    let s = app.create("leo", "laptop").await;
    let old = app
        .create_body(json!({"user_id": "leo", "device_id": "phone", "auth_time": now_s() - 600}))
        .await;
    let check = |method: Method, path_and_query: &str| {
        app.request(method, path_and_query)
            .header("host", "app.example.com")
            .header("content-length", "0")
    };

    // Ordinary routes: path_prefix /v1/verify.
    for method in [Method::GET, Method::POST, Method::DELETE, Method::PATCH] {
        let res = check(method.clone(), "/v1/verify/api/orders/7?page=2&max_age_x=1")
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{method}");
        let h = res.headers();
        assert_eq!(h["x-session-user"], "leo");
        assert_eq!(h["x-session-id"], s.session_id.as_str());
        assert_eq!(h["x-session-device"], "laptop");
        assert_eq!(h["cache-control"], "no-store");
    }
    let res = check(Method::GET, "/v1/verify/").send().await.unwrap();
    assert_refused(res, StatusCode::UNAUTHORIZED, "invalid_token").await;

    // Cookie: the CSRF rule sees the original method and Host.
    let cookie = format!("session={}", s.token);
    let res = check(Method::POST, "/v1/verify/api/orders")
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
    let res = check(Method::POST, "/v1/verify/api/orders")
        .header("cookie", &cookie)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = check(Method::GET, "/v1/verify/api/orders")
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // The fresh-password filter: path_prefix "/v1/verify?max_age=300&path=".
    let fresh = "/v1/verify?max_age=300&path=/account/email?tab=1";
    let res = check(Method::GET, fresh)
        .bearer_auth(&old.token)
        .send()
        .await
        .unwrap();
    let www = res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(www.contains("max_age=300"), "{www}");
    assert_refused(
        res,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
    let res = check(Method::GET, fresh)
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = check(Method::GET, "/v1/verify/account/email?tab=1")
        .bearer_auth(&old.token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "ordinary filter, same session"
    );
}

/// The Envoy example keeps the settings the tests above and the docs rely on.
#[test]
fn envoy_example_keeps_its_safety_settings() {
    let yaml = std::fs::read_to_string(harness::shipped("envoy.yaml")).unwrap();
    for needle in [
        "failure_mode_allow: false",
        "status_on_error: { code: ServiceUnavailable }",
        "transport_api_version: V3",
        "envoy_grpc: { cluster_name: sessiongate_grpc }",
        // More than 2 x redis_timeout (250 ms): sessiongate's 503 comes first.
        "timeout: 1s\n",
        "http2_protocol_options: {}",
        r#"context_extensions: { max_age: "300" }"#,
        "headers_with_underscores_action: REJECT_REQUEST",
        "normalize_path: true",
        "merge_slashes: true",
    ] {
        assert!(yaml.contains(needle), "envoy.yaml lacks {needle:?}");
    }
}

/// The README shows the very files the tests run.
#[test]
fn the_docs_quote_the_shipped_configurations_exactly() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (file, fence) in [
        ("nginx-site.conf", "nginx"),
        ("Caddyfile", "caddyfile"),
        ("envoy.yaml", "yaml"),
    ] {
        let text = std::fs::read_to_string(harness::shipped(file)).unwrap();
        assert!(
            docs.contains(&format!("```{fence}\n{text}```\n")),
            "README.md does not quote config/gateways/{file} exactly"
        );
    }
}
