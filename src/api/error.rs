//! `ApiError`: every way a request is refused, mapped in one place to a
//! status and OpenAI's error shape. The only type that implements
//! `IntoResponse` for errors.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::wire::{ErrorBody, ErrorEnvelope};
use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("{0}")]
    ContextLength(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("No generation with id `{0}`.")]
    GenerationNotFound(String),
    #[error("No route for {0}.")]
    RouteNotFound(String),
    #[error("Method {0} is not allowed here.")]
    MethodNotAllowed(String),
    #[error("The request body is larger than the limit of {0} bytes.")]
    PayloadTooLarge(usize),
    #[error("The request body did not arrive within {} s.", .0.as_secs_f64())]
    BodyTimeout(std::time::Duration),
    #[error("The request URI is longer than the limit of {0} bytes.")]
    UriTooLong(usize),
    #[error("The request headers are larger than the limit of {0} bytes.")]
    HeadersTooLarge(usize),
    #[error(
        "Host `{0}` is not allowed: a server without an API key answers only requests addressed to its own name; see `--allowed-host`."
    )]
    HostNotAllowed(String),
    #[error("The request body must be JSON: send `Content-Type: application/json`.")]
    UnsupportedMediaType,
    #[error("Too many generations are waiting; retry after {retry_after} s.")]
    QueueFull { retry_after: u64 },
    #[error("The server is shutting down; retry on another instance or shortly.")]
    ShuttingDown,
    #[error("The model backend is unavailable; retry shortly.")]
    BackendUnavailable,
    #[error(
        "Redis is unreachable, so generations on other instances cannot be reached; retry shortly."
    )]
    SharedStateUnavailable,
    #[error("The instance running this generation stopped before it ended; start a new request.")]
    OwnerGone,
    #[error(
        "This answer was dropped from the server's memory (its resume time or memory budget ran out) before the stream was read to its end."
    )]
    LogDropped,
    #[error(
        "The stream was resumed at event {0}, past the last event this generation wrote; resume from an id it sent."
    )]
    EventNotWritten(usize),
    #[error("Internal error.")]
    Internal,
    /// An upstream's own account of a failure after its answer had begun,
    /// credentials removed.
    #[error("The upstream failed: {0}")]
    UpstreamFailed(String),
    /// An upstream's 4xx, passed on with its status.
    #[error("{message}")]
    Upstream {
        status: StatusCode,
        message: String,
        retry_after: Option<HeaderValue>,
    },
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: param.into(),
        }
    }

    /// Status, OpenAI `type` and `code`: the one exhaustive mapping.
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        use StatusCode as S;
        match self {
            Self::InvalidRequest { .. } => (S::BAD_REQUEST, "invalid_request_error", None),
            Self::ContextLength(_) => (
                S::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            Self::Unauthorized(_) => (
                S::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            Self::ModelNotFound(_) => (S::NOT_FOUND, "not_found_error", Some("model_not_found")),
            Self::GenerationNotFound(_) | Self::RouteNotFound(_) => {
                (S::NOT_FOUND, "not_found_error", None)
            }
            Self::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "invalid_request_error", None),
            Self::PayloadTooLarge(_) => (
                S::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            Self::BodyTimeout(_) => (
                S::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("body_timeout"),
            ),
            Self::UriTooLong(_) => (
                S::URI_TOO_LONG,
                "invalid_request_error",
                Some("uri_too_long"),
            ),
            Self::HeadersTooLarge(_) => (
                S::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request_error",
                Some("headers_too_large"),
            ),
            Self::HostNotAllowed(_) => (S::FORBIDDEN, "permission_error", Some("host_not_allowed")),
            Self::UnsupportedMediaType => (
                S::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_media_type"),
            ),
            Self::QueueFull { .. } => {
                (S::TOO_MANY_REQUESTS, "rate_limit_error", Some("queue_full"))
            }
            Self::ShuttingDown => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                Some("shutting_down"),
            ),
            Self::BackendUnavailable => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                Some("backend_unavailable"),
            ),
            Self::SharedStateUnavailable => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                Some("redis_unavailable"),
            ),
            Self::OwnerGone => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                Some("instance_gone"),
            ),
            Self::LogDropped => (S::GONE, "server_error", Some("answer_dropped")),
            Self::EventNotWritten(_) => (
                S::BAD_REQUEST,
                "invalid_request_error",
                Some("event_not_written"),
            ),
            Self::Internal => (S::INTERNAL_SERVER_ERROR, "server_error", None),
            Self::UpstreamFailed(_) => (S::BAD_GATEWAY, "server_error", Some("upstream_error")),
            Self::Upstream { status, .. } => {
                let kind = match status.as_u16() {
                    401 | 403 => "authentication_error",
                    404 => "not_found_error",
                    429 => "rate_limit_error",
                    _ => "invalid_request_error",
                };
                (*status, kind, None)
            }
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::ContextLength(_) => Some("messages"),
            Self::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The `code` of the error body, if it has one.
    pub fn code(&self) -> Option<&'static str> {
        self.parts().2
    }

    /// The JSON body, also sent as the error event once a stream has begun.
    pub fn body(&self) -> Vec<u8> {
        let (_, kind, code) = self.parts();
        let message = self.to_string();
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                message: &message,
                kind,
                param: self.param(),
                code,
            },
        };
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

impl From<crate::session::SharedStateError> for ApiError {
    fn from(err: crate::session::SharedStateError) -> Self {
        tracing::warn!(%err, "shared state unavailable");
        Self::SharedStateUnavailable
    }
}

impl From<BackendError> for ApiError {
    fn from(err: BackendError) -> Self {
        match err {
            BackendError::ModelNotFound(model) => Self::ModelNotFound(model),
            e @ BackendError::ContextLength { .. } => Self::ContextLength(e.to_string()),
            e @ BackendError::MaxTokens { field, .. } => {
                Self::invalid(format!("{e}."), Some(field.to_owned()))
            }
            BackendError::InvalidRequest(message) => Self::invalid(message, None),
            BackendError::Unavailable(detail) => {
                tracing::error!(%detail, "backend unavailable");
                Self::BackendUnavailable
            }
            BackendError::Internal(detail) => {
                tracing::error!(%detail, "backend failure");
                Self::Internal
            }
            BackendError::UpstreamReported(message) => {
                tracing::warn!(%message, "the upstream reported a failure");
                Self::UpstreamFailed(message)
            }
            BackendError::Upstream {
                status,
                message,
                retry_after,
            } => match StatusCode::from_u16(status) {
                Ok(status) if status.is_client_error() => Self::Upstream {
                    status,
                    message,
                    retry_after: retry_after.and_then(|v| HeaderValue::from_str(&v).ok()),
                },
                _ => {
                    tracing::error!(status, %message, "upstream failure");
                    Self::BackendUnavailable
                }
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        let mut response = (status, self.body()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            Self::QueueFull { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            // The rest of the body may never come: over HTTP/1.1 the
            // connection cannot be reused. (HTTP/2 drops the header.)
            Self::BodyTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::Upstream {
                retry_after: Some(value),
                ..
            } => {
                headers.insert(header::RETRY_AFTER, value);
            }
            _ => {}
        }
        response
    }
}
