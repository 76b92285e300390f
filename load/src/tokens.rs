//! Tokens the harness holds, what it did to them, and the safety rule.
//!
//! Safety rule: no 2xx may answer a request bearing a token whose revocation
//! the harness had seen acknowledged before it sent the request.
//!
//! Refusal rule: no 401/403 may answer a request bearing a token that is
//! alive, i.e. unless a revocation covering the token had been *sent* before
//! the refusal was *received* (a server can only apply a revocation after it
//! was sent, and it must have applied it before it refused). This needs no
//! allowance, even while revocations race verifies: a refusal that arrives
//! after the revocation was sent is always explained, one that arrives before
//! never is. Tokens the harness revoked in an earlier run on the same seeds
//! file are read from its sidecar (`<seeds>.revoked`, see `read_revoked`).
//!
//! * logout / force-logout: the token is revoked from the instant the
//!   harness finished reading the 204 / 200 (`revoked_ns`);
//! * logout-all: every token whose creation was acknowledged before the
//!   logout-all request was sent is revoked from the instant the 200 was
//!   read, at once on the instance that served it and, per the contract,
//!   within `grace` on every other instance sharing the Redis. A 2xx from
//!   another instance inside that window is counted apart, not as a
//!   violation.
//!
//! All instants are nanoseconds on one monotonic clock (`Clock`). A
//! revocation is recorded without any `.await` between reading the answer
//! and storing the instant, so with the single-threaded runtime (the
//! default) no later request can be checked against a stale record.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::Instant;

use bytes::Bytes;
use hyper::header::HeaderValue;
use serde_json::{Value, json};

use crate::stats::Op;

/// Instants as nanoseconds since the run's start (never 0).
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    pub fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.0).as_nanos() as u64 + 1
    }

    pub fn now(&self) -> u64 {
        self.ns(Instant::now())
    }
}

/// One line of a seeds file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedRow {
    pub token: String,
    pub session_id: String,
    pub user_id: String,
    pub device_id: String,
}

pub const SEEDS_HEADER: &str = "# sessiongate-load seeds v1: token\tsession_id\tuser_id\tdevice_id";

pub fn write_seeds(path: &Path, rows: &[SeedRow]) -> std::io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "{SEEDS_HEADER}")?;
    for r in rows {
        writeln!(
            out,
            "{}\t{}\t{}\t{}",
            r.token, r.session_id, r.user_id, r.device_id
        )?;
    }
    out.flush()
}

pub fn read_seeds(path: &Path) -> Result<Vec<SeedRow>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let mut f = line.split('\t');
        match (f.next(), f.next(), f.next(), f.next()) {
            (Some(t), Some(s), Some(u), Some(d)) if !t.is_empty() => rows.push(SeedRow {
                token: t.to_string(),
                session_id: s.to_string(),
                user_id: u.to_string(),
                device_id: d.to_string(),
            }),
            _ => {
                return Err(format!(
                    "{}:{}: expected token, session_id, user_id, device_id separated by tabs",
                    path.display(),
                    n + 1
                ));
            }
        }
    }
    Ok(rows)
}

pub const REVOKED_HEADER: &str =
    "# sessiongate-load revoked seeds v1: session_id\t(logout|force_logout|maybe)";

/// The sidecar of a seeds file: the seeded sessions the harness revoked in
/// earlier runs (acknowledged, or `maybe`: the answer was lost), so a later
/// run on the same seeds expects their refusal, and a 2xx for an
/// acknowledged one is a violation. `seed` removes it with a new file.
pub fn revoked_path(seeds: &Path) -> PathBuf {
    let mut p = seeds.as_os_str().to_owned();
    p.push(".revoked");
    PathBuf::from(p)
}

/// Reads a sidecar (none yet: empty): `(session_id, Some(kind) | None)`.
pub fn read_revoked(path: &Path) -> Result<Vec<(String, Option<Kind>)>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let bad = || format!("{}:{}: expected session_id, kind", path.display(), n + 1);
        let (sid, kind) = line.split_once('\t').ok_or_else(bad)?;
        let kind = match kind {
            "maybe" => None,
            k => Some(Kind::parse(k).ok_or_else(bad)?),
        };
        out.push((sid.to_string(), kind));
    }
    Ok(out)
}

