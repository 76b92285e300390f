//! Identifiers and inputs, parsed and validated once at the edge.
//!
//! A `SessionId` is `<user tag><random>`: 22 base64url characters of
//! SHA-256(user id) (the user's Redis hash tag) followed by 22 characters of
//! 128 bits from the OS random generator. The tag lets an admin revoke a
//! session by id alone with one single-slot call, with no global index.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Longest user id, device id or metadata key, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most metadata entries per session.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Largest metadata object, serialized, in bytes.
pub const MAX_METADATA_BYTES: usize = 4096;

const TAG_CHARS: usize = 22;
/// A session id's length: the user tag, then 16 random bytes in base64.
pub const SESSION_ID_CHARS: usize = 2 * TAG_CHARS;

/// Why an input was refused; the text is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

fn check_id(what: &str, value: &str) -> Result<(), InvalidInput> {
    if value.is_empty() {
        return Err(InvalidInput(format!("{what} must not be empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(InvalidInput(format!(
            "{what} must be at most {MAX_ID_BYTES} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidInput(format!(
            "{what} must not contain control characters"
        )));
    }
    // Gateways and apps trim header values: " alice" must not read as "alice".
    if value.starts_with(char::is_whitespace) || value.ends_with(char::is_whitespace) {
        return Err(InvalidInput(format!(
            "{what} must not start or end with white space"
        )));
    }
    Ok(())
}

