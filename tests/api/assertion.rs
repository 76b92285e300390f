//! `X-Session-Assertion` (opt-in `upstream_assertion`): a short-lived JWT
//! on every successful verify, HTTP and gRPC, verified here by PyJWT (an
//! independent library) against `/.well-known/jwks.json`, as an upstream
//! would.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, now_ms_wall, spawn_app_with};

pub const AUDIENCE: &str = "https://app.example";
pub const ASSERTION_ON: [(&str, &str); 2] = [
    ("UPSTREAM_ASSERTION", "true"),
    ("UPSTREAM_ASSERTION_AUDIENCE", AUDIENCE),
];

async fn verify_assertion(app: &TestApp, token: &str) -> Option<String> {
    let res = app
        .request(Method::GET, "/v1/verify")
        .bearer_auth(token)
        .header("x-session-assertion", "forged.by.client")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.headers()
        .get("x-session-assertion")
        .map(|v| v.to_str().unwrap().to_string())
}

/// PyJWT's verdict on each assertion: `{"kid", "alg", "claims"}`.
async fn pyjwt(app: &TestApp, assertions: &[&str]) -> Vec<Value> {
    let python = crate::grpc::test_python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/assertion/verify_assertion.py");
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("{}/.well-known/jwks.json", app.address))
        .arg(AUDIENCE)
        .arg(&app.settings.issuer)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run verify_assertion.py");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{}\n", assertions.join("\n")).as_bytes())
            .await
            .unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "PyJWT refused: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// HTTP and gRPC verifies carry an assertion PyJWT accepts against the
/// JWKS, with the session's claims and a 60 s lifetime; it is reused across
/// verifies; a password re-check and a key rotation give a new one, still
/// verifiable; a logged-out session gets none.
#[tokio::test]
async fn the_assertion_verifies_with_pyjwt_against_the_jwks_on_http_and_grpc() {
    let mut settings = ASSERTION_ON.to_vec();
    settings.push(("GRPC_LISTEN", "127.0.0.1:0"));
    let app = spawn_app_with(&settings).await;
    let auth_time = now_ms_wall() / 1000 - 100;
    let s = app
        .create_body(json!({"user_id": "alice", "device_id": "laptop", "auth_time": auth_time}))
        .await;
    let first = verify_assertion(&app, &s.token)
        .await
        .expect("an assertion");
    assert_ne!(first, "forged.by.client");
    let again = verify_assertion(&app, &s.token).await.unwrap();
    assert_eq!(again, first, "not reused");
    let grpc = crate::grpc::assertion_of(&app, &s.token).await;
    assert_eq!(grpc, first, "gRPC and HTTP share the session's assertion");

    let verdicts = pyjwt(&app, &[&first]).await;
    let claims = &verdicts[0]["claims"];
    assert_eq!(verdicts[0]["alg"], "EdDSA");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["sid"], s.session_id.as_str());
    assert_eq!(claims["did"], "laptop");
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["iss"], app.settings.issuer.as_str());
    assert_eq!(claims["auth_time"], auth_time);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        60
    );
    let first_kid = verdicts[0]["kid"].as_str().unwrap().to_string();

    // A fresh password check: a new assertion with the new auth_time.
    assert_eq!(app.reauth(&s.session_id).await.status(), StatusCode::OK);
    let reauthed = verify_assertion(&app, &s.token).await.unwrap();
    assert_ne!(reauthed, first);
    // A rotation: the next one is signed with the new kid.
    let res = app.rotate_keys().await;
    let new_kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let rotated = verify_assertion(&app, &s.token).await.unwrap();
    let verdicts = pyjwt(&app, &[&reauthed, &rotated]).await;
    assert!(verdicts[0]["claims"]["auth_time"].as_i64().unwrap() > auth_time);
    assert_eq!(verdicts[0]["kid"], first_kid.as_str());
    assert_eq!(verdicts[1]["kid"], new_kid.as_str());

    assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    let res = app
        .request(Method::GET, "/v1/verify")
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.headers().get("x-session-assertion").is_none());
}

/// Off by default: no assertion, and the setting needs an audience.
#[tokio::test]
async fn no_assertion_unless_configured_and_an_audience_is_required() {
    let app = spawn_app_with(&[]).await;
    let s = app.create("alice", "laptop").await;
    assert_eq!(verify_assertion(&app, &s.token).await, None);
    let err = sessiongate::config::Settings::load(&|name| match name {
        "SESSIONGATE_ISSUER_KEYS" => Some("i".repeat(32)),
        "SESSIONGATE_ADMIN_KEYS" => Some("a".repeat(32)),
        "SESSIONGATE_SIGNING_SECRET" => Some("s".repeat(32)),
        "SESSIONGATE_UPSTREAM_ASSERTION" => Some("true".into()),
        _ => None,
    })
    .unwrap_err();
    assert!(
        err.setting
            .contains("SESSIONGATE_UPSTREAM_ASSERTION_AUDIENCE"),
        "{err}"
    );
}
