//! Session lifecycle events (issue 10): one event per change with its reason
//! and actor, tombstones, the JSON and SSE forms with resume, and webhooks
//! (signed, retried, dead-lettered, resumed across a `kill -9`), against
//! real Redis and real HTTP receivers started here.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    ADMIN_KEY, ISSUER_KEY, SIGNING_SECRET, TestApp, assert_error, enc, eventually, spawn_app_on,
    spawn_app_with,
};
use crate::redis_server::{TestRedis, free_port, kill_with_parent};

const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How many keys the app's Redis holds but for event streams and
/// tombstones (what the other tests' key inventories count).
/// An event stream, a tombstone or a webhook cursor (prefix `sg:`).
pub(crate) fn is_event_key(k: &str) -> bool {
    k == "sg:ev"
        || k.starts_with("sg:ev{")
        || k.starts_with("sg:t{")
        || k.starts_with("sg:hook:")
        || k == "{sg:global}:ev"
}

pub(crate) fn non_event_keys(app: &TestApp) -> usize {
    let reply = app.redis_cmd(&["SCAN", "0", "MATCH", "*", "COUNT", "100000"]);
    let lines: Vec<&str> = reply.split("\r\n").collect();
    assert_eq!(lines[2], "0", "one SCAN page is enough here: {reply}");
    lines[4..]
        .chunks(2)
        .filter_map(|c| c.get(1).copied())
        .filter(|k| !k.is_empty())
        .filter(|k| !is_event_key(k))
        .count()
}

/// Every event retained, oldest first, paging through `/v1/admin/events`.
pub(crate) async fn all_events(app: &TestApp, query: &str) -> Vec<Value> {
    events_paged(app, query, 7).await
}

