//! The revocation scenario: two instances (A and B) sharing one Redis.
//!
//! One driver repeats rounds, taking the kinds in turn:
//! 1. create the round's sessions on A (one for logout and logout-all,
//!    three devices of a fresh user for force-logout);
//! 2. check that B verifies them (200);
//! 3. revoke on A (`DELETE /v1/sessions/current`,
//!    `DELETE /v1/admin/users/{user}/sessions` or `POST /v1/admin/logout-all`);
//! 4. poll B with each token until it answers 401: the time from A's answer
//!    to B's first refusal is that token's propagation latency; any 2xx from
//!    B meanwhile goes through the safety rule (logout-all has the contract's
//!    cross-instance grace, the others none);
//! 5. check that A refuses them too (at once);
//! 6. after a logout-all, create a fresh pool for the background load.
//!
//! Meanwhile `--connections` background connections (half on A, half on B)
//! verify the pool's live tokens; their answers go through the same rule.
//! The driver's own requests are not taken from `--requests` (they are few);
//! the background ones are.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hyper::header::HeaderValue;
use hyper::{Method, Uri};
use serde_json::Value;

use crate::client::{Conn, path_segment};
use crate::report::{PropKind, Report, finish};
use crate::run::{Budget, exchange, is_2xx};
use crate::seed::{Created, create_body};
use crate::stats::{Op, Stats, micros, new_hist};
use crate::target::Target;
use crate::tokens::{Clock, Kind, Safety, Table, TokenInfo, bearer};
use crate::{Failure, RunArgs, metadata, run_id};

struct Ctx {
    a: Target,
    b: Target,
    timeout: Duration,
    probe_timeout: Duration,
    clock: Clock,
    table: Table,
    safety: Safety,
    issuer: HeaderValue,
    admin: Option<HeaderValue>,
    metadata: String,
    run_id: String,
    kinds: Vec<Kind>,
    pool_size: usize,
    /// The live pool: `start << 32 | len` (table indices).
    pool: AtomicU64,
}

fn parse_kinds(spec: &str) -> Result<Vec<Kind>, String> {
    let mut kinds = Vec::new();
    for k in spec.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        kinds.push(match k {
            "logout" => Kind::Logout,
            "force-logout" | "force_logout" => Kind::ForceLogout,
            "logout-all" | "logout_all" => Kind::LogoutAll,
            other => {
                return Err(format!(
                    "--kinds: unknown kind {other:?} (logout, force-logout, logout-all)"
                ));
            }
        });
    }
    if kinds.is_empty() {
        return Err("--kinds: name at least one kind".into());
    }
    Ok(kinds)
}

pub async fn run(
    args: RunArgs,
    threads: usize,
    a: Target,
    b: Target,
    issuer: Option<HeaderValue>,
    admin: Option<HeaderValue>,
) -> Result<(), Failure> {
    let kinds = parse_kinds(&args.kinds).map_err(Failure::Usage)?;
    let issuer = issuer.ok_or_else(|| {
        Failure::Usage("revocation needs --issuer-key or SESSIONGATE_ISSUER_KEYS".into())
    })?;
    if admin.is_none() && kinds.iter().any(|k| *k != Kind::Logout) {
        return Err(Failure::Usage(
            "force-logout and logout-all need --admin-key or SESSIONGATE_ADMIN_KEYS".into(),
        ));
    }
    if args.connections < 2 {
        return Err(Failure::Usage(
            "revocation needs --connections of at least 2 (background load on A and B)".into(),
        ));
    }
    let ctx = Arc::new(Ctx {
        a: a.clone(),
        b: b.clone(),
        timeout: args.timeout,
        probe_timeout: args.probe_timeout,
        clock: Clock::start(),
        table: Table::new(),
        safety: Safety::new(args.logout_all_grace.as_nanos() as u64),
        issuer,
        admin,
        metadata: args.metadata.clone(),
        run_id: run_id(),
        kinds,
        pool_size: args.pool.max(1),
        pool: AtomicU64::new(0),
    });
    let budget = Arc::new(Budget::new(args.duration, args.requests));
    let started = Instant::now();
    let driver = {
        let ctx = ctx.clone();
        let budget = budget.clone();
        tokio::spawn(async move {
            let out = driver(&ctx, &budget).await;
            // The background load has no purpose without the driver.
            budget.stop();
            out
        })
    };
    let mut tasks = Vec::new();
    for id in 0..args.connections {
        let ctx = ctx.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            background(&ctx, &budget, (id % 2) as u8, id).await
        }));
    }
    let (mut stats, kinds, driver_error) = match driver.await {
        Ok(Ok((stats, kinds))) => (stats, kinds, None),
        Ok(Err((stats, e))) => (stats, Vec::new(), Some(e)),
        Err(e) => (Stats::default(), Vec::new(), Some(format!("driver: {e}"))),
    };
    for t in tasks {
        stats.merge(t.await.map_err(|e| Failure::Run(format!("task: {e}")))?);
    }
    let elapsed = started.elapsed();
    let report = Report {
        args: &args,
        threads,
        targets: vec![a.url.clone(), b.url.clone()],
        stats: &stats,
        safety: &ctx.safety,
        elapsed,
        extra: Value::Null,
        propagation: Some(&kinds),
    };
    let result = finish(report);
    match driver_error {
        Some(e) if result.is_ok() => Err(Failure::Run(e)),
        _ => result,
    }
}