/// The opaque user id given by the login backend (any UTF-8, 1..=128 bytes,
/// no control characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        check_id("user_id", value)?;
        Ok(UserId(value.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The user's tag: base64url of the first 16 bytes of SHA-256(user id).
    /// Hashing makes every byte of a user id safe in a key (no `{`, `*`…).
    pub fn tag(&self) -> UserTag {
        let digest = Sha256::digest(self.0.as_bytes());
        UserTag(URL_SAFE_NO_PAD.encode(&digest[..16]))
    }
}

/// The per-user hash tag (see [`UserId::tag`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserTag(String);

impl UserTag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A device id chosen by the login backend; defaults to a random one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        check_id("device_id", value)?;
        Ok(DeviceId(value.to_string()))
    }
    pub fn random() -> Self {
        DeviceId(uuid::Uuid::new_v4().to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A session id: user tag + 128 random bits, 44 base64url characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A new id for a session of `user`.
    pub fn generate(user: &UserTag) -> Self {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).expect("the OS random generator is available");
        SessionId(format!("{}{}", user.0, URL_SAFE_NO_PAD.encode(random)))
    }

    /// Parses an id given by a caller; only the shape is checked here.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let ok = value.len() == 2 * TAG_CHARS
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && is_canonical_b64(&value[..TAG_CHARS])
            && is_canonical_b64(&value[TAG_CHARS..]);
        if ok {
            Ok(SessionId(value.to_string()))
        } else {
            Err(InvalidInput("session_id is malformed".into()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The user tag part, borrowed.
    pub fn tag_str(&self) -> &str {
        &self.0[..TAG_CHARS]
    }
    /// The tag of the user this session belongs to.
    pub fn user_tag(&self) -> UserTag {
        UserTag(self.0[..TAG_CHARS].to_string())
    }
    /// The random part: the session's field in its user's hash.
    pub fn field(&self) -> &str {
        &self.0[TAG_CHARS..]
    }
    pub fn belongs_to(&self, user: &UserTag) -> bool {
        self.0[..TAG_CHARS] == user.0
    }
}

fn is_canonical_b64(s: &str) -> bool {
    URL_SAFE_NO_PAD
        .decode(s)
        .map(|bytes| bytes.len() == 16)
        .unwrap_or(false)
}

/// Validated free-form metadata, kept as its compact JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata(String);

impl Metadata {
    pub fn parse(value: Option<&Map<String, Value>>) -> Result<Self, InvalidInput> {
        let Some(map) = value else {
            return Ok(Metadata::default());
        };
        if map.len() > MAX_METADATA_ENTRIES {
            return Err(InvalidInput(format!(
                "metadata must have at most {MAX_METADATA_ENTRIES} entries"
            )));
        }
        for key in map.keys() {
            check_id("metadata key", key)?;
        }
        if map.is_empty() {
            return Ok(Metadata::default());
        }
        let text = serde_json::to_string(map).expect("a JSON map serializes");
        if text.len() > MAX_METADATA_BYTES {
            return Err(InvalidInput(format!(
                "metadata must be at most {MAX_METADATA_BYTES} bytes as JSON"
            )));
        }
        Ok(Metadata(text))
    }

    /// The stored form: `""` for none, else compact JSON.
    pub fn as_stored(&self) -> &str {
        &self.0
    }

    /// Turns the stored form back into a JSON object.
    pub fn to_json(stored: &str) -> Value {
        if stored.is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_str(stored).unwrap_or_else(|_| Value::Object(Map::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_long_and_control_characters() {
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse(&"a".repeat(129)).is_err());
        assert!(UserId::parse(&"a".repeat(128)).is_ok());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse("a\0b").is_err());
        assert!(UserId::parse("a\u{85}b").is_err());
        assert!(UserId::parse("{weird}*:ü ser").is_ok());
        assert!(DeviceId::parse("\r").is_err());
        assert!(UserId::parse(" alice").is_err());
        assert!(UserId::parse("alice ").is_err());
        assert!(UserId::parse("\u{a0}alice").is_err());
        assert!(UserId::parse("al ice").is_ok());
    }

    #[test]
    fn session_ids_carry_the_user_tag_and_parse_back() {
        let user = UserId::parse("alice{*}").unwrap();
        let sid = SessionId::generate(&user.tag());
        assert_eq!(sid.as_str().len(), 44);
        assert!(sid.belongs_to(&user.tag()));
        assert!(!sid.belongs_to(&UserId::parse("alice").unwrap().tag()));
        assert_eq!(SessionId::parse(sid.as_str()).unwrap(), sid);
        assert_eq!(sid.field(), &sid.as_str()[22..]);
        assert_ne!(SessionId::generate(&user.tag()), sid);
    }

    #[test]
    fn malformed_session_ids_are_refused() {
        let good = SessionId::generate(&UserId::parse("u").unwrap().tag());
        let s = good.as_str();
        assert!(SessionId::parse(&s[..43]).is_err());
        assert!(SessionId::parse(&format!("{s}A")).is_err());
        assert!(SessionId::parse(&s.replace(&s[..1], "*")).is_err());
        assert!(SessionId::parse("../../etc/passwd").is_err());
        // a non-canonical last character (bits past 128 set)
        let mut bad = s.to_string();
        bad.replace_range(43.., "B");
        assert!(SessionId::parse(&bad).is_err() || bad == s);
    }

    #[test]
    fn metadata_limits() {
        let mut m = Map::new();
        for i in 0..17 {
            m.insert(format!("k{i}"), Value::from(i));
        }
        assert!(Metadata::parse(Some(&m)).is_err());
        let mut m = Map::new();
        m.insert("ua".into(), Value::from("x".repeat(5000)));
        assert!(Metadata::parse(Some(&m)).is_err());
        let mut m = Map::new();
        m.insert("ip".into(), Value::from("10.0.0.1"));
        let md = Metadata::parse(Some(&m)).unwrap();
        assert_eq!(Metadata::to_json(md.as_stored())["ip"], "10.0.0.1");
        assert_eq!(Metadata::parse(None).unwrap().as_stored(), "");
    }
}

/// Accessors and boundaries the first tests left open (found by
/// `scripts/mutants`; see scripts/mutants.md).
#[cfg(test)]
mod mutation_tests {
    use super::*;

    #[test]
    fn ids_keep_their_text_and_the_tag_is_the_hash_prefix() {
        let user = UserId::parse("alice").unwrap();
        assert_eq!(user.as_str(), "alice");
        // base64url(SHA-256("alice")[..16]), computed independently.
        assert_eq!(user.tag().as_str(), "K9gGyX8OAK8aH8Myj6djqQ");
        assert_eq!(DeviceId::parse("laptop").unwrap().as_str(), "laptop");
        let random = DeviceId::random();
        assert!(uuid::Uuid::parse_str(random.as_str()).is_ok());
        assert_ne!(DeviceId::random(), random);
        let sid = SessionId::generate(&user.tag());
        assert_eq!(sid.tag_str(), "K9gGyX8OAK8aH8Myj6djqQ");
        assert_eq!(sid.user_tag(), user.tag());
    }

    const TAG_WITH_DASH_AND_UNDERSCORE: &str = "-_AAAAAAAAAAAAAAAAAAAA";
    const FIELD_WITH_UNDERSCORE_AND_DASH: &str = "_-AAAAAAAAAAAAAAAAAAAw";
    const CANONICAL: &str = "AAAAAAAAAAAAAAAAAAAAAA";
    /// 22 base64url characters whose last one sets bits past the 128.
    const NON_CANONICAL: &str = "AAAAAAAAAAAAAAAAAAAAAB";

    #[test]
    fn session_ids_may_use_the_whole_base64url_alphabet() {
        let id = format!("{TAG_WITH_DASH_AND_UNDERSCORE}{FIELD_WITH_UNDERSCORE_AND_DASH}");
        let sid = SessionId::parse(&id).unwrap();
        assert_eq!(sid.as_str(), id);
        assert_eq!(sid.tag_str(), TAG_WITH_DASH_AND_UNDERSCORE);
        assert_eq!(sid.field(), FIELD_WITH_UNDERSCORE_AND_DASH);
    }

    #[test]
    fn each_half_of_a_session_id_must_be_canonical() {
        assert!(SessionId::parse(&format!("{CANONICAL}{CANONICAL}")).is_ok());
        assert!(SessionId::parse(&format!("{NON_CANONICAL}{CANONICAL}")).is_err());
        assert!(SessionId::parse(&format!("{CANONICAL}{NON_CANONICAL}")).is_err());
    }

    #[test]
    fn a_44_byte_session_id_with_non_ascii_is_refused_without_panicking() {
        // 'é' is two bytes and straddles the tag/field boundary at byte 22.
        let id = format!("{}é{}", "A".repeat(21), "A".repeat(21));
        assert_eq!(id.len(), 44);
        assert!(SessionId::parse(&id).is_err());
        let id = format!("{}.{}", "A".repeat(21), "A".repeat(22));
        assert!(SessionId::parse(&id).is_err());
    }

    fn entries(n: usize) -> Map<String, Value> {
        (0..n).map(|i| (format!("k{i}"), Value::from(i))).collect()
    }

    #[test]
    fn metadata_limits_are_inclusive() {
        assert!(Metadata::parse(Some(&entries(MAX_METADATA_ENTRIES))).is_ok());
        assert!(Metadata::parse(Some(&entries(MAX_METADATA_ENTRIES + 1))).is_err());
        // {"ua":"xxx…"}: 9 bytes of JSON around the value.
        let sized = |bytes: usize| {
            let mut m = Map::new();
            m.insert("ua".into(), Value::from("x".repeat(bytes - 9)));
            m
        };
        let at_cap = Metadata::parse(Some(&sized(MAX_METADATA_BYTES))).unwrap();
        assert_eq!(at_cap.as_stored().len(), MAX_METADATA_BYTES);
        assert!(Metadata::parse(Some(&sized(MAX_METADATA_BYTES + 1))).is_err());
    }
}
