//! `AppState`, the router with its layers, and `run`: serve until the
//! shutdown future resolves, then drain.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::api::{self, ApiError, ApiKeys};
use crate::backend::Backend;
use crate::backend::echo::EchoBackend;
use crate::backend::local::LocalBackend;
use crate::backend::upstream::{UpstreamBackend, UpstreamConfig};
use crate::config::{BackendKind, Config};
use crate::session::replicas::caller_hash;
use crate::session::{
    Admission, EndCause, GenerationRegistry, Generations, PerCaller, RegistryConfig, ReplicaConfig,
    Replicas,
};
use crate::telemetry;
use crate::transport::{self, Connections, Limits};

/// Settings the request path reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub keep_alive: Duration,
    pub max_body: usize,
    pub shutdown_grace: Duration,
    /// Generations running at once; `None`: the backend's choice.
    pub max_concurrent: Option<usize>,
    /// Generations waiting beyond that before 429.
    pub max_queue: usize,
    /// Generations of one API key running at once; `None`: no own limit.
    pub max_concurrent_per_key: Option<usize>,
    /// Generations of one API key admitted (running or waiting); `None`:
    /// half of `max_concurrent + max_queue` when keys are configured.
    pub max_queue_per_key: Option<usize>,
    /// Origins allowed by CORS; `*` for any; empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// A request head must be complete this long after it may begin.
    pub header_read_timeout: Duration,
    /// A request body must have arrived in full this long after its head.
    pub body_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Open connections at most; `None`: from the descriptor limit.
    pub max_connections: Option<usize>,
    /// Names accepted in `Host` when no API key is set, besides IP
    /// addresses and `localhost`; `*` for any.
    pub allowed_hosts: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            max_body: 1_048_576,
            shutdown_grace: Duration::from_secs(10),
            max_concurrent: None,
            max_queue: 64,
            max_concurrent_per_key: None,
            max_queue_per_key: None,
            cors_origins: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            allowed_hosts: Vec::new(),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub registry: Arc<GenerationRegistry>,
    pub admission: Arc<Admission>,
    /// Starts and runs generations over the three above.
    pub generations: Arc<Generations>,
    pub keys: Arc<ApiKeys>,
    pub settings: Arc<Settings>,
    /// Unix time the server started, the `created` of its models.
    pub started: u64,
    /// Cancelled when shutdown begins: new generations get 503.
    pub shutdown: CancellationToken,
    /// Renders `/metrics`; `None` where no recorder is installed (tests
    /// that run many servers in one process).
    pub metrics: Option<PrometheusHandle>,
    /// The state shared with other instances (`--redis`); `None`: all
    /// state is in this process.
    pub replicas: Option<Arc<Replicas>>,
}

impl AppState {
    pub async fn new(
        backend: Arc<dyn Backend>,
        registry: RegistryConfig,
        keys: Vec<String>,
        settings: Settings,
    ) -> Self {
        let max_running = settings
            .max_concurrent
            .unwrap_or(backend.capabilities().default_concurrency);
        let keys = ApiKeys::new(keys);
        // One caller cannot be unfair to itself; with several keys, no key
        // may hold more than half the places unless told otherwise.
        let per_caller = PerCaller {
            running: settings.max_concurrent_per_key,
            admitted: settings.max_queue_per_key.or_else(|| {
                (keys.len() > 1).then(|| (max_running + settings.max_queue).div_ceil(2).max(1))
            }),
        };
        let admission = Arc::new(Admission::new(max_running, settings.max_queue, per_caller));
        let registry = GenerationRegistry::new(registry);
        let generations = Arc::new(Generations::new(
            Arc::clone(&registry),
            Arc::clone(&admission),
            Arc::clone(&backend),
        ));
        Self {
            admission,
            backend,
            registry,
            generations,
            keys: Arc::new(keys),
            settings: Arc::new(settings),
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            shutdown: CancellationToken::new(),
            metrics: None,
            replicas: None,
        }
    }

    /// Shares generations with the other instances on the same Redis.
    /// `keys` are the `--api-key` values, in the order the state got them.
    pub fn share(mut self, config: ReplicaConfig, keys: &[String]) -> Result<Self, String> {
        let callers = std::iter::once(caller_hash(None))
            .chain(
                keys.iter()
                    .filter(|k| !k.is_empty())
                    .map(|k| caller_hash(Some(k))),
            )
            .collect();
        let epilogue: crate::session::replicas::Epilogue =
            Arc::new(|id, seq| crate::api::sse::epilogue(id, seq, &ApiError::OwnerGone));
        let replicas = Replicas::start(config, callers, Arc::clone(&self.registry), epilogue)?;
        self.generations.share(Arc::clone(&replicas));
        self.replicas = Some(replicas);
        Ok(self)
    }