/// [`all_events`] in pages of `limit`.
pub(crate) async fn events_paged(app: &TestApp, query: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut since = String::new();
    loop {
        let res = app
            .admin(
                Method::GET,
                &format!(
                    "/v1/admin/events?limit={limit}&since={}{query}",
                    enc(&since)
                ),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let page: Value = res.json().await.unwrap();
        let events = page["events"].as_array().unwrap().clone();
        since = page["next"].as_str().unwrap().to_string();
        if events.is_empty() {
            return out;
        }
        out.extend(events);
    }
}

/// The events after `seen` of them (by count; nothing else writes here).
async fn new_events(app: &TestApp, seen: &mut usize) -> Vec<(String, String, String, String)> {
    let all = all_events(app, "").await;
    let fresh = all[*seen..].to_vec();
    *seen = all.len();
    fresh.iter().map(short).collect()
}

/// (type, reason, actor, session_id) of an event ("" for null).
fn short(e: &Value) -> (String, String, String, String) {
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    (s("type"), s("reason"), s("actor"), s("session_id"))
}

fn ev(kind: &str, reason: &str, actor: &str, sid: &str) -> (String, String, String, String) {
    (kind.into(), reason.into(), actor.into(), sid.into())
}

#[tokio::test]
async fn every_change_is_one_event_with_its_reason_and_a_named_actor() {
    let admin_keys = format!("ops:{ADMIN_KEY}");
    let issuer_keys = format!("login:{ISSUER_KEY}");
    let app = spawn_app_with(&[
        ("MAX_SESSIONS_PER_USER", "2"),
        ("ADMIN_KEYS", &admin_keys),
        ("ISSUER_KEYS", &issuer_keys),
    ])
    .await;
    let (issuer, admin) = ("issuer:login", "admin:ops");
    let created = |sid: &str| ev("session.created", "", issuer, sid);
    let revoked = |reason: &str, actor: &str, sid: &str| ev("session.revoked", reason, actor, sid);
    let a1 = app.create("alice", "laptop").await;
    let events = all_events(&app, "").await;
    let mut seen = events.len();
    assert_eq!(
        events.iter().map(short).collect::<Vec<_>>(),
        vec![created(&a1.session_id)]
    );
    let e = &events[0];
    assert_eq!(e["user_id"], "alice");
    assert_eq!(e["device_id"], "laptop");
    assert_eq!(e["version"], 1);
    assert_eq!(e["exp"], a1.body["expires_at"]);
    assert!(e["id"].as_str().unwrap().len() > 4 && e["time"].as_i64().unwrap() > 0);
    assert!(!e.to_string().contains(ADMIN_KEY) && !e.to_string().contains(ISSUER_KEY));

    let a2 = app.create("alice", "laptop").await;
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![
            revoked("replaced_same_device", issuer, &a1.session_id),
            created(&a2.session_id)
        ]
    );
    let a3 = app.create("alice", "phone").await;
    let a4 = app.create("alice", "tablet").await;
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![
            created(&a3.session_id),
            revoked("cap_evicted", issuer, &a2.session_id),
            created(&a4.session_id)
        ]
    );
    assert_eq!(app.logout(&a4.token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![revoked("logout", "self", &a4.session_id)]
    );

    let b1 = app.create("bob", "a").await;
    let b2 = app.create("bob", "b").await;
    seen += 2;
    assert_eq!(
        app.logout_one(&b1.token, &b2.session_id).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![revoked("logout_other_device", "self", &b2.session_id)]
    );
    let b3 = app.create("bob", "c").await;
    seen += 1;
    assert_eq!(app.logout_others(&b1.token).await.status(), StatusCode::OK);
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![revoked("logout_others", "self", &b3.session_id)]
    );

    app.admin_revoke_device("alice", "phone").await;
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![revoked("force_logout_device", admin, &a3.session_id)]
    );
    let c1 = app.create("carol", "x").await;
    let c2 = app.create("carol", "y").await;
    seen += 2;
    app.admin_revoke_user("carol", None).await;
    let mut got = new_events(&app, &mut seen).await;
    got.sort();
    let mut want = vec![
        revoked("force_logout_user", admin, &c1.session_id),
        revoked("force_logout_user", admin, &c2.session_id),
    ];
    want.sort();
    assert_eq!(got, want);
    let d1 = app.create("dave", "x").await;
    seen += 1;
    app.admin_revoke_session(&d1.session_id).await;
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![revoked("admin_revoke", admin, &d1.session_id)]
    );

    let e1 = app.create("erin", "x").await;
    seen += 1;
    assert_eq!(app.reauth(&e1.session_id).await.status(), StatusCode::OK);
    assert_eq!(
        new_events(&app, &mut seen).await,
        vec![ev("session.reauthenticated", "", issuer, &e1.session_id)]
    );
    // Nothing changes, nothing is written: a verify, a listing, a failed logout.
    assert_eq!(app.verify_status(&e1.token).await, StatusCode::OK);
    app.list(&e1.token).await;
    assert_eq!(
        app.logout(&a4.token).await.status(),
        StatusCode::UNAUTHORIZED
    );
    app.admin_revoke_session(&d1.session_id).await;
    assert_eq!(new_events(&app, &mut seen).await, vec![]);

    let res = app.rotate_keys().await;
    let kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let events = all_events(&app, "&type=keys.rotated").await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0]["kid"].as_str(), events[0]["actor"].as_str()),
        (Some(kid.as_str()), Some(admin))
    );
    assert!(events[0]["user_id"].is_null() && events[0]["session_id"].is_null());
    seen += 1;

    // Logout-all: one global event at once, then the purge deletes the
    // records it revoked, one event each (actor: sessiongate itself).
    assert_eq!(app.logout_all().await.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    let purged = loop {
        let all = all_events(&app, "").await;
        if all.len() >= seen + 3 {
            break all[seen..].to_vec();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "purge events: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(short(&purged[0]).0, "sessions.logout_all");
    assert_eq!(purged[0]["actor"], admin);
    assert!(purged[0]["cutoff"].as_i64().unwrap() > 0);
    let mut rest: Vec<_> = purged[1..].iter().map(short).collect();
    rest.sort();
    let mut want = vec![
        revoked("logout_all", "system", &b1.session_id),
        revoked("logout_all", "system", &e1.session_id),
    ];
    want.sort();
    assert_eq!(rest, want);

    // Every id is unique; the type filter and a user's history agree.
    let all = all_events(&app, "").await;
    let ids: HashSet<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len());
    let res = app
        .admin(Method::GET, "/v1/admin/users/alice/events?limit=1000")
        .send()
        .await
        .unwrap();
    let alice: Value = res.json().await.unwrap();
    let alice = alice["events"].as_array().unwrap();
    assert_eq!(alice.len(), 8, "{alice:?}");
    assert!(alice.iter().all(|e| e["user_id"] == "alice"));
    let only_alice = all_events(&app, "&user_id=alice").await;
    assert_eq!(&only_alice, alice);
}

#[tokio::test]
async fn expiry_is_an_event_where_sessiongate_observes_it_and_verify_stays_generic() {
    let app = spawn_app_with(&[("IDLE_TIMEOUT", "1s"), ("TOUCH_INTERVAL", "100ms")]).await;
    let idle = app.create("ivy", "laptop").await;
    // The phone stays in use, so the user's hash stays (a hash whose every
    // session idled out expires in Redis unobserved: no event).
    let phone = app.create("ivy", "phone").await;
    // Let the idle timeout pass (time passing, not synchronisation).
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1300) {
        assert_eq!(app.verify_status(&phone.token).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = app.verify(&idle.token).await;
    let body = assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert!(!body.to_string().contains("idle"), "{body}");
    let revoked = all_events(&app, "&type=session.revoked").await;
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(
        short(&revoked[0]),
        ev(
            "session.revoked",
            "idle_expired",
            "system",
            &idle.session_id
        )
    );

    // Lifetime: the old session ends at +6 s; one made at +3 s keeps the
    // hash until +9 s; the login at +6.3 s prunes the old record: observed.
    let app = spawn_app_with(&[("ABSOLUTE_LIFETIME", "6s")]).await;
    let started = std::time::Instant::now();
    let old = app.create("lee", "laptop").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mid = app.create("lee", "tablet").await;
    tokio::time::sleep(Duration::from_millis(6300).saturating_sub(started.elapsed())).await;
    let new = app.create("lee", "phone").await;
    let events: Vec<_> = all_events(&app, "").await.iter().map(short).collect();
    assert_eq!(
        events,
        vec![
            ev("session.created", "", "issuer", &old.session_id),
            ev("session.created", "", "issuer", &mid.session_id),
            ev(
                "session.revoked",
                "lifetime_expired",
                "system",
                &old.session_id
            ),
            ev("session.created", "", "issuer", &new.session_id),
        ]
    );
}

#[tokio::test]
async fn a_revoked_session_leaves_a_tombstone_and_an_unknown_one_is_404() {
    let app = spawn_app_with(&[]).await;
    let s = app.create("tom", "laptop").await;
    let get = |sid: String| {
        let app = &app;
        async move {
            app.admin(Method::GET, &format!("/v1/admin/sessions/{sid}"))
                .send()
                .await
                .unwrap()
        }
    };
    let res = get(s.session_id.clone()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let live: Value = res.json().await.unwrap();
    assert_eq!(live["state"], "live");
    assert_eq!(live["session"]["device_id"], "laptop");

    assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    let res = get(s.session_id.clone()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let ended: Value = res.json().await.unwrap();
    assert_eq!(ended["state"], "ended", "{ended}");
    assert_eq!(ended["reason"], "logout");
    assert_eq!(ended["actor"], "self");
    assert_eq!(ended["user_id"], "tom");
    assert_eq!(ended["exp"], s.body["expires_at"]);
    let now = crate::helpers::now_ms_wall() / 1000;
    assert!(
        (now - ended["ended_at"].as_i64().unwrap()).abs() < 60,
        "{ended}"
    );
    let event = &all_events(&app, "&type=session.revoked").await[0];
    assert_eq!(ended["event_id"], event["id"]);
    // The token holder learns nothing of it.
    let body = assert_error(
        app.verify(&s.token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    assert!(!body.to_string().contains("logout"), "{body}");

    let other = app.create("tom", "phone").await;
    let unknown = format!("{}{}", &other.session_id[..22], "AAAAAAAAAAAAAAAAAAAAAA");
    assert_error(get(unknown).await, StatusCode::NOT_FOUND, "not_found").await;
    assert_error(
        get("nope".into()).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let res = app
        .issuer(Method::GET, &format!("/v1/admin/sessions/{}", s.session_id))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    // A tombstone lasts tombstone_retention, then the session is unknown.
    let app = spawn_app_with(&[("TOMBSTONE_RETENTION", "300ms")]).await;
    let s = app.create("tom", "laptop").await;
    app.logout(&s.token).await;
    let get = |sid: String| {
        let app = &app;
        async move {
            app.admin(Method::GET, &format!("/v1/admin/sessions/{sid}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    eventually(Duration::from_secs(20), || async {
        get(s.session_id.clone()).await == StatusCode::NOT_FOUND
    })
    .await;
}

#[tokio::test]
async fn bad_queries_are_400_and_the_endpoint_is_admin_only() {
    let app = spawn_app_with(&[]).await;
    for q in [
        "since=nonsense",
        "since=1.0-0",
        "limit=0",
        "limit=1001",
        "user_id=",
    ] {
        let res = app
            .admin(Method::GET, &format!("/v1/admin/events?{q}"))
            .send()
            .await
            .unwrap();
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let res = app
        .issuer(Method::GET, "/v1/admin/events")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = app
        .request(Method::GET, "/v1/admin/events")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // Unix milliseconds: events at or after that time.
    app.create("sam", "a").await;
    let later = crate::helpers::now_ms_wall() + 60_000;
    let res = app
        .admin(Method::GET, &format!("/v1/admin/events?since={later}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["events"], json!([]));
    let res = app
        .admin(Method::GET, "/v1/admin/events?since=0")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap()["events"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Reads SSE messages until `n` events came; returns (id, event) pairs.
async fn sse_events(app: &TestApp, last_id: Option<&str>, n: usize) -> Vec<(String, Value)> {
    let mut req = app
        .admin(Method::GET, "/v1/admin/events")
        .header("accept", "text/event-stream");
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res;
    let mut text = String::new();
    let mut out = Vec::new();
    let read = async {
        while out.len() < n {
            let chunk = body.chunk().await.unwrap().expect("the stream stays open");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = text.find("\n\n") {
                let message: String = text.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in message.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str::<Value>(v).unwrap());
                    }
                }
                if let (Some(id), Some(data)) = (id, data) {
                    out.push((id, data));
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("events within 30 s");
    out
}

#[tokio::test]
async fn sse_streams_new_events_and_resumes_after_last_event_id() {
    let app = spawn_app_with(&[]).await;
    let s: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(app.create(&format!("user-{i}"), "d").await);
        }
        v
    };
    let first = sse_events(&app, None, 3).await;
    let sids: Vec<&str> = first
        .iter()
        .map(|(_, e)| e["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        sids,
        s.iter().map(|c| c.session_id.as_str()).collect::<Vec<_>>()
    );
    // Resume after the second: the third again, then what happened since.
    let more = [
        app.create("user-9", "d").await,
        app.create("user-3", "d").await,
    ];
    let resumed = sse_events(&app, Some(&first[1].0), 3).await;
    let got: Vec<&str> = resumed
        .iter()
        .map(|(_, e)| e["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        vec![
            s[2].session_id.as_str(),
            &more[0].session_id,
            &more[1].session_id
        ]
    );
    // Live: an event made while the stream is open arrives on it.
    let app = Arc::new(app);
    let last = resumed[2].0.clone();
    let reader = {
        let app = app.clone();
        tokio::spawn(async move { sse_events(&app, Some(&last), 1).await })
    };
    let live = app.create("user-4", "d").await;
    let got = reader.await.unwrap();
    assert_eq!(got[0].1["session_id"], live.session_id.as_str());
    // A filter: only revocations of user-4.
    app.logout(&live.token).await;
    let mut req = app
        .admin(
            Method::GET,
            "/v1/admin/events?user_id=user-4&type=session.revoked",
        )
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(30), async {
        let mut text = String::new();
        while !text.contains("data: ") {
            text.push_str(std::str::from_utf8(&req.chunk().await.unwrap().unwrap()).unwrap());
        }
        text
    })
    .await
    .unwrap();
    let data = chunk
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (e["type"].as_str(), e["reason"].as_str()),
        (Some("session.revoked"), Some("logout"))
    );
}

/// What a test receiver answers.
#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    Status(u16),
    Redirect,
    /// Never answers.
    Hang,
    /// 200 with an endless body.
    HugeBody,
    /// 200 after 100 ms.
    Slow,
}

/// A request as received: headers (lower-case names) and body.
type Request = (HashMap<String, String>, Vec<u8>);

/// A real HTTP receiver on a free port, recording every request's
/// headers and body.
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Receiver {
        Self::start_on(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            behaviour,
        )
    }

    fn start_on(listener: tokio::net::TcpListener, behaviour: Behaviour) -> Receiver {
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let recorded = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    loop {
                        let Some((headers, body)) = read_request(&mut sock).await else {
                            return;
                        };
                        recorded.lock().unwrap().push((headers, body));
                        let head = match behaviour {
                            Behaviour::Ok => "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string(),
                            Behaviour::Slow => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string()
                            }
                            Behaviour::Status(s) => format!("HTTP/1.1 {s} X\r\ncontent-length: 0\r\n\r\n"),
                            Behaviour::Redirect => "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n".to_string(),
                            Behaviour::Hang => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            Behaviour::HugeBody => {
                                let _ = sock
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000000\r\n\r\n")
                                    .await;
                                let chunk = vec![b'x'; 65536];
                                while sock.write_all(&chunk).await.is_ok() {}
                                return;
                            }
                        };
                        if sock.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Receiver { url, got }
    }

    fn bodies(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect()
    }

    /// The `session_id` of every event received, in order (repeats kept).
    fn session_ids(&self) -> Vec<String> {
        self.bodies()
            .iter()
            .filter_map(|e| e["session_id"].as_str().map(str::to_string))
            .collect()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

async fn read_request(
    sock: &mut tokio::net::TcpStream,
) -> Option<(HashMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = sock.read(&mut byte).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut byte).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&byte[..n]);
    }
    Some((headers, body))
}

fn webhook_settings(endpoints: &[(&str, &str)]) -> String {
    endpoints
        .iter()
        .map(|(name, url)| format!("{name}={url}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_and_bad_endpoints_only_hurt_themselves() {
    let good = Receiver::start(Behaviour::Ok).await;
    let e500 = Receiver::start(Behaviour::Status(500)).await;
    let redirect = Receiver::start(Behaviour::Redirect).await;
    let hang = Receiver::start(Behaviour::Hang).await;
    let huge = Receiver::start(Behaviour::HugeBody).await;
    let urls = webhook_settings(&[
        ("good", &good.url),
        ("e500", &e500.url),
        ("redirect", &redirect.url),
        ("hang", &hang.url),
        ("huge", &huge.url),
        ("down", &format!("http://127.0.0.1:{}/", free_port())),
    ]);
    let app = spawn_app_with(&[
        ("WEBHOOK_URLS", &urls),
        ("WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("WEBHOOK_TIMEOUT", "300ms"),
        ("WEBHOOK_MAX_ATTEMPTS", "3"),
        ("WEBHOOK_BACKOFF", "20ms"),
    ])
    .await;
    let mut sessions = Vec::new();
    for i in 0..5 {
        sessions.push(app.create(&format!("w{i}"), "d").await);
    }
    for s in &sessions {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }
    eventually(Duration::from_secs(30), || async { good.count() >= 5 }).await;
    let key = sessiongate::events::webhooks::secret_bytes(&sessiongate::config::Secret::new(
        WEBHOOK_SECRET,
    ))
    .unwrap();
    let got = good.got.lock().unwrap().clone();
    for (headers, body) in &got {
        let id = &headers["webhook-id"];
        let ts: i64 = headers["webhook-timestamp"].parse().unwrap();
        assert_eq!(
            headers["webhook-signature"],
            sessiongate::events::webhooks::sign(&key, id, ts, body)
        );
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(&event["id"], id.as_str());
    }
    // Ordered per user (one stream); across users, by time of reading.
    let sids: HashSet<String> = good
        .bodies()
        .iter()
        .map(|e| e["session_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        sids,
        sessions
            .iter()
            .map(|s| s.session_id.clone())
            .collect::<HashSet<_>>()
    );

    // Failing endpoints: 3 attempts per event, then the dead-letter stream.
    let dead = |app: &TestApp, name: &str| {
        app.redis_cmd(&["XRANGE", "sg:dead", "-", "+"])
            .matches(&format!("\r\n{name}\r\n"))
            .count()
    };
    eventually(Duration::from_secs(60), || async {
        ["e500", "redirect", "hang", "down"]
            .iter()
            .all(|n| dead(&app, n) == 5)
    })
    .await;
    assert_eq!(e500.count(), 15, "3 attempts for each of 5 events");
    assert_eq!(redirect.count(), 15, "redirects are not followed");
    assert!(huge.count() >= 5);
    assert_eq!(
        dead(&app, "huge"),
        0,
        "a 200 with a huge body is a delivery"
    );
    assert_eq!(dead(&app, "good"), 0);
    let metrics = app
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"sessiongate_webhook_deliveries_total{endpoint="e500",outcome="dead_lettered"} 5"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"sessiongate_webhook_deliveries_total{endpoint="good",outcome="delivered"} 5"#
    ));
    assert!(metrics.contains("sessiongate_webhook_lag_seconds"));
    // Verify never waited for any of it.
    for s in &sessions {
        assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    }
}

/// The README's example receiver, run as a real process.
struct PyReceiver {
    child: std::process::Child,
    port: u16,
    out: Arc<Mutex<Vec<String>>>,
}

impl PyReceiver {
    async fn start() -> PyReceiver {
        let port = free_port();
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/webhook_receiver.py"
        ))
        .arg(port.to_string())
        .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        kill_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("python3 runs");
        let stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let lines = out.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().unwrap().push(line);
            }
        });
        eventually(Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        PyReceiver { child, port, out }
    }
}

impl Drop for PyReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_receiver_verifies_deliveries_and_refuses_tampered_or_replayed_ones() {
    let py = PyReceiver::start().await;
    let url = format!("http://127.0.0.1:{}/", py.port);
    let app = spawn_app_with(&[
        ("WEBHOOK_URLS", &format!("example={url}")),
        ("WEBHOOK_SECRET", WEBHOOK_SECRET),
    ])
    .await;
    let s = app.create("pat", "laptop").await;
    app.logout(&s.token).await;
    eventually(Duration::from_secs(30), || async {
        py.out.lock().unwrap().len() >= 2
    })
    .await;
    let printed: Vec<Value> = py
        .out
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed[0]["type"], "session.created");
    assert_eq!(printed[1]["reason"], "logout");
    assert!(
        app.redis_cmd(&["XLEN", "sg:dead"]).contains(":0"),
        "nothing dead-lettered"
    );

    let key = sessiongate::events::webhooks::secret_bytes(&sessiongate::config::Secret::new(
        WEBHOOK_SECRET,
    ))
    .unwrap();
    let client = reqwest::Client::new();
    let send = |id: &str, ts: i64, signed: &[u8], sent: &[u8]| {
        client
            .post(&url)
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                sessiongate::events::webhooks::sign(&key, id, ts, signed),
            )
            .body(sent.to_vec())
            .send()
    };
    let now = crate::helpers::now_ms_wall() / 1000;
    let body = br#"{"id":"x-1","type":"session.created"}"#;
    let tampered = br#"{"id":"x-1","type":"session.revoked"}"#;
    assert_eq!(
        send("x-1", now, body, tampered).await.unwrap().status(),
        400,
        "tampered"
    );
    assert_eq!(
        send("x-1", now - 3600, body, body).await.unwrap().status(),
        400,
        "replayed late"
    );
    assert_eq!(
        send("x-1", now + 3600, body, body).await.unwrap().status(),
        400,
        "from the future"
    );
    assert_eq!(send("x-2", now, body, body).await.unwrap().status(), 200);
    assert_eq!(
        send("x-2", now, body, body).await.unwrap().status(),
        200,
        "a duplicate is acknowledged"
    );
    // One more, so that its line (printed after the duplicate's turn: the
    // receiver answers one request at a time) shows the rest were read.
    let last = br#"{"id":"x-3","type":"session.created"}"#;
    assert_eq!(send("x-3", now, last, last).await.unwrap().status(), 200);
    eventually(Duration::from_secs(30), || async {
        py.out.lock().unwrap().iter().any(|l| l.contains("x-3"))
    })
    .await;
    let lines = py.out.lock().unwrap().len() - 1;
    assert_eq!(
        lines, 3,
        "the duplicate and the refused ones are not handled"
    );
}

/// sessiongate as a child process (so it can be `kill -9`ed).
fn start_binary(redis_url: &str, port: u16, webhook: &str) -> std::process::Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SESSIONGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("SESSIONGATE_REDIS_URL", redis_url)
        .env("SESSIONGATE_ISSUER_KEYS", ISSUER_KEY)
        .env("SESSIONGATE_ADMIN_KEYS", ADMIN_KEY)
        .env("SESSIONGATE_SIGNING_SECRET", SIGNING_SECRET)
        .env("SESSIONGATE_REDIS_TIMEOUT", "2s")
        .env("SESSIONGATE_WORKERS", "1")
        .env("SESSIONGATE_WEBHOOK_URLS", format!("r={webhook}"))
        .env("SESSIONGATE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        // Long enough that no event is given up on while the receiver is down.
        .env("SESSIONGATE_WEBHOOK_BACKOFF", "1s")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    kill_with_parent(&mut cmd);
    cmd.spawn().expect("the sessiongate binary runs")
}

async fn create_on(client: &reqwest::Client, port: u16, user: &str) -> String {
    let res = client
        .post(format!("http://127.0.0.1:{port}/v1/sessions"))
        .bearer_auth(ISSUER_KEY)
        .json(&json!({"user_id": user, "device_id": "d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    res.json::<Value>().await.unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_ready(client: &reqwest::Client, port: u16) {
    eventually(Duration::from_secs(30), || async {
        client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_across_a_kill_9_right_after_an_acknowledgement() {
    let redis = TestRedis::start();
    // The receiver is down while the first instance runs: its events can
    // only be delivered by the instance started after the kill.
    let hook_port = free_port();
    let hook = format!("http://127.0.0.1:{hook_port}/hook");
    let client = reqwest::Client::new();
    let port = free_port();
    let mut first = start_binary(&redis.url(), port, &hook);
    wait_ready(&client, port).await;
    let mut sids = Vec::new();
    for i in 0..5 {
        sids.push(create_on(&client, port, &format!("k{i}")).await);
    }
    first.kill().unwrap(); // SIGKILL, right after the last 201
    first.wait().unwrap();

    let receiver = Receiver::start_on(
        tokio::net::TcpListener::bind(("127.0.0.1", hook_port))
            .await
            .unwrap(),
        Behaviour::Ok,
    );
    let port = free_port();
    let mut second = start_binary(&redis.url(), port, &hook);
    wait_ready(&client, port).await;
    for i in 5..10 {
        sids.push(create_on(&client, port, &format!("k{i}")).await);
    }
    let delivered = || -> HashSet<String> { receiver.session_ids().into_iter().collect() };
    eventually(Duration::from_secs(60), || async {
        delivered().len() >= 10
    })
    .await;
    assert_eq!(delivered(), sids.iter().cloned().collect::<HashSet<_>>());

    // Killed again mid-stream and restarted: it resumes from its cursor in
    // Redis, with no gap (duplicates only as at-least-once allows).
    second.kill().unwrap();
    second.wait().unwrap();
    let port = free_port();
    let mut third = start_binary(&redis.url(), port, &hook);
    wait_ready(&client, port).await;
    let last = create_on(&client, port, "k10").await;
    eventually(Duration::from_secs(60), || async {
        delivered().contains(&last)
    })
    .await;
    let ids: Vec<String> = receiver
        .bodies()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 11, "every event, each with its own id");
    third.kill().unwrap();
    third.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caep_receivers_get_session_revoked_sets_verifiable_with_the_jwks() {
    let receiver = Receiver::start(Behaviour::Status(202)).await;
    let app = spawn_app_with(&[
        ("CAEP_URLS", &format!("ssf={}", receiver.url)),
        ("ISSUER", "https://sessiongate.example"),
    ])
    .await;
    let s = app.create("cara", "laptop").await;
    assert_eq!(app.logout(&s.token).await.status(), StatusCode::NO_CONTENT);
    eventually(Duration::from_secs(30), || async { receiver.count() >= 1 }).await;
    let (headers, body) = receiver.got.lock().unwrap()[0].clone();
    assert_eq!(headers["content-type"], "application/secevent+jwt");
    let set = String::from_utf8(body).unwrap();

    // Verified by another crate than the signer (jsonwebtoken, not the
    // service's ed25519-dalek code), with the key published in the JWKS.
    let jwks: Value = app
        .request(Method::GET, "/.well-known/jwks.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(&set).unwrap();
    assert_eq!(header.typ.as_deref(), Some("secevent+jwt"));
    let kid = header.kid.unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the SET's kid is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_ed_components(jwk["x"].as_str().unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    validation.set_audience(&[receiver.url.as_str()]);
    validation.set_issuer(&["https://sessiongate.example"]);
    let claims = jsonwebtoken::decode::<Value>(&set, &key, &validation)
        .expect("a valid SET")
        .claims;
    let revoked =
        &claims["events"]["https://schemas.openid.net/secevent/caep/event-type/session-revoked"];
    assert_eq!(revoked["initiating_entity"], "user", "{claims}");
    assert_eq!(revoked["reason_admin"]["en"], "logout");
    assert_eq!(claims["sub_id"]["format"], "complex");
    assert_eq!(claims["sub_id"]["session"]["id"], s.session_id.as_str());
    assert_eq!(claims["sub_id"]["user"]["id"], "cara");
    let event = &all_events(&app, "&type=session.revoked").await[0];
    assert_eq!(claims["jti"], event["id"]);
    // A tampered SET fails the same check.
    let mut parts: Vec<String> = set.split('.').map(str::to_string).collect();
    parts[1] = parts[1].replacen('e', "f", 1);
    assert!(jsonwebtoken::decode::<Value>(&parts.join("."), &key, &validation).is_err());
    // Only revocations are pushed: the create was not.
    assert_eq!(receiver.count(), 1);
}

/// Two instances with the same endpoint: one delivers at a time (the holder
/// of the endpoint's lease), so in steady state every event arrives once,
/// whichever instance made the change. The receiver is slow, so that both
/// instances would be delivering at the same time without the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_deliver_each_event_once_in_steady_state() {
    let receiver = Receiver::start(Behaviour::Slow).await;
    let urls = webhook_settings(&[("r", &receiver.url)]);
    let settings = [
        ("WEBHOOK_URLS", urls.as_str()),
        ("WEBHOOK_SECRET", WEBHOOK_SECRET),
    ];
    let a = spawn_app_with(&settings).await;
    let b = spawn_app_on(&a.redis_url, &settings).await;
    let mut sids = HashSet::new();
    for i in 0..10 {
        let app = if i % 2 == 0 { &a } else { &b };
        sids.insert(app.create(&format!("w{i}"), "d").await.session_id);
    }
    let delivered = || receiver.session_ids();
    eventually(Duration::from_secs(60), || async {
        delivered().len() >= sids.len()
    })
    .await;
    // The endpoint's cursor reaches the last event: its holder is done with
    // every one; a second deliverer would have sent each event again.
    let last = all_events(&a, "").await.last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(60), || async {
        a.redis_cmd(&["HGET", "sg:hook:webhook:r", "cursor"])
            .contains(&last)
    })
    .await;
    let got = delivered();
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), sids);
    assert_eq!(got.len(), sids.len(), "each event once: {got:?}");
}
