//! OpenAI's Responses API over the one generation log: `POST
//! /v1/responses` starts a generation as a chat completion would (same
//! admission, registry, session, replicas) whose opening chunk carries the
//! Response object's fixed part; every connection transcodes the log into
//! Responses events ([`events::Transcoder`]). A stored response keeps its
//! items (for `previous_response_id` and `input_items`) and, once it
//! ends, its final object, for `--response-ttl`.

mod events;
mod request;

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::chunk::read_log;
use super::control::{self, Found, Opened};
use super::error::ApiError;
use super::extract::{Caller, OpenAiJson, OpenAiPath as Path, OpenAiQuery as Query, SessionId};
use super::params;
use super::run::{self, Dialect};
use super::sse::{self, Flavor, Framing};
use crate::session::{CallerId, EndCause, GenerationId, LogReader};
use crate::state::AppState;
use events::Transcoder;
use request::CreateRequest;

/// Ids of Responses API generations start with this.
const PREFIX: &str = "resp_";

/// How long a cancel waits for the generation to end before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn is_response(id: &GenerationId) -> bool {
    id.as_str().starts_with(PREFIX)
}

/// An id of our shape for a response: anything else (a key pattern aimed
/// at Redis, say) is unknown without asking anyone.
fn response_id(id: &str) -> bool {
    id.starts_with(PREFIX) && control::plausible(id)
}

/// A Responses event stream of a generation's log from its first event,
/// sending what comes after sequence number `after`.
pub(crate) fn event_stream(opened: Opened, after: Option<u64>, keep_alive: Duration) -> Response {
    let framing = ResponsesFraming(Transcoder::new(opened.id.as_str(), after));
    sse::framed_stream(&opened.id, opened.reader, opened.hold, keep_alive, framing)
}

struct ResponsesFraming(Transcoder);

impl Framing for ResponsesFraming {
    fn events(&mut self, batch: Bytes) -> Bytes {
        self.0.events(&batch)
    }

    fn unreadable(&mut self, _: &GenerationId, _: usize, err: &ApiError) -> Bytes {
        let code = err.code().unwrap_or("server_error");
        self.0.unreadable(code, &err.to_string())
    }
}

/// `POST /v1/responses`.
pub(crate) async fn create(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SessionId(session): SessionId,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<CreateRequest>,
) -> Result<Response, ApiError> {
    if let Some(resumed) = control::resume_from_post(&state, caller, &headers).await? {
        return Ok(resumed);
    }
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let store = body.store.unwrap_or(true);
    let background = body.background.unwrap_or(false);
    if background && !store {
        return Err(ApiError::invalid(
            "`background` responses must be stored: send `store: true` (the default).",
            Some("background".to_owned()),
        ));
    }
    let auto_truncation = match body.truncation.as_deref() {
        None | Some("disabled") => false,
        Some("auto") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`truncation` must be `auto` or `disabled`, got `{other}`."),
                Some("truncation".to_owned()),
            ));
        }
    };
    let context = match &body.previous_response_id {
        Some(previous) => previous_items(&state, caller, previous).await?,
        None => Vec::new(),
    };
    let own = with_ids(resolve_references(
        request::input_items(body.input.as_ref())?,
        &context,
    )?);
    let items: Vec<Value> = context.iter().chain(&own).cloned().collect();
    let relays = state.backend.capabilities().relays_fields;
    let path = |i: usize| match i.checked_sub(context.len()) {
        Some(own) => format!("input[{own}]"),
        None => "previous_response_id".to_owned(),
    };
    // `truncation: auto` drops the oldest items until the prompt fits.
    let mut dropped = 0;
    let (generation, attachment) = loop {
        let messages = request::messages(body.instructions.as_deref(), &items[dropped..], |i| {
            path(i + dropped)
        })?;
        let completion = request::completion(&body, messages, relays)?;
        let plan = params::plan(
            completion,
            Flavor::Chat,
            &state.default_model(),
            state.backend.capabilities(),
        )?;
        let dialect = Dialect {
            id_prefix: Some(PREFIX),
            skeleton: Some(skeleton(&body, &plan.request.model, store, background)),
            background,
        };
        match run::stream(&state, caller, session.clone(), plan, dialect).await {
            Err(ApiError::ContextLength(_)) if auto_truncation && dropped + 1 < items.len() => {
                dropped += 1;
            }
            started => break started?,
        }
    };
    let id = generation.id.clone();
    if store {
        let document =
            json!({"input": own, "context": items[dropped..], "output": null, "response": null});
        // The response runs whether or not it could be stored (Redis away):
        // it streams and resumes; only a later retrieve misses it.
        if let Err(err) = state.stored.put(caller, id.as_str(), document).await {
            tracing::warn!(%err, "the response could not be stored");
        }
        let (stored, generation) = (state.stored.clone(), generation.clone());
        tokio::spawn(async move {
            generation.finished().await;
            let mut reader = LogReader::new(generation.log.clone(), 0);
            let response = response_of(&generation.id, &mut reader, true).await;
            if let Ok(Some(document)) = stored.get(caller, generation.id.as_str()).await {
                let mut document = (*document).clone();
                document["output"] = response["output"].clone();
                document["response"] = response;
                if let Err(err) = stored.put(caller, generation.id.as_str(), document).await {
                    tracing::warn!(%err, "the final response could not be stored");
                }
            }
        });
    }
    let reader = LogReader::new(generation.log.clone(), 0);
    if body.stream.unwrap_or(false) {
        let opened = Opened {
            id,
            reader,
            hold: Box::new(attachment),
        };
        return Ok(event_stream(opened, None, state.settings.keep_alive));
    }
    let mut reader = reader;
    let response = if background {
        let mut response = response_of(&id, &mut reader, false).await;
        if response["status"] == "in_progress" {
            response["status"] = Value::String("queued".into());
        }
        response
    } else {
        // The attachment lives until the answer is read: a client that
        // leaves starts the reattach grace, as on every route.
        let response = response_of(&id, &mut reader, true).await;
        drop(attachment);
        response
    };
    Ok(with_id_header(Json(response).into_response(), &id))
}

