//! Prometheus metrics. Names and help texts are constants here; labels are of
//! low cardinality (an outcome or an error kind, never a user, a path or a
//! token). Each application owns its registry (no global state), and the
//! verify counters are resolved once, so the hot path only bumps atomics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub const VERIFY_TOTAL: &str = "sessiongate_verify_total";
pub const VERIFY_SECONDS: &str = "sessiongate_verify_duration_seconds";
pub const REDIS_ERRORS_TOTAL: &str = "sessiongate_redis_errors_total";
pub const REDIS_REPLY_MISMATCH_TOTAL: &str = "sessiongate_redis_reply_mismatch_total";
pub const REDIS_CONFIG_OK: &str = "sessiongate_redis_config_ok";
pub const REDIS_POOL: &str = "sessiongate_redis_pool_connections";
pub const SESSIONS_CREATED_TOTAL: &str = "sessiongate_sessions_created_total";
pub const SESSIONS_REVOKED_TOTAL: &str = "sessiongate_sessions_revoked_total";
pub const STATE_AGE_SECONDS: &str = "sessiongate_global_state_age_seconds";
pub const NEAR_CACHE_UP: &str = "sessiongate_near_cache_up";
pub const NEAR_CACHE_ENTRIES: &str = "sessiongate_near_cache_entries";
pub const NEAR_CACHE_HITS_TOTAL: &str = "sessiongate_near_cache_hits_total";

/// Outcomes of `/v1/verify`, the values of its `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    Ok,
    InvalidToken,
    InsufficientAuth,
    StoreUnavailable,
    Forbidden,
    BadRequest,
}

impl VerifyOutcome {
    const ALL: [VerifyOutcome; 6] = [
        VerifyOutcome::Ok,
        VerifyOutcome::InvalidToken,
        VerifyOutcome::InsufficientAuth,
        VerifyOutcome::StoreUnavailable,
        VerifyOutcome::Forbidden,
        VerifyOutcome::BadRequest,
    ];

    fn label(self) -> &'static str {
        match self {
            VerifyOutcome::Ok => "ok",
            VerifyOutcome::InvalidToken => "invalid_token",
            VerifyOutcome::InsufficientAuth => "insufficient_user_authentication",
            VerifyOutcome::StoreUnavailable => "store_unavailable",
            VerifyOutcome::Forbidden => "forbidden",
            VerifyOutcome::BadRequest => "invalid_request",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    verify: [IntCounter; 6],
    verify_seconds: Histogram,
    redis_errors: IntCounterVec,
    pub reply_mismatch: IntCounter,
    pub config_ok: IntGaugeVec,
    pub pool: IntGaugeVec,
    pub sessions_created: IntCounter,
    pub sessions_revoked: IntCounterVec,
    pub state_age: prometheus::Gauge,
    pub near_cache_up: prometheus::IntGauge,
    pub near_cache_entries: prometheus::IntGauge,
    pub near_cache_hits: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let verify_total = IntCounterVec::new(
            Opts::new(VERIFY_TOTAL, "Verify answers by result."),
            &["result"],
        )
        .expect("valid metric");
        let verify = VerifyOutcome::ALL.map(|o| verify_total.with_label_values(&[o.label()]));
        let verify_seconds = Histogram::with_opts(
            HistogramOpts::new(VERIFY_SECONDS, "Time to answer a verify, in seconds.").buckets(
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0,
                ],
            ),
        )
        .expect("valid metric");
        let redis_errors = IntCounterVec::new(
            Opts::new(REDIS_ERRORS_TOTAL, "Failed Redis calls by kind."),
            &["kind"],
        )
        .expect("valid metric");
        let reply_mismatch = IntCounter::new(
            REDIS_REPLY_MISMATCH_TOTAL,
            "Redis replies refused for not echoing their request's nonce (stale, duplicated or crossed); each drops its connection.",
        )
        .expect("valid metric");
        let config_ok = IntGaugeVec::new(
            Opts::new(
                REDIS_CONFIG_OK,
                "Whether a Redis setting the durability promises depend on holds (1), does not (0), or cannot be checked because CONFIG is refused (-1).",
            ),
            &["setting"],
        )
        .expect("valid metric");
        let pool = IntGaugeVec::new(
            Opts::new(
                REDIS_POOL,
                "Redis pool connections (state: size, available, waiting).",
            ),
            &["state"],
        )
        .expect("valid metric");
        let sessions_created =
            IntCounter::new(SESSIONS_CREATED_TOTAL, "Sessions created.").expect("valid metric");
        let sessions_revoked = IntCounterVec::new(
            Opts::new(SESSIONS_REVOKED_TOTAL, "Sessions revoked, by how."),
            &["how"],
        )
        .expect("valid metric");
        let state_age = prometheus::Gauge::new(
            STATE_AGE_SECONDS,
            "Age of the cached global state (key ring, logout-all cutoff).",
        )
        .expect("valid metric");
        let near_cache_up = prometheus::IntGauge::new(
            NEAR_CACHE_UP,
            "Whether the near-cache may serve (1): it is on and its invalidation connection answered a ping within the bound.",
        )
        .expect("valid metric");
        let near_cache_entries =
            prometheus::IntGauge::new(NEAR_CACHE_ENTRIES, "Session records in the near-cache.")
                .expect("valid metric");
        let near_cache_hits = IntCounter::new(
            NEAR_CACHE_HITS_TOTAL,
            "Verifies answered from the near-cache, without Redis.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(verify_total) as Box<dyn prometheus::core::Collector>,
            Box::new(near_cache_up.clone()),
            Box::new(near_cache_entries.clone()),
            Box::new(near_cache_hits.clone()),
            Box::new(verify_seconds.clone()),
            Box::new(redis_errors.clone()),
            Box::new(reply_mismatch.clone()),
            Box::new(config_ok.clone()),
            Box::new(pool.clone()),
            Box::new(sessions_created.clone()),
            Box::new(sessions_revoked.clone()),
            Box::new(state_age.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        Metrics {
            registry,
            verify,
            verify_seconds,
            redis_errors,
            reply_mismatch,
            config_ok,
            pool,
            sessions_created,
            sessions_revoked,
            state_age,
            near_cache_up,
            near_cache_entries,
            near_cache_hits,
        }
    }

    /// Registers a collector owned elsewhere (the webhook dispatcher's).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("unique metric names");
    }

    pub fn verify(&self, outcome: VerifyOutcome, seconds: f64) {
        self.verify[outcome as usize].inc();
        self.verify_seconds.observe(seconds);
    }

    pub fn redis_error(&self, kind: &str) {
        self.redis_errors.with_label_values(&[kind]).inc();
    }

    pub fn revoked(&self, how: &str, n: u64) {
        self.sessions_revoked.with_label_values(&[how]).inc_by(n);
    }

    /// Verify answers so far, by `result` label (for the admin console).
    pub fn verify_counts(&self) -> [(&'static str, u64); 6] {
        VerifyOutcome::ALL.map(|o| (o.label(), self.verify[o as usize].get()))
    }

    /// Sessions revoked so far, all ways together (for the admin console).
    pub fn revoked_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.sessions_revoked
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
