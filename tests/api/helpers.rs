//! `spawn_app`: the real service on port 0 against a real, throwaway Redis,
//! plus a typed method per endpoint. Logs stay silent unless `TEST_LOG` is set.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use sessiongate::config::Settings;
use sessiongate::startup::Application;

use crate::redis_server::TestRedis;

pub const ISSUER_KEY: &str = "test-issuer-key-0123456789abcdef0123456789";
pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef01234567890";
pub const SIGNING_SECRET: &str = "test-signing-secret-0123456789abcdef012345";

/// The Redis timeout of a test instance. Larger than the 250 ms default:
/// every test Redis runs `appendfsync always` on a disk shared with the
/// whole suite, and a write answered after 300 ms on a loaded machine is not
/// what most tests are about. Tests of timeout behaviour (Redis paused,
/// blackholed, slow) set their own, [`FAST_REDIS_TIMEOUT`].
pub const TEST_REDIS_TIMEOUT: &str = "2s";
/// For the tests that measure what a timeout does: an answer must come within
/// it (plus load) and well before the fault ends (faults there last at least
/// 6 s, or forever). Not the 250 ms production default: the setup of those
/// tests (64 concurrent creates with `appendfsync always`) missed 250 ms
/// under `scripts/flake-check`.
pub const FAST_REDIS_TIMEOUT: &str = "1s";

static TRACING: Once = Once::new();

fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            sessiongate::telemetry::init("debug", sessiongate::config::LogFormat::Text);
        }
    });
}

/// Settings for a test instance: one worker, test keys, and a Redis timeout
/// of [`TEST_REDIS_TIMEOUT`]; `overrides` are `SESSIONGATE_*` variables
/// without the prefix (e.g. `("IDLE_TIMEOUT", "2s")`).
pub fn test_settings(redis_url: &str, overrides: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = [
        ("REDIS_URL", redis_url),
        ("ISSUER_KEYS", ISSUER_KEY),
        ("ADMIN_KEYS", ADMIN_KEY),
        ("SIGNING_SECRET", SIGNING_SECRET),
        ("WORKERS", "1"),
        ("REDIS_TIMEOUT", TEST_REDIS_TIMEOUT),
        ("LISTEN", "127.0.0.1:0"),
    ]
    .iter()
    .map(|(k, v)| (format!("SESSIONGATE_{k}"), v.to_string()))
    .collect();
    for (k, v) in overrides {
        env.insert(format!("SESSIONGATE_{k}"), v.to_string());
    }
    // Sentinel and Cluster mode refuse a REDIS_URL beside them.
    if overrides
        .iter()
        .any(|(k, _)| ["REDIS_SENTINELS", "REDIS_CLUSTER_NODES"].contains(k))
    {
        env.remove("SESSIONGATE_REDIS_URL");
    }
    Settings::load(&|name| env.get(name).cloned()).expect("test settings are valid")
}

/// A running sessiongate, and the Redis it owns (if it owns one).
///
/// The service runs on its own OS thread with its own tokio runtime (and
/// actix's worker threads), never on the test's runtime: a test body that
/// computes or blocks for a while cannot starve the service's workers, its
/// global-state refresher or its pub/sub listener. Dropping the `TestApp`
/// stops the server, ends that runtime (refresher and listener with it) and
/// waits for the thread to finish, so no server outlives its test.
pub struct TestApp {
    /// First, so it drops first: the app stops before its Redis is killed.
    running: RunningApp,
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub redis: Option<Arc<Mutex<TestRedis>>>,
    pub redis_url: String,
}

/// A new Redis and a sessiongate on it.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A new Redis and a sessiongate on it, with setting overrides.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    let redis = TestRedis::start();
    let url = redis.url();
    let mut app = spawn_app_on(&url, overrides).await;
    app.redis = Some(Arc::new(Mutex::new(redis)));
    app
}

/// A sessiongate on an existing Redis (a second instance, or a Redis the
/// test kills and restarts).
pub async fn spawn_app_on(redis_url: &str, overrides: &[(&str, &str)]) -> TestApp {
    init_tracing();
    let settings = test_settings(redis_url, overrides);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let (running, port) = RunningApp::start(settings.clone(), listener).await;
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        settings,
        redis: None,
        redis_url: redis_url.to_string(),
        running,
    }
}

