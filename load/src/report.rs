//! The end of a run: the summary table, the JSON report, the plot, and the
//! exit status.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::plot::{Chart, Series, svg};
use crate::stats::{Answer, Stats, latency_json};
use crate::tokens::Safety;
use crate::{Failure, RunArgs, Scenario};

/// Propagation results of one revocation kind.
pub struct PropKind {
    pub name: &'static str,
    /// Microseconds from A's acknowledgement to B's first 401.
    pub hist: Histogram<u64>,
    pub rounds: u64,
    pub not_propagated: u64,
    pub accepted_after_ack: u64,
    pub failed: u64,
    /// Racers' answers for the round's victims (both instances).
    pub race_checks: u64,
    /// Of those, answers to requests sent after the acknowledgement.
    pub race_after_ack: u64,
    /// 2xx to racers' requests sent before the acknowledgement (fine).
    pub race_2xx_before_ack: u64,
    /// 2xx to racers' requests sent after it (violations).
    pub race_2xx_after_ack: u64,
    /// Rounds where some racer did not get its post-acknowledgement answers
    /// within `--probe-timeout` (transport trouble; not a wrong answer).
    pub race_incomplete: u64,
}

pub struct Report<'a> {
    pub args: &'a RunArgs,
    pub threads: usize,
    pub targets: Vec<String>,
    pub stats: &'a Stats,
    pub safety: &'a Safety,
    pub elapsed: Duration,
    pub extra: Value,
    pub propagation: Option<&'a [PropKind]>,
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Healthz => "healthz",
        Scenario::Verify => "verify",
        Scenario::Mixed => "mixed",
        Scenario::Revocation => "revocation",
    }
}

fn map<K: ToString, V: Into<Value> + Copy>(m: &std::collections::BTreeMap<K, V>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect::<Map<_, _>>(),
    )
}

/// The safety bookkeeping plus the wrong answers the statuses show.
fn safety_json(r: &Report) -> Value {
    let mut s = r.safety.to_json();
    let server = r.stats.by_class(Answer::ServerError);
    let unexpected = r.stats.by_class(Answer::Unexpected);
    s["server_errors"] = server.values().sum::<u64>().into();
    s["server_errors_by_op"] = map(&server);
    s["max_server_errors"] = r.args.max_server_errors.into();
    s["unexpected_statuses"] = unexpected.values().sum::<u64>().into();
    s["unexpected_statuses_by_op"] = map(&unexpected);
    s["wrong_refusals_allowed"] = 0.into();
    if let Some(kinds) = r.propagation {
        s["race_checks"] = kinds.iter().map(|k| k.race_checks).sum::<u64>().into();
        s["race_checks_sent_after_ack"] =
            kinds.iter().map(|k| k.race_after_ack).sum::<u64>().into();
    }
    s
}

