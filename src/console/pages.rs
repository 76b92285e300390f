//! The console's pages, as maud templates compiled into the binary: every
//! interpolation is HTML-escaped, no template files are read at run time,
//! and no page holds inline script or style (the CSP forbids both).

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

/// The sentence an operator must type to log out everyone.
pub const LOGOUT_ALL_PHRASE: &str = "log out everyone";

/// A session as the console shows it.
pub struct Row {
    pub session_id: String,
    pub device_id: String,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub auth_time_ms: i64,
    pub expires_ms: i64,
    pub metadata: Value,
    /// As the last touch recorded them (see `crate::whereabouts`).
    pub last_ip: Option<String>,
    pub last_user_agent: Option<String>,
    /// Browser and system, from the last user agent, else the login's.
    pub device_label: Option<String>,
}

/// Live numbers of this instance.
#[derive(Debug, serde::Serialize)]
pub struct Counters {
    /// Sessions created minus sessions revoked by this instance since it started.
    pub active_sessions: i64,
    pub sessions_created: u64,
    pub sessions_revoked: u64,
    /// Verify answers per second by outcome, over `window_seconds`.
    pub verify_per_second: Vec<(&'static str, f64)>,
    pub window_seconds: f64,
    pub redis_ready: bool,
    pub redis_detail: String,
    /// Unix ms of this reading.
    pub at_ms: i64,
}

/// What the policy makes of a row, for the "state" column.
pub struct Policy {
    pub idle_ms: i64,
    pub reauth_after_ms: i64,
    pub now_ms: i64,
}

fn layout(title: &str, csrf: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · sessiongate console" }
                link rel="stylesheet" href="/admin/static/console.css";
                script src="/admin/static/console.js" defer {}
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    a class="brand" href="/admin/" { "sessiongate console" }
                    @if let Some(csrf) = csrf {
                        nav aria-label="Console" {
                            a href="/admin/" { "Overview" }
                            a href="/admin/keys" { "Signing keys" }
                            a href="/admin/logout-all" { "Log out everyone" }
                            form method="post" action="/admin/logout" class="inline" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" class="link" { "Sign out" }
                            }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn notice(text: Option<&str>) -> Markup {
    html! {
        @if let Some(text) = text {
            p class="notice" role="status" { (text) }
        }
    }
}

fn alert(text: Option<&str>) -> Markup {
    html! {
        @if let Some(text) = text {
            p class="error" role="alert" { (text) }
        }
    }
}

pub fn sign_in(csrf: &str, error: Option<&str>, info: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            (notice(info))
            (alert(error))
            form method="post" action="/admin/login" class="card" {
                input type="hidden" name="csrf" value=(csrf);
                label for="admin_key" { "Admin key" }
                input id="admin_key" name="admin_key" type="password" required
                    autocomplete="off" autocapitalize="none" spellcheck="false";
                p class="hint" {
                    "The key is checked once and never kept by your browser: you get a signed "
                    "console cookie that ends by itself."
                }
                button type="submit" { "Sign in" }
            }
        },
    )
}

fn find_user_form(value: &str) -> Markup {
    html! {
        form method="get" action="/admin/users" class="card" role="search" {
            label for="user_id" { "Find a user" }
            div class="row" {
                input id="user_id" name="user_id" type="search" required value=(value)
                    autocomplete="off" autocapitalize="none" spellcheck="false"
                    placeholder="user id";
                button type="submit" { "Show sessions" }
            }
        }
    }
}

pub fn counters_section(c: &Counters) -> Markup {
    html! {
        section id="counters" class="card" aria-labelledby="counters-h"
            data-src="/admin/counters.json" aria-live="polite" {
            h2 id="counters-h" { "This instance" }
            dl class="counters" {
                div {
                    dt { "Active sessions (created − revoked here since start)" }
                    dd data-counter="active_sessions" { (c.active_sessions.max(0)) }
                }
                div {
                    dt { "Redis" }
                    dd data-counter="redis" class=(if c.redis_ready { "ok" } else { "bad" }) {
                        (if c.redis_ready { "ready".to_string() } else { format!("not ready: {}", c.redis_detail) })
                    }
                }
                @for (outcome, rate) in &c.verify_per_second {
                    div {
                        dt { "Verifies/s: " (outcome) }
                        dd data-counter={ "verify_" (outcome) } { (format!("{rate:.1}")) }
                    }
                }
            }
            p class="hint" data-counter="updated" {
                "As of " (fmt_utc(c.at_ms)) ". Reload the page to update"
                " (it updates by itself when scripts are allowed)."
            }
        }
    }
}

pub fn dashboard(csrf: &str, counters: &Counters, done: Option<&str>) -> Markup {
    layout(
        "Overview",
        Some(csrf),
        html! {
            (notice(done))
            (find_user_form(""))
            (counters_section(counters))
        },
    )
}

fn state_of(r: &Row, p: &Policy) -> String {
    let idle_left = r.last_seen_ms + p.idle_ms - p.now_ms;
    let mut state = format!("active (idle-out in {})", fmt_span(idle_left.max(0)));
    if p.now_ms - r.auth_time_ms > p.reauth_after_ms {
        state.push_str("; password re-entry required");
    }
    state
}

use crate::whereabouts::{IP_KEYS, UA_KEYS, meta_str};

fn session_facts(r: &Row, p: &Policy) -> Markup {
    html! {
        dl class="facts" {
            div { dt { "Device" } dd { (r.device_id) } }
            div { dt { "Browser" } dd class="device-label" { (r.device_label.as_deref().unwrap_or("not recognised")) } }
            div { dt { "First IP" } dd class="first-ip" { (meta_str(&r.metadata, IP_KEYS).unwrap_or("not recorded")) } }
            div { dt { "Last IP" } dd class="last-ip" { (r.last_ip.as_deref().unwrap_or("not recorded yet")) } }
            div { dt { "User agent" } dd class="user-agent" {
                (r.last_user_agent.as_deref().or(meta_str(&r.metadata, UA_KEYS)).unwrap_or("not recorded"))
            } }
            div { dt { "Created" } dd { (fmt_utc(r.created_ms)) } }
            div { dt { "Last seen" } dd { (fmt_utc(r.last_seen_ms)) " (" (fmt_span(p.now_ms - r.last_seen_ms)) " ago)" } }
            div { dt { "Password age" } dd { (fmt_span(p.now_ms - r.auth_time_ms)) } }
            div { dt { "Expires" } dd { (fmt_utc(r.expires_ms)) } }
            div { dt { "State" } dd class="state" { (state_of(r, p)) } }
        }
    }
}

fn revoke_form(
    csrf: &str,
    user: &str,
    action: &str,
    session: Option<&str>,
    label: &str,
    danger: bool,
) -> Markup {
    html! {
        form method="post" action="/admin/users/sign-out" class="inline" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="user_id" value=(user);
            input type="hidden" name="action" value=(action);
            @if let Some(sid) = session {
                input type="hidden" name="session_id" value=(sid);
            }
            button type="submit" class=(if danger { "danger" } else { "" }) { (label) }
        }
    }
}

