//! Anthropic's Messages API over the one generation log: `POST
//! /v1/messages` starts a generation as a chat completion would (same
//! admission, registry, session, replicas), and every connection
//! transcodes the log into Messages events ([`events::Transcoder`]).
//! Errors on these routes take Anthropic's shape ([`errors`]).

mod events;
mod request;

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use super::chunk::read_log;
use super::control::{self, Opened};
use super::error::ApiError;
use super::extract::{Caller, OpenAiJson, SessionId};
use super::params;
use super::run::{self, Dialect};
use super::sse::{self, Flavor, Framing};
use crate::session::{GenerationId, LogReader};
use crate::state::AppState;
use events::Transcoder;
use request::MessagesRequest;

/// Ids of Messages API generations start with this.
const PREFIX: &str = "msg_";

/// The largest error body rewritten into Anthropic's shape.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

pub(crate) fn is_message(id: &GenerationId) -> bool {
    id.as_str().starts_with(PREFIX)
}

/// A Messages event stream of a generation's log from its first event,
/// sending what comes after event number `after`.
pub(crate) fn event_stream(opened: Opened, after: Option<u64>, keep_alive: Duration) -> Response {
    let framing = MessagesFraming(Transcoder::new(opened.id.as_str(), after));
    sse::framed_stream(&opened.id, opened.reader, opened.hold, keep_alive, framing)
}

struct MessagesFraming(Transcoder);

impl Framing for MessagesFraming {
    fn events(&mut self, batch: Bytes) -> Bytes {
        self.0.events(&batch)
    }

    fn unreadable(&mut self, _: &GenerationId, _: usize, err: &ApiError) -> Bytes {
        self.0.unreadable(&err.to_string())
    }

    fn keep_alive(&mut self) -> Bytes {
        self.0.ping()
    }
}

/// `POST /v1/messages`.
pub(crate) async fn create(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SessionId(session): SessionId,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<MessagesRequest>,
) -> Result<Response, ApiError> {
    if let Some(resumed) = control::resume_from_post(&state, caller, &headers).await? {
        return Ok(resumed);
    }
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let completion = request::completion(&body)?;
    let plan = params::plan(
        completion,
        Flavor::Chat,
        &state.default_model(),
        state.backend.capabilities(),
    )?;
    let dialect = Dialect {
        id_prefix: Some(PREFIX),
        skeleton: Some(json!({"model": plan.request.model})),
        background: false,
    };
    let (generation, attachment) = run::stream(&state, caller, session, plan, dialect).await?;
    let reader = LogReader::new(generation.log.clone(), 0);
    let id = generation.id.clone();
    if body.stream.unwrap_or(false) {
        let opened = Opened {
            id,
            reader,
            hold: Box::new(attachment),
        };
        return Ok(event_stream(opened, None, state.settings.keep_alive));
    }
    // The attachment lives until the answer is read: a client that leaves
    // starts the reattach grace, as on every route.
    let mut reader = reader;
    let mut transcoder = Transcoder::new(id.as_str(), None);
    if let Err(err) = read_log(&mut reader, true, |events| transcoder.absorb(events)).await {
        transcoder.unreadable(&err.to_string());
    }
    drop(attachment);
    if let Some((kind, message)) = transcoder.failure() {
        let status = match kind {
            "overloaded_error" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        return Ok(anthropic_error(status, kind, message));
    }
    let mut response = Json(transcoder.current()).into_response();
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert("x-completion-id", value);
    }
    Ok(response)
}

/// `POST /v1/messages/count_tokens`: the prompt's length in the backend's
/// own tokens (the relay estimates; see the README).
pub(crate) async fn count_tokens(
    State(state): State<AppState>,
    Caller(_): Caller,
    OpenAiJson(mut body): OpenAiJson<MessagesRequest>,
) -> Result<Response, ApiError> {
    // No answer is generated: `max_tokens` is not part of this request.
    body.max_tokens = Some(1);
    let completion = request::completion(&body)?;
    let plan = params::plan(
        completion,
        Flavor::Chat,
        &state.default_model(),
        state.backend.capabilities(),
    )?;
    let input_tokens = state.backend.count_tokens(plan.request).await?;
    Ok(Json(json!({"input_tokens": input_tokens})).into_response())
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, Json(body)).into_response()
}

/// Anthropic's error type for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Middleware of the Messages routes: every error answer, whoever made it
/// (an extractor, the body limit, a handler), in Anthropic's shape
/// `{"type": "error", "error": {"type", "message"}}` with the same status
/// and headers (a 429 keeps its `Retry-After`); every answer with a
/// `request-id` header, the request's `x-request-id`.
pub(crate) async fn errors(req: Request, next: Next) -> Response {
    let request_id = req.headers().get("x-request-id").cloned();
    let response = next.run(req).await;
    let (mut parts, body) = response.into_parts();
    if let Some(id) = request_id {
        parts.headers.insert("request-id", id);
    }
    let status = parts.status;
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || !is_json {
        return Response::from_parts(parts, body);
    }
    let bytes = axum::body::to_bytes(body, ERROR_BODY_LIMIT)
        .await
        .unwrap_or_default();
    let openai: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let message = openai["error"]["message"]
        .as_str()
        .unwrap_or("The request failed.");
    let body = json!({"type": "error", "error": {"type": error_type(status), "message": message}});
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}
