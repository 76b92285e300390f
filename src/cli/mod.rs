//! Command-line clients of the service (the binary only; the library does
//! not depend on them).
//!
//! - [`admin`]: `sessiongate admin …`, the operator's commands over the HTTP
//!   admin API.

pub mod admin;