pub fn write_revoked(path: &Path, entries: &[(String, Option<Kind>)]) -> std::io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "{REVOKED_HEADER}")?;
    for (sid, kind) in entries {
        writeln!(out, "{sid}\t{}", kind.map(Kind::name).unwrap_or("maybe"))?;
    }
    out.flush()
}

pub fn bearer(token: &str) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(format!("Bearer {token}")))
        .expect("tokens are header-safe")
}

/// What is known of one token.
pub struct TokenInfo {
    /// `Bearer <token>`, ready to send.
    pub auth: HeaderValue,
    pub session_id: Box<str>,
}

pub const NEVER: u64 = u64::MAX;

/// Token states.
pub const LIVE: u8 = 0;
/// Taken by a task that is logging it out.
pub const CLAIMED: u8 = 1;
pub const REVOKED: u8 = 2;

/// How a token was revoked (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Logout = 1,
    ForceLogout = 2,
    LogoutAll = 3,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Logout => "logout",
            Kind::ForceLogout => "force_logout",
            Kind::LogoutAll => "logout_all",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        [Kind::Logout, Kind::ForceLogout, Kind::LogoutAll]
            .into_iter()
            .find(|k| k.name() == name)
    }

    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Logout),
            2 => Some(Kind::ForceLogout),
            3 => Some(Kind::LogoutAll),
            _ => None,
        }
    }
}

