//! The Vercel AI SDK's UI message stream, so that `useChat` talks to
//! sluicegate with no server of the app's own in between:
//! `POST /v1/ui/chat` starts a generation in the chat's session and
//! `GET /v1/ui/chat/{chat_id}/stream` re-attaches to the chat's latest one.
//!
//! One generation, two encodings: the log holds OpenAI chunks whichever
//! route started the generation, and these connections transcode what
//! they read ([`parts::Transcoder`]). Cancel-previous, the reattach grace,
//! retention, replicas and caller isolation are the OpenAI routes' own.

mod parts;
mod request;

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::error::ApiError;
use super::extract::{Caller, OpenAiJson};
use super::sse::{self, Flavor, Framing};
use super::{control, params, run};
use crate::session::{GenerationId, LogReader};
use crate::state::AppState;
use parts::Transcoder;
use request::UiChatRequest;

/// `POST /v1/ui/chat`: `useChat`'s request in, the UI message stream out.
pub(crate) async fn chat(
    State(state): State<AppState>,
    Caller(caller): Caller,
    OpenAiJson(body): OpenAiJson<UiChatRequest>,
) -> Result<Response, ApiError> {
    let (chat_id, completion) = request::to_completion(body)?;
    tracing::Span::current().record("session_id", chat_id.as_str());
    let plan = params::plan(
        completion,
        Flavor::Chat,
        &state.default_model(),
        state.backend.capabilities(),
    )?;
    let (generation, attachment) =
        run::stream(&state, caller, Some(chat_id), plan, run::Dialect::default()).await?;
    let reader = LogReader::new(generation.log.clone(), 0);
    Ok(ui_stream(
        &generation.id,
        reader,
        attachment,
        state.settings.keep_alive,
    ))
}

/// `GET /v1/ui/chat/{chat_id}/stream`: the chat's latest generation,
/// replayed from its start (`useChat`'s `resume: true` rebuilds the whole
/// message) and then live; 204 when the chat has none.
pub(crate) async fn resume(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(chat_id): Path<String>,
) -> Result<Response, ApiError> {
    match control::open_session_from_start(&state, caller, &chat_id).await? {
        Some(opened) => Ok(ui_stream(
            &opened.id,
            opened.reader,
            opened.hold,
            state.settings.keep_alive,
        )),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// The SSE response of a UI message stream. The assistant message's id is
/// the completion id: a resume, which knows only the log, then rebuilds
/// the same message, and the page can stop it through the cancel endpoint.
fn ui_stream<H: Send + 'static>(
    id: &GenerationId,
    reader: LogReader,
    hold: H,
    keep_alive: Duration,
) -> Response {
    let framing = UiFraming(Transcoder::new(id.as_str()));
    let mut response = sse::framed_stream(id, reader, hold, keep_alive, framing);
    response.headers_mut().insert(
        "x-vercel-ai-ui-message-stream",
        HeaderValue::from_static("v1"),
    );
    response
}

struct UiFraming(Transcoder);

impl Framing for UiFraming {
    fn events(&mut self, batch: Bytes) -> Bytes {
        self.0.events(&batch)
    }

    fn unreadable(&mut self, _: &GenerationId, _: usize, err: &ApiError) -> Bytes {
        self.0.unreadable(&err.to_string())
    }
}
