//! What the original request looked like, and the CSRF rule for
//! cookie-carried tokens.
//!
//! A gateway's check request may differ from the user's request (Caddy's
//! `forward_auth` always sends GET; nginx's `auth_request` keeps the method
//! but not the host). Gateways listed in `trusted_proxies` describe the
//! original with `X-Forwarded-Method`, `X-Forwarded-Host` and
//! `X-Forwarded-Proto`; from anyone else those headers are ignored.
//!
//! CSRF: a browser attaches cookies to cross-site requests on its own, so a
//! token that came from the cookie on an unsafe method is accepted only when
//! the request's `Origin` (else `Referer`) is its own origin or an allowed
//! one. Tokens in an `Authorization` header are exempt.

use actix_web::HttpRequest;
use actix_web::http::header::{self, HeaderMap};

use std::sync::atomic::AtomicBool;

use crate::config::IpNet;
use crate::error::ApiError;
use crate::whereabouts::{self, Seen};

/// Whether the misconfiguration warning was logged (once per process).
static WARNED_UNTRUSTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    pub csrf_protection: bool,
    /// Lower-case `scheme://host[:port]`.
    pub allowed_origins: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
}

impl OriginPolicy {
    /// Whether the peer is one of `trusted_proxies`.
    pub fn trusted(&self, req: &HttpRequest) -> bool {
        !self.trusted_proxies.is_empty()
            && req
                .peer_addr()
                .is_some_and(|a| self.trusted_proxies.iter().any(|n| n.contains(a.ip())))
    }

    /// Where the request came from (see [`crate::whereabouts`]): the
    /// client's address, through `X-Forwarded-For` / `X-Real-IP` only from
    /// a peer in `trusted_proxies`, and its bounded user agent.
    /// (From the request's peer and headers, so it can be worked out later
    /// on another thread: only when the touch is due.)
    pub fn seen_of(&self, peer: Option<std::net::SocketAddr>, headers: &HeaderMap) -> Seen {
        let ip = whereabouts::client_ip(
            peer.map(|a| a.ip()),
            headers
                .get_all("x-forwarded-for")
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .into_iter(),
            headers.get("x-real-ip").and_then(|v| v.to_str().ok()),
            &self.trusted_proxies,
        );
        Seen {
            ip: ip.map(|ip| ip.to_string()).unwrap_or_default(),
            user_agent: headers
                .get(header::USER_AGENT)
                .map(|v| whereabouts::bounded_user_agent(v.as_bytes()))
                .unwrap_or_default(),
        }
    }

    /// The method of the original request.
    pub fn method<'a>(&self, req: &'a HttpRequest) -> &'a str {
        if self.trusted(req) {
            for name in ["x-forwarded-method", "x-original-method"] {
                if let Some(m) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
                    return m;
                }
            }
        }
        req.method().as_str()
    }

    /// Refuses a cookie-carried token on an unsafe cross-site request.
    pub fn check_cookie_request(&self, req: &HttpRequest) -> Result<(), ApiError> {
        if !self.csrf_protection {
            return Ok(());
        }
        self.check_original(&self.original_of(req)?)
    }

    /// The original request behind an HTTP check. A gateway that describes
    /// the original method (Caddy's forward_auth always checks with GET) but
    /// is not trusted: the real method is unknown, so this refuses rather
    /// than judge the check's GET.
    pub fn original_of<'a>(&self, req: &'a HttpRequest) -> Result<Original<'a>, ApiError> {
        let trusted = self.trusted(req);
        if !trusted
            && ["x-forwarded-method", "x-original-method"]
                .iter()
                .any(|h| req.headers().contains_key(*h))
        {
            if !WARNED_UNTRUSTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    peer = ?req.peer_addr(),
                    "a cookie-carried token came with X-Forwarded-Method from a peer not in \
                     SESSIONGATE_TRUSTED_PROXIES: refused (403); add your gateway's address"
                );
            }
            return Err(ApiError::CrossSite);
        }
        let header = |name: header::HeaderName| req.headers().get(name)?.to_str().ok();
        let forwarded = |name: &str| {
            trusted
                .then(|| req.headers().get(name)?.to_str().ok())
                .flatten()
        };
        Ok(Original {
            method: self.method(req),
            origin: header(header::ORIGIN),
            referer: header(header::REFERER),
            host: forwarded("x-forwarded-host").or_else(|| header(header::HOST)),
            proto: forwarded("x-forwarded-proto"),
        })
    }

    /// The CSRF rule: an unsafe method needs an `Origin` (else `Referer`)
    /// that is one of `allowed_origins` or the original request's own.
    pub fn check_original(&self, original: &Original<'_>) -> Result<(), ApiError> {
        if ["GET", "HEAD", "OPTIONS", "TRACE"]
            .iter()
            .any(|safe| original.method.eq_ignore_ascii_case(safe))
        {
            return Ok(());
        }
        let origin = original
            .origin
            .map(str::to_string)
            .or_else(|| origin_of_url(original.referer?))
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .ok_or(ApiError::CrossSite)?;
        if self.allowed_origins.contains(&origin) {
            return Ok(());
        }
        let (scheme, authority) = origin.split_once("://").ok_or(ApiError::CrossSite)?;
        let host = original.host.ok_or(ApiError::CrossSite)?;
        let scheme_ok = original
            .proto
            .is_none_or(|p| p.eq_ignore_ascii_case(scheme));
        if scheme_ok && authority.eq_ignore_ascii_case(host) {
            Ok(())
        } else {
            Err(ApiError::CrossSite)
        }
    }
}

