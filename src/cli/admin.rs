//! `sessiongate admin …`: the operator's command line over the HTTP admin
//! API, for on-call work ("the laptop was stolen, sign it out now").
//!
//! - **Target and key** come from the environment, never from argv: argv is
//!   visible to every user through `ps` and lands in shell history. The URL
//!   is `--url` or `SESSIONGATE_URL`; the admin key is `SESSIONGATE_ADMIN_KEY`
//!   or the file named by `--key-file` / `SESSIONGATE_ADMIN_KEY_FILE`. A key
//!   given as `--key` is refused with that hint. The key is never printed.
//!   These names are read here only, never by `serve`.
//! - **Output**: aligned tables for people; `--json` prints the API's JSON
//!   answer exactly as received (its shapes are in `/openapi.json`).
//! - **Exit codes** (see [`Exit`]): 0 done, 1 refused or not found, 2 usage,
//!   3 the service is unreachable or unavailable. Every error says what to
//!   do next.
//! - The client is blocking (reqwest's blocking client runs its own small
//!   runtime thread): the admin commands never start the server's runtime.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::{ContentArrangement, Table, presets};
use reqwest::Method;
use reqwest::blocking::{Client, Response};
use serde_json::Value;

/// The variable holding the admin key.
const KEY_VAR: &str = "SESSIONGATE_ADMIN_KEY";
/// The variable naming a file that holds the admin key.
const KEY_FILE_VAR: &str = "SESSIONGATE_ADMIN_KEY_FILE";
/// The variable holding the service's base URL.
const URL_VAR: &str = "SESSIONGATE_URL";

const ADMIN_HELP: &str = "\
The target is --url or SESSIONGATE_URL; the admin key is SESSIONGATE_ADMIN_KEY,
or the file named by --key-file or SESSIONGATE_ADMIN_KEY_FILE (never a
command-line argument: argv shows in `ps` and shell history).

Exit codes: 0 done, 1 refused or not found, 2 usage, 3 service unreachable or
unavailable.

Example:
  export SESSIONGATE_URL=http://127.0.0.1:8080
  export SESSIONGATE_ADMIN_KEY_FILE=/etc/sessiongate/admin.key
  sessiongate admin sessions alice
  sessiongate admin logout-device alice laptop-7f3a";

/// Operator commands over the HTTP admin API.
#[derive(Debug, Args)]
#[command(after_help = ADMIN_HELP)]
pub struct AdminArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Args)]
struct Target {
    /// Base URL of the service, e.g. http://127.0.0.1:8080 [env: SESSIONGATE_URL]
    #[arg(long, global = true, value_name = "URL", env = URL_VAR, hide_env = true)]
    url: Option<String>,
    /// File holding the admin key (else the key is read from
    /// SESSIONGATE_ADMIN_KEY) [env: SESSIONGATE_ADMIN_KEY_FILE]
    #[arg(long, global = true, value_name = "PATH", env = KEY_FILE_VAR, hide_env = true)]
    key_file: Option<PathBuf>,
    /// Print the API's JSON answer as received, for scripts.
    #[arg(long, global = true)]
    json: bool,
    /// Refused: a key on the command line leaks into `ps` and shell history.
    #[arg(
        long,
        global = true,
        hide = true,
        value_name = "KEY",
        alias = "admin-key"
    )]
    key: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// List a user's live sessions (device, created, last seen, password age,
    /// expiry, metadata).
    #[command(after_help = "\
Example:
  sessiongate admin sessions alice
  sessiongate admin sessions alice --json | jq -r '.sessions[].session_id'")]
    Sessions {
        /// The user id.
        user: String,
    },
    /// Revoke one session by id: its token never verifies again. Exits 1
    /// when there was no live session with that id.
    #[command(after_help = "\
Example:
  sessiongate admin revoke K9gGyX8OAK8aH8Myj6djqQFx2-HnDzvmpiezXa5_AJUQ")]
    Revoke {
        /// The session id (as listed by `sessions`).
        session: String,
    },
    /// Sign a user out on every device, optionally keeping one session (e.g.
    /// the one that just changed the password). Exits 0 also when the user
    /// had no live session.
    #[command(after_help = "\
