//! A generation's life: admission, the run slot, the backend call, the
//! event log, the end and the metrics. The API layer only says how events
//! are encoded ([`EventEncoder`]) and turns the outcome into a response.
//!
//! A backend is called only once its generation holds a run slot. When a
//! slot is free at once (the usual case), the call happens before the
//! response, so a refusal (unknown model, prompt too long, an upstream's
//! 4xx) is a real status. A queued stream gets its 200 and opening event
//! first; a refusal then arrives as its error event.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tracing::Instrument;

use super::{
    Admission, Attachment, CallerId, EndCause, Generation, GenerationId, GenerationRegistry,
    QueueFull, Replicas, RetireOnDrop, Ticket,
};
use crate::backend::answer::Answer;
use crate::backend::{
    Accepted, Backend, BackendError, ChoiceDelta, FinishReason, GenerateRequest, GuardedRun, Step,
    Usage,
};
use crate::telemetry;

/// Turns a generation's steps into the bytes of its log.
pub trait EventEncoder: Send + 'static {
    /// The first event, before the model's first token.
    fn opening(&mut self) -> Bytes;
    /// Appends the text's event to `out` (the log's own buffer).
    fn text(&mut self, text: &str, out: &mut Vec<u8>);
    /// A step richer than text.
    fn delta(&mut self, delta: &ChoiceDelta) -> Bytes;
    /// The last events with a finish reason: one per choice that has not
    /// ended yet.
    fn finish(&mut self, reason: FinishReason) -> Vec<Bytes>;
    /// An event after the finish that reports usage, if asked for.
    fn usage(&mut self, usage: Usage) -> Option<Bytes>;
    /// A failure after the response began.
    fn error(&mut self, err: BackendError) -> Bytes;
    /// The very last event.
    fn done(&mut self) -> Bytes;
}

/// What starting a generation needs.
pub struct Start {
    pub caller: CallerId,
    pub session: Option<String>,
    /// `chatcmpl-`, `cmpl-` or `resp_`.
    pub id_prefix: &'static str,
    pub request: GenerateRequest,
    /// Runs to its end whether anyone reads it or not.
    pub background: bool,
}

/// Why a generation did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the queue is full")]
    QueueFull,
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A JSON generation's outcome.
pub struct Collected {
    pub generation: Arc<Generation>,
    pub answer: Answer,
    pub reason: FinishReason,
    pub usage: Usage,
}

/// Starts and runs generations: the registry, admission, the backend, and
/// the replicas when there are.
pub struct Generations {
    pub registry: Arc<GenerationRegistry>,
    pub admission: Arc<Admission>,
    pub backend: Arc<dyn Backend>,
    replicas: OnceLock<Arc<Replicas>>,
}

impl Generations {
    pub fn new(
        registry: Arc<GenerationRegistry>,
        admission: Arc<Admission>,
        backend: Arc<dyn Backend>,
    ) -> Self {
        Self {
            registry,
            admission,
            backend,
            replicas: OnceLock::new(),
        }
    }

    /// Shares the generations started from now on with other instances.
    pub fn share(&self, replicas: Arc<Replicas>) {
        // Set once at startup; a second call changes nothing.
        let _ = self.replicas.set(replicas);
    }

    pub fn replicas(&self) -> Option<&Arc<Replicas>> {
        self.replicas.get()
    }

    fn admit(
        &self,
        start: &Start,
        streamed: bool,
    ) -> Result<(Ticket, Arc<Generation>), StartError> {
        let ticket = self.admission.admit(start.caller).map_err(|QueueFull| {
            telemetry::queue_full();
            StartError::QueueFull
        })?;
        let generation = self.registry.create(
            start.id_prefix,
            start.caller,
            start.session.clone(),
            streamed,
        );
        if start.background {
            generation.run_in_background();
        }
        tracing::Span::current().record("completion_id", generation.id.as_str());
        Ok((ticket, generation))
    }