pub struct Slot {
    info: OnceLock<TokenInfo>,
    /// When its creation was acknowledged (0: before the run).
    pub created_ns: AtomicU64,
    /// When its revocation was acknowledged (`NEVER`: not revoked).
    pub revoked_ns: AtomicU64,
    /// When a revocation covering it by another route than its own logout
    /// (a force-logout) was sent (`NEVER`: none); acknowledged or not.
    pub revoking_ns: AtomicU64,
    /// When the harness sent this token's own logout (`NEVER`: never).
    pub logout_sent_ns: AtomicU64,
    pub kind: AtomicU8,
    pub state: AtomicU8,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            info: OnceLock::new(),
            created_ns: AtomicU64::new(0),
            revoked_ns: AtomicU64::new(NEVER),
            revoking_ns: AtomicU64::new(NEVER),
            logout_sent_ns: AtomicU64::new(NEVER),
            kind: AtomicU8::new(0),
            state: AtomicU8::new(LIVE),
        }
    }

    pub fn info(&self) -> Option<&TokenInfo> {
        self.info.get()
    }

    /// Records an acknowledged revocation (the earliest one wins).
    pub fn revoke(&self, at_ns: u64, kind: Kind) {
        if self.revoked_ns.fetch_min(at_ns, Ordering::AcqRel) > at_ns {
            self.kind.store(kind as u8, Ordering::Release);
        }
        self.state.store(REVOKED, Ordering::Release);
    }

    /// A force-logout covering this token is about to be sent (call before
    /// taking its send instant).
    pub fn revoking(&self, at_ns: u64) {
        self.revoking_ns.fetch_min(at_ns, Ordering::AcqRel);
    }

    /// This token's own logout is about to be sent.
    pub fn logout_sent(&self, at_ns: u64) {
        self.logout_sent_ns.fetch_min(at_ns, Ordering::AcqRel);
    }

    pub fn is_live(&self) -> bool {
        self.state.load(Ordering::Acquire) == LIVE
    }

    /// Takes a live token for a logout; false if another task has it.
    pub fn claim(&self) -> bool {
        self.state
            .compare_exchange(LIVE, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

const CHUNK_BITS: usize = 14;
const CHUNK: usize = 1 << CHUNK_BITS;
const MAX_CHUNKS: usize = 1024; // 16 Mi tokens

/// An append-only table of tokens, shared by every task without locks:
/// fixed-size chunks allocated on first use.
pub struct Table {
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
    next: AtomicUsize,
    /// Seeded users: each user's token indices.
    pub users: Vec<(Box<str>, Vec<u32>)>,
}

impl Table {
    pub fn new() -> Table {
        Table {
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
            next: AtomicUsize::new(0),
            users: Vec::new(),
        }
    }

    /// A table holding seeded tokens, with their users indexed.
    pub fn from_seeds(rows: &[SeedRow]) -> Table {
        let mut table = Table::new();
        let mut by_user: HashMap<&str, u32> = HashMap::new();
        let mut users: Vec<(Box<str>, Vec<u32>)> = Vec::new();
        for r in rows {
            let u = *by_user.entry(r.user_id.as_str()).or_insert_with(|| {
                users.push((r.user_id.as_str().into(), Vec::new()));
                (users.len() - 1) as u32
            });
            let idx = table
                .push(
                    TokenInfo {
                        auth: bearer(&r.token),
                        session_id: r.session_id.as_str().into(),
                    },
                    0,
                )
                .expect("seeds fit in the table");
            users[u as usize].1.push(idx as u32);
        }
        table.users = users;
        table
    }

    /// Appends a token; `None` when the table is full.
    pub fn push(&self, info: TokenInfo, created_ns: u64) -> Option<usize> {
        let idx = self.next.fetch_add(1, Ordering::AcqRel);
        let chunk = self.chunks.get(idx >> CHUNK_BITS)?;
        let slots = chunk.get_or_init(|| (0..CHUNK).map(|_| Slot::new()).collect());
        let slot = &slots[idx & (CHUNK - 1)];
        slot.created_ns.store(created_ns, Ordering::Release);
        let _ = slot.info.set(info);
        Some(idx)
    }

    /// How many indices were handed out (some may still be filling in).
    pub fn len(&self) -> usize {
        self.next
            .load(Ordering::Acquire)
            .min(MAX_CHUNKS << CHUNK_BITS)
    }

    pub fn slot(&self, idx: usize) -> Option<&Slot> {
        self.chunks
            .get(idx >> CHUNK_BITS)?
            .get()
            .map(|c| &c[idx & (CHUNK - 1)])
    }

    /// Marks the tokens an earlier run revoked (from the seeds' sidecar) as
    /// revoked before this run began; returns the entries not in this table
    /// (to be written back unchanged).
    pub fn apply_revoked(
        &self,
        entries: Vec<(String, Option<Kind>)>,
    ) -> Vec<(String, Option<Kind>)> {
        if entries.is_empty() {
            return entries;
        }
        let by_sid: HashMap<&str, usize> = (0..self.len())
            .filter_map(|i| self.get(i).map(|(_, info)| (&*info.session_id, i)))
            .collect();
        let mut rest = Vec::new();
        for (sid, kind) in entries {
            match (by_sid.get(sid.as_str()).and_then(|&i| self.slot(i)), kind) {
                // 0: before any instant of this run.
                (Some(slot), Some(kind)) => slot.revoke(0, kind),
                (Some(slot), None) => {
                    slot.revoking(0);
                    slot.state.store(REVOKED, Ordering::Release);
                }
                (None, _) => rest.push((sid, kind)),
            }
        }
        rest
    }

    /// The seeded tokens (the first `seeded`) this or an earlier run
    /// revoked, for the sidecar.
    pub fn revoked_seeds(&self, seeded: usize) -> Vec<(String, Option<Kind>)> {
        (0..seeded.min(self.len()))
            .filter_map(|i| {
                let (slot, info) = self.get(i)?;
                let kind = if slot.revoked_ns.load(Ordering::Acquire) != NEVER {
                    Some(Kind::from_u8(slot.kind.load(Ordering::Acquire)).unwrap_or(Kind::Logout))
                } else if slot.revoking_ns.load(Ordering::Acquire) != NEVER
                    || slot.logout_sent_ns.load(Ordering::Acquire) != NEVER
                {
                    None
                } else {
                    return None;
                };
                Some((info.session_id.to_string(), kind))
            })
            .collect()
    }

    /// The slot and its token, once filled in.
    pub fn get(&self, idx: usize) -> Option<(&Slot, &TokenInfo)> {
        let slot = self.slot(idx)?;
        slot.info().map(|i| (slot, i))
    }
}

/// A logout-all as the harness saw it.
#[derive(Debug, Clone, Copy)]
struct LogoutAllMark {
    sent_ns: u64,
    acked_ns: u64,
    instance: u8,
}

#[derive(Debug, Clone)]
struct Violation {
    op: Op,
    instance: u8,
    kind: Kind,
    session_id: String,
    /// How long after the acknowledgement the offending request was sent.
    after_ns: u64,
}

/// A refusal of a token that was alive.
#[derive(Debug, Clone)]
struct WrongRefusal {
    op: Op,
    instance: u8,
    status: u16,
    error: String,
    session_id: String,
    /// How the harness knew the token was alive.
    alive_because: &'static str,
}

/// The safety bookkeeping shared by every task.
pub struct Safety {
    /// Cross-instance propagation window allowed for logout-all.
    grace_ns: u64,
    /// The same for logout and force-logout (0 unless the instances run a
    /// near-cache with a stated bound: `--revocation-grace`).
    revocation_grace_ns: u64,
    within_revocation_grace: AtomicU64,
    /// µs from a revocation's acknowledgement to the sending of each
    /// request bearing a revoked token that was nevertheless accepted
    /// (inside a grace window or not): acceptance after revocation.
    after_revocation: Mutex<hdrhistogram::Histogram<u64>>,
    logout_alls: RwLock<Vec<LogoutAllMark>>,
    n_logout_alls: AtomicUsize,
    /// When the logout-all in flight was sent (`NEVER`: none).
    pending_logout_all: AtomicU64,
    violations: AtomicU64,
    violations_by_kind: [AtomicU64; 4],
    within_grace: AtomicU64,
    wrong_refusals: AtomicU64,
    refusals_checked: AtomicU64,
    accepted_checked: AtomicU64,
    examples: Mutex<Vec<Violation>>,
    refusal_examples: Mutex<Vec<WrongRefusal>>,
}

const MAX_EXAMPLES: usize = 20;

impl Safety {
    pub fn new(grace_ns: u64) -> Safety {
        Safety {
            grace_ns,
            revocation_grace_ns: 0,
            within_revocation_grace: AtomicU64::new(0),
            after_revocation: Mutex::new(crate::stats::new_hist()),
            logout_alls: RwLock::new(Vec::new()),
            n_logout_alls: AtomicUsize::new(0),
            pending_logout_all: AtomicU64::new(NEVER),
            violations: AtomicU64::new(0),
            violations_by_kind: Default::default(),
            within_grace: AtomicU64::new(0),
            wrong_refusals: AtomicU64::new(0),
            refusals_checked: AtomicU64::new(0),
            accepted_checked: AtomicU64::new(0),
            examples: Mutex::new(Vec::new()),
            refusal_examples: Mutex::new(Vec::new()),
        }
    }

    /// Allows another instance than the revoking one (A) to accept a token
    /// up to `ns` after its logout or force-logout was acknowledged.
    pub fn with_revocation_grace(mut self, ns: u64) -> Safety {
        self.revocation_grace_ns = ns;
        self
    }

    /// A logout-all is about to be sent (call before taking its send instant).
    pub fn logout_all_pending(&self, sent_ns: u64) {
        self.pending_logout_all.store(sent_ns, Ordering::Release);
    }

    /// A logout-all sent at `sent_ns` was acknowledged by `instance` at
    /// `acked_ns`. (One that failed is left pending: it may have been applied.)
    pub fn logout_all(&self, sent_ns: u64, acked_ns: u64, instance: u8) {
        self.logout_alls
            .write()
            .expect("not poisoned")
            .push(LogoutAllMark {
                sent_ns,
                acked_ns,
                instance,
            });
        self.n_logout_alls.fetch_add(1, Ordering::AcqRel);
        self.pending_logout_all.store(NEVER, Ordering::Release);
    }

    /// The revocation in force for a token at `at_ns`, as seen by `instance`:
    /// `Some((kind, acked_ns, within_grace))`.
    fn revocation(&self, slot: &Slot, at_ns: u64, instance: u8) -> Option<(Kind, u64, bool)> {
        let r = slot.revoked_ns.load(Ordering::Acquire);
        if r <= at_ns {
            let kind = Kind::from_u8(slot.kind.load(Ordering::Acquire)).unwrap_or(Kind::Logout);
            // Revocations are made on A (instance 0).
            let grace = instance != 0 && at_ns - r < self.revocation_grace_ns;
            return Some((kind, r, grace));
        }
        if self.n_logout_alls.load(Ordering::Acquire) == 0 {
            return None;
        }
        let created = slot.created_ns.load(Ordering::Acquire);
        let marks = self.logout_alls.read().expect("not poisoned");
        marks
            .iter()
            .filter(|m| created < m.sent_ns && m.acked_ns <= at_ns)
            .map(|m| {
                let grace = m.instance != instance && at_ns - m.acked_ns < self.grace_ns;
                (Kind::LogoutAll, m.acked_ns, grace)
            })
            .min_by_key(|&(_, acked, grace)| (grace, acked))
    }

    /// A request bearing token `idx`, sent at `sent_ns` to `instance`, was
    /// answered 2xx.
    pub fn accepted(&self, table: &Table, idx: usize, sent_ns: u64, instance: u8, op: Op) {
        self.accepted_checked.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = table.slot(idx) else { return };
        let found = self.revocation(slot, sent_ns, instance);
        if let Some((_, acked_ns, _)) = found {
            self.after_revocation
                .lock()
                .expect("not poisoned")
                .saturating_record((sent_ns - acked_ns) / 1000);
        }
        match found {
            None => {}
            Some((Kind::LogoutAll, _, true)) => {
                self.within_grace.fetch_add(1, Ordering::Relaxed);
            }
            Some((_, _, true)) => {
                self.within_revocation_grace.fetch_add(1, Ordering::Relaxed);
            }
            Some((kind, acked_ns, false)) => {
                self.violations.fetch_add(1, Ordering::Relaxed);
                self.violations_by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
                let mut ex = self.examples.lock().expect("not poisoned");
                if ex.len() < MAX_EXAMPLES {
                    ex.push(Violation {
                        op,
                        instance,
                        kind,
                        session_id: slot
                            .info()
                            .map(|i| i.session_id.to_string())
                            .unwrap_or_default(),
                        after_ns: sent_ns - acked_ns,
                    });
                }
            }
        }
    }

    /// A request bearing token `idx`, answered at `done_ns` by `instance`,
    /// was refused (401 or 403). Counts it as a wrong refusal unless a
    /// revocation covering the token had been sent before `done_ns`. For the
    /// answer to the token's own logout, pass `own_logout`: its own request
    /// does not explain its refusal. A wrongly refused token is not picked as
    /// live again (so one dead token counts once per task at most).
    #[allow(clippy::too_many_arguments)]
    pub fn refused(
        &self,
        table: &Table,
        idx: usize,
        done_ns: u64,
        instance: u8,
        op: Op,
        status: u16,
        error: &str,
        own_logout: bool,
    ) {
        self.refusals_checked.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = table.slot(idx) else { return };
        let explained = slot.revoked_ns.load(Ordering::Acquire) <= done_ns
            || slot.revoking_ns.load(Ordering::Acquire) <= done_ns
            || (!own_logout && slot.logout_sent_ns.load(Ordering::Acquire) <= done_ns)
            || self.covered_by_logout_all(slot, done_ns);
        if explained {
            return;
        }
        self.wrong_refusals.fetch_add(1, Ordering::Relaxed);
        let created = slot.created_ns.load(Ordering::Acquire);
        let mut ex = self.refusal_examples.lock().expect("not poisoned");
        if ex.len() < MAX_EXAMPLES {
            ex.push(WrongRefusal {
                op,
                instance,
                status,
                error: error.to_string(),
                session_id: slot
                    .info()
                    .map(|i| i.session_id.to_string())
                    .unwrap_or_default(),
                alive_because: if created > 0 {
                    "created in this run, never revoked"
                } else {
                    "seeded, never revoked by the harness"
                },
            });
        }
        drop(ex);
        if own_logout {
            return;
        }
        // Dead for a reason the harness did not cause: stop picking it.
        let _ = slot
            .state
            .compare_exchange(LIVE, REVOKED, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether a logout-all sent before `done_ns` covers this token (created
    /// before the logout-all was sent), acknowledged yet or not.
    fn covered_by_logout_all(&self, slot: &Slot, done_ns: u64) -> bool {
        let created = slot.created_ns.load(Ordering::Acquire);
        let pending = self.pending_logout_all.load(Ordering::Acquire);
        if pending != NEVER && created < pending && pending <= done_ns {
            return true;
        }
        self.n_logout_alls.load(Ordering::Acquire) > 0
            && self
                .logout_alls
                .read()
                .expect("not poisoned")
                .iter()
                .any(|m| created < m.sent_ns && m.sent_ns <= done_ns)
    }

    pub fn wrong_refusals(&self) -> u64 {
        self.wrong_refusals.load(Ordering::Acquire)
    }

    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::Acquire)
    }

    pub fn to_json(&self) -> Value {
        let examples: Vec<Value> = self
            .examples
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|v| {
                json!({
                    "op": v.op.name(),
                    "instance": instance_name(v.instance),
                    "revoked_by": v.kind.name(),
                    "session_id": v.session_id,
                    "sent_ms_after_ack": v.after_ns as f64 / 1e6,
                })
            })
            .collect();
        let refusal_examples: Vec<Value> = self
            .refusal_examples
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|w| {
                json!({
                    "op": w.op.name(),
                    "instance": instance_name(w.instance),
                    "status": w.status,
                    "error": w.error,
                    "session_id": w.session_id,
                    "alive_because": w.alive_because,
                })
            })
            .collect();
        let by_kind = |k: Kind| self.violations_by_kind[k as usize].load(Ordering::Acquire);
        json!({
            "violations": self.violations(),
            "violations_by_kind": {
                "logout": by_kind(Kind::Logout),
                "force_logout": by_kind(Kind::ForceLogout),
                "logout_all": by_kind(Kind::LogoutAll),
            },
            "accepted_checked": self.accepted_checked.load(Ordering::Acquire),
            "accepted_within_logout_all_grace": self.within_grace.load(Ordering::Acquire),
            "logout_all_grace_ms": self.grace_ns as f64 / 1e6,
            "accepted_within_revocation_grace": self.within_revocation_grace.load(Ordering::Acquire),
            "revocation_grace_ms": self.revocation_grace_ns as f64 / 1e6,
            // µs from the acknowledgement to the request's sending.
            "acceptance_after_revocation_us": crate::stats::latency_json(
                &self.after_revocation.lock().expect("not poisoned"),
            ),
            "wrong_refusals": self.wrong_refusals(),
            "refusals_checked": self.refusals_checked.load(Ordering::Acquire),
            "examples": examples,
            "wrong_refusal_examples": refusal_examples,
        })
    }
}

pub fn instance_name(i: u8) -> &'static str {
    if i == 0 { "A" } else { "B" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(s: &str) -> TokenInfo {
        TokenInfo {
            auth: bearer(s),
            session_id: s.into(),
        }
    }

    #[test]
    fn table_appends_across_chunks() {
        let t = Table::new();
        for i in 0..(CHUNK + 10) {
            assert_eq!(t.push(info("x"), i as u64), Some(i));
        }
        assert_eq!(t.len(), CHUNK + 10);
        let (slot, _) = t.get(CHUNK + 3).unwrap();
        assert_eq!(slot.created_ns.load(Ordering::Acquire), (CHUNK + 3) as u64);
        assert!(t.get(CHUNK + 10).is_none());
    }

    #[test]
    fn seeds_roundtrip_and_users_are_indexed() {
        let dir = std::env::temp_dir().join(format!("sgl-seeds-{}", std::process::id()));
        let rows: Vec<SeedRow> = (0..5)
            .map(|i| SeedRow {
                token: format!("tok{i}"),
                session_id: format!("sid{i}"),
                user_id: format!("u{}", i % 2),
                device_id: format!("d{i}"),
            })
            .collect();
        write_seeds(&dir, &rows).unwrap();
        let back = read_seeds(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(back, rows);
        let t = Table::from_seeds(&back);
        assert_eq!(t.users.len(), 2);
        assert_eq!(t.users[0].1, vec![0, 2, 4]);
        assert_eq!(t.users[1].1, vec![1, 3]);
        assert_eq!(&*t.get(3).unwrap().1.session_id, "sid3");
    }

    #[test]
    fn a_2xx_after_an_acknowledged_logout_is_a_violation() {
        let t = Table::new();
        let s = Safety::new(1_000_000_000);
        let a = t.push(info("a"), 0).unwrap();
        s.accepted(&t, a, 100, 0, Op::Verify);
        assert_eq!(s.violations(), 0);
        t.slot(a).unwrap().revoke(200, Kind::Logout);
        s.accepted(&t, a, 150, 1, Op::Verify); // sent before the ack: fine
        assert_eq!(s.violations(), 0);
        s.accepted(&t, a, 200, 1, Op::Verify);
        assert_eq!(s.violations(), 1);
    }

    #[test]
    fn a_revocation_grace_spares_other_instances_only_and_is_measured() {
        let t = Table::new();
        let s = Safety::new(0).with_revocation_grace(1_000_000);
        let a = t.push(info("a"), 0).unwrap();
        t.slot(a).unwrap().revoke(200, Kind::Logout);
        s.accepted(&t, a, 200 + 500_000, 1, Op::VerifyB); // B, inside: counted apart
        assert_eq!(s.violations(), 0);
        s.accepted(&t, a, 200 + 1_000_000, 1, Op::VerifyB); // B, at the bound: violation
        assert_eq!(s.violations(), 1);
        s.accepted(&t, a, 300, 0, Op::VerifyA); // A: no grace
        assert_eq!(s.violations(), 2);
        let j = s.to_json();
        assert_eq!(j["accepted_within_revocation_grace"], 1);
        assert_eq!(j["acceptance_after_revocation_us"]["count"], 3);
        assert_eq!(j["acceptance_after_revocation_us"]["max"], 1_000);
    }

    #[test]
    fn logout_all_covers_tokens_created_before_it_was_sent() {
        let t = Table::new();
        let s = Safety::new(1_000);
        let old = t.push(info("old"), 10).unwrap();
        let new = t.push(info("new"), 60).unwrap();
        s.logout_all(50, 100, 0);
        // the serving instance: at once
        s.accepted(&t, old, 100, 0, Op::VerifyA);
        assert_eq!(s.violations(), 1);
        // another instance: inside the grace window it is counted apart…
        s.accepted(&t, old, 500, 1, Op::VerifyB);
        assert_eq!(s.violations(), 1);
        // …and after it, it is a violation
        s.accepted(&t, old, 1_100, 1, Op::VerifyB);
        assert_eq!(s.violations(), 2);
        // a token created after the logout-all was sent is not covered
        s.accepted(&t, new, 5_000, 0, Op::VerifyA);
        assert_eq!(s.violations(), 2);
        let j = s.to_json();
        assert_eq!(j["accepted_within_logout_all_grace"], 1);
        assert_eq!(j["violations_by_kind"]["logout_all"], 2);
    }

    fn refuse(s: &Safety, t: &Table, idx: usize, done_ns: u64) {
        s.refused(t, idx, done_ns, 0, Op::Verify, 401, "invalid_token", false);
    }

    #[test]
    fn refusals_during_a_logout_all_in_flight_are_expected() {
        let t = Table::new();
        let s = Safety::new(0);
        let old = t.push(info("old"), 10).unwrap();
        let old2 = t.push(info("old2"), 10).unwrap();
        // answered before the logout-all was sent: nothing explains it
        refuse(&s, &t, old2, 40);
        assert_eq!(s.wrong_refusals(), 1);
        s.logout_all_pending(50);
        s.refused(&t, old, 60, 1, Op::VerifyB, 401, "invalid_token", false);
        assert_eq!(s.wrong_refusals(), 1);
        s.logout_all(50, 70, 0);
        let new = t.push(info("new"), 80).unwrap();
        refuse(&s, &t, new, 90);
        assert_eq!(s.to_json()["wrong_refusals"], 2);
        assert_eq!(s.to_json()["refusals_checked"], 3);
        let ex = &s.to_json()["wrong_refusal_examples"];
        assert_eq!(ex[1]["alive_because"], "created in this run, never revoked");
    }

    #[test]
    fn a_refusal_is_explained_only_by_a_revocation_sent_before_it_arrived() {
        let t = Table::new();
        let s = Safety::new(0);
        let a = t.push(info("a"), 0).unwrap();
        let b = t.push(info("b"), 0).unwrap();
        let c = t.push(info("c"), 5).unwrap();
        t.slot(a).unwrap().logout_sent(100);
        t.slot(b).unwrap().revoking(100);
        refuse(&s, &t, a, 99); // before the logout was sent
        refuse(&s, &t, b, 99); // before the force-logout was sent
        assert_eq!(s.wrong_refusals(), 2);
        refuse(&s, &t, a, 100);
        refuse(&s, &t, b, 150); // in flight, not acknowledged: fine
        assert_eq!(s.wrong_refusals(), 2);
        // The logout's own 401 is not explained by the logout itself…
        s.refused(&t, a, 120, 0, Op::Logout, 401, "invalid_token", true);
        assert_eq!(s.wrong_refusals(), 3);
        // …but by a force-logout sent before it.
        s.refused(&t, b, 120, 0, Op::Logout, 401, "invalid_token", true);
        assert_eq!(s.wrong_refusals(), 3);
        // An untouched token: wrong, and no longer picked as live.
        refuse(&s, &t, c, 10);
        assert_eq!(s.wrong_refusals(), 4);
        assert!(!t.slot(c).unwrap().is_live());
        t.slot(c).unwrap().revoke(200, Kind::Logout);
        refuse(&s, &t, c, 200);
        assert_eq!(s.wrong_refusals(), 4);
    }

    #[test]
    fn the_sidecar_carries_revocations_to_the_next_run() {
        let path = std::env::temp_dir().join(format!("sgl-rev-{}", std::process::id()));
        let t = Table::new();
        for n in ["s0", "s1", "s2", "s3"] {
            t.push(info(n), 0).unwrap();
        }
        t.slot(0).unwrap().revoke(50, Kind::ForceLogout);
        t.slot(1).unwrap().logout_sent(60); // answer lost
        t.slot(2).unwrap().claim(); // claimed, never sent: not revoked
        let mut entries = t.revoked_seeds(4);
        entries.push(("gone".into(), Some(Kind::Logout)));
        write_revoked(&path, &entries).unwrap();
        let back = read_revoked(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            back,
            vec![
                ("s0".to_string(), Some(Kind::ForceLogout)),
                ("s1".to_string(), None),
                ("gone".to_string(), Some(Kind::Logout)),
            ]
        );
        assert!(read_revoked(&path).unwrap().is_empty());
        // The next run: s0 revoked before it began, s1 maybe, s3 alive.
        let t2 = Table::new();
        for n in ["s0", "s1", "s2", "s3"] {
            t2.push(info(n), 0).unwrap();
        }
        let rest = t2.apply_revoked(back);
        assert_eq!(rest, vec![("gone".to_string(), Some(Kind::Logout))]);
        let s = Safety::new(0);
        s.accepted(&t2, 0, 1, 0, Op::Verify);
        assert_eq!(s.violations(), 1);
        s.accepted(&t2, 1, 1, 0, Op::Verify);
        assert_eq!(s.violations(), 1);
        refuse(&s, &t2, 0, 1);
        refuse(&s, &t2, 1, 1);
        assert_eq!(s.wrong_refusals(), 0);
        assert!(!t2.slot(1).unwrap().is_live() && t2.slot(3).unwrap().is_live());
        refuse(&s, &t2, 3, 1);
        assert_eq!(s.wrong_refusals(), 1);
    }
}