pub fn user(csrf: &str, user: &str, rows: &[Row], p: &Policy, done: Option<&str>) -> Markup {
    layout(
        &format!("Sessions of {user}"),
        Some(csrf),
        html! {
            (notice(done))
            (find_user_form(user))
            @if rows.is_empty() {
                p class="card" { "No live sessions for this user." }
            } @else {
                div class="actions card" {
                    p { (rows.len()) " live session" (if rows.len() == 1 { "" } else { "s" }) "." }
                    (revoke_form(csrf, user, "everywhere", None, "Sign out everywhere", true))
                }
                ul class="sessions" {
                    @for r in rows {
                        li class="card session" data-session=(r.session_id) {
                            h2 { "Device " (r.device_id) }
                            (session_facts(r, p))
                            div class="actions" {
                                (revoke_form(csrf, user, "session", Some(&r.session_id), "Sign out this device", true))
                                (revoke_form(csrf, user, "others", Some(&r.session_id), "Sign out everywhere but this one", false))
                                a href={ "/admin/sessions/" (r.session_id) "?user_id=" (url_encode(user)) } { "Details" }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn session(csrf: &str, user: Option<&str>, r: &Row, p: &Policy) -> Markup {
    layout(
        "Session",
        Some(csrf),
        html! {
            section class="card" aria-labelledby="s-h" {
                h2 id="s-h" { "Session " code { (r.session_id) } }
                @if let Some(u) = user {
                    p { "User " a href={ "/admin/users?user_id=" (url_encode(u)) } { (u) } }
                }
                (session_facts(r, p))
                @if let Value::Object(map) = &r.metadata {
                    @if !map.is_empty() {
                        h3 { "Metadata" }
                        dl class="facts" {
                            @for (k, v) in map {
                                div { dt { (k) } dd { (match v { Value::String(s) => s.clone(), other => other.to_string() }) } }
                            }
                        }
                    }
                }
                @if let Some(u) = user {
                    div class="actions" {
                        (revoke_form(csrf, u, "session", Some(&r.session_id), "Sign out this device", true))
                        (revoke_form(csrf, u, "others", Some(&r.session_id), "Sign out everywhere but this one", false))
                    }
                }
            }
            section class="card" aria-labelledby="h-h" {
                h2 id="h-h" { "History" }
                p { "History not available: this sessiongate records no session events yet, so "
                    "only the live record is shown." }
            }
        },
    )
}

pub fn session_gone(csrf: &str, user: Option<&str>) -> Markup {
    layout(
        "Session not found",
        Some(csrf),
        html! {
            p class="card" {
                "No live session has this id: it ended (signed out, expired, replaced) or never "
                "existed. History not available: this sessiongate records no session events yet."
            }
            @if let Some(u) = user {
                p { a href={ "/admin/users?user_id=" (url_encode(u)) } { "Sessions of " (u) } }
            }
        },
    )
}

pub fn logout_all(csrf: &str, error: Option<&str>) -> Markup {
    layout(
        "Log out everyone",
        Some(csrf),
        html! {
            (alert(error))
            form method="post" action="/admin/logout-all" class="card danger-zone" {
                input type="hidden" name="csrf" value=(csrf);
                p {
                    "Every token issued until now stops verifying, for every user, at once on "
                    "this instance and within a second on every other. Users must sign in again."
                }
                label for="confirm" { "Type “" (LOGOUT_ALL_PHRASE) "” to confirm" }
                input id="confirm" name="confirm" type="text" required autocomplete="off"
                    autocapitalize="none" spellcheck="false";
                button type="submit" class="danger" { "Log out everyone" }
            }
        },
    )
}

pub fn keys(csrf: &str, active_kid: Option<&str>, done: Option<&str>) -> Markup {
    layout(
        "Signing keys",
        Some(csrf),
        html! {
            (notice(done))
            form method="post" action="/admin/keys/rotate" class="card" {
                input type="hidden" name="csrf" value=(csrf);
                p {
                    "New tokens are signed with key "
                    code data-kid { (active_kid.unwrap_or("unknown (store unavailable)")) }
                    ". Rotating starts a new key; tokens signed with older keys keep verifying "
                    "until they expire."
                }
                button type="submit" { "Rotate the signing key" }
            }
        },
    )
}

pub fn error(title: &str, message: &str) -> Markup {
    layout(
        title,
        None,
        html! {
            p class="error" role="alert" { (message) }
            p { a href="/admin/" { "Back to the console" } }
        },
    )
}

/// Percent-encodes a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `2026-12-02 07:03:12 UTC` from Unix milliseconds.
pub fn fmt_utc(ms: i64) -> String {
    format!("{} UTC", crate::timefmt::utc_seconds(ms.div_euclid(1000)))
}

/// A span of milliseconds as `45s`, `12m`, `3h 5m`, `2d 4h`.
pub fn fmt_span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_utc_and_spans() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(1_796_195_000_000), "2026-12-02 07:03:20 UTC");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_span(59_999), "59s");
        assert_eq!(fmt_span(3_660_000), "1h 1m");
        assert_eq!(fmt_span(-5), "0s");
    }

    #[test]
    fn interpolations_are_escaped() {
        let page = error("x", "<script>alert(1)</script>");
        let text = page.into_string();
        assert!(!text.contains("<script>alert"), "{text}");
        assert!(text.contains("&lt;script&gt;"));
    }
}
