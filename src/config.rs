//! Settings: the defaults in `config/default.toml` (compiled in), then the
//! TOML file named by `SESSIONGATE_CONFIG`, then one `SESSIONGATE_<KEY>`
//! environment variable per setting. Every value is validated once here; a
//! bad one stops start-up with an error naming where it came from (the
//! environment variable, or the key and file). Secrets never appear in
//! `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use toml::{Table, Value};

/// The defaults, which also document every setting.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// Environment variable naming a TOML file loaded over the defaults.
pub const CONFIG_ENV: &str = "SESSIONGATE_CONFIG";

const ENV_PREFIX: &str = "SESSIONGATE_";
const MIN_SECRET_LEN: usize = 32;
const MAX_LEEWAY: Duration = Duration::from_secs(5);

/// A secret string (API key, signing secret): redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A Redis URL: its password (`user:pass@` or `?password=`) is redacted in
/// `Debug` and `Display`; `Deref` gives the real URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The real URL, credentials included.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without credentials, for logs.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let without_query = url.split('?').next().unwrap_or(url);
        let mut out = match (without_query.find("://"), without_query.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***{}", &without_query[..scheme], &without_query[at..])
            }
            _ => without_query.to_string(),
        };
        if url.contains('?') {
            out.push_str("?***");
        }
        out
    }
}

impl std::ops::Deref for RedisUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting of the service, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    /// The Envoy gRPC `ext_authz` listener (`grpc_listen`); `None`: off.
    pub grpc_listen: Option<std::net::SocketAddr>,
    pub workers: usize,
    pub body_limit: usize,
    pub max_header_bytes: usize,
    pub client_request_timeout: Duration,
    pub keep_alive: Duration,
    pub max_connections: usize,
    pub api_key_failure_limit: u32,
    pub api_key_failure_window: Duration,
    pub redis_url: RedisUrl,
    pub redis_cluster_nodes: Vec<RedisUrl>,
    pub redis_sentinels: Vec<RedisUrl>,
    pub redis_sentinel_master: String,
    pub redis_min_replicas_ack: u32,
    pub redis_timeout: Duration,
    pub redis_pool_size: usize,
    pub key_prefix: String,
    pub state_refresh_interval: Duration,
    pub state_max_staleness: Duration,
    pub logout_all_purge_delay: Duration,
    pub issuer_keys: Vec<Secret>,
    pub admin_keys: Vec<Secret>,
    pub signing_secret: Secret,
    pub issuer: String,
    pub jwt_algorithm: Algorithm,
    pub clock_leeway: Duration,
    pub max_token_bytes: usize,
    pub verified_token_cache: usize,
    pub cookie_name: String,
    pub csrf_protection: bool,
    pub allowed_origins: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub idle_timeout: Duration,
    pub absolute_lifetime: Duration,
    pub reauth_after: Duration,
    pub max_sessions_per_user: u32,
    pub touch_interval: Duration,
    /// The near-cache's bound (0: off, the default).
    pub near_cache_ttl: Duration,
    pub console_session_ttl: Duration,
    pub events: bool,
    pub events_max_len: u64,
    pub tombstone_retention: Duration,
    /// `(name, url)` of each webhook endpoint.
    pub webhook_urls: Vec<(String, String)>,
    pub webhook_secret: Secret,
    /// `(name, url)` of each CAEP (RFC 8935 push) receiver.
    pub caep_urls: Vec<(String, String)>,
    pub webhook_timeout: Duration,
    pub webhook_max_attempts: u32,
    pub webhook_backoff: Duration,
    /// `X-Session-Assertion` on every successful verify (`upstream_assertion`).
    pub upstream_assertion: bool,
    pub upstream_assertion_audience: String,
    pub upstream_assertion_lifetime: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// A setting that could not be used; `setting` names its source.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

impl Settings {
    /// Loads from the process environment (and `SESSIONGATE_CONFIG`),
    /// after refusing any `SESSIONGATE_*` variable it does not know.
    pub fn from_env() -> Result<Settings, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        check_env_names(&vars)?;
        Self::load(&|name| std::env::var(name).ok())
    }

    /// Loads with `env` standing in for the process environment, so tests
    /// can build settings without touching global state.
    pub fn load(env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let mut layers = Layers::defaults();
        if let Some(path) = env(CONFIG_ENV).filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
                setting: CONFIG_ENV.into(),
                message: format!("cannot read {path}: {e}"),
            })?;
            layers.overlay_file(&path, &text)?;
        }
        layers.overlay_env(env)?;
        layers.build()
    }

    /// The Redis topology these settings select (validated unambiguous at
    /// load): Sentinel, Cluster, or the one `redis_url`.
    pub fn redis_topology(&self) -> crate::store::Topology {
        use crate::store::Topology;
        let urls = |list: &[RedisUrl]| list.iter().map(|u| u.expose().to_string()).collect();
        if !self.redis_sentinels.is_empty() {
            Topology::Sentinel {
                sentinels: urls(&self.redis_sentinels),
                master: self.redis_sentinel_master.clone(),
            }
        } else if !self.redis_cluster_nodes.is_empty() {
            Topology::Cluster {
                nodes: urls(&self.redis_cluster_nodes),
            }
        } else {
            Topology::Standalone {
                url: self.redis_url.expose().to_string(),
            }
        }
    }

    /// The interval at which a verify may write `last_seen_at`: the
    /// configured `touch_interval`, capped at a tenth of the idle timeout.
    pub fn effective_touch_interval(&self) -> Duration {
        self.touch_interval.min(self.idle_timeout / 10)
    }
}

