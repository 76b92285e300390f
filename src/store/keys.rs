//! The Redis key schema, in one place.
//!
//! | key / channel                    | type    | holds                                    | TTL                     |
//! |----------------------------------|---------|------------------------------------------|-------------------------|
//! | `<prefix>u{<shard>}<user tag>`   | hash    | `!u` = user id; one field per session    | latest session deadline |
//! | `<prefix>ev{<shard>}`            | stream  | lifecycle events of the shard's users    | trimmed (`events_max_len`) |
//! | `<prefix>t{<shard>}<session id>` | hash    | tombstone of an ended session            | `tombstone_retention`   |
//! | `<prefix>global`                 | hash    | `cutoff` (ms), `epoch`, `ring` (JSON)    | none (small, global)    |
//! | `{<prefix>global}:ev`            | stream  | global events (logout-all, key rotation) | trimmed (`events_max_len`) |
//! | `<prefix>dead`                   | stream  | webhook deliveries given up on           | trimmed (10 000)        |
//! | `<prefix>events`                 | channel | "state changed": re-read `global`        | —                       |
//!
//! The user tag is base64url(SHA-256(user id)[..16]), so a user id never
//! appears in a key and no byte of it can act as a hash tag or a glob.
//!
//! **Shards (issue 10).** A change and its event are written by one script,
//! so in Redis Cluster the user's hash and the stream the event goes to must
//! share a slot. Users are therefore spread over [`EVENT_SHARDS`] buckets
//! (the shard is the top 4 bits of the tag's first base64url character, one
//! hex digit), and the bucket, not the whole tag, is the hash tag of every
//! key of a user: `u{7}<tag>`, `ev{7}`, `t{7}<sid>` share slot
//! `CRC16("7")`. A consumer reads 16 user streams plus the global one; a
//! Cluster spreads users over 16 slots (so over at most 16 masters).
//! The global stream's hash tag is the whole global key (which has no
//! braces: `key_prefix` may not contain any), so it shares that key's slot.
//!
//! Before this schema the user hash was `<prefix>u{<user tag>}`; records
//! under that key are not read any more (their users sign in again once:
//! fail closed, never a session kept alive by mistake).

use crate::domain::UserTag;

/// How many user buckets (and user event streams) there are.
pub const EVENT_SHARDS: usize = 16;

const SHARD_LABELS: [&str; EVENT_SHARDS] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "b", "c", "d", "e", "f",
];

/// The label of the global stream in event ids and cursors.
pub const GLOBAL_LABEL: &str = "g";

/// The shard of a user tag (or of a session id, which starts with it).
pub fn shard_of(tag: &str) -> usize {
    let c = tag.as_bytes().first().copied().unwrap_or(b'A');
    let index = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    (index >> 2) as usize
}

/// The label ("0".."f") of a shard.
pub fn shard_label(shard: usize) -> &'static str {
    SHARD_LABELS[shard % EVENT_SHARDS]
}

#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
    global: String,
    events: String,
    global_stream: String,
    dead_letters: String,
}

impl KeySchema {
    pub fn new(prefix: &str) -> Self {
        KeySchema {
            prefix: prefix.to_string(),
            global: format!("{prefix}global"),
            events: format!("{prefix}events"),
            global_stream: format!("{{{prefix}global}}:ev"),
            dead_letters: format!("{prefix}dead"),
        }
    }

