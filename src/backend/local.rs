//! The `local` backend: a GGUF model on this machine's CPU. Decoding runs on
//! one dedicated thread that takes a step of each running generation in
//! turn (each with its own KV cache over the shared weights) and checks for
//! cancellation between steps; the async runtime never waits on compute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use async_stream::stream;
use async_trait::async_trait;
use tokio::sync::mpsc as tokio_mpsc;
use tokio_util::sync::CancellationToken;

use super::features::{FIELDS, Features};
use super::shaping::{self, CallReader, Out};
use super::stop::StopMatcher;
use super::{
    Accepted, Backend, BackendError, Capabilities, ChoiceDelta, Demand, FinishReason,
    GenerateRequest, ModelCard, Prompt, Sampling, TokenEvent, Usage,
};
use crate::model::Model;
use crate::model::constrain::Constraint;
use crate::model::llama::Cache;
use crate::model::sampling::Sampler;
use crate::model::template::{Piece, TemplateError};
use crate::model::tokenizer::{self, TextStream};

/// Generations decoded in turn by default; more wait in the server's queue.
const DEFAULT_CONCURRENCY: usize = 4;

pub struct LocalBackend {
    model: Arc<Model>,
    name: String,
    jobs: mpsc::Sender<Msg>,
    /// Forward passes run so far: shows when decoding stops.
    steps: Arc<AtomicU64>,
}

type EventSender = tokio_mpsc::UnboundedSender<Result<TokenEvent, BackendError>>;

/// What the decode thread hears: a new generation, or that one of its
/// generations was paused, resumed or cancelled.
enum Msg {
    Job(Box<Job>),
    Wake,
}

/// A generation handed to the decode thread.
struct Job {
    prompt: Vec<u32>,
    sampling: Sampling,
    max_tokens: u32,
    stop: Vec<String>,
    cancel: CancellationToken,
    events: EventSender,
    /// Paused while nobody reads: not stepped, its KV cache kept.
    demand: Demand,
    shaping: Shaping,
}

/// What a generation does around sampling for tools, structured output,
/// logit bias and log probabilities.
struct Shaping {
    constraint: Option<Constraint>,
    /// Reads tool-call text into `tool_calls` deltas, when tools may be called.
    calls: Option<CallReader>,
    logprobs: Option<u8>,
    bias: Vec<(u32, f32)>,
}

impl LocalBackend {
    /// Starts the decode thread. `name` overrides the model's own id.
    pub fn start(model: Model, name: Option<String>) -> std::io::Result<Self> {
        let model = Arc::new(model);
        let (jobs, queue) = mpsc::channel();
        let worker = Arc::clone(&model);
        let steps = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&steps);
        std::thread::Builder::new()
            .name("sluicegate-decode".into())
            .spawn(move || decode_loop(&worker, &queue, &counter))?;
        Ok(Self {
            name: name.unwrap_or_else(|| model.name.clone()),
            model,
            jobs,
            steps,
        })
    }

    /// Forward passes run so far, over all generations.
    pub fn decode_steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// The loaded model.
    pub fn model(&self) -> &Model {
        &self.model
    }
}

