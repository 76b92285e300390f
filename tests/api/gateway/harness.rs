//! Real gateways for the gateway tests: `nginx` and `caddy` processes running
//! the shipped configuration files (config/gateways/) on free loopback ports,
//! an app that echoes what it receives, and a raw HTTP/1.1 client for request
//! lines that `reqwest` would tidy up (`..`, `%2e%2e`).
//!
//! Each gateway gets its own temporary directory (config, logs, pid, temp
//! files, Caddy's data) and never touches the system's nginx or Caddy. The
//! process is SIGKILLed when its handle is dropped, and also when the test
//! thread that started it ends (`PR_SET_PDEATHSIG`), so no test leaves one
//! behind.
//!
//! How the shipped files are run:
//! - nginx: `config/gateways/nginx-site.conf` is copied with exactly three
//!   tokens replaced on its non-comment lines (`127.0.0.1:8080` → sessiongate,
//!   `127.0.0.1:3000` → the app, `listen 80;` → `listen 127.0.0.1:PORT;`) and
//!   `include`d from a generated top-level `nginx.conf` that holds only what a
//!   system nginx.conf would (pid, logs, temp paths), with `master_process off`
//!   so one SIGKILL ends it all.
//! - Caddy: `config/gateways/Caddyfile` is run as it is; its addresses come
//!   from `GATEWAY_*` environment variables.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a gateway may take to accept connections after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh ports a gateway start tries when another process took the
/// chosen one between our probe and the gateway's bind.
const PORT_ATTEMPTS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nginx,
    Caddy,
}

/// The shipped configuration files.
pub fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/gateways")
        .join(name)
}

/// A running gateway on `127.0.0.1:port`.
pub struct Gateway {
    pub kind: Kind,
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub address: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `kind` with the shipped configuration, checking requests with
    /// the sessiongate at `sessiongate` and passing them to the app at `app`
    /// (both `host:port`). Returns once the gateway accepts connections.
    pub async fn start(kind: Kind, sessiongate: &str, app: &str) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix(match kind {
                Kind::Nginx => "sessiongate-nginx-",
                Kind::Caddy => "sessiongate-caddy-",
            })
            .tempdir()
            .expect("create a temporary directory for the gateway");
        let mut gateway = Gateway {
            kind,
            port: 0,
            address: String::new(),
            child: None,
            dir,
        };
        for _ in 0..PORT_ATTEMPTS {
            gateway.port = free_port();
            gateway.address = format!("http://127.0.0.1:{}", gateway.port);
            let _ = fs::remove_file(gateway.log_path());
            let command = match kind {
                Kind::Nginx => gateway.nginx_command(sessiongate, app),
                Kind::Caddy => gateway.caddy_command(sessiongate, app),
            };
            gateway.spawn(command);
            match gateway.wait_ready().await {
                Ok(()) => return gateway,
                Err(())
                    if gateway.log().contains("address already in use")
                        || gateway.log().contains("Address already in use") => {}
                Err(()) => panic!(
                    "{kind:?} did not start on port {}; log:\n{}",
                    gateway.port,
                    gateway.log()
                ),
            }
        }
        panic!("{kind:?} found no free port in {PORT_ATTEMPTS} attempts")
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// The gateway's own output (nginx's error log, Caddy's log).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    fn nginx_command(&self, sessiongate: &str, app: &str) -> Command {
        let dir = self.dir.path();
        fs::write(
            dir.join("sessiongate.conf"),
            nginx_site(sessiongate, app, self.port),
        )
        .expect("write the nginx site");
        let d = dir.display();
        let main = format!(
            "daemon off;\n\
             master_process off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/gateway.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/sessiongate.conf;\n\
             }}\n"
        );
        fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
        let mut command = Command::new("nginx");
        command
            .arg("-p")
            .arg(format!("{d}/"))
            .arg("-e")
            .arg(self.log_path())
            .arg("-c")
            .arg(dir.join("nginx.conf"));
        command
    }

    fn caddy_command(&self, sessiongate: &str, app: &str) -> Command {
        let dir = self.dir.path();
        let mut command = Command::new("caddy");
        command
            .arg("run")
            .arg("--config")
            .arg(shipped("Caddyfile"))
            .arg("--adapter")
            .arg("caddyfile")
            .env("HOME", dir)
            .env("XDG_CONFIG_HOME", dir)
            .env("XDG_DATA_HOME", dir)
            .env("GATEWAY_SITE", format!("http://127.0.0.1:{}", self.port))
            .env("GATEWAY_SESSIONGATE", sessiongate)
            .env("GATEWAY_APP", app)
            .env("GATEWAY_CADDY_ADMIN", "off");
        command
    }

    fn spawn(&mut self, mut command: Command) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("create the gateway log");
        let log_err = log.try_clone().expect("clone a file handle");
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        kill_with_parent(&mut command);
        let program = format!("{:?}", command.get_program());
        self.child = Some(command.spawn().unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? scripts/test installs it): {e}")
        }));
    }

    /// Polls a TCP connect until it succeeds; `Err` when the process exits
    /// or [`READY_TIMEOUT`] passes (after killing it).
    async fn wait_ready(&mut self) -> Result<(), ()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return Err(());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Gateway {
    /// SIGKILLs and reaps the gateway; the temporary directory goes next.
    fn drop(&mut self) {
        self.kill();
    }
}

