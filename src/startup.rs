//! Wiring: settings → store, global state, service → HTTP server.
//! The listener is bound outside `build`, so tests run the real server on
//! port 0.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::dev::{Server, Service};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{App, HttpServer, web};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::Settings;
use crate::error::ApiError;
use crate::http::extract::ApiKeys;
use crate::http::{AppState, configure};
use crate::metrics::Metrics;
use crate::session::SessionService;
use crate::state::Global;
use crate::store::Store;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("bad Redis settings: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct Application {
    port: u16,
    server: Server,
    background: Vec<JoinHandle<()>>,
    service: Arc<SessionService>,
    /// Envoy's gRPC `ext_authz`, when `grpc_listen` is set.
    grpc: Option<crate::grpc::GrpcServer>,
}

impl Application {
    /// Binds `settings.listen` and builds the application.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let listener =
            TcpListener::bind(&settings.listen).map_err(|source| StartupError::Listen {
                addr: settings.listen.clone(),
                source,
            })?;
        Self::build_with_listener(settings, listener).await
    }

    /// Builds the application on an already bound listener.
    pub async fn build_with_listener(
        settings: Settings,
        listener: TcpListener,
    ) -> Result<Application, StartupError> {
        let port = listener.local_addr()?.port();
        let metrics = Arc::new(Metrics::new());
        let mut store = Store::from_settings(&settings, settings.redis_pool_size, metrics.clone())?;
        let near_cache = store.enable_near_cache(settings.near_cache_ttl);
        let store = Arc::new(store);
        let global = Arc::new(Global::new(
            settings.signing_secret.clone(),
            settings.jwt_algorithm,
            settings.state_max_staleness,
        ));
        // A first read now, so a healthy start serves at once; when Redis is
        // down the service still starts and answers 503 until it is back.
        if let Err(e) = global.refresh(&store).await {
            tracing::warn!(error = %e, "Redis not reachable at start; serving 503 until it is");
        }
        // Warns (and sets sessiongate_redis_config_ok) when Redis's settings
        // break the durability promises; /readyz re-checks.
        if let Err(e) = store.check_durability(true).await {
            tracing::warn!(error = %e, "cannot check Redis's durability settings at start");
        }
        let mut background = vec![
            tokio::spawn(
                global
                    .clone()
                    .run_refresher(store.clone(), settings.state_refresh_interval),
            ),
            tokio::spawn(global.clone().run_listener(store.clone())),
            tokio::spawn(store.clone().run_topology_watch()),
        ];
        background.extend(crate::events::webhooks::spawn_all(
            &settings,
            store.clone(),
            global.clone(),
            &metrics,
        ));
        if let Some(invalidations) = near_cache {
            background.push(tokio::spawn(invalidations));
        }
        let service = Arc::new(SessionService::new(
            &settings,
            store,
            global,
            metrics.clone(),
        ));
        let state = web::Data::new(AppState {
            service: service.clone(),
            api_keys: ApiKeys::new(&settings.issuer_keys, &settings.admin_keys),
            metrics,
            cookie_name: settings.cookie_name.clone(),
            origin: crate::http::origin::OriginPolicy {
                csrf_protection: settings.csrf_protection,
                allowed_origins: settings.allowed_origins.clone(),
                trusted_proxies: settings.trusted_proxies.clone(),
            },
            key_failures: crate::http::extract::KeyFailures::new(
                settings.api_key_failure_limit,
                settings.api_key_failure_window,
            ),
            console: crate::console::Console::new(&settings),
            assertions: crate::assertion::Assertions::from_settings(&settings),
        });
        let grpc = match settings.grpc_listen {
            None => None,
            Some(addr) => {
                let listener = TcpListener::bind(addr).map_err(|source| StartupError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
                let threads = match settings.workers {
                    0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => n,
                };
                Some(crate::grpc::GrpcServer::start(
                    listener,
                    state.clone(),
                    threads,
                )?)
            }
        };
        let body_limit = settings.body_limit;
        let max_header_bytes = settings.max_header_bytes;
        let ids = Arc::new(RequestIds::new());
        let mut server = HttpServer::new(move || {
            let ids = ids.clone();
            App::new()
                .app_data(state.clone())
                .wrap_fn(move |req, srv| {
                    let id = ids.next_for(req.headers().get(&X_REQUEST_ID));
                    let header_bytes: usize = req
                        .headers()
                        .iter()
                        .map(|(k, v)| k.as_str().len() + v.len() + 4)
                        .sum();
                    let span = tracing::debug_span!(
                        "request",
                        method = %req.method(),
                        path = %req.path(),
                        request_id = %id.to_str().unwrap_or_default(),
                    );
                    let fut = (header_bytes <= max_header_bytes).then(|| srv.call(req));
                    async move {
                        let mut res = match fut {
                            Some(fut) => fut.await?,
                            None => {
                                return Err(ApiError::HeadersTooLarge.into());
                            }
                        };
                        tracing::debug!(status = res.status().as_u16(), "answered");
                        res.headers_mut().insert(X_REQUEST_ID, id);
                        Ok(res)
                    }
                    .instrument(span)
                })
                .configure(|cfg| configure(cfg, body_limit))
        })
        .backlog(2048)
        .client_request_timeout(settings.client_request_timeout)
        .keep_alive(settings.keep_alive)
        .max_connections(settings.max_connections);
        if settings.workers > 0 {
            server = server.workers(settings.workers);
        }
        let server = server.listen(listener)?.run();
        Ok(Application {
            port,
            server,
            background,
            service,
            grpc,
        })
    }

    /// Where the gRPC `ext_authz` listener is bound, when it is on.
    pub fn grpc_addr(&self) -> Option<std::net::SocketAddr> {
        self.grpc.as_ref().map(|g| g.local_addr())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn service(&self) -> Arc<SessionService> {
        self.service.clone()
    }

    /// Serves until the server is stopped (SIGINT/SIGTERM), then stops the
    /// background tasks.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        drop(self.grpc);
        for task in self.background {
            task.abort();
        }
        result
    }
}