    /// Makes a generation visible here and to the other instances, and
    /// cancels its session's previous one wherever it runs.
    async fn activate(&self, generation: &Arc<Generation>) {
        if let Some(replaced) = self.registry.activate(generation) {
            tracing::info!(replaced = %replaced, "session's previous generation cancelled");
        }
        if let Some(replicas) = self.replicas() {
            replicas.activate(generation).await;
        }
    }

    /// Starts a streamed generation: its log begins with the encoder's
    /// opening event and a task writes the rest. Returns it with the
    /// caller's connection already attached.
    pub async fn stream<E: EventEncoder>(
        self: &Arc<Self>,
        start: Start,
        encoder: impl FnOnce(&GenerationId) -> E,
    ) -> Result<(Arc<Generation>, Attachment), StartError> {
        let (mut ticket, generation) = self.admit(&start, true)?;
        let mut encoder = encoder(&generation.id);
        let mut request = start.request;
        request.demand = generation.demand.clone();
        let accepted = self
            .accept_if_running(&mut ticket, &generation, &request)
            .await?;
        self.activate(&generation).await;
        generation.log.push(&encoder.opening());
        // Attach this connection before the task can finish.
        let attachment = generation.attach();
        let driver = drive(
            Arc::clone(self),
            Arc::clone(&generation),
            ticket,
            Opening { accepted, request },
            encoder,
        );
        tokio::spawn(driver.instrument(tracing::Span::current()));
        Ok((generation, attachment))
    }

    /// Runs a JSON generation to its end. If the caller leaves, the future
    /// is dropped and the generation is cancelled and retired.
    pub async fn collect(self: &Arc<Self>, start: Start) -> Result<Collected, StartError> {
        let (mut ticket, generation) = self.admit(&start, false)?;
        let _retire = RetireOnDrop {
            registry: Arc::clone(&self.registry),
            generation: Arc::clone(&generation),
        };
        let request = start.request;
        let accepted = self
            .accept_if_running(&mut ticket, &generation, &request)
            .await?;
        // Visible while queued too, so that its session's next request or
        // the cancel endpoint can stop it.
        self.activate(&generation).await;
        let mut answer = Answer::new(request.choices);
        let mut failure = None;
        let mut finish = FinishReason::Stop;
        let ran = self
            .run(
                &generation,
                &mut ticket,
                Opening { accepted, request },
                |step| match step {
                    Step::Text(piece) => answer.text(&piece),
                    Step::Delta(delta) => answer.delta(&delta),
                    Step::Finished(reason, _) => {
                        answer.finish(reason);
                        finish = reason;
                    }
                    Step::Failed(err) => failure = Some(err),
                },
            )
            .await;
        let (cause, usage) = ran
            .as_ref()
            .map_or((EndCause::Error, Usage::default()), |e| *e);
        end(&generation, ticket, cause, usage);
        match (ran, failure) {
            (Err(err), _) | (Ok(_), Some(err)) => Err(err.into()),
            (Ok(_), None) => Ok(Collected {
                generation,
                answer,
                reason: finish,
                usage,
            }),
        }
    }

    /// Calls the backend at once when a run slot is free, so that its
    /// refusal can still be the response's status; `None` when queued.
    async fn accept_if_running(
        &self,
        ticket: &mut Ticket,
        generation: &Generation,
        request: &GenerateRequest,
    ) -> Result<Option<Accepted>, BackendError> {
        if !ticket.try_run() {
            return Ok(None);
        }
        let accepted = self
            .backend
            .generate(request.clone(), generation.cancel_token())
            .await?;
        Ok(Some(accepted))
    }

