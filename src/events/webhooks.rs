//! The webhook dispatcher: one background task per configured endpoint.
//!
//! Each endpoint keeps its cursor (the id of the last event it is done
//! with) in Redis, in the hash `<prefix>hook:<name>`, beside a lease: of
//! all instances, the one holding the lease delivers, renews it while it
//! works, and saves the cursor only while it still holds it. A restart (or
//! a `kill -9`) resumes after the saved cursor, so an event delivered but
//! not yet saved is delivered again (at least once); when the holder dies,
//! another instance takes over once its lease runs out ([`lease`]). A new
//! endpoint starts at the oldest retained event.
//!
//! Events are delivered in order. An event is done after a 2xx, or after
//! `webhook_max_attempts` failures, when it goes to the dead-letter stream
//! (`<prefix>dead`). Between attempts the wait doubles from
//! `webhook_backoff`, up to [`MAX_BACKOFF`]. Redirects are not followed,
//! and the response body is never read (a huge body costs nothing), each
//! attempt bounded by `webhook_timeout`. A bad endpoint only holds up its
//! own task; the request path never waits for any of this, and memory per
//! endpoint is bounded by one batch ([`BATCH`] events).
//!
//! Requests are signed per Standard Webhooks: `webhook-id` (the event id),
//! `webhook-timestamp` (Unix seconds), `webhook-signature` =
//! `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
//!
//! OpenID CAEP receivers (`caep_urls`) go through the same machinery (own
//! cursor `caep:<name>`, retries, dead letters): each `session.revoked`
//! event is pushed (RFC 8935) as a CAEP `session-revoked` Security Event
//! Token (RFC 8417), `Content-Type: application/secevent+jwt`, signed with
//! the active Ed25519 key of the ring (EdDSA, published at
//! `/.well-known/jwks.json`); other events are skipped.

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
use crate::store::events::{Cursor, Event, Filter};
use crate::store::{Store, StoreError};

pub const WEBHOOK_DELIVERIES_TOTAL: &str = "sessiongate_webhook_deliveries_total";
pub const WEBHOOK_LAG_SECONDS: &str = "sessiongate_webhook_lag_seconds";

/// Events read at a time.
pub const BATCH: usize = 20;
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often an idle endpoint looks for new events (one Redis; a
/// Cluster's read costs one `XRANGE` per slot, so it looks once a second).
const POLL: Duration = Duration::from_millis(200);
const POLL_MERGED: Duration = Duration::from_secs(1);

/// How long a lease lasts unless renewed: three attempts' time, at least
/// 3 s, so a live holder always renews it in time (it renews before and
/// after every attempt, and every [`POLL`] when idle). Never capped: one
/// attempt may take `webhook_timeout`, and a lease shorter than that would
/// let a second instance deliver beside a holder still waiting on an
/// answer (a crashed holder's endpoint waits that much longer instead).
pub fn lease(webhook_timeout: Duration) -> Duration {
    (webhook_timeout * 3).max(Duration::from_secs(3))
}

/// Takes or renews the lease (`KEYS[1]` the endpoint's hash, `ARGV[1]` this
/// instance, `ARGV[2]` the lease ms): 1 when this instance held it and
/// renewed it, 2 when it has just taken it (from nobody, or from another
/// holder whose lease ran out: the saved cursor may have moved meanwhile),
/// 0 when another instance holds it.
const LEASE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = redis.call('HGET', KEYS[1], 'owner')
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if owner == ARGV[1] or until_ms < now then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'until', now + tonumber(ARGV[2]))
  -- Still ours (even past its time: nobody took it meanwhile, or the
  -- owner would be another).
  if owner == ARGV[1] then
    return 1
  end
  return 2
end
return 0
"#;

/// Saves the cursor (`ARGV[3]`, its sort key `ARGV[4]`) and renews the
/// lease (`ARGV[2]` ms) if this instance (`ARGV[1]`) holds it and the
/// cursor does not go back (a holder that lost the lease and took it again
/// may be behind what another delivered meanwhile): 1 when saved.
const SAVE_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
local saved = redis.call('HGET', KEYS[1], 'order')
if saved and ARGV[4] < saved then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'cursor', ARGV[3], 'order', ARGV[4], 'until', now + tonumber(ARGV[2]))
return 1
"#;
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

/// What [`Endpoint::hold`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// This instance held the lease and renewed it.
    Renewed,
    /// This instance has just taken it: read the saved cursor again.
    Taken,
    /// Another instance holds it.
    Other,
}

