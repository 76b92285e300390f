//! `run`: the closed-loop scenarios (healthz, verify, mixed), the shared
//! budget, and the hand-off to the report.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use hyper::{Method, Request, Uri};
use serde_json::Value;

use crate::client::{Body, Conn, Reply, path_segment};
use crate::report::{Report, finish};
use crate::seed::{Created, create_body};
use crate::stats::{Op, Stats, error_code};
use crate::target::Target;
use crate::tokens::{
    Clock, Kind, Safety, Table, TokenInfo, bearer, read_revoked, read_seeds, revoked_path,
    write_revoked,
};
use crate::{Failure, Rng, RunArgs, Scenario, first_key, metadata, run_id};

/// Both bounds of a run: a deadline and a request budget; plus a stop flag.
pub struct Budget {
    deadline: Instant,
    remaining: AtomicI64,
    stop: AtomicBool,
}

impl Budget {
    pub fn new(duration: Duration, requests: u64) -> Budget {
        Budget {
            deadline: Instant::now() + duration,
            remaining: AtomicI64::new(requests.min(i64::MAX as u64) as i64),
            stop: AtomicBool::new(false),
        }
    }

    /// Takes one request from the budget; false when the run is over.
    pub fn take(&self) -> bool {
        self.open() && self.remaining.fetch_sub(1, Ordering::Relaxed) > 0
    }