/// Request ids: the caller's `X-Request-Id` when it is short and plain,
/// else a process-unique one (random prefix + counter, no syscall).
struct RequestIds {
    prefix: String,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut bytes = [0u8; 4];
        getrandom::fill(&mut bytes).expect("the OS random generator is available");
        RequestIds {
            prefix: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            counter: AtomicU64::new(0),
        }
    }

    fn next_for(&self, given: Option<&HeaderValue>) -> HeaderValue {
        if let Some(v) = given {
            let b = v.as_bytes();
            if !b.is_empty()
                && b.len() <= 64
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
            {
                return v.clone();
            }
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // "<prefix>-<n in hex>" built on the stack (no formatting machinery,
        // one allocation: the header's own bytes).
        let mut buf = [0u8; 32];
        let p = self.prefix.len().min(8);
        buf[..p].copy_from_slice(&self.prefix.as_bytes()[..p]);
        buf[p] = b'-';
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
        for i in 0..digits {
            let nibble = ((n >> (4 * (digits - 1 - i))) & 0xf) as usize;
            buf[p + 1 + i] = b"0123456789abcdef"[nibble];
        }
        HeaderValue::from_bytes(&buf[..p + 1 + digits]).expect("ASCII id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_and_a_hex_counter() {
        let ids = RequestIds {
            prefix: "0a1b2c3d".into(),
            counter: AtomicU64::new(0),
        };
        for want in ["0a1b2c3d-0", "0a1b2c3d-1"] {
            assert_eq!(ids.next_for(None), want);
        }
        ids.counter.store(0xfeed, Ordering::Relaxed);
        assert_eq!(ids.next_for(None), "0a1b2c3d-feed");
        ids.counter.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(ids.next_for(None), "0a1b2c3d-ffffffffffffffff");
        // A well-formed id from the caller is kept.
        let given = HeaderValue::from_static("abc-123");
        assert_eq!(ids.next_for(Some(&given)), "abc-123");
    }
}