pub fn to_json(r: &Report) -> Value {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let all = r.stats.all();
    let mut ops = Map::new();
    for (op, s) in &r.stats.ops {
        ops.insert(
            op.name().to_string(),
            json!({
                "count": s.answered(),
                "per_second": s.answered() as f64 / secs,
                "latency_us": latency_json(&s.hist),
                "statuses": map(&s.statuses),
                "errors": map(&s.errors),
                "transport_errors": map(&s.transport),
            }),
        );
    }
    let mut out = json!({
        "tool": "sessiongate-load",
        "scenario": scenario_name(r.args.scenario),
        "targets": r.targets,
        "connections": r.args.connections,
        "threads": r.threads,
        "duration_limit_s": r.args.duration.as_secs_f64(),
        "request_limit": r.args.requests,
        "elapsed_s": secs,
        "requests": r.stats.answered(),
        "throughput_per_s": r.stats.answered() as f64 / secs,
        "transport_errors": r.stats.failed(),
        "transport_errors_by_kind": map(&r.stats.transport()),
        "first_transport_error": r.stats.first_error,
        "latency_us": latency_json(&all),
        "p50_us": all.value_at_quantile(0.5),
        "p90_us": all.value_at_quantile(0.9),
        "p99_us": all.value_at_quantile(0.99),
        "p99_9_us": all.value_at_quantile(0.999),
        "max_us": all.max(),
        "statuses": map(&r.stats.statuses()),
        "errors": map(&r.stats.errors()),
        "ops": ops,
        "safety": safety_json(r),
    });
    if let Some(kinds) = r.propagation {
        let mut p = Map::new();
        for k in kinds {
            let mut entry = json!({
                    "rounds": k.rounds,
                    "latency_us": latency_json(&k.hist),
                    "not_refused_within_probe_timeout": k.not_propagated,
                    "accepted_on_b_after_ack": k.accepted_after_ack,
                    "rounds_failed": k.failed,
            });
            // Logout-all's victims are the background pool (no racers).
            if k.name != "logout_all" {
                entry["race"] = json!({
                    "checks": k.race_checks,
                    "sent_after_ack": k.race_after_ack,
                    "accepted_sent_before_ack": k.race_2xx_before_ack,
                    "accepted_sent_after_ack": k.race_2xx_after_ack,
                    "rounds_incomplete": k.race_incomplete,
                });
            }
            p.insert(k.name.to_string(), entry);
        }
        out["propagation"] = Value::Object(p);
    }
    if !r.extra.is_null() {
        out["extra"] = r.extra.clone();
    }
    out
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn lat_cols(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("{:>9}{:>9}{:>9}{:>9}{:>9}", "-", "-", "-", "-", "-");
    }
    format!(
        "{:>9}{:>9}{:>9}{:>9}{:>9}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

pub fn table(r: &Report) -> String {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "sessiongate-load  scenario {}  target {}  connections {}  threads {}",
        scenario_name(r.args.scenario),
        r.targets.join(" + "),
        r.args.connections,
        r.threads
    );
    let _ = writeln!(
        t,
        "{:.2} s: {} requests answered ({:.1}/s), {} without an answer{}",
        secs,
        r.stats.answered(),
        r.stats.answered() as f64 / secs,
        r.stats.failed(),
        r.stats
            .first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{:<15}{:>9}{:>10}{:>9}{:>9}{:>9}{:>9}{:>9}  statuses [errors]",
        "latency, ms", "count", "per s", "p50", "p90", "p99", "p99.9", "max"
    );
    let all = r.stats.all();
    let _ = writeln!(
        t,
        "{:<15}{:>9}{:>10.1}{}  {}",
        "all",
        all.len(),
        all.len() as f64 / secs,
        lat_cols(&all),
        codes(&r.stats.statuses(), &r.stats.errors(), &Default::default())
    );
    for (op, s) in &r.stats.ops {
        let _ = writeln!(
            t,
            "{:<15}{:>9}{:>10.1}{}  {}",
            op.name(),
            s.answered(),
            s.answered() as f64 / secs,
            lat_cols(&s.hist),
            codes(&s.statuses, &s.errors, &s.transport)
        );
    }
    if let Some(kinds) = r.propagation {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "propagation: A acknowledged the revocation -> B's first 401 for that token, ms"
        );
        let _ = writeln!(
            t,
            "{:<15}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>11}{:>11}{:>8}{:>9}{:>11}{:>11}",
            "kind",
            "rounds",
            "tokens",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "unrefused",
            "2xx on B",
            "failed",
            "races",
            "after ack",
            "2xx after"
        );
        for k in kinds {
            let _ = writeln!(
                t,
                "{:<15}{:>9}{:>9}{}{:>11}{:>11}{:>8}{:>9}{:>11}{:>11}",
                k.name,
                k.rounds,
                k.hist.len(),
                lat_cols(&k.hist),
                k.not_propagated,
                k.accepted_after_ack,
                k.failed,
                k.race_checks,
                k.race_after_ack,
                k.race_2xx_after_ack
            );
        }
    }
    let s = safety_json(r);
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "safety: {} violation(s) in {} accepted token requests checked; {} accepted by another instance inside the {} ms logout-all window, {} inside the {} ms logout/force-logout window",
        s["violations"],
        s["accepted_checked"],
        s["accepted_within_logout_all_grace"],
        s["logout_all_grace_ms"],
        s["accepted_within_revocation_grace"],
        s["revocation_grace_ms"],
    );
    let after = &s["acceptance_after_revocation_us"];
    if after["count"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            t,
            "acceptance after revocation (ack -> request sent, µs): {} accepted, p50 {}, p99 {}, max {}",
            after["count"], after["p50"], after["p99"], after["max"],
        );
    }
    let _ = writeln!(
        t,
        "answers: {} 5xx (allowed {}); {} refusal(s) of a live token in {} refusals checked (allowed 0); {} unexpected status(es)",
        s["server_errors"],
        s["max_server_errors"],
        s["wrong_refusals"],
        s["refusals_checked"],
        s["unexpected_statuses"],
    );
    if r.propagation.is_some() {
        let _ = writeln!(
            t,
            "races: {} verifies of logout / force-logout victims by concurrent racers, {} of them sent after the acknowledgement",
            s["race_checks"], s["race_checks_sent_after_ack"],
        );
    }
    if let Some(ex) = s["examples"].as_array() {
        for e in ex.iter().take(5) {
            let _ = writeln!(t, "  violation: {e}");
        }
    }
    for (what, m) in [
        ("5xx", &s["server_errors_by_op"]),
        ("unexpected", &s["unexpected_statuses_by_op"]),
    ] {
        if let Some(m) = m.as_object()
            && !m.is_empty()
        {
            let _ = writeln!(t, "  {what}: {}", Value::Object(m.clone()));
        }
    }
    if let Some(ex) = s["wrong_refusal_examples"].as_array() {
        for e in ex.iter().take(5) {
            let _ = writeln!(t, "  refusal of a live token: {e}");
        }
    }
    t
}

