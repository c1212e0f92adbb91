//! Endpoints that act on an existing generation: cancel it, or re-attach to
//! its stream (by id, by session, or by a re-sent POST). A generation is
//! looked for in this process first, then, with `--redis`, on the other
//! instances.

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
use super::{messages, responses};
use crate::session::{CallerId, EndCause, Generation, GenerationId, LogReader, RemoteGeneration};
use crate::state::AppState;
use crate::telemetry;

/// A caller's generation, here or on another instance.
pub(crate) enum Found {
    Local(Arc<Generation>),
    Remote(RemoteGeneration),
}

impl Found {
    pub(crate) fn streamed(&self) -> bool {
        match self {
            Self::Local(g) => g.streamed,
            Self::Remote(r) => r.streamed,
        }
    }

    pub(crate) fn id(&self) -> &GenerationId {
        match self {
            Self::Local(g) => &g.id,
            Self::Remote(r) => &r.id,
        }
    }

    /// Events written so far, and whether the last one is `[DONE]`.
    pub(crate) fn written(&self) -> (usize, bool) {
        match self {
            Self::Local(g) => (g.log.len(), g.log.is_closed()),
            Self::Remote(r) => (r.len, r.done),
        }
    }
}

/// Ids are generated here: anything else (say, a key pattern aimed at
/// Redis) is unknown without asking anyone.
pub(crate) fn plausible(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(crate) async fn find(
    state: &AppState,
    caller: CallerId,
    id: &GenerationId,
) -> Result<Option<Found>, ApiError> {
    if let Some(local) = state.registry.get(caller, id) {
        return Ok(Some(Found::Local(local)));
    }
    match &state.replicas {
        Some(replicas) if plausible(id.as_str()) => {
            Ok(replicas.find(caller, id).await?.map(Found::Remote))
        }
        _ => Ok(None),
    }
}

/// The caller's latest generation in a session. With Redis the shared
/// record decides (a newer one may run elsewhere); without it, or while
/// Redis is away, what this instance knows.
async fn latest_in_session(
    state: &AppState,
    caller: CallerId,
    session: &str,
) -> Result<Option<Found>, ApiError> {
    let local = state.registry.latest_in_session(caller, session);
    let Some(replicas) = &state.replicas else {
        return Ok(local.map(Found::Local));
    };
    match replicas.latest_in_session(caller, session).await {
        Ok(Some(remote)) => Ok(Some(match state.registry.get(caller, &remote.id) {
            Some(here) => Found::Local(here),
            None => Found::Remote(remote),
        })),
        Ok(None) => Ok(local.map(Found::Local)),
        Err(err) => match local {
            Some(here) => Ok(Some(Found::Local(here))),
            None => Err(err.into()),
        },
    }
}

pub(crate) async fn cancel(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let generation_id = GenerationId::from(id.as_str());
    let found = find(&state, caller, &generation_id)
        .await?
        .ok_or_else(|| ApiError::GenerationNotFound(id.clone()))?;
    tracing::Span::current().record("completion_id", found.id().as_str());
    let cancelled = match &found {
        Found::Local(generation) => generation.cancel(EndCause::CancelEndpoint),
        Found::Remote(remote) => {
            let replicas = state.replicas.as_ref().ok_or(ApiError::Internal)?;
            replicas
                .cancel(caller, &remote.id, EndCause::CancelEndpoint)
                .await?
                .ok_or(ApiError::GenerationNotFound(id))?
        }
    };
    let body = CancelResult {
        id: found.id().as_str(),
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
    let found = find(&state, caller, &GenerationId::from(id.as_str()))
        .await?
        .filter(Found::streamed)
        .ok_or(ApiError::GenerationNotFound(id))?;
    let last = last_event_id(&headers, &query);
    Ok(attach(&state, found, last).await)
}

/// `GET /v1/sessions/{session_id}/stream`: the session's latest generation,
/// or 204 when it has none.
pub(crate) async fn session_stream(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(session): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("session_id", session.as_str());
    match latest_in_session(&state, caller, &session)
        .await?
        .filter(Found::streamed)
    {
        Some(found) => Ok(attach(&state, found, last_event_id(&headers, &query)).await),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// A POST whose `Last-Event-ID` names one of the caller's streamed
/// generations resumes it; anything else is a new request.
pub(crate) async fn resume_from_post(
    state: &AppState,
    caller: CallerId,
    headers: &HeaderMap,
) -> Result<Option<Response>, ApiError> {
    let Some(last) = headers.get("last-event-id").and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some((id, seq)) = sse::parse_event_id(last) else {
        return Ok(None);
    };
    let Some(found) = find(state, caller, &id).await?.filter(|f| {
        let (written, done) = f.written();
        // Other dialects number their own events, not the log's.
        let own_numbers = responses::is_response(f.id()) || messages::is_message(f.id());
        f.streamed() && (seq < written || !done || own_numbers)
    }) else {
        return Ok(None);
    };
    tracing::info!(completion_id = %found.id(), "POST resumes a generation");
    Ok(Some(attach(state, found, Some(last)).await))
}

fn last_event_id<'a>(headers: &'a HeaderMap, query: &'a ResumeQuery) -> Option<&'a str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.last_event_id.as_deref())
}

/// A stream of the generation after `last_event_id`, in the dialect it was
/// started in.
async fn attach(state: &AppState, found: Found, last_event_id: Option<&str>) -> Response {
    // Other dialects number their own events and transcode from the start.
    let transcoded = if responses::is_response(found.id()) {
        Some(responses::event_stream as fn(Opened, Option<u64>, _) -> Response)
    } else if messages::is_message(found.id()) {
        Some(messages::event_stream as fn(Opened, Option<u64>, _) -> Response)
    } else {
        None
    };
    if let Some(event_stream) = transcoded {
        let after = last_event_id
            .and_then(sse::parse_event_id)
            .filter(|(named, _)| named == found.id())
            .map(|(_, seq)| seq as u64);
        return match open(state, found, 0).await {
            Ok(opened) => event_stream(opened, after, state.settings.keep_alive),
            Err(err) => err.into_response(),
        };
    }
    let (written, done) = found.written();
    let from = resume_position(found.id(), written, done, last_event_id);
    match open(state, found, from).await {
        Ok(opened) => sse::event_stream(
            &opened.id,
            opened.reader,
            opened.hold,
            state.settings.keep_alive,
        ),
        Err(err) => err.into_response(),
    }
}

/// A connection's reading of a generation: where it reads, and what keeps
/// it attached (so that the generation's reattach grace waits for it).
pub(crate) struct Opened {
    pub(crate) id: GenerationId,
    pub(crate) reader: LogReader,
    pub(crate) hold: Box<dyn Send>,
}

pub(crate) async fn open(state: &AppState, found: Found, from: usize) -> Result<Opened, ApiError> {
    let id = found.id().clone();
    tracing::Span::current().record("completion_id", id.as_str());
    telemetry::resumed();
    match found {
        Found::Local(generation) => Ok(Opened {
            reader: LogReader::new(generation.log.clone(), from),
            hold: Box::new(generation.attach()),
            id,
        }),
        Found::Remote(remote) => {
            let replicas = state.replicas.as_ref().ok_or(ApiError::Internal)?;
            let remote = replicas.reader(&remote.id, from).await;
            Ok(Opened {
                reader: remote.reader,
                hold: Box::new(remote.follow),
                id,
            })
        }
    }
}

/// The session's latest streamed generation, opened at its first event
/// (the UI message stream replays whole messages); `None` when it has none.
pub(crate) async fn open_session_from_start(
    state: &AppState,
    caller: CallerId,
    session: &str,
) -> Result<Option<Opened>, ApiError> {
    tracing::Span::current().record("session_id", session);
    match latest_in_session(state, caller, session)
        .await?
        .filter(Found::streamed)
    {
        Some(found) => Ok(Some(open(state, found, 0).await?)),
        None => Ok(None),
    }
}

/// Where a reader resumes: just after the named event when the id names
/// this generation; otherwise from the start. A resume after the last
/// event of a finished generation gets `[DONE]` again, so a client that
/// missed the end sees it and stops retrying; a position a finished
/// generation never wrote is unknown, so its log replays from the start.
/// A running generation's position that this instance has not seen yet
/// (another instance's mirror lags behind what its owner sent) is waited
/// for, never replayed from the start: the reader ends with an error if
/// the generation ends before it.
fn resume_position(
    id: &GenerationId,
    written: usize,
    done: bool,
    last_event_id: Option<&str>,
) -> usize {
    last_event_id
        .and_then(sse::parse_event_id)
        .filter(|(named, _)| named == id)
        .map_or(0, |(_, seq)| match (done, seq.saturating_add(1)) {
            (false, next) => next,
            (true, _) if seq >= written => 0,
            (true, next) => next.min(written - 1),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_positions() {
        let id = GenerationId::from("chatcmpl-a");
        assert_eq!(resume_position(&id, 5, false, None), 0);
        assert_eq!(resume_position(&id, 5, false, Some("chatcmpl-a.2")), 3);
        assert_eq!(resume_position(&id, 5, false, Some("chatcmpl-b.2")), 0);
        assert_eq!(
            resume_position(&id, 5, false, Some("chatcmpl-a.9")),
            10,
            "waits for what a lagging mirror has not written yet"
        );
        assert_eq!(resume_position(&id, 5, true, Some("chatcmpl-a.9")), 0);
        assert_eq!(
            resume_position(&id, 5, true, Some("chatcmpl-a.4")),
            4,
            "[DONE] again"
        );
        assert_eq!(resume_position(&id, 5, true, Some("chatcmpl-a.3")), 4);
    }

    #[test]
    fn only_ids_of_our_shape_are_looked_up() {
        assert!(plausible("chatcmpl-abc123"));
        assert!(plausible("resp_abc123"));
        for bad in ["", "a}b", "a*", "a b", &"x".repeat(65)] {
            assert!(!plausible(bad), "{bad:?}");
        }
    }
}
