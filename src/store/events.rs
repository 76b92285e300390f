//! Lifecycle events in Redis (issue 10): how the scripts write them, and how
//! they are read back.
//!
//! Every script that changes a session or the global state appends its
//! event(s) with `XADD` in the same script (`emit` in `lua/prelude.lua`), so a
//! change Redis acknowledged always has its event, and an event always has
//! its change. On a single Redis (or Sentinel) every event goes to one
//! stream; on a Cluster, a user's events go to the stream of the user's
//! slot and global events to the global stream (see [`super::keys`]).
//! Streams are trimmed to about `events_max_len` entries each (`XADD
//! MAXLEN ~`), so retention is bounded; a consumer slower than that loses
//! the oldest events (the cursor then skips them).
//!
//! An event's id is its position, `<stream index>-<entry id>` (e.g.
//! `0-1764684000123-0`; on a Cluster the index is the slot, 16384 the
//! global stream): unique within a deployment (a key prefix), ordered by
//! time, then stream, then sequence, and usable as a cursor. A revocation
//! also leaves a tombstone hash (when, why, who) for `tombstone_retention`.

use redis::Value;
use serde::Serialize;

use super::{Store, StoreError};
use futures_util::StreamExt;

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

/// Reads one page may take to find enough events a filter keeps.
pub const MAX_SCANS: usize = 50;

/// Events per stream read at a time when many streams are merged (Cluster):
/// keeps one read of every slot's stream bounded.
pub const SWEEP_COUNT: usize = 8;

/// Merging streams of several Cluster nodes, events are taken only up to
/// the lowest of the primaries' clocks (read just before the streams) less
/// this margin: an event appended later gets a later id from its node's
/// clock, so none is skipped unless a node's clock steps back (or a
/// failover promotes a replica whose clock lags) by more than this.
pub const SETTLE_MS: u64 = 500;

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

/// A position in the merged event sequence. Events are ordered by (time
/// ms, stream index, sequence); a cursor means "everything up to and
/// including this position has been consumed". An event's id is its own
/// position: `<stream>-<ms>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub ms: u64,
    pub stream: u32,
    pub seq: u64,
}

impl Cursor {
    /// Before every retained event.
    pub fn start() -> Cursor {
        Cursor {
            ms: 0,
            stream: 0,
            seq: 0,
        }
    }

    /// Just before the first event at or after `ms`.
    pub fn since_ms(ms: i64) -> Cursor {
        if ms <= 0 {
            return Cursor::start();
        }
        Cursor::after_ms(ms as u64 - 1)
    }

    /// After every event of millisecond `ms` and before.
    pub fn after_ms(ms: u64) -> Cursor {
        Cursor {
            ms,
            stream: u32::MAX,
            seq: u64::MAX,
        }
    }

    /// The position of entry `id` (`<ms>-<seq>`) of stream `stream`.
    pub fn of_entry(stream: usize, id: &str) -> Option<Cursor> {
        let (ms, seq) = parse_id(id)?;
        Some(Cursor {
            ms,
            stream: u32::try_from(stream).ok()?,
            seq,
        })
    }

    /// A string that sorts as the cursor does (fixed-width decimals), for
    /// comparing cursors inside Redis (the webhook cursor's save).
    pub fn order_key(&self) -> String {
        format!("{:020}{:010}{:020}", self.ms, self.stream, self.seq)
    }

    /// `<stream>-<ms>-<seq>` (an event's id); a millisecond boundary as the
    /// Unix milliseconds it is before (`since` form); the start as `0`.
    pub fn encode(&self) -> String {
        if *self == Cursor::start() {
            "0".to_string()
        } else if self.stream == u32::MAX && self.seq == u64::MAX {
            (self.ms + 1).to_string()
        } else {
            format!("{}-{}-{}", self.stream, self.ms, self.seq)
        }
    }