/// The merged TOML table plus where each value came from.
struct Layers {
    table: Table,
    source: HashMap<String, String>,
}

impl Layers {
    fn defaults() -> Layers {
        let table: Table = DEFAULTS_TOML
            .parse()
            .expect("config/default.toml is valid TOML");
        let source = table
            .keys()
            .map(|k| {
                let var = format!("{ENV_PREFIX}{}", k.to_ascii_uppercase());
                (k.clone(), format!("{var} (not set; default)"))
            })
            .collect();
        Layers { table, source }
    }

    fn overlay_file(&mut self, path: &str, text: &str) -> Result<(), ConfigError> {
        let file: Table = text.parse().map_err(|e| ConfigError {
            setting: path.to_string(),
            message: format!("not valid TOML: {e}"),
        })?;
        for (key, value) in file {
            if !self.table.contains_key(&key) {
                return Err(ConfigError {
                    setting: format!("{key} in {path}"),
                    message: "unknown setting".into(),
                });
            }
            self.source.insert(key.clone(), format!("{key} in {path}"));
            self.table.insert(key, value);
        }
        Ok(())
    }

    fn overlay_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let keys: Vec<String> = self.table.keys().cloned().collect();
        for key in keys {
            let var = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase());
            let Some(raw) = env(&var) else { continue };
            let value = match &self.table[&key] {
                Value::Integer(_) => {
                    Value::Integer(raw.trim().parse().map_err(|_| ConfigError {
                        setting: var.clone(),
                        message: format!("expected a whole number, got {:?}", raw),
                    })?)
                }
                Value::Array(_) => Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_string()))
                        .collect(),
                ),
                _ => Value::String(raw),
            };
            self.table.insert(key, value);
            self.source.insert(key_of(&var), var);
        }
        Ok(())
    }

    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: self.source.get(key).cloned().unwrap_or_else(|| key.into()),
            message: message.into(),
        }
    }

    /// Whether `key` was given (in a file or the environment), not defaulted.
    fn is_set(&self, key: &str) -> bool {
        self.source
            .get(key)
            .is_some_and(|s| !s.ends_with("(not set; default)"))
    }

    /// The name of `key`'s environment variable.
    fn var(key: &str) -> String {
        format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
    }

    /// Refuses an ambiguous or contradictory choice of Redis topology,
    /// naming the variables involved.
    fn check_topology(
        &self,
        sentinels: &[String],
        master: &str,
        cluster: &[String],
    ) -> Result<(), ConfigError> {
        let [url, sent, mast, nodes] = [
            "redis_url",
            "redis_sentinels",
            "redis_sentinel_master",
            "redis_cluster_nodes",
        ]
        .map(Self::var);
        let refuse = |setting: String, message: String| Err(ConfigError { setting, message });
        if !sentinels.is_empty() && master.is_empty() {
            return refuse(
                sent.clone(),
                format!("Sentinel mode needs the master name too: set {mast} as well"),
            );
        }
        if sentinels.is_empty() && !master.is_empty() {
            return refuse(
                mast,
                format!("Sentinel mode needs the sentinels' addresses too: set {sent} as well"),
            );
        }
        if !sentinels.is_empty() && !cluster.is_empty() {
            return refuse(
                format!("{sent} and {nodes}"),
                "choose one topology: Sentinel or Cluster, not both".into(),
            );
        }
        if self.is_set("redis_url") && !(sentinels.is_empty() && cluster.is_empty()) {
            let (mode, other) = if sentinels.is_empty() {
                ("Cluster", nodes)
            } else {
                ("Sentinel", sent)
            };
            return refuse(
                format!("{url} and {other}"),
                format!(
                    "{mode} mode does not use {url} ({}); unset one of them",
                    self.source["redis_url"]
                ),
            );
        }
        Ok(())
    }

    fn string(&self, key: &str) -> Result<String, ConfigError> {
        match self.table.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(self.err(key, "expected a string")),
        }
    }

    fn integer(&self, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        match self.table.get(key) {
            Some(Value::Integer(n)) if (min..=max).contains(n) => Ok(*n),
            Some(Value::Integer(n)) => {
                Err(self.err(key, format!("{n} is out of range {min}..={max}")))
            }
            _ => Err(self.err(key, "expected a whole number")),
        }
    }

    fn duration(&self, key: &str) -> Result<Duration, ConfigError> {
        let text = self.string(key)?;
        parse_duration(&text).ok_or_else(|| {
            self.err(
                key,
                format!("{text:?} is not a duration (write e.g. 250ms, 5s, 30m, 12h, 30d)"),
            )
        })
    }

    fn boolean(&self, key: &str) -> Result<bool, ConfigError> {
        match self.table.get(key) {
            Some(Value::Boolean(b)) => Ok(*b),
            Some(Value::String(s)) if s == "true" => Ok(true),
            Some(Value::String(s)) if s == "false" => Ok(false),
            _ => Err(self.err(key, "expected true or false")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let Some(Value::Array(items)) = self.table.get(key) else {
            return Err(self.err(key, "expected a list"));
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.err(key, "expected a list of strings")),
            })
            .collect()
    }

    fn secrets(&self, key: &str) -> Result<Vec<Secret>, ConfigError> {
        let Some(Value::Array(items)) = self.table.get(key) else {
            return Err(self.err(key, "expected a list of keys"));
        };
        if items.is_empty() {
            return Err(self.err(key, "is required: give at least one key"));
        }
        items
            .iter()
            .map(|item| match item {
                Value::String(s) if s.len() >= MIN_SECRET_LEN => Ok(Secret::new(s.clone())),
                Value::String(_) => Err(self.err(
                    key,
                    format!("every key must be at least {MIN_SECRET_LEN} characters"),
                )),
                _ => Err(self.err(key, "expected a list of strings")),
            })
            .collect()
    }

    fn build(self) -> Result<Settings, ConfigError> {
        let signing_secret = self.string("signing_secret")?;
        if signing_secret.len() < MIN_SECRET_LEN {
            return Err(self.err(
                "signing_secret",
                format!("is required and must be at least {MIN_SECRET_LEN} bytes"),
            ));
        }
        let jwt_algorithm = match self.string("jwt_algorithm")?.as_str() {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => {
                return Err(self.err(
                    "jwt_algorithm",
                    format!("{other:?} is not one of HS256, HS384, HS512"),
                ));
            }
        };
        let log_format = match self.string("log_format")?.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(self.err("log_format", format!("{other:?} is not text or json"))),
        };
        let redis_url = self.string("redis_url")?;
        if !["redis://", "rediss://", "unix://", "redis+unix://"]
            .iter()
            .any(|scheme| redis_url.starts_with(scheme))
        {
            return Err(self.err(
                "redis_url",
                "must start with redis://, rediss:// or unix://",
            ));
        }
        let key_prefix = self.string("key_prefix")?;
        if key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_control) {
            return Err(self.err(
                "key_prefix",
                "must not contain '{', '}' or control characters",
            ));
        }
        let cookie_name = self.string("cookie_name")?;
        if cookie_name.is_empty()
            || !cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(self.err("cookie_name", "must be a non-empty token of [A-Za-z0-9._-]"));
        }
        let clock_leeway = self.duration("clock_leeway")?;
        if clock_leeway > MAX_LEEWAY {
            return Err(self.err("clock_leeway", "must be at most 5s"));
        }
        let positive = |key: &str| -> Result<Duration, ConfigError> {
            let d = self.duration(key)?;
            if d.is_zero() {
                return Err(self.err(key, "must be greater than zero"));
            }
            Ok(d)
        };
        self.check_topology(
            &self.strings("redis_sentinels")?,
            self.string("redis_sentinel_master")?.trim(),
            &self.strings("redis_cluster_nodes")?,
        )?;
        let settings = Settings {
            listen: self.string("listen")?,
            grpc_listen: {
                let text = self.string("grpc_listen")?;
                let text = text.trim();
                if text.is_empty() {
                    None
                } else {
                    Some(text.parse().map_err(|_| {
                        self.err(
                            "grpc_listen",
                            format!("{text:?} is not an address:port such as 127.0.0.1:9191 (empty: off)"),
                        )
                    })?)
                }
            },
            workers: self.integer("workers", 0, 1024)? as usize,
            body_limit: self.integer("body_limit", 1024, 1 << 24)? as usize,
            max_header_bytes: self.integer("max_header_bytes", 1024, 1 << 20)? as usize,
            client_request_timeout: positive("client_request_timeout")?,
            keep_alive: positive("keep_alive")?,
            max_connections: self.integer("max_connections", 1, 1_000_000)? as usize,
            api_key_failure_limit: self.integer("api_key_failure_limit", 0, 1_000_000)? as u32,
            api_key_failure_window: positive("api_key_failure_window")?,
            redis_url: RedisUrl(redis_url),
            redis_cluster_nodes: {
                let nodes = self.strings("redis_cluster_nodes")?;
                if let Some(bad) = nodes
                    .iter()
                    .find(|n| !(n.starts_with("redis://") || n.starts_with("rediss://")))
                {
                    return Err(self.err(
                        "redis_cluster_nodes",
                        format!("{bad:?} must start with redis:// or rediss://"),
                    ));
                }
                nodes.into_iter().map(RedisUrl).collect()
            },
            redis_sentinels: {
                let sentinels = self.strings("redis_sentinels")?;
                if let Some(bad) = sentinels.iter().find(|n| !n.starts_with("redis://")) {
                    return Err(self.err(
                        "redis_sentinels",
                        format!("{:?} must start with redis://", RedisUrl(bad.clone())),
                    ));
                }
                sentinels.into_iter().map(RedisUrl).collect()
            },
            redis_sentinel_master: self.string("redis_sentinel_master")?.trim().to_string(),
            redis_min_replicas_ack: self.integer("redis_min_replicas_ack", 0, 64)? as u32,
            redis_timeout: positive("redis_timeout")?,
            redis_pool_size: self.integer("redis_pool_size", 1, 1024)? as usize,
            key_prefix,
            state_refresh_interval: positive("state_refresh_interval")?,
            state_max_staleness: positive("state_max_staleness")?,
            logout_all_purge_delay: {
                let d = self.duration("logout_all_purge_delay")?;
                if d > Duration::from_secs(86_400) {
                    return Err(self.err("logout_all_purge_delay", "must be at most 1d"));
                }
                d
            },
            issuer_keys: self.secrets("issuer_keys")?,
            admin_keys: self.secrets("admin_keys")?,
            signing_secret: Secret::new(signing_secret),
            issuer: self.string("issuer")?,
            jwt_algorithm,
            clock_leeway,
            max_token_bytes: self.integer("max_token_bytes", 256, 65536)? as usize,
            verified_token_cache: self.integer("verified_token_cache", 0, 10_000_000)? as usize,
            cookie_name,
            csrf_protection: self.boolean("csrf_protection")?,
            allowed_origins: self
                .strings("allowed_origins")?
                .into_iter()
                .map(|o| {
                    let o = o.trim_end_matches('/').to_ascii_lowercase();
                    if o.starts_with("http://") || o.starts_with("https://") {
                        Ok(o)
                    } else {
                        Err(self.err(
                            "allowed_origins",
                            format!("{o:?} is not scheme://host[:port]"),
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
            trusted_proxies: self
                .strings("trusted_proxies")?
                .iter()
                .map(|p| {
                    IpNet::parse(p).ok_or_else(|| {
                        self.err(
                            "trusted_proxies",
                            format!("{p:?} is not an IP address or CIDR block"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            idle_timeout: positive("idle_timeout")?,
            absolute_lifetime: positive("absolute_lifetime")?,
            reauth_after: positive("reauth_after")?,
            max_sessions_per_user: self.integer("max_sessions_per_user", 1, 10_000)? as u32,
            touch_interval: positive("touch_interval")?,
            near_cache_ttl: {
                let d = self.duration("near_cache_ttl")?;
                if d > Duration::from_secs(60) {
                    return Err(self.err("near_cache_ttl", "must be at most 60s"));
                }
                d
            },
            console_session_ttl: {
                let ttl = positive("console_session_ttl")?;
                if ttl > Duration::from_secs(86_400) {
                    return Err(self.err("console_session_ttl", "must be at most 24h"));
                }
                ttl
            },
            events: self.boolean("events")?,
            events_max_len: self.integer("events_max_len", 100, 100_000_000)? as u64,
            tombstone_retention: self.duration("tombstone_retention")?,
            webhook_urls: self.endpoints("webhook_urls")?,
            caep_urls: self.endpoints("caep_urls")?,
            webhook_secret: Secret::new(self.string("webhook_secret")?),
            webhook_timeout: positive("webhook_timeout")?,
            webhook_max_attempts: self.integer("webhook_max_attempts", 1, 1000)? as u32,
            webhook_backoff: positive("webhook_backoff")?,
            upstream_assertion: self.boolean("upstream_assertion")?,
            upstream_assertion_audience: self.string("upstream_assertion_audience")?,
            upstream_assertion_lifetime: {
                let d = positive("upstream_assertion_lifetime")?;
                if !(Duration::from_secs(10)..=Duration::from_secs(3600)).contains(&d) {
                    return Err(
                        self.err("upstream_assertion_lifetime", "must be between 10s and 1h")
                    );
                }
                d
            },
            log_level: self.string("log_level")?,
            log_format,
        };
        if !settings.webhook_urls.is_empty() {
            let names: std::collections::HashSet<&str> = settings
                .webhook_urls
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            if names.len() != settings.webhook_urls.len() {
                return Err(self.err("webhook_urls", "every endpoint needs its own name"));
            }
            if crate::events::webhooks::secret_bytes(&settings.webhook_secret).is_none() {
                return Err(self.err(
                    "webhook_secret",
                    "is required with webhook_urls: whsec_<base64> or at least 32 bytes",
                ));
            }
        }
        let caep_names: std::collections::HashSet<&str> =
            settings.caep_urls.iter().map(|(n, _)| n.as_str()).collect();
        if caep_names.len() != settings.caep_urls.len() {
            return Err(self.err("caep_urls", "every receiver needs its own name"));
        }
        if settings.upstream_assertion && settings.upstream_assertion_audience.trim().is_empty() {
            return Err(self.err(
                "upstream_assertion_audience",
                "is required when upstream_assertion is on: the `aud` your upstreams check",
            ));
        }
        if settings.state_max_staleness < settings.state_refresh_interval * 2 {
            return Err(self.err(
                "state_max_staleness",
                "must be at least twice state_refresh_interval",
            ));
        }
        Ok(settings)
    }

    /// `name=http(s)://…` entries.
    fn endpoints(&self, key: &str) -> Result<Vec<(String, String)>, ConfigError> {
        self.strings(key)?
            .iter()
            .map(|entry| {
                let bad = || {
                    self.err(
                        key,
                        format!("{entry:?} is not name=http(s)://… (name: letters, digits, _ . -)"),
                    )
                };
                let (name, url) = entry.split_once('=').ok_or_else(bad)?;
                let name_ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                if !name_ok || !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(bad());
                }
                Ok((name.to_string(), url.to_string()))
            })
            .collect()
    }
}

/// An IP network: an address and a prefix length (a lone address is /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Option<IpNet> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        if self.prefix == 0 {
            return true;
        }
        let shift = bits - self.prefix as u32;
        (net >> shift) == (ip >> shift)
    }
}

/// `SESSIONGATE_*` names that are not settings of `serve` but are read by
/// client-side commands (`sessiongate admin`) or by the repository's own
/// scripts and tests. They are allowed in the service's environment too, so
/// one shell or unit file can hold both; the service never reads them.
pub const NON_SETTING_ENV: &[&str] = &[
    // `sessiongate admin`: where the service is, and the operator's key.
    "SESSIONGATE_URL",
    "SESSIONGATE_ADMIN_KEY",
    "SESSIONGATE_ADMIN_KEY_FILE",
    // scripts/dev and scripts/redis-dev: the development Redis's port.
    "SESSIONGATE_DEV_REDIS_PORT",
    // tests/api/redis_server.rs: the redis.conf the tests' servers run.
    "SESSIONGATE_REDIS_CONF",
    // scripts/test and tests/api/console.rs: the browser tests' Python venv,
    // its interpreter and the Chromium it drives.
    "SESSIONGATE_TEST_VENV",
    "SESSIONGATE_TEST_PYTHON",
    "SESSIONGATE_TEST_CHROMIUM",
];

/// Variables of API v1.1 (`API.md`, "Additions"). Any of them that is not a
/// setting of this build (not a key of `config/default.toml`) stops start-up
/// when set to a non-empty value, instead of being silently ignored.
const V1_1_ENV: &[&str] = &[
    "SESSIONGATE_REDIS_SENTINELS",
    "SESSIONGATE_REDIS_SENTINEL_MASTER",
    "SESSIONGATE_REDIS_CLUSTER_NODES",
    "SESSIONGATE_REDIS_MIN_REPLICAS_ACK",
    "SESSIONGATE_GRPC_LISTEN",
];

/// The v1.1 variables that are not settings of this build.
pub fn unsupported_v1_1_env() -> Vec<&'static str> {
    let settings = setting_env_names();
    V1_1_ENV
        .iter()
        .copied()
        .filter(|v| !settings.iter().any(|s| s == v))
        .collect()
}

/// Every `SESSIONGATE_*` variable that names a setting: one per key of the
/// settings table (`config/default.toml`), plus `SESSIONGATE_CONFIG`. A new
/// setting is known here as soon as it has a default.
pub fn setting_env_names() -> Vec<String> {
    let table: Table = DEFAULTS_TOML
        .parse()
        .expect("config/default.toml is valid TOML");
    std::iter::once(CONFIG_ENV.to_string())
        .chain(
            table
                .keys()
                .map(|k| format!("{ENV_PREFIX}{}", k.to_ascii_uppercase())),
        )
        .collect()
}

/// Refuses the first `SESSIONGATE_*` variable (any letter case) in `vars`
/// that is neither a setting nor in `NON_SETTING_ENV`, naming it and the
/// closest known name if one is near; and a v1.1 variable this build does
/// not support, when it is set to anything but the empty string.
pub fn check_env_names(vars: &[(String, String)]) -> Result<(), ConfigError> {
    let settings = setting_env_names();
    let known = |name: &str| settings.iter().any(|s| s == name) || NON_SETTING_ENV.contains(&name);
    let mut names: Vec<&(String, String)> = vars
        .iter()
        .filter(|(name, _)| {
            name.len() >= ENV_PREFIX.len()
                && name.as_bytes()[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX.as_bytes())
        })
        .collect();
    names.sort();
    for (name, value) in names {
        if known(name) {
            continue;
        }
        if V1_1_ENV.contains(&name.as_str()) {
            if value.is_empty() {
                continue;
            }
            return Err(ConfigError {
                setting: name.clone(),
                message: "is an API v1.1 setting that this build does not support; \
                          unset it (or use a build that supports it)"
                    .into(),
            });
        }
        let candidates = settings
            .iter()
            .map(String::as_str)
            .chain(NON_SETTING_ENV.iter().copied())
            .chain(V1_1_ENV.iter().copied());
        let message = match closest(name, candidates) {
            Some(near) => format!("unknown variable; did you mean {near}?"),
            None => "unknown variable (see config/default.toml for every setting)".into(),
        };
        return Err(ConfigError {
            setting: name.clone(),
            message,
        });
    }
    Ok(())
}

/// The candidate nearest to `name` (the first of equally near ones; letter
/// case ignored; adjacent
/// transpositions count as one edit), if it is within a third of the
/// name's length after the prefix, and at most 3 edits.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let upper = name.to_ascii_uppercase();
    let tail = upper.get(ENV_PREFIX.len()..).unwrap_or("");
    let limit = (tail.len() / 3).clamp(1, 3);
    candidates
        .map(|c| (edit_distance(&upper, c), c))
        .filter(|(d, _)| *d <= limit)
        // The first of equally near ones: settings are listed first.
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal-string-alignment distance between two byte strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

fn key_of(var: &str) -> String {
    var[ENV_PREFIX.len()..].to_ascii_lowercase()
}

/// Parses `250ms`, `5s`, `30m`, `12h`, `30d`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 12 {
        return None;
    }
    let n: u64 = text[..digits].parse().ok()?;
    let unit_ms = match &text[digits..] {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(unit_ms)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn required() -> Vec<(&'static str, &'static str)> {
        vec![
            ("SESSIONGATE_ISSUER_KEYS", KEY),
            ("SESSIONGATE_ADMIN_KEYS", KEY),
            ("SESSIONGATE_SIGNING_SECRET", KEY),
        ]
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(43200)));
        assert_eq!(parse_duration("30d"), Some(Duration::from_secs(2_592_000)));
        for bad in ["", "5", "s", "5 s", "-5s", "5x", "1.5h", "99999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_plus_required_secrets_load() {
        let s = Settings::load(&env_with(&required())).unwrap();
        assert_eq!(s.idle_timeout, Duration::from_secs(1800));
        assert_eq!(s.redis_timeout, Duration::from_millis(250));
        assert_eq!(s.max_sessions_per_user, 10);
        assert_eq!(s.cookie_name, "session");
    }

    #[test]
    fn missing_or_short_secrets_name_the_variable() {
        for var in [
            "SESSIONGATE_ISSUER_KEYS",
            "SESSIONGATE_ADMIN_KEYS",
            "SESSIONGATE_SIGNING_SECRET",
        ] {
            let mut env = required();
            env.retain(|(k, _)| *k != var);
            let err = Settings::load(&env_with(&env)).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
            env.push((var, "short"));
            let err = Settings::load(&env_with(&env)).unwrap_err();
            assert_eq!(err.setting, var);
        }
    }

    #[test]
    fn bad_duration_names_the_variable() {
        let mut env = required();
        env.push(("SESSIONGATE_IDLE_TIMEOUT", "ten minutes"));
        let err = Settings::load(&env_with(&env)).unwrap_err();
        assert_eq!(err.setting, "SESSIONGATE_IDLE_TIMEOUT");
        let mut env = required();
        env.push(("SESSIONGATE_WORKERS", "two"));
        assert_eq!(
            Settings::load(&env_with(&env)).unwrap_err().setting,
            "SESSIONGATE_WORKERS"
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let mut env = required();
        env.push((
            "SESSIONGATE_REDIS_URL",
            "redis://app:hunter2-password@db:6379/0",
        ));
        let s = Settings::load(&env_with(&env)).unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains(KEY));
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("db:6379"));
        let q = RedisUrl("unix:///run/redis.sock?db=0&pass=hunter2".into());
        assert!(!q.to_string().contains("hunter2"));
    }

    #[test]
    fn file_layer_overrides_defaults_and_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("sg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "idle_timeout = \"5m\"\nmax_sessions_per_user = 3\n").unwrap();
        let mut env = required();
        let path = good.to_str().unwrap().to_string();
        env.push((CONFIG_ENV, &path));
        let s = Settings::load(&env_with(&env)).unwrap();
        assert_eq!(s.idle_timeout, Duration::from_secs(300));
        assert_eq!(s.max_sessions_per_user, 3);

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "idle_timout = \"5m\"\n").unwrap();
        let mut env = required();
        let path = bad.to_str().unwrap().to_string();
        env.push((CONFIG_ENV, &path));
        let err = Settings::load(&env_with(&env)).unwrap_err();
        assert!(err.setting.starts_with("idle_timout in"), "{err}");
    }

    #[test]
    fn ip_networks_match_addresses() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(
            IpNet::parse("::1")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert!(
            IpNet::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["", "10.0.0.0/33", "x", "10.0.0/8", "::1/129"] {
            assert!(IpNet::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn lists_and_booleans_come_from_the_environment() {
        let mut env = required();
        env.push(("SESSIONGATE_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"));
        env.push(("SESSIONGATE_ALLOWED_ORIGINS", "https://App.example.com/"));
        env.push(("SESSIONGATE_CSRF_PROTECTION", "false"));
        let s = Settings::load(&env_with(&env)).unwrap();
        assert_eq!(s.trusted_proxies.len(), 2);
        assert_eq!(
            s.allowed_origins,
            vec!["https://app.example.com".to_string()]
        );
        assert!(!s.csrf_protection);
        let mut env = required();
        env.push(("SESSIONGATE_TRUSTED_PROXIES", "localhost"));
        assert_eq!(
            Settings::load(&env_with(&env)).unwrap_err().setting,
            "SESSIONGATE_TRUSTED_PROXIES"
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_setting_has_its_variable_and_the_rest_are_refused() {
        // Every key of the table (and so of `Settings`) is a known name.
        let table: Table = DEFAULTS_TOML.parse().unwrap();
        let mut all: Vec<(String, String)> = table
            .keys()
            .map(|k| {
                (
                    format!("SESSIONGATE_{}", k.to_ascii_uppercase()),
                    "x".into(),
                )
            })
            .collect();
        all.push(("SESSIONGATE_CONFIG".into(), "x".into()));
        all.extend(vars(&[
            ("SESSIONGATE_URL", "http://127.0.0.1:8080"),
            ("SESSIONGATE_ADMIN_KEY", "k"),
            ("SESSIONGATE_ADMIN_KEY_FILE", "/k"),
            ("PATH", "/bin"),
            ("SESSIONGATEWAY", "not ours: no underscore"),
        ]));
        check_env_names(&all).unwrap();
        assert!(setting_env_names().contains(&"SESSIONGATE_REDIS_URL".to_string()));
    }

    #[test]
    fn an_unknown_variable_is_named_with_the_nearest_known_one() {
        let cases = [
            ("SESSIONGATE_REDIS_ULR", Some("SESSIONGATE_REDIS_URL")),
            ("SESSIONGATE_IDLE_TIMOUT", Some("SESSIONGATE_IDLE_TIMEOUT")),
            ("SESSIONGATE_ISSUER_KEY", Some("SESSIONGATE_ISSUER_KEYS")),
            ("sessiongate_redis_url", Some("SESSIONGATE_REDIS_URL")),
            ("SESSIONGATE_ADMIN_KEYZ", Some("SESSIONGATE_ADMIN_KEYS")),
            ("SESSIONGATE_GRPC_LISTN", Some("SESSIONGATE_GRPC_LISTEN")),
            ("SESSIONGATE_COMPLETELY_DIFFERENT", None),
            ("SESSIONGATE_", None),
        ];
        for (name, near) in cases {
            let err = check_env_names(&vars(&[("HOME", "/root"), (name, "")])).unwrap_err();
            assert_eq!(err.setting, name);
            match near {
                Some(near) => assert_eq!(
                    err.message,
                    format!("unknown variable; did you mean {near}?"),
                    "{name}"
                ),
                None => assert!(!err.message.contains("did you mean"), "{name}: {err}"),
            }
        }
    }

    #[test]
    fn a_v1_1_variable_this_build_lacks_is_refused_when_set() {
        let table: Table = DEFAULTS_TOML.parse().unwrap();
        let unsupported = unsupported_v1_1_env();
        for name in V1_1_ENV {
            assert_eq!(
                unsupported.contains(name),
                !table.contains_key(&key_of(name)),
                "{name}"
            );
        }
        for name in &unsupported {
            let err = check_env_names(&vars(&[(name, "127.0.0.1:9191")])).unwrap_err();
            assert_eq!(err.setting, *name);
            assert!(err.message.contains("not support"), "{err}");
            // Empty means "not used", which is what this build does.
            check_env_names(&vars(&[(name, "")])).unwrap();
        }
        // A v1.1 name that is a setting here is simply a setting.
        for name in V1_1_ENV.iter().filter(|v| !unsupported.contains(v)) {
            check_env_names(&vars(&[(name, "redis://127.0.0.1:7000")])).unwrap();
        }
    }

    #[test]
    fn logout_all_purge_delay_defaults_to_zero_and_is_capped_at_a_day() {
        let s = Settings::load(&env_with(&required())).unwrap();
        assert_eq!(s.logout_all_purge_delay, Duration::ZERO);
        let mut env = required();
        env.push(("SESSIONGATE_LOGOUT_ALL_PURGE_DELAY", "1d"));
        let s = Settings::load(&env_with(&env)).unwrap();
        assert_eq!(s.logout_all_purge_delay, Duration::from_secs(86_400));
        for bad in ["25h", "soon"] {
            let mut env = required();
            env.push(("SESSIONGATE_LOGOUT_ALL_PURGE_DELAY", bad));
            assert_eq!(
                Settings::load(&env_with(&env)).unwrap_err().setting,
                "SESSIONGATE_LOGOUT_ALL_PURGE_DELAY"
            );
        }
    }

    #[test]
    fn a_contradictory_redis_topology_stops_start_up_naming_the_variables() {
        const URL: (&str, &str) = ("SESSIONGATE_REDIS_URL", "redis://10.0.0.1:6379/0");
        const SENTINELS: (&str, &str) = (
            "SESSIONGATE_REDIS_SENTINELS",
            "redis://10.0.0.5:26379,redis://10.0.0.6:26379",
        );
        const MASTER: (&str, &str) = ("SESSIONGATE_REDIS_SENTINEL_MASTER", "sessiongate");
        const NODES: (&str, &str) = ("SESSIONGATE_REDIS_CLUSTER_NODES", "redis://10.0.0.7:7000");
        type Vars = &'static [(&'static str, &'static str)];
        let cases: [(Vars, [&str; 2]); 6] = [
            (&[SENTINELS], [SENTINELS.0, MASTER.0]),
            (&[MASTER], [MASTER.0, SENTINELS.0]),
            (&[SENTINELS, MASTER, NODES], [SENTINELS.0, NODES.0]),
            (&[URL, SENTINELS, MASTER], [URL.0, SENTINELS.0]),
            (&[URL, NODES], [URL.0, NODES.0]),
            (&[URL, MASTER], [MASTER.0, SENTINELS.0]),
        ];
        for (given, named) in cases {
            let mut env = required();
            env.extend_from_slice(given);
            let err = Settings::load(&env_with(&env)).unwrap_err().to_string();
            for name in named {
                assert!(err.contains(name), "{given:?}: {err}");
            }
        }
        // Each topology alone is fine, and the one chosen.
        use crate::store::Topology;
        let load = |extra: &[(&'static str, &'static str)]| {
            let mut env = required();
            env.extend_from_slice(extra);
            Settings::load(&env_with(&env)).unwrap().redis_topology()
        };
        assert!(matches!(load(&[URL]), Topology::Standalone { url } if url == URL.1));
        assert!(matches!(load(&[NODES]), Topology::Cluster { nodes } if nodes.len() == 1));
        match load(&[SENTINELS, MASTER]) {
            Topology::Sentinel { sentinels, master } => {
                assert_eq!(sentinels.len(), 2);
                assert_eq!(master, "sessiongate");
            }
            _ => panic!("Sentinel expected"),
        }
        // Empty values mean "not used".
        assert!(matches!(
            load(&[("SESSIONGATE_REDIS_SENTINEL_MASTER", ""), URL]),
            Topology::Standalone { .. }
        ));
    }

    #[test]
    fn min_replicas_ack_defaults_to_zero_and_is_bounded() {
        let s = Settings::load(&env_with(&required())).unwrap();
        assert_eq!(s.redis_min_replicas_ack, 0);
        let mut env = required();
        env.push(("SESSIONGATE_REDIS_MIN_REPLICAS_ACK", "2"));
        assert_eq!(
            Settings::load(&env_with(&env))
                .unwrap()
                .redis_min_replicas_ack,
            2
        );
        for bad in ["-1", "65", "one"] {
            let mut env = required();
            env.push(("SESSIONGATE_REDIS_MIN_REPLICAS_ACK", bad));
            assert_eq!(
                Settings::load(&env_with(&env)).unwrap_err().setting,
                "SESSIONGATE_REDIS_MIN_REPLICAS_ACK"
            );
        }
    }

    #[test]
    fn leeway_is_capped_at_five_seconds() {
        let mut env = required();
        env.push(("SESSIONGATE_CLOCK_LEEWAY", "60s"));
        assert_eq!(
            Settings::load(&env_with(&env)).unwrap_err().setting,
            "SESSIONGATE_CLOCK_LEEWAY"
        );
    }
}
