//! Per-operation counters and latency histograms. Each task keeps its own
//! `Stats` (no sharing on the hot path); they are merged at the end.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{Value, json};

/// Latencies are recorded in microseconds, 3 significant digits, up to 1 h.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub fn micros(d: Duration) -> u64 {
    (d.as_nanos() / 1000).max(1) as u64
}

/// What a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Healthz,
    /// `GET /v1/verify` with a token believed valid.
    Verify,
    /// `GET /v1/verify` with a token the harness revoked earlier.
    VerifyRevoked,
    Create,
    Logout,
    List,
    /// `DELETE /v1/admin/users/{user}/sessions`.
    ForceLogout,
    LogoutAll,
    /// Background verify on instance A / B (revocation scenario).
    VerifyA,
    VerifyB,
    /// Checking on B that a fresh session verifies before revoking it.
    Confirm,
    /// Polling B until it refuses a revoked token.
    Probe,
    /// Checking that A refuses a token it revoked.
    ProbeA,
    /// Racers hammering a logout / force-logout victim on A / B while it is
    /// revoked.
    RaceA,
    RaceB,
}

/// What an answer means for the pass/fail rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A status this operation answers in a healthy run.
    Expected,
    /// 401/403 to a token-bearing request: judged by the refusal rule.
    Refusal,
    /// 5xx: always wrong while Redis is up.
    ServerError,
    /// Anything else (a 401 to a valid API key, a 400 to a well-formed
    /// request, a 404 from `/healthz`, ...).
    Unexpected,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Healthz => "healthz",
            Op::Verify => "verify",
            Op::VerifyRevoked => "verify_revoked",
            Op::Create => "create",
            Op::Logout => "logout",
            Op::List => "list",
            Op::ForceLogout => "force_logout",
            Op::LogoutAll => "logout_all",
            Op::VerifyA => "verify_a",
            Op::VerifyB => "verify_b",
            Op::Confirm => "confirm_b",
            Op::Probe => "probe_b",
            Op::ProbeA => "probe_a",
            Op::RaceA => "race_a",
            Op::RaceB => "race_b",
        }
    }

    /// Whether the request bears a session token (its 401/403 is judged by
    /// the refusal rule) rather than an API key or nothing.
    pub fn bears_token(self) -> bool {
        !matches!(
            self,
            Op::Healthz | Op::Create | Op::ForceLogout | Op::LogoutAll
        )
    }

    /// The success status of this operation.
    pub fn success(self) -> u16 {
        match self {
            Op::Create => 201,
            Op::Logout => 204,
            _ => 200,
        }
    }

    pub fn classify(self, status: u16) -> Answer {
        if status >= 500 {
            Answer::ServerError
        } else if status == self.success() {
            Answer::Expected
        } else if self.bears_token() && matches!(status, 401 | 403) {
            Answer::Refusal
        } else {
            Answer::Unexpected
        }
    }
}

pub struct OpStats {
    pub hist: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    /// The `error` field of non-2xx answers.
    pub errors: BTreeMap<String, u64>,
    /// Requests that got no HTTP answer, by kind.
    pub transport: BTreeMap<&'static str, u64>,
}

impl OpStats {
    fn new() -> OpStats {
        OpStats {
            hist: new_hist(),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            transport: BTreeMap::new(),
        }
    }

    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn failed(&self) -> u64 {
        self.transport.values().sum()
    }
}

#[derive(Default)]
pub struct Stats {
    pub ops: BTreeMap<Op, OpStats>,
    /// The first transport error, in words.
    pub first_error: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    error: Cow<'a, str>,
}

/// The stable error code of an error answer.
pub fn error_code(body: &[u8]) -> Cow<'_, str> {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) if body.is_empty() => Cow::Borrowed("(empty body)"),
        Err(_) => Cow::Borrowed("(no error field)"),
    }
}

impl Stats {
    fn op(&mut self, op: Op) -> &mut OpStats {
        self.ops.entry(op).or_insert_with(OpStats::new)
    }

    pub fn record(&mut self, op: Op, latency: Duration, status: u16, body: &[u8]) {
        let s = self.op(op);
        s.hist.saturating_record(micros(latency));
        *s.statuses.entry(status).or_insert(0) += 1;
        if status >= 300 {
            let code = error_code(body);
            match s.errors.get_mut(code.as_ref()) {
                Some(n) => *n += 1,
                None => {
                    s.errors.insert(code.into_owned(), 1);
                }
            }
        }
    }

    pub fn record_transport(&mut self, op: Op, kind: &'static str) {
        *self.op(op).transport.entry(kind).or_insert(0) += 1;
    }