    /// Whether the run is still on (without taking anything).
    pub fn open(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
            && self.remaining.load(Ordering::Relaxed) > 0
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends one request and records it; `None` on a transport error (after a
/// short pause, so a dead target does not turn into a busy loop).
pub async fn exchange(
    conn: &mut Conn,
    stats: &mut Stats,
    op: Op,
    req: Request<Body>,
) -> Option<Reply> {
    match conn.send(req).await {
        Ok(r) => {
            stats.record(op, r.latency(), r.status, &r.body);
            Some(r)
        }
        Err(e) => {
            stats.record_transport(op, e.kind());
            stats.note_error(&e);
            tokio::time::sleep(Duration::from_millis(10)).await;
            None
        }
    }
}

pub fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

/// What the closed-loop scenarios share.
struct Ctx {
    target: Target,
    timeout: Duration,
    clock: Clock,
    table: Table,
    safety: Safety,
    /// Tokens the harness revoked (for `verify_revoked`).
    revoked: Mutex<Vec<u32>>,
    /// Verify rotates through the first `rotate` tokens (verify scenario).
    rotate: usize,
    issuer: Option<HeaderValue>,
    admin: Option<HeaderValue>,
    metadata: String,
    run_id: String,
    created: AtomicU64,
    mix: Mix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MixOp {
    Verify,
    Revoked,
    Create,
    Logout,
    List,
    Admin,
}

struct Mix {
    /// Cumulative weights.
    steps: Vec<(u64, MixOp)>,
    total: u64,
}

impl Mix {
    fn parse(spec: &str) -> Result<Mix, String> {
        let mut steps = Vec::new();
        let mut total = 0u64;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("--mix: {part:?} is not NAME=WEIGHT"))?;
            let op = match name.trim() {
                "verify" => MixOp::Verify,
                "revoked" => MixOp::Revoked,
                "create" => MixOp::Create,
                "logout" => MixOp::Logout,
                "list" => MixOp::List,
                "admin" => MixOp::Admin,
                other => {
                    return Err(format!(
                        "--mix: unknown operation {other:?} (verify, revoked, create, logout, list, admin)"
                    ));
                }
            };
            let w: u64 = weight
                .trim()
                .parse()
                .map_err(|_| format!("--mix: weight of {name} is not a whole number"))?;
            if w > 0 {
                total += w;
                steps.push((total, op));
            }
        }
        if total == 0 {
            return Err("--mix: no operation has a weight".into());
        }
        Ok(Mix { steps, total })
    }

    fn pick(&self, rng: &mut Rng) -> MixOp {
        let r = rng.below(self.total);
        self.steps
            .iter()
            .find(|(upto, _)| r < *upto)
            .map(|(_, op)| *op)
            .unwrap_or(MixOp::Verify)
    }

    fn has(&self, op: MixOp) -> bool {
        self.steps.iter().any(|(_, o)| *o == op)
    }
}

pub async fn run(args: RunArgs, threads: usize) -> Result<(), Failure> {
    let target = Target::parse(&args.target).map_err(Failure::Usage)?;
    let target_b = args
        .target_b
        .as_deref()
        .map(Target::parse)
        .transpose()
        .map_err(Failure::Usage)?;
    if args.connections == 0 {
        return Err(Failure::Usage("--connections must be at least 1".into()));
    }
    if args.duration.is_zero() || args.requests == 0 {
        return Err(Failure::Usage(
            "--duration and --requests must both be positive".into(),
        ));
    }
    metadata(&args.metadata, 0).map_err(Failure::Usage)?;
    let issuer = args
        .issuer_key
        .as_deref()
        .and_then(first_key)
        .map(|k| bearer(&k));
    let admin = args
        .admin_key
        .as_deref()
        .and_then(first_key)
        .map(|k| bearer(&k));
    if args.scenario == Scenario::Revocation {
        let b = target_b.ok_or_else(|| {
            Failure::Usage("the revocation scenario needs --target-b (a second instance)".into())
        })?;
        return crate::revocation::run(args, threads, target, b, issuer, admin).await;
    }
    let mix = Mix::parse(&args.mix).map_err(Failure::Usage)?;
    // Seeded sessions earlier runs on this seeds file revoked, and those not
    // loaded now (past --tokens): written back with this run's at the end.
    let mut sidecar = None;
    let table = match args.scenario {
        Scenario::Healthz => Table::new(),
        _ => {
            let path = args.seeds.as_ref().ok_or_else(|| {
                Failure::Usage("--seeds FILE is needed (write one with `seed`)".into())
            })?;
            let mut rows = read_seeds(path).map_err(Failure::Usage)?;
            if let Some(n) = args.tokens {
                rows.truncate(n);
            }
            if rows.is_empty() {
                return Err(Failure::Usage(format!("{}: no tokens", path.display())));
            }
            let table = Table::from_seeds(&rows);
            let side = revoked_path(path);
            let rest = table.apply_revoked(read_revoked(&side).map_err(Failure::Usage)?);
            sidecar = Some((side, rows.len(), rest));
            table
        }
    };
    if args.scenario == Scenario::Mixed {
        if issuer.is_none() && mix.has(MixOp::Create) {
            return Err(Failure::Usage(
                "mixed with create needs --issuer-key or SESSIONGATE_ISSUER_KEYS".into(),
            ));
        }
        if admin.is_none() && mix.has(MixOp::Admin) {
            return Err(Failure::Usage(
                "mixed with admin needs --admin-key or SESSIONGATE_ADMIN_KEYS".into(),
            ));
        }
    }
    let ctx = Arc::new(Ctx {
        target: target.clone(),
        timeout: args.timeout,
        clock: Clock::start(),
        rotate: table.len(),
        table,
        safety: Safety::new(args.logout_all_grace.as_nanos() as u64)
            .with_revocation_grace(args.revocation_grace.as_nanos() as u64),
        revoked: Mutex::new(Vec::new()),
        issuer,
        admin,
        metadata: args.metadata.clone(),
        run_id: run_id(),
        created: AtomicU64::new(0),
        mix,
    });
    let budget = Arc::new(Budget::new(args.duration, args.requests));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..args.connections {
        let ctx = ctx.clone();
        let budget = budget.clone();
        let scenario = args.scenario;
        let stride = (ctx.rotate / args.connections).max(1);
        tasks.push(tokio::spawn(async move {
            match scenario {
                Scenario::Healthz => healthz_task(ctx, budget).await,
                Scenario::Verify => verify_task(ctx, budget, id * stride).await,
                _ => mixed_task(ctx, budget, id, id * stride).await,
            }
        }));
    }
    let mut stats = Stats::default();
    for t in tasks {
        stats.merge(t.await.map_err(|e| Failure::Run(format!("task: {e}")))?);
    }
    let elapsed = started.elapsed();
    if let Some((side, seeded, rest)) = sidecar {
        let mut entries = ctx.table.revoked_seeds(seeded);
        if !entries.is_empty() || !rest.is_empty() {
            entries.extend(rest);
            write_revoked(&side, &entries)
                .map_err(|e| Failure::Run(format!("{}: {e}", side.display())))?;
        }
    }
    let report = Report {
        args: &args,
        threads,
        targets: vec![target.url.clone()],
        stats: &stats,
        safety: &ctx.safety,
        elapsed,
        extra: Value::Null,
        propagation: None,
    };
    finish(report)
}

async fn healthz_task(ctx: Arc<Ctx>, budget: Arc<Budget>) -> Stats {
    let mut conn = Conn::new(&ctx.target, ctx.timeout);
    let mut stats = Stats::default();
    let uri = Uri::from_static("/healthz");
    while budget.take() {
        let req = conn.request(Method::GET, uri.clone(), None, None);
        exchange(&mut conn, &mut stats, Op::Healthz, req).await;
    }
    stats
}

async fn verify_task(ctx: Arc<Ctx>, budget: Arc<Budget>, start: usize) -> Stats {
    let mut conn = Conn::new(&ctx.target, ctx.timeout);
    let mut stats = Stats::default();
    let uri = Uri::from_static("/v1/verify");
    let mut i = start;
    while budget.take() {
        let idx = i % ctx.rotate;
        i += 1;
        let Some((_, info)) = ctx.table.get(idx) else {
            continue;
        };
        let req = conn.request(Method::GET, uri.clone(), Some(&info.auth), None);
        if let Some(r) = exchange(&mut conn, &mut stats, Op::Verify, req).await {
            judge(&ctx, idx, &r, 0, Op::Verify);
        }
    }
    stats
}

/// Applies the safety and refusal rules to answers to token-bearing requests.
pub struct Judge<'a> {
    pub clock: &'a Clock,
    pub table: &'a Table,
    pub safety: &'a Safety,
}

impl Judge<'_> {
    /// `own_logout`: `r` answers that token's own logout.
    pub fn reply(&self, idx: usize, r: &Reply, instance: u8, op: Op, own_logout: bool) {
        if is_2xx(r.status) {
            self.safety
                .accepted(self.table, idx, self.clock.ns(r.sent), instance, op);
        } else if matches!(r.status, 401 | 403) {
            self.safety.refused(
                self.table,
                idx,
                self.clock.ns(r.done),
                instance,
                op,
                r.status,
                &error_code(&r.body),
                own_logout,
            );
        }
    }
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

fn judge(ctx: &Ctx, idx: usize, r: &Reply, instance: u8, op: Op) {
    ctx.judge().reply(idx, r, instance, op, false);
}

/// The next live token after `*cursor` (a few tries), advancing the cursor.
fn next_live<'a>(ctx: &'a Ctx, cursor: &mut usize) -> Option<(usize, &'a TokenInfo)> {
    let n = ctx.table.len();
    if n == 0 {
        return None;
    }
    for _ in 0..64 {
        let idx = *cursor % n;
        *cursor += 1;
        if let Some((slot, info)) = ctx.table.get(idx)
            && slot.is_live()
        {
            return Some((idx, info));
        }
    }
    None
}

