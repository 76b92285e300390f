//! `sessiongate admin …`: the real binary against a real service and a real
//! Redis. The binary runs under `tokio::process`, so the test's runtime,
//! which also serves the app, is never blocked while it runs.

use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::helpers::{ADMIN_KEY, ISSUER_KEY, TestApp, spawn_app};
use crate::redis_server::{free_port, kill_with_parent};

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "exit code of {self:?}");
        self
    }
}

/// Runs `sessiongate admin ARGS` with exactly the environment `env` (nothing
/// inherited, so a developer's SESSIONGATE_* never leaks in) and `stdin`.
async fn admin_with(env: &[(&str, &str)], args: &[&str], stdin: &str) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"));
    cmd.arg("admin")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start the sessiongate binary");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the CLI finished within 60 s")
        .unwrap();
    Run {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs `sessiongate admin ARGS` against `app` with the admin key in the
/// environment.
async fn admin(app: &TestApp, args: &[&str]) -> Run {
    admin_with(
        &[
            ("SESSIONGATE_URL", &app.address),
            ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY),
        ],
        args,
        "",
    )
    .await
}

#[tokio::test]
async fn sessions_lists_a_users_sessions_as_a_table_and_as_json() {
    let app = spawn_app().await;
    let laptop = app
        .create_body(json!({"user_id": "alice", "device_id": "laptop", "metadata": {
            "ip": "192.0.2.8",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"}}))
        .await;
    let phone = app.create("alice", "phone").await;
    app.create("bob", "tablet").await;

    let run = admin(&app, &["sessions", "alice"]).await;
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two rows: {run:?}");
    assert!(lines[0].starts_with("SESSION  "), "{run:?}");
    for s in [&laptop, &phone] {
        let row = lines
            .iter()
            .find(|l| l.starts_with(&s.session_id))
            .unwrap_or_else(|| panic!("no row for {}: {run:?}", s.session_id));
        assert!(row.contains(&s.device_id), "{row}");
    }
    let laptop_row = lines
        .iter()
        .find(|l| l.starts_with(&laptop.session_id))
        .unwrap();
    assert!(
        laptop_row.contains("Firefox on Linux  192.0.2.8"),
        "label and first IP: {laptop_row}"
    );
    // Aligned: the DEVICE column starts at the same place on every line.
    let col = lines[0].find("DEVICE").unwrap();
    for l in &lines[1..] {
        assert!(
            l[col..].starts_with("laptop") || l[col..].starts_with("phone"),
            "{l}"
        );
    }
    assert!(
        !run.stdout.contains("tablet"),
        "bob's session listed: {run:?}"
    );

    // Where each was used from: no touch yet, so the first (login's) only.
    let header = lines[0];
    for col in ["BROWSER", "FIRST IP", "LAST IP", "LAST USER AGENT"] {
        assert!(header.contains(col), "{col} in {header}");
    }

    let run = admin(&app, &["sessions", "alice", "--json"]).await;
    run.assert_code(0);
    let api: Value = app.admin_list("alice").await.json().await.unwrap();
    assert_eq!(run.json(), api, "--json is the API's answer");
    assert_eq!(run.json()["sessions"].as_array().unwrap().len(), 2);

    let run = admin(&app, &["--json", "sessions", "nobody"]).await;
    run.assert_code(0);
    assert_eq!(run.json()["sessions"], serde_json::json!([]));
    let run = admin(&app, &["sessions", "nobody"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("no live sessions"), "{run:?}");
}

#[tokio::test]
async fn ids_with_slashes_spaces_and_non_ascii_reach_the_right_user_and_device() {
    let app = spawn_app().await;
    let user = "ops team/é?x=1#";
    let s = app.create(user, "dev/ice %2F").await;
    let decoy = app.create("ops team", "dev").await;

    let run = admin(&app, &["sessions", user, "--json"]).await;
    run.assert_code(0);
    let sessions = run.json()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 1, "{run:?}");
    assert_eq!(sessions[0]["session_id"], s.session_id.as_str());

    let run = admin(&app, &["logout-device", user, "dev/ice %2F"]).await;
    run.assert_code(0);
    assert_eq!(app.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&decoy.token).await, StatusCode::OK);
    // "." and ".." would be resolved away in a URL path: refused locally.
    admin(&app, &["sessions", ".."]).await.assert_code(2);
}

#[tokio::test]
async fn revoke_ends_the_session_and_its_token_no_longer_verifies() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let other = app.create("alice", "phone").await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);

    let run = admin(&app, &["revoke", &s.session_id]).await;
    run.assert_code(0);
    assert!(run.stdout.contains(&s.session_id), "{run:?}");
    assert_eq!(app.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify_status(&other.token).await, StatusCode::OK);

    // Revoking it again finds nothing: exit 1, and the JSON says 0.
    let run = admin(&app, &["revoke", &s.session_id, "--json"]).await;
    run.assert_code(1);
    assert_eq!(run.json(), serde_json::json!({"revoked": 0}));
    assert!(run.stderr.contains("no live session"), "{run:?}");
    // A malformed id is refused by the service: exit 1 with its reason.
    let run = admin(&app, &["revoke", "not-a-session-id"]).await;
    run.assert_code(1);
    assert!(run.stderr.contains("400 invalid_request"), "{run:?}");
}

#[tokio::test]
async fn logout_user_signs_out_every_device_or_all_but_one() {
    let app = spawn_app().await;
    let keep = app.create("alice", "laptop").await;
    let a = app.create("alice", "phone").await;
    let b = app.create("alice", "tablet").await;
    let bob = app.create("bob", "laptop").await;

    let run = admin(
        &app,
        &[
            "logout-user",
            "alice",
            "--except",
            &keep.session_id,
            "--json",
        ],
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.json(), serde_json::json!({"revoked": 2}));
    for (s, status) in [
        (&keep, StatusCode::OK),
        (&a, StatusCode::UNAUTHORIZED),
        (&b, StatusCode::UNAUTHORIZED),
        (&bob, StatusCode::OK),
    ] {
        assert_eq!(app.verify_status(&s.token).await, status, "{}", s.device_id);
    }

    let run = admin(&app, &["logout-user", "alice"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains("revoked 1 session of user alice"),
        "{run:?}"
    );
    assert_eq!(
        app.verify_status(&keep.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_status(&bob.token).await, StatusCode::OK);
    // Nobody left: still done (exit 0), nothing revoked.
    let run = admin(&app, &["logout-user", "alice", "--json"]).await;
    run.assert_code(0);
    assert_eq!(run.json(), serde_json::json!({"revoked": 0}));
}

#[tokio::test]
async fn logout_device_signs_out_one_device_and_exits_1_when_there_is_none() {
    let app = spawn_app().await;
    let laptop = app.create("alice", "laptop").await;
    let phone = app.create("alice", "phone").await;

    let run = admin(&app, &["logout-device", "alice", "laptop"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("revoked 1 session"), "{run:?}");
    assert_eq!(
        app.verify_status(&laptop.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_status(&phone.token).await, StatusCode::OK);

    let run = admin(&app, &["logout-device", "alice", "laptop", "--json"]).await;
    run.assert_code(1);
    assert_eq!(run.json(), serde_json::json!({"revoked": 0}));
    assert!(
        run.stderr.contains("no live session on device laptop"),
        "{run:?}"
    );
}

#[tokio::test]
async fn logout_all_is_refused_without_yes_and_signs_everyone_out_with_it() {
    let app = spawn_app().await;
    let alice = app.create("alice", "laptop").await;
    let bob = app.create("bob", "phone").await;

    let run = admin(&app, &["logout-all"]).await;
    run.assert_code(2);
    assert!(
        run.stderr.contains("EVERY user") && run.stderr.contains("--yes"),
        "says what it would do and how: {run:?}"
    );
    assert!(run.stderr.contains("Nothing was done"), "{run:?}");
    assert_eq!(app.verify_status(&alice.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&bob.token).await, StatusCode::OK);

    let run = admin(&app, &["logout-all", "--yes", "--json"]).await;
    run.assert_code(0);
    assert!(run.json()["cutoff_ms"].as_i64().is_some(), "{run:?}");
    assert_eq!(
        app.verify_status(&alice.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.verify_status(&bob.token).await,
        StatusCode::UNAUTHORIZED
    );

    let run = admin(&app, &["logout-all", "--yes"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("signed out every user"), "{run:?}");
}

#[tokio::test]
async fn rotate_key_signs_new_tokens_with_the_new_kid() {
    use base64::Engine;
    let app = spawn_app().await;
    let old = app.create("alice", "laptop").await;

    let run = admin(&app, &["rotate-key", "--json"]).await;
    run.assert_code(0);
    let kid = run.json()["kid"].as_str().expect("a kid").to_string();
    let new = app.create("alice", "phone").await;
    let header = new.token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], kid.as_str());
    assert_eq!(app.verify_status(&old.token).await, StatusCode::OK);

    let run = admin(&app, &["rotate-key"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains("new tokens are signed with key"),
        "{run:?}"
    );
    assert!(
        !run.stdout.contains(&kid),
        "a second rotation, a new kid: {run:?}"
    );
}

#[tokio::test]
async fn introspect_reads_the_token_from_stdin_and_refuses_it_on_argv() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let env = [
        ("SESSIONGATE_URL", app.address.as_str()),
        ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY),
    ];

    let run = admin_with(&env, &["introspect", "--json"], &format!("{}\n", s.token)).await;
    run.assert_code(0);
    let body = run.json();
    assert_eq!(body["active"], true);
    assert_eq!(body["sid"], s.session_id.as_str());
    assert_eq!(body["sub"], "alice");

    let run = admin_with(&env, &["introspect"], &s.token).await;
    run.assert_code(0);
    assert!(run.stdout.contains(&s.session_id), "{run:?}");
    assert!(!run.stdout.contains(&s.token), "the token echoed: {run:?}");

    // On argv: refused before anything is sent, the token not echoed.
    let run = admin_with(&env, &["introspect", &s.token], "").await;
    run.assert_code(2);
    assert!(run.stderr.contains("stdin"), "{run:?}");
    assert!(!run.stderr.contains(&s.token), "the token echoed: {run:?}");
    // Nothing on stdin.
    admin_with(&env, &["introspect"], "  \n")
        .await
        .assert_code(2);

    // Revoked: not active, exit 1.
    app.logout(&s.token).await;
    let run = admin_with(&env, &["introspect", "--json"], &s.token).await;
    run.assert_code(1);
    assert_eq!(run.json(), serde_json::json!({"active": false}));
}

#[tokio::test]
async fn a_key_on_the_command_line_is_refused_with_a_hint_and_never_printed() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let url = [("SESSIONGATE_URL", app.address.as_str())];
    for args in [
        vec!["--key", ADMIN_KEY, "revoke", &s.session_id],
        vec!["revoke", &s.session_id, "--key", ADMIN_KEY],
        vec![&format!("--key={ADMIN_KEY}"), "revoke", &s.session_id],
        vec!["--admin-key", ADMIN_KEY, "revoke", &s.session_id],
    ] {
        let run = admin_with(&url, &args, "").await;
        run.assert_code(2);
        assert!(
            run.stderr.contains("SESSIONGATE_ADMIN_KEY") && run.stderr.contains("ps"),
            "the hint: {run:?}"
        );
        assert!(
            !run.stderr.contains(ADMIN_KEY) && !run.stdout.contains(ADMIN_KEY),
            "the key printed: {run:?}"
        );
    }
    // Refused before any request: the session is still alive.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn the_key_can_come_from_a_file_and_a_wrong_key_is_exit_1_with_advice() {
    let app = spawn_app().await;
    app.create("alice", "laptop").await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{ADMIN_KEY}\n")).unwrap();
    let path = file.path().to_str().unwrap();
    let url = ("SESSIONGATE_URL", app.address.as_str());

    let run = admin_with(&[url], &["--key-file", path, "sessions", "alice"], "").await;
    run.assert_code(0);
    assert_eq!(run.stdout.lines().count(), 2, "{run:?}");
    assert!(!run.stderr.contains("warning"), "{run:?}");
    // Readable by others: still used, with a warning that says the fix.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = admin_with(&[url], &["--key-file", path, "sessions", "alice"], "").await;
    run.assert_code(0);
    assert!(
        run.stderr.contains("readable by other users") && run.stderr.contains("chmod 600"),
        "{run:?}"
    );
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = admin_with(
        &[url, ("SESSIONGATE_ADMIN_KEY_FILE", path)],
        &["sessions", "alice", "--json"],
        "",
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.json()["sessions"].as_array().unwrap().len(), 1);

    // Both sources at once: ambiguous, refused.
    admin_with(
        &[url, ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY)],
        &["--key-file", path, "sessions", "alice"],
        "",
    )
    .await
    .assert_code(2);

    let wrong = "wrong-admin-key-0123456789abcdef0123456789";
    let run = admin_with(
        &[url, ("SESSIONGATE_ADMIN_KEY", wrong)],
        &["sessions", "alice"],
        "",
    )
    .await;
    run.assert_code(1);
    assert!(
        run.stderr.contains("the admin key was refused")
            && run.stderr.contains("check SESSIONGATE_ADMIN_KEY"),
        "{run:?}"
    );
    assert!(!run.stderr.contains(wrong), "the key printed: {run:?}");

    let run = admin_with(
        &[url, ("SESSIONGATE_ADMIN_KEY", ISSUER_KEY)],
        &["logout-all", "--yes"],
        "",
    )
    .await;
    run.assert_code(1);
    assert!(run.stderr.contains("issuer key"), "{run:?}");
}

#[tokio::test]
async fn usage_errors_exit_2_and_every_command_has_help_with_an_example() {
    // No target, no key, unknown command, missing argument.
    let key = ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY);
    let run = admin_with(&[key], &["sessions", "alice"], "").await;
    run.assert_code(2);
    assert!(run.stderr.contains("set SESSIONGATE_URL"), "{run:?}");
    let run = admin_with(
        &[("SESSIONGATE_URL", "http://127.0.0.1:1")],
        &["sessions", "alice"],
        "",
    )
    .await;
    run.assert_code(2);
    assert!(run.stderr.contains("no admin key"), "{run:?}");
    admin_with(&[key], &["no-such-command"], "")
        .await
        .assert_code(2);
    admin_with(&[key], &["revoke"], "").await.assert_code(2);
    admin_with(&[key], &[], "").await.assert_code(2);

    for command in [
        "sessions",
        "revoke",
        "logout-user",
        "logout-device",
        "logout-all",
        "rotate-key",
        "introspect",
    ] {
        let run = admin_with(&[], &[command, "--help"], "").await;
        run.assert_code(0);
        assert!(
            run.stdout.contains("Example:")
                && run.stdout.contains(&format!("sessiongate admin {command}")),
            "--help of {command} has an example: {run:?}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_or_unavailable_service_is_exit_3() {
    // Nothing listens on a port that was just free.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let run = admin_with(
        &[
            ("SESSIONGATE_URL", &nowhere),
            ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY),
        ],
        &["sessions", "alice"],
        "",
    )
    .await;
    run.assert_code(3);
    assert!(
        run.stderr.contains("could not reach") && run.stderr.contains("SESSIONGATE_URL"),
        "{run:?}"
    );

    // The service is up but its Redis is gone: 503, exit 3.
    let app = spawn_app().await;
    app.redis.as_ref().unwrap().lock().unwrap().kill9();
    let run = admin(&app, &["logout-user", "alice"]).await;
    run.assert_code(3);
    assert!(run.stderr.contains("store_unavailable"), "{run:?}");
}

/// Caddy serving `https://127.0.0.1:PORT` with a certificate from its own
/// throwaway CA (`tls internal`), proxying to an app: an https target for
/// the CLI, trusted only through `SSL_CERT_FILE`.
struct TlsProxy {
    url: String,
    root_ca: std::path::PathBuf,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl TlsProxy {
    fn start(upstream: &str) -> TlsProxy {
        let dir = tempfile::Builder::new()
            .prefix("sessiongate-cli-tls-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let d = dir.path().display();
        let caddyfile = dir.path().join("Caddyfile");
        std::fs::write(
            &caddyfile,
            format!(
                "{{\n\tadmin off\n\tstorage file_system {d}/data\n\tskip_install_trust\n\
                 \tlocal_certs\n\tauto_https disable_redirects\n}}\n\
                 https://127.0.0.1:{port} {{\n\ttls internal\n\treverse_proxy {upstream}\n}}\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("caddy.log")).unwrap();
        let mut command = std::process::Command::new("caddy");
        command
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        kill_with_parent(&mut command);
        let child = command
            .spawn()
            .expect("run caddy (is it installed? scripts/test installs it)");
        TlsProxy {
            url: format!("https://127.0.0.1:{port}"),
            root_ca: dir.path().join("data/pki/authorities/local/root.crt"),
            child,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("caddy.log")).unwrap_or_default()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_https_target_works_when_its_ca_is_trusted_and_is_exit_3_when_not() {
    let app = spawn_app().await;
    let s = app.create("alice", "laptop").await;
    let upstream = format!("127.0.0.1:{}", app.port);
    let mut proxy = TlsProxy::start(&upstream);
    let mut attempts = 0;
    // Caddy makes its CA and the certificate after it starts: wait (up to
    // 30 s) for the CLI to succeed through it, trusting only that CA.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let run = loop {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            // Another process took the port between free_port() and
            // Caddy's bind: try another one.
            let log = proxy.log();
            assert!(
                log.contains("address already in use") && attempts < 5,
                "caddy exited ({status}); log:\n{log}"
            );
            attempts += 1;
            proxy = TlsProxy::start(&upstream);
            continue;
        }
        let ca = proxy.root_ca.to_str().unwrap().to_string();
        let run = admin_with(
            &[
                ("SESSIONGATE_URL", &proxy.url),
                ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY),
                ("SSL_CERT_FILE", &ca),
            ],
            &["sessions", "alice", "--json"],
            "",
        )
        .await;
        if run.code == 0 || std::time::Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    run.assert_code(0);
    assert_eq!(
        run.json()["sessions"][0]["session_id"],
        s.session_id.as_str()
    );
    let ca = proxy.root_ca.to_str().unwrap();
    let run = admin_with(
        &[
            ("SESSIONGATE_URL", &proxy.url),
            ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY),
            ("SSL_CERT_FILE", ca),
        ],
        &["revoke", &s.session_id],
        "",
    )
    .await;
    run.assert_code(0);
    assert_eq!(app.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);

    // The same target without its CA: the certificate is not trusted.
    let run = admin_with(
        &[
            ("SESSIONGATE_URL", &proxy.url),
            ("SESSIONGATE_ADMIN_KEY", ADMIN_KEY),
        ],
        &["sessions", "alice"],
        "",
    )
    .await;
    run.assert_code(3);
    assert!(
        run.stderr.contains("certificate") && run.stderr.contains("SSL_CERT_FILE"),
        "{run:?}"
    );
}
