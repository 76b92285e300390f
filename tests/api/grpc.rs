//! Envoy's gRPC `ext_authz` on `SESSIONGATE_GRPC_LISTEN`: the same decisions
//! as `/v1/verify`, asked with tonic's client (envoy-types' generated one)
//! and with Python's `grpcio` and the gRPC project's `xds-protos` stubs
//! (tests/grpc/check.py): clients sessiongate did not write.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, now_ms_wall, spawn_app_with};

const GRPC_ON: (&str, &str) = ("GRPC_LISTEN", "127.0.0.1:0");

/// The original request a gateway asks about.
#[derive(Clone, Default)]
struct Original {
    method: &'static str,
    host: String,
    scheme: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    context: Vec<(&'static str, String)>,
    /// Send the headers as `header_map` (Envoy's `encode_raw_headers`), so
    /// repeated ones stay apart.
    raw: bool,
}

impl Original {
    fn get(path: &str) -> Original {
        Original {
            method: "GET",
            host: "app.example".into(),
            scheme: "https",
            path: path.into(),
            ..Default::default()
        }
    }

    fn method(mut self, method: &'static str) -> Self {
        self.method = method;
        self
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    fn context(mut self, key: &'static str, value: &str) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    fn raw(mut self) -> Self {
        self.raw = true;
        self
    }

    fn to_check(&self) -> CheckRequest {
        let mut http = attribute_context::HttpRequest {
            method: self.method.into(),
            host: self.host.clone(),
            scheme: self.scheme.into(),
            path: self.path.clone(),
            protocol: "HTTP/1.1".into(),
            ..Default::default()
        };
        if self.raw {
            http.header_map = Some(HeaderMap {
                headers: self
                    .headers
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: k.clone(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            });
        } else {
            // Envoy's own merging of repeated headers into one value.
            let mut merged: HashMap<String, String> = HashMap::new();
            for (k, v) in &self.headers {
                merged
                    .entry(k.clone())
                    .and_modify(|e| {
                        e.push_str(if k == "cookie" { "; " } else { "," });
                        e.push_str(v)
                    })
                    .or_insert_with(|| v.clone());
            }
            http.headers = merged;
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(http),
                    ..Default::default()
                }),
                context_extensions: self
                    .context
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                ..Default::default()
            }),
        }
    }
}

async fn client(app: &TestApp) -> AuthorizationClient<tonic::transport::Channel> {
    let addr = app.grpc_addr.expect("the gRPC listener is on");
    AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the gRPC listener")
}

async fn check(app: &TestApp, original: &Original) -> CheckResponse {
    check_within(app, original, None).await
}

async fn check_within(
    app: &TestApp,
    original: &Original,
    timeout: Option<Duration>,
) -> CheckResponse {
    let mut request = tonic::Request::new(original.to_check());
    if let Some(t) = timeout {
        request.set_timeout(t);
    }
    client(app)
        .await
        .check(request)
        .await
        .expect("Check answers")
        .into_inner()
}

/// What a check answered, in HTTP terms, to compare with `/v1/verify`.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    error: Option<String>,
    www_authenticate: Option<String>,
    retry_after: Option<String>,
    /// The identity headers set (OK only).
    identity: Vec<(String, String)>,
}

fn grpc_answer(res: &CheckResponse) -> (Answer, i32) {
    let code = res.status.as_ref().map_or(-1, |s| s.code);
    let answer = match res.http_response.as_ref() {
        Some(HttpResponse::OkResponse(ok)) => Answer {
            status: 200,
            error: None,
            www_authenticate: None,
            retry_after: None,
            identity: headers_of(&ok.headers)
                .into_iter()
                .filter(|(k, _)| k.starts_with("x-session-"))
                .collect(),
        },
        Some(HttpResponse::DeniedResponse(denied)) => {
            let headers: HashMap<String, String> =
                headers_of(&denied.headers).into_iter().collect();
            let body: Value = serde_json::from_str(&denied.body).expect("a JSON body");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
            assert_eq!(
                headers.get("content-type").map(String::as_str),
                Some("application/json")
            );
            Answer {
                status: denied.status.as_ref().unwrap().code as u16,
                error: body["error"].as_str().map(str::to_string),
                www_authenticate: headers.get("www-authenticate").cloned(),
                retry_after: headers.get("retry-after").cloned(),
                identity: vec![],
            }
        }
        _ => panic!("no OK or denied http_response in {res:?}"),
    };
    (answer, code)
}

fn headers_of(
    headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.to_ascii_lowercase(), h.value.clone())
        })
        .collect();
    out.sort();
    out
}