async fn background(ctx: &Ctx, budget: &Budget, instance: u8, offset: usize) -> Stats {
    let (target, op) = if instance == 0 {
        (&ctx.a, Op::VerifyA)
    } else {
        (&ctx.b, Op::VerifyB)
    };
    let mut conn = Conn::new(target, ctx.timeout);
    let mut stats = Stats::default();
    let uri = Uri::from_static("/v1/verify");
    let mut i = offset;
    loop {
        let pool = ctx.pool.load(Ordering::Acquire);
        let (start, len) = ((pool >> 32) as usize, (pool & 0xffff_ffff) as usize);
        if len == 0 {
            if !budget.open() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        if !budget.take() {
            break;
        }
        let idx = start + i % len;
        i += 1;
        let Some((_, info)) = ctx.table.get(idx) else {
            continue;
        };
        let req = conn.request(Method::GET, uri.clone(), Some(&info.auth), None);
        if let Some(r) = exchange(&mut conn, &mut stats, op, req).await {
            judge(ctx, idx, r.status, r.sent, r.done, instance, op);
        }
    }
    stats
}

fn judge(ctx: &Ctx, idx: usize, status: u16, sent: Instant, done: Instant, instance: u8, op: Op) {
    if is_2xx(status) {
        ctx.safety
            .accepted(&ctx.table, idx, ctx.clock.ns(sent), instance, op);
    } else if status == 401 {
        ctx.safety
            .refused(&ctx.table, idx, ctx.clock.ns(done), instance);
    }
}

/// Creates one session on A and records its token; its table index.
async fn create(
    ctx: &Ctx,
    conn: &mut Conn,
    stats: &mut Stats,
    user: &str,
    device: &str,
    n: u64,
) -> Option<usize> {
    let body = create_body(user, device, metadata(&ctx.metadata, n).expect("checked"));
    let req = conn.request(
        Method::POST,
        Uri::from_static("/v1/sessions"),
        Some(&ctx.issuer),
        Some(body),
    );
    let r = exchange(conn, stats, Op::Create, req).await?;
    if r.status != 201 {
        return None;
    }
    let c: Created = serde_json::from_slice(&r.body).ok()?;
    ctx.table.push(
        TokenInfo {
            auth: bearer(&c.token),
            session_id: c.session_id.into(),
        },
        ctx.clock.ns(r.done),
    )
}

/// A new pool of live sessions for the background load.
async fn refill_pool(
    ctx: &Ctx,
    conn: &mut Conn,
    stats: &mut Stats,
    generation: u64,
) -> Result<(), String> {
    let mut first = None;
    let mut last = 0;
    for i in 0..ctx.pool_size {
        let user = format!("{}-p{generation}-{i}", ctx.run_id);
        if let Some(idx) = create(ctx, conn, stats, &user, "d0", i as u64).await {
            first.get_or_insert(idx);
            last = idx;
        }
    }
    let first = first.ok_or("could not create any session on A")?;
    let len = last - first + 1;
    ctx.pool
        .store(((first as u64) << 32) | len as u64, Ordering::Release);
    Ok(())
}

struct KindAcc {
    kind: Kind,
    hist: Histogram<u64>,
    rounds: u64,
    not_propagated: u64,
    accepted_after_ack: u64,
    failed: u64,
}

type DriverOut = Result<(Stats, Vec<PropKind>), (Stats, String)>;

async fn driver(ctx: &Ctx, budget: &Budget) -> DriverOut {
    let mut ca = Conn::new(&ctx.a, ctx.timeout);
    let mut cb = Conn::new(&ctx.b, ctx.timeout);
    let mut stats = Stats::default();
    let mut acc: Vec<KindAcc> = [Kind::Logout, Kind::ForceLogout, Kind::LogoutAll]
        .into_iter()
        .filter(|k| ctx.kinds.contains(k))
        .map(|kind| KindAcc {
            kind,
            hist: new_hist(),
            rounds: 0,
            not_propagated: 0,
            accepted_after_ack: 0,
            failed: 0,
        })
        .collect();
    let mut generation = 0u64;
    if let Err(e) = refill_pool(ctx, &mut ca, &mut stats, generation).await {
        return Err((stats, e));
    }
    let verify = Uri::from_static("/v1/verify");
    let mut round = 0usize;
    while budget.open() {
        let kind = ctx.kinds[round % ctx.kinds.len()];
        round += 1;
        let a = acc
            .iter_mut()
            .find(|a| a.kind == kind)
            .expect("every kind has an accumulator");
        a.rounds += 1;
        let user = format!("{}-r{round}", ctx.run_id);
        let devices = if kind == Kind::ForceLogout { 3 } else { 1 };
        let mut victims = Vec::new();
        for d in 0..devices {
            if let Some(idx) = create(
                ctx,
                &mut ca,
                &mut stats,
                &user,
                &format!("d{d}"),
                round as u64,
            )
            .await
            {
                victims.push(idx);
            }
        }
        if victims.len() < devices {
            a.failed += 1;
            continue;
        }
        // B must know the sessions before they are revoked.
        let mut confirmed = true;
        for &idx in &victims {
            let auth = &ctx.table.get(idx).expect("pushed").1.auth;
            let req = cb.request(Method::GET, verify.clone(), Some(auth), None);
            match exchange(&mut cb, &mut stats, Op::Confirm, req).await {
                Some(r) if r.status == 200 => {
                    judge(ctx, idx, r.status, r.sent, r.done, 1, Op::Confirm)
                }
                _ => confirmed = false,
            }
        }
        if !confirmed {
            a.failed += 1;
            continue;
        }
        // Revoke on A.
        let req = match kind {
            Kind::Logout => {
                let auth = &ctx.table.get(victims[0]).expect("pushed").1.auth;
                ca.request(
                    Method::DELETE,
                    Uri::from_static("/v1/sessions/current"),
                    Some(auth),
                    None,
                )
            }
            Kind::ForceLogout => {
                let uri: Uri = format!("/v1/admin/users/{}/sessions", path_segment(&user))
                    .parse()
                    .expect("an encoded path is a URI");
                ca.request(Method::DELETE, uri, ctx.admin.as_ref(), None)
            }
            Kind::LogoutAll => {
                ctx.safety.logout_all_pending(ctx.clock.now());
                ca.request(
                    Method::POST,
                    Uri::from_static("/v1/admin/logout-all"),
                    ctx.admin.as_ref(),
                    None,
                )
            }
        };
        let op = match kind {
            Kind::Logout => Op::Logout,
            Kind::ForceLogout => Op::ForceLogout,
            Kind::LogoutAll => Op::LogoutAll,
        };
        let Some(r) = exchange(&mut ca, &mut stats, op, req).await else {
            a.failed += 1;
            continue;
        };
        if !is_2xx(r.status) {
            a.failed += 1;
            continue;
        }
        let acked = r.done;
        let at = ctx.clock.ns(acked);
        match kind {
            Kind::Logout | Kind::ForceLogout => {
                for &idx in &victims {
                    if let Some(slot) = ctx.table.slot(idx) {
                        slot.revoke(at, kind);
                    }
                }
            }
            Kind::LogoutAll => ctx.safety.logout_all(ctx.clock.ns(r.sent), at, 0),
        }
        // Poll B until it refuses every token of the round.
        let mut pending = victims.clone();
        let deadline = acked + ctx.probe_timeout;
        while !pending.is_empty() && Instant::now() < deadline {
            let mut k = 0;
            while k < pending.len() {
                let idx = pending[k];
                let auth = &ctx.table.get(idx).expect("pushed").1.auth;
                let req = cb.request(Method::GET, verify.clone(), Some(auth), None);
                if let Some(r) = exchange(&mut cb, &mut stats, Op::Probe, req).await {
                    if r.status == 401 {
                        a.hist
                            .saturating_record(micros(r.done.duration_since(acked)));
                        pending.swap_remove(k);
                        continue;
                    }
                    if is_2xx(r.status) {
                        a.accepted_after_ack += 1;
                    }
                    judge(ctx, idx, r.status, r.sent, r.done, 1, Op::Probe);
                }
                k += 1;
            }
        }
        a.not_propagated += pending.len() as u64;
        // A refuses at once.
        for &idx in &victims {
            let auth = &ctx.table.get(idx).expect("pushed").1.auth;
            let req = ca.request(Method::GET, verify.clone(), Some(auth), None);
            if let Some(r) = exchange(&mut ca, &mut stats, Op::ProbeA, req).await {
                judge(ctx, idx, r.status, r.sent, r.done, 0, Op::ProbeA);
            }
        }
        if kind == Kind::LogoutAll {
            // The pool is dead everywhere now (it kept being verified through
            // the propagation window, where a 2xx would count): pause the
            // background load until a fresh pool exists.
            ctx.pool.store(0, Ordering::Release);
            // The cutoff revokes sessions created at or before its
            // millisecond: let the clock move past it first.
            tokio::time::sleep(Duration::from_millis(3)).await;
            generation += 1;
            if let Err(e) = refill_pool(ctx, &mut ca, &mut stats, generation).await {
                return Err((stats, e));
            }
        }
    }
    let kinds = acc
        .into_iter()
        .map(|a| PropKind {
            name: a.kind.name(),
            hist: a.hist,
            rounds: a.rounds,
            not_propagated: a.not_propagated,
            accepted_after_ack: a.accepted_after_ack,
            failed: a.failed,
        })
        .collect();
    Ok((stats, kinds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse() {
        assert_eq!(
            parse_kinds("logout,force-logout,logout-all").unwrap(),
            vec![Kind::Logout, Kind::ForceLogout, Kind::LogoutAll]
        );
        assert!(parse_kinds("").is_err());
        assert!(parse_kinds("nuke").is_err());
    }
}
