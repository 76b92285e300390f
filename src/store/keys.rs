//! The Redis key schema, in one place.
//!
//! | key / channel                      | type    | holds                                         | TTL                        |
//! |------------------------------------|---------|-----------------------------------------------|----------------------------|
//! | `<prefix>u{<user tag>}`            | hash    | `!u` = user id; one field per session         | latest session deadline    |
//! | `<prefix>t{<user tag>}<session id>`| hash    | tombstone of an ended session                 | `tombstone_retention`      |
//! | `<prefix>ev`                       | stream  | every lifecycle event (one Redis, Sentinel)   | trimmed (`events_max_len`) |
//! | `<prefix>ev{<slot tag>}`           | stream  | Cluster: the events of one slot's users       | trimmed (`events_max_len`) |
//! | `{<prefix>global}:ev`              | stream  | Cluster: global events (logout-all, rotation) | trimmed (`events_max_len`) |
//! | `<prefix>global`                   | hash    | `cutoff` (ms), `epoch`, `ring` (JSON)         | none (small, global)       |
//! | `<prefix>hook:<endpoint>`          | hash    | a webhook endpoint's cursor and lease         | none                       |
//! | `<prefix>dead`                     | stream  | webhook deliveries given up on                | trimmed (10 000)           |
//! | `<prefix>events`                   | channel | "state changed": re-read `global`             | —                          |
//!
//! The user tag is base64url(SHA-256(user id)[..16]), so a user id never
//! appears in a key and no byte of it can act as a hash tag or a glob. The
//! braces make every key of one user share a Redis Cluster slot.
//!
//! **Event streams (issue 10).** A change and its event are written by one
//! script, so in Redis Cluster the user's hash and the stream its event
//! goes to must share a slot. On a single Redis (or Sentinel) there is one
//! stream for everything. On a Cluster there is one stream per slot: the
//! stream of slot `s` is `ev{<slot tag of s>}`, where the slot tag is the
//! first string in the sequence `0`, `1`, … (base 36) whose CRC16 lands in
//! `s` ([`slot_tag`]). So the user keys keep the schema they had before
//! events (no user is signed out by the upgrade), users spread over all
//! 16 384 slots as before, and a reshard moves a slot's stream with its
//! users. The global stream's hash tag is the whole global key (which has
//! no braces: `key_prefix` may not contain any), so it shares that key's
//! slot. Readers merge the streams (see `store::events`).

use std::sync::OnceLock;

use crate::domain::UserTag;

/// Redis Cluster's slot count.
pub const SLOTS: usize = 16_384;

/// How the event streams are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamLayout {
    /// One stream (`<prefix>ev`) for every event: a single Redis, Sentinel.
    Single,
    /// One stream per Cluster slot, plus the global stream.
    PerSlot,
}

/// CRC16 (XMODEM), as Redis Cluster hashes keys.
pub fn crc16(data: &[u8]) -> u16 {
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
pub fn slot_of_key(key: &[u8]) -> usize {
    let hashed = match key.iter().position(|&c| c == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&c| c == b'}') {
            Some(0) | None => key,
            Some(len) => &key[open + 1..open + 1 + len],
        },
        None => key,
    };
    crc16(hashed) as usize % SLOTS
}

/// The slot of a user tag (the hash tag of every key of that user).
pub fn slot_of_tag(tag: &str) -> usize {
    crc16(tag.as_bytes()) as usize % SLOTS
}

/// The shortest base-36 string, first in counting order, that hashes to
/// `slot`: the hash tag of that slot's event stream. Deterministic, so
/// every instance names the same streams.
pub fn slot_tag(slot: usize) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; SLOTS];
        let mut left = SLOTS;
        let mut n: u64 = 0;
        while left > 0 {
            let candidate = base36(n);
            let s = slot_of_tag(&candidate);
            if tags[s].is_none() {
                tags[s] = Some(candidate);
                left -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(|t| t.unwrap_or_default()).collect()
    });
    &tags[slot % SLOTS]
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
    global: String,
    events: String,
    layout: StreamLayout,
    single_stream: String,
    global_stream: String,
    dead_letters: String,
}

impl KeySchema {
    pub fn new(prefix: &str) -> Self {
        KeySchema {
            prefix: prefix.to_string(),
            global: format!("{prefix}global"),
            events: format!("{prefix}events"),
            layout: StreamLayout::Single,
            single_stream: format!("{prefix}ev"),
            global_stream: format!("{{{prefix}global}}:ev"),
            dead_letters: format!("{prefix}dead"),
        }
    }

    /// The same schema with the given stream layout.
    pub fn with_layout(mut self, layout: StreamLayout) -> Self {
        self.layout = layout;
        self
    }

    pub fn layout(&self) -> StreamLayout {
        self.layout
    }

    /// The hash holding every session of one user.
    pub fn user(&self, tag: &UserTag) -> String {
        self.user_key(tag.as_str())
    }

    /// The hash of the user a session id belongs to (its tag is inside it).
    pub fn user_of(&self, session: &crate::domain::SessionId) -> String {
        self.user_key(session.tag_str())
    }

