//! `AppState`, the router with its layers, and `run`: serve until the
//! shutdown future resolves, then drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::api::{self, ApiError};
use crate::backend::Backend;
use crate::backend::echo::EchoBackend;
use crate::backend::local::{LocalBackend, LocalSettings};
use crate::backend::upstream::{UpstreamBackend, UpstreamConfig};
use crate::config::{BackendKind, Config};
use crate::session::replicas::Epilogue;
use crate::session::{EndCause, RegistryConfig, ReplicaConfig, StoredConfig};
use crate::telemetry;
use crate::transport::{self, Connections, Limits};

pub use crate::state::{AppState, Settings};

impl AppState {
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
                let settings = LocalSettings {
                    kv_cache_memory: config.kv_cache_memory.saturating_mul(1 << 20),
                    prompt_cache_memory: config.prompt_cache_memory.saturating_mul(1 << 20),
                    step_tokens: config.step_tokens,
                    prompt_lookup: config.prompt_lookup,
                };
                Arc::new(LocalBackend::start(
                    model,
                    config.model_name.clone(),
                    settings,
                )?)
            }
            BackendKind::Openai => Arc::new(UpstreamBackend::new(UpstreamConfig {
                urls: config.upstreams.clone(),
                api_key: config.upstream_api_key.clone(),
                connect_timeout: config.upstream_connect_timeout,
                first_byte_timeout: config.upstream_first_byte_timeout,
                http2: config.upstream_http2,
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
            stored: StoredConfig {
                ttl: config.response_ttl,
                budget: config.response_budget,
            },
        };
        let state = Self::new(backend, registry, config.api_keys.clone(), settings).await;
        let epilogue: Epilogue =
            Arc::new(|id, seq| api::sse::epilogue(id, seq, &ApiError::OwnerGone));
        match &config.redis {
            Some(url) => {
                let shared =
                    ReplicaConfig {
                        url: url.clone(),
                        lease: config.redis_lease,
                        timeout: config.redis_timeout,
                        resume_ttl: config.resume_ttl,
                        prefix: config.redis_prefix.clone(),
                        secret: config.redis_secret.clone(),
                        ca: match &config.redis_ca {
                            Some(path) => Some(std::fs::read(path).map_err(|e| {
                                anyhow::anyhow!("--redis-ca {}: {e}", path.display())
                            })?),
                            None => None,
                        },
                    };
                let state = state
                    .share(shared, &config.api_keys, epilogue)
                    .map_err(anyhow::Error::msg)?;
                if let Some(replicas) = &state.replicas {
                    replicas
                        .check_permissions()
                        .await
                        .map_err(anyhow::Error::msg)?;
                }
                Ok(state)
            }
            None => Ok(state),
        }
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
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id,
        caller = tracing::field::Empty,
        session_id = tracing::field::Empty,
        completion_id = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, req.headers());
    span
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