/// The shipped nginx site with its three address tokens replaced on
/// non-comment lines; each token must occur on exactly one such line, so a
/// reworded file fails here rather than running with the wrong addresses.
pub fn nginx_site(sessiongate: &str, app: &str, port: u16) -> String {
    let text = fs::read_to_string(shipped("nginx-site.conf")).expect("read nginx-site.conf");
    let listen = format!("listen 127.0.0.1:{port};");
    let tokens = [
        ("127.0.0.1:8080", sessiongate),
        ("127.0.0.1:3000", app),
        ("listen 80;", listen.as_str()),
    ];
    let mut seen = [0; 3];
    let mut out = String::new();
    for line in text.lines() {
        let mut line = line.to_string();
        if !line.trim_start().starts_with('#') {
            for (i, (token, value)) in tokens.iter().enumerate() {
                if line.contains(token) {
                    seen[i] += 1;
                    line = line.replace(token, value);
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    for ((token, _), n) in tokens.iter().zip(seen) {
        assert_eq!(n, 1, "nginx-site.conf: `{token}` on {n} non-comment lines");
    }
    out
}

pub use crate::redis_server::{free_port, kill_with_parent};

/// The app behind the gateway: answers every request with 200 and a JSON
/// echo of it (`{"from": "app", method, uri, headers: [[name, value]…],
/// body}`, header names in lower case, repeated headers kept), and counts
/// the requests it served.
pub struct Upstream {
    /// `127.0.0.1:PORT`
    pub address: String,
    hits: Arc<AtomicUsize>,
    handle: ServerHandle,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the app's port");
        let address = listener.local_addr().unwrap().to_string();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = web::Data::from(hits.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(counter.clone())
                .default_service(web::to(echo))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Upstream {
            address,
            hits,
            handle,
        }
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Sends the stop command now; nobody needs to wait for it.
        drop(self.handle.stop(false));
    }
}

async fn echo(req: HttpRequest, body: web::Bytes, hits: web::Data<AtomicUsize>) -> HttpResponse {
    hits.fetch_add(1, Ordering::SeqCst);
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "from": "app",
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
}

/// Every value the app received for header `name` (lower case).
pub fn received(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("an app echo")
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_string())
        .collect()
}

/// Every header the app received whose name reads as X-Session-* to an app
/// stack that folds case and `_`/`-` (as CGI, PHP, WSGI and Rack do).
pub fn identity_like(echo: &Value) -> Vec<(String, String)> {
    echo["headers"]
        .as_array()
        .expect("an app echo")
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_string(),
                pair[1].as_str().unwrap().to_string(),
            )
        })
        .filter(|(name, _)| {
            name.to_ascii_lowercase()
                .replace('_', "-")
                .starts_with("x-session-")
        })
        .collect()
}

/// An answer read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines as sent, `Name: value`.
    pub head: String,
    pub body: String,
}

/// Sends `METHOD TARGET HTTP/1.1` exactly as given (no normalisation of the
/// target), with `headers` (`Name: value` lines) and `Connection: close`,
/// and reads the whole answer.
pub async fn raw_request(port: u16, method: &str, target: &str, headers: &[&str]) -> RawResponse {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the gateway answers within 10 s")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    RawResponse {
        status,
        head: head.to_string(),
        body: if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
