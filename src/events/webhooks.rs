//! The webhook dispatcher: one background task per configured endpoint.
//!
//! Each endpoint reads the event streams through its own Redis consumer
//! group (`webhook:<name>`, created at the start of the retained history),
//! so its cursor lives in Redis: a restart (or a `kill -9`) resumes where
//! the endpoint stopped, first re-delivering what was read but not yet
//! acknowledged (at least once). Every instance is the same consumer
//! (`sessiongate`): with several instances each event goes to one of them;
//! one that stays pending longer than [`CLAIM_IDLE`] (its instance died) is
//! taken over by another.
//!
//! An event is acknowledged (`XACK`) after a 2xx, or after
//! `webhook_max_attempts` failures, when it goes to the dead-letter stream
//! (`<prefix>dead`). Between attempts the wait doubles from
//! `webhook_backoff`, up to [`MAX_BACKOFF`]. Redirects are not followed,
//! and the response body is never read (a huge body costs nothing), each
//! attempt bounded by `webhook_timeout`. A bad endpoint only holds up its
//! own task; the request path never waits for any of this, and memory per
//! endpoint is bounded by one batch ([`BATCH`] events per stream).
//!
//! Requests are signed per Standard Webhooks: `webhook-id` (the event id),
//! `webhook-timestamp` (Unix seconds), `webhook-signature` =
//! `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
//!
//! OpenID CAEP receivers (`caep_urls`) go through the same machinery (own
//! group `caep:<name>`, retries, dead letters): each `session.revoked`
//! event is pushed (RFC 8935) as a CAEP `session-revoked` Security Event
//! Token (RFC 8417), `Content-Type: application/secevent+jwt`, signed with
//! the active Ed25519 key of the ring (EdDSA, published at
//! `/.well-known/jwks.json`); other events are acknowledged without a push.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use prometheus::{GaugeVec, IntCounterVec, Opts};
use redis::Value;
use sha2::Sha256;

use crate::config::{Secret, Settings};
use crate::metrics::Metrics;
use crate::store::events::{Entry, Event, STREAMS, entries, label, parse_id, to_event};
use crate::store::{Store, StoreError};

pub const WEBHOOK_DELIVERIES_TOTAL: &str = "sessiongate_webhook_deliveries_total";
pub const WEBHOOK_LAG_SECONDS: &str = "sessiongate_webhook_lag_seconds";

/// Events read per stream at a time.
pub const BATCH: usize = 20;
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A pending event idle this long is taken over (its reader is gone).
pub const CLAIM_IDLE: Duration = Duration::from_secs(300);
/// How often an idle endpoint looks for new events.
const POLL: Duration = Duration::from_millis(200);
/// The consumer name every instance uses in every group.
const CONSUMER: &str = "sessiongate";
/// Dead letters kept (about).
const DEAD_MAX_LEN: u64 = 10_000;

/// The HMAC key of a Standard Webhooks secret: `whsec_<base64>` (at least
/// 16 bytes decoded), or the bytes of any other string of 32 or more.
pub fn secret_bytes(secret: &Secret) -> Option<Vec<u8>> {
    let s = secret.expose();
    match s.strip_prefix("whsec_") {
        Some(b64) => STANDARD.decode(b64).ok().filter(|k| k.len() >= 16),
        None => (s.len() >= 32).then(|| s.as_bytes().to_vec()),
    }
}

/// `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[derive(Clone)]
struct WebhookMetrics {
    deliveries: IntCounterVec,
    lag: GaugeVec,
}

