//! `AppState`, the router with its layers, and `run`: serve until the
//! shutdown future resolves, then drain.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::api::{self, ApiError, ApiKeys};
use crate::backend::Backend;
use crate::backend::echo::EchoBackend;
use crate::config::{BackendKind, Config};
use crate::session::{EndCause, GenerationRegistry, RegistryConfig};

/// Settings the request path reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub keep_alive: Duration,
    pub max_body: usize,
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            max_body: 1_048_576,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub registry: Arc<GenerationRegistry>,
    pub keys: Arc<ApiKeys>,
    pub settings: Arc<Settings>,
    /// The model a request without `model` gets.
    pub default_model: Arc<str>,
    /// Unix time the server started, the `created` of its models.
    pub started: u64,
    /// Cancelled when shutdown begins: new generations get 503.
    pub shutdown: CancellationToken,
}

impl AppState {
    pub async fn new(
        backend: Arc<dyn Backend>,
        registry: RegistryConfig,
        keys: Vec<String>,
        settings: Settings,
    ) -> Result<Self, crate::backend::BackendError> {
        let default_model = backend
            .models()
            .await?
            .first()
            .map_or_else(|| "default".to_owned(), |m| m.id.clone());
        Ok(Self {
            backend,
            registry: GenerationRegistry::new(registry),
            keys: Arc::new(ApiKeys::new(keys)),
            settings: Arc::new(settings),
            default_model: default_model.into(),
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            shutdown: CancellationToken::new(),
        })
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
            BackendKind::Local | BackendKind::Openai => {
                anyhow::bail!(
                    "the {:?} backend is not available in this build",
                    config.backend
                )
            }
        };
        let registry = RegistryConfig {
            reattach_grace: config.reattach_grace,
            resume_ttl: config.resume_ttl,
            resume_budget: config.resume_budget,
        };
        let settings = Settings {
            keep_alive: config.keep_alive,
            max_body: config.max_body,
            shutdown_grace: config.shutdown_grace,
        };
        Ok(Self::new(backend, registry, config.api_keys.clone(), settings).await?)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

pub fn app(state: AppState) -> Router {
    let max_body = state.settings.max_body;
    api::routes()
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            json_payload_too_large,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::x_request_id(RandomRequestId))
        .with_state(state)
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

/// Serves until `shutdown` resolves, then stops accepting, lets running
/// generations finish for the shutdown grace, ends the rest as `cancelled`,
/// and returns once connections have closed.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let draining = state.shutdown.clone();
    let registry = Arc::clone(&state.registry);
    let grace = state.settings.shutdown_grace;
    let signal = {
        let draining = draining.clone();
        async move {
            shutdown.await;
            tracing::info!(running = registry.running(), "shutting down");
            draining.cancel();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + grace;
                while registry.running() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let stopped = registry.cancel_all(EndCause::Shutdown);
                if stopped > 0 {
                    tracing::info!(stopped, "shutdown grace over; generations cancelled");
                }
            });
        }
    };
    let serve = axum::serve(listener, app(state)).with_graceful_shutdown(signal);
    // A client that stops reading could hold its connection open forever.
    let give_up = async {
        draining.cancelled().await;
        tokio::time::sleep(grace + Duration::from_secs(5)).await;
    };
    tokio::select! {
        result = serve => result,
        () = give_up => {
            tracing::warn!("connections still open after the shutdown grace; exiting");
            Ok(())
        }
    }
}