/// The prompt's token ids. Message contents and a legacy prompt are text:
/// only the chat template's own markup yields control tokens.
fn tokenize(model: &Model, prompt: &Prompt, features: &Features) -> Result<Vec<u32>, BackendError> {
    let pieces = match prompt {
        Prompt::Chat(messages) => model
            .template
            .render_pieces(&shaping::tool_messages(features, messages), true)
            .map_err(|e| match e {
                TemplateError::Render(message) => BackendError::InvalidRequest(message),
                TemplateError::Compile(detail) => BackendError::Internal(detail),
            })?,
        Prompt::Text(text) => vec![Piece::Text(text.clone())],
    };
    tokenizer::encode_pieces(&model.tokenizer, &model.text_tokenizer, &pieces)
        .map_err(|e| BackendError::Internal(e.to_string()))
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_choices: 1,
            default_concurrency: DEFAULT_CONCURRENCY,
            relays_fields: false,
            serves: &FIELDS,
        }
    }

    fn default_model(&self) -> Option<String> {
        Some(self.name.clone())
    }

    async fn models(&self) -> Result<Vec<ModelCard>, BackendError> {
        Ok(vec![ModelCard {
            id: self.name.clone(),
            owned_by: "sluicegate".into(),
            context_length: u32::try_from(self.model.weights.config.context_length).ok(),
        }])
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> Result<Accepted, BackendError> {
        if req.model != self.name {
            return Err(BackendError::ModelNotFound(req.model));
        }
        // Rendering and tokenizing a long prompt takes a while: never on a
        // worker of the async runtime.
        let model = Arc::clone(&self.model);
        let request_prompt = req.prompt;
        let features = req.features;
        let vocab = self.model.weights.config.vocab_size;
        if let Some((id, _)) = features
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= vocab)
        {
            return Err(BackendError::InvalidRequest(format!(
                "`logit_bias` names token {id}, beyond this model's {vocab} tokens."
            )));
        }
        // Rendering, tokenizing and compiling a grammar take a while:
        // never on a worker of the async runtime.
        let (prompt, shaping) = tokio::task::spawn_blocking(move || {
            let prompt = tokenize(&model, &request_prompt, &features)?;
            let constraint = shaping::constraint(&model.vocabulary, &features).map_err(|e| {
                BackendError::InvalidRequest(format!(
                    "the requested output format cannot be used: {e}"
                ))
            })?;
            let shaping = Shaping {
                constraint,
                calls: features
                    .calls_tools()
                    .then(|| CallReader::new(format!("call_{:08x}", rand::random::<u32>()))),
                logprobs: features.logprobs,
                bias: features.logit_bias,
            };
            Ok::<_, BackendError>((prompt, shaping))
        })
        .await
        .map_err(|e| BackendError::Internal(format!("tokenizing failed: {e}")))??;
        let context = u32::try_from(self.model.weights.config.context_length).unwrap_or(u32::MAX);
        let prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        if prompt.is_empty() {
            return Err(BackendError::InvalidRequest(
                "The prompt is empty: send at least one character of text.".into(),
            ));
        }
        // The prompt must leave room for at least one generated token.
        if prompt_tokens >= context {
            return Err(BackendError::ContextLength {
                prompt: prompt_tokens,
                limit: context,
            });
        }
        let room = context - prompt_tokens;
        let max_tokens = req.max_tokens.map_or(room, |n| n.min(room));
        let (events, mut received) = tokio_mpsc::unbounded_channel();
        let waker = self.jobs.clone();
        req.demand.on_change(move || {
            // The thread gone means nothing runs to wake.
            let _ = waker.send(Msg::Wake);
        });
        let job = Job {
            prompt,
            sampling: req.sampling,
            max_tokens,
            stop: req.stop,
            cancel,
            events,
            demand: req.demand,
            shaping,
        };
        let jobs = self.jobs.clone();
        // Compute starts when the server polls the stream, that is once the
        // generation has a run slot.
        let tokens = stream! {
            if jobs.send(Msg::Job(Box::new(job))).is_err() {
                yield Err(BackendError::Unavailable("the decode thread has stopped".into()));
                return;
            }
            while let Some(event) = received.recv().await {
                yield event;
            }
        };
        Ok(Accepted {
            prompt_tokens: Some(prompt_tokens),
            tokens: Box::pin(tokens),
        })
    }
}

/// The decode thread: admits jobs, then steps every running generation in
/// turn until the channel closes.
fn decode_loop(model: &Model, queue: &mpsc::Receiver<Msg>, steps: &AtomicU64) {
    let mut running: Vec<Running<'_>> = Vec::new();
    loop {
        // Nothing to step (none, or all paused): sleep until told.
        if !running.iter().any(Running::wants_a_step) {
            match queue.recv() {
                Ok(Msg::Job(job)) => running.push(Running::new(model, *job)),
                Ok(Msg::Wake) => {}
                Err(_) => return,
            }
        }
        while let Ok(msg) = queue.try_recv() {
            if let Msg::Job(job) = msg {
                running.push(Running::new(model, *job));
            }
        }
        running.retain_mut(|generation| {
            if !generation.wants_a_step() {
                return true;
            }
            steps.fetch_add(1, Ordering::Relaxed);
            generation.step(model)
        });
    }
}

/// One generation on the decode thread.
struct Running<'m> {
    cache: Cache,
    sampler: Sampler,
    text: TextStream<'m>,
    stop: StopMatcher,
    /// What the next forward pass reads: the prompt, then the last token.
    input: Vec<u32>,
    usage: Usage,
    max_tokens: u32,
    cancel: CancellationToken,
    events: EventSender,
    demand: Demand,
    shaping: Shaping,
}

impl<'m> Running<'m> {
    /// Running, or paused but cancelled (so that it ends and frees its
    /// cache at once).
    fn wants_a_step(&self) -> bool {
        !self.demand.is_paused() || self.cancel.is_cancelled() || self.events.is_closed()
    }

    fn new(model: &'m Model, job: Job) -> Self {
        let mut sampler = Sampler::new(&job.sampling);
        for &token in &job.prompt {
            sampler.observe_prompt(token);
        }
        Self {
            cache: model.weights.new_cache(),
            sampler,
            text: TextStream::new(&model.tokenizer),
            stop: StopMatcher::new(job.stop),
            usage: Usage {
                prompt_tokens: u32::try_from(job.prompt.len()).unwrap_or(u32::MAX),
                completion_tokens: 0,
            },
            input: job.prompt,
            max_tokens: job.max_tokens,
            cancel: job.cancel,
            events: job.events,
            demand: job.demand,
            shaping: job.shaping,
        }
    }