async fn mixed_task(ctx: Arc<Ctx>, budget: Arc<Budget>, id: usize, start: usize) -> Stats {
    let mut conn = Conn::new(&ctx.target, ctx.timeout);
    let mut stats = Stats::default();
    let mut rng = Rng::new(id as u64 + 1);
    let mut cursor = start;
    let mut claim_cursor = (rng.next_u64() as usize) % ctx.table.len().max(1);
    let verify = Uri::from_static("/v1/verify");
    let sessions = Uri::from_static("/v1/sessions");
    let current = Uri::from_static("/v1/sessions/current");
    while budget.take() {
        match ctx.mix.pick(&mut rng) {
            MixOp::Revoked => {
                let picked = {
                    let revoked = ctx.revoked.lock().expect("not poisoned");
                    if revoked.is_empty() {
                        None
                    } else {
                        Some(revoked[rng.below(revoked.len() as u64) as usize] as usize)
                    }
                };
                match picked.and_then(|idx| ctx.table.get(idx).map(|(_, i)| (idx, i))) {
                    Some((idx, info)) => {
                        let req = conn.request(Method::GET, verify.clone(), Some(&info.auth), None);
                        if let Some(r) =
                            exchange(&mut conn, &mut stats, Op::VerifyRevoked, req).await
                        {
                            judge(&ctx, idx, &r, 0, Op::VerifyRevoked);
                        }
                    }
                    // Nothing revoked yet: a valid verify instead.
                    None => verify_live(&ctx, &mut conn, &mut stats, &mut cursor, &verify).await,
                }
            }
            MixOp::Verify => verify_live(&ctx, &mut conn, &mut stats, &mut cursor, &verify).await,
            MixOp::List => {
                if let Some((idx, info)) = next_live(&ctx, &mut cursor) {
                    let req = conn.request(Method::GET, sessions.clone(), Some(&info.auth), None);
                    if let Some(r) = exchange(&mut conn, &mut stats, Op::List, req).await {
                        judge(&ctx, idx, &r, 0, Op::List);
                    }
                }
            }
            MixOp::Create => {
                let n = ctx.created.fetch_add(1, Ordering::Relaxed);
                let user = format!("{}-c{n}", ctx.run_id);
                let body = create_body(&user, "d0", metadata(&ctx.metadata, n).expect("checked"));
                let req = conn.request(
                    Method::POST,
                    sessions.clone(),
                    ctx.issuer.as_ref(),
                    Some(body),
                );
                if let Some(r) = exchange(&mut conn, &mut stats, Op::Create, req).await
                    && r.status == 201
                    && let Ok(c) = serde_json::from_slice::<Created>(&r.body)
                {
                    ctx.table.push(
                        TokenInfo {
                            auth: bearer(&c.token),
                            session_id: c.session_id.into(),
                        },
                        ctx.clock.ns(r.done),
                    );
                }
            }
            MixOp::Logout => {
                let n = ctx.table.len().max(1);
                let mut claimed = None;
                for _ in 0..64 {
                    let idx = claim_cursor % n;
                    claim_cursor += 1;
                    if let Some((slot, info)) = ctx.table.get(idx)
                        && slot.claim()
                    {
                        claimed = Some((idx, slot, info));
                        break;
                    }
                }
                let Some((idx, slot, info)) = claimed else {
                    continue;
                };
                slot.logout_sent(ctx.clock.now());
                let req = conn.request(Method::DELETE, current.clone(), Some(&info.auth), None);
                match exchange(&mut conn, &mut stats, Op::Logout, req).await {
                    Some(r) if r.status == 204 => {
                        judge(&ctx, idx, &r, 0, Op::Logout);
                        slot.revoke(ctx.clock.ns(r.done), Kind::Logout);
                        ctx.revoked.lock().expect("not poisoned").push(idx as u32);
                    }
                    Some(r) if matches!(r.status, 401 | 403) => {
                        // Already gone: right if a force-logout of it was sent
                        // before this answer arrived, wrong otherwise.
                        ctx.judge().reply(idx, &r, 0, Op::Logout, true);
                        slot.revoke(ctx.clock.ns(r.done), Kind::Logout);
                    }
                    // Unknown outcome: never use this token again, claim nothing.
                    _ => slot.state.store(crate::tokens::REVOKED, Ordering::Release),
                }
            }
            MixOp::Admin => {
                let users = &ctx.table.users;
                if users.is_empty() {
                    continue;
                }
                let mut pick = None;
                for _ in 0..16 {
                    let u = rng.below(users.len() as u64) as usize;
                    if users[u]
                        .1
                        .iter()
                        .any(|&i| ctx.table.slot(i as usize).is_some_and(|s| s.is_live()))
                    {
                        pick = Some(u);
                        break;
                    }
                }
                let Some(u) = pick else { continue };
                let (name, idxs) = &users[u];
                let uri: Uri = format!("/v1/admin/users/{}/sessions", path_segment(name))
                    .parse()
                    .expect("an encoded path is a URI");
                // From now on a refusal of the user's tokens is explained.
                let sending = ctx.clock.now();
                for &i in idxs {
                    if let Some(slot) = ctx.table.slot(i as usize) {
                        slot.revoking(sending);
                    }
                }
                let req = conn.request(Method::DELETE, uri, ctx.admin.as_ref(), None);
                let answer = exchange(&mut conn, &mut stats, Op::ForceLogout, req).await;
                if answer.as_ref().is_none_or(|r| r.status != 200) {
                    // Unknown outcome: never pick these tokens as live again.
                    for &i in idxs {
                        if let Some(slot) = ctx.table.slot(i as usize) {
                            slot.state.store(crate::tokens::REVOKED, Ordering::Release);
                        }
                    }
                }
                if let Some(r) = answer
                    && r.status == 200
                {
                    let at = ctx.clock.ns(r.done);
                    let mut revoked = ctx.revoked.lock().expect("not poisoned");
                    for &i in idxs {
                        if let Some(slot) = ctx.table.slot(i as usize) {
                            slot.revoke(at, Kind::ForceLogout);
                            revoked.push(i);
                        }
                    }
                }
            }
        }
    }
    stats
}

