//! Session lifecycle events (issue 10): written by the store's scripts (see
//! [`crate::store::events`] for the schema, ids and retention), served by
//! `GET /v1/admin/events` (JSON pages or Server-Sent Events, see
//! `http::events`) and pushed to webhook endpoints ([`webhooks`]).
//!
//! Delivery is **at least once**: a consumer may see an event twice (a
//! webhook acknowledged by the receiver but not yet recorded as delivered
//! when sessiongate died; an SSE client resuming from an older id) and
//! deduplicates by the event's `id`. No event of an acknowledged change is
//! lost: it was written with the change. Events are lost only to retention
//! (`events_max_len`), for a consumer that far behind.

pub mod webhooks;

pub use crate::store::events::{Cursor, Event, Filter, SCHEMA_VERSION, Tombstone};
