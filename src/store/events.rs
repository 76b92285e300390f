//! Lifecycle events in Redis (issue 10): how the scripts write them, and how
//! they are read back.
//!
//! Every script that changes a session or the global state appends its
//! event(s) with `XADD` in the same script (`emit` in `lua/prelude.lua`), so a
//! change Redis acknowledged always has its event, and an event always has
//! its change. Events of a user go to the stream of the user's shard, which
//! shares the user hash's slot (see [`super::keys`]); global events go to the
//! global stream. Streams are trimmed to about `events_max_len` entries each
//! (`XADD MAXLEN ~`), so retention is bounded; a consumer slower than that
//! loses the oldest events (the cursor then skips them).
//!
//! An event's id is `<stream label>-<stream entry id>` (e.g.
//! `7-1764684000123-0`, `g-1764684000123-0`): unique within a deployment
//! (a key prefix). A revocation also leaves a tombstone hash (when, why, who)
//! for `tombstone_retention`.

use redis::Value;
use serde::Serialize;

use super::keys::{EVENT_SHARDS, GLOBAL_LABEL, shard_label, shard_of};
use super::{Store, StoreError};

/// How the scripts write events.
#[derive(Debug, Clone, Copy)]
pub struct EventConfig {
    pub enabled: bool,
    /// About this many entries per stream are kept (`MAXLEN ~`).
    pub max_len: u64,
    /// How long a tombstone is kept (ms); 0: none are written.
    pub tombstone_ms: u64,
}

impl EventConfig {
    pub fn from_settings(s: &crate::config::Settings) -> EventConfig {
        EventConfig {
            enabled: s.events,
            max_len: s.events_max_len,
            tombstone_ms: s.tombstone_retention.as_millis() as u64,
        }
    }
}

impl Default for EventConfig {
    fn default() -> Self {
        EventConfig {
            enabled: true,
            max_len: 100_000,
            tombstone_ms: 7 * 86_400_000,
        }
    }
}

/// The version of the event schema (the `version` field, `v` in Redis).
pub const SCHEMA_VERSION: u32 = 1;

/// How many streams a cursor has a position for: the shards, then the
/// global stream.
pub const STREAMS: usize = EVENT_SHARDS + 1;

/// One lifecycle event, as delivered (JSON, SSE, webhooks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Event {
    /// Unique per deployment; consumers deduplicate by it (delivery is at
    /// least once).
    pub id: String,
    /// The schema version (1).
    pub version: u32,
    /// When the change happened (Redis's clock), Unix milliseconds.
    pub time: i64,
    /// `session.created`, `session.revoked`, `session.reauthenticated`,
    /// `sessions.logout_all` or `keys.rotated`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    /// For `session.revoked`: `logout`, `logout_other_device`,
    /// `logout_others`, `force_logout_device`, `force_logout_user`,
    /// `admin_revoke`, `replaced_same_device`, `cap_evicted`, `logout_all`,
    /// `idle_expired` or `lifetime_expired`.
    pub reason: Option<String>,
    /// Who made the change: `self` (the token holder), `issuer`,
    /// `issuer:<name>`, `admin`, `admin:<name>`, `operator` (a
    /// `sessiongate` command run against Redis) or `system` (sessiongate
    /// itself: expiry observed, logout-all purge).
    pub actor: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub device_id: Option<String>,
    /// The session token's `exp` (Unix seconds): how long a consumer must
    /// remember a revocation.
    pub exp: Option<i64>,
    /// For `keys.rotated`: the new key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// For `sessions.logout_all`: sessions created at or before it (Unix ms)
    /// are revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<i64>,
}

/// A position in every stream: the last entry id consumed in each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub [(u64, u64); STREAMS]);

impl Cursor {
    /// Before every retained event.
    pub fn start() -> Cursor {
        Cursor([(0, 0); STREAMS])
    }

    /// Just before the first event at or after `ms`.
    pub fn since_ms(ms: i64) -> Cursor {
        if ms <= 0 {
            return Cursor::start();
        }
        Cursor([(ms as u64 - 1, u64::MAX); STREAMS])
    }

    /// `1.<ms>-<seq>.<ms>-<seq>…`, one position per stream.
    pub fn encode(&self) -> String {
        let mut out = String::from("1");
        for (ms, seq) in &self.0 {
            out.push('.');
            out.push_str(&format!("{ms}-{seq}"));
        }
        out
    }

    pub fn parse(text: &str) -> Option<Cursor> {
        let mut parts = text.split('.');
        if parts.next()? != "1" {
            return None;
        }
        let mut out = [(0, 0); STREAMS];
        for slot in out.iter_mut() {
            *slot = parse_id(parts.next()?)?;
        }
        parts.next().is_none().then_some(Cursor(out))
    }
}

