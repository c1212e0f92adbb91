//! The `Backend` trait every model sits behind, and the plain data it speaks.
//!
//! Nothing here knows about HTTP: the API layer turns a [`GenerateRequest`]
//! into a call and the resulting [`TokenEvent`]s into OpenAI chunks.

pub mod answer;
pub mod echo;
pub mod example;
pub mod features;
mod guard;
pub mod local;
pub mod shaping;
pub mod stop;
pub mod upstream;

pub use guard::{GuardedRun, Step};

pub use crate::types::{ChatMessage, Sampling};

use async_trait::async_trait;
pub use compact_str::CompactString;
use futures_util::stream::BoxStream;
use tokio_util::sync::CancellationToken;

/// One model that can turn a prompt into a stream of tokens.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs (`echo`, `local`, `openai`).
    fn name(&self) -> &'static str;

    /// What this backend can do beyond the basics.
    fn capabilities(&self) -> Capabilities;

    /// The models this backend serves, as clients name them.
    async fn models(&self) -> Result<Vec<ModelCard>, BackendError>;

    /// The model a request without `model` gets, decided when it is asked
    /// (an upstream's list changes); `None` while nothing is known.
    fn default_model(&self) -> Option<String>;

    /// Starts a generation. Resolves once the backend has accepted the
    /// request, so errors such as an unknown model or a prompt too long for
    /// the context can still become an HTTP status. Work that costs compute
    /// starts when the returned stream is first polled; later failures arrive
    /// on the stream. The stream ends after one `Finished` event.
    ///
    /// `cancel` fires when nobody wants the rest: the backend stops spending
    /// compute as soon as it sees it and may end with `Cancelled`.
    async fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> Result<Accepted, BackendError>;

    /// The prompt's length in this backend's tokens, as `generate` would
    /// count it, without generating.
    async fn count_tokens(&self, req: GenerateRequest) -> Result<u32, BackendError>;
}

/// What a backend hands back once it has accepted a request.
pub struct Accepted {
    /// Prompt length in the model's tokens, when known before decoding.
    pub prompt_tokens: Option<u32>,
    pub tokens: TokenStream,
}

pub type TokenStream = BoxStream<'static, Result<TokenEvent, BackendError>>;

/// One step of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// A piece of text. `id` is the model's token id when there is one; a
    /// piece may be empty when a token completes no character. Up to 24
    /// bytes (nearly every token's piece) it is held inline: a token costs
    /// no allocation of its own.
    Token {
        id: Option<u32>,
        text: CompactString,
    },
    /// A step richer than text: tool-call fragments, reasoning, log
    /// probabilities, or a choice other than the first.
    Delta(Box<ChoiceDelta>),
    /// The end, always last.
    Finished { reason: FinishReason, usage: Usage },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer, or a stop sequence matched.
    Stop,
    /// `max_tokens` (or the context) ran out.
    Length,
    /// Someone asked for it to stop.
    Cancelled,
    /// The model called tools.
    ToolCalls,
    /// An upstream's content filter cut the answer.
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
        }
    }
}

/// One choice's step beyond plain text, in OpenAI's terms: what its
/// `delta` carries besides `content`, its `logprobs`, and its own finish
/// (only for a choice other than the first; the first ends with the run).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceDelta {
    pub index: u32,
    /// Text: `delta.content` on chat streams, `text` on legacy ones.
    pub content: Option<String>,
    /// Other delta fields (`tool_calls`, `reasoning_content`, `reasoning`,
    /// `refusal`…), written as they are.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// The choice's `logprobs` object for this step.
    pub logprobs: Option<serde_json::Value>,
    pub finish: Option<FinishReason>,
    /// With `finish` `Stop`: the stop sequence that ended the choice (as
    /// vLLM reports it, the choice's `stop_reason`).
    pub stop_sequence: Option<String>,
}

impl ChoiceDelta {
    /// The end of the first choice at a stop sequence.
    pub fn stopped_at(stop: String) -> Self {
        Self {
            finish: Some(FinishReason::Stop),
            stop_sequence: Some(stop),
            ..Self::default()
        }
    }

