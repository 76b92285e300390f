//! `sessiongate-load`: drives a running sessiongate over HTTP on loopback.
//!
//! * `seed` creates sessions through the API and saves their tokens;
//! * `run --scenario healthz|verify|mixed|revocation` measures throughput,
//!   latency and revocation safety, and exits non-zero on any wrong answer.
//!
//! Exit status: 0 success; 1 wrong answers (a 2xx for a token whose
//! revocation was acknowledged before the request was sent, any 5xx beyond
//! `--max-server-errors` (default 0), a 401/403 for a live token, or a status
//! the operation never answers in a healthy run); 2 bad usage or setup (a
//! non-loopback target, a missing key, unreadable seeds); 3 the run itself
//! failed (no answer at all, more transport errors than
//! `--max-error-ratio`, a revoked token never refused by B, or seeding
//! failures).

mod client;
mod plot;
mod report;
mod revocation;
mod run;
mod seed;
mod stats;
mod target;
mod tokens;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "sessiongate-load",
    version,
    about = "Load-test harness for sessiongate: throughput, latency and revocation safety (loopback targets only)"
)]
struct Cli {
    /// Runtime threads of the harness. 1 (the default) matches `wrk -t1`
    /// and keeps the safety bookkeeping strictly ordered.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create sessions through `POST /v1/sessions` and save their tokens.
    Seed(SeedArgs),
    /// Run a load scenario and report throughput, latency and safety.
    Run(RunArgs),
}

#[derive(Args, Clone)]
pub struct SeedArgs {
    /// Base URL of the service (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Issuer API key (default: the first of SESSIONGATE_ISSUER_KEYS).
    #[arg(long, env = "SESSIONGATE_ISSUER_KEYS", hide_env_values = true)]
    pub issuer_key: String,
    /// Sessions to create.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Users the sessions are spread over (round robin; each session of a
    /// user on its own device). Default: one session per user.
    #[arg(long)]
    pub users: Option<u64>,
    /// Session metadata: `none`, `typical` (an IP and a 120-byte user
    /// agent), or a JSON object.
    #[arg(long, default_value = "none")]
    pub metadata: String,
    /// Where to write the seeds (TSV: token, session_id, user_id, device_id).
    #[arg(long, default_value = "seeds.tsv")]
    pub out: PathBuf,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Prefix of the generated user ids.
    #[arg(long, default_value = "user-")]
    pub user_prefix: String,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write a JSON summary of the seeding here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// `GET /healthz`: the HTTP floor, to compare the harness with wrk.
    Healthz,
    /// `GET /v1/verify` with seeded valid tokens, rotating through them.
    Verify,
    /// A weighted mix of verify (valid and revoked), create, logout, list
    /// and admin force-logout.
    Mixed,
    /// Revocations on A, propagation to B (two instances, one Redis).
    Revocation,
}

