//! Endpoints that act on an existing generation: cancel it, or re-attach to
//! its stream (by id, by session, or by a re-sent POST).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{Caller, OpenAiPath as Path, OpenAiQuery as Query};
use super::sse;
use super::wire::CancelResult;
use crate::server::AppState;
use crate::session::{CallerId, EndCause, Generation, GenerationId};
use crate::telemetry;

pub(crate) async fn cancel(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let generation = state
        .registry
        .get(caller, &GenerationId::from(id.as_str()))
        .ok_or(ApiError::GenerationNotFound(id))?;
    tracing::Span::current().record("completion_id", generation.id.as_str());
    let cancelled = generation.cancel(EndCause::CancelEndpoint);
    let body = CancelResult {
        id: generation.id.as_str(),
        object: "chat.completion",
        cancelled,
    };
    Ok(Json(body).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ResumeQuery {
    last_event_id: Option<String>,
}

/// `GET /v1/chat/completions/{id}/events`: every event after
/// `Last-Event-ID` (or from the start), then live to `[DONE]`.
pub(crate) async fn events(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let generation = state
        .registry
        .get(caller, &GenerationId::from(id.as_str()))
        .filter(|g| g.streamed)
        .ok_or(ApiError::GenerationNotFound(id))?;
    let last = last_event_id(&headers, &query);
    Ok(attach(&state, &generation, last))
}

/// `GET /v1/sessions/{session_id}/stream`: the session's latest generation,
/// or 204 when it has none.
pub(crate) async fn session_stream(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(session): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Response {
    tracing::Span::current().record("session_id", session.as_str());
    match state
        .registry
        .latest_in_session(caller, &session)
        .filter(|g| g.streamed)
    {
        Some(generation) => attach(&state, &generation, last_event_id(&headers, &query)),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// A POST whose `Last-Event-ID` names one of the caller's streamed
/// generations resumes it; anything else is a new request.
pub(crate) fn resume_from_post(
    state: &AppState,
    caller: CallerId,
    headers: &HeaderMap,
) -> Option<Response> {
    let last = headers.get("last-event-id")?.to_str().ok()?;
    let (id, seq) = sse::parse_event_id(last)?;
    let generation = state
        .registry
        .get(caller, &id)
        .filter(|g| g.streamed && seq < g.log.len())?;
    tracing::info!(completion_id = %generation.id, "POST resumes a generation");
    Some(attach(state, &generation, Some(last)))
}

fn last_event_id<'a>(headers: &'a HeaderMap, query: &'a ResumeQuery) -> Option<&'a str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.last_event_id.as_deref())
}

fn attach(state: &AppState, generation: &Arc<Generation>, last_event_id: Option<&str>) -> Response {
    tracing::Span::current().record("completion_id", generation.id.as_str());
    telemetry::resumed();
    sse::event_stream(
        generation,
        resume_position(generation, last_event_id),
        state.settings.keep_alive,
    )
}

/// Where a reader resumes: just after the named event when the id names an
/// event of this generation that was written; otherwise from the start.
fn resume_position(generation: &Generation, last_event_id: Option<&str>) -> usize {
    last_event_id
        .and_then(sse::parse_event_id)
        .filter(|(id, seq)| *id == generation.id && *seq < generation.log.len())
        .map_or(0, |(_, seq)| seq + 1)
}
