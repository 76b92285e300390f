//! Sentinel mode: a verify is answered only by a node that takes writes.

use reqwest::StatusCode;

use crate::redis_server::free_port;
use crate::sentinel::SentinelTopology;

/// A primary demoted behind the service's back (here: told to replicate
/// from an address where nothing listens, so it keeps serving the data it
/// had, read-only) must not confirm a session: a logout acknowledged by the
/// new primary would not be in its copy. A plain `HGET` is answered by a
/// replica; the verify's write probe is refused with `READONLY`: 503. The
/// verify runs right after the demotion, long before the sentinels (1 s
/// down-after) could elect another primary.
#[tokio::test]
async fn a_verify_on_a_demoted_primary_fails_closed() {
    let topology = SentinelTopology::start();
    topology.wait_replicas_online(2);
    let app = topology.spawn_app(&[]).await;
    let alice = app.create("alice", "laptop").await;
    assert_eq!(app.verify_status(&alice.token).await, StatusCode::OK);

    let nowhere = free_port().to_string();
    let reply = topology
        .primary()
        .cmd(&["REPLICAOF", "127.0.0.1", nowhere.as_str()]);
    assert!(reply.starts_with("+OK"), "REPLICAOF: {reply}");

    let res = app.verify(&alice.token).await;
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a read-only node confirmed a session"
    );
}
