//! The revocation scenario: two instances (A and B) sharing one Redis.
//!
//! One driver repeats rounds, taking the kinds in turn:
//! 1. create the round's sessions on A (one for logout and logout-all,
//!    three devices of a fresh user for force-logout);
//! 2. check that B verifies them (200);
//! 3. revoke on A (`DELETE /v1/sessions/current`,
//!    `DELETE /v1/admin/users/{user}/sessions` or `POST /v1/admin/logout-all`);
//!    Logout and force-logout rounds also race: `--racers` tasks (half on
//!    A, half on B, each on its own connection) start hammering the
//!    round's victims with verifies before the revocation is sent and keep
//!    on until each has had answers to requests sent after A's
//!    acknowledgement; a 2xx to a request sent before it is fine, one sent
//!    after it is a violation. (A logout-all's victims are the background
//!    pool, already verified on both instances throughout.)
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hyper::header::HeaderValue;
use hyper::{Method, Uri};
use serde_json::Value;
use tokio::sync::watch;

use crate::client::{Conn, Reply, path_segment};
use crate::report::{PropKind, Report, finish};
use crate::run::{Budget, Judge, exchange, is_2xx};
use crate::seed::{Created, create_body};
use crate::stats::{Op, Stats, micros, new_hist};
use crate::target::Target;
use crate::tokens::{Clock, Kind, NEVER, Safety, Table, TokenInfo, bearer};
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
    racers: usize,
}

/// Answers each racer must get to requests sent after the acknowledgement.
const RACE_AFTER_ACK: u64 = 3;

/// One race: the racers hammer `victims` until `stop`.
struct Race {
    victims: Vec<usize>,
    /// When A's acknowledgement was read (`NEVER` until then).
    acked_ns: AtomicU64,
    stop: AtomicBool,
    /// Racers that have had an answer in this race.
    started: AtomicUsize,
    /// Racers that have had `RACE_AFTER_ACK` answers to requests sent after
    /// the acknowledgement.
    satisfied: AtomicUsize,
    /// Racers still inside this race (a request may be in flight).
    active: AtomicUsize,
    checks: AtomicU64,
    after_ack: AtomicU64,
    accepted_before_ack: AtomicU64,
    accepted_after_ack: AtomicU64,
}

impl Race {
    fn new(victims: Vec<usize>, racers: usize) -> Race {
        Race {
            victims,
            acked_ns: AtomicU64::new(NEVER),
            stop: AtomicBool::new(false),
            started: AtomicUsize::new(0),
            satisfied: AtomicUsize::new(0),
            active: AtomicUsize::new(racers),
            checks: AtomicU64::new(0),
            after_ack: AtomicU64::new(0),
            accepted_before_ack: AtomicU64::new(0),
            accepted_after_ack: AtomicU64::new(0),
        }
    }
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
        safety: Safety::new(args.logout_all_grace.as_nanos() as u64)
            .with_revocation_grace(args.revocation_grace.as_nanos() as u64),
        issuer,
        admin,
        metadata: args.metadata.clone(),
        run_id: run_id(),
        kinds,
        pool_size: args.pool.max(1),
        pool: AtomicU64::new(0),
        racers: args.racers,
    });
    let (race_tx, race_rx) = watch::channel::<Option<Arc<Race>>>(None);
    let budget = Arc::new(Budget::new(args.duration, args.requests));
    let started = Instant::now();
    let driver = {
        let ctx = ctx.clone();
        let budget = budget.clone();
        tokio::spawn(async move {
            let out = driver(&ctx, &budget, &race_tx).await;
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
    for id in 0..args.racers {
        let ctx = ctx.clone();
        let rx = race_rx.clone();
        tasks.push(tokio::spawn(async move {
            racer(&ctx, rx, (id % 2) as u8, id).await
        }));
    }
    drop(race_rx);
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
            judge(ctx, idx, &r, instance, op);
        }
    }
    stats
}

/// Hammers the victims of each race it is given, until the driver ends it;
/// returns when the driver is gone.
async fn racer(
    ctx: &Ctx,
    mut rx: watch::Receiver<Option<Arc<Race>>>,
    instance: u8,
    id: usize,
) -> Stats {
    let (target, op) = if instance == 0 {
        (&ctx.a, Op::RaceA)
    } else {
        (&ctx.b, Op::RaceB)
    };
    let mut conn = Conn::new(target, ctx.timeout);
    let mut stats = Stats::default();
    let uri = Uri::from_static("/v1/verify");
    let mut seen: Option<Arc<Race>> = None;
    loop {
        let race = loop {
            let current = rx.borrow_and_update().clone();
            if let Some(race) = current
                && !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &race))
            {
                break race;
            }
            if rx.changed().await.is_err() {
                return stats;
            }
        };
        seen = Some(race.clone());
        let mut i = id;
        let mut answered = false;
        let mut after = 0u64;
        while !race.stop.load(Ordering::Acquire) {
            let idx = race.victims[i % race.victims.len()];
            i += 1;
            let Some((_, info)) = ctx.table.get(idx) else {
                break;
            };
            let req = conn.request(Method::GET, uri.clone(), Some(&info.auth), None);
            let Some(r) = exchange(&mut conn, &mut stats, op, req).await else {
                continue;
            };
            judge(ctx, idx, &r, instance, op);
            race.checks.fetch_add(1, Ordering::Relaxed);
            if !answered {
                answered = true;
                race.started.fetch_add(1, Ordering::AcqRel);
            }
            if ctx.clock.ns(r.sent) >= race.acked_ns.load(Ordering::Acquire) {
                race.after_ack.fetch_add(1, Ordering::Relaxed);
                if is_2xx(r.status) {
                    race.accepted_after_ack.fetch_add(1, Ordering::Relaxed);
                }
                after += 1;
                if after == RACE_AFTER_ACK {
                    race.satisfied.fetch_add(1, Ordering::AcqRel);
                }
            } else if is_2xx(r.status) {
                race.accepted_before_ack.fetch_add(1, Ordering::Relaxed);
            }
        }
        race.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits (polling every millisecond) until `done` or the deadline; whether
