//! Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization/Check`)
//! on `grpc_listen`: the same decision as `/v1/verify`, through the same
//! code ([`crate::http::verify::decide`]); only the mapping differs.
//!
//! - The token comes from the original request's `authorization` header,
//!   else from the cookie, and the CSRF rule judges the original method,
//!   `Host`, scheme and `Origin`/`Referer` that the `CheckRequest` carries.
//! - `max_age`: the `x-sessiongate-max-age` header, a `max_age` context
//!   extension of the route (`ExtAuthzPerRoute.check_settings`), or a
//!   `max_age` in the original query (ignored when malformed, as in the
//!   `/v1/verify/{tail}` form); the smallest wins.
//! - OK sets `x-session-user`, `-id`, `-device` on the request to the
//!   upstream (overwriting) and removes every other `x-session-*` header the
//!   client sent.
//! - A refusal is a denied response with the HTTP answer `/v1/verify` would
//!   give: its status (401, 403, 400, 503), headers (`WWW-Authenticate`,
//!   `Retry-After`, …) and JSON body; the gRPC status says the same
//!   (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, UNAVAILABLE).
//! - Envoy sends its timeout as `grpc-timeout`: a check still waiting on
//!   Redis is answered 503 (`store_unavailable`, `Retry-After`) just before
//!   that deadline, so the client sees sessiongate's answer rather than
//!   Envoy's own error; never an OK.
//!
//! The listener runs on a multi-threaded runtime of its own (`workers`
//! threads), apart from the HTTP workers; every request-path Redis call is
//! still one round trip on the calling thread's connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix_web::web;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context;
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::http::AppState;
use crate::http::extract::{Duplicate, TokenSource, bearer_credentials, cookie_in};
use crate::http::origin::{OriginPolicy, Original};
use crate::http::verify::{self, Decision, MAX_AGE_HEADER};

/// gRPC status codes (google.rpc.Code) of the answers.
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

/// The context extension a route sets for its password-age demand.
pub const MAX_AGE_CONTEXT_KEY: &str = "max_age";

/// The `Authorization` service.
pub struct ExtAuthz {
    state: web::Data<AppState>,
}

impl ExtAuthz {
    pub fn new(state: web::Data<AppState>) -> ExtAuthz {
        ExtAuthz { state }
    }

    /// The answer to one check, within `deadline` if the caller gave one.
    pub async fn answer(&self, check: &CheckRequest, deadline: Option<Duration>) -> CheckResponse {
        let started = Instant::now();
        let decision = async {
            let source = Checked::of(check);
            let max_age = source.max_age()?;
            verify::decide(&self.state, &source, max_age, None).await
        };
        let result = match deadline {
            None => decision.await,
            Some(budget) => tokio::time::timeout(budget, decision)
                .await
                .unwrap_or(Err(ApiError::StoreUnavailable)),
        };
        verify::record(&self.state, started, &result);
        match result {
            Ok(decision) => allowed(&decision, Checked::of(check).header_names()),
            Err(e) => denied(&e),
        }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(answer_by);
        let check = request.into_inner();
        Ok(Response::new(self.answer(&check, deadline).await))
    }
}

/// How long a check may take when the caller gives up after `timeout`: a
/// little less, so the 503 reaches it first (a tenth of it, at most 50 ms).
fn answer_by(timeout: Duration) -> Duration {
    timeout.saturating_sub((timeout / 10).min(Duration::from_millis(50)))
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The original request of a `CheckRequest`, as [`TokenSource`] needs it.
/// Headers come from `header_map` when Envoy sends raw headers
/// (`encode_raw_headers: true`: repeated headers stay apart), else from the
/// `headers` map (repeated ones joined by Envoy).
struct Checked<'a> {
    http: Option<&'a attribute_context::HttpRequest>,
    context: Option<&'a HashMap<String, String>>,
}

impl<'a> Checked<'a> {
    fn of(check: &'a CheckRequest) -> Checked<'a> {
        let attributes = check.attributes.as_ref();
        Checked {
            http: attributes
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.as_ref()),
            context: attributes.map(|a| &a.context_extensions),
        }
    }

    fn raw(&self) -> Option<&'a [envoy_types::ext_authz::v3::pb::HeaderValue]> {
        self.http
            .and_then(|h| h.header_map.as_ref())
            .map(|m| m.headers.as_slice())
            .filter(|h| !h.is_empty())
    }

    /// Every value of header `name` (lower case).
    fn values(&self, name: &'a str) -> Vec<&'a [u8]> {
        if let Some(raw) = self.raw() {
            return raw
                .iter()
                .filter(|h| h.key.eq_ignore_ascii_case(name))
                .map(|h| {
                    if h.raw_value.is_empty() {
                        h.value.as_bytes()
                    } else {
                        h.raw_value.as_slice()
                    }
                })
                .collect();
        }
        self.http
            .and_then(|h| h.headers.get(name))
            .map(|v| vec![v.as_bytes()])
            .unwrap_or_default()
    }

    fn one(&self, name: &'a str) -> Option<&'a str> {
        let values = self.values(name);
        match values.as_slice() {
            [one] => std::str::from_utf8(one).ok(),
            _ => None,
        }
    }

    /// The names of the original request's headers.
    fn header_names(&self) -> Vec<&'a str> {
        if let Some(raw) = self.raw() {
            return raw.iter().map(|h| h.key.as_str()).collect();
        }
        self.http
            .map(|h| h.headers.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// The route's password-age demand: the header (a 400 when malformed,
    /// as on `/v1/verify`), the route's context extension (likewise), the
    /// original query's `max_age` (ignored when malformed); the smallest.
    fn max_age(&self) -> Result<Option<u64>, ApiError> {
        let header = match self.values(MAX_AGE_HEADER.as_str()).as_slice() {
            [] => None,
            [one] => Some(verify::max_age_header(one)?),
            _ => {
                return Err(ApiError::InvalidRequest(
                    "X-Sessiongate-Max-Age given twice".into(),
                ));
            }
        };
        let context = self
            .context
            .and_then(|c| c.get(MAX_AGE_CONTEXT_KEY))
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    ApiError::InvalidRequest(
                        "the route's max_age context extension must be a whole number of seconds"
                            .into(),
                    )
                })
            })
            .transpose()?;
        let query = self
            .http
            .and_then(|h| h.path.split_once('?'))
            .and_then(|(_, query)| verify::tail_max_age(query.split('#').next().unwrap_or("")));
        Ok(verify::tightest(verify::tightest(header, context), query))
    }
}

