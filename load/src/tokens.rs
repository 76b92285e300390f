//! Tokens the harness holds, what it did to them, and the safety rule.
//!
//! Safety rule: no 2xx may answer a request bearing a token whose revocation
//! the harness had seen acknowledged before it sent the request.
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
use std::path::Path;
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
    pub kind: AtomicU8,
    pub state: AtomicU8,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            info: OnceLock::new(),
            created_ns: AtomicU64::new(0),
            revoked_ns: AtomicU64::new(NEVER),
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

/// The safety bookkeeping shared by every task.
pub struct Safety {
    /// Cross-instance propagation window allowed for logout-all.
    grace_ns: u64,
    logout_alls: RwLock<Vec<LogoutAllMark>>,
    n_logout_alls: AtomicUsize,
    /// When the logout-all in flight was sent (`NEVER`: none).
    pending_logout_all: AtomicU64,
    violations: AtomicU64,
    violations_by_kind: [AtomicU64; 4],
    within_grace: AtomicU64,
    unexpected_refusals: AtomicU64,
    accepted_checked: AtomicU64,
    examples: Mutex<Vec<Violation>>,
}

const MAX_EXAMPLES: usize = 20;

impl Safety {
    pub fn new(grace_ns: u64) -> Safety {
        Safety {
            grace_ns,
            logout_alls: RwLock::new(Vec::new()),
            n_logout_alls: AtomicUsize::new(0),
            pending_logout_all: AtomicU64::new(NEVER),
            violations: AtomicU64::new(0),
            violations_by_kind: Default::default(),
            within_grace: AtomicU64::new(0),
            unexpected_refusals: AtomicU64::new(0),
            accepted_checked: AtomicU64::new(0),
            examples: Mutex::new(Vec::new()),
        }
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
            return Some((kind, r, false));
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
        match self.revocation(slot, sent_ns, instance) {
            None => {}
            Some((_, _, true)) => {
                self.within_grace.fetch_add(1, Ordering::Relaxed);
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

    /// A request bearing token `idx` was refused with `invalid_token`. Counts
    /// refusals of tokens the harness never revoked and was not revoking.
    pub fn refused(&self, table: &Table, idx: usize, done_ns: u64, instance: u8) {
        let Some(slot) = table.slot(idx) else { return };
        if slot.state.load(Ordering::Acquire) == LIVE
            && self.revocation(slot, done_ns, instance).is_none()
            && !self.maybe_covered_by_logout_all(slot)
        {
            self.unexpected_refusals.fetch_add(1, Ordering::Relaxed);
            // Dead for reasons the harness did not cause (an earlier run on the
            // same seeds, eviction, expiry): stop picking it as a live token.
            slot.state.store(REVOKED, Ordering::Release);
        }
    }

    /// Whether a logout-all sent after this token's creation exists, even
    /// one not acknowledged yet (a refusal is then expected).
    fn maybe_covered_by_logout_all(&self, slot: &Slot) -> bool {
        let created = slot.created_ns.load(Ordering::Acquire);
        let pending = self.pending_logout_all.load(Ordering::Acquire);
        if pending != NEVER && created < pending {
            return true;
        }
        self.n_logout_alls.load(Ordering::Acquire) > 0
            && self
                .logout_alls
                .read()
                .expect("not poisoned")
                .iter()
                .any(|m| created < m.sent_ns)
    }

    /// A refusal the harness cannot explain, found by the caller.
    pub fn unexpected(&self) {
        self.unexpected_refusals.fetch_add(1, Ordering::Relaxed);
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
            "unexpected_refusals": self.unexpected_refusals.load(Ordering::Acquire),
            "examples": examples,
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

    #[test]
    fn refusals_during_a_logout_all_in_flight_are_expected() {
        let t = Table::new();
        let s = Safety::new(0);
        let old = t.push(info("old"), 10).unwrap();
        s.logout_all_pending(50);
        s.refused(&t, old, 60, 1);
        assert_eq!(s.to_json()["unexpected_refusals"], 0);
        s.logout_all(50, 70, 0);
        let new = t.push(info("new"), 80).unwrap();
        s.refused(&t, new, 90, 0);
        assert_eq!(s.to_json()["unexpected_refusals"], 1);
    }

    #[test]
    fn refusals_of_untouched_tokens_are_unexpected() {
        let t = Table::new();
        let s = Safety::new(0);
        let a = t.push(info("a"), 0).unwrap();
        let b = t.push(info("b"), 0).unwrap();
        assert!(t.slot(b).unwrap().claim());
        s.refused(&t, a, 10, 0);
        s.refused(&t, b, 10, 0);
        assert_eq!(s.to_json()["unexpected_refusals"], 1);
    }
}