/// The original request, as far as the CSRF rule needs it: from the HTTP
/// check request (and a trusted gateway's `X-Forwarded-*`), or from Envoy's
/// gRPC `CheckRequest`, which carries the original method, host and headers.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    pub method: &'a str,
    pub origin: Option<&'a str>,
    pub referer: Option<&'a str>,
    /// `host[:port]` the request was sent to.
    pub host: Option<&'a str>,
    /// The scheme it was sent with, when known.
    pub proto: Option<&'a str>,
}

/// `scheme://host[:port]` of an absolute URL.
fn origin_of_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty()).then(|| format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn policy(trusted: &[&str]) -> OriginPolicy {
        OriginPolicy {
            csrf_protection: true,
            allowed_origins: vec!["https://app.example.com".into()],
            trusted_proxies: trusted.iter().map(|t| IpNet::parse(t).unwrap()).collect(),
        }
    }

    #[test]
    fn safe_methods_pass_and_unsafe_need_a_matching_origin() {
        let p = policy(&[]);
        let get = TestRequest::get().to_http_request();
        assert!(p.check_cookie_request(&get).is_ok());
        let post = TestRequest::post()
            .insert_header(("host", "site.test"))
            .to_http_request();
        assert!(p.check_cookie_request(&post).is_err(), "no Origin");
        let same = TestRequest::post()
            .insert_header(("host", "site.test"))
            .insert_header(("origin", "https://site.test"))
            .to_http_request();
        assert!(p.check_cookie_request(&same).is_ok());
        let cross = TestRequest::post()
            .insert_header(("host", "site.test"))
            .insert_header(("origin", "https://evil.test"))
            .to_http_request();
        assert!(p.check_cookie_request(&cross).is_err());
        let allowed = TestRequest::delete()
            .insert_header(("host", "site.test"))
            .insert_header(("origin", "https://APP.example.com"))
            .to_http_request();
        assert!(p.check_cookie_request(&allowed).is_ok());
        let referer = TestRequest::post()
            .insert_header(("host", "site.test"))
            .insert_header(("referer", "https://site.test/page?x=1"))
            .to_http_request();
        assert!(p.check_cookie_request(&referer).is_ok());
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_peers() {
        let from = |peer: &str| {
            TestRequest::get()
                .peer_addr(format!("{peer}:5000").parse().unwrap())
                .insert_header(("host", "127.0.0.1:8080"))
                .insert_header(("x-forwarded-method", "POST"))
                .insert_header(("x-forwarded-host", "site.test"))
                .insert_header(("origin", "https://evil.test"))
                .to_http_request()
        };
        // Untrusted peer describing the original method: the real method is
        // unknown, so the cookie request is refused.
        assert!(policy(&[]).check_cookie_request(&from("10.9.9.9")).is_err());
        // Trusted gateway says the original was a cross-site POST.
        assert!(
            policy(&["10.0.0.0/8"])
                .check_cookie_request(&from("10.9.9.9"))
                .is_err()
        );
        assert_eq!(policy(&["10.0.0.0/8"]).method(&from("10.9.9.9")), "POST");
    }
}

/// Branches the first tests left open (found by `scripts/mutants`; see
/// scripts/mutants.md).
#[cfg(test)]
mod mutation_tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn policy(trusted: &[&str]) -> OriginPolicy {
        OriginPolicy {
            csrf_protection: true,
            allowed_origins: vec![],
            trusted_proxies: trusted.iter().map(|t| IpNet::parse(t).unwrap()).collect(),
        }
    }

    /// A check request as a gateway sends it: GET, describing a POST.
    fn described(peer: &str, original_method: &str, origin: &str) -> HttpRequest {
        TestRequest::get()
            .peer_addr(format!("{peer}:5000").parse().unwrap())
            .insert_header(("host", "127.0.0.1:8080"))
            .insert_header(("x-forwarded-method", original_method))
            .insert_header(("x-forwarded-host", "site.test"))
            .insert_header(("x-forwarded-proto", "https"))
            .insert_header(("origin", origin))
            .to_http_request()
    }

    #[test]
    fn a_peer_outside_the_trusted_list_cannot_describe_the_request() {
        let p = policy(&["10.0.0.0/8"]);
        let outsider = described("192.0.2.9", "GET", "https://evil.test");
        // Its X-Forwarded-Method is not believed…
        assert_eq!(p.method(&outsider), "GET");
        let outsider_post = TestRequest::post()
            .peer_addr("192.0.2.9:5000".parse().unwrap())
            .insert_header(("x-forwarded-method", "POST"))
            .to_http_request();
        assert_eq!(p.method(&outsider_post), "POST");
        let real_post = TestRequest::post()
            .peer_addr("192.0.2.9:5000".parse().unwrap())
            .insert_header(("x-forwarded-method", "GET"))
            .to_http_request();
        assert_eq!(
            p.method(&real_post),
            "POST",
            "an outsider's header was used"
        );
        // …and a cookie request that carries it is refused even when it
        // claims a safe method.
        assert!(matches!(
            p.check_cookie_request(&outsider),
            Err(ApiError::CrossSite)
        ));
        // No trusted list at all: nobody is trusted.
        assert!(policy(&[]).check_cookie_request(&outsider).is_err());
        assert_eq!(policy(&[]).method(&real_post), "POST");
    }

    #[test]
    fn a_trusted_gateway_describes_method_host_and_scheme() {
        let p = policy(&["10.0.0.0/8"]);
        // The original was a GET: safe, whatever the Origin.
        assert!(
            p.check_cookie_request(&described("10.1.2.3", "GET", "https://evil.test"))
                .is_ok()
        );
        // A same-origin POST, judged against X-Forwarded-Host and -Proto.
        assert!(
            p.check_cookie_request(&described("10.1.2.3", "POST", "https://site.test"))
                .is_ok()
        );
        assert!(
            p.check_cookie_request(&described("10.1.2.3", "POST", "http://site.test"))
                .is_err(),
            "scheme differs from X-Forwarded-Proto"
        );
        assert!(
            p.check_cookie_request(&described("10.1.2.3", "POST", "https://evil.test"))
                .is_err()
        );
    }

    #[test]
    fn without_csrf_protection_cross_site_cookie_requests_pass() {
        let mut p = policy(&[]);
        p.csrf_protection = false;
        let cross = TestRequest::post()
            .insert_header(("host", "site.test"))
            .insert_header(("origin", "https://evil.test"))
            .to_http_request();
        assert!(p.check_cookie_request(&cross).is_ok());
    }
}
