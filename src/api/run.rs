//! Starting a generation from a validated request and answering with its
//! SSE stream or its JSON: `session` runs it, this file only encodes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use super::params::Plan;
use super::sse::{self, ChunkEncoder, Flavor, StreamEncoder};
use crate::backend::CacheKey;
use crate::session::{Attachment, CallerId, Collected, Generation, LogReader, Start, StartError};
use crate::state::AppState;

impl From<StartError> for ApiError {
    fn from(err: StartError) -> Self {
        match err {
            StartError::QueueFull => Self::QueueFull { retry_after: 1 },
            StartError::Backend(err) => err.into(),
        }
    }
}

/// Validated request in, response out: the SSE stream, or the JSON answer.
pub(crate) async fn start(
    state: &AppState,
    caller: CallerId,
    session: Option<String>,
    flavor: Flavor,
    plan: Plan,
) -> Result<Response, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let answer = Answer {
        model: plan.request.model.clone(),
        created: unix_now(),
        flavor,
    };
    if plan.stream {
        let (generation, attachment) = start_stream(
            state,
            caller,
            session,
            flavor,
            plan,
            &answer,
            Dialect::default(),
        )
        .await?;
        let reader = LogReader::new(generation.log.clone(), 0);
        Ok(sse::event_stream(
            &generation.id,
            reader,
            attachment,
            state.settings.keep_alive,
        ))
    } else {
        let mut request = plan.request;
        request.cache_key = Some(cache_key(caller, session.as_deref()));
        let start = Start {
            caller,
            session,
            id_prefix: flavor.id_prefix(),
            request,
            background: false,
        };
        let collected = state.generations.collect(start).await?;
        Ok(json_answer(&collected, &answer))
    }
}

/// What a generation started for another dialect (which transcodes its
/// log on read) carries beyond a chat completion's.
#[derive(Debug, Default)]
pub(crate) struct Dialect {
    /// `resp_` for a Responses API response; `chatcmpl-` by default.
    pub(crate) id_prefix: Option<&'static str>,
    /// Carried by the opening chunk (the Response object's fixed part).
    pub(crate) skeleton: Option<Value>,
    /// Runs to its end whether anyone reads it or not.
    pub(crate) background: bool,
}

/// Starts a streamed generation whose log holds OpenAI chunks, whichever
/// encoding its connections then send; the caller's connection is
/// attached.
pub(crate) async fn stream(
    state: &AppState,
    caller: CallerId,
    session: Option<String>,
    plan: Plan,
    dialect: Dialect,
) -> Result<(Arc<Generation>, Attachment), ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let answer = Answer {
        model: plan.request.model.clone(),
        created: unix_now(),
        flavor: Flavor::Chat,
    };
    start_stream(state, caller, session, Flavor::Chat, plan, &answer, dialect).await
}

/// What the backend may reuse for this request: the caller's computed
/// state, its session's first.
fn cache_key(caller: CallerId, session: Option<&str>) -> CacheKey {
    CacheKey {
        caller: caller.0,
        session: session.map(str::to_owned),
    }
}

async fn start_stream(
    state: &AppState,
    caller: CallerId,
    session: Option<String>,
    flavor: Flavor,
    mut plan: Plan,
    answer: &Answer,
    dialect: Dialect,
) -> Result<(Arc<Generation>, Attachment), ApiError> {
    plan.request.cache_key = Some(cache_key(caller, session.as_deref()));
    let include_usage = plan.include_usage;
    let choices = plan.request.choices;
    let start = Start {
        caller,
        session,
        id_prefix: dialect.id_prefix.unwrap_or(flavor.id_prefix()),
        request: plan.request,
        background: dialect.background,
    };
    let skeleton = dialect.skeleton;
    Ok(state
        .generations
        .stream(start, |id| StreamEncoder {
            chunks: ChunkEncoder::new(id, &answer.model, answer.created, flavor)
                .with_choices(choices)
                .with_skeleton(skeleton),
            include_usage,
        })
        .await?)
}

struct Answer {
    model: String,
    created: u64,
    flavor: Flavor,
}

/// The OpenAI JSON answer of a finished generation.
fn json_answer(collected: &Collected, answer: &Answer) -> Response {
    let id = collected.generation.id.as_str();
    let usage_body = sse::usage_body(collected.usage);
    let choices: Vec<Value> = (0u32..)
        .zip(&collected.answer.choices)
        .map(|(index, choice)| match answer.flavor {
            Flavor::Chat => json!({
                "index": index,
                "message": choice.message(),
                "logprobs": choice.logprobs(),
                "finish_reason": choice.finish_reason(),
            }),
            Flavor::Legacy => json!({
                "text": choice.content,
                "index": index,
                "logprobs": choice.logprobs(),
                "finish_reason": choice.finish_reason(),
            }),
        })
        .collect();
    let object = match answer.flavor {
        Flavor::Chat => "chat.completion",
        Flavor::Legacy => "text_completion",
    };
    let mut response = Json(json!({
        "id": id,
        "object": object,
        "created": answer.created,
        "model": answer.model,
        "choices": choices,
        "usage": usage_body,
    }))
    .into_response();
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-completion-id", value);
    }
    response
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