#[derive(Args, Clone)]
pub struct RunArgs {
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Base URL of the service (instance A; loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Instance B, sharing A's Redis (revocation scenario).
    #[arg(long)]
    pub target_b: Option<String>,
    /// Concurrent keep-alive connections (one task each).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Stop after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many requests (whichever bound comes first).
    #[arg(long, default_value_t = 10_000_000)]
    pub requests: u64,
    /// Seeds file written by `seed` (verify and mixed).
    #[arg(long)]
    pub seeds: Option<PathBuf>,
    /// Use only the first N seeded tokens.
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Mixed scenario weights.
    #[arg(
        long,
        default_value = "verify=80,revoked=10,create=4,logout=3,list=2,admin=1"
    )]
    pub mix: String,
    /// Issuer API key (default: the first of SESSIONGATE_ISSUER_KEYS).
    #[arg(long, env = "SESSIONGATE_ISSUER_KEYS", hide_env_values = true)]
    pub issuer_key: Option<String>,
    /// Admin API key (default: the first of SESSIONGATE_ADMIN_KEYS).
    #[arg(long, env = "SESSIONGATE_ADMIN_KEYS", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Metadata of sessions the run creates: none, typical or a JSON object.
    #[arg(long, default_value = "typical")]
    pub metadata: String,
    /// How long another instance may still accept a token after a
    /// logout-all (the contract's "within 1 s"); logout and force-logout get
    /// no grace anywhere.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub logout_all_grace: Duration,
    /// How long B may still accept a token after its logout or
    /// force-logout on A: 0 (the default: sessiongate confirms every verify
    /// in Redis), or the near-cache's bound when B runs with
    /// SESSIONGATE_NEAR_CACHE_TTL. Acceptances after a revocation are
    /// measured either way (`acceptance_after_revocation_us`).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub revocation_grace: Duration,
    /// Revocation scenario: revocation kinds, in turn.
    #[arg(long, default_value = "logout,force-logout,logout-all")]
    pub kinds: String,
    /// Revocation scenario: live sessions the background connections verify.
    #[arg(long, default_value_t = 32)]
    pub pool: usize,
    /// Revocation scenario: concurrent verifiers (half on A, half on B)
    /// hammering each logout / force-logout victim while it is revoked.
    #[arg(long, default_value_t = 8)]
    pub racers: usize,
    /// Revocation scenario: give up waiting for B to refuse after this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub probe_timeout: Duration,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the JSON report to stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Write the JSON report to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Write a latency percentile plot (SVG) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// 5xx answers tolerated before the run fails (exit 1). Keep 0 while
    /// Redis is up: the service answers 5xx only when Redis is not.
    #[arg(long, default_value_t = 0)]
    pub max_server_errors: u64,
    /// Fail (exit 3) when more than this share of requests got no answer.
    #[arg(long, default_value_t = 0.01)]
    pub max_error_ratio: f64,
}

/// `250ms`, `5s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 250ms, 5s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The first key of a comma-separated list (as in SESSIONGATE_*_KEYS).
pub fn first_key(list: &str) -> Option<String> {
    list.split(',')
        .map(str::trim)
        .find(|k| !k.is_empty())
        .map(str::to_string)
}

/// A 120-byte user agent, as browsers send.
pub const TYPICAL_USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.6478.126 Safari/537.36 Vivaldi/6.8.3";

/// Session metadata from `--metadata`, as a JSON value (`None`: no metadata).
/// `typical` varies the IP per session (same length for every session).
pub fn metadata(spec: &str, n: u64) -> Result<Option<serde_json::Value>, String> {
    match spec {
        "none" | "" => Ok(None),
        "typical" => Ok(Some(serde_json::json!({
            "ip": format!("198.51.100.{}", 10 + n % 90),
            "user_agent": TYPICAL_USER_AGENT,
        }))),
        json => match serde_json::from_str::<serde_json::Value>(json) {
            Ok(v @ serde_json::Value::Object(_)) => Ok(Some(v)),
            _ => Err(format!(
                "--metadata must be none, typical or a JSON object, not {json:?}"
            )),
        },
    }
}

/// A fresh id for this run, so runs against one Redis never share users.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "lt{:x}{:x}",
        (nanos as u64) & 0xffff_ffff_ffff,
        std::process::id()
    )
}

/// A small, fast, seeded generator (xorshift64*); no need for crypto here.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// Why a command failed, with the exit status it maps to.
pub enum Failure {
    Usage(String),
    Run(String),
    Unsafe(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessiongate-load: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let threads = cli.threads.max(1);
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Seed(args) => seed::seed(args).await,
            Command::Run(args) => run::run(args, threads).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("sessiongate-load: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("sessiongate-load: FAILED: {e}");
            ExitCode::from(3)
        }
        Err(Failure::Unsafe(e)) => {
            eprintln!("sessiongate-load: WRONG ANSWERS: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn typical_metadata_is_an_ip_and_a_120_byte_user_agent() {
        assert_eq!(TYPICAL_USER_AGENT.len(), 120);
        let m = metadata("typical", 7).unwrap().unwrap();
        assert_eq!(m["ip"], "198.51.100.17");
        assert!(metadata("none", 0).unwrap().is_none());
        assert!(metadata(r#"{"label":"x"}"#, 0).unwrap().is_some());
        assert!(metadata("[1]", 0).is_err());
    }

    #[test]
    fn first_key_of_a_list() {
        assert_eq!(first_key(" a , b").as_deref(), Some("a"));
        assert_eq!(first_key(",,"), None);
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