    /// Whether this step produced anything a token would (not just a
    /// finish).
    pub fn produces(&self) -> bool {
        self.content.as_ref().is_some_and(|c| !c.is_empty()) || !self.fields.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// A request as backends see it: already validated.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// Upper bound on generated tokens; `None` leaves it to the backend.
    pub max_tokens: Option<u32>,
    /// The request field `max_tokens` came from, when the dialect refuses
    /// one beyond the room the prompt leaves (OpenAI's chat and legacy
    /// routes answer 400, as OpenAI and vLLM do). `None`: cut it down to
    /// the room (what Claude Code and Responses clients, which send large
    /// limits, expect).
    pub max_tokens_field: Option<&'static str>,
    /// Text that ends the answer; never sent to the client.
    pub stop: Vec<String>,
    /// Whether anyone reads the answer now; a backend that can pause
    /// stops computing while nobody does.
    pub demand: Demand,
    /// Request fields sluicegate does not own, for a backend that relays
    /// them (see [`Capabilities::relays_fields`]).
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Choices asked for (`n`); at most [`Capabilities::max_choices`].
    pub choices: u32,
    /// Tools, structured output and log probabilities, for a backend that
    /// serves them itself (see [`Capabilities::serves`]).
    pub features: features::Features,
    /// Whose conversation this is, for a backend that keeps computed
    /// state between requests (the local model's KV cache).
    pub cache_key: Option<CacheKey>,
}

/// Names whose computed state a request may reuse: its caller's, and
/// first of all its session's. State never crosses callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub caller: u32,
    /// `X-Session-Id`, when the request has one.
    pub session: Option<String>,
}

/// Whether anyone reads a generation right now. The session pauses and
/// resumes it as readers leave and return; a backend that can stop
/// computing (the local model) watches it, others may ignore it.
#[derive(Clone, Default)]
pub struct Demand(std::sync::Arc<DemandState>);

#[derive(Default)]
struct DemandState {
    paused: std::sync::atomic::AtomicBool,
    /// How the backend wants to hear of a change (the decode thread sleeps
    /// while everything it has is paused).
    wake: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Demand {
    pub fn is_paused(&self) -> bool {
        self.0.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Pauses (`true`) or resumes; tells the backend when that changes.
    pub fn set_paused(&self, paused: bool) {
        if self
            .0
            .paused
            .swap(paused, std::sync::atomic::Ordering::AcqRel)
            != paused
        {
            self.wake();
        }
    }

    /// Tells the backend to look again (say, at a cancellation).
    pub fn wake(&self) {
        if let Some(wake) = self.0.wake.get() {
            wake();
        }
    }

    /// Set once by the backend that watches.
    pub fn on_change(&self, wake: impl Fn() + Send + Sync + 'static) {
        // One watcher per generation; a second is ignored.
        let _ = self.0.wake.set(Box::new(wake));
    }
}

impl std::fmt::Debug for Demand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demand")
            .field("paused", &self.is_paused())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub enum Prompt {
    /// A chat conversation, for `/v1/chat/completions`.
    Chat(Vec<ChatMessage>),
    /// Raw text, for the legacy `/v1/completions`.
    Text(String),
}

impl Default for Prompt {
    fn default() -> Self {
        Self::Chat(Vec::new())
    }
}

/// Optional features, so that the API layer can refuse what a backend lacks
/// with a clear 400 instead of the backend failing later.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Largest `n` (choices per request) the backend produces.
    pub max_choices: u32,
    /// Generations worth running at once when `--max-concurrent` is unset.
    pub default_concurrency: usize,
    /// Passes request fields it does not own on to another server; a
    /// backend that does not is refused what it cannot serve.
    pub relays_fields: bool,
    /// The OpenAI fields of [`features::FIELDS`] it serves itself; asking
    /// another of a backend that does not relay is a 400.
    pub serves: &'static [&'static str],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    pub id: String,
    pub owned_by: String,
    /// Context window in tokens, when the backend knows it.
    pub context_length: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error(
        "this model's maximum context length is {limit} tokens, but the prompt has {prompt} tokens"
    )]
    ContextLength { prompt: u32, limit: u32 },
    #[error(
        "`{field}` is too large: {requested}. This model's maximum context length is {limit} tokens and the prompt has {prompt}, which leaves room for {room} (send at most {room}, or none)"
    )]
    MaxTokens {
        field: &'static str,
        requested: u32,
        prompt: u32,
        limit: u32,
        room: u32,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the backend is unavailable: {0}")]
    Unavailable(String),
    #[error("backend failure: {0}")]
    Internal(String),
    /// An upstream reported a failure in its own words after its answer
    /// had begun; credentials are already removed.
    #[error("{0}")]
    UpstreamReported(String),
    /// An upstream server refused the request (4xx): the client gets the
    /// same status.
    #[error("{message}")]
    Upstream {
        status: u16,
        message: String,
        retry_after: Option<String>,
    },
}