impl<'a> TokenSource for Checked<'a> {
    fn bearer(&self) -> Result<Option<&[u8]>, Duplicate> {
        match self.values("authorization").as_slice() {
            [] => Ok(None),
            [one] => Ok(bearer_credentials(one)),
            _ => Err(Duplicate),
        }
    }

    fn cookie(&self, name: &str) -> Result<Option<String>, Duplicate> {
        cookie_in(self.values("cookie"), name)
    }

    /// Envoy describes the original request itself: its method, its
    /// `Host`/`:authority` and its scheme (Envoy's view of the downstream
    /// connection) are the ones the CSRF rule judges.
    fn original(&self, _: &OriginPolicy) -> Result<Original<'_>, ApiError> {
        let http = self.http.ok_or(ApiError::CrossSite)?;
        let nonempty = |s: &'a str| (!s.is_empty()).then_some(s);
        Ok(Original {
            method: &http.method,
            origin: self.one("origin"),
            referer: self.one("referer"),
            host: nonempty(&http.host).or_else(|| self.one(":authority").or(self.one("host"))),
            proto: nonempty(&http.scheme),
        })
    }
}

/// Set on the upstream request, replacing what the client sent.
fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: String::from_utf8_lossy(value).into_owned(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        ..Default::default()
    }
}

fn allowed(decision: &Decision, client_headers: Vec<&str>) -> CheckResponse {
    let [user, session, device] = &decision.active.token.identity_headers;
    let mut headers = vec![
        set_header(verify::X_SESSION_USER.as_str(), user.as_bytes()),
        set_header(verify::X_SESSION_ID.as_str(), session.as_bytes()),
        set_header(verify::X_SESSION_DEVICE.as_str(), device.as_bytes()),
    ];
    if let Some(assertion) = &decision.assertion {
        headers.push(set_header(
            verify::X_SESSION_ASSERTION.as_str(),
            assertion.as_bytes(),
        ));
    }
    let ours = |name: &str| {
        headers
            .iter()
            .any(|h| h.header.as_ref().is_some_and(|h| h.key == name))
    };
    let headers_to_remove = client_headers
        .into_iter()
        .filter(|name| name.len() > 10 && name[..10].eq_ignore_ascii_case("x-session-"))
        .map(str::to_ascii_lowercase)
        .filter(|name| !ours(name))
        .collect();
    CheckResponse {
        status: Some(rpc::Status {
            code: OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The answer `/v1/verify` gives for `error` (status, headers, JSON body),
/// as a denied response.
fn denied(error: &ApiError) -> CheckResponse {
    use actix_web::ResponseError;
    use actix_web::body::MessageBody;
    let answer = error.error_response();
    let status = answer.status().as_u16();
    let headers = answer
        .headers()
        .iter()
        .map(|(name, value)| set_header(name.as_str(), value.as_bytes()))
        .collect();
    let body = answer
        .into_body()
        .try_into_bytes()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let code = match status {
        400 => INVALID_ARGUMENT,
        401 => UNAUTHENTICATED,
        503 => UNAVAILABLE,
        _ => PERMISSION_DENIED,
    };
    CheckResponse {
        status: Some(rpc::Status {
            code,
            message: error.to_string(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body,
        })),
        ..Default::default()
    }
}

/// The gRPC listener: its own thread and runtime; stopped (in-flight checks
/// given up to 5 s) when dropped.
pub struct GrpcServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcServer {
    /// Serves `Check` on `listener` with `threads` runtime threads.
    pub fn start(
        listener: std::net::TcpListener,
        state: web::Data<AppState>,
        threads: usize,
    ) -> std::io::Result<GrpcServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("sessiongate-grpc")
            .enable_all()
            .build()?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let mut grace = stop.subscribe();
        let thread = std::thread::Builder::new()
            .name("sessiongate-grpc-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "gRPC listener unusable");
                            return;
                        }
                    };
                    let incoming = tonic::transport::server::TcpIncoming::from(listener)
                        .with_nodelay(Some(true));
                    let server = tonic::transport::Server::builder()
                        .add_service(AuthorizationServer::new(ExtAuthz::new(state)))
                        .serve_with_incoming_shutdown(incoming, async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        });
                    tokio::select! {
                        result = server => {
                            if let Err(e) = result {
                                tracing::error!(error = %e, "gRPC listener stopped");
                            }
                        }
                        _ = async {
                            let _ = grace.wait_for(|s| *s).await;
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        } => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(GrpcServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_the_answer_comes_first() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "12", "1x", "-1m", "123456789m", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(
            answer_by(Duration::from_millis(200)),
            Duration::from_millis(180)
        );
        assert_eq!(
            answer_by(Duration::from_secs(2)),
            Duration::from_millis(1950)
        );
    }
}