/// Why the answers were wrong, if they were: revoked tokens accepted, 5xx
/// beyond `--max-server-errors`, live tokens refused, unexpected statuses.
fn wrong_answers(s: &Value) -> Option<String> {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let mut why = Vec::new();
    if n("violations") > 0 {
        why.push(format!(
            "{} request(s) were accepted after their token's revocation had been acknowledged",
            n("violations")
        ));
    }
    if n("server_errors") > n("max_server_errors") {
        why.push(format!(
            "{} answer(s) were 5xx ({}; allowed {})",
            n("server_errors"),
            s["server_errors_by_op"],
            n("max_server_errors")
        ));
    }
    if n("wrong_refusals") > 0 {
        let first = s["wrong_refusal_examples"]
            .get(0)
            .map(|e| format!("; first: {e}"))
            .unwrap_or_default();
        why.push(format!(
            "{} request(s) bearing a live token were refused (401/403) with no revocation of it sent before the refusal arrived{first}",
            n("wrong_refusals")
        ));
    }
    if n("unexpected_statuses") > 0 {
        why.push(format!(
            "{} answer(s) had a status the operation never answers in a healthy run ({})",
            n("unexpected_statuses"),
            s["unexpected_statuses_by_op"]
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

fn codes(
    statuses: &std::collections::BTreeMap<u16, u64>,
    errors: &std::collections::BTreeMap<String, u64>,
    transport: &std::collections::BTreeMap<&'static str, u64>,
) -> String {
    let mut s: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    if !errors.is_empty() {
        let e: Vec<String> = errors.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        s.push(format!("[{}]", e.join(" ")));
    }
    for (k, v) in transport {
        s.push(format!("no-answer/{k}:{v}"));
    }
    s.join(" ")
}

/// Prints and writes everything, and decides the exit status.
pub fn finish(r: Report) -> Result<(), Failure> {
    let json = to_json(&r);
    let table = table(&r);
    if r.args.json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(&json).expect("JSON"));
    } else {
        print!("{table}");
    }
    if let Some(path) = &r.args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&json).expect("JSON"))
            .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    }
    if let Some(path) = &r.args.plot {
        let mut charts = Vec::new();
        let mut series: Vec<Series> = vec![Series {
            name: "all".into(),
            hist: r.stats.all(),
        }];
        if r.stats.ops.len() > 1 {
            for (op, s) in &r.stats.ops {
                if !s.hist.is_empty() {
                    series.push(Series {
                        name: op.name().into(),
                        hist: s.hist.clone(),
                    });
                }
            }
        }
        charts.push(Chart {
            title: format!(
                "sessiongate {} - latency by percentile ({} connections, {:.0} req/s)",
                scenario_name(r.args.scenario),
                r.args.connections,
                r.stats.answered() as f64 / r.elapsed.as_secs_f64().max(1e-9)
            ),
            series,
        });
        if let Some(kinds) = r.propagation {
            let series: Vec<Series> = kinds
                .iter()
                .filter(|k| !k.hist.is_empty())
                .map(|k| Series {
                    name: k.name.into(),
                    hist: k.hist.clone(),
                })
                .collect();
            if !series.is_empty() {
                charts.push(Chart {
                    title: "revocation propagation: A's answer -> B's first 401".into(),
                    series,
                });
            }
        }
        std::fs::write(path, svg(&charts))
            .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    }
    let s = safety_json(&r);
    if let Some(why) = wrong_answers(&s) {
        return Err(Failure::Unsafe(why));
    }
    let answered = r.stats.answered();
    let failed = r.stats.failed();
    if answered == 0 {
        return Err(Failure::Run(format!(
            "no request was answered{}",
            r.stats
                .first_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )));
    }
    let ratio = failed as f64 / (answered + failed) as f64;
    if ratio > r.args.max_error_ratio {
        return Err(Failure::Run(format!(
            "{failed} request(s) got no answer ({:.2} % > --max-error-ratio {:.2} %)",
            ratio * 100.0,
            r.args.max_error_ratio * 100.0
        )));
    }
    if let Some(kinds) = r.propagation {
        let unrefused: u64 = kinds.iter().map(|k| k.not_propagated).sum();
        if unrefused > 0 {
            return Err(Failure::Run(format!(
                "{unrefused} revoked token(s) were not refused by B within --probe-timeout"
            )));
        }
        let rounds: u64 = kinds.iter().map(|k| k.hist.len()).sum();
        if rounds == 0 {
            return Err(Failure::Run("no revocation round completed".into()));
        }
    }
    Ok(())
}