/// The Response object of a log: read to its end (waiting for it), or
/// with `wait` false, as it stands now.
async fn response_of(id: &GenerationId, reader: &mut LogReader, wait: bool) -> Value {
    let mut transcoder = Transcoder::new(id.as_str(), None);
    if let Err(err) = read_log(reader, wait, |events| transcoder.absorb(events)).await {
        transcoder.unreadable("server_error", &err.to_string());
    }
    transcoder.current()
}

fn with_id_header(mut response: Response, id: &GenerationId) -> Response {
    if let Ok(value) = axum::http::HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert("x-completion-id", value);
    }
    response
}

/// The items a response continues from: its chain's input and output.
async fn previous_items(
    state: &AppState,
    caller: CallerId,
    previous: &str,
) -> Result<Vec<Value>, ApiError> {
    let document = state.stored.get(caller, previous).await?.ok_or_else(|| {
        ApiError::invalid(
            format!("Previous response with id '{previous}' not found."),
            Some("previous_response_id".to_owned()),
        )
    })?;
    let mut items = document["context"].as_array().cloned().unwrap_or_default();
    let output = match document["output"].as_array() {
        Some(output) => output.clone(),
        // Still running: what it has said so far.
        None => match control::find(state, caller, &GenerationId::from(previous)).await? {
            Some(found) => {
                let mut opened = control::open(state, found, 0).await?;
                response_of(&opened.id, &mut opened.reader, false).await["output"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            }
            None => Vec::new(),
        },
    };
    items.extend(output);
    Ok(items)
}

/// `item_reference` items replaced by the items they name.
fn resolve_references(items: Vec<Value>, context: &[Value]) -> Result<Vec<Value>, ApiError> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let is_reference = item["type"] == "item_reference"
                || (item.get("type").is_none() && item.get("role").is_none());
            if !is_reference {
                return Ok(item);
            }
            let id = item["id"].as_str().unwrap_or_default();
            context
                .iter()
                .find(|c| c["id"].as_str() == Some(id) && !id.is_empty())
                .cloned()
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("Item with id '{id}' not found in this conversation (`previous_response_id`)."),
                        Some(format!("input[{i}].id")),
                    )
                })
        })
        .collect()
}

/// Input items as `input_items` lists them: each with an id and a status,
/// message content as parts.
fn with_ids(items: Vec<Value>) -> Vec<Value> {
    items
        .into_iter()
        .map(|mut item| {
            let kind = item["type"].as_str().unwrap_or("message").to_owned();
            if let Value::Object(fields) = &mut item {
                fields.insert("type".into(), Value::String(kind.clone()));
                if !fields.get("id").is_some_and(Value::is_string) {
                    let prefix = match kind.as_str() {
                        "function_call" => "fc_",
                        "function_call_output" => "fco_",
                        "reasoning" => "rs_",
                        _ => "msg_",
                    };
                    fields.insert(
                        "id".into(),
                        Value::String(GenerationId::new(prefix).as_str().to_owned()),
                    );
                }
                fields
                    .entry("status")
                    .or_insert_with(|| Value::String("completed".into()));
                if kind == "message"
                    && let Some(Value::String(text)) = fields.get("content")
                {
                    let part = if fields.get("role").and_then(Value::as_str) == Some("assistant") {
                        json!({"type": "output_text", "text": text, "annotations": []})
                    } else {
                        json!({"type": "input_text", "text": text})
                    };
                    fields.insert("content".into(), json!([part]));
                }
            }
            item
        })
        .collect()
}