Example:
  sessiongate admin logout-user alice
  sessiongate admin logout-user alice --except K9gGyX8OAK8aH8Myj6djqQFx2-HnDzvmpiezXa5_AJUQ")]
    LogoutUser {
        /// The user id.
        user: String,
        /// A session of this user to keep.
        #[arg(long, value_name = "SESSION")]
        except: Option<String>,
    },
    /// Sign a user out on one device. Exits 1 when the user had no live
    /// session on that device (check the device id with `sessions`).
    #[command(after_help = "\
Example:
  sessiongate admin logout-device alice laptop-7f3a")]
    LogoutDevice {
        /// The user id.
        user: String,
        /// The device id (as listed by `sessions`).
        device: String,
    },
    /// Sign every user out on every device: every token issued before now
    /// stops verifying, on every instance. Refused (exit 2) without --yes.
    #[command(after_help = "\
Example:
  sessiongate admin logout-all --yes")]
    LogoutAll {
        /// Confirm: sign out every user.
        #[arg(long)]
        yes: bool,
    },
    /// Sign new tokens with a new key; tokens signed with older keys keep
    /// verifying until they expire.
    #[command(after_help = "\
Example:
  sessiongate admin rotate-key")]
    RotateKey,
    /// Show what a token is and whether it is live (RFC 7662
    /// introspection). Reads the token from stdin, never from argv; exits 1
    /// when the token is not active.
    #[command(after_help = "\
Example:
  printf %s \"$TOKEN\" | sessiongate admin introspect
  sessiongate admin introspect < token.txt")]
    Introspect {
        /// Refused: a token on the command line leaks into `ps` and shell history.
        #[arg(hide = true)]
        token: Option<String>,
    },
}

/// The exit codes, fixed for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: the service refused (wrong key, bad input, rate limit) or the
    /// target was not found / not active.
    Refused = 1,
    /// 2: the command was used wrongly (missing target or key, key on argv,
    /// logout-all without --yes).
    Usage = 2,
    /// 3: the service is unreachable, or answered that it (or its Redis) is
    /// unavailable.
    Unavailable = 3,
}

/// Why a command stopped: an exit code and a sentence saying what to do.
#[derive(Debug)]
struct Failure {
    exit: Exit,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
    fn refused(message: impl Into<String>) -> Failure {
        Failure {
            exit: Exit::Refused,
            message: message.into(),
        }
    }
    fn unavailable(message: impl Into<String>) -> Failure {
        Failure {
            exit: Exit::Unavailable,
            message: message.into(),
        }
    }
}

/// Runs one admin command and returns the process's exit code.
pub fn run(args: AdminArgs) -> ExitCode {
    match execute(args) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(failure) => {
            eprintln!("sessiongate admin: {}", failure.message);
            ExitCode::from(failure.exit as u8)
        }
    }
}