/// `<ms>-<seq>`.
pub fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The stream label of a cursor position.
pub fn label(index: usize) -> &'static str {
    if index < EVENT_SHARDS {
        shard_label(index)
    } else {
        GLOBAL_LABEL
    }
}

/// What to keep of the events read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub user_id: Option<String>,
    pub kind: Option<String>,
}

impl Filter {
    fn keeps(&self, e: &Event) -> bool {
        self.user_id
            .as_ref()
            .is_none_or(|u| e.user_id.as_deref() == Some(u))
            && self.kind.as_ref().is_none_or(|k| &e.kind == k)
    }
}

/// A tombstone: how a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub ended_at: i64,
    pub reason: String,
    pub actor: String,
    pub user_id: String,
    pub device_id: String,
    pub exp: i64,
    pub event_id: String,
}

/// An entry of `XRANGE`/`XREADGROUP`: id and field/value pairs.
pub(crate) type Entry = (String, Vec<(String, String)>);

impl Store {
    /// The event context the scripts take after their nonce (see
    /// `lua/prelude.lua`): `tag` is the user's ("" for global changes).
    pub(super) fn event_context(&self, tag: &str, actor: &str, reason: &str) -> String {
        let c = &self.events;
        let tomb = if tag.is_empty() || c.tombstone_ms == 0 {
            String::new()
        } else {
            self.keys.tombstone_base(tag)
        };
        serde_json::json!({
            "s": if c.enabled { "1" } else { "" },
            "a": actor,
            "m": c.max_len.to_string(),
            "t": tomb,
            "r": c.tombstone_ms.to_string(),
            "g": tag,
            "o": reason,
        })
        .to_string()
    }

    pub fn events_enabled(&self) -> bool {
        self.events.enabled
    }

    /// One plain command on this thread's request-path connection, bounded
    /// by the timeout.
    pub(crate) async fn command(&self, cmd: redis::Cmd) -> Result<Value, StoreError> {
        let cmd = &cmd;
        self.conn
            .call(
                |mut conn| async move { cmd.query_async::<Value>(&mut conn).await },
                |_: &Value| true,
            )
            .await
    }

    /// The stream of a cursor position.
    pub fn stream_at(&self, index: usize) -> String {
        if index < EVENT_SHARDS {
            self.keys.shard_stream(index)
        } else {
            self.keys.global_stream().to_string()
        }
    }

    /// Up to `limit` events after `cursor` that `filter` keeps, oldest
    /// first (by time across streams), and the cursor after them. With a
    /// user filter only that user's shard is read. Events the filter drops
    /// are consumed too, so paging on never sees them again.
    pub async fn read_events(
        &self,
        cursor: &Cursor,
        filter: &Filter,
        limit: usize,
    ) -> Result<(Vec<Event>, Cursor), StoreError> {
        let indices: Vec<usize> = match &filter.user_id {
            Some(user) => vec![shard_of(
                crate::domain::UserId::parse(user)
                    .map(|u| u.tag().as_str().to_string())
                    .unwrap_or_default()
                    .as_str(),
            )],
            None => (0..STREAMS).collect(),
        };
        let reads = indices.iter().map(|&i| {
            let (ms, seq) = cursor.0[i];
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(self.stream_at(i))
                .arg(format!("({ms}-{seq}"))
                .arg("+")
                .arg("COUNT")
                .arg(limit);
            async move { self.command(cmd).await.and_then(entries) }
        });
        let replies = futures_util::future::join_all(reads).await;
        let mut all = Vec::new();
        for (&i, reply) in indices.iter().zip(replies) {
            for (id, fields) in reply? {
                let Some(pos) = parse_id(&id) else { continue };
                all.push((pos, i, to_event(label(i), &id, &fields)));
            }
        }
        all.sort_by_key(|(pos, i, _)| (*pos, *i));
        let mut next = cursor.clone();
        let mut out = Vec::new();
        for (pos, i, event) in all {
            if out.len() >= limit {
                break;
            }
            next.0[i] = pos;
            if filter.keeps(&event) {
                out.push(event);
            }
        }
        Ok((out, next))
    }