    /// The state a validated `Config` describes.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let backend: Arc<dyn Backend> = match config.backend {
            BackendKind::Echo => Arc::new(EchoBackend::new(
                config
                    .model_name
                    .clone()
                    .unwrap_or_else(|| EchoBackend::DEFAULT_MODEL.to_owned()),
                config.token_delay,
            )),
            BackendKind::Local => {
                let path = config.model_path();
                let template = config.chat_template.clone();
                let model = tokio::task::spawn_blocking(move || {
                    crate::model::load(&path, template.as_deref())
                })
                .await??;
                Arc::new(LocalBackend::start(model, config.model_name.clone())?)
            }
            BackendKind::Openai => Arc::new(UpstreamBackend::new(UpstreamConfig {
                urls: config.upstreams.clone(),
                api_key: config.upstream_api_key.clone(),
                connect_timeout: config.upstream_connect_timeout,
                first_byte_timeout: config.upstream_first_byte_timeout,
            })?),
        };
        let registry = RegistryConfig {
            reattach_grace: config.reattach_grace,
            resume_ttl: config.resume_ttl,
            resume_budget: config.resume_budget,
            max_log_bytes: config.max_log_bytes,
        };
        let settings = Settings {
            keep_alive: config.keep_alive,
            max_body: config.max_body,
            shutdown_grace: config.shutdown_grace,
            max_concurrent: config.max_concurrent,
            max_queue: config.max_queue,
            max_concurrent_per_key: config.max_concurrent_per_key,
            max_queue_per_key: config.max_queue_per_key,
            cors_origins: config.cors_origins.clone(),
            header_read_timeout: config.header_read_timeout,
            body_read_timeout: config.body_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
            // The name the server listens on is its own.
            allowed_hosts: std::iter::once(config.host.clone())
                .chain(config.allowed_hosts.iter().cloned())
                .collect(),
        };
        let state = Self::new(backend, registry, config.api_keys.clone(), settings).await;
        match &config.redis {
            Some(url) => {
                let shared = ReplicaConfig {
                    url: url.clone(),
                    lease: config.redis_lease,
                    timeout: config.redis_timeout,
                    resume_ttl: config.resume_ttl,
                };
                state
                    .share(shared, &config.api_keys)
                    .map_err(anyhow::Error::msg)
            }
            None => Ok(state),
        }
    }

    /// The model a request without `model` gets: the backend's, picked
    /// when asked (an upstream may have been down at startup).
    pub fn default_model(&self) -> String {
        self.backend
            .default_model()
            .unwrap_or_else(|| "default".to_owned())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

pub fn app(state: AppState) -> Router {
    let max_body = state.settings.max_body;
    let cors = cors(&state.settings.cors_origins);
    let router = api::routes()
        .layer(axum::middleware::from_fn(count_requests))
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            json_payload_too_large,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::head::check,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::x_request_id(RandomRequestId))
        .layer(axum::middleware::map_request(
            api::head::drop_unfit_request_id,
        ));
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
    .with_state(state)
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let name = HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                name("x-session-id"),
                name("last-event-id"),
                name("x-request-id"),
            ])
            .expose_headers([
                name("x-completion-id"),
                header::RETRY_AFTER,
                name("x-request-id"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Requests by route (the matched pattern, never the raw path with ids)
/// and status.
async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let response = next.run(req).await;
    telemetry::request(&route, response.status().as_u16());
    response
}

fn request_span(req: &Request) -> tracing::Span {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id,
        caller = tracing::field::Empty,
        session_id = tracing::field::Empty,
        completion_id = tracing::field::Empty,
    )
}

#[derive(Clone)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = crate::session::GenerationId::new("req-");
        HeaderValue::from_str(id.as_str()).ok().map(RequestId::new)
    }
}

/// tower-http answers an over-long `Content-Length` itself, in plain text;
/// give that refusal the same OpenAI shape as every other error.
async fn json_payload_too_large(State(state): State<AppState>, response: Response) -> Response {
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && plain {
        return ApiError::PayloadTooLarge(state.settings.max_body).into_response();
    }
    response
}

/// Serves HTTP/1.1 and h2c on `listener`, or HTTPS with `tls`, until
/// `shutdown` resolves; then stops accepting, answers new generations on
/// open connections with 503 while running ones finish for the shutdown
/// grace, ends the rest as `cancelled`, closes every connection and
/// returns.
pub async fn run(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let settings = &state.settings;
    let max_connections = settings
        .max_connections
        .unwrap_or_else(transport::default_max_connections);
    tracing::debug!(max_connections, "connection limit");
    let limits = Limits {
        header_read_timeout: settings.header_read_timeout,
        idle_timeout: settings.idle_timeout,
        max_connections,
    };
    let connections = Connections::new(app(state.clone()), tls, limits, state.shutdown.clone());
    connections.accept(listener, shutdown).await;

    let registry = &state.registry;
    // Refuse first, then say so: once the line is logged, new generations
    // get 503.
    state.shutdown.cancel();
    tracing::info!(running = registry.running(), "shutting down");
    registry
        .wait_idle(tokio::time::Instant::now() + settings.shutdown_grace)
        .await;
    let stopped = registry.cancel_all(EndCause::Shutdown);
    if stopped > 0 {
        tracing::info!(stopped, "shutdown grace over; generations cancelled");
    }
    connections.close_all().await;
    // Readers on other instances get the ends of what ran here.
    if let Some(replicas) = &state.replicas {
        replicas
            .flush(tokio::time::Instant::now() + Duration::from_secs(2))
            .await;
    }
    Ok(())
}