    /// An event id, or Unix milliseconds (events at or after it).
    pub fn parse(text: &str) -> Option<Cursor> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return Some(Cursor::since_ms(text.parse::<i64>().ok()?));
        }
        let (stream, id) = text.split_once('-')?;
        let stream = stream.parse::<u32>().ok()?;
        let (ms, seq) = parse_id(id)?;
        Some(Cursor { ms, stream, seq })
    }

    /// The first entry id of stream `index` after this position
    /// (`XRANGE`'s inclusive start).
    fn start_in(&self, index: u32) -> (u64, u64) {
        use std::cmp::Ordering::*;
        match index.cmp(&self.stream) {
            Less => (self.ms.saturating_add(1), 0),
            Equal if self.seq == u64::MAX => (self.ms.saturating_add(1), 0),
            Equal => (self.ms, self.seq + 1),
            Greater => (self.ms, 0),
        }
    }
}

/// `<ms>-<seq>`.
pub fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
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

    /// Up to `limit` events after `cursor` that `filter` keeps, oldest
    /// first, and the cursor after them. Events the filter drops are
    /// consumed too, so paging on never sees them again. A page is short
    /// only when there is nothing more to read now, or after
    /// [`MAX_SCANS`] reads found too few events the filter keeps.
    pub async fn read_events(
        &self,
        cursor: &Cursor,
        filter: &Filter,
        limit: usize,
    ) -> Result<(Vec<Event>, Cursor), StoreError> {
        let mut out = Vec::new();
        let mut at = *cursor;
        for _ in 0..MAX_SCANS {
            let (batch, next, more) = self
                .read_batch(&at, filter.user_id.as_deref(), limit)
                .await?;
            for (pos, event) in batch {
                if out.len() >= limit {
                    return Ok((out, at));
                }
                at = at.max(pos);
                if filter.keeps(&event) {
                    out.push(event);
                }
            }
            at = at.max(next);
            if !more || out.len() >= limit {
                break;
            }
        }
        Ok((out, at))
    }

    /// One read: the events after `cursor` (of one user's stream, or of
    /// every stream), oldest first, the cursor after all of them, and
    /// whether a stream had more than was read.
    ///
    /// One stream (a single Redis, Sentinel, or a user filter: only that
    /// user's stream) is read as it is. A Cluster's streams are merged: every
    /// slot's stream is read (up to [`SWEEP_COUNT`] entries each), and only
    /// events up to the lowest primary clock less [`SETTLE_MS`], and up to
    /// the last entry read of any stream that had more, are taken; the rest
    /// come on a later read. That costs one `XRANGE` per slot per read.
    async fn read_batch(
        &self,
        cursor: &Cursor,
        user: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(Cursor, Event)>, Cursor, bool), StoreError> {
        let keys = &self.keys;
        let indices: Vec<usize> = match user {
            Some(user) => match crate::domain::UserId::parse(user) {
                Ok(u) => vec![keys.user_stream_index(u.tag().as_str())],
                Err(_) => return Ok((Vec::new(), *cursor, false)),
            },
            None => (0..keys.stream_count()).collect(),
        };
        let merged = indices.len() > 1;
        // Read the clocks before the streams: anything appended after this
        // has a later id.
        let mut bound = if merged {
            let low = self.lowest_primary_time_ms().await?;
            Some(Cursor::after_ms(low.saturating_sub(SETTLE_MS)))
        } else {
            None
        };
        let per_stream = if merged {
            limit.min(SWEEP_COUNT)
        } else {
            limit
        };
        let cmds: Vec<(usize, redis::Cmd)> = indices
            .iter()
            .map(|&i| {
                let (ms, seq) = cursor.start_in(i as u32);
                let mut cmd = redis::cmd("XRANGE");
                cmd.arg(keys.stream(i))
                    .arg(format!("{ms}-{seq}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(per_stream);
                (i, cmd)
            })
            .collect();
        let mut replies: Vec<(usize, Result<Vec<Entry>, StoreError>)> =
            futures_util::stream::iter(cmds)
                .map(|(i, cmd)| async move { (i, self.command(cmd).await.and_then(entries)) })
                .buffer_unordered(256)
                .collect()
                .await;
        replies.sort_by_key(|(i, _)| *i);
        let mut all = Vec::new();
        let mut more = false;
        for (i, reply) in replies {
            let found = reply?;
            let full = found.len() >= per_stream;
            let mut last = None;
            for (id, fields) in found {
                let Some(pos) = Cursor::of_entry(i, &id) else {
                    continue;
                };
                last = Some(pos);
                all.push((pos, to_event(pos, &fields)));
            }
            // A stream cut by the count below the bound lowers it (its
            // later entries are unknown); one cut beyond it had every entry
            // up to the bound read already.
            if full
                && let Some(last) = last
                && bound.is_none_or(|b| last < b)
            {
                more = true;
                bound = Some(last);
            }
        }
        if let Some(b) = bound {
            all.retain(|(pos, _)| *pos <= b);
        }
        all.sort_by_key(|(pos, _)| *pos);
        // Everything up to the bound (or the last entry) is read now.
        let last = all.last().map(|(pos, _)| *pos);
        let next = bound.or(last).map_or(*cursor, |n| n.max(*cursor));
        Ok((all, next, more))
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
            event_id: Cursor::of_entry(
                self.keys.user_stream_index(session.tag_str()),
                &get("event"),
            )
            .map(|c| c.encode())
            .unwrap_or_default(),
        }))
    }
}

