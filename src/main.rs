//! The `sessiongate` binary: `sessiongate serve` runs the service;
//! `sessiongate admin …` is the operator's client of its admin API.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sessiongate::config::Settings;
use sessiongate::startup::Application;

/// mimalloc instead of glibc's malloc: a verify allocates and frees a few
/// dozen small blocks (the request, its futures, the Redis command and
/// reply), and glibc spent about 9 % of the service's CPU on them in the
/// yardstick's profile (`_int_malloc`, `_int_free`, `malloc_consolidate`
/// for the boxed handler future); mimalloc's per-thread free lists cut it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Revocable sessions for token-based apps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (settings from config/default.toml, SESSIONGATE_CONFIG
    /// and SESSIONGATE_* variables).
    Serve,
    /// Revoke every session created at or before a time, on every instance:
    /// for Redis restored from a backup that predates logouts.
    RevokeBefore {
        /// Unix seconds, or "now".
        at: String,
    },
    /// Operator commands over the HTTP admin API: list and revoke sessions,
    /// sign out users, devices or everyone, rotate the signing key, introspect
    /// a token.
    Admin(cli::admin::AdminArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The admin client needs none of the server's settings (and reads its
    // own SESSIONGATE_URL / _ADMIN_KEY / _ADMIN_KEY_FILE, which serve never does).
    let command = match cli.command {
        Command::Admin(args) => return cli::admin::run(args),
        command => command,
    };
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sessiongate: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    sessiongate::telemetry::init(&settings.log_level, settings.log_format);
    let result = actix_web::rt::System::new().block_on(async move {
        match command {
            Command::Serve => serve(settings).await,
            Command::RevokeBefore { at } => revoke_before(settings, &at).await,
            Command::Admin(_) => unreachable!("handled before start-up"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessiongate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the data lives, without credentials, for the start-up log.
fn redis_description(settings: &Settings) -> String {
    let list = |urls: &[sessiongate::config::RedisUrl]| {
        urls.iter()
            .map(|u| u.redacted())
            .collect::<Vec<_>>()
            .join(",")
    };
    if !settings.redis_sentinels.is_empty() {
        format!(
            "sentinel master {:?} via {}",
            settings.redis_sentinel_master,
            list(&settings.redis_sentinels)
        )
    } else if !settings.redis_cluster_nodes.is_empty() {
        format!("cluster {}", list(&settings.redis_cluster_nodes))
    } else {
        settings.redis_url.redacted()
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let app = Application::build(settings.clone())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        listen = %settings.listen,
        port = app.port(),
        redis = %redis_description(&settings),
        "sessiongate serving"
    );
    app.run_until_stopped().await.map_err(|e| e.to_string())
}

async fn revoke_before(settings: Settings, at: &str) -> Result<(), String> {
    let at_ms = match at {
        "now" => None,
        secs => Some(
            secs.parse::<i64>()
                .ok()
                .filter(|s| *s > 0)
                .and_then(|s| s.checked_mul(1000))
                .ok_or_else(|| format!("{secs:?} is not Unix seconds or \"now\""))?,
        ),
    };
    // A cutoff in the future would refuse every login until then, and it
    // never moves back: refuse it (Redis clamps to its own now as well).
    if let Some(ms) = at_ms
        && ms > sessiongate::session::now_ms() + 1000
    {
        return Err(format!(
            "{at} is in the future (Unix seconds expected, not milliseconds); nothing changed"
        ));
    }
    let metrics = std::sync::Arc::new(sessiongate::metrics::Metrics::new());
    let store = sessiongate::store::Store::from_settings(&settings, 1, metrics)
        .map_err(|e| e.to_string())?;
    let record = store
        .global_as(sessiongate::store::GlobalOp::Cutoff { at_ms }, "operator")
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "global cutoff is now {} ms: every session created at or before it is revoked",
        record.cutoff_ms
    );
    Ok(())
}