/// it was done.
async fn wait_until(deadline: Instant, done: impl Fn() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

fn judge(ctx: &Ctx, idx: usize, r: &Reply, instance: u8, op: Op) {
    ctx.judge().reply(idx, r, instance, op, false);
}

impl Ctx {
    fn judge(&self) -> Judge<'_> {
        Judge {
            clock: &self.clock,
            table: &self.table,
            safety: &self.safety,
        }
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
    race_checks: u64,
    race_after_ack: u64,
    race_2xx_before_ack: u64,
    race_2xx_after_ack: u64,
    race_incomplete: u64,
}

type DriverOut = Result<(Stats, Vec<PropKind>), (Stats, String)>;

async fn driver(
    ctx: &Ctx,
    budget: &Budget,
    race_tx: &watch::Sender<Option<Arc<Race>>>,
) -> DriverOut {
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
            race_checks: 0,
            race_after_ack: 0,
            race_2xx_before_ack: 0,
            race_2xx_after_ack: 0,
            race_incomplete: 0,
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
                Some(r) if r.status == 200 => judge(ctx, idx, &r, 1, Op::Confirm),
                Some(r) => {
                    judge(ctx, idx, &r, 1, Op::Confirm);
                    confirmed = false;
                }
                None => confirmed = false,
            }
        }
        if !confirmed {
            a.failed += 1;
            continue;
        }
        // Logout and force-logout: the racers start on the victims first.
        let race = (kind != Kind::LogoutAll && ctx.racers > 0).then(|| {
            let race = Arc::new(Race::new(victims.clone(), ctx.racers));
            race_tx.send_replace(Some(race.clone()));
            race
        });
        if let Some(race) = &race {
            // Not a failure when slow: the race is then merely less tight.
            let n = ctx.racers;
            wait_until(Instant::now() + ctx.probe_timeout, || {
                race.started.load(Ordering::Acquire) >= n
            })
            .await;
        }
        // Revoke on A. From now on a refusal of the victims is explained.
        let sending = ctx.clock.now();
        for &idx in &victims {
            if let Some(slot) = ctx.table.slot(idx) {
                match kind {
                    Kind::Logout => slot.logout_sent(sending),
                    _ => slot.revoking(sending),
                }
            }
        }
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
        let answer = exchange(&mut ca, &mut stats, op, req).await;
        let Some(r) = answer.as_ref().filter(|r| is_2xx(r.status)) else {
            if let Some(r) = &answer
                && kind == Kind::Logout
            {
                ctx.judge().reply(victims[0], r, 0, Op::Logout, true);
            }
            if let Some(race) = race {
                end_race(race_tx, &race, ctx.timeout).await;
            }
            a.failed += 1;
            continue;
        };
        let acked = r.done;
        let at = ctx.clock.ns(acked);
        // No `.await` from reading the answer to recording it.
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
        if let Some(race) = &race {
            race.acked_ns.store(at, Ordering::Release);
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
                    judge(ctx, idx, &r, 1, Op::Probe);
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
                judge(ctx, idx, &r, 0, Op::ProbeA);
            }
        }
        if let Some(race) = race {
            let n = ctx.racers;
            let done = wait_until(acked + ctx.probe_timeout, || {
                race.satisfied.load(Ordering::Acquire) >= n
            })
            .await;
            end_race(race_tx, &race, ctx.timeout).await;
            a.race_incomplete += u64::from(!done);
            a.race_checks += race.checks.load(Ordering::Acquire);
            a.race_after_ack += race.after_ack.load(Ordering::Acquire);
            a.race_2xx_before_ack += race.accepted_before_ack.load(Ordering::Acquire);
            a.race_2xx_after_ack += race.accepted_after_ack.load(Ordering::Acquire);
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
            race_checks: a.race_checks,
            race_after_ack: a.race_after_ack,
            race_2xx_before_ack: a.race_2xx_before_ack,
            race_2xx_after_ack: a.race_2xx_after_ack,
            race_incomplete: a.race_incomplete,
        })
        .collect();
    Ok((stats, kinds))
}

/// Stops a race and waits for its racers to leave it (their last requests
/// answered or timed out), so its counts are complete.
async fn end_race(race_tx: &watch::Sender<Option<Arc<Race>>>, race: &Race, timeout: Duration) {
    race.stop.store(true, Ordering::Release);
    race_tx.send_replace(None);
    wait_until(Instant::now() + timeout + Duration::from_secs(1), || {
        race.active.load(Ordering::Acquire) == 0
    })
    .await;
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