    /// The one way a generation runs, streamed or not: wait for a run slot
    /// if it has none (a cancel while queued ends it at once), call the
    /// backend, and hand each step on. Returns why it ended and the usage
    /// (the backend's own figures), or the backend's refusal.
    async fn run(
        &self,
        generation: &Generation,
        ticket: &mut Ticket,
        opening: Opening,
        mut on_step: impl FnMut(Step),
    ) -> Result<(EndCause, Usage), BackendError> {
        let cancel = generation.cancel_token();
        let accepted = match opening.accepted {
            Some(accepted) => accepted,
            None => {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => {}
                    () = ticket.run() => {}
                }
                if cancel.is_cancelled() {
                    never_started()
                } else {
                    self.backend
                        .generate(opening.request, generation.cancel_token())
                        .await?
                }
            }
        };
        let mut clock = TokenClock::start();
        let mut run = GuardedRun::new(accepted, cancel);
        let mut cause = EndCause::Error;
        while let Some(step) = run.next().await {
            match &step {
                Step::Text(_) | Step::Delta(_) => clock.tick(),
                Step::Finished(reason, _) => cause = end_cause(generation, *reason),
                Step::Failed(_) => cause = EndCause::Error,
            }
            on_step(step);
        }
        Ok((cause, run.usage()))
    }
}

/// The run of a generation cancelled before its backend was called: it
/// ends at once as `cancelled`.
fn never_started() -> Accepted {
    Accepted {
        prompt_tokens: None,
        tokens: Box::pin(futures_util::stream::pending()),
    }
}

/// How a generation begins: already accepted by its backend, or still to
/// be called once it holds a slot.
struct Opening {
    accepted: Option<Accepted>,
    request: GenerateRequest,
}

/// Writes a streamed generation's events into its log, to `[DONE]`.
async fn drive(
    generations: Arc<Generations>,
    generation: Arc<Generation>,
    mut ticket: Ticket,
    opening: Opening,
    mut encoder: impl EventEncoder,
) {
    let log = &generation.log;
    let max_log_bytes = generations.registry.config().max_log_bytes;
    let mut cut = false;
    // A log at its cap ends the answer as `max_tokens` would.
    let mut cap = |bytes: usize| {
        if bytes >= max_log_bytes && !cut {
            cut = generation.cancel(EndCause::Length);
        }
        cut
    };
    let ran = generations
        .run(&generation, &mut ticket, opening, |step| match step {
            Step::Text(text) => {
                if !text.is_empty() {
                    cap(log.push_with(|out| encoder.text(&text, out)));
                }
            }
            Step::Delta(delta) => {
                cap(log.push_with(|out| out.extend_from_slice(&encoder.delta(&delta))));
            }
            Step::Finished(_, _) if generation.cancel_cause() == Some(EndCause::EndedElsewhere) => {
            }
            Step::Finished(reason, counted) => {
                let reason = if cap(0) { FinishReason::Length } else { reason };
                for event in encoder.finish(reason) {
                    log.push(&event);
                }
                if let Some(event) = encoder.usage(counted) {
                    log.push(&event);
                }
            }
            Step::Failed(err) => log.push(&encoder.error(err)),
        })
        .await;
    let (cause, usage) = match ran {
        Ok((cause, usage)) => (cause, usage),
        Err(err) => {
            log.push(&encoder.error(err));
            (EndCause::Error, Usage::default())
        }
    };
    match generations.replicas() {
        // Ended by another instance that took this one for dead: its own
        // client gets the ending the readers elsewhere got.
        Some(replicas) if cause == EndCause::EndedElsewhere => {
            for event in replicas.epilogue(&generation.id, log.len()) {
                log.push(&event);
            }
        }
        _ => log.push(&encoder.done()),
    }
    end(&generation, ticket, cause, usage);
    generations.registry.retire(&generation);
}

/// Records the end: the log closes, the run slot frees, the end is
/// logged and counted once.
fn end(generation: &Generation, ticket: Ticket, cause: EndCause, usage: Usage) {
    generation.mark_done();
    drop(ticket);
    log_end(generation, cause, usage);
}

fn end_cause(generation: &Generation, reason: FinishReason) -> EndCause {
    match reason {
        FinishReason::Stop | FinishReason::ToolCalls | FinishReason::ContentFilter => {
            EndCause::Finished
        }
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