fn execute(args: AdminArgs) -> Result<Exit, Failure> {
    let AdminArgs { target, command } = args;
    if target.key.is_some() {
        // Do not echo the value: it is a secret that already leaked once.
        return Err(Failure::usage(format!(
            "refusing a key on the command line: argv shows in `ps` and shell history. \
             Put the admin key in {KEY_VAR}, or in a file (chmod 600) named by \
             --key-file or {KEY_FILE_VAR}; and consider replacing the admin key you just typed \
             (in the service's SESSIONGATE_ADMIN_KEYS)"
        )));
    }
    // Check local usage before any network call or key handling.
    match &command {
        AdminCommand::LogoutAll { yes: false } => {
            return Err(Failure::usage(
                "logout-all signs out EVERY user on EVERY device: every token issued before now \
                 stops verifying, on every instance. Nothing was done. \
                 Run `sessiongate admin logout-all --yes` to do it",
            ));
        }
        AdminCommand::Introspect { token: Some(_) } => {
            return Err(Failure::usage(
                "refusing a token on the command line: argv shows in `ps` and shell history. \
                 Pass it on stdin: printf %s \"$TOKEN\" | sessiongate admin introspect",
            ));
        }
        _ => {}
    }
    let api = Api::new(&target)?;
    // After the target and key are known good: no prompt for a token that
    // could not be sent anyway.
    let token = match &command {
        AdminCommand::Introspect { token: None } => Some(read_token()?),
        _ => None,
    };
    let json = target.json;
    match command {
        AdminCommand::Sessions { user } => {
            let path = format!("/v1/admin/users/{}/sessions", segment(&user, "user id")?);
            let answer = api.call(Method::GET, &path, None)?;
            if json {
                answer.print_raw();
            } else {
                print_sessions(&user, &answer.value)?;
            }
            Ok(Exit::Ok)
        }
        AdminCommand::Revoke { session } => {
            let path = format!("/v1/admin/sessions/{}", segment(&session, "session id")?);
            let answer = api.call(Method::DELETE, &path, None)?;
            let n = revoked(&answer)?;
            if json {
                answer.print_raw();
            } else if n > 0 {
                println!("revoked session {session}: its token no longer verifies");
            }
            if n == 0 {
                eprintln!(
                    "sessiongate admin: no live session {session}: nothing revoked \
                     (it already ended, or the id is wrong; list a user's sessions with \
                     `sessiongate admin sessions USER`)"
                );
                return Ok(Exit::Refused);
            }
            Ok(Exit::Ok)
        }
        AdminCommand::LogoutUser { user, except } => {
            let mut path = format!("/v1/admin/users/{}/sessions", segment(&user, "user id")?);
            if let Some(keep) = &except {
                path.push_str("?except=");
                path.push_str(&encode(keep));
            }
            let answer = api.call(Method::DELETE, &path, None)?;
            let n = revoked(&answer)?;
            if json {
                answer.print_raw();
            } else {
                let kept = except.map(|s| format!(" (kept {s})")).unwrap_or_default();
                println!("revoked {n} {} of user {user}{kept}", plural(n));
            }
            Ok(Exit::Ok)
        }
        AdminCommand::LogoutDevice { user, device } => {
            let path = format!(
                "/v1/admin/users/{}/devices/{}",
                segment(&user, "user id")?,
                segment(&device, "device id")?
            );
            let answer = api.call(Method::DELETE, &path, None)?;
            let n = revoked(&answer)?;
            if json {
                answer.print_raw();
            } else if n > 0 {
                println!(
                    "revoked {n} {} of user {user} on device {device}",
                    plural(n)
                );
            }
            if n == 0 {
                eprintln!(
                    "sessiongate admin: user {user} has no live session on device {device}: \
                     nothing revoked (check the device id with `sessiongate admin sessions {user}`)"
                );
                return Ok(Exit::Refused);
            }
            Ok(Exit::Ok)
        }
        AdminCommand::LogoutAll { .. } => {
            let answer = api.call(Method::POST, "/v1/admin/logout-all", None)?;
            if json {
                answer.print_raw();
            } else {
                let cutoff = answer.value["cutoff_ms"]
                    .as_i64()
                    .ok_or_else(|| api.not_sessiongate("no cutoff_ms in the answer"))?;
                println!(
                    "signed out every user: every session created at or before {} is revoked \
                     (cutoff_ms {cutoff}), within 1 s on every instance",
                    utc(cutoff.div_euclid(1000))
                );
            }
            Ok(Exit::Ok)
        }
        AdminCommand::RotateKey => {
            let answer = api.call(Method::POST, "/v1/admin/keys/rotate", None)?;
            if json {
                answer.print_raw();
            } else {
                let kid = answer.value["kid"]
                    .as_str()
                    .ok_or_else(|| api.not_sessiongate("no kid in the answer"))?;
                println!(
                    "new tokens are signed with key {kid}; tokens signed with older keys keep \
                     verifying until they expire"
                );
            }
            Ok(Exit::Ok)
        }
        AdminCommand::Introspect { .. } => {
            let token = token.expect("read above");
            let answer = api.call(Method::POST, "/v1/introspect", Some(&token))?;
            let active = answer.value["active"]
                .as_bool()
                .ok_or_else(|| api.not_sessiongate("no active field in the answer"))?;
            if json {
                answer.print_raw();
            } else if active {
                print_introspection(&answer.value);
            } else {
                println!(
                    "not active: the token is revoked, expired, idle-expired, wrongly signed \
                     or not a sessiongate token"
                );
            }
            Ok(if active { Exit::Ok } else { Exit::Refused })
        }
    }
}