/// The Response object's fixed part: the request's parameters, echoed.
fn skeleton(body: &CreateRequest, model: &str, store: bool, background: bool) -> Value {
    json!({
        "created_at": unix_now(),
        "model": model,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata.clone().unwrap_or_default(),
        "parallel_tool_calls": body.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": body.previous_response_id,
        "reasoning": body.reasoning.clone().unwrap_or_else(|| json!({"effort": null, "summary": null})),
        "store": store,
        "background": background,
        "temperature": body.temperature.unwrap_or(1.0),
        "top_p": body.top_p.unwrap_or(1.0),
        "top_logprobs": body.top_logprobs.unwrap_or(0),
        "text": body.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": body.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        "tools": body.tools.clone().unwrap_or_default(),
        "truncation": body.truncation.clone().unwrap_or_else(|| "disabled".to_owned()),
        "completed_at": null,
        "user": null,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RetrieveQuery {
    stream: Option<bool>,
    starting_after: Option<u64>,
}

/// The caller's stored response: its document, and its generation while
/// its log is kept.
async fn find_response(
    state: &AppState,
    caller: CallerId,
    id: &str,
) -> Result<(std::sync::Arc<Value>, Option<Found>), ApiError> {
    let not_found = || ApiError::GenerationNotFound(id.to_owned());
    if !response_id(id) {
        return Err(not_found());
    }
    let document = state.stored.get(caller, id).await?.ok_or_else(not_found)?;
    let found = control::find(state, caller, &GenerationId::from(id))
        .await?
        .filter(Found::streamed);
    Ok((document, found))
}

/// The response as it stands: from its log while kept, else as stored.
async fn standing(
    state: &AppState,
    document: &Value,
    found: Option<Found>,
    id: &str,
) -> Result<Value, ApiError> {
    match found {
        Some(found) => {
            let mut opened = control::open(state, found, 0).await?;
            Ok(response_of(&opened.id, &mut opened.reader, false).await)
        }
        None if !document["response"].is_null() => Ok(document["response"].clone()),
        None => Err(ApiError::GenerationNotFound(id.to_owned())),
    }
}

/// `GET /v1/responses/{id}`, and with `stream=true` its events after
/// `starting_after`.
pub(crate) async fn retrieve(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Query(query): Query<RetrieveQuery>,
) -> Result<Response, ApiError> {
    let (document, found) = find_response(&state, caller, &id).await?;
    if query.stream == Some(true) {
        let found = found.ok_or_else(|| {
            ApiError::invalid(
                "This response's events are no longer kept; retrieve it without `stream`.",
                Some("stream".to_owned()),
            )
        })?;
        let opened = control::open(&state, found, 0).await?;
        return Ok(event_stream(
            opened,
            query.starting_after,
            state.settings.keep_alive,
        ));
    }
    let response = standing(&state, &document, found, &id).await?;
    Ok(Json(response).into_response())
}

/// `POST /v1/responses/{id}/cancel`: stops it (within one engine step) and
/// answers the response as it ended; a finished one comes back as it is.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (document, found) = find_response(&state, caller, &id).await?;
    match &found {
        Some(Found::Local(generation)) => {
            generation.cancel(EndCause::CancelEndpoint);
            let _ = tokio::time::timeout(CANCEL_WAIT, generation.finished()).await;
        }
        Some(Found::Remote(remote)) => {
            if let Some(replicas) = &state.replicas {
                replicas
                    .cancel(caller, &remote.id, EndCause::CancelEndpoint)
                    .await?;
            }
        }
        None => {}
    }
    // Read again: a remote log has its end only now.
    let found = match found {
        Some(Found::Remote(_)) => {
            control::find(&state, caller, &GenerationId::from(id.as_str())).await?
        }
        other => other,
    };
    let response = standing(&state, &document, found, &id).await?;
    Ok(Json(response).into_response())
}

/// `DELETE /v1/responses/{id}`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !response_id(&id) || !state.stored.delete(caller, &id).await? {
        return Err(ApiError::GenerationNotFound(id));
    }
    Ok(Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: the response's own input items,
/// newest first unless `order=asc`, in pages of `limit` after `after`.
pub(crate) async fn input_items(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let (document, _) = find_response(&state, caller, &id).await?;
    let mut items = document["input"].as_array().cloned().unwrap_or_default();
    match query.order.as_deref() {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`order` must be `asc` or `desc`, got `{other}`."),
                Some("order".to_owned()),
            ));
        }
    }
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "`limit` must be between 1 and 100.",
            Some("limit".to_owned()),
        ));
    }
    let start = match &query.after {
        Some(after) => items
            .iter()
            .position(|i| i["id"].as_str() == Some(after))
            .map_or(items.len(), |p| p + 1),
        None => 0,
    };
    let page: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + page.len() < items.len();
    Ok(Json(json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|i| i["id"].clone()),
        "last_id": page.last().map(|i| i["id"].clone()),
        "has_more": has_more,
    }))
    .into_response())
}
