//! `GET /.well-known/jwks.json`: the Ed25519 public key of each kid of the
//! ring, rotating with it, the same on every instance.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{TestApp, eventually, now_ms_wall, spawn_app_on, spawn_app_with};

fn kid_of(token: &str) -> String {
    let header = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn jwks(app: &TestApp) -> Value {
    let res = app
        .request(Method::GET, "/.well-known/jwks.json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["cache-control"].to_str().unwrap(),
        "public, max-age=60"
    );
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    res.json().await.unwrap()
}

fn kids(set: &Value) -> Vec<String> {
    set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

fn x_of(set: &Value, kid: &str) -> String {
    let key = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("{kid} not in {set}"));
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(key["use"], "sig");
    let x = key["x"].as_str().unwrap().to_string();
    assert_eq!(URL_SAFE_NO_PAD.decode(&x).unwrap().len(), 32, "{key}");
    x
}

/// Anyone may read it; it lists the token's kid; a rotation adds the new
/// kid (on this instance at once, on another through the ring), the
/// rotated-out kid stays until it retires and then leaves; a second
/// instance with the same secret publishes the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_set_follows_the_ring_on_every_instance() {
    // A rotated-out kid retires 1 s + 5 s leeway + 1 s after the rotation.
    let a = spawn_app_with(&[("ABSOLUTE_LIFETIME", "1s")]).await;
    let b = spawn_app_on(&a.redis_url, &[("ABSOLUTE_LIFETIME", "1s")]).await;
    let s = a.create("alice", "laptop").await;
    let first = kid_of(&s.token);
    let set = jwks(&a).await;
    assert_eq!(kids(&set), vec![first.clone()]);
    let x_first = x_of(&set, &first);
    assert_eq!(x_of(&jwks(&b).await, &first), x_first, "instances disagree");

    let res = a.rotate_keys().await;
    assert_eq!(res.status(), StatusCode::OK);
    let second = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let set = jwks(&a).await;
    let mut listed = kids(&set);
    listed.sort();
    let mut want = vec![first.clone(), second.clone()];
    want.sort();
    assert_eq!(listed, want, "right after the rotation");
    assert_eq!(x_of(&set, &first), x_first, "a kid's key changed");
    let x_second = x_of(&set, &second);
    assert_ne!(x_second, x_first);
    eventually(Duration::from_secs(30), || async {
        kids(&jwks(&b).await).contains(&second)
    })
    .await;
    assert_eq!(x_of(&jwks(&b).await, &second), x_second);

    // The rotated-out kid leaves once it retires (about 7 s from now).
    let retired_by = now_ms_wall() + 7_000;
    eventually(Duration::from_secs(60), || async {
        !kids(&jwks(&a).await).contains(&first)
    })
    .await;
    assert!(
        now_ms_wall() >= retired_by - 1_500,
        "the old kid left before it retired"
    );
    assert_eq!(kids(&jwks(&a).await), vec![second.clone()]);
    eventually(Duration::from_secs(30), || async {
        kids(&jwks(&b).await) == [second.clone()]
    })
    .await;
}