/// `/v1/verify` asked about the same original request (sent to it
/// directly: the request is the original).
async fn http_answer(app: &TestApp, original: &Original) -> Answer {
    let method = Method::from_bytes(original.method.as_bytes()).unwrap();
    let mut req = app.request(method, &format!("/v1/verify{}", original.path));
    for (k, v) in &original.headers {
        let v = if k == "origin" {
            // The same relation to the request's own origin as in the check.
            v.replace(
                &format!("{}://{}", original.scheme, original.host),
                &app.address,
            )
        } else {
            v.clone()
        };
        req = req.header(k.as_str(), v);
    }
    let res = req.send().await.unwrap();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let status = res.status().as_u16();
    let www_authenticate = header("www-authenticate");
    let retry_after = header("retry-after");
    let mut identity: Vec<(String, String)> =
        ["x-session-device", "x-session-id", "x-session-user"]
            .iter()
            .filter_map(|n| header(n).map(|v| (n.to_string(), v)))
            .collect();
    identity.sort();
    let error = if status == 200 {
        None
    } else {
        let body: Value = res.json().await.unwrap();
        body["error"].as_str().map(str::to_string)
    };
    Answer {
        status,
        error,
        www_authenticate,
        retry_after,
        identity,
    }
}

fn grpc_code_for(status: u16) -> i32 {
    match status {
        200 => 0,
        400 => 3,
        401 => 16,
        403 => 7,
        503 => 14,
        other => panic!("unexpected status {other}"),
    }
}

/// Case by case, the gRPC check and `/v1/verify` answer alike: status,
/// error code, `WWW-Authenticate`, `Retry-After`, identity headers; and the
/// gRPC status says the same.
#[tokio::test]
async fn grpc_check_decides_like_http_verify() {
    let app = spawn_app_with(&[GRPC_ON]).await;
    let live = app.create("alice", "laptop").await;
    let old = app
        .create_body(json!({"user_id": "bob", "device_id": "phone",
            "auth_time": now_ms_wall() / 1000 - 3600}))
        .await;
    let gone = app.create("carol", "tablet").await;
    assert_eq!(
        app.logout(&gone.token).await.status(),
        StatusCode::NO_CONTENT
    );
    let cookie = |t: &str| format!("session={t}");
    let cases: Vec<(&str, Original, u16)> = vec![
        ("bearer, live", Original::get("/x").bearer(&live.token), 200),
        ("no token", Original::get("/x"), 401),
        ("garbage", Original::get("/x").bearer("not.a.token"), 401),
        ("logged out", Original::get("/x").bearer(&gone.token), 401),
        (
            "two Authorization headers",
            Original::get("/x")
                .bearer(&live.token)
                .bearer(&live.token)
                .raw(),
            401,
        ),
        (
            "cookie, GET",
            Original::get("/x").header("cookie", &cookie(&live.token)),
            200,
        ),
        (
            "two session cookies",
            Original::get("/x")
                .header("cookie", &cookie(&live.token))
                .header("cookie", &cookie(&live.token)),
            401,
        ),
        (
            "cookie, cross-site POST",
            Original::get("/x")
                .method("POST")
                .header("cookie", &cookie(&live.token))
                .header("origin", "https://evil.example"),
            403,
        ),
        (
            "cookie, POST without Origin or Referer",
            Original::get("/x")
                .method("POST")
                .header("cookie", &cookie(&live.token)),
            403,
        ),
        (
            "cookie, same-origin POST",
            Original::get("/x")
                .method("POST")
                .header("cookie", &cookie(&live.token))
                .header("origin", "https://app.example"),
            200,
        ),
        (
            "bearer, cross-site POST (exempt)",
            Original::get("/x")
                .method("POST")
                .bearer(&live.token)
                .header("origin", "https://evil.example"),
            200,
        ),
        (
            "password an hour old, max_age header 600",
            Original::get("/x")
                .bearer(&old.token)
                .header("x-sessiongate-max-age", "600"),
            401,
        ),
        (
            "password an hour old, max_age header 7200",
            Original::get("/x")
                .bearer(&old.token)
                .header("x-sessiongate-max-age", "7200"),
            200,
        ),
        (
            "malformed max_age header",
            Original::get("/x")
                .bearer(&live.token)
                .header("x-sessiongate-max-age", "soon"),
            400,
        ),
        (
            "password an hour old, max_age=600 in the original query",
            Original::get("/x?max_age=600").bearer(&old.token),
            401,
        ),
        (
            "malformed max_age in the original query: the app's, ignored",
            Original::get("/x?max_age=soon").bearer(&live.token),
            200,
        ),
    ];
    for (what, original, want) in cases {
        let (grpc, code) = grpc_answer(&check(&app, &original).await);
        let http = http_answer(&app, &original).await;
        assert_eq!(grpc.status, want, "{what}: gRPC {grpc:?}");
        assert_eq!(grpc, http, "{what}: gRPC and HTTP differ");
        assert_eq!(code, grpc_code_for(want), "{what}: gRPC status");
        if want == 200 {
            assert_eq!(grpc.identity.len(), 3, "{what}: {grpc:?}");
        }
    }
}

