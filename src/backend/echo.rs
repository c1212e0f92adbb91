//! The deterministic `echo` backend: streams the last user message back one
//! word per token. For tests, benches and frontend work without a model.
//!
//! It also exercises the OpenAI surface without a model, deterministically:
//! - `tools`: with `tool_choice` `required` or a named function it calls
//!   (the named one, else every tool whose name the user's message
//!   mentions, else the first); with `auto` it calls only the tools the
//!   message mentions, else it answers text. Arguments are the JSON object
//!   in the user's message if there is one, else an instance of the
//!   function's `parameters` schema whose strings are the message. After a
//!   `tool` message it echoes that result as text.
//! - `response_format`: `json_object` answers `{"echo": <message>}`;
//!   `json_schema` an instance of the schema (see [`super::example`]).
//! - `logprobs`: every token has log probability 0.

use std::time::Duration;

use async_stream::stream;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use serde_json::{Value, json};

use super::example;
use super::features::{Features, ResponseFormat, TOOLS, ToolChoice};
use super::stop::StopMatcher;
use super::{
    Accepted, Backend, BackendError, Capabilities, ChoiceDelta, FinishReason, GenerateRequest,
    ModelCard, Prompt, TokenEvent, Usage,
};

/// What echo serves itself: tools, structured output, log probabilities.
const ECHO_SERVES: &[&str] = &[
    TOOLS[0],
    TOOLS[1],
    TOOLS[2],
    TOOLS[3],
    TOOLS[4],
    "response_format",
    "logprobs",
    "top_logprobs",
];

/// Characters of JSON per echo token.
const JSON_PIECE: usize = 8;

pub struct EchoBackend {
    model: String,
    token_delay: Duration,
}

impl EchoBackend {
    pub const DEFAULT_MODEL: &'static str = "echo";

    pub fn new(model: impl Into<String>, token_delay: Duration) -> Self {
        Self {
            model: model.into(),
            token_delay,
        }
    }
}

/// The text echo answers from: the last user message, or the raw prompt.
fn user_text(prompt: &Prompt) -> &str {
    match prompt {
        Prompt::Chat(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str()),
        Prompt::Text(text) => text.as_str(),
    }
}

/// The words echo answers with.
fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// One token of echo's answer.
enum Piece {
    Text(String),
    Call(Value),
}

/// Echo's answer as tokens, and how it ends.
fn answer(req: &GenerateRequest) -> (Vec<Piece>, FinishReason) {
    let text = user_text(&req.prompt);
    let features = &req.features;
    let after_tool = match &req.prompt {
        Prompt::Chat(messages) => messages.last().filter(|m| m.role == "tool"),
        Prompt::Text(_) => None,
    };
    if let Some(result) = after_tool {
        let pieces = words(&result.content).into_iter().map(Piece::Text);
        return (pieces.collect(), FinishReason::Stop);
    }
    let calls = tool_calls(features, text);
    if !calls.is_empty() {
        return (calls, FinishReason::ToolCalls);
    }
    let json = match &features.response_format {
        ResponseFormat::Text => {
            return (
                words(text).into_iter().map(Piece::Text).collect(),
                FinishReason::Stop,
            );
        }
        ResponseFormat::JsonObject => json!({"echo": text}),
        ResponseFormat::JsonSchema { schema, .. } => example::instance(schema, text),
    };
    let pieces = split(&json.to_string()).into_iter().map(Piece::Text);
    (pieces.collect(), FinishReason::Stop)
}

/// The calls echo makes, as `tool_calls` fragments: the first of each call
/// names it, the others carry its arguments a few characters at a time.
fn tool_calls(features: &Features, text: &str) -> Vec<Piece> {
    let callable = features.callable();
    let mentioned: Vec<_> = callable
        .iter()
        .filter(|t| text.contains(t.name.as_str()))
        .copied()
        .collect();
    let mut chosen = match (&features.tool_choice, mentioned.is_empty()) {
        (ToolChoice::None, _) | (ToolChoice::Auto, true) => return Vec::new(),
        (_, false) => mentioned,
        (_, true) => callable.into_iter().take(1).collect(),
    };
    if features.parallel_tool_calls == Some(false) {
        chosen.truncate(1);
    }
    let given = text
        .find('{')
        .and_then(|at| serde_json::from_str::<Value>(text[at..].trim_end()).ok())
        .filter(Value::is_object);
    let mut pieces = Vec::new();
    for (index, tool) in chosen.into_iter().enumerate() {
        let arguments = given
            .clone()
            .unwrap_or_else(|| example::instance(&tool.parameters, text))
            .to_string();
        pieces.push(Piece::Call(json!([{
            "index": index,
            "id": format!("call_echo_{index}"),
            "type": "function",
            "function": {"name": tool.name, "arguments": ""},
        }])));
        for part in split(&arguments) {
            pieces.push(Piece::Call(
                json!([{"index": index, "function": {"arguments": part}}]),
            ));
        }
    }
    pieces
}