impl WebhookMetrics {
    fn new(metrics: &Metrics) -> WebhookMetrics {
        let deliveries = IntCounterVec::new(
            Opts::new(
                WEBHOOK_DELIVERIES_TOTAL,
                "Webhook delivery attempts by endpoint and outcome (delivered, failed: one failed attempt, dead_lettered: given up).",
            ),
            &["endpoint", "outcome"],
        )
        .expect("valid metric");
        let lag = GaugeVec::new(
            Opts::new(
                WEBHOOK_LAG_SECONDS,
                "Age of the event an endpoint is delivering now (0 when it is caught up).",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        metrics.register(Box::new(deliveries.clone()));
        metrics.register(Box::new(lag.clone()));
        WebhookMetrics { deliveries, lag }
    }
}

/// What an endpoint is sent.
enum Kind {
    /// Every event, as JSON, Standard Webhooks signature (this HMAC key).
    Webhook(Vec<u8>),
    /// `session.revoked` as a CAEP SET, signed by the ring's Ed25519 key.
    Caep {
        global: Arc<crate::state::Global>,
        issuer: String,
    },
}

/// The CAEP event type of a revocation.
pub const CAEP_SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";

/// The claims of a CAEP `session-revoked` SET for `event` (RFC 8417, CAEP
/// 1.0): `jti` is the event id, `aud` the receiver's URL, the subject a
/// complex subject of the user and the session.
pub fn caep_claims(event: &Event, issuer: &str, audience: &str, now_s: i64) -> serde_json::Value {
    let initiating = match event.actor.as_str() {
        "self" => "user",
        "system" => "system",
        a if a.starts_with("issuer") => "policy",
        _ => "admin",
    };
    serde_json::json!({
        "iss": issuer,
        "iat": now_s,
        "jti": event.id,
        "aud": audience,
        "sub_id": {
            "format": "complex",
            "user": {"format": "opaque", "id": event.user_id},
            "session": {"format": "opaque", "id": event.session_id},
        },
        "events": {
            CAEP_SESSION_REVOKED: {
                "event_timestamp": event.time / 1000,
                "initiating_entity": initiating,
                "reason_admin": {"en": event.reason},
            }
        }
    })
}

/// One endpoint's dispatcher.
struct Endpoint {
    name: String,
    url: String,
    group: String,
    kind: Kind,
    store: Arc<Store>,
    client: reqwest::Client,
    max_attempts: u32,
    backoff: Duration,
    metrics: WebhookMetrics,
}

/// Starts one task per configured endpoint (none when events are off).
pub fn spawn_all(
    settings: &Settings,
    store: Arc<Store>,
    global: Arc<crate::state::Global>,
    metrics: &Metrics,
) -> Vec<tokio::task::JoinHandle<()>> {
    if (settings.webhook_urls.is_empty() && settings.caep_urls.is_empty())
        || !store.events_enabled()
    {
        return Vec::new();
    }
    let key = secret_bytes(&settings.webhook_secret);
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(settings.webhook_timeout)
        .connect_timeout(settings.webhook_timeout)
        .user_agent(concat!("sessiongate/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; no webhooks");
            return Vec::new();
        }
    };
    let m = WebhookMetrics::new(metrics);
    let webhooks = settings.webhook_urls.iter().filter_map(|(name, url)| {
        let key = key.clone()?;
        Some((
            name.clone(),
            url.clone(),
            format!("webhook:{name}"),
            Kind::Webhook(key),
        ))
    });
    let caep = settings.caep_urls.iter().map(|(name, url)| {
        let kind = Kind::Caep {
            global: global.clone(),
            issuer: settings.issuer.clone(),
        };
        (
            format!("caep:{name}"),
            url.clone(),
            format!("caep:{name}"),
            kind,
        )
    });
    webhooks
        .chain(caep)
        .collect::<Vec<_>>()
        .into_iter()
        .map(|(name, url, group, kind)| {
            let endpoint = Endpoint {
                name,
                url,
                group,
                kind,
                store: store.clone(),
                client: client.clone(),
                max_attempts: settings.webhook_max_attempts,
                backoff: settings.webhook_backoff,
                metrics: m.clone(),
            };
            tokio::spawn(endpoint.run())
        })
        .collect()
}

fn now_ms() -> i64 {
    crate::session::now_ms()
}

impl Endpoint {
    async fn cmd(&self, cmd: redis::Cmd) -> Result<Value, StoreError> {
        self.store.command(cmd).await
    }