async fn verify_live(ctx: &Ctx, conn: &mut Conn, stats: &mut Stats, cursor: &mut usize, uri: &Uri) {
    if let Some((idx, info)) = next_live(ctx, cursor) {
        let req = conn.request(Method::GET, uri.clone(), Some(&info.auth), None);
        if let Some(r) = exchange(conn, stats, Op::Verify, req).await {
            judge(ctx, idx, &r, 0, Op::Verify);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_picks_by_weight() {
        let mix = Mix::parse("verify=80,revoked=10,create=4,logout=3,list=2,admin=1").unwrap();
        assert_eq!(mix.total, 100);
        let mut rng = Rng::new(1);
        let mut verify = 0;
        for _ in 0..10_000 {
            if mix.pick(&mut rng) == MixOp::Verify {
                verify += 1;
            }
        }
        assert!((7_500..8_500).contains(&verify), "{verify}");
        assert!(Mix::parse("verify=x").is_err());
        assert!(Mix::parse("fly=1").is_err());
        assert!(Mix::parse("verify=0").is_err());
        assert!(!Mix::parse("verify=1,admin=0").unwrap().has(MixOp::Admin));
    }

    #[test]
    fn budget_stops_at_the_request_count() {
        let b = Budget::new(Duration::from_secs(60), 3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        let b = Budget::new(Duration::ZERO, 100);
        assert!(!b.take());
    }
}