/// `text` in pieces of a few characters.
fn split(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(JSON_PIECE)
        .map(|c| c.iter().collect())
        .collect()
}

/// A token's `logprobs` entry: certain, with itself as the only
/// alternative when alternatives are asked for.
fn certain(token: &str, top: u8) -> Value {
    let bytes: Vec<u8> = token.as_bytes().to_vec();
    let alternatives = if top > 0 {
        json!([{"token": token, "logprob": 0.0, "bytes": bytes}])
    } else {
        json!([])
    };
    json!({"content": [{"token": token, "logprob": 0.0, "bytes": bytes, "top_logprobs": alternatives}]})
}

/// Echo's idea of a token: a whitespace-separated word.
fn prompt_tokens(prompt: &Prompt) -> u32 {
    let words = match prompt {
        Prompt::Chat(messages) => messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum(),
        Prompt::Text(text) => text.split_whitespace().count(),
    };
    u32::try_from(words).unwrap_or(u32::MAX)
}

#[async_trait]
impl Backend for EchoBackend {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_choices: 1,
            // Echo costs next to nothing; the queue limit is what bounds it.
            default_concurrency: 1024,
            relays_fields: false,
            serves: ECHO_SERVES,
        }
    }

    fn default_model(&self) -> Option<String> {
        Some(self.model.clone())
    }

    async fn models(&self) -> Result<Vec<ModelCard>, BackendError> {
        Ok(vec![ModelCard {
            id: self.model.clone(),
            owned_by: "sluicegate".into(),
            context_length: None,
        }])
    }

    async fn count_tokens(&self, req: GenerateRequest) -> Result<u32, BackendError> {
        if req.model != self.model {
            return Err(BackendError::ModelNotFound(req.model));
        }
        Ok(prompt_tokens(&req.prompt))
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> Result<Accepted, BackendError> {
        if req.model != self.model {
            return Err(BackendError::ModelNotFound(req.model));
        }
        let (pieces, ending) = answer(&req);
        let logprobs = req.features.logprobs;
        let prompt_tokens = prompt_tokens(&req.prompt);
        let max_tokens = req.max_tokens.map_or(usize::MAX, |n| n as usize);
        let delay = self.token_delay;
        let mut stop = StopMatcher::new(req.stop);
        let tokens = stream! {
            let mut usage = Usage { prompt_tokens, completion_tokens: 0 };
            for (i, piece) in pieces.into_iter().enumerate() {
                if i == max_tokens {
                    let held = stop.finish();
                    if !held.is_empty() {
                        yield Ok(TokenEvent::Token { id: None, text: held.into() });
                    }
                    yield Ok(TokenEvent::Finished { reason: FinishReason::Length, usage });
                    return;
                }
                let cancelled = if delay.is_zero() {
                    cancel.is_cancelled()
                } else {
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => true,
                        () = tokio::time::sleep(delay) => false,
                    }
                };
                if cancelled {
                    yield Ok(TokenEvent::Finished { reason: FinishReason::Cancelled, usage });
                    return;
                }
                usage.completion_tokens += 1;
                let word = match piece {
                    Piece::Call(fragment) => {
                        let fields = serde_json::Map::from_iter([("tool_calls".to_owned(), fragment)]);
                        yield Ok(TokenEvent::Delta(Box::new(ChoiceDelta { fields, ..ChoiceDelta::default() })));
                        continue;
                    }
                    Piece::Text(word) => word,
                };
                let logprobs = logprobs.map(|top| certain(&word, top));
                let released = stop.push(word);
                yield Ok(match logprobs {
                    Some(logprobs) => TokenEvent::Delta(Box::new(ChoiceDelta {
                        content: Some(released.text),
                        logprobs: Some(logprobs),
                        ..ChoiceDelta::default()
                    })),
                    None => TokenEvent::Token { id: None, text: released.text.into() },
                });
                if let Some(stop) = released.stopped {
                    yield Ok(TokenEvent::Delta(Box::new(ChoiceDelta::stopped_at(stop))));
                    yield Ok(TokenEvent::Finished { reason: FinishReason::Stop, usage });
                    return;
                }
            }
            let held = stop.finish();
            if !held.is_empty() {
                yield Ok(TokenEvent::Token { id: None, text: held.into() });
            }
            yield Ok(TokenEvent::Finished { reason: ending, usage });
        };
        Ok(Accepted {
            prompt_tokens: Some(prompt_tokens),
            tokens: Box::pin(tokens),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ChatMessage;
    use futures_util::StreamExt;

    fn chat(text: &str) -> GenerateRequest {
        GenerateRequest {
            model: "echo".into(),
            prompt: Prompt::Chat(vec![
                ChatMessage::new("user", "first question"),
                ChatMessage::new("assistant", "an answer"),
                ChatMessage::new("user", text),
            ]),
            ..GenerateRequest::default()
        }
    }

    async fn run(req: GenerateRequest, cancel: CancellationToken) -> Vec<TokenEvent> {
        let backend = EchoBackend::new("echo", Duration::ZERO);
        let accepted = backend.generate(req, cancel).await.expect("accepted");
        accepted
            .tokens
            .map(|e| e.expect("no error"))
            .collect()
            .await
    }

    fn text_of(events: &[TokenEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                TokenEvent::Token { text, .. } => Some(text.as_str()),
                TokenEvent::Delta(delta) => delta.content.as_deref(),
                TokenEvent::Finished { .. } => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn echoes_the_last_user_message_word_by_word() {
        let events = run(chat("hello   big\nworld"), CancellationToken::new()).await;
        assert_eq!(text_of(&events), "hello big world");
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[3],
            TokenEvent::Finished {
                reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 7,
                    completion_tokens: 3
                }
            }
        );
    }

    fn with_features(text: &str, extra: Value) -> GenerateRequest {
        let features = Features::parse(extra.as_object().expect("object")).expect("valid");
        GenerateRequest {
            features,
            ..chat(text)
        }
    }

    fn calls_of(events: &[TokenEvent]) -> crate::backend::answer::Answer {
        let mut answer = crate::backend::answer::Answer::new(1);
        for event in events {
            match event {
                TokenEvent::Delta(delta) => answer.delta(delta),
                TokenEvent::Token { text, .. } => answer.text(text),
                TokenEvent::Finished { reason, .. } => answer.finish(*reason),
            }
        }
        answer
    }

    #[tokio::test]
    async fn tools_are_called_with_arguments_from_their_schema_or_the_message() {
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters":
                {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}},
        ]);
        let events = run(
            with_features("Paris", json!({"tools": tools, "tool_choice": "required"})),
            CancellationToken::new(),
        )
        .await;
        let answer = calls_of(&events);
        let message = answer.choices[0].message();
        assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(answer.choices[0].finish_reason(), "tool_calls");

        let events = run(
            with_features(
                r#"get_time and get_weather {"city": "Oslo"}"#,
                json!({"tools": tools}),
            ),
            CancellationToken::new(),
        )
        .await;
        let calls = calls_of(&events).choices[0].message()["tool_calls"].clone();
        assert_eq!(calls.as_array().map(Vec::len), Some(2), "{calls}");
        assert_eq!(calls[1]["function"]["arguments"], r#"{"city":"Oslo"}"#);

        let events = run(
            with_features("hello", json!({"tools": tools})),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(
            text_of(&events),
            "hello",
            "auto without a mention answers text"
        );
    }

    #[tokio::test]
    async fn json_formats_answer_json() {
        let events = run(
            with_features(
                "hi there",
                json!({"response_format": {"type": "json_object"}}),
            ),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(text_of(&events), r#"{"echo":"hi there"}"#);
        let schema =
            json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}});
        let events = run(
            with_features(
                "x",
                json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "n", "schema": schema}}}),
            ),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(text_of(&events), r#"{"n":3}"#);
    }

    #[tokio::test]
    async fn max_tokens_ends_with_length_only_when_words_remain() {
        let mut req = chat("a b c");
        req.max_tokens = Some(2);
        let events = run(req.clone(), CancellationToken::new()).await;
        assert_eq!(text_of(&events), "a b");
        assert!(matches!(
            events.last(),
            Some(TokenEvent::Finished {
                reason: FinishReason::Length,
                ..
            })
        ));
        req.max_tokens = Some(3);
        let events = run(req, CancellationToken::new()).await;
        assert!(matches!(
            events.last(),
            Some(TokenEvent::Finished {
                reason: FinishReason::Stop,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_stop_sequence_ends_the_echo_before_it() {
        let mut req = chat("one two three four");
        req.stop = vec!["thr".into()];
        let events = run(req, CancellationToken::new()).await;
        assert_eq!(text_of(&events), "one two ");
        assert!(matches!(
            events.last(),
            Some(TokenEvent::Finished {
                reason: FinishReason::Stop,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn unknown_model_is_refused_before_streaming() {
        let backend = EchoBackend::new("echo", Duration::ZERO);
        let req = GenerateRequest {
            model: "gpt-5".into(),
            ..chat("x")
        };
        let err = backend.generate(req, CancellationToken::new()).await;
        assert!(matches!(err, Err(BackendError::ModelNotFound(m)) if m == "gpt-5"));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_interrupts_the_token_delay() {
        let backend = EchoBackend::new("echo", Duration::from_secs(2));
        let cancel = CancellationToken::new();
        let accepted = backend
            .generate(chat("one two three"), cancel.clone())
            .await
            .expect("accepted");
        let mut tokens = accepted.tokens;
        let first = tokens.next().await;
        assert!(matches!(first, Some(Ok(TokenEvent::Token { .. }))));
        let started = tokio::time::Instant::now();
        cancel.cancel();
        let last = tokens.next().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(matches!(
            last,
            Some(Ok(TokenEvent::Finished {
                reason: FinishReason::Cancelled,
                usage: Usage {
                    completion_tokens: 1,
                    ..
                }
            }))
        ));
    }
}
