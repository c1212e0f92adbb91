//! The `local` backend: a GGUF model on this machine's CPU. Decoding runs on
//! one dedicated thread that batches every running generation into one
//! forward pass per step (each with its own KV cache over the shared
//! weights; see `scheduler`) and checks for cancellation at every step; the
//! async runtime never waits on compute.

mod prefix;
mod running;
mod scheduler;

use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use async_stream::stream;
use async_trait::async_trait;
use tokio::sync::mpsc as tokio_mpsc;
use tokio_util::sync::CancellationToken;

use super::features::{FIELDS, Features};
use super::shaping::{self, CallReader};
use super::{
    Accepted, Backend, BackendError, CacheKey, Capabilities, Demand, GenerateRequest, ModelCard,
    Prompt, Sampling, TokenEvent,
};
use crate::model::Model;
use crate::model::constrain::Constraint;
use crate::model::template::{Piece, TemplateError};
use crate::model::tokenizer;
use scheduler::Stats;

/// Most choices (`n`) one request may ask for: each costs a stream's
/// compute and KV cache beyond the prompt's shared blocks.
pub const MAX_CHOICES: u32 = 16;

/// Run slots by default: generations the backend takes at once. It admits
/// them into the batch as the KV-cache budget allows; more wait in the
/// server's queue.
const DEFAULT_CONCURRENCY: usize = 32;

/// How the decode thread spends memory and compute.
#[derive(Debug, Clone, Copy)]
pub struct LocalSettings {
    /// Bytes of KV cache the running generations may hold together; a
    /// generation starts while its prompt fits, and the newest gives its
    /// cache back (to compute it again later) when answers outgrow it.
    pub kv_cache_memory: usize,
    /// Bytes of KV cache kept after generations end, for the next turn of
    /// their conversation (and prompts that share a prefix) to reuse.
    pub prompt_cache_memory: usize,
    /// Tokens per forward pass: every decoding generation's next token,
    /// then prompt chunks up to this many.
    pub step_tokens: usize,
    /// Most tokens a decoding generation drafts per step by prompt lookup
    /// (verified in the same pass); 0: none.
    pub prompt_lookup: usize,
}

/// `--prompt-lookup`'s default.
pub const PROMPT_LOOKUP: usize = 0;

impl Default for LocalSettings {
    fn default() -> Self {
        Self {
            kv_cache_memory: 2 << 30,
            prompt_cache_memory: 256 << 20,
            step_tokens: 256,
            prompt_lookup: PROMPT_LOOKUP,
        }
    }
}

pub struct LocalBackend {
    model: Arc<Model>,
    name: String,
    jobs: mpsc::Sender<Msg>,
    stats: Arc<Stats>,
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
    /// Whose cache it may reuse, and under which name its own is kept.
    cache_key: Option<CacheKey>,
    prompt: Vec<u32>,
    sampling: Sampling,
    max_tokens: u32,
    stop: Vec<String>,
    cancel: CancellationToken,
    events: EventSender,
    /// Paused while nobody reads: not stepped, its KV cache kept.
    demand: Demand,
    shaping: Shaping,
    /// Choices asked for (`n`): they share the prompt's computation.
    choices: u32,
}

impl Job {
    /// Choice `index` of the same request: its own seed (the request's
    /// plus its index, so that choice `i` of a seeded request answers as
    /// the request with seed + `i` does), grammar state and tool calls.
    fn choice(&self, index: u32) -> Job {
        let mut sampling = self.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(u64::from(index)));
        Job {
            cache_key: None,
            prompt: self.prompt.clone(),
            sampling,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            cancel: self.cancel.clone(),
            events: self.events.clone(),
            demand: self.demand.clone(),
            shaping: Shaping {
                constraint: self.shaping.constraint.clone(),
                calls: self.shaping.calls.as_ref().map(|_| CallReader::fresh()),
                logprobs: self.shaping.logprobs,
                bias: self.shaping.bias.clone(),
            },
            choices: 1,
        }
    }
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
    pub fn start(
        model: Model,
        name: Option<String>,
        settings: LocalSettings,
    ) -> std::io::Result<Self> {
        let model = Arc::new(model);
        let name = name.unwrap_or_else(|| model.name.clone());
        let (jobs, queue) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let (worker, counts, label) = (Arc::clone(&model), Arc::clone(&stats), name.clone());
        // The loop runs on a thread of its own compute pool, so that each
        // parallel product runs on it with the pool's other threads
        // stealing parts, instead of a caller outside the pool sleeping
        // and waking once per product (perf showed a quarter of decode
        // time in those context switches).
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("sluicegate-compute-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        std::thread::Builder::new()
            .name("sluicegate-decode".into())
            .spawn(move || {
                pool.install(move || scheduler::run(&worker, &label, settings, &queue, &counts));
            })?;
        Ok(Self {
            name,
            model,
            jobs,
            stats,
        })
    }

    /// Forward passes run so far, over all generations.
    pub fn decode_steps(&self) -> u64 {
        self.stats.steps.load(Ordering::Relaxed)
    }

    /// Generations the decode thread holds: running, paused or waiting
    /// for KV-cache memory.
    pub fn generations(&self) -> usize {
        self.stats.held.load(Ordering::Relaxed)
    }

    /// Caches dropped to make room so far (each computed again later).
    pub fn evictions(&self) -> u64 {
        self.stats.evictions.load(Ordering::Relaxed)
    }

    /// Tokens drafted by prompt lookup so far, and those of them kept.
    pub fn drafts(&self) -> (u64, u64) {
        (
            self.stats.drafted.load(Ordering::Relaxed),
            self.stats.accepted.load(Ordering::Relaxed),
        )
    }

    /// Prompt positions computed so far, and those reused from kept caches.
    pub fn prompt_tokens(&self) -> (u64, u64) {
        (
            self.stats.computed.load(Ordering::Relaxed),
            self.stats.reused.load(Ordering::Relaxed),
        )
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
            max_choices: MAX_CHOICES,
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

    async fn count_tokens(&self, req: GenerateRequest) -> Result<u32, BackendError> {
        if req.model != self.name {
            return Err(BackendError::ModelNotFound(req.model));
        }
        let model = Arc::clone(&self.model);
        // Tokenizing a long prompt takes a while: not on the runtime.
        let prompt =
            tokio::task::spawn_blocking(move || tokenize(&model, &req.prompt, &req.features))
                .await
                .map_err(|e| BackendError::Internal(e.to_string()))??;
        Ok(u32::try_from(prompt.len()).unwrap_or(u32::MAX))
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
                calls: features.calls_tools().then(CallReader::fresh),
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
        if let (Some(requested), Some(field)) = (req.max_tokens, req.max_tokens_field)
            && requested > room
        {
            return Err(BackendError::MaxTokens {
                field,
                requested,
                prompt: prompt_tokens,
                limit: context,
                room,
            });
        }
        let max_tokens = req.max_tokens.map_or(room, |n| n.min(room));
        let (events, mut received) = tokio_mpsc::unbounded_channel();
        let waker = self.jobs.clone();
        req.demand.on_change(move || {
            // The thread gone means nothing runs to wake.
            let _ = waker.send(Msg::Wake);
        });
        let job = Job {
            cache_key: req.cache_key,
            prompt,
            sampling: req.sampling,
            max_tokens,
            stop: req.stop,
            cancel,
            events,
            demand: req.demand,
            shaping,
            choices: req.choices.max(1),
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
