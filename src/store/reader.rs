//! The verify read's own pipelined connection, to a single Redis or to the
//! primary Sentinel names (not in Cluster mode).
//!
//! Every verify sends the same two commands (`HGET` of the record, `ECHO`
//! of a nonce; with Sentinel, first the `DEL` probe that a replica or a
//! demoted primary refuses) and reads plain replies. Through redis-rs's multiplexed
//! connection that costs a `Pipeline` of `Cmd`s, a channel message, a
//! `Value` parse with its combinator parser and a conversion: about a tenth
//! of a verify's CPU. Here the commands are written straight into the
//! connection's outgoing buffer, and the replies, of the four RESP2 kinds
//! those commands can get (bulk string, nil, integer, simple string, or an
//! error), are read by a small parser.
//!
//! What it keeps of the multiplexed connection's behaviour:
//! - pipelining: requests append to one buffer under a lock; one writer
//!   task writes whatever has gathered, in order; one reader matches
//!   replies to requests in that same order;
//! - failure: an I/O error, an end of stream, or a reply it cannot parse
//!   or place breaks the connection: every waiting request fails at once,
//!   new ones fail without being sent, and the layer drops it (the next call
//!   opens another, see [`super::conn`]);
//! - replies still travel with the caller's nonce, which the caller checks
//!   (a reply for another request drops the connection too);
//! - time: it sets no timer of its own: every call is bounded by the
//!   layer's `call`; a request given up on leaves its place in the queue,
//!   and its reply, when it comes, is read and dropped.
//!
//! Everything else (scripts, writes, finding the Sentinel primary,
//! Cluster) stays on redis-rs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use redis::{RedisError, RedisResult, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};

/// A bulk reply larger than this is taken for a broken stream (records are
/// a few hundred bytes, a few KB at most).
const MAX_BULK: usize = 1 << 20;

/// A reply line (a number, a status, an error) longer than this is taken
/// for a broken stream.
const MAX_LINE: usize = 64 * 1024;

/// After this many requests in a row given up on (their caller timed out)
/// without a reply in between, the connection counts as broken.
const ABANDONED_BEFORE_BREAK: u32 = 3;

/// A cheap handle on one connection; the connection closes when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Reader {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Ends the task even when it is stuck writing to a Redis that does
        // not read.
        self.shared.close.notify_one();
    }
}

struct Shared {
    state: Mutex<State>,
    wake_writer: Notify,
    close: Notify,
    /// Requests given up on since the last reply delivered.
    abandoned: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct State {
    /// Commands not yet written.
    out: Vec<u8>,
    /// Requests sent or about to be, in order, each with its reply count.
    waiting: VecDeque<(usize, oneshot::Sender<RedisResult<Vec<Value>>>)>,
    /// Why the connection is unusable, once it is.
    broken: Option<String>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| {
            // A panic mid-request may have left half a command: the
            // stream can no longer be trusted.
            let mut state = poisoned.into_inner();
            state
                .broken
                .get_or_insert_with(|| "a request panicked".into());
            state
        })
    }

    /// Marks the connection broken and fails every waiting request.
    fn break_with(&self, why: String) {
        let waiting = {
            let mut state = self.state();
            state.broken.get_or_insert(why.clone());
            std::mem::take(&mut state.waiting)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(dropped(&why)));
        }
    }
}

/// A request still waiting when its future is dropped (its caller's
/// timeout): counted; [`ABANDONED_BEFORE_BREAK`] in a row, with no reply
/// delivered in between, break the connection, so a node that stopped
/// answering this connection is left even while the other one still works.
struct Abandon<'a>(&'a Shared, bool);

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if self.1
            && self
                .0
                .abandoned
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                + 1
                >= ABANDONED_BEFORE_BREAK
        {
            self.0
                .break_with("no reply to several requests in a row within the timeout".into());
        }
    }
}

/// Breaks the connection when the task holding it ends, however it ends.
struct BreakOnDrop(Arc<Shared>);

impl Drop for BreakOnDrop {
    fn drop(&mut self) {
        self.0.break_with("its task ended".into());
    }
}

fn dropped(why: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        format!("the verify connection broke: {why}"),
    ))
}