    fn user_key(&self, tag: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + tag.len() + 3);
        key.push_str(&self.prefix);
        key.push_str("u{");
        key.push_str(tag);
        key.push('}');
        key
    }

    /// The user tag inside a user hash's key (for keys found by `SCAN`).
    pub fn tag_of_user_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())?
            .strip_prefix("u{")?
            .strip_suffix('}')
    }

    /// How many event streams there are: 1, or every slot's plus the global
    /// one. A stream's index orders events of the same millisecond.
    pub fn stream_count(&self) -> usize {
        match self.layout {
            StreamLayout::Single => 1,
            StreamLayout::PerSlot => SLOTS + 1,
        }
    }

    /// The index of the global stream.
    pub fn global_stream_index(&self) -> usize {
        self.stream_count() - 1
    }

    /// The stream with this index.
    pub fn stream(&self, index: usize) -> String {
        match self.layout {
            StreamLayout::Single => self.single_stream.clone(),
            StreamLayout::PerSlot if index >= SLOTS => self.global_stream.clone(),
            StreamLayout::PerSlot => format!("{}ev{{{}}}", self.prefix, slot_tag(index)),
        }
    }

    /// The index of the stream a user's events go to.
    pub fn user_stream_index(&self, tag: &str) -> usize {
        match self.layout {
            StreamLayout::Single => 0,
            StreamLayout::PerSlot => slot_of_tag(tag),
        }
    }

    /// The stream a user's changes are written to (shares the user's slot).
    pub fn user_stream(&self, tag: &str) -> String {
        self.stream(self.user_stream_index(tag))
    }

    /// The stream global events are written to (shares the global hash's
    /// slot).
    pub fn global_stream(&self) -> String {
        self.stream(self.global_stream_index())
    }

    /// The start of a user's tombstone keys (the session id follows).
    pub fn tombstone_base(&self, tag: &str) -> String {
        format!("{}t{{{}}}", self.prefix, tag)
    }

    /// The tombstone of one session.
    pub fn tombstone(&self, session: &crate::domain::SessionId) -> String {
        let mut key = self.tombstone_base(session.tag_str());
        key.push_str(session.as_str());
        key
    }

    /// A webhook endpoint's cursor and lease.
    pub fn hook(&self, endpoint: &str) -> String {
        format!("{}hook:{endpoint}", self.prefix)
    }

    /// The webhook dead-letter stream.
    pub fn dead_letters(&self) -> &str {
        &self.dead_letters
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
        assert!(k.starts_with("sg:u{") && k.ends_with('}'));
        assert!(!k.contains('*'));
        assert_eq!(k.len(), "sg:u{}".len() + 22);
        assert_eq!(keys.tag_of_user_key(&k), Some(tag.as_str()));
        assert_ne!(
            keys.user(&UserId::parse("a*").unwrap().tag()),
            keys.user(&UserId::parse("ab").unwrap().tag())
        );
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Values of `CLUSTER KEYSLOT` (Redis documentation and redis-cli).
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot_of_key(b"somekey"), 11058);
        assert_eq!(slot_of_key(b"foo{hash_tag}"), 2515);
        assert_eq!(slot_of_key(b"foo"), 12182);
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(slot_of_key(b"{}foo"), crc16(b"{}foo") as usize % SLOTS);
    }

    #[test]
    fn every_slot_has_a_short_stream_tag_of_its_own() {
        let mut seen = std::collections::HashSet::new();
        for s in 0..SLOTS {
            let tag = slot_tag(s);
            assert_eq!(slot_of_tag(tag), s, "slot {s}");
            assert!(tag.len() <= 4 && !tag.contains(['{', '}']), "{tag}");
            assert!(seen.insert(tag));
        }
    }

    #[test]
    fn a_users_hash_stream_and_tombstones_share_a_slot() {
        let keys = KeySchema::new("sg:").with_layout(StreamLayout::PerSlot);
        let mut slots = std::collections::HashSet::new();
        for i in 0..2000 {
            let user = UserId::parse(&format!("user-{i}")).unwrap();
            let tag = user.tag();
            let sid = crate::domain::SessionId::generate(&tag);
            let s = slot_of_key(keys.user(&tag).as_bytes());
            assert_eq!(s, slot_of_key(keys.user_stream(tag.as_str()).as_bytes()));
            assert_eq!(s, slot_of_key(keys.tombstone(&sid).as_bytes()));
            assert_eq!(s, slot_of_key(keys.user_of(&sid).as_bytes()));
            assert_eq!(keys.user_stream_index(tag.as_str()), s);
            slots.insert(s);
        }
        // Users spread over the slots as they did before events.
        assert!(slots.len() > 1800, "{}", slots.len());
        assert_eq!(
            slot_of_key(keys.global().as_bytes()),
            slot_of_key(keys.global_stream().as_bytes())
        );
        assert_eq!(keys.stream_count(), SLOTS + 1);
        assert_ne!(keys.global_stream(), keys.global());
        let single = KeySchema::new("sg:");
        assert_eq!(single.stream_count(), 1);
        assert_eq!(single.user_stream("abc"), "sg:ev");
        assert_eq!(single.global_stream(), "sg:ev");
    }

    #[test]
    fn scan_pattern_escapes_the_prefix() {
        assert_eq!(KeySchema::new("sg:").user_pattern(), "sg:u\\{*");
        assert_eq!(KeySchema::new("a*[").user_pattern(), "a\\*\\[u\\{*");
    }
}
