//! `POST /v1/chat/completions` and the legacy `POST /v1/completions`:
//! extract, resume or validate, start.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::control;
use super::error::ApiError;
use super::extract::{Caller, OpenAiJson, SessionId};
use super::params;
use super::run;
use super::sse::Flavor;
use super::wire::CompletionRequest;
use crate::state::AppState;

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    session: SessionId,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    handle(state, caller, session, &headers, body, Flavor::Chat).await
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    session: SessionId,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    handle(state, caller, session, &headers, body, Flavor::Legacy).await
}

async fn handle(
    state: AppState,
    Caller(caller): Caller,
    SessionId(session): SessionId,
    headers: &HeaderMap,
    body: CompletionRequest,
    flavor: Flavor,
) -> Result<Response, ApiError> {
    // fetch-event-source retries by re-sending the same POST with the last
    // id it saw: continue that generation rather than start a second one.
    if let Some(resumed) = control::resume_from_post(&state, caller, headers).await? {
        return Ok(resumed);
    }
    let mut plan = params::plan(
        body,
        flavor,
        &state.default_model(),
        state.backend.capabilities(),
    )?;
    // OpenAI's own routes refuse a limit beyond the room left, as OpenAI
    // and vLLM do.
    plan.request.max_tokens_field = Some(plan.max_tokens_field);
    run::start(&state, caller, session, flavor, plan).await
}
