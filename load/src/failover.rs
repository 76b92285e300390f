//! The `failover` scenario: verifies and logouts against a sessiongate on a
//! replicated Redis (Sentinel, or a Cluster shard) while the primary is
//! killed mid-run by `--kill-command` (e.g. `scripts/redis-sentinel
//! kill-primary`), at `--kill-after`.
//!
//! Reports: logouts acknowledged (204) and how many of them were lost (a
//! 200 for that token on a request sent after the 204, during the run or
//! in the final check once the service is back), the outage window (first
//! to last failed verify of a live session after the kill), the time from
//! the kill until verifies answered again, and verify throughput before the
//! kill and after the recovery. Exit 1 when any acknowledged logout was
//! lost; 3 when the service never came back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use hyper::{Method, Uri};
use serde_json::json;

use crate::client::Conn;
use crate::run::Budget;
use crate::seed::{Created, create_body};
use crate::target::Target;
use crate::tokens::bearer;
use crate::{Failure, RunArgs, run_id};

/// One verify answer: sent, status (0: no answer), of a live session?
type VerifyLog = Arc<Mutex<Vec<(Instant, u16, bool)>>>;

struct Session {
    auth: HeaderValue,
    /// When its logout was acknowledged (the 204 read), if it was.
    acked: Mutex<Option<Instant>>,
}

