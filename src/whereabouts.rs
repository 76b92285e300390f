//! Where a session was used from: the client's address and user agent as a
//! verify saw them, and a readable device label for listings.
//!
//! What is recorded when (README, "Where sessions were used from"):
//! - at login, whatever the login backend put in the session's `metadata`
//!   under `ip` and `user_agent` (sessiongate sees only the login backend's
//!   own address on `POST /v1/sessions`, so the first address is the
//!   backend's to pass on): listed as `first_ip` / `first_user_agent`;
//! - at the throttled touch (at most once per touch interval per session,
//!   never on a verify that is not due to slide the idle expiry), the
//!   address and user agent of that verify's request: `last_ip` /
//!   `last_user_agent`, elements 8 and 9 of the record (`lua/prelude.lua`).
//!
//! The address is the direct peer's, unless the peer is one of
//! `trusted_proxies`: then `X-Forwarded-For` is read right to left, skipping
//! trusted proxies, and the first address that is not one is the client
//! (an entry a client wrote to the left of it is never believed); without
//! `X-Forwarded-For`, `X-Real-IP`. The user agent is cut to
//! [`MAX_USER_AGENT_BYTES`] with control characters dropped.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::config::IpNet;

/// The longest user agent kept (bytes, cut at a character boundary).
pub const MAX_USER_AGENT_BYTES: usize = 256;

/// Metadata keys a login backend may use for the login's address and user
/// agent (`ip` and `user_agent` are the documented ones).
pub const IP_KEYS: &[&str] = &["ip", "ip_address", "client_ip", "remote_addr"];
pub const UA_KEYS: &[&str] = &["user_agent", "ua", "user-agent", "userAgent"];

/// What a touch records: the client's address ("" when unknown) and its
/// bounded user agent ("" when none was sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub ip: String,
    pub user_agent: String,
}

/// The client's address: `peer` itself unless it is a trusted proxy; then
/// `forwarded_for` (every `X-Forwarded-For` value in order, each a comma
/// list) read right to left through trusted proxies, else `real_ip`.
/// An entry that is not an address ends the walk at the trusted hop before
/// it (a proxy's address is recorded rather than text a client wrote).
pub fn client_ip<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    real_ip: Option<&str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    let peer = canonical(peer?);
    if !is_trusted(peer) {
        return Some(peer);
    }
    let mut hop = peer;
    let mut any = false;
    for value in forwarded_for.rev() {
        for entry in value.rsplit(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            any = true;
            let Some(ip) = parse_addr(entry) else {
                return Some(hop);
            };
            if !is_trusted(ip) {
                return Some(ip);
            }
            hop = ip;
        }
    }
    if any {
        // Every hop was a trusted proxy: the leftmost is the client.
        return Some(hop);
    }
    Some(real_ip.and_then(parse_addr).unwrap_or(peer))
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `::1`,
/// `[::1]:80`, `[::1]`.
fn parse_addr(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            text.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })
        .map(canonical)
}

/// `::ffff:1.2.3.4` as `1.2.3.4`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A user agent as stored: invalid UTF-8 replaced, control characters
/// dropped, cut to [`MAX_USER_AGENT_BYTES`] at a character boundary.
pub fn bounded_user_agent(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len().min(MAX_USER_AGENT_BYTES));
    for c in text.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_USER_AGENT_BYTES {
            break;
        }
        out.push(c);
    }
    out.trim().to_string()
}

/// A readable label for a user agent, from the `woothee` classifier:
/// "Firefox on Linux", "Safari on iPhone", "Chrome"; `None` when it knows
/// neither the browser nor the system.
pub fn device_label(user_agent: &str) -> Option<String> {
    if user_agent.is_empty() {
        return None;
    }
    let parsed = woothee::parser::Parser::new().parse(user_agent)?;
    let known = |s: &str| !s.is_empty() && s != woothee::woothee::VALUE_UNKNOWN;
    match (known(parsed.name), known(parsed.os)) {
        (true, true) => Some(format!("{} on {}", parsed.name, parsed.os)),
        (true, false) => Some(parsed.name.to_string()),
        (false, true) => Some(parsed.os.to_string()),
        (false, false) => None,
    }
}

/// The first string among `keys` in a session's metadata.
pub fn meta_str<'a>(metadata: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| metadata.get(*k).and_then(Value::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|t| IpNet::parse(t).unwrap()).collect()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(
                ip("192.0.2.7"),
                ["203.0.113.9"].into_iter(),
                Some("198.51.100.1"),
                &trusted
            ),
            ip("192.0.2.7")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), ["203.0.113.9"].into_iter(), None, &[]),
            ip("10.0.0.1"),
            "nobody is trusted without a list"
        );
        assert_eq!(client_ip(None, [].into_iter(), None, &trusted), None);
    }

    #[test]
    fn forwarded_for_is_read_right_to_left_through_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        // The client wrote 1.1.1.1 itself; the first proxy appended the
        // client's real address 203.0.113.9, the second its own peer.
        let chain = ["1.1.1.1, 203.0.113.9", "10.0.0.2"];
        assert_eq!(
            client_ip(ip("10.0.0.3"), chain.into_iter(), Some("9.9.9.9"), &trusted),
            ip("203.0.113.9")
        );
        // Every hop trusted: the leftmost.
        assert_eq!(
            client_ip(
                ip("10.0.0.3"),
                ["10.0.0.1,10.0.0.2"].into_iter(),
                None,
                &trusted
            ),
            ip("10.0.0.1")
        );
        // Garbage ends the walk at the trusted hop before it.
        assert_eq!(
            client_ip(
                ip("10.0.0.3"),
                ["1.1.1.1, nonsense, 10.0.0.2"].into_iter(),
                None,
                &trusted
            ),
            ip("10.0.0.2")
        );
        // Ports, brackets, IPv6, mapped IPv4.
        assert_eq!(
            client_ip(
                ip("::ffff:10.0.0.3"),
                ["[2001:db9::1]:443, 10.0.0.5:80"].into_iter(),
                None,
                &trusted
            ),
            ip("2001:db9::1")
        );
        // Without X-Forwarded-For, X-Real-IP; without either, the peer.
        assert_eq!(
            client_ip(
                ip("10.0.0.3"),
                [].into_iter(),
                Some("198.51.100.1"),
                &trusted
            ),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.3"), [" , "].into_iter(), Some("bad"), &trusted),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn user_agents_are_bounded_and_clean() {
        assert_eq!(bounded_user_agent(b"curl/8.5.0"), "curl/8.5.0");
        assert_eq!(bounded_user_agent(b"a\r\nb\x00c\x7f\td"), "abcd");
        let long = "é".repeat(200);
        let cut = bounded_user_agent(long.as_bytes());
        assert_eq!(cut.len(), MAX_USER_AGENT_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(bounded_user_agent(b"x\xffy"), "x\u{fffd}y");
    }

    #[test]
    fn labels_name_browser_and_system() {
        let firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
        assert_eq!(device_label(firefox).as_deref(), Some("Firefox on Linux"));
        let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 \
                      (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
        assert_eq!(device_label(iphone).as_deref(), Some("Safari on iPhone"));
        let edge = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
                    Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91";
        assert_eq!(device_label(edge).as_deref(), Some("Edge on Windows 10"));
        assert_eq!(device_label(""), None);
        assert_eq!(device_label("zzz"), None);
    }
}
