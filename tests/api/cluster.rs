//! Redis Cluster: clusters of the test's own (not the behaviour suite's
//! shared one, tests/api/topology.rs, which runs every behaviour test on a
//! Cluster too), sessiongate in cluster mode (`SESSIONGATE_REDIS_CLUSTER_NODES`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, eventually, spawn_app_on};
use crate::redis_server::TestRedis;
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

/// The user hash key of `user` under the default prefix (`sg:`).
fn user_key(user: &str) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(user.as_bytes());
    format!(
        "sg:u{{{}}}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16])
    )
}

/// A Redis Cluster key's slot (the service's own computation, checked
/// against `CLUSTER KEYSLOT` where it is used).
fn slot_of(key: &str) -> usize {
    sessiongate::store::keys::slot_of_key(key.as_bytes())
}

/// The node id of a cluster node (`CLUSTER MYID`).
fn node_id(node: &TestRedis) -> String {
    let reply = node.cmd(&["CLUSTER", "MYID"]);
    reply
        .split("\r\n")
        .nth(1)
        .unwrap_or_else(|| panic!("CLUSTER MYID: {reply}"))
        .to_string()
}

/// What one load task saw: when each request was sent and what came back.
type Seen = Vec<(Instant, StatusCode)>;

/// Verifies `token` in a loop until `stop`; every answer with its send time.
fn verify_loop(
    app: Arc<TestApp>,
    token: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            seen.push((sent, app.verify_status(&token).await));
        }
        seen
    })
}

