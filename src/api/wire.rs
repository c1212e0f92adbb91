//! OpenAI request, response and chunk shapes (serde only, no logic).
//! Unknown request fields are ignored: clients send many.

use serde::{Deserialize, Serialize};

/// The body of `/v1/chat/completions` (with `messages`) and of the legacy
/// `/v1/completions` (with `prompt`): one shape, so that type errors name
/// their field the same way on both.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<RequestMessage>>,
    pub prompt: Option<PromptInput>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<StopInput>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub n: Option<u32>,
    /// Every other field (`tools`, `response_format`, `user`, and ones
    /// never heard of): relayed unchanged by the `openai` backend.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    /// `null` is allowed (an assistant turn that only called tools).
    pub content: Option<MessageContent>,
    /// `tool_calls`, `tool_call_id`, `name`, and any other field.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

// ---- responses ----

#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [TextChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice<'a> {
    pub text: &'a str,
    pub index: u32,
    pub logprobs: Option<&'a serde_json::Value>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

// ---- stream chunks ----

/// A `chat.completion.chunk`; `choices` is empty on the usage chunk.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
    /// On the opening chunk of a generation started in another dialect
    /// (Responses, Messages) only: the fixed part of that dialect's answer
    /// object, for whoever transcodes the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_skeleton: Option<&'a serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<&'a serde_json::Value>,
    pub finish_reason: Option<&'static str>,
    /// The stop sequence that ended the choice, under vLLM's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<&'a str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    /// `tool_calls`, `reasoning_content`, `refusal`…, as a backend gave them.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub fields: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// The legacy stream's chunk is a `text_completion` with text choices.
pub type TextChunk<'a> = TextCompletion<'a>;

// ---- other endpoints ----

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct CancelResult<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub cancelled: bool,
}

#[derive(Debug, Serialize)]
pub struct ErrorEnvelope<'a> {
    pub error: ErrorBody<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'a str>,
    pub code: Option<&'static str>,
}