/// OK sets the identity (overwriting what the client sent) and removes
/// every other `x-session-*` header the client sent; a route's `max_age`
/// context extension tightens the password age; only the smallest demand
/// counts.
#[tokio::test]
async fn ok_sets_identity_removes_client_session_headers_and_honours_route_max_age() {
    let app = spawn_app_with(&[GRPC_ON]).await;
    let s = app
        .create_body(json!({"user_id": "alice", "device_id": "laptop",
            "auth_time": now_ms_wall() / 1000 - 3600}))
        .await;
    let forged = Original::get("/")
        .bearer(&s.token)
        .header("x-session-user", "mallory")
        .header("X-Session-Role", "admin")
        .header("x-session-assertion", "eyJforged")
        .header("x-sessionless", "kept");
    let res = check(&app, &forged).await;
    let Some(HttpResponse::OkResponse(ok)) = &res.http_response else {
        panic!("not OK: {res:?}");
    };
    let set = headers_of(&ok.headers);
    assert_eq!(
        set,
        vec![
            ("x-session-device".into(), "laptop".into()),
            ("x-session-id".into(), s.session_id.clone()),
            ("x-session-user".into(), "alice".into()),
        ]
    );
    for h in &ok.headers {
        assert_eq!(
            h.append_action, 2,
            "identity headers must overwrite (OVERWRITE_IF_EXISTS_OR_ADD)"
        );
    }
    let mut removed = ok.headers_to_remove.clone();
    removed.sort();
    assert_eq!(removed, ["x-session-assertion", "x-session-role"]);

    let route = |max_age: &str| {
        Original::get("/account/")
            .bearer(&s.token)
            .context("max_age", max_age)
    };
    let (a, _) = grpc_answer(&check(&app, &route("600")).await);
    assert_eq!(a.status, 401, "{a:?}");
    assert_eq!(a.error.as_deref(), Some("insufficient_user_authentication"));
    assert!(
        a.www_authenticate
            .as_deref()
            .unwrap()
            .ends_with("max_age=600"),
        "{a:?}"
    );
    assert_eq!(
        grpc_answer(&check(&app, &route("7200")).await).0.status,
        200
    );
    // The header and the context extension: the smaller wins.
    let both = route("7200").header("x-sessiongate-max-age", "60");
    let (a, _) = grpc_answer(&check(&app, &both).await);
    assert!(a.www_authenticate.unwrap().ends_with("max_age=60"));
    let (a, _) = grpc_answer(&check(&app, &route("later")).await);
    assert_eq!(
        (a.status, a.error.as_deref()),
        (400, Some("invalid_request"))
    );
}

/// Redis stops answering: the check is answered 503 (`store_unavailable`,
/// `Retry-After`) before the caller's own deadline (`grpc-timeout`, as
/// Envoy sends it), even though `redis_timeout` is far longer; never OK.
#[tokio::test]
async fn a_slow_redis_gives_503_before_the_callers_deadline() {
    let app = spawn_app_with(&[
        GRPC_ON,
        ("REDIS_TIMEOUT", "20s"),
        ("STATE_REFRESH_INTERVAL", "1s"),
        ("STATE_MAX_STALENESS", "60s"),
    ])
    .await;
    let s = app.create("alice", "laptop").await;
    let original = Original::get("/").bearer(&s.token);
    assert_eq!(grpc_answer(&check(&app, &original).await).0.status, 200);
    let mut client = client(&app).await;
    app.redis.as_ref().unwrap().lock().unwrap().pause_ms(15_000);
    let started = Instant::now();
    let mut request = tonic::Request::new(original.to_check());
    request.set_timeout(Duration::from_secs(2));
    let res = client
        .check(request)
        .await
        .expect("answered before the deadline, not DEADLINE_EXCEEDED")
        .into_inner();
    let took = started.elapsed();
    let (a, code) = grpc_answer(&res);
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.error.as_deref(), Some("store_unavailable"));
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert_eq!(code, 14);
    // Within the 2 s deadline (it ends at 1.95 s), and not after the 15 s
    // pause or the 20 s Redis timeout.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Back to OK once Redis answers again.
    eventually(Duration::from_secs(40), || async {
        grpc_answer(&check(&app, &original).await).0.status == 200
    })
    .await;
}

/// The gRPC listener is off by default.
#[tokio::test]
async fn the_grpc_listener_is_off_unless_configured() {
    let app = crate::helpers::spawn_app().await;
    assert!(app.grpc_addr.is_none());
}