/// kill -9 of a shard's primary while verifies and logouts run (issue 8
/// item 6): a live session on that shard gets 503 while no node serves its
/// slot, never 401; a session whose logout was acknowledged never 200 again
/// (on any shard); the service serves the shard again by itself within 10 s
/// of the replica's promotion.
///
/// Without replica acknowledgements (`MIN_REPLICAS_ACK`, the `ha` branch) a
/// logout acknowledged in the replication lag may be lost in the failover:
/// here the logouts on the doomed shard pause and the replica catches up
/// before the kill, so the assertion is about routing and recovery, not
/// about that window. REPLICA-ACK TEST PLUGS IN HERE: with
/// `MIN_REPLICAS_ACK=1`, drop the pause and the catch-up wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_shard_primary_gives_503_then_recovers_and_keeps_every_logout() {
    let mut cluster = TestCluster::start(3, 1, 1000);
    let seeds = cluster.seeds();
    let app = Arc::new(
        spawn_app_on(
            "redis://127.0.0.1:1/0",
            &[("REDIS_CLUSTER_NODES", &seeds), ("REDIS_TIMEOUT", "1s")],
        )
        .await,
    );
    // Users on every shard; which primary holds each.
    let mut sessions = Vec::new();
    for i in 0..24 {
        let user = format!("failover-{i}");
        let live = app.create(&user, "live").await;
        let revoked = app.create(&user, "revoked").await;
        let port = cluster.primary_of(&user_key(&user)).port();
        sessions.push((port, live, revoked));
    }
    let victim = cluster.primary_of(&user_key("failover-0")).port();
    let on_victim = sessions.iter().filter(|(p, ..)| *p == victim).count();
    assert!(
        on_victim >= 2 && on_victim < sessions.len(),
        "{on_victim} of {} users on the victim shard",
        sessions.len()
    );

    // Load: every live session verified in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let verifiers: Vec<_> = sessions
        .iter()
        .map(|(port, live, _)| {
            (
                *port,
                verify_loop(app.clone(), live.token.clone(), stop.clone()),
            )
        })
        .collect();
    // Logouts: half of the revoked sessions of each shard before the kill,
    // each acknowledged one then verified in a loop too.
    let mut acked: Vec<(Instant, tokio::task::JoinHandle<Seen>)> = Vec::new();
    let (before, after): (Vec<_>, Vec<_>) =
        sessions.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    for (_, (_, _, revoked)) in &before {
        assert_eq!(
            app.logout(&revoked.token).await.status(),
            StatusCode::NO_CONTENT
        );
        acked.push((
            Instant::now(),
            verify_loop(app.clone(), revoked.token.clone(), stop.clone()),
        ));
    }
    // The victim's replica has every acknowledged write (see the doc).
    let replica_port = {
        let replica = cluster
            .nodes
            .iter()
            .find(|n| {
                n.cmd(&["INFO", "replication"])
                    .contains(&format!("master_port:{victim}"))
            })
            .expect("the victim has a replica");
        replica.port()
    };
    let offset = |port: u16, field: &str| -> i64 {
        let info = cluster.node(port).unwrap().cmd(&["INFO", "replication"]);
        info.lines()
            .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
            .unwrap_or(-1)
    };
    let started = Instant::now();
    while offset(replica_port, "slave_repl_offset:") < offset(victim, "master_repl_offset:") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "replica not caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let victim_index = cluster
        .nodes
        .iter()
        .position(|n| n.port() == victim)
        .unwrap();
    cluster.nodes[victim_index].kill9();
    let killed = Instant::now();
    // Logouts go on during the switch: each answer 204 or 503, retried
    // until acknowledged (a revocation is idempotent).
    for (_, (_, _, revoked)) in &after {
        loop {
            let status = app.logout(&revoked.token).await.status();
            if status == StatusCode::NO_CONTENT {
                break;
            }
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "logout during the switch"
            );
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "logout never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        acked.push((
            Instant::now(),
            verify_loop(app.clone(), revoked.token.clone(), stop.clone()),
        ));
    }
    // The promotion, as the cluster reports it.
    let started = Instant::now();
    while !cluster
        .node(replica_port)
        .unwrap()
        .cmd(&["INFO", "replication"])
        .contains("role:master")
    {
        assert!(started.elapsed() < Duration::from_secs(60), "no promotion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let promoted = Instant::now();
    cluster.wait_healthy(Duration::from_secs(60));
    // Every live session verifies again; give the load a few seconds more.
    let victim_users: Vec<_> = sessions.iter().filter(|(p, ..)| *p == victim).collect();
    eventually(Duration::from_secs(30), || async {
        let mut all = true;
        for (_, live, _) in &victim_users {
            all &= app.verify_status(&live.token).await == StatusCode::OK;
        }
        all
    })
    .await;
    let recovery = promoted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);

    let mut outage_503 = 0;
    for (port, task) in verifiers {
        for (sent, status) in task.await.unwrap() {
            match status {
                StatusCode::OK => {}
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert!(
                        sent < promoted + Duration::from_secs(10),
                        "503 more than 10 s after the promotion"
                    );
                    outage_503 += 1;
                }
                other => panic!("a live session got {other} (shard {port}, victim {victim})"),
            }
        }
    }
    assert!(outage_503 > 0, "no 503 seen: did the kill reach the load?");
    for (ack, task) in acked {
        for (sent, status) in task.await.unwrap() {
            assert!(
                status == StatusCode::UNAUTHORIZED || status == StatusCode::SERVICE_UNAVAILABLE,
                "a logged-out session got {status}"
            );
            assert!(sent >= ack);
        }
    }
    assert!(
        recovery <= Duration::from_secs(10),
        "verifies on the failed-over shard recovered {recovery:?} after the promotion"
    );
    eprintln!(
        "cluster failover: promotion {:?} after the kill, shard serving again {recovery:?} after it, {outage_503} verifies answered 503",
        promoted - killed
    );
}