    /// Creates the group on every stream (from the start of the retained
    /// history); an existing group is kept as it is.
    async fn ensure_groups(&self) -> Result<(), StoreError> {
        for i in 0..STREAMS {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(self.store.stream_at(i))
                .arg(&self.group)
                .arg("0")
                .arg("MKSTREAM");
            match self.cmd(cmd).await {
                Ok(_) => {}
                Err(StoreError::Refused(e)) if e.contains("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn run(self) {
        let mut wait = self.backoff;
        while let Err(e) = self.ensure_groups().await {
            tracing::warn!(endpoint = %self.name, error = %e, "webhook: cannot create the consumer groups; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
        // Per stream: still re-reading what was read before but not
        // acknowledged ("0"), or reading new events (">").
        let mut pending = [true; STREAMS];
        let mut last_claim: Option<Instant> = None;
        let mut wait = self.backoff;
        loop {
            let claim = last_claim.is_none_or(|t| t.elapsed() >= CLAIM_IDLE / 4);
            let batch = match self.fetch(&mut pending, claim).await {
                Ok(batch) => {
                    wait = self.backoff;
                    if claim {
                        last_claim = Some(Instant::now());
                    }
                    batch
                }
                Err(e) => {
                    tracing::warn!(endpoint = %self.name, error = %e, "webhook: cannot read events; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if batch.is_empty() {
                self.metrics.lag.with_label_values(&[&self.name]).set(0.0);
                if pending.iter().all(|p| !p) {
                    tokio::time::sleep(POLL).await;
                }
                continue;
            }
            for (i, id, event) in batch {
                if let Some(event) = event
                    && self.wants(&event)
                {
                    self.deliver(i, &id, &event).await;
                }
                self.ack(i, &id).await;
            }
        }
    }

    /// The next events, oldest first across streams: pending ones first,
    /// then new ones, and (when `claim`) ones another reader left pending.
    async fn fetch(
        &self,
        pending: &mut [bool; STREAMS],
        claim: bool,
    ) -> Result<Vec<(usize, String, Option<Event>)>, StoreError> {
        let mut out = Vec::new();
        for (i, pending) in pending.iter_mut().enumerate() {
            let stream = self.store.stream_at(i);
            let mut found = Vec::new();
            if claim {
                let mut cmd = redis::cmd("XAUTOCLAIM");
                cmd.arg(&stream)
                    .arg(&self.group)
                    .arg(CONSUMER)
                    .arg(CLAIM_IDLE.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(BATCH);
                if let Value::Array(parts) = self.cmd(cmd).await?
                    && let Some(claimed) = parts.into_iter().nth(1)
                {
                    found.extend(entries(claimed)?);
                }
            }
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.group)
                .arg(CONSUMER)
                .arg("COUNT")
                .arg(BATCH)
                .arg("STREAMS")
                .arg(&stream)
                .arg(if *pending { "0" } else { ">" });
            let read = stream_entries(self.cmd(cmd).await?)?;
            if *pending && read.is_empty() {
                *pending = false;
            }
            found.extend(read);
            for (id, fields) in found {
                // An entry trimmed away while pending comes back without
                // fields: acknowledged, nothing to deliver.
                let event = (!fields.is_empty()).then(|| to_event(label(i), &id, &fields));
                out.push((i, id, event));
            }
        }
        out.sort_by_key(|(i, id, _)| (parse_id(id).unwrap_or((0, 0)), *i));
        out.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        Ok(out)
    }

    fn wants(&self, event: &Event) -> bool {
        match self.kind {
            Kind::Webhook(_) => true,
            Kind::Caep { .. } => event.kind == "session.revoked",
        }
    }

    /// One attempt's request.
    fn request(&self, event: &Event, body: &[u8]) -> Result<reqwest::RequestBuilder, String> {
        let timestamp = now_ms() / 1000;
        match &self.kind {
            Kind::Webhook(key) => Ok(self
                .client
                .post(&self.url)
                .header("content-type", "application/json")
                .header("webhook-id", &event.id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", sign(key, &event.id, timestamp, body))
                .body(body.to_vec())),
            Kind::Caep { global, issuer } => {
                // Signed at each attempt with the ring as it is now; a stale
                // ring copy fails the attempt (retried), never a wrong key.
                let state = global.snapshot().map_err(|e| e.to_string())?;
                let claims = caep_claims(event, issuer, &self.url, timestamp);
                let set = state.ring.asym().sign_jwt_typed("secevent+jwt", &claims);
                Ok(self
                    .client
                    .post(&self.url)
                    .header("content-type", "application/secevent+jwt")
                    .header("accept", "application/json")
                    .body(set))
            }
        }
    }

    /// Attempts until a 2xx or `max_attempts`; then dead-letters it.
    async fn deliver(&self, i: usize, id: &str, event: &Event) {
        let body = serde_json::to_vec(event).expect("an event serialises");
        let lag = ((now_ms() - event.time).max(0) as f64) / 1000.0;
        self.metrics.lag.with_label_values(&[&self.name]).set(lag);
        let mut wait = self.backoff;
        let mut last_error = String::new();
        for attempt in 1..=self.max_attempts {
            let sent = match self.request(event, &body) {
                Ok(request) => request
                    .send()
                    .await
                    .map_err(|e| e.without_url().to_string()),
                Err(e) => Err(e),
            };
            // The body is never read: dropping the response closes it.
            match sent {
                Ok(resp) if resp.status().is_success() => {
                    self.outcome("delivered");
                    return;
                }
                Ok(resp) => last_error = format!("HTTP {}", resp.status().as_u16()),
                Err(e) => last_error = e,
            }
            self.outcome("failed");
            tracing::debug!(endpoint = %self.name, event = %event.id, attempt, error = %last_error, "webhook attempt failed");
            if attempt < self.max_attempts {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
                self.touch(i, id).await;
            }
        }
        tracing::warn!(endpoint = %self.name, event = %event.id, error = %last_error, "webhook: giving up on an event (dead-lettered)");
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.store.keys().dead_letters())
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_MAX_LEN)
            .arg("*")
            .arg("endpoint")
            .arg(&self.name)
            .arg("event_id")
            .arg(&event.id)
            .arg("attempts")
            .arg(self.max_attempts)
            .arg("error")
            .arg(&last_error)
            .arg("body")
            .arg(&body);
        self.retry_until_done(cmd).await;
        self.outcome("dead_lettered");
    }

    /// Resets the pending entry's idle time, so no other instance takes it
    /// over while this one is still retrying it.
    async fn touch(&self, i: usize, id: &str) {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.store.stream_at(i))
            .arg(&self.group)
            .arg(CONSUMER)
            .arg(0)
            .arg(id)
            .arg("JUSTID");
        let _ = self.cmd(cmd).await;
    }

    async fn ack(&self, i: usize, id: &str) {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(self.store.stream_at(i)).arg(&self.group).arg(id);
        self.retry_until_done(cmd).await;
    }

    /// Redis down: waits and tries again (the event stays pending meanwhile,
    /// so a restart re-delivers it).
    async fn retry_until_done(&self, cmd: redis::Cmd) {
        let mut wait = self.backoff;
        while let Err(e) = self.cmd(cmd.clone()).await {
            tracing::warn!(endpoint = %self.name, error = %e, "webhook: Redis refused; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }

    fn outcome(&self, outcome: &str) {
        self.metrics
            .deliveries
            .with_label_values(&[&self.name, outcome])
            .inc();
    }
}

/// The entries of an `XREADGROUP` reply on one stream.
fn stream_entries(v: Value) -> Result<Vec<Entry>, StoreError> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::new();
            for s in streams {
                if let Value::Array(parts) = s
                    && let Some(list) = parts.into_iter().nth(1)
                {
                    out.extend(entries(list)?);
                }
            }
            Ok(out)
        }
        Value::Map(streams) => {
            let mut out = Vec::new();
            for (_, list) in streams {
                out.extend(entries(list)?);
            }
            Ok(out)
        }
        other => Err(StoreError::Protocol(format!(
            "expected an XREADGROUP reply, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let key = secret_bytes(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_ne!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_whsec_base64_or_long_strings() {
        assert!(secret_bytes(&Secret::new("whsec_!!")).is_none());
        assert!(secret_bytes(&Secret::new("whsec_AAAA")).is_none());
        assert!(secret_bytes(&Secret::new("short")).is_none());
        assert_eq!(
            secret_bytes(&Secret::new("k".repeat(32))),
            Some(vec![b'k'; 32])
        );
    }
}