/// Appends one command (RESP2 array of bulk strings) to `out`.
pub fn push_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    push_header(out, b'*', args.len());
    for arg in args {
        push_header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(decimal(n as u64, &mut [0u8; 20]));
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `buf`.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

impl Reader {
    /// Connects to `info` (TCP or a Unix socket), authenticates and selects
    /// the database as its URL says, and starts the connection's task on
    /// the current runtime. The caller bounds it in time.
    pub async fn open(info: &redis::ConnectionInfo) -> RedisResult<Reader> {
        match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Self::start(stream, info.redis_settings()).await
            }
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Self::start(stream, info.redis_settings()).await
            }
            _ => Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "the verify connection speaks plain TCP or a Unix socket only",
            ))),
        }
    }

    async fn start<S>(mut stream: S, settings: &redis::RedisConnectionInfo) -> RedisResult<Reader>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // The handshake, one command at a time (the replies must be OK).
        let mut hello = Vec::new();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => {
                    push_command(&mut hello, &[b"AUTH", user.as_bytes(), password.as_bytes()])
                }
                None => push_command(&mut hello, &[b"AUTH", password.as_bytes()]),
            }
        }
        let expected = usize::from(!hello.is_empty()) + usize::from(settings.db() != 0);
        if settings.db() != 0 {
            push_command(
                &mut hello,
                &[b"SELECT", settings.db().to_string().as_bytes()],
            );
        }
        let mut buf = Vec::with_capacity(16 * 1024);
        if expected > 0 {
            stream.write_all(&hello).await?;
            let mut got = 0;
            while got < expected {
                match parse(&buf) {
                    Ok(Some((value, used))) => {
                        buf.drain(..used);
                        got += 1;
                        if value.extract_error()? != Value::Okay {
                            return Err(dropped("AUTH or SELECT not answered OK"));
                        }
                    }
                    Ok(None) => {
                        if stream.read_buf(&mut buf).await? == 0 {
                            return Err(dropped("closed during the handshake"));
                        }
                    }
                    Err(e) => return Err(dropped(&e)),
                }
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            close: Notify::new(),
            abandoned: std::sync::atomic::AtomicU32::new(0),
        });
        let (read_half, write_half) = tokio::io::split(stream);
        // However the task ends (an error, a panic, its runtime shutting
        // down, even before it ever ran), every waiting request fails at
        // once and no new one is sent: the guard is moved into the task.
        let guard = BreakOnDrop(shared.clone());
        tokio::spawn(async move {
            let why = tokio::select! {
                why = read_loop(&guard.0, read_half, buf) => why,
                why = write_loop(&guard.0, write_half) => why,
                () = guard.0.close.notified() => "closed".to_string(),
            };
            // The first reason stays; the guard's own, on drop, is a no-op.
            guard.0.break_with(why);
        });
        Ok(Reader {
            handle: Arc::new(Handle { shared }),
        })
    }

    /// Sends the commands `encode` appends (`replies` of them) and returns
    /// their replies in order, or the first error reply among them.
    pub async fn query(
        &self,
        replies: usize,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> RedisResult<Vec<Value>> {
        let shared = &self.handle.shared;
        let (tx, rx) = oneshot::channel();
        let was_idle = {
            let mut state = shared.state();
            if let Some(why) = &state.broken {
                return Err(dropped(why));
            }
            let was_idle = state.out.is_empty();
            encode(&mut state.out);
            state.waiting.push_back((replies, tx));
            was_idle
        };
        if was_idle {
            shared.wake_writer.notify_one();
        }
        let mut waiting = Abandon(shared, true);
        let reply = rx
            .await
            .unwrap_or_else(|_| Err(dropped("the connection's task ended")));
        waiting.1 = false;
        reply
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: &Shared, mut w: W) -> String {
    let mut spare = Vec::with_capacity(16 * 1024);
    loop {
        shared.wake_writer.notified().await;
        let batch = {
            let mut state = shared.state();
            std::mem::replace(&mut state.out, std::mem::take(&mut spare))
        };
        if batch.is_empty() {
            spare = batch;
            continue;
        }
        if let Err(e) = w.write_all(&batch).await {
            return e.to_string();
        }
        spare = batch;
        spare.clear();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(shared: &Shared, mut r: R, mut buf: Vec<u8>) -> String {
    // Replies of the request at the front, gathered so far.
    let mut got: Vec<Value> = Vec::new();
    loop {
        let mut at = 0;
        loop {
            let (value, used) = match parse(&buf[at..]) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(e) => return e,
            };
            at += used;
            got.push(value);
            let mut state = shared.state();
            let Some((expected, _)) = state.waiting.front() else {
                return "a reply nobody asked for".into();
            };
            if got.len() == *expected {
                let (_, tx) = state.waiting.pop_front().expect("front is there");
                drop(state);
                let reply =
                    Value::Array(std::mem::take(&mut got))
                        .extract_error()
                        .map(|v| match v {
                            Value::Array(v) => v,
                            other => vec![other],
                        });
                // A request given up on (timed out) is not listening.
                if tx.send(reply).is_ok() {
                    shared
                        .abandoned
                        .store(0, std::sync::atomic::Ordering::Release);
                }
            }
        }
        buf.drain(..at);
        match r.read_buf(&mut buf).await {
            Ok(0) => return "Redis closed the connection".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// One RESP2 reply of the kinds verify's commands get, from the start of
/// `buf`: the value and the bytes it took, `None` if incomplete, an error
/// for anything else (the stream is then unusable).
fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, String> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    if !matches!(kind, b'$' | b':' | b'+' | b'-') {
        return Err(format!("an unexpected reply type {:?}", kind as char));
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE {
            return Err("a reply line without an end".into());
        }
        return Ok(None);
    };
    let line = &buf[1..end];
    let after = end + 2;
    let number = || -> Result<i64, String> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| "a malformed number in a reply".to_string())
    };
    match kind {
        b'$' => {
            let len = number()?;
            if len == -1 {
                return Ok(Some((Value::Nil, after)));
            }
            let len = usize::try_from(len)
                .ok()
                .filter(|l| *l <= MAX_BULK)
                .ok_or("a bulk reply of an impossible length")?;
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            if &buf[after + len..after + len + 2] != b"\r\n" {
                return Err("a bulk reply without its end".into());
            }
            Ok(Some((
                Value::BulkString(buf[after..after + len].to_vec()),
                after + len + 2,
            )))
        }
        b':' => Ok(Some((Value::Int(number()?), after))),
        b'+' => {
            let value = if line == b"OK" {
                Value::Okay
            } else {
                Value::SimpleString(String::from_utf8_lossy(line).into_owned())
            };
            Ok(Some((value, after)))
        }
        // redis-rs's own parser makes the error, so its kind (READONLY,
        // LOADING, NOAUTH...) is what the rest of the store expects.
        b'-' => match redis::parse_redis_value(&buf[..after]) {
            Ok(value) => Ok(Some((value, after))),
            Err(e) => Err(e.to_string()),
        },
        _ => Err(format!("an unexpected reply type {:?}", kind as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        push_command(&mut out, &[b"HGET", b"sg:u{k}", b""]);
        push_command(&mut out, &[b"ECHO", b"12"]);
        assert_eq!(
            out,
            b"*3\r\n$4\r\nHGET\r\n$7\r\nsg:u{k}\r\n$0\r\n\r\n*2\r\n$4\r\nECHO\r\n$2\r\n12\r\n"
        );
        // Lengths of several digits.
        let mut out = Vec::new();
        push_command(&mut out, &[&[b'x'; 1234][..]]);
        assert!(out.starts_with(b"*1\r\n$1234\r\nxxx"));
        assert_eq!(out.len(), 4 + 7 + 1234 + 2);
        for n in [0, 7, 10, 99, 12345, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn replies_parse_whole_or_not_at_all() {
        let stream: &[u8] =
            b"$3\r\nab\n\r\n$-1\r\n:42\r\n+OK\r\n+PONG\r\n-READONLY You can't write\r\n";
        let mut at = 0;
        let mut values = Vec::new();
        while let Some((v, used)) = parse(&stream[at..]).unwrap() {
            // Every prefix of a reply is incomplete, never misread.
            for cut in 0..used {
                assert_eq!(parse(&stream[at..at + cut]).unwrap(), None, "prefix {cut}");
            }
            values.push(v);
            at += used;
        }
        assert_eq!(at, stream.len());
        assert_eq!(values[0], Value::BulkString(b"ab\n".to_vec()));
        assert_eq!(values[1], Value::Nil);
        assert_eq!(values[2], Value::Int(42));
        assert_eq!(values[3], Value::Okay);
        assert_eq!(values[4], Value::SimpleString("PONG".into()));
        let err = values[5].clone().extract_error().unwrap_err();
        assert_eq!(
            err.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        );
    }

    proptest::proptest! {
        /// Any bytes: a value, "incomplete" or an error, never a panic, and
        /// a value never claims more bytes than there are.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = parse(&bytes) {
                proptest::prop_assert!(used <= bytes.len());
            }
        }

        /// Bulk strings of any content (CR LF included) come back whole.
        #[test]
        fn bulk_strings_round_trip(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut wire = format!("${}\r\n", payload.len()).into_bytes();
            wire.extend_from_slice(&payload);
            wire.extend_from_slice(b"\r\n");
            proptest::prop_assert_eq!(parse(&wire), Ok(Some((Value::BulkString(payload), wire.len()))));
        }
    }

    /// A listener that accepts connections and never answers (a socket of
    /// this test's, not a store: what a hung node looks like to a client).
    async fn silent_node() -> (redis::ConnectionInfo, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let info =
            redis::IntoConnectionInfo::into_connection_info(format!("redis://127.0.0.1:{port}/0"))
                .unwrap();
        (info, task)
    }

    fn ping(out: &mut Vec<u8>) {
        push_command(out, &[b"PING"]);
    }

    /// A node that answers every `*1 $4 PING` with `+PONG` (split across
    /// writes, to cross read boundaries) and reports when a connection
    /// closes: the transport's own behaviour, with no store behind it.
    async fn ponging_node() -> (
        redis::ConnectionInfo,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                socket.set_nodelay(true).unwrap();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        match socket.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
                        while buf.starts_with(PING) {
                            buf.drain(..PING.len());
                            for part in [&b"+PO"[..], b"NG\r", b"\n"] {
                                socket.write_all(part).await.unwrap();
                                socket.flush().await.unwrap();
                            }
                        }
                    }
                    let _ = closed_tx.send(());
                });
            }
        });
        let info =
            redis::IntoConnectionInfo::into_connection_info(format!("redis://127.0.0.1:{port}/0"))
                .unwrap();
        (info, closed)
    }

    #[tokio::test]
    async fn replies_go_to_their_requests_in_order_and_the_last_handle_closes_it() {
        let (info, mut closed) = ponging_node().await;
        let reader = Reader::open(&info).await.unwrap();
        let pong = Value::SimpleString("PONG".into());
        // Groups of one, two and three commands, concurrently.
        let (a, b, c) = tokio::join!(
            reader.query(1, ping),
            reader.query(2, |out| {
                ping(out);
                ping(out);
            }),
            reader.query(3, |out| {
                ping(out);
                ping(out);
                ping(out);
            }),
        );
        assert_eq!(a.unwrap(), vec![pong.clone()]);
        assert_eq!(b.unwrap(), vec![pong.clone(); 2]);
        assert_eq!(c.unwrap(), vec![pong.clone(); 3]);
        for _ in 0..50 {
            assert_eq!(reader.query(1, ping).await.unwrap(), vec![pong.clone()]);
        }
        let copy = reader.clone();
        drop(reader);
        assert_eq!(copy.query(1, ping).await.unwrap(), vec![pong]);
        // The last handle gone, the connection closes.
        drop(copy);
        tokio::time::timeout(std::time::Duration::from_secs(10), closed.recv())
            .await
            .expect("the node sees the connection close");
    }

    #[test]
    fn a_reply_line_is_bounded() {
        let mut line = vec![b'+'; MAX_LINE];
        assert_eq!(parse(&line), Ok(None), "still possibly a reply");
        line.push(b'x');
        assert!(parse(&line).is_err(), "too long to be one");
    }

    #[tokio::test]
    async fn requests_given_up_on_in_a_row_break_the_connection() {
        let (info, _node) = silent_node().await;
        let reader = Reader::open(&info).await.unwrap();
        let patience = std::time::Duration::from_millis(50);
        for _ in 0..ABANDONED_BEFORE_BREAK {
            let waited = tokio::time::timeout(patience, reader.query(1, ping)).await;
            assert!(waited.is_err(), "a silent node answers nothing");
        }
        // Broken now: refused at once, not after another timeout.
        let refused =
            tokio::time::timeout(std::time::Duration::from_secs(10), reader.query(1, ping))
                .await
                .expect("refused without waiting");
        assert!(refused.unwrap_err().is_connection_dropped());
    }

    #[test]
    fn a_connection_whose_task_is_gone_fails_at_once() {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (reader, node) = first.block_on(async {
            let (info, node) = silent_node().await;
            (Reader::open(&info).await.unwrap(), node)
        });
        // Its task dies with its runtime (no normal return).
        drop(first);
        drop(node);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let refused = second.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), reader.query(1, ping)).await
        });
        assert!(refused.expect("refused without waiting").is_err());
    }

    #[test]
    fn anything_else_breaks_the_stream() {
        for bad in [
            &b"\r\n"[..],
            b"\r\n$1\r\na\r\n",
            b"*1\r\n$1\r\na\r\n",
            b"$x\r\n",
            b"$3\r\nabcXY",
            b"$-2\r\n",
            b":1.5\r\n",
            b"%1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
