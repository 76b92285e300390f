//! A lean HTTP/1.1 client: one keep-alive connection, driven by the task that
//! uses it.
//!
//! It is hyper's low-level `client::conn::http1` over a tokio `TcpStream`.
//! The connection future is not spawned: it is polled together with the
//! request in one `select!`, so a request costs no cross-task wake-up, and
//! there is no pool, no URL parsing and no header map built from strings
//! per request (paths and headers are prepared once and cloned, which is a
//! reference-count increment).

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::target::Target;

pub type Body = Full<Bytes>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Why a request got no HTTP answer.
#[derive(Debug)]
pub enum TransportError {
    Connect(std::io::Error),
    Http(hyper::Error),
    /// The server closed the connection.
    Closed,
    /// No complete answer within the request timeout.
    Timeout,
}

impl TransportError {
    pub fn kind(&self) -> &'static str {
        match self {
            TransportError::Connect(_) => "connect",
            TransportError::Http(_) => "http",
            TransportError::Closed => "closed",
            TransportError::Timeout => "timeout",
        }
    }
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::Connect(e) => write!(f, "cannot connect: {e}"),
            TransportError::Http(e) => write!(f, "HTTP error: {e}"),
            TransportError::Closed => write!(f, "the server closed the connection"),
            TransportError::Timeout => write!(f, "no answer within the request timeout"),
        }
    }
}

/// A complete answer.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    /// Just before the request was handed to the connection (after it was
    /// ready): the "sent" instant of the safety rule.
    pub sent: Instant,
    /// When the whole body had been read: the "acknowledged" instant.
    pub done: Instant,
}

impl Reply {
    pub fn latency(&self) -> Duration {
        self.done.duration_since(self.sent)
    }
}

struct Live {
    sender: SendRequest<Body>,
    conn: Pin<Box<Connection<TokioIo<TcpStream>, Body>>>,
}

/// One keep-alive connection to one target, re-opened after any failure.
pub struct Conn {
    target: Target,
    timeout: Duration,
    live: Option<Live>,
}

impl Conn {
    pub fn new(target: &Target, timeout: Duration) -> Conn {
        Conn {
            target: target.clone(),
            timeout,
            live: None,
        }
    }

    /// A request with the target's Host header, an optional bearer
    /// credential and an optional JSON body.
    pub fn request(
        &self,
        method: Method,
        uri: Uri,
        auth: Option<&HeaderValue>,
        json: Option<Bytes>,
    ) -> Request<Body> {
        let has_body = json.is_some();
        let mut req = Request::new(Full::new(json.unwrap_or_default()));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(HOST, self.target.host.clone());
        if let Some(auth) = auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        if has_body {
            headers.insert(CONTENT_TYPE, JSON);
        }
        req
    }

    /// Sends one request and reads the whole answer, within the timeout.
    /// Any failure drops the connection; the next call opens a new one.
    pub async fn send(&mut self, req: Request<Body>) -> Result<Reply, TransportError> {
        let result = match tokio::time::timeout(self.timeout, self.send_inner(req)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout),
        };
        if result.is_err() {
            self.live = None;
        }
        result
    }

    async fn send_inner(&mut self, req: Request<Body>) -> Result<Reply, TransportError> {
        // A kept connection that turns out closed before anything was sent
        // is replaced silently: nothing was sent, so nothing is lost.
        if let Some(live) = self.live.as_mut()
            && !ready(live).await
        {
            self.live = None;
        }
        if self.live.is_none() {
            let mut live = connect(&self.target).await?;
            if !ready(&mut live).await {
                return Err(TransportError::Closed);
            }
            self.live = Some(live);
        }
        let Live { sender, conn } = self.live.as_mut().expect("connected above");
        let sent = Instant::now();
        let exchange = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let (status, body) = drive(exchange, conn.as_mut())
            .await?
            .map_err(TransportError::Http)?;
        Ok(Reply {
            status,
            body,
            sent,
            done: Instant::now(),
        })
    }
}

async fn connect(target: &Target) -> Result<Live, TransportError> {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(TransportError::Connect)?;
    stream.set_nodelay(true).map_err(TransportError::Connect)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(TransportError::Http)?;
    Ok(Live {
        sender,
        conn: Box::pin(conn),
    })
}

/// Polls `work` and the connection together until `work` is done; an error
/// if the connection ends first. Whenever the connection made progress,
/// `work` is polled again at once: the connection hands the answer over
/// through a channel, and waiting for that wake-up would send the task to
/// the back of the run queue once or twice per request.
async fn drive<F: Future>(
    work: F,
    mut conn: Pin<&mut Connection<TokioIo<TcpStream>, Body>>,
) -> Result<F::Output, TransportError> {
    let mut work = pin!(work);
    poll_fn(|cx| {
        for _ in 0..4 {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            match conn.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Err(TransportError::Closed)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(TransportError::Http(e))),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// Drives the connection until it can take a request; false when it closed.
async fn ready(live: &mut Live) -> bool {
    let Live { sender, conn } = live;
    // The connection first: it notices a close by the server while idle.
    let closed = poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx).is_ready())).await;
    !closed && matches!(drive(sender.ready(), conn.as_mut()).await, Ok(Ok(())))
}

/// Percent-encodes a path segment (ids may hold any printable character).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::path_segment;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("user-42_a.b~"), "user-42_a.b~");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment("é"), "%C3%A9");
    }
}
