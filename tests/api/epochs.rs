//! Logout-all without trusting clocks: the logout-all epoch (issue 8 item 3),
//! on every topology.
//!
//! A session's `created_ms` comes from the clock of the node holding it, the
//! logout-all cutoff from the node holding the global state. A node whose
//! clock runs ahead stamps "the future", and a cutoff compare would spare its
//! sessions. libfaketime cannot skew Debian's `redis-server` (its jemalloc
//! recurses into `clock_gettime`), so the skew is simulated: a live record is
//! rewritten as a node running ahead would have written it.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::eventually;
use crate::topology::Topo;

/// How far ahead the simulated node's clock runs.
const AHEAD_MS: &str = "30000";

/// Rewrites a live record's times (created, last seen, password check,
/// absolute expiry) `ms` later, as a node whose clock ran `ms` ahead would
/// have stamped them. Returns the new `created_ms`.
fn stamp_ahead(t: &Topo, session_id: &str, ms: &str) -> i64 {
    let key = t.hash_of(session_id);
    let field = &session_id[22..];
    let script = "local blob = redis.call('HGET', KEYS[1], ARGV[1]) \
        if not blob then return -1 end \
        local r = cmsgpack.unpack(blob) \
        for i = 1, 4 do r[i] = r[i] + tonumber(ARGV[2]) end \
        redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack(r)) \
        return r[1]";
    let reply = t.cmd(&key, &["EVAL", script, "1", &key, field, ms]);
    let created: i64 = reply
        .trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("rewrite of {key}: {reply}"));
    assert!(created > 0, "no record to rewrite in {key}");
    created
}

/// The skewed clock: a session stamped 30 s in the future (a node running
/// ahead), then a logout-all on the instance: refused at once there, and
/// within 1 s on another instance, like every other earlier session.
async fn a_node_clock_running_ahead_does_not_spare_a_session_from_logout_all(t: Topo) {
    let a = t.app(&[]).await;
    let b = t.app(&[]).await;
    let ahead = a.create("fast-node-user", "laptop").await;
    let plain = a.create("plain-user", "laptop").await;
    let created = stamp_ahead(&t, &ahead.session_id, AHEAD_MS);
    assert!(created > crate::helpers::now_ms_wall() + 20_000);
    // Alive before the logout-all, on both instances.
    assert_eq!(a.verify_status(&ahead.token).await, StatusCode::OK);
    assert_eq!(b.verify_status(&ahead.token).await, StatusCode::OK);

    let res = a.logout_all().await;
    assert_eq!(res.status(), StatusCode::OK);
    let acked = Instant::now();
    for s in [&ahead, &plain] {
        assert_eq!(
            a.verify_status(&s.token).await,
            StatusCode::UNAUTHORIZED,
            "{} on {}: a session created before the logout-all verified after it",
            s.user_id,
            t.name()
        );
    }
    tokio::time::sleep_until((acked + Duration::from_secs(1)).into()).await;
    for s in [&ahead, &plain] {
        assert_eq!(
            b.verify_status(&s.token).await,
            StatusCode::UNAUTHORIZED,
            "{} still verified on the other instance 1 s after the logout-all",
            s.user_id
        );
    }
    // Listing and reauth agree: the session is gone, not merely unverifiable.
    assert_eq!(
        a.reauth(&ahead.session_id).await.status(),
        StatusCode::NOT_FOUND
    );
    // Logins after it work, on both instances.
    let fresh = b.create("fast-node-user", "laptop").await;
    assert_eq!(a.verify_status(&fresh.token).await, StatusCode::OK);
    assert_eq!(b.verify_status(&fresh.token).await, StatusCode::OK);
}

/// A login on an instance that has not heard of the newest epoch: a
/// logout-all whose announcement it missed (the epoch raised in Redis with
/// no PUBLISH, and its refresher paused). Its create must not hand out a
/// token stamped with the old epoch (which every instance that knows the new
/// one refuses): it learns the new epoch and stores the login again.
async fn a_login_on_an_instance_behind_on_logout_all_gets_a_working_token(t: Topo) {
    let paused = [
        ("STATE_REFRESH_INTERVAL", "1h"),
        ("STATE_MAX_STALENESS", "3h"),
    ];
    let behind = t.app(&paused).await;
    let before = behind.create("early", "laptop").await;
    let global = t.key("global");
    let raised = t.cmd(&global, &["HINCRBY", &global, "epoch", "1"]);
    assert!(raised.starts_with(':'), "{raised}");
    // An instance started now knows the new epoch.
    let current = t.app(&paused).await;
    assert_eq!(
        current.verify_status(&before.token).await,
        StatusCode::UNAUTHORIZED,
        "a session of an older epoch verified"
    );
    let login = behind.create("late", "laptop").await;
    assert_eq!(
        current.verify_status(&login.token).await,
        StatusCode::OK,
        "the instance behind handed out a token of an old epoch"
    );
    assert_eq!(behind.verify_status(&login.token).await, StatusCode::OK);
    // And it learnt the epoch: the earlier session is refused there too.
    assert_eq!(
        behind.verify_status(&before.token).await,
        StatusCode::UNAUTHORIZED
    );
}

/// `revoke-before` (a cutoff by time, for restoring a backup) still works
/// beside the epoch: sessions created at or before the time are refused,
/// later ones are not, and the epoch does not move.
async fn revoke_before_a_time_revokes_by_creation_time_only(t: Topo) {
    let app = t.app(&[]).await;
    let old = app.create("restored", "laptop").await;
    let global = t.key("global");
    let epoch = t.cmd(&global, &["HGET", &global, "epoch"]);
    // `revoke-before` takes whole seconds: wait until the last whole second
    // is past `old`'s creation.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at = (crate::helpers::now_ms_wall() / 1000).to_string();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .arg("revoke-before")
        .arg(&at)
        .envs(t.env_vars())
        .env("SESSIONGATE_ISSUER_KEYS", crate::helpers::ISSUER_KEY)
        .env("SESSIONGATE_ADMIN_KEYS", crate::helpers::ADMIN_KEY)
        .env("SESSIONGATE_SIGNING_SECRET", crate::helpers::SIGNING_SECRET)
        .env_remove("SESSIONGATE_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eventually(Duration::from_secs(10), || async {
        app.verify_status(&old.token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(t.cmd(&global, &["HGET", &global, "epoch"]), epoch);
    let fresh = app.create("restored", "phone").await;
    assert_eq!(app.verify_status(&fresh.token).await, StatusCode::OK);
}

crate::on_every_topology!(
    a_node_clock_running_ahead_does_not_spare_a_session_from_logout_all,
    a_login_on_an_instance_behind_on_logout_all_gets_a_working_token,
    revoke_before_a_time_revokes_by_creation_time_only,
);
