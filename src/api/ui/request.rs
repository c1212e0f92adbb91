//! The body `useChat`'s `DefaultChatTransport` posts (`id`, `messages` with
//! `parts`, `trigger`, `messageId`, and the app's `body` extras at the top
//! level), turned into the OpenAI request the chat route validates, so
//! both routes accept and refuse the same things.

use serde::Deserialize;

use crate::api::ApiError;
use crate::api::wire::{CompletionRequest, MessageContent, RequestMessage, StopInput};

/// `POST /v1/ui/chat`. `trigger` and `messageId` are read by no one: both
/// triggers (`submit-message`, `regenerate-message`) generate the answer
/// to the messages sent, and the answer's message id is its completion id
/// (see `ui::chat`). Sampling extras take OpenAI's names or the AI SDK's.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct UiChatRequest {
    /// The chat id: the session.
    pub(crate) id: Option<String>,
    pub(crate) messages: Option<Vec<UiMessage>>,
    pub(crate) model: Option<String>,
    /// A system message put before the conversation.
    pub(crate) system: Option<String>,
    #[serde(alias = "maxOutputTokens", alias = "max_completion_tokens")]
    pub(crate) max_tokens: Option<u32>,
    pub(crate) temperature: Option<f32>,
    #[serde(alias = "topP")]
    pub(crate) top_p: Option<f32>,
    #[serde(alias = "topK")]
    pub(crate) top_k: Option<u32>,
    pub(crate) seed: Option<i64>,
    #[serde(alias = "stopSequences")]
    pub(crate) stop: Option<StopInput>,
    #[serde(alias = "presencePenalty")]
    pub(crate) presence_penalty: Option<f32>,
    #[serde(alias = "frequencyPenalty")]
    pub(crate) frequency_penalty: Option<f32>,
    #[serde(alias = "repetitionPenalty")]
    pub(crate) repetition_penalty: Option<f32>,
}

/// A UI message: its text is in `parts`.
#[derive(Debug, Deserialize)]
pub(crate) struct UiMessage {
    pub(crate) role: String,
    #[serde(default)]
    pub(crate) parts: Vec<UiPart>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct UiPart {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) text: Option<String>,
}

/// Parts that describe how a message was shown or produced, not what it
/// said: the AI SDK's own conversion to model messages drops them too.
fn is_presentation(kind: &str) -> bool {
    matches!(
        kind,
        "step-start" | "reasoning" | "source-url" | "source-document"
    ) || kind.starts_with("data-")
}

/// The chat id and the streamed OpenAI chat request of a `useChat` body.
pub(crate) fn to_completion(body: UiChatRequest) -> Result<(String, CompletionRequest), ApiError> {
    let chat_id = body
        .id
        .filter(|id| (1..=256).contains(&id.len()) && !id.chars().any(char::is_control))
        .ok_or_else(|| {
            ApiError::invalid(
                "`id` (the chat id) is required: 1 to 256 characters.",
                Some("id".to_owned()),
            )
        })?;
    let ui_messages = body.messages.ok_or_else(|| {
        ApiError::invalid(
            "`messages` is required: the chat's UI messages, each with `role` and `parts`.",
            Some("messages".to_owned()),
        )
    })?;
    let mut messages = Vec::with_capacity(ui_messages.len() + 1);
    if let Some(system) = body.system {
        messages.push(text_message("system", system));
    }
    for (i, message) in ui_messages.into_iter().enumerate() {
        let mut text = String::new();
        for (j, part) in message.parts.into_iter().enumerate() {
            match (part.kind.as_str(), part.text) {
                ("text", Some(piece)) => text.push_str(&piece),
                (kind, _) if is_presentation(kind) => {}
                (kind, _) => {
                    return Err(ApiError::invalid(
                        format!(
                            "`messages[{i}].parts[{j}]` is a `{kind}` part; only text parts are supported."
                        ),
                        Some(format!("messages[{i}].parts[{j}]")),
                    ));
                }
            }
        }
        messages.push(text_message(&message.role, text));
    }
    let request = CompletionRequest {
        model: body.model,
        messages: Some(messages),
        stream: Some(true),
        max_tokens: body.max_tokens,
        temperature: body.temperature,
        top_p: body.top_p,
        top_k: body.top_k,
        seed: body.seed,
        stop: body.stop,
        presence_penalty: body.presence_penalty,
        frequency_penalty: body.frequency_penalty,
        repetition_penalty: body.repetition_penalty,
        ..CompletionRequest::default()
    };
    Ok((chat_id, request))
}

fn text_message(role: &str, text: String) -> RequestMessage {
    RequestMessage {
        role: role.to_owned(),
        content: Some(MessageContent::Text(text)),
        extra: serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse;

    fn convert(json: &str) -> Result<(String, CompletionRequest), ApiError> {
        to_completion(parse(json.as_bytes())?)
    }

    fn param(json: &str) -> Option<String> {
        match convert(json) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_use_chat_body_becomes_a_streamed_chat_request() {
        let (chat, req) = convert(
            r#"{"id":"chat-1","trigger":"submit-message","messageId":null,
                "messages":[
                  {"id":"u1","role":"user","parts":[{"type":"text","text":"hello "},{"type":"text","text":"there"}]},
                  {"id":"a1","role":"assistant","parts":[{"type":"step-start"},{"type":"reasoning","text":"hm"},{"type":"text","text":"hi"}]},
                  {"id":"u2","role":"user","parts":[{"type":"data-note","data":{}},{"type":"text","text":"again"}]}],
                "model":"echo","system":"Be brief.","temperature":0,"topP":0.5,"maxOutputTokens":7,"stopSequences":["x"]}"#,
        )
        .expect("valid");
        assert_eq!(chat, "chat-1");
        assert_eq!(req.stream, Some(true));
        assert_eq!(req.model.as_deref(), Some("echo"));
        assert_eq!((req.temperature, req.top_p), (Some(0.0), Some(0.5)));
        assert_eq!(req.max_tokens, Some(7));
        assert!(matches!(req.stop, Some(StopInput::Many(ref s)) if s == &["x"]));
        let messages: Vec<(String, String)> = req
            .messages
            .expect("messages")
            .into_iter()
            .map(|m| match m.content {
                Some(MessageContent::Text(t)) => (m.role, t),
                other => panic!("text content, got {other:?}"),
            })
            .collect();
        let expected = [
            ("system", "Be brief."),
            ("user", "hello there"),
            ("assistant", "hi"),
            ("user", "again"),
        ];
        assert_eq!(messages.len(), expected.len());
        for ((role, text), (r, t)) in messages.iter().zip(expected) {
            assert_eq!((role.as_str(), text.as_str()), (r, t));
        }
    }

    #[test]
    fn what_cannot_be_served_names_its_field() {
        assert_eq!(
            param(r#"{"messages":[{"role":"user","parts":[]}]}"#).as_deref(),
            Some("id")
        );
        assert_eq!(param(r#"{"id":"","messages":[]}"#).as_deref(), Some("id"));
        assert_eq!(param(r#"{"id":"c"}"#).as_deref(), Some("messages"));
        assert_eq!(
            param(
                r#"{"id":"c","messages":[{"role":"user","parts":[{"type":"text","text":"a"},{"type":"file","url":"x","mediaType":"image/png"}]}]}"#
            )
            .as_deref(),
            Some("messages[0].parts[1]")
        );
        assert_eq!(
            param(r#"{"id":"c","messages":[{"role":"user","parts":[{"type":"text","text":1}]}]}"#)
                .as_deref(),
            Some("messages[0].parts[0].text")
        );
    }
}