// --- with Python's grpcio ----------------------------------------------------------

/// The Python of scripts/test's venv (grpcio, xds-protos, PyJWT), or
/// `SESSIONGATE_TEST_PYTHON`.
pub fn test_python() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("SESSIONGATE_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("var/venv/bin/python"));
    let ok = std::process::Command::new(&python)
        .args([
            "-c",
            "import grpc, jwt; from envoy.service.auth.v3 import external_auth_pb2_grpc",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "no Python with grpcio, xds-protos and PyJWT at {} (SESSIONGATE_TEST_PYTHON): run \
         scripts/test, which installs them into var/venv",
        python.display()
    );
    python
}

/// tests/grpc/check.py: Python's grpcio with the gRPC project's generated
/// Envoy stubs asks sessiongate: a live session is OK with its identity
/// headers, a logged-out one is 401 with `WWW-Authenticate` and the JSON
/// body, a cross-site cookie POST is 403.
#[tokio::test]
async fn python_grpcio_client_gets_the_decisions() {
    let python = test_python();
    let app = spawn_app_with(&[GRPC_ON]).await;
    let live = app.create("alice", "laptop").await;
    let gone = app.create("bob", "phone").await;
    assert_eq!(
        app.logout(&gone.token).await.status(),
        StatusCode::NO_CONTENT
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/check.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(app.grpc_addr.unwrap().to_string())
        .env("LIVE_TOKEN", &live.token)
        .env("LIVE_SESSION", &live.session_id)
        .env("GONE_TOKEN", &gone.token)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run tests/grpc/check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check.py failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("check.py: 3 checks passed"), "{stdout}");
}

/// The `x-session-assertion` a gRPC check sets for `token` (it must be OK).
pub async fn assertion_of(app: &TestApp, token: &str) -> String {
    let original = Original::get("/")
        .bearer(token)
        .header("x-session-assertion", "forged.by.client");
    let res = check(app, &original).await;
    let Some(HttpResponse::OkResponse(ok)) = &res.http_response else {
        panic!("not OK: {res:?}");
    };
    assert!(
        !ok.headers_to_remove
            .iter()
            .any(|h| h == "x-session-assertion"),
        "sessiongate's own assertion would be removed"
    );
    headers_of(&ok.headers)
        .into_iter()
        .find(|(k, _)| k == "x-session-assertion")
        .map(|(_, v)| v)
        .expect("an x-session-assertion header")
}

/// The CheckRequests config/gateways/envoy.yaml makes: every header of the
/// original request, its method, Host and scheme, and on `/account/` the
/// route's `max_age` context extension (read from the file). A live session
/// passes on ordinary routes, a password older than that `max_age` is
/// refused on `/account/` only, the CSRF rule sees the original method and
/// Host.
#[tokio::test]
async fn envoy_example_checks_get_the_answers_it_relies_on() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/gateways/envoy.yaml"
    ))
    .unwrap();
    let max_age = yaml
        .split("context_extensions: { max_age: \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("envoy.yaml sets the /account/ route's max_age");
    assert_eq!(max_age, "300");
    let app = spawn_app_with(&[GRPC_ON]).await;
    let fresh = app.create("leo", "laptop").await;
    let old = app
        .create_body(json!({"user_id": "leo", "device_id": "phone",
            "auth_time": now_ms_wall() / 1000 - 600}))
        .await;
    let status = |res: CheckResponse| grpc_answer(&res).0;
    for method in ["GET", "POST", "DELETE", "PATCH"] {
        let o = Original::get("/api/orders/7?page=2&max_age_x=1")
            .method(method)
            .bearer(&old.token)
            .header("user-agent", "curl/8")
            .header("x-forwarded-proto", "https");
        assert_eq!(status(check(&app, &o).await).status, 200, "{method}");
    }
    let account = |token: &str| {
        Original::get("/account/email?tab=1")
            .bearer(token)
            .context("max_age", max_age)
    };
    let a = status(check(&app, &account(&old.token)).await);
    assert_eq!(a.status, 401);
    assert!(a.www_authenticate.unwrap().ends_with("max_age=300"));
    assert_eq!(
        status(check(&app, &account(&fresh.token)).await).status,
        200
    );
    let cookie = format!("session={}", fresh.token);
    let post = |origin: &str| {
        Original::get("/api/orders")
            .method("POST")
            .header("cookie", &cookie)
            .header("origin", origin)
    };
    assert_eq!(
        status(check(&app, &post("https://evil.example")).await).status,
        403
    );
    assert_eq!(
        status(check(&app, &post("https://app.example")).await).status,
        200
    );
    assert_eq!(status(check(&app, &Original::get("/")).await).status, 401);
}