/// `{"revoked": N}` from a revoke answer.
fn revoked(answer: &Answer) -> Result<u64, Failure> {
    answer.value["revoked"].as_u64().ok_or_else(|| {
        Failure::unavailable(format!(
            "the answer from {} has no revoked count: is it a sessiongate service?",
            answer.url
        ))
    })
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "session" } else { "sessions" }
}

/// Reads one token from stdin (a pipe, a file, or a paste at a terminal).
fn read_token() -> Result<String, Failure> {
    let stdin = std::io::stdin();
    let mut raw = String::new();
    if stdin.is_terminal() {
        eprintln!("paste the token, then press Enter:");
        stdin
            .read_line(&mut raw)
            .map_err(|e| Failure::usage(format!("could not read the token from stdin: {e}")))?;
    } else {
        // A token is a few hundred bytes; refuse to slurp a huge input.
        stdin
            .lock()
            .take(64 * 1024)
            .read_to_string(&mut raw)
            .map_err(|e| Failure::usage(format!("could not read the token from stdin: {e}")))?;
    }
    let token = raw.trim();
    if token.is_empty() {
        return Err(Failure::usage(
            "no token on stdin: pipe it in, e.g. printf %s \"$TOKEN\" | sessiongate admin introspect",
        ));
    }
    if token.split_whitespace().nth(1).is_some() {
        return Err(Failure::usage(
            "stdin holds more than one word: give exactly one token",
        ));
    }
    Ok(token.to_string())
}

/// A connection target: the base URL, the admin key and a client.
struct Api {
    base: String,
    key: String,
    http: Client,
}

/// A successful answer: its body as received and parsed.
struct Answer {
    url: String,
    raw: String,
    value: Value,
}

impl Answer {
    fn print_raw(&self) {
        println!("{}", self.raw.trim_end());
    }
}

impl Api {
    fn new(target: &Target) -> Result<Api, Failure> {
        let base = base_url(target.url.as_deref())?;
        let key = admin_key(
            target.key_file.as_deref(),
            std::env::var_os(KEY_VAR).map(|v| v.to_string_lossy().into_owned()),
        )?;
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            // Never follow a redirect with the admin key.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sessiongate-admin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::unavailable(format!("could not start an HTTP client: {e}")))?;
        Ok(Api { base, key, http })
    }

