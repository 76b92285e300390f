//! Where the harness may send traffic: loopback only.
//!
//! A target is a base URL `http://HOST[:PORT]`. HOST must be an IPv4
//! address in 127.0.0.0/8, the IPv6 address ::1, or `localhost` (taken as
//! 127.0.0.1 without asking a resolver, so no hosts file or DNS answer can
//! point the harness elsewhere). Anything else is refused before any
//! connection is made.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hyper::Uri;
use hyper::header::HeaderValue;

#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given, for reports.
    pub url: String,
    /// The loopback socket address connected to.
    pub addr: SocketAddr,
    /// The `Host` header sent with every request.
    pub host: HeaderValue,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("target {url:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "target {url:?}: only http:// is supported (got {other}://)"
                ));
            }
            None => return Err(format!("target {url:?}: write it as http://HOST:PORT")),
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("target {url:?} has no host"))?;
        if let Some(pq) = uri.path_and_query()
            && pq.as_str() != "/"
        {
            return Err(format!(
                "target {url:?}: give the base URL only (no path or query)"
            ));
        }
        let ip = loopback_ip(host)?;
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri
            .authority()
            .map(|a| {
                a.as_str()
                    .rsplit('@')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default();
        let host =
            HeaderValue::from_str(&authority).map_err(|_| format!("target {url:?}: bad host"))?;
        Ok(Target {
            url: url.trim_end_matches('/').to_string(),
            addr: SocketAddr::new(ip, port),
            host,
        })
    }
}

/// The loopback address a host names, or why it is refused.
pub fn loopback_ip(host: &str) -> Result<IpAddr, String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let refuse = || {
        format!(
            "refusing target host {host:?}: only loopback addresses are allowed \
             (127.0.0.0/8, ::1 or localhost)"
        )
    };
    let ip: IpAddr = bare.parse().map_err(|_| refuse())?;
    if ip.is_loopback() {
        Ok(ip)
    } else {
        Err(refuse())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.1.2.3:1",
            "http://localhost:9000",
            "http://LOCALHOST",
            "http://[::1]:8080",
        ] {
            let t = Target::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(t.addr.ip().is_loopback(), "{url}");
        }
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!(t.addr.port(), 8080);
        assert_eq!(t.host, "[::1]:8080");
        assert_eq!(Target::parse("http://localhost").unwrap().addr.port(), 80);
    }

    #[test]
    fn everything_else_is_refused() {
        for url in [
            "http://10.0.0.1:8080",
            "http://192.168.1.10",
            "http://0.0.0.0:8080",
            "http://8.8.8.8",
            "http://[::]:80",
            "http://[::ffff:127.0.0.1]:80",
            "http://example.com",
            "http://localhost.example.com",
            "http://127.0.0.1.nip.io",
            "http://evil.com@10.0.0.1:80",
            "https://127.0.0.1:8443",
            "127.0.0.1:8080",
            "http://127.0.0.1:8080/v1",
            "not a url",
        ] {
            assert!(Target::parse(url).is_err(), "{url} should be refused");
        }
    }

    #[test]
    fn userinfo_does_not_hide_the_real_host() {
        // The host is what follows '@'; it must itself be loopback.
        let t = Target::parse("http://user@127.0.0.1:80").unwrap();
        assert_eq!(t.host, "127.0.0.1:80");
    }
}
