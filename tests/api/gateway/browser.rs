//! The browser's login flow through the shipped gateway configurations, in
//! a real browser: tests/browser/gateway.py drives Debian's headless
//! Chromium with Playwright against real nginx and Caddy, in front of the
//! example app and login backend (examples/browser-app/app.py), with
//! sessiongate behind them reading the `__Host-session` cookie.
//!
//! The site is `http://127.0.0.1:PORT`: Chromium treats loopback HTTP as a
//! secure context, so it keeps `Secure` and `__Host-` cookies there as it
//! would on an HTTPS site (README, "Browser apps: the login flow").
//! Screenshots go to target/browser-artifacts/gateway-<nginx|caddy>/.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::harness::{Gateway, Kind, kill_with_parent};
use crate::console::{artifacts_dir, browser_tools};
use crate::helpers::{ADMIN_KEY, ISSUER_KEY, spawn_app_with};

const COOKIE: &str = "__Host-session";
const USER: &str = "alice";
const PASSWORD: &str = "correct horse battery staple";
/// How long one run of the browser script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn browser_the_login_flow_works_through_nginx() {
    login_flow(Kind::Nginx).await
}

#[tokio::test]
async fn browser_the_login_flow_works_through_caddy() {
    login_flow(Kind::Caddy).await
}

/// examples/browser-app/app.py, run by the test's Python, on a free port.
pub struct ExampleApp {
    /// `127.0.0.1:PORT`
    pub address: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl ExampleApp {
    /// Starts the app in front of the sessiongate at `sessiongate`
    /// (`http://…`) and returns once it accepts connections.
    pub fn start(python: &Path, sessiongate: &str) -> ExampleApp {
        let dir = tempfile::Builder::new()
            .prefix("sessiongate-example-app-")
            .tempdir()
            .expect("create a temporary directory for the example app");
        let stderr = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut command = Command::new(python);
        command
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser-app/app.py"))
            .env("LISTEN", "127.0.0.1:0")
            .env("SESSIONGATE_URL", sessiongate)
            .env("ISSUER_KEY", ISSUER_KEY)
            .env("COOKIE_NAME", COOKIE)
            .env("USERS", format!("{USER}:{PASSWORD},bob:bobs-password"))
            .env("SEEN_LOG", dir.path().join("seen.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        kill_with_parent(&mut command);
        let mut child = command.spawn().expect("run examples/browser-app/app.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Some(address) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            panic!(
                "the example app did not start ({line:?}):\n{}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        };
        ExampleApp {
            address: address.to_string(),
            child,
            dir,
        }
    }

    /// Every request the app served, in order: `{method, path, user, origin}`.
    pub fn seen(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("seen.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for ExampleApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs tests/browser/gateway.py with `env`; its stdout, after asserting
/// that it succeeded.
async fn run_script(python: &Path, env: &[(&str, String)], context: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/gateway.py");
    let mut command = tokio::process::Command::new(python);
    command.arg(&script).kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, command.output())
        .await
        .expect("the browser script finishes in time")
        .expect("run the browser script");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "gateway.py failed ({}):\n{stdout}\n{stderr}\n{context}",
        out.status
    );
    stdout
}

fn assert_steps(stdout: &str, steps: &[&str]) {
    for step in steps {
        assert!(
            stdout.lines().any(|l| l == format!("OK {step}")),
            "{step:?} in:\n{stdout}"
        );
    }
}

fn screenshots(stdout: &str) -> Vec<PathBuf> {
    let shots: Vec<PathBuf> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("SCREENSHOT "))
        .map(PathBuf::from)
        .collect();
    for shot in &shots {
        let size = std::fs::metadata(shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "{}: {size} bytes", shot.display());
    }
    shots
}

/// Sign in, browse, sign out, the kept cookie refused, two devices, the
/// cross-origin form posts, an operator's forced logout, the open-redirect
/// attempts; then, with Redis down, the "try again" pages.
async fn login_flow(kind: Kind) {
    let (python, chromium) = browser_tools();
    let app = spawn_app_with(&[("TRUSTED_PROXIES", "127.0.0.1"), ("COOKIE_NAME", COOKIE)]).await;
    let example = ExampleApp::start(&python, &app.address);
    let gateway = Gateway::start(kind, &format!("127.0.0.1:{}", app.port), &example.address).await;
    let artifacts = artifacts_dir(match kind {
        Kind::Nginx => "gateway-nginx",
        Kind::Caddy => "gateway-caddy",
    });
    let env = |phase: &str| {
        vec![
            ("GATEWAY_URL", gateway.address.clone()),
            ("SESSIONGATE_URL", app.address.clone()),
            ("ADMIN_KEY", ADMIN_KEY.to_string()),
            ("USER", USER.to_string()),
            ("PASSWORD", PASSWORD.to_string()),
            ("COOKIE_NAME", COOKIE.to_string()),
            ("CHROMIUM", chromium.display().to_string()),
            ("ARTIFACTS", artifacts.display().to_string()),
            ("PHASE", phase.to_string()),
        ]
    };
    let logs = || {
        format!(
            "gateway log:\n{}\nexample app stderr:\n{}",
            gateway.log(),
            example.stderr()
        )
    };

    let stdout = run_script(&python, &env("flows"), &logs()).await;
    assert_steps(
        &stdout,
        &[
            "a page load without a session goes to the login page",
            "an API request gets the JSON 401",
            "wrong password refused",
            "signed in and sent back to the original page",
            "browsed, and a same-origin form post passed",
            "signed out",
            "the kept cookie is refused after sign-out",
            "one device signed the other out",
            "cross-origin form posts refused before the app",
            "a forced logout ends the browser's session on its next page",
            "return paths off the site are refused",
        ],
    );
    let mut shots = screenshots(&stdout);

    // What the app saw: the one same-origin order, never the other origins'
    // posts, and every checked page with sessiongate's identity.
    let others: Vec<&str> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("OTHER_ORIGINS "))
        .expect("the other origins")
        .split(' ')
        .collect();
    let seen = example.seen();
    let public = |path: &str| {
        path == "/login"
            || path.starts_with("/login?")
            || path == "/logout"
            || path.starts_with("/static/")
    };
    for request in &seen {
        let origin = request["origin"].as_str().unwrap_or_default();
        assert!(!others.contains(&origin), "the app saw {request}");
        let path = request["path"].as_str().unwrap();
        if !public(path) {
            assert_eq!(request["user"], USER, "{request}");
        } else {
            assert!(request["user"].is_null(), "{request}");
        }
    }
    let orders: Vec<&Value> = seen
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/orders")
        .collect();
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0]["origin"], gateway.address.as_str());

    // Redis down: a session the check must look up, then the outage.
    let s = app.create(USER, "outage-device").await;
    app.redis.as_ref().unwrap().lock().unwrap().kill9();
    let mut env = env("outage");
    env.push(("OUTAGE_TOKEN", s.token.clone()));
    let stdout = run_script(&python, &env, &logs()).await;
    assert_steps(
        &stdout,
        &["with Redis down, page loads get a try-again page"],
    );
    shots.extend(screenshots(&stdout));
    assert_eq!(shots.len(), 12, "{shots:?}");
}