    /// The tombstone of a session, if one is kept.
    pub async fn tombstone(
        &self,
        session: &crate::domain::SessionId,
    ) -> Result<Option<Tombstone>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.keys.tombstone(session));
        let pairs = pairs(self.command(cmd).await?)?;
        if pairs.is_empty() {
            return Ok(None);
        }
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        Ok(Some(Tombstone {
            ended_at: get("ended_at").parse().unwrap_or(0),
            reason: get("reason"),
            actor: get("actor"),
            user_id: get("user_id"),
            device_id: get("device_id"),
            exp: get("exp").parse().unwrap_or(0),
            event_id: {
                let shard = shard_label(shard_of(session.tag_str()));
                format!("{shard}-{}", get("event"))
            },
        }))
    }
}

/// An event from a stream entry.
pub(crate) fn to_event(label: &str, id: &str, fields: &[(String, String)]) -> Event {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let time = parse_id(id).map(|(ms, _)| ms as i64).unwrap_or(0);
    Event {
        id: format!("{label}-{id}"),
        version: get("v")
            .and_then(|v| v.parse().ok())
            .unwrap_or(SCHEMA_VERSION),
        time,
        kind: get("type").unwrap_or_default().to_string(),
        reason: get("reason").map(str::to_string),
        actor: get("actor").unwrap_or_default().to_string(),
        user_id: get("user_id").map(str::to_string),
        session_id: get("session_id").map(str::to_string),
        device_id: get("device_id").map(str::to_string),
        exp: get("exp").and_then(|v| v.parse().ok()).filter(|e| *e > 0),
        kid: get("kid").map(str::to_string),
        cutoff: get("cutoff").and_then(|v| v.parse().ok()),
    }
}

fn string(v: Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b)
            .map_err(|_| StoreError::Protocol("a stream value is not UTF-8".into())),
        Value::SimpleString(s) => Ok(s),
        other => Err(StoreError::Protocol(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

/// Field/value pairs from a flat array or a map.
pub(crate) fn pairs(v: Value) -> Result<Vec<(String, String)>, StoreError> {
    match v {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((string(k)?, string(v)?));
            }
            Ok(out)
        }
        Value::Map(items) => items
            .into_iter()
            .map(|(k, v)| Ok((string(k)?, string(v)?)))
            .collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::Protocol(format!(
            "expected field/value pairs, got {other:?}"
        ))),
    }
}

/// The entries of an `XRANGE` reply.
pub(crate) fn entries(v: Value) -> Result<Vec<Entry>, StoreError> {
    let items = match v {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => {
            return Err(StoreError::Protocol(format!(
                "expected stream entries, got {other:?}"
            )));
        }
    };
    items
        .into_iter()
        .map(|entry| match entry {
            Value::Array(parts) if parts.len() == 2 => {
                let mut it = parts.into_iter();
                let id = string(it.next().unwrap_or(Value::Nil))?;
                let fields = pairs(it.next().unwrap_or(Value::Nil))?;
                Ok((id, fields))
            }
            other => Err(StoreError::Protocol(format!(
                "expected a stream entry, got {other:?}"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let mut c = Cursor::start();
        c.0[3] = (1764684000123, 7);
        c.0[STREAMS - 1] = (5, 0);
        assert_eq!(Cursor::parse(&c.encode()), Some(c.clone()));
        assert_eq!(
            Cursor::parse(&Cursor::since_ms(10).encode()),
            Some(Cursor::since_ms(10))
        );
        assert_eq!(Cursor::parse(""), None);
        assert_eq!(Cursor::parse("2.0-0"), None);
        let short = c.encode().rsplit_once('.').unwrap().0.to_string();
        assert_eq!(Cursor::parse(&short), None);
        assert_eq!(Cursor::parse(&format!("{}.0-0", c.encode())), None);
        assert_eq!(Cursor::parse(&c.encode().replace("-7", "-x")), None);
    }

    #[test]
    fn an_entry_becomes_an_event_with_empty_fields_as_null() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let e = to_event(
            "7",
            "1764684000123-2",
            &f(&[
                ("v", "1"),
                ("type", "session.revoked"),
                ("reason", "logout"),
                ("actor", "self"),
                ("user_id", "alice"),
                ("session_id", "sid"),
                ("device_id", "d"),
                ("exp", "1764690000"),
            ]),
        );
        assert_eq!(e.id, "7-1764684000123-2");
        assert_eq!(e.time, 1764684000123);
        assert_eq!(e.reason.as_deref(), Some("logout"));
        assert_eq!(e.exp, Some(1764690000));
        let g = to_event(
            "g",
            "5-0",
            &f(&[
                ("type", "keys.rotated"),
                ("reason", ""),
                ("exp", "0"),
                ("kid", "k1"),
            ]),
        );
        assert_eq!(g.reason, None);
        assert_eq!(g.exp, None);
        assert_eq!(g.user_id, None);
        assert_eq!(g.kid.as_deref(), Some("k1"));
    }
}
