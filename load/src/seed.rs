//! `seed`: create sessions through the API, concurrently, and save them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, Uri};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::json;

use crate::client::Conn;
use crate::stats::error_code;
use crate::target::Target;
use crate::tokens::{SeedRow, bearer, revoked_path, write_seeds};
use crate::{Failure, SeedArgs, first_key, metadata};

/// Attempts per session on a transport error or a 503.
const ATTEMPTS: u32 = 5;

/// The answer of `POST /v1/sessions` (the fields the harness keeps).
#[derive(Deserialize)]
pub struct Created {
    pub token: String,
    pub session_id: String,
    pub user_id: String,
    pub device_id: String,
}

/// The JSON body of a create.
pub fn create_body(user: &str, device: &str, meta: Option<serde_json::Value>) -> Bytes {
    let mut body = json!({ "user_id": user, "device_id": device });
    if let Some(m) = meta {
        body["metadata"] = m;
    }
    Bytes::from(serde_json::to_vec(&body).expect("JSON"))
}

pub async fn seed(args: SeedArgs) -> Result<(), Failure> {
    let target = Target::parse(&args.target).map_err(Failure::Usage)?;
    let key = first_key(&args.issuer_key)
        .ok_or_else(|| Failure::Usage("--issuer-key is empty".into()))?;
    metadata(&args.metadata, 0).map_err(Failure::Usage)?;
    let users = args.users.unwrap_or(args.count).max(1);
    let per_user = args.count.div_ceil(users);
    if per_user > 10 {
        eprintln!(
            "seed: warning: {per_user} sessions per user; the service's default cap is 10 \
             (max_sessions_per_user): older ones will be evicted and their tokens refused"
        );
    }
    let ctx = Arc::new(SeedCtx {
        target,
        auth: bearer(&key),
        args: args.clone(),
        users,
        next: AtomicU64::new(0),
        timeout: args.timeout,
    });
    let bar = ProgressBar::new(args.count);
    bar.set_style(
        ProgressStyle::with_template(
            "seed {bar:40} {pos}/{len} sessions  {per_sec}  eta {eta}  {msg}",
        )
        .expect("valid template"),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections.max(1) {
        let ctx = ctx.clone();
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move { seed_task(ctx, bar).await }));
    }
    let mut rows: Vec<(u64, SeedRow)> = Vec::with_capacity(args.count as usize);
    let mut failures = 0u64;
    let mut first_error = None;
    for t in tasks {
        let out = t
            .await
            .map_err(|e| Failure::Run(format!("seed task: {e}")))?;
        rows.extend(out.rows);
        failures += out.failures;
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    rows.sort_unstable_by_key(|(i, _)| *i);
    let rows: Vec<SeedRow> = rows.into_iter().map(|(_, r)| r).collect();
    write_seeds(&args.out, &rows)
        .map_err(|e| Failure::Run(format!("{}: {e}", args.out.display())))?;
    // New sessions: what earlier runs revoked on the old file is moot.
    let side = revoked_path(&args.out);
    match std::fs::remove_file(&side) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Failure::Run(format!("{}: {e}", side.display())));
        }
        _ => {}
    }
    let rate = rows.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "seed: {} sessions for {} users in {:.2} s ({:.0}/s) over {} connections; {} failed; wrote {}",
        rows.len(),
        users.min(args.count),
        elapsed.as_secs_f64(),
        rate,
        args.connections,
        failures,
        args.out.display()
    );
    if let Some(path) = &args.json_out {
        let summary = json!({
            "created": rows.len(),
            "failed": failures,
            "users": users.min(args.count),
            "connections": args.connections,
            "metadata": args.metadata,
            "seconds": elapsed.as_secs_f64(),
            "per_second": rate,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&summary).expect("JSON"))
            .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    }
    if failures > 0 {
        return Err(Failure::Run(format!(
            "{failures} of {} sessions could not be created (first error: {})",
            args.count,
            first_error.unwrap_or_default()
        )));
    }
    Ok(())
}

struct SeedCtx {
    target: Target,
    auth: hyper::header::HeaderValue,
    args: SeedArgs,
    users: u64,
    next: AtomicU64,
    timeout: Duration,
}

struct SeedOut {
    rows: Vec<(u64, SeedRow)>,
    failures: u64,
    first_error: Option<String>,
}

async fn seed_task(ctx: Arc<SeedCtx>, bar: ProgressBar) -> SeedOut {
    let mut conn = Conn::new(&ctx.target, ctx.timeout);
    let mut out = SeedOut {
        rows: Vec::new(),
        failures: 0,
        first_error: None,
    };
    let uri = Uri::from_static("/v1/sessions");
    loop {
        let i = ctx.next.fetch_add(1, Ordering::Relaxed);
        if i >= ctx.args.count {
            return out;
        }
        let user = format!("{}{}", ctx.args.user_prefix, i % ctx.users);
        let device = format!("dev-{}", i / ctx.users);
        let meta = metadata(&ctx.args.metadata, i).expect("checked before");
        let body = create_body(&user, &device, meta);
        let mut last_error = String::new();
        let mut created = None;
        for attempt in 0..ATTEMPTS {
            let req = conn.request(
                Method::POST,
                uri.clone(),
                Some(&ctx.auth),
                Some(body.clone()),
            );
            match conn.send(req).await {
                Ok(r) if r.status == 201 => match serde_json::from_slice::<Created>(&r.body) {
                    Ok(c) => {
                        created = Some(c);
                        break;
                    }
                    Err(e) => last_error = format!("201 with an unreadable body: {e}"),
                },
                Ok(r) => {
                    last_error = format!("{} {}", r.status, error_code(&r.body));
                    if r.status != 503 {
                        break;
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        match created {
            Some(c) => out.rows.push((
                i,
                SeedRow {
                    token: c.token,
                    session_id: c.session_id,
                    user_id: c.user_id,
                    device_id: c.device_id,
                },
            )),
            None => {
                out.failures += 1;
                if out.first_error.is_none() {
                    bar.set_message(format!("error: {last_error}"));
                    out.first_error = Some(last_error);
                }
            }
        }
        bar.inc(1);
    }
}