/// An event from a stream entry.
pub(crate) fn to_event(pos: Cursor, fields: &[(String, String)]) -> Event {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    Event {
        id: pos.encode(),
        version: get("v")
            .and_then(|v| v.parse().ok())
            .unwrap_or(SCHEMA_VERSION),
        time: pos.ms as i64,
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
        let c = Cursor {
            ms: 1764684000123,
            stream: 3,
            seq: 7,
        };
        assert_eq!(c.encode(), "3-1764684000123-7");
        assert_eq!(Cursor::parse(&c.encode()), Some(c));
        assert_eq!(Cursor::parse("10"), Some(Cursor::since_ms(10)));
        assert_eq!(Cursor::since_ms(10).encode(), "10");
        assert_eq!(Cursor::parse("0"), Some(Cursor::start()));
        assert_eq!(Cursor::start().encode(), "0");
        for bad in [
            "",
            "1.0-0",
            "5-0",
            "x-1-2",
            "1-2-x",
            "-1-2",
            "1-2-3-4",
            "99999999999-1-1",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn order_keys_sort_as_cursors_do() {
        let at = |ms, stream, seq| Cursor { ms, stream, seq };
        let mut cursors = vec![
            Cursor::start(),
            at(9, 0, 0),
            Cursor::since_ms(10),
            at(10, 0, 0),
            at(10, 0, 9),
            at(10, 0, 10),
            at(10, 2, 0),
            at(10, 10, 0),
            at(1764684000123, 16384, 7),
            at(u64::MAX, u32::MAX, u64::MAX),
        ];
        let sorted = cursors.clone();
        cursors.reverse();
        cursors.sort_by_key(Cursor::order_key);
        assert_eq!(cursors, sorted);
        assert!(cursors.iter().all(|c| c.order_key().len() == 50));
    }

    #[test]
    fn positions_order_by_time_then_stream_then_sequence() {
        let at = |ms, stream, seq| Cursor { ms, stream, seq };
        let c = at(100, 5, 2);
        // The first entry of each stream still to read after `c`.
        assert_eq!(c.start_in(4), (101, 0));
        assert_eq!(c.start_in(5), (100, 3));
        assert_eq!(c.start_in(6), (100, 0));
        assert_eq!(Cursor::after_ms(100).start_in(0), (101, 0));
        assert_eq!(Cursor::after_ms(100).start_in(u32::MAX), (101, 0));
        assert_eq!(Cursor::start().start_in(0), (0, 1));
        assert!(at(100, 9, 0) < at(101, 0, 0));
        assert!(at(100, 4, 9) < at(100, 5, 0));
        assert!(at(100, 5, 9) < Cursor::after_ms(100));
        assert!(Cursor::since_ms(101) == Cursor::after_ms(100));
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
            Cursor::of_entry(7, "1764684000123-2").unwrap(),
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
        assert_eq!(Cursor::parse(&e.id), Cursor::of_entry(7, "1764684000123-2"));
        assert_eq!(e.time, 1764684000123);
        assert_eq!(e.reason.as_deref(), Some("logout"));
        assert_eq!(e.exp, Some(1764690000));
        let g = to_event(
            Cursor::of_entry(16384, "5-0").unwrap(),
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
