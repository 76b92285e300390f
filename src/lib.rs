//! sessiongate: revocable sessions for token-based apps.
//!
//! A login backend creates a session (a record in Redis) and gets a signed
//! JWT pointing at it; gateways call `/v1/verify` on every request, which
//! checks the signature in-process and the record in Redis in one round
//! trip. Deleting the record is a logout that takes effect on the next
//! request. The HTTP contract is served as `/openapi.json`; the threat model
//! is `SECURITY.md`.
//!
//! # Layout
//! - [`config`]: settings (defaults, TOML, `SESSIONGATE_*`), validated once.
//! - [`startup`]: `Application::build` wires everything and serves.
//! - [`telemetry`]: the tracing subscriber.
//! - [`metrics`]: Prometheus metric names and the per-app registry.
//! - [`error`]: `ApiError`, the single error type at the HTTP edge.
//! - [`domain`]: ids and metadata, parsed and validated once.
//! - [`token`]: JWT signing/verification and the key ring.
//! - [`assertion`]: `X-Session-Assertion`, the signed identity for upstreams.
//! - [`jwks`]: the Ed25519 key of each kid: signatures others verify, the JWK Set.
//! - [`state`]: the cached global state (key ring, logout-all cutoff).
//! - [`session`]: `SessionService`, every use case.
//! - [`store`]: Redis: key schema, Lua scripts, connections.
//! - [`http`]: routes, extractors, handlers, the OpenAPI document.
//! - [`grpc`]: Envoy's gRPC `ext_authz` check, the same decision as `/v1/verify`.
//! - [`console`]: the admin console pages under `/admin/`.
//! - [`events`]: session lifecycle events: webhooks (schema in `store::events`).
//! - [`timefmt`]: UTC times for people (console, `sessiongate admin`).
//! - [`whereabouts`]: where a session was used from (client address through
//!   trusted proxies, bounded user agent, device label).

pub mod assertion;
pub mod config;
pub mod console;
pub mod domain;
pub mod error;
pub mod events;
pub mod grpc;
pub mod http;
pub mod jwks;
pub mod metrics;
pub mod session;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod timefmt;
pub mod token;
pub mod whereabouts;
