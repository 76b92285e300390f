//! Redis Cluster: three primaries started by the test, sessiongate in
//! cluster mode (`SESSIONGATE_REDIS_CLUSTER_NODES`), the same behaviour.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, eventually, spawn_app_on};
use crate::topology::TestCluster;

async fn app_on(cluster: &TestCluster) -> TestApp {
    let seeds = cluster.seeds();
    spawn_app_on("redis://127.0.0.1:1/0", &[("REDIS_CLUSTER_NODES", &seeds)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_work_across_every_node_of_a_cluster() {
    let cluster = TestCluster::start(3, 0, 5000);
    let app = app_on(&cluster).await;
    let ready = app
        .request(reqwest::Method::GET, "/readyz")
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // Enough users that their hashes land on every node.
    let mut sessions = Vec::new();
    for i in 0..30 {
        sessions.push(app.create(&format!("user-{i}"), "laptop").await);
    }
    let per_node: Vec<i64> = cluster
        .nodes
        .iter()
        .map(|n| {
            n.cmd(&["DBSIZE"])
                .trim()
                .trim_start_matches(':')
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        per_node.iter().all(|&k| k > 0),
        "keys per node: {per_node:?}"
    );

    for s in &sessions {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }
    // Logout, force logout, listing: each one slot.
    assert_eq!(
        app.logout(&sessions[0].token).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.verify_status(&sessions[0].token).await,
        StatusCode::UNAUTHORIZED
    );
    let phone = app.create("user-1", "phone").await;
    let res = app.list(&phone.token).await;
    assert_eq!(
        res.json::<Value>().await.unwrap()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let res = app.admin_revoke_user("user-1", None).await;
    assert_eq!(res.json::<Value>().await.unwrap()["revoked"], 2);
    assert_eq!(
        app.verify_status(&phone.token).await,
        StatusCode::UNAUTHORIZED
    );
    let res = app.admin_revoke_session(&sessions[2].session_id).await;
    assert_eq!(res.json::<Value>().await.unwrap()["revoked"], 1);
    assert_eq!(
        app.verify_status(&sessions[2].token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_status(&sessions[3].token).await, StatusCode::OK);
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let json: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    json["kid"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_and_rotation_reach_another_instance_on_the_cluster() {
    let cluster = TestCluster::start(3, 0, 5000);
    let a = app_on(&cluster).await;
    let b = app_on(&cluster).await;
    let mut old = Vec::new();
    for i in 0..10 {
        old.push(b.create(&format!("u{i}"), "d").await);
    }
    let old_kid = kid_of(&old[0].token);

    // The rotation reaches B: B starts signing with the new kid, and a
    // token A signs with it verifies on B (and B's on A).
    let res = a.rotate_keys().await;
    assert_eq!(res.status(), StatusCode::OK);
    let new_kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_kid, old_kid);
    eventually(Duration::from_secs(10), || async {
        kid_of(&b.create("rot", "from-b").await.token) == new_kid
    })
    .await;
    let from_a = a.create("rot", "from-a").await;
    assert_eq!(kid_of(&from_a.token), new_kid);
    assert_eq!(b.verify_status(&from_a.token).await, StatusCode::OK);
    let from_b = b.create("rot", "from-b2").await;
    assert_eq!(kid_of(&from_b.token), new_kid);
    assert_eq!(a.verify_status(&from_b.token).await, StatusCode::OK);
    // Old-kid tokens still verify on both until their kid retires.
    assert_eq!(a.verify_status(&old[0].token).await, StatusCode::OK);
    assert_eq!(b.verify_status(&old[0].token).await, StatusCode::OK);

    assert_eq!(a.logout_all().await.status(), StatusCode::OK);
    let acked = Instant::now();
    for s in &old {
        assert_eq!(a.verify_status(&s.token).await, StatusCode::UNAUTHORIZED);
    }
    // Within 1 s on the other instance (API.md), from the acknowledgement.
    tokio::time::sleep_until((acked + Duration::from_secs(1)).into()).await;
    assert_eq!(
        b.verify_status(&old[9].token).await,
        StatusCode::UNAUTHORIZED,
        "B accepted a pre-logout-all token 1 s after the acknowledgement"
    );
    let fresh = b.create("u0", "d").await;
    assert_eq!(a.verify_status(&fresh.token).await, StatusCode::OK);
}
