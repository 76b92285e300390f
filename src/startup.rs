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
        let store = Arc::new(Store::from_settings(
            &settings,
            settings.redis_pool_size,
            metrics.clone(),
        )?);
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
        let background = vec![
            tokio::spawn(
                global
                    .clone()
                    .run_refresher(store.clone(), settings.state_refresh_interval),
            ),
            tokio::spawn(global.clone().run_listener(store.clone())),
            tokio::spawn(store.clone().run_topology_watch()),
        ];
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
        });
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
        })
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
        HeaderValue::from_str(&format!("{}-{n:x}", self.prefix)).expect("ASCII id")
    }
}