pub async fn run(args: RunArgs, target: Target, issuer: HeaderValue) -> Result<(), Failure> {
    let kill = args.kill_command.clone().ok_or_else(|| {
        Failure::Usage(
            "the failover scenario needs --kill-command (e.g. \"scripts/redis-sentinel kill-primary\")"
                .into(),
        )
    })?;
    let run = run_id();
    let victims = args.pool.max(1) * 8;
    let live = 8;
    let mut conn = Conn::new(&target, args.timeout);
    let mut sessions = Vec::new();
    for i in 0..victims + live {
        let body = create_body(&format!("{run}-fo{i}"), "load", None);
        let req = conn.request(
            Method::POST,
            Uri::from_static("/v1/sessions"),
            Some(&issuer),
            Some(body),
        );
        let reply = conn
            .send(req)
            .await
            .map_err(|e| Failure::Run(format!("create: {}", e.kind())))?;
        if reply.status != 201 {
            return Err(Failure::Run(format!("create answered {}", reply.status)));
        }
        let created: Created = serde_json::from_slice(&reply.body)
            .map_err(|e| Failure::Run(format!("create reply: {e}")))?;
        sessions.push(Session {
            auth: bearer(&created.token),
            acked: Mutex::new(None),
        });
    }
    let sessions = Arc::new(sessions);
    let budget = Arc::new(Budget::new(args.duration, u64::MAX));
    let log: VerifyLog = Arc::default();
    let resurrected = Arc::new(Mutex::new(0u64));
    let started = Instant::now();

    let mut tasks = Vec::new();
    for c in 0..args.connections.max(1) {
        let (sessions, budget, log, resurrected, target) = (
            sessions.clone(),
            budget.clone(),
            log.clone(),
            resurrected.clone(),
            target.clone(),
        );
        let timeout = args.timeout;
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&target, timeout);
            let mut i = c;
            while budget.open() {
                let s = &sessions[i % sessions.len()];
                let is_live = i % sessions.len() >= victims;
                i = i.wrapping_add(7);
                let req = conn.request(
                    Method::GET,
                    Uri::from_static("/v1/verify"),
                    Some(&s.auth),
                    None,
                );
                let sent = Instant::now();
                let status = match conn.send(req).await {
                    Ok(reply) => {
                        let acked = *s.acked.lock().unwrap();
                        if reply.status == 200 && acked.is_some_and(|a| a < reply.sent) {
                            *resurrected.lock().unwrap() += 1;
                        }
                        reply.status
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        0
                    }
                };
                log.lock().unwrap().push((sent, status, is_live));
            }
        }));
    }
    let logouts = {
        let (sessions, budget, target) = (sessions.clone(), budget.clone(), target.clone());
        let timeout = args.timeout;
        tokio::spawn(async move {
            let mut conn = Conn::new(&target, timeout);
            let (mut acked, mut refused) = (0u64, 0u64);
            for s in sessions.iter().take(victims) {
                if !budget.open() {
                    break;
                }
                let req = conn.request(
                    Method::DELETE,
                    Uri::from_static("/v1/sessions/current"),
                    Some(&s.auth),
                    None,
                );
                match conn.send(req).await {
                    Ok(reply) if reply.status == 204 => {
                        *s.acked.lock().unwrap() = Some(reply.done);
                        acked += 1;
                    }
                    _ => refused += 1,
                }
                // Spread the logouts over the whole run.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, refused)
        })
    };

    tokio::time::sleep(args.kill_after).await;
    let killed_at = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&kill)
            .status()
    })
    .await
    .map_err(|e| Failure::Run(format!("kill command: {e}")))?
    .map_err(|e| Failure::Run(format!("kill command: {e}")))?;
    if !status.success() {
        budget.stop();
        return Err(Failure::Run(format!("--kill-command exited with {status}")));
    }
    let (acked, refused) = logouts.await.map_err(|e| Failure::Run(e.to_string()))?;
    for t in tasks {
        let _ = t.await;
    }
    let ended = Instant::now();

    // The final check, once a live session verifies again (within 30 s).
    let mut conn = Conn::new(&target, args.timeout);
    let back_by = Instant::now() + Duration::from_secs(30);
    loop {
        let req = conn.request(
            Method::GET,
            Uri::from_static("/v1/verify"),
            Some(&sessions[victims].auth),
            None,
        );
        if conn.send(req).await.is_ok_and(|r| r.status == 200) {
            break;
        }
        if Instant::now() > back_by {
            return Err(Failure::Run(
                "the service did not answer a live session 200 within 30 s of the run's end".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lost = 0u64;
    for s in sessions.iter().take(victims) {
        if s.acked.lock().unwrap().is_none() {
            continue;
        }
        let req = conn.request(
            Method::GET,
            Uri::from_static("/v1/verify"),
            Some(&s.auth),
            None,
        );
        if conn.send(req).await.is_ok_and(|r| r.status != 401) {
            lost += 1;
        }
    }
    let resurrected = *resurrected.lock().unwrap();

    let log = log.lock().unwrap();
    let failed_live: Vec<Instant> = log
        .iter()
        .filter(|(sent, status, live)| *live && *sent >= killed_at && *status != 200)
        .map(|(sent, _, _)| *sent)
        .collect();
    let first_fail = failed_live.first().copied();
    let last_fail = failed_live.last().copied();
    let answered = |from: Instant, to: Instant| {
        let n = log
            .iter()
            .filter(|(sent, status, _)| *sent >= from && *sent < to && [200, 401].contains(status))
            .count();
        n as f64 / to.duration_since(from).as_secs_f64().max(1e-3)
    };
    let before = answered(started, killed_at);
    let recovered = last_fail.unwrap_or(killed_at);
    let after = if recovered < ended {
        answered(recovered, ended)
    } else {
        0.0
    };
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let report = json!({
        "scenario": "failover",
        "target": target.url,
        "logouts_acknowledged": acked,
        "logouts_refused": refused,
        "acknowledged_revocations_lost": lost + resurrected,
        "lost_in_final_check": lost,
        "resurrected_during_run": resurrected,
        "outage_window_ms": ms(first_fail.zip(last_fail).map(|(a, b)| b.duration_since(a))),
        "back_after_kill_ms": ms(last_fail.map(|l| l.duration_since(killed_at))),
        "verify_per_s_before": before,
        "verify_per_s_after": after,
    });
    let show = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |ms| format!("{ms:.0} ms"));
    eprintln!(
        "failover: {acked} logouts acknowledged ({refused} refused), {} lost; outage {}, \
         back {} after the kill; verify {before:.0}/s before, {after:.0}/s after",
        lost + resurrected,
        show(&report["outage_window_ms"]),
        show(&report["back_after_kill_ms"]),
    );
    if args.json {
        println!("{report}");
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, report.to_string())
            .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    }
    if lost + resurrected > 0 {
        return Err(Failure::Unsafe(format!(
            "{} acknowledged logouts were undone by the failover",
            lost + resurrected
        )));
    }
    Ok(())
}