/// One endpoint's dispatcher.
struct Endpoint {
    name: String,
    url: String,
    /// `<prefix>hook:<name>`: cursor and lease.
    key: String,
    /// This instance, as a lease owner.
    owner: String,
    lease: Duration,
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
    let owner = uuid::Uuid::new_v4().to_string();
    let webhooks = settings.webhook_urls.iter().filter_map(|(name, url)| {
        let key = key.clone()?;
        Some((
            name.clone(),
            url.clone(),
            store.keys().hook(&format!("webhook:{name}")),
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
            store.keys().hook(&format!("caep:{name}")),
            kind,
        )
    });
    webhooks
        .chain(caep)
        .collect::<Vec<_>>()
        .into_iter()
        .map(|(name, url, key, kind)| {
            let endpoint = Endpoint {
                name,
                url,
                key,
                owner: owner.clone(),
                lease: lease(settings.webhook_timeout),
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

    /// Takes or renews the lease.
    async fn hold(&self) -> Result<Lease, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEASE_LUA)
            .arg(1)
            .arg(&self.key)
            .arg(&self.owner)
            .arg(self.lease.as_millis() as u64);
        Ok(match self.cmd(cmd).await? {
            Value::Int(1) => Lease::Renewed,
            Value::Int(2) => Lease::Taken,
            _ => Lease::Other,
        })
    }

    /// The saved cursor; a new endpoint starts before every retained event.
    async fn saved_cursor(&self) -> Result<Cursor, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(&self.key).arg("cursor");
        Ok(match self.cmd(cmd).await? {
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(Cursor::parse)
                .unwrap_or_else(Cursor::start),
            _ => Cursor::start(),
        })
    }

    /// Saves the cursor if this instance still holds the lease.
    async fn save(&self, cursor: &Cursor) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SAVE_LUA)
            .arg(1)
            .arg(&self.key)
            .arg(&self.owner)
            .arg(self.lease.as_millis() as u64)
            .arg(cursor.encode())
            .arg(cursor.order_key());
        Ok(matches!(self.cmd(cmd).await?, Value::Int(1)))
    }

    /// Waits `d`, renewing the lease every third of it: false when it was
    /// lost meanwhile (even if taken back since: the cursor must be read
    /// again).
    async fn wait_holding(&self, d: Duration) -> Result<bool, StoreError> {
        let deadline = Instant::now() + d;
        loop {
            if self.hold().await? != Lease::Renewed {
                return Ok(false);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(true);
            }
            tokio::time::sleep(left.min(self.lease / 3)).await;
        }
    }

    async fn run(self) {
        let poll = if self.store.keys().stream_count() > 1 {
            POLL_MERGED
        } else {
            POLL
        };
        let mut wait = self.backoff;
        loop {
            match self.serve().await {
                // Not the holder, or caught up: look again later.
                Ok(()) => {
                    wait = self.backoff;
                    tokio::time::sleep(poll).await;
                }
                Err(e) => {
                    tracing::warn!(endpoint = %self.name, error = %e, "webhook: stopped delivering; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// While this instance holds the lease: delivers every event after the
    /// saved cursor, saving it as it goes. Returns when not the holder (any
    /// more) or caught up.
    async fn serve(&self) -> Result<(), StoreError> {
        if self.hold().await? == Lease::Other {
            return Ok(());
        }
        let mut cursor = self.saved_cursor().await?;
        loop {
            let (batch, next) = self
                .store
                .read_events(&cursor, &Filter::default(), BATCH)
                .await?;
            if batch.is_empty() {
                self.metrics.lag.with_label_values(&[&self.name]).set(0.0);
                if next != cursor {
                    self.save(&next).await?;
                }
                return Ok(());
            }
            for event in batch {
                if self.wants(&event) {
                    self.deliver(&event).await?;
                }
                let Some(at) = Cursor::parse(&event.id) else {
                    continue;
                };
                // Lost the lease (this instance stalled past it): another
                // instance delivers from its saved cursor.
                if !self.save(&at).await? {
                    return Ok(());
                }
                cursor = at;
            }
            if next > cursor && !self.save(&next).await? {
                return Ok(());
            }
            cursor = cursor.max(next);
            // Lost and taken back: start again from the saved cursor.
            if self.hold().await? != Lease::Renewed {
                return Ok(());
            }
        }
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
    async fn deliver(&self, event: &Event) -> Result<(), StoreError> {
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
                    return Ok(());
                }
                Ok(resp) => last_error = format!("HTTP {}", resp.status().as_u16()),
                Err(e) => last_error = e,
            }
            self.outcome("failed");
            tracing::debug!(endpoint = %self.name, event = %event.id, attempt, error = %last_error, "webhook attempt failed");
            if attempt < self.max_attempts {
                if !self.wait_holding(wait).await? {
                    return Err(StoreError::Protocol(
                        "another instance took this endpoint over".into(),
                    ));
                }
                wait = (wait * 2).min(MAX_BACKOFF);
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
        self.cmd(cmd).await?;
        self.outcome("dead_lettered");
        Ok(())
    }

    fn outcome(&self, outcome: &str) {
        self.metrics
            .deliveries
            .with_label_values(&[&self.name, outcome])
            .inc();
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