/// A slot moved from one primary to another under load (issue 8 item 6),
/// by hand as `redis-cli --cluster reshard` does it: `SETSLOT IMPORTING` /
/// `MIGRATING`, one `MIGRATE ... KEYS` of every key of the slot (the
/// users' hashes share it with the slot's event stream and tombstones,
/// and every script writes both a hash and the stream: moved apart, Redis
/// answers `TRYAGAIN` until the rest follows), requests before it (on the
/// source) and after it (`ASK`), then `SETSLOT NODE` everywhere (`MOVED`
/// from then on). Several users share the slot. No wrong answer and no
/// 5xx at all: `MOVED`/`ASK` are absorbed
/// by the client's redirects, within the request's retry budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_resharded_under_load_gives_no_wrong_answer_and_no_5xx() {
    let cluster = TestCluster::start(3, 0, 5000);
    let seeds = cluster.seeds();
    let app =
        Arc::new(spawn_app_on("redis://127.0.0.1:1/0", &[("REDIS_CLUSTER_NODES", &seeds)]).await);
    let first = "reshard-0".to_string();
    let slot = slot_of(&user_key(&first));
    assert_eq!(
        cluster.nodes[0].cmd(&["CLUSTER", "KEYSLOT", &user_key(&first)]),
        format!(":{slot}\r\n"),
        "slot_of agrees with Redis"
    );
    let users: Vec<String> = std::iter::once(first)
        .chain(
            (0..)
                .map(|i| format!("reshard-x{i}"))
                .filter(|u| slot_of(&user_key(u)) == slot)
                .take(4),
        )
        .collect();
    let mut live = Vec::new();
    let mut doomed = Vec::new();
    for u in &users {
        live.push(app.create(u, "live").await);
        doomed.push(app.create(u, "doomed").await);
    }
    let source = cluster.primary_of(&user_key(&users[0]));
    let target = cluster
        .primaries()
        .into_iter()
        .find(|n| n.port() != source.port())
        .unwrap();
    let (source_id, target_id) = (node_id(source), node_id(target));
    let slot_s = slot.to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let verifiers: Vec<_> = live
        .iter()
        .map(|s| verify_loop(app.clone(), s.token.clone(), stop.clone()))
        .collect();
    let mut acked = Vec::new();
    let logout = |i: usize| {
        let app = app.clone();
        let token = doomed[i].token.clone();
        async move {
            assert_eq!(app.logout(&token).await.status(), StatusCode::NO_CONTENT);
            token
        }
    };
    // Let the load run on the source first.
    acked.push(logout(0).await);

    let ok = "+OK\r\n";
    assert_eq!(
        target.cmd(&["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &source_id]),
        ok
    );
    assert_eq!(
        source.cmd(&["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &target_id]),
        ok
    );
    let target_port = target.port().to_string();
    // A login while the slot is migrating and its keys are still on the
    // source.
    let before = app.create(&users[0], "extra").await;
    assert_eq!(app.verify_status(&before.token).await, StatusCode::OK);
    // Changes that end sessions then: a logout, and a login replacing the
    // one just made (same device). Each writes a tombstone key, which this
    // node may not create in a slot it is giving away: the change and its
    // event must stand anyway (once, a script aborted half-way: the record
    // deleted, no answer but an error, the create's event missing).
    let migrating_logout = app.create(&users[1], "doomed-while-migrating").await;
    acked.push(migrating_logout.token.clone());
    assert_eq!(
        app.logout(&migrating_logout.token).await.status(),
        StatusCode::NO_CONTENT
    );
    let replacing = app.create(&users[0], "extra").await;
    assert_eq!(
        app.verify_status(&before.token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_status(&replacing.token).await, StatusCode::OK);
    let reply = source.cmd(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "1000"]);
    let keys: Vec<&str> = reply
        .split("\r\n")
        .skip(1)
        .filter(|l| !l.starts_with('$') && !l.is_empty())
        .collect();
    assert!(keys.len() > users.len(), "the slot's keys: {reply}");
    let mut migrate = vec![
        "MIGRATE",
        "127.0.0.1",
        &target_port,
        "",
        "0",
        "5000",
        "KEYS",
    ];
    migrate.extend(keys.iter().copied());
    assert_eq!(source.cmd(&migrate), ok, "MIGRATE {keys:?}");
    for (i, u) in users.iter().enumerate() {
        // After the move, before SETSLOT NODE: a logout and a login (ASK).
        if i + 1 < users.len() {
            acked.push(logout(i + 1).await);
        }
        let again = app.create(u, "extra").await;
        assert_eq!(app.verify_status(&again.token).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The new owner first, then the old one, then the rest, as redis-cli
    // does: the other way round, the source would answer MOVED to a target
    // still importing, which answers MOVED back until it learns (a request
    // can spend its retries ping-ponging; seen under load).
    let mut order = vec![target, source];
    order.extend(
        cluster
            .primaries()
            .into_iter()
            .filter(|n| n.port() != source.port() && n.port() != target.port()),
    );
    for node in order {
        assert_eq!(
            node.cmd(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &target_id]),
            ok
        );
    }
    assert_eq!(
        cluster.primary_of(&user_key(&users[0])).port(),
        target.port()
    );
    // After the move: MOVED, and the service follows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for token in &acked {
        assert_eq!(app.verify_status(token).await, StatusCode::UNAUTHORIZED);
    }
    stop.store(true, Ordering::SeqCst);
    let mut answers = 0;
    for task in verifiers {
        for (_, status) in task.await.unwrap() {
            assert_eq!(status, StatusCode::OK, "a live session during the reshard");
            answers += 1;
        }
    }
    assert!(answers > users.len() * 5, "only {answers} verifies ran");
    // Every record is on the target now, none left on the source.
    for u in &users {
        let key = user_key(u);
        assert_eq!(
            target.cmd(&["EXISTS", &key]),
            ":1\r\n",
            "{key} on the target"
        );
    }
    assert_eq!(
        source.cmd(&["CLUSTER", "COUNTKEYSINSLOT", &slot_s]),
        ":0\r\n"
    );
    // Every change made during the move has its event, once (a merged read
    // stops 500 ms short of the lowest primary clock: wait for it).
    let expected = [
        ("session.created", &migrating_logout.session_id),
        ("session.revoked", &migrating_logout.session_id),
        ("session.created", &replacing.session_id),
        ("session.revoked", &before.session_id),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = crate::events::events_paged(&app, "", 100).await;
        let count = |kind: &str, sid: &str| {
            events
                .iter()
                .filter(|e| e["type"] == kind && e["session_id"] == sid)
                .count()
        };
        let counts: Vec<usize> = expected.iter().map(|(k, s)| count(k, s)).collect();
        if counts.iter().all(|&c| c > 0) || Instant::now() > deadline {
            for ((kind, sid), c) in expected.iter().zip(counts) {
                assert_eq!(c, 1, "{kind} of {sid} in {events:?}");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lifecycle events in a Cluster: each change's script writes its event to
/// the stream of the user's slot (else Redis would refuse the script as
/// cross-slot), and the events endpoint merges every node's streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_written_with_their_change_on_the_users_slot_in_a_cluster() {
    let cluster = TestCluster::start(3, 0, 5000);
    let app = app_on(&cluster).await;
    let mut sessions = Vec::new();
    for i in 0..40 {
        sessions.push(app.create(&format!("user-{i}"), "laptop").await);
    }
    for s in &sessions[..20] {
        assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(app.rotate_keys().await.status(), StatusCode::OK);
    // A merged read takes events up to the lowest primary clock less 500
    // ms: the last ones show up on a later read.
    let deadline = Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = crate::events::events_paged(&app, "", 100).await;
        if events.len() >= 61 || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let of = |kind: &str| -> std::collections::HashSet<String> {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| e["session_id"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let all: std::collections::HashSet<String> =
        sessions.iter().map(|s| s.session_id.clone()).collect();
    let logged_out: std::collections::HashSet<String> = sessions[..20]
        .iter()
        .map(|s| s.session_id.clone())
        .collect();
    assert_eq!(of("session.created"), all);
    assert_eq!(of("session.revoked"), logged_out);
    assert_eq!(of("keys.rotated").len(), 1);
    assert_eq!(events.len(), 40 + 20 + 1);
    // Every user hash lives on the node of its slot's stream, and the
    // streams are spread over the nodes.
    let scan = |node: &TestRedis, pattern: &str| -> Vec<String> {
        node.cmd(&["SCAN", "0", "MATCH", pattern, "COUNT", "10000"])
            .split("\r\n")
            .skip(4)
            .filter(|l| l.starts_with("sg:"))
            .map(str::to_string)
            .collect()
    };
    let mut nodes_with_streams = 0;
    for node in &cluster.nodes {
        let streams = scan(node, "sg:ev{*");
        nodes_with_streams += usize::from(!streams.is_empty());
        for key in scan(node, "sg:u{*") {
            let tag = &key["sg:u{".len()..key.len() - 1];
            let slot = sessiongate::store::keys::slot_of_tag(tag);
            let stream = format!("sg:ev{{{}}}", sessiongate::store::keys::slot_tag(slot));
            assert!(
                streams.contains(&stream),
                "{key} without {stream} on its node"
            );
        }
    }
    assert!(
        nodes_with_streams >= 2,
        "streams on {nodes_with_streams} node(s)"
    );
}