    pub fn note_error(&mut self, e: &dyn std::fmt::Display) {
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    pub fn merge(&mut self, other: Stats) {
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        for (op, o) in other.ops {
            let s = self.op(op);
            s.hist.add(&o.hist).expect("same histogram bounds");
            for (k, v) in o.statuses {
                *s.statuses.entry(k).or_insert(0) += v;
            }
            for (k, v) in o.errors {
                *s.errors.entry(k).or_insert(0) += v;
            }
            for (k, v) in o.transport {
                *s.transport.entry(k).or_insert(0) += v;
            }
        }
    }

    /// Every answered request's latency, all operations together.
    pub fn all(&self) -> Histogram<u64> {
        let mut h = new_hist();
        for s in self.ops.values() {
            h.add(&s.hist).expect("same histogram bounds");
        }
        h
    }

    pub fn answered(&self) -> u64 {
        self.ops.values().map(OpStats::answered).sum()
    }

    pub fn failed(&self) -> u64 {
        self.ops.values().map(OpStats::failed).sum()
    }

    pub fn statuses(&self) -> BTreeMap<u16, u64> {
        let mut m = BTreeMap::new();
        for s in self.ops.values() {
            for (k, v) in &s.statuses {
                *m.entry(*k).or_insert(0) += v;
            }
        }
        m
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in self.ops.values() {
            for (k, v) in &s.errors {
                *m.entry(k.clone()).or_insert(0) += v;
            }
        }
        m
    }

    /// Answers of one class, by `op status` (e.g. `verify 503`).
    pub fn by_class(&self, class: Answer) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (op, s) in &self.ops {
            for (&status, &n) in &s.statuses {
                if op.classify(status) == class {
                    *m.entry(format!("{} {status}", op.name())).or_insert(0) += n;
                }
            }
        }
        m
    }

    pub fn transport(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for s in self.ops.values() {
            for (k, v) in &s.transport {
                *m.entry(*k).or_insert(0) += v;
            }
        }
        m
    }
}

/// The percentiles every report shows, in microseconds.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({ "count": 0 });
    }
    json!({
        "count": h.len(),
        "mean": (h.mean() * 10.0).round() / 10.0,
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p99_9": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_read_from_json_bodies() {
        assert_eq!(
            error_code(br#"{"error":"invalid_token","message":"x"}"#),
            "invalid_token"
        );
        assert_eq!(error_code(b""), "(empty body)");
        assert_eq!(error_code(b"<html>"), "(no error field)");
    }

    #[test]
    fn stats_merge_and_count() {
        let mut a = Stats::default();
        a.record(Op::Verify, Duration::from_micros(100), 200, b"");
        a.record(
            Op::Verify,
            Duration::from_micros(300),
            401,
            br#"{"error":"invalid_token"}"#,
        );
        let mut b = Stats::default();
        b.record(
            Op::Verify,
            Duration::from_micros(200),
            401,
            br#"{"error":"invalid_token"}"#,
        );
        b.record_transport(Op::Create, "timeout");
        a.merge(b);
        assert_eq!(a.answered(), 3);
        assert_eq!(a.failed(), 1);
        assert_eq!(a.statuses()[&401], 2);
        assert_eq!(a.errors()["invalid_token"], 2);
        assert_eq!(a.all().len(), 3);
        assert!(a.by_class(Answer::ServerError).is_empty());
        assert_eq!(a.by_class(Answer::Refusal)["verify 401"], 3 - 1);
    }

    #[test]
    fn answers_are_classified_by_operation() {
        assert_eq!(Op::Verify.classify(200), Answer::Expected);
        assert_eq!(Op::Verify.classify(401), Answer::Refusal);
        assert_eq!(Op::RaceB.classify(403), Answer::Refusal);
        assert_eq!(Op::Verify.classify(503), Answer::ServerError);
        assert_eq!(Op::Healthz.classify(500), Answer::ServerError);
        assert_eq!(Op::Verify.classify(400), Answer::Unexpected);
        assert_eq!(Op::Create.classify(201), Answer::Expected);
        assert_eq!(Op::Create.classify(200), Answer::Unexpected);
        assert_eq!(Op::Create.classify(401), Answer::Unexpected);
        assert_eq!(Op::Logout.classify(204), Answer::Expected);
        assert_eq!(Op::Logout.classify(401), Answer::Refusal);
        assert_eq!(Op::LogoutAll.classify(403), Answer::Unexpected);
        assert_eq!(Op::ForceLogout.classify(200), Answer::Expected);
        assert_eq!(Op::Healthz.classify(404), Answer::Unexpected);
    }
}