    /// One call; `token` makes it a form post of `token=…` (introspection).
    fn call(&self, method: Method, path: &str, token: Option<&str>) -> Result<Answer, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(token) = token {
            request = request.form(&[("token", token)]);
        }
        let response = request.send().map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        if status.is_success() {
            let raw = response.text().map_err(|e| self.unreachable(&e))?;
            let value = serde_json::from_str(&raw)
                .map_err(|_| self.not_sessiongate("the answer is not JSON"))?;
            return Ok(Answer { url, raw, value });
        }
        Err(self.failure(status, response))
    }

    /// An error answer, mapped to an exit code and advice.
    fn failure(&self, status: reqwest::StatusCode, response: Response) -> Failure {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body: Value = response
            .text()
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let code = body["error"].as_str().unwrap_or("");
        let message = body["message"].as_str().unwrap_or("");
        let base = &self.base;
        match status.as_u16() {
            401 => Failure::refused(format!(
                "the admin key was refused (401 unauthorized): check {KEY_VAR} (or the key file); \
                 it must be one of the service's SESSIONGATE_ADMIN_KEYS"
            )),
            403 => Failure::refused(
                "this key may not use the admin API (403 forbidden): it is probably an issuer \
                 key; use an admin key",
            ),
            404 if code == "not_found" => Failure::refused(format!(
                "{base} has no such endpoint (404): is {URL_VAR} the service's base URL \
                 (without /v1), and is the service recent enough?"
            )),
            404 => Failure::refused(format!(
                "{base} answered 404 without a sessiongate error: is {URL_VAR} the service's \
                 base URL?"
            )),
            400 => Failure::refused(format!(
                "the service refused the request (400 {code}): {message}"
            )),
            429 => Failure::refused(format!(
                "too many failed API keys from this address (429): wait {}s, and check \
                 {KEY_VAR} before retrying",
                retry_after.as_deref().unwrap_or("a few ")
            )),
            503 if code == "store_unavailable" => Failure::unavailable(format!(
                "the service's Redis is not answering (503 store_unavailable): the action may \
                 not have been applied; retry in {}s and check {base}/readyz",
                retry_after.as_deref().unwrap_or("a few ")
            )),
            300..=399 => Failure::unavailable(format!(
                "{base} redirects ({status}) to {}: set {URL_VAR} to the final address \
                 (the admin key is never sent on a redirect)",
                location.as_deref().unwrap_or("elsewhere")
            )),
            500..=599 => Failure::unavailable(format!(
                "the service answered {status}{}: retry shortly, and check {base}/readyz and \
                 its logs",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            )),
            _ => Failure::refused(format!(
                "unexpected answer {status} from {base}{}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            )),
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> Failure {
        let base = &self.base;
        if e.is_timeout() {
            return Failure::unavailable(format!(
                "no answer from {base} in time: the service or the network is overloaded or \
                 down; retry, and check {base}/readyz"
            ));
        }
        // The chain says why (connection refused, DNS, TLS); it holds no key.
        let mut why = String::new();
        let mut refused = false;
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            why = s.to_string();
            refused |= s
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
            source = s.source();
        }
        if why.is_empty() {
            why = e.to_string();
        }
        let tls = if base.starts_with("https://") && !refused {
            " For https: does that port speak TLS, and does this machine trust its certificate \
             (the system's roots, or SSL_CERT_FILE=ca.pem)?"
        } else {
            ""
        };
        Failure::unavailable(format!(
            "could not reach the service at {base}: {why}. Is it running, and is {URL_VAR} \
             right?{tls}"
        ))
    }

    fn not_sessiongate(&self, why: &str) -> Failure {
        Failure::unavailable(format!(
            "{why}: is {URL_VAR} ({}) a sessiongate service?",
            self.base
        ))
    }
}

/// The base URL from `--url` / `SESSIONGATE_URL`, without a trailing slash.
fn base_url(raw: Option<&str>) -> Result<String, Failure> {
    let raw = raw.map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| {
        Failure::usage(format!(
            "no target: set {URL_VAR} (e.g. export {URL_VAR}=http://127.0.0.1:8080) or pass --url"
        ))
    })?;
    let url = reqwest::Url::parse(raw).map_err(|e| {
        Failure::usage(format!(
            "{URL_VAR} / --url {raw:?} is not a URL ({e}); e.g. http://127.0.0.1:8080"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Failure::usage(format!(
            "{URL_VAR} / --url must be an http:// or https:// URL, not {:?}",
            url.scheme()
        )));
    }
    if url.query().is_some() || url.fragment().is_some() || url.password().is_some() {
        return Err(Failure::usage(format!(
            "{URL_VAR} / --url must be a base URL without credentials, query or fragment, \
             e.g. https://sessiongate.internal:8443"
        )));
    }
    if url.scheme() == "http" && !is_loopback(&url) {
        eprintln!(
            "sessiongate admin: warning: the admin key travels in clear text over http to {}; \
             use https for a remote service",
            url.host_str().unwrap_or("?")
        );
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The admin key: from the file (`--key-file` / `SESSIONGATE_ADMIN_KEY_FILE`)
/// or from `SESSIONGATE_ADMIN_KEY`; both at once is ambiguous and refused.
fn admin_key(file: Option<&Path>, env: Option<String>) -> Result<String, Failure> {
    let env = env.filter(|k| !k.is_empty());
    let key = match (file, env) {
        (Some(_), Some(_)) => {
            return Err(Failure::usage(format!(
                "both {KEY_VAR} and a key file (--key-file or {KEY_FILE_VAR}) are set: \
                 unset one of them"
            )));
        }
        (Some(path), None) => read_key_file(path)?,
        (None, Some(key)) => key,
        (None, None) => {
            return Err(Failure::usage(format!(
                "no admin key: set {KEY_VAR}, or name a file holding it (chmod 600) with \
                 --key-file or {KEY_FILE_VAR}"
            )));
        }
    };
    let key = key.trim().to_string();
    if key.is_empty() {
        return Err(Failure::usage("the admin key is empty"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Failure::usage(
            "the admin key holds a space, a control or a non-ASCII character \
             (two keys in the file? a stray character?): give exactly one key",
        ));
    }
    Ok(key)
}

fn read_key_file(path: &Path) -> Result<String, Failure> {
    let shown = path.display();
    let key = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("could not read the key file {shown}: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "sessiongate admin: warning: the key file {shown} is readable by other users; \
                 chmod 600 {shown}"
            );
        }
    }
    Ok(key)
}

/// One path segment, percent-encoded. `.` and `..` cannot be addressed in a
/// URL path (they are resolved away), so they are refused.
fn segment(raw: &str, what: &str) -> Result<String, Failure> {
    if raw.is_empty() || raw == "." || raw == ".." {
        return Err(Failure::usage(format!(
            "{what} {raw:?} cannot be named in a URL path"
        )));
    }
    Ok(encode(raw))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An aligned table without borders (`kubectl get` style): columns two
/// spaces apart, no trailing blanks, no terminal-width wrapping.
fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    t
}

fn render(mut t: Table) -> String {
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_sessions(user: &str, list: &Value) -> Result<(), Failure> {
    let Some(sessions) = list["sessions"].as_array() else {
        return Err(Failure::unavailable(
            "the answer has no sessions list: is SESSIONGATE_URL a sessiongate service?",
        ));
    };
    if sessions.is_empty() {
        println!("user {user} has no live sessions");
        return Ok(());
    }
    let now = now_secs();
    let mut t = table(&[
        "SESSION",
        "DEVICE",
        "CREATED (UTC)",
        "LAST SEEN",
        "PASSWORD",
        "EXPIRES",
        "BROWSER",
        "FIRST IP",
        "LAST IP",
        "LAST USER AGENT",
        "METADATA",
    ]);
    for s in sessions {
        let secs = |k: &str| s[k].as_i64();
        let text = |k: &str| s[k].as_str().unwrap_or("-").to_string();
        t.add_row(vec![
            s["session_id"].as_str().unwrap_or("?").to_string(),
            s["device_id"].as_str().unwrap_or("?").to_string(),
            secs("created_at").map(utc).unwrap_or_default(),
            secs("last_seen_at")
                .map(|t| relative(now, t))
                .unwrap_or_default(),
            secs("auth_time")
                .map(|t| relative(now, t))
                .unwrap_or_default(),
            secs("expires_at")
                .map(|t| relative(now, t))
                .unwrap_or_default(),
            text("device_label"),
            text("first_ip"),
            text("last_ip"),
            cut(&text("last_user_agent")),
            metadata(&s["metadata"]),
        ]);
    }
    println!("{}", render(t));
    Ok(())
}

fn print_introspection(v: &Value) {
    let now = now_secs();
    let mut t = table(&["FIELD", "VALUE"]);
    t.add_row(vec!["active", "yes"]);
    for (label, key) in [
        ("user (sub)", "sub"),
        ("session (sid)", "sid"),
        ("device (did)", "did"),
        ("issuer (iss)", "iss"),
    ] {
        if let Some(s) = v[key].as_str() {
            t.add_row(vec![label.to_string(), s.to_string()]);
        }
    }
    for (label, key) in [
        ("issued (iat)", "iat"),
        ("password (auth_time)", "auth_time"),
        ("expires (exp)", "exp"),
    ] {
        if let Some(s) = v[key].as_i64() {
            t.add_row(vec![
                label.to_string(),
                format!("{} ({})", utc(s), relative(now, s)),
            ]);
        }
    }
    println!("{}", render(t));
}

/// Metadata as `key=value` pairs, each value cut to 40 characters (`--json`
/// has them whole).
fn metadata(v: &Value) -> String {
    let Some(map) = v.as_object() else {
        return String::new();
    };
    map.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{k}={}", cut(&v))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `v` cut to 40 characters, with "…" when it was longer.
fn cut(v: &str) -> String {
    let cut: String = v.chars().take(40).collect();
    let more = if cut.len() < v.len() { "…" } else { "" };
    format!("{cut}{more}")
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-12-02 07:04:05` for Unix seconds (UTC).
fn utc(secs: i64) -> String {
    sessiongate::timefmt::utc_seconds(secs)
}

/// `5m 2s ago`, `in 29d 23h`, `now`: the two largest units.
fn relative(now: i64, t: i64) -> String {
    let d = t - now;
    if d == 0 {
        return "now".into();
    }
    let span = span(d.unsigned_abs());
    if d < 0 {
        format!("{span} ago")
    } else {
        format!("in {span}")
    }
}

fn span(secs: u64) -> String {
    let units = [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (name, size) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        } else if !parts.is_empty() {
            // Keep the two parts adjacent: "1d 0h", not "1d 5s".
            parts.push(format!("0{name}"));
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_194_245), "2026-12-02 06:50:45");
        assert_eq!(utc(-1), "1969-12-31 23:59:59");
    }

    #[test]
    fn relative_spans_use_two_units() {
        assert_eq!(relative(100, 100), "now");
        assert_eq!(relative(100, 88), "12s ago");
        assert_eq!(relative(0, 302), "in 5m 2s");
        assert_eq!(relative(0, 30 * 86_400 - 1), "in 29d 23h");
        assert_eq!(relative(86_400 + 5, 0), "1d 0h ago");
        assert_eq!(relative(0, 3600), "in 1h 0m");
    }

    #[test]
    fn segments_are_percent_encoded_and_dots_refused() {
        assert_eq!(segment("a b/c?d%", "user id").unwrap(), "a%20b%2Fc%3Fd%25");
        assert_eq!(segment("alice-1_x.y~", "user id").unwrap(), "alice-1_x.y~");
        assert_eq!(segment("é", "user id").unwrap(), "%C3%A9");
        for bad in ["", ".", ".."] {
            assert_eq!(segment(bad, "user id").unwrap_err().exit, Exit::Usage);
        }
    }

    #[test]
    fn base_url_is_required_and_checked() {
        assert_eq!(
            base_url(Some("http://127.0.0.1:8080/")).unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url(Some("https://ops.example/sessiongate/")).unwrap(),
            "https://ops.example/sessiongate"
        );
        for bad in [
            None,
            Some(""),
            Some("127.0.0.1:8080"),
            Some("ftp://x"),
            Some("http://x/?a=1"),
            Some("http://u:p@x/"),
        ] {
            assert_eq!(base_url(bad).unwrap_err().exit, Exit::Usage, "{bad:?}");
        }
    }

    #[test]
    fn only_loopback_hosts_count_as_local() {
        for (url, local) in [
            ("http://127.0.0.1:8080", true),
            ("http://127.9.9.9", true),
            ("http://localhost:1", true),
            ("http://[::1]:8080", true),
            ("http://10.0.0.5:8080", false),
            ("http://sessiongate.internal", false),
            ("http://localhost.example", false),
        ] {
            assert_eq!(
                is_loopback(&reqwest::Url::parse(url).unwrap()),
                local,
                "{url}"
            );
        }
    }

    #[test]
    fn the_key_comes_from_one_place_and_is_one_word() {
        assert_eq!(
            admin_key(None, Some("k".repeat(40))).unwrap(),
            "k".repeat(40)
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "from-file-key\n").unwrap();
        assert_eq!(admin_key(Some(file.path()), None).unwrap(), "from-file-key");
        for (f, e) in [
            (None, None),
            (None, Some(String::new())),
            (Some(file.path()), Some("k".into())),
            (None, Some("two keys".into())),
            (Some(Path::new("/nonexistent/key")), None),
        ] {
            assert_eq!(admin_key(f, e).unwrap_err().exit, Exit::Usage);
        }
    }

    #[test]
    fn tables_are_aligned_without_trailing_blanks() {
        let mut t = table(&["A", "LONGER"]);
        t.add_row(vec!["wide-cell", "x"]);
        t.add_row(vec!["é", "y"]);
        let out = render(t);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, ["A          LONGER", "wide-cell  x", "é          y"]);
    }
}