    fn user_key(&self, tag: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + tag.len() + 4);
        key.push_str(&self.prefix);
        key.push_str("u{");
        key.push_str(shard_label(shard_of(tag)));
        key.push('}');
        key.push_str(tag);
        key
    }

    /// The hash holding every session of one user.
    pub fn user(&self, tag: &UserTag) -> String {
        self.user_key(tag.as_str())
    }

    /// The hash of the user a session id belongs to (its tag is inside it).
    pub fn user_of(&self, session: &crate::domain::SessionId) -> String {
        self.user_key(session.tag_str())
    }

    /// The user tag inside a user hash's key (for keys found by `SCAN`).
    pub fn tag_of_user_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix("u{")?;
        let (_, tag) = rest.split_once('}')?;
        Some(tag)
    }

    /// The event stream of one shard.
    pub fn shard_stream(&self, shard: usize) -> String {
        format!("{}ev{{{}}}", self.prefix, shard_label(shard))
    }

    /// The event stream a user's changes are written to.
    pub fn user_stream(&self, tag: &str) -> String {
        self.shard_stream(shard_of(tag))
    }

    /// The start of a user's tombstone keys (the session id follows).
    pub fn tombstone_base(&self, tag: &str) -> String {
        format!("{}t{{{}}}", self.prefix, shard_label(shard_of(tag)))
    }

    /// The tombstone of one session.
    pub fn tombstone(&self, session: &crate::domain::SessionId) -> String {
        let mut key = self.tombstone_base(session.tag_str());
        key.push_str(session.as_str());
        key
    }

    /// The stream of global events; shares the global hash's slot.
    pub fn global_stream(&self) -> &str {
        &self.global_stream
    }

    /// The webhook dead-letter stream.
    pub fn dead_letters(&self) -> &str {
        &self.dead_letters
    }

    /// Every event stream with its label, shards first, then the global one.
    pub fn all_streams(&self) -> Vec<(&'static str, String)> {
        (0..EVENT_SHARDS)
            .map(|s| (shard_label(s), self.shard_stream(s)))
            .chain(std::iter::once((GLOBAL_LABEL, self.global_stream.clone())))
            .collect()
    }

    /// `SCAN MATCH` pattern for every user hash. Built from the prefix only
    /// (glob characters in it escaped), never from a user id.
    pub fn user_pattern(&self) -> String {
        let mut pattern = String::new();
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("u\\{*");
        pattern
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn global(&self) -> &str {
        &self.global
    }

    pub fn events(&self) -> &str {
        &self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UserId;

    #[test]
    fn user_keys_hash_the_id_and_share_a_slot_tag() {
        let keys = KeySchema::new("sg:");
        let tag = UserId::parse("a*{b}").unwrap().tag();
        let k = keys.user(&tag);
        assert!(k.starts_with("sg:u{"));
        assert!(!k.contains('*'));
        assert_eq!(k.len(), "sg:u{x}".len() + 22);
        assert_eq!(keys.tag_of_user_key(&k), Some(tag.as_str()));
        assert_ne!(
            keys.user(&UserId::parse("a*").unwrap().tag()),
            keys.user(&UserId::parse("ab").unwrap().tag())
        );
    }

    /// CRC16 (XMODEM), as Redis Cluster hashes keys.
    fn crc16(data: &[u8]) -> u16 {
        let mut crc: u16 = 0;
        for &b in data {
            crc ^= (b as u16) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    /// The Redis Cluster slot of a key (hash tag rules included).
    fn slot(key: &str) -> u16 {
        let b = key.as_bytes();
        let hashed = match b.iter().position(|&c| c == b'{') {
            Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
                Some(0) | None => b,
                Some(len) => &b[open + 1..open + 1 + len],
            },
            None => b,
        };
        crc16(hashed) % 16384
    }

    #[test]
    fn a_users_hash_stream_and_tombstones_share_a_slot() {
        let keys = KeySchema::new("sg:");
        let mut shards = std::collections::HashSet::new();
        for i in 0..200 {
            let user = UserId::parse(&format!("user-{i}")).unwrap();
            let tag = user.tag();
            let sid = crate::domain::SessionId::generate(&tag);
            let s = slot(&keys.user(&tag));
            assert_eq!(s, slot(&keys.user_stream(tag.as_str())), "user {i}");
            assert_eq!(s, slot(&keys.tombstone(&sid)), "user {i}");
            assert_eq!(s, slot(&keys.user_of(&sid)), "user {i}");
            shards.insert(shard_of(tag.as_str()));
        }
        assert_eq!(shards.len(), EVENT_SHARDS, "users spread over every shard");
        assert_eq!(slot(keys.global()), slot(keys.global_stream()));
        assert_ne!(keys.global_stream(), keys.global());
    }

    #[test]
    fn scan_pattern_escapes_the_prefix() {
        assert_eq!(KeySchema::new("sg:").user_pattern(), "sg:u\\{*");
        assert_eq!(KeySchema::new("a*[").user_pattern(), "a\\*\\[u\\{*");
    }
}
