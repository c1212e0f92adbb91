//! Starting a generation and running it: registry entry, backend call, then
//! either a task that writes the event log an SSE response reads, or a JSON
//! answer collected in the handler.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::ApiError;
use super::params::Plan;
use super::sse::{self, ChunkEncoder, Flavor};
use super::wire::{AssistantMessage, ChatChoice, ChatCompletion, TextChoice, TextCompletion};
use crate::backend::{FinishReason, GuardedRun, Step, Usage};
use crate::server::AppState;
use crate::session::{
    CallerId, EndCause, Generation, GenerationRegistry, LogReader, QueueFull, RetireOnDrop, Ticket,
};
use crate::telemetry;

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
    let ticket = state.admission.admit().map_err(|QueueFull| {
        telemetry::queue_full();
        ApiError::QueueFull { retry_after: 1 }
    })?;
    let generation = state
        .registry
        .create(flavor.id_prefix(), caller, session, plan.stream);
    let span = tracing::Span::current();
    span.record("completion_id", generation.id.as_str());
    let model = plan.request.model.clone();
    let accepted = state
        .backend
        .generate(plan.request, generation.cancel_token())
        .await?;
    if let Some(replaced) = state.registry.activate(&generation) {
        tracing::info!(replaced = %replaced, "session's previous generation cancelled");
    }
    if let Some(replicas) = &state.replicas {
        replicas.activate(&generation).await;
    }
    let run = GuardedRun::new(accepted, generation.cancel_token());
    let answer = Answer {
        model,
        created: unix_now(),
        flavor,
    };
    if plan.stream {
        let mut encoder = ChunkEncoder::new(&generation.id, &answer.model, answer.created, flavor);
        generation.log.push(&encoder.opening());
        // Attach this connection before the task can finish.
        let response = sse::event_stream(
            &generation.id,
            LogReader::new(generation.log.clone(), 0),
            generation.attach(),
            state.settings.keep_alive,
        );
        let driver = drive(
            Arc::clone(&state.registry),
            Arc::clone(&generation),
            run,
            ticket,
            encoder,
            plan.include_usage,
        );
        tokio::spawn(driver.instrument(span));
        Ok(response)
    } else {
        collect(&state.registry, generation, run, ticket, answer).await
    }
}

/// Writes a streamed generation's events into its log, to `[DONE]`.
async fn drive(
    registry: Arc<GenerationRegistry>,
    generation: Arc<Generation>,
    mut run: GuardedRun,
    mut ticket: Ticket,
    mut encoder: ChunkEncoder,
    include_usage: bool,
) {
    let mut clock = TokenClock::start();
    wait_for_slot(&mut ticket, &generation).await;
    let log = &generation.log;
    let max_log_bytes = registry.config().max_log_bytes;
    let mut cut = false;
    let mut cause = EndCause::Error;
    while let Some(step) = run.next().await {
        match step {
            Step::Text(text) => {
                clock.tick();
                if !text.is_empty() {
                    log.push(&encoder.text(&text));
                }
                // A log at its cap ends the answer as if `max_tokens` had.
                if log.bytes() >= max_log_bytes && !cut {
                    cut = generation.cancel(EndCause::Length);
                }
            }
            Step::Finished(reason, usage) => {
                let reason = if cut { FinishReason::Length } else { reason };
                log.push(&encoder.finish(reason));
                if include_usage {
                    log.push(&encoder.usage(usage));
                }
                cause = end_cause(&generation, reason);
            }
            Step::Failed(err) => {
                log.push(&encoder.error(&ApiError::from(err)));
            }
        }
    }
    log.push(&encoder.done());
    generation.mark_done();
    log_end(&generation, cause, run.usage());
    registry.retire(&generation);
}

struct Answer {
    model: String,
    created: u64,
    flavor: Flavor,
}

/// Runs a JSON request to its end in the handler. If the client leaves, the
/// handler is dropped and the guard cancels and retires the generation.
async fn collect(
    registry: &Arc<GenerationRegistry>,
    generation: Arc<Generation>,
    mut run: GuardedRun,
    mut ticket: Ticket,
    answer: Answer,
) -> Result<Response, ApiError> {
    let _retire = RetireOnDrop {
        registry: Arc::clone(registry),
        generation: Arc::clone(&generation),
    };
    let mut clock = TokenClock::start();
    wait_for_slot(&mut ticket, &generation).await;
    let mut text = String::new();
    let mut outcome = Err(ApiError::Internal);
    while let Some(step) = run.next().await {
        match step {
            Step::Text(piece) => {
                clock.tick();
                text.push_str(&piece);
            }
            Step::Finished(reason, usage) => outcome = Ok((reason, usage)),
            Step::Failed(err) => outcome = Err(ApiError::from(err)),
        }
    }
    generation.mark_done();
    let (reason, usage) =
        outcome.inspect_err(|_| log_end(&generation, EndCause::Error, run.usage()))?;
    log_end(&generation, end_cause(&generation, reason), usage);

    let id = generation.id.as_str();
    let usage_body = sse::usage_body(usage);
    let mut response = match answer.flavor {
        Flavor::Chat => Json(ChatCompletion {
            id,
            object: "chat.completion",
            created: answer.created,
            model: &answer.model,
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &text,
                },
                logprobs: None,
                finish_reason: reason.as_str(),
            }],
            usage: usage_body,
        })
        .into_response(),
        Flavor::Legacy => Json(TextCompletion {
            id,
            object: "text_completion",
            created: answer.created,
            model: &answer.model,
            choices: [TextChoice {
                text: &text,
                index: 0,
                logprobs: None,
                finish_reason: Some(reason.as_str()),
            }],
            usage: Some(usage_body),
        })
        .into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-completion-id", value);
    }
    Ok(response)
}

/// Waits in line for a run slot; a cancellation while waiting ends the
/// wait, and the run then finishes at once as `cancelled`.
async fn wait_for_slot(ticket: &mut Ticket, generation: &Generation) {
    let cancel = generation.cancel_token();
    tokio::select! {
        biased;
        () = cancel.cancelled() => {}
        () = ticket.run() => {}
    }
}

fn end_cause(generation: &Generation, reason: FinishReason) -> EndCause {
    match reason {
        FinishReason::Stop => EndCause::Finished,
        FinishReason::Length => EndCause::Length,
        FinishReason::Cancelled => generation.cancel_cause().unwrap_or(EndCause::ClientGone),
    }
}

/// Time to first token and between tokens, for the metrics.
struct TokenClock {
    started: Instant,
    last: Option<Instant>,
    inter_token: metrics::Histogram,
}

impl TokenClock {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            last: None,
            inter_token: telemetry::inter_token(),
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        match self.last.replace(now) {
            None => telemetry::time_to_first_token(now - self.started),
            Some(last) => self.inter_token.record(now - last),
        }
    }
}

fn log_end(generation: &Generation, cause: EndCause, usage: Usage) {
    telemetry::generation_ended(cause, usage.completion_tokens);
    tracing::info!(
        completion_id = %generation.id,
        cause = cause.as_str(),
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        "generation ended"
    );
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