    /// One forward pass and one token. Returns whether to keep going.
    fn step(&mut self, model: &Model) -> bool {
        if self.cancel.is_cancelled() || self.events.is_closed() {
            return self.finish(FinishReason::Cancelled, String::new());
        }
        let mut logits = match model.weights.forward(&self.input, &mut self.cache) {
            Ok(logits) => logits,
            Err(err) => return self.fail(format!("decode failed: {err}")),
        };
        for &(id, bias) in &self.shaping.bias {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += bias;
            }
        }
        if let Some(constraint) = &mut self.shaping.constraint
            && let Err(err) = constraint.mask(&mut logits)
        {
            return self.fail(format!("the output grammar failed: {err}"));
        }
        let token = self.sampler.sample(&mut logits);
        self.sampler.observe(token);
        let logprobs = self
            .shaping
            .logprobs
            .map(|top| shaping::logprobs(&model.vocabulary, &logits, token, top));
        if let Some(constraint) = &mut self.shaping.constraint
            && !model.end_tokens.contains(&token)
            && let Err(err) = constraint.advance(token)
        {
            return self.fail(format!("the output grammar failed: {err}"));
        }
        if model.end_tokens.contains(&token) {
            let held = self.stop.finish();
            let reason = self.ending(FinishReason::Stop);
            return self.finish(reason, held);
        }
        self.usage.completion_tokens += 1;
        let piece = match self.text.step(token) {
            Ok(piece) => piece.unwrap_or_default(),
            Err(err) => return self.fail(format!("detokenizing failed: {err}")),
        };
        let outs = match &mut self.shaping.calls {
            Some(calls) => calls.push(&piece),
            None => vec![Out::Text(piece)],
        };
        let mut logprobs = logprobs;
        for out in outs {
            let event = match out {
                Out::Call(mut delta) => {
                    delta.logprobs = logprobs.take();
                    TokenEvent::Delta(Box::new(delta))
                }
                Out::Text(text) => {
                    let released = self.stop.push(text);
                    if released.stopped {
                        return self.finish(FinishReason::Stop, released.text);
                    }
                    match logprobs.take() {
                        Some(logprobs) => TokenEvent::Delta(Box::new(ChoiceDelta {
                            content: Some(released.text),
                            logprobs: Some(logprobs),
                            ..ChoiceDelta::default()
                        })),
                        // An empty piece still counts the token; the server sends no chunk.
                        None => TokenEvent::Token {
                            id: Some(token),
                            text: released.text,
                        },
                    }
                }
            };
            if !self.send(Ok(event)) {
                return false;
            }
        }
        // A token that completed no output still has its log probability.
        if let Some(logprobs) = logprobs
            && !self.send(Ok(TokenEvent::Delta(Box::new(ChoiceDelta {
                content: Some(String::new()),
                logprobs: Some(logprobs),
                ..ChoiceDelta::default()
            }))))
        {
            return false;
        }
        if self
            .shaping
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_done)
        {
            let held = self.stop.finish();
            let reason = self.ending(FinishReason::Stop);
            return self.finish(reason, held);
        }
        if self.usage.completion_tokens >= self.max_tokens {
            let held = self.stop.finish();
            return self.finish(FinishReason::Length, held);
        }
        self.input.clear();
        self.input.push(token);
        true
    }

    /// How an answer that ended by itself ends: `tool_calls` when it
    /// called any.
    fn ending(&self, reason: FinishReason) -> FinishReason {
        match &self.shaping.calls {
            Some(calls) if calls.calls > 0 => FinishReason::ToolCalls,
            _ => reason,
        }
    }

    /// Sends any last text and the finish; always ends the generation.
    fn finish(&mut self, reason: FinishReason, last_text: String) -> bool {
        let held = self
            .shaping
            .calls
            .as_mut()
            .map(CallReader::finish)
            .unwrap_or_default();
        for out in held {
            let event = match out {
                Out::Call(delta) => TokenEvent::Delta(Box::new(delta)),
                Out::Text(text) => TokenEvent::Token { id: None, text },
            };
            if !self.send(Ok(event)) {
                return false;
            }
        }
        if !last_text.is_empty()
            && !self.send(Ok(TokenEvent::Token {
                id: None,
                text: last_text,
            }))
        {
            return false;
        }
        self.send(Ok(TokenEvent::Finished {
            reason,
            usage: self.usage,
        }));
        false
    }

    /// Reports a failure on the stream; always ends the generation, whether
    /// or not anyone still listens.
    fn fail(&self, detail: String) -> bool {
        self.send(Err(BackendError::Internal(detail)));
        false
    }

    /// False once nobody listens: the generation then stops.
    fn send(&self, event: Result<TokenEvent, BackendError>) -> bool {
        self.events.send(event).is_ok()
    }
}