/// How long dropping a [`TestApp`] waits for its thread to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The thread serving one [`TestApp`]: a stop signal, and a channel that
/// closes when the thread has shut its runtime down.
struct RunningApp {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// In a mutex only so `TestApp` stays `Sync` (tests share it by `Arc`).
    finished: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl RunningApp {
    /// Builds and runs the application on a new thread with its own
    /// multi-threaded runtime; returns once it serves, with its port.
    async fn start(settings: Settings, listener: TcpListener) -> (RunningApp, u16) {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<u16, String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // Never sent on: the receiver sees the sender dropped when the
        // thread ends (normally or by a panic).
        let (finished_tx, finished_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("sessiongate-under-test".into())
            .spawn(move || {
                let _finished = finished_tx;
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("sessiongate-under-test-rt")
                    .enable_all()
                    .build()
                    .expect("a runtime for the app under test");
                runtime.block_on(async move {
                    let app = match Application::build_with_listener(settings, listener).await {
                        Ok(app) => app,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(app.port()));
                    // Dropping the server (when the stop signal wins) closes
                    // its listener and stops its workers.
                    tokio::select! {
                        result = app.run_until_stopped() => {
                            if let Err(e) = result {
                                eprintln!("the app under test stopped: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Ends the refresher, the listener and every other task.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .expect("spawn the app's thread");
        let port = match ready_rx.await {
            Ok(Ok(port)) => port,
            Ok(Err(e)) => panic!("application builds: {e}"),
            Err(_) => panic!("the app's thread ended before the app was built"),
        };
        (
            RunningApp {
                stop: Some(stop_tx),
                finished: Mutex::new(finished_rx),
            },
            port,
        )
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Bounded: the thread needs no help from the test's runtime to end.
        if let Ok(finished) = self.finished.lock() {
            let _ = finished.recv_timeout(STOP_TIMEOUT);
        }
    }
}

/// A session as created by the API.
#[derive(Debug, Clone)]
pub struct Created {
    pub token: String,
    pub session_id: String,
    pub user_id: String,
    pub device_id: String,
    pub body: Value,
}

impl TestApp {
    /// A raw command to this app's own Redis (panics if it owns none).
    pub fn redis_cmd(&self, args: &[&str]) -> String {
        self.redis
            .as_ref()
            .expect("this app owns its Redis")
            .lock()
            .unwrap()
            .cmd(args)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{}", self.address, path))
    }

    pub fn issuer(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(ISSUER_KEY)
    }

    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(ADMIN_KEY)
    }

    /// `POST /v1/sessions` with any body.
    pub async fn create_raw(&self, body: Value) -> Response {
        self.issuer(Method::POST, "/v1/sessions")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Creates a session, asserting 201.
    pub async fn create(&self, user: &str, device: &str) -> Created {
        self.create_body(json!({"user_id": user, "device_id": device}))
            .await
    }

    /// Creates a session from a full body, asserting 201.
    pub async fn create_body(&self, body: Value) -> Created {
        let res = self.create_raw(body).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let body: Value = res.json().await.unwrap();
        Created {
            token: body["token"].as_str().unwrap().to_string(),
            session_id: body["session_id"].as_str().unwrap().to_string(),
            user_id: body["user_id"].as_str().unwrap().to_string(),
            device_id: body["device_id"].as_str().unwrap().to_string(),
            body,
        }
    }

    pub async fn verify(&self, token: &str) -> Response {
        self.verify_at("/v1/verify", token).await
    }

    pub async fn verify_at(&self, path: &str, token: &str) -> Response {
        self.request(Method::GET, path)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn verify_status(&self, token: &str) -> StatusCode {
        self.verify(token).await.status()
    }

    pub async fn current(&self, token: &str) -> Response {
        self.request(Method::GET, "/v1/sessions/current")
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn logout(&self, token: &str) -> Response {
        self.request(Method::DELETE, "/v1/sessions/current")
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn list(&self, token: &str) -> Response {
        self.request(Method::GET, "/v1/sessions")
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn logout_others(&self, token: &str) -> Response {
        self.request(Method::DELETE, "/v1/sessions")
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn logout_one(&self, token: &str, session_id: &str) -> Response {
        self.request(Method::DELETE, &format!("/v1/sessions/{session_id}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn reauth(&self, session_id: &str) -> Response {
        self.issuer(Method::POST, &format!("/v1/sessions/{session_id}/reauth"))
            .send()
            .await
            .unwrap()
    }

    pub async fn admin_list(&self, user: &str) -> Response {
        self.admin(
            Method::GET,
            &format!("/v1/admin/users/{}/sessions", enc(user)),
        )
        .send()
        .await
        .unwrap()
    }

    pub async fn admin_revoke_user(&self, user: &str, except: Option<&str>) -> Response {
        let mut path = format!("/v1/admin/users/{}/sessions", enc(user));
        if let Some(sid) = except {
            path.push_str(&format!("?except={sid}"));
        }
        self.admin(Method::DELETE, &path).send().await.unwrap()
    }

    pub async fn admin_revoke_device(&self, user: &str, device: &str) -> Response {
        self.admin(
            Method::DELETE,
            &format!("/v1/admin/users/{}/devices/{}", enc(user), enc(device)),
        )
        .send()
        .await
        .unwrap()
    }

    pub async fn admin_revoke_session(&self, session_id: &str) -> Response {
        self.admin(Method::DELETE, &format!("/v1/admin/sessions/{session_id}"))
            .send()
            .await
            .unwrap()
    }

    pub async fn logout_all(&self) -> Response {
        self.admin(Method::POST, "/v1/admin/logout-all")
            .send()
            .await
            .unwrap()
    }

    pub async fn rotate_keys(&self) -> Response {
        self.admin(Method::POST, "/v1/admin/keys/rotate")
            .send()
            .await
            .unwrap()
    }

    pub async fn introspect(&self, token: &str, key: &str) -> Response {
        self.request(Method::POST, "/v1/introspect")
            .bearer_auth(key)
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
    }

    /// Total Redis commands served so far (`INFO commandstats`), by command.
    pub fn command_counts(&self) -> HashMap<String, u64> {
        command_counts(&self.redis_cmd(&["INFO", "commandstats"]))
    }
}

/// Parses `INFO commandstats` into calls per command.
pub fn command_counts(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// Percent-encodes a path segment.
pub fn enc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Asserts an error answer: status, JSON `error` code, a `message`.
pub async fn assert_error(res: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(res.status(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    if status == StatusCode::UNAUTHORIZED {
        assert!(
            res.headers().get("www-authenticate").is_some(),
            "401 without WWW-Authenticate"
        );
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            res.headers().get("retry-after").is_some(),
            "503 without Retry-After"
        );
    }
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], code, "error code in {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    body
}

/// Polls `check` every 20 ms until it is true or `within` passes; returns
/// how long it took, or panics.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        if started.elapsed() > within {
            panic!("condition not met within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Milliseconds since the Unix epoch (the host clock, which the test Redis
/// shares).
pub fn now_ms_wall() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The harness itself: a dropped `TestApp` is gone, with its refresher and
/// pub/sub listener, so ~200 tests do not pile up servers and threads.
#[tokio::test]
async fn a_dropped_test_app_stops_serving_and_leaves_its_redis() {
    let redis = TestRedis::start();
    let clients = || {
        redis
            .cmd(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| l.contains("addr="))
            .count()
    };
    let app = spawn_app_on(&redis.url(), &[]).await;
    let healthz = format!("{}/healthz", app.address);
    let res = app.client.get(&healthz).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The refresher's and the listener's connections, plus this probe's.
    assert!(clients() >= 2, "{}", redis.cmd(&["CLIENT", "LIST"]));
    let client = app.client.clone();
    drop(app);
    // Stopped by the time drop returns: nothing listens on the port.
    assert!(
        client.get(&healthz).send().await.is_err(),
        "the dropped app still answers"
    );
    // Redis closes the app's connections as soon as it sees them closed.
    eventually(Duration::from_secs(10), || async { clients() == 1 }).await;
}
