//! The Redis key schema, in one place.
//!
//! | key / channel              | type    | holds                                    | TTL                     |
//! |----------------------------|---------|------------------------------------------|-------------------------|
//! | `<prefix>u{<user tag>}`    | hash    | `!u` = user id; one field per session    | latest session deadline |
//! | `<prefix>global`           | hash    | `cutoff` (ms), `epoch`, `ring` (JSON)    | none (small, global)    |
//! | `<prefix>events`           | channel | "state changed": re-read `global`        | —                       |
//!
//! The user tag is base64url(SHA-256(user id)[..16]), so a user id never
//! appears in a key and no byte of it can act as a hash tag or a glob. The
//! braces make every key of one user share a Redis Cluster slot.

use crate::domain::UserTag;

#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
    global: String,
    events: String,
}

impl KeySchema {
    pub fn new(prefix: &str) -> Self {
        KeySchema {
            prefix: prefix.to_string(),
            global: format!("{prefix}global"),
            events: format!("{prefix}events"),
        }
    }

    /// The hash holding every session of one user.
    pub fn user(&self, tag: &UserTag) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 25);
        key.push_str(&self.prefix);
        key.push_str("u{");
        key.push_str(tag.as_str());
        key.push('}');
        key
    }

    /// The hash of the user a session id belongs to (its tag is inside it).
    pub fn user_of(&self, session: &crate::domain::SessionId) -> String {
        let tag = session.tag_str();
        let mut key = String::with_capacity(self.prefix.len() + tag.len() + 3);
        key.push_str(&self.prefix);
        key.push_str("u{");
        key.push_str(tag);
        key.push('}');
        key
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
        let k = keys.user(&UserId::parse("a*{b}").unwrap().tag());
        assert!(k.starts_with("sg:u{") && k.ends_with('}'));
        assert!(!k.contains('*'));
        assert_eq!(k.len(), "sg:u{}".len() + 22);
        assert_ne!(
            keys.user(&UserId::parse("a*").unwrap().tag()),
            keys.user(&UserId::parse("ab").unwrap().tag())
        );
    }

    #[test]
    fn scan_pattern_escapes_the_prefix() {
        assert_eq!(KeySchema::new("sg:").user_pattern(), "sg:u\\{*");
        assert_eq!(KeySchema::new("a*[").user_pattern(), "a\\*\\[u\\{*");
    }
}
