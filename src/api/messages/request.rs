//! An Anthropic Messages request, checked and turned into the chat
//! completion every backend serves: `system` and the turns become
//! messages, `tool_use` blocks tool calls, `tool_result` blocks tool
//! messages, tools and `tool_choice` their chat spellings. What a request
//! may not carry is refused naming its path (`messages[1].content[0]`).

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::error::ApiError;
use crate::api::wire::{
    CompletionRequest, MessageContent, RequestMessage, StopInput, StreamOptions,
};

/// The fields sluicegate reads; the rest (`metadata`, `thinking`,
/// `cache_control`, `service_tier`, unknown ones) are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct MessagesRequest {
    pub(crate) model: Option<String>,
    pub(crate) max_tokens: Option<u32>,
    pub(crate) messages: Option<Vec<Value>>,
    pub(crate) system: Option<Value>,
    pub(crate) stop_sequences: Option<Vec<String>>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_k: Option<u32>,
    pub(crate) tools: Option<Vec<Value>>,
    pub(crate) tool_choice: Option<Value>,
    pub(crate) stream: Option<bool>,
}

fn invalid(message: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::invalid(message, Some(param.into()))
}

fn message(role: &str, text: String, extra: Map<String, Value>) -> RequestMessage {
    RequestMessage {
        role: role.to_owned(),
        content: Some(MessageContent::Text(text)),
        extra,
    }
}

/// `system`: a string or text blocks.
fn system_text(system: &Value) -> Result<String, ApiError> {
    match system {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(i, b)| match (b["type"].as_str(), b["text"].as_str()) {
                (Some("text"), Some(text)) => Ok(text),
                _ => Err(invalid(
                    format!("`system[{i}]` must be a text block."),
                    format!("system[{i}]"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.join("\n")),
        _ => Err(invalid(
            "`system` must be a string or text blocks.",
            "system",
        )),
    }
}

/// A `tool_result`'s content: absent, a string, or blocks of text.
fn result_text(content: &Value, path: &str) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, block) in blocks.iter().enumerate() {
                match (block["type"].as_str(), block["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(invalid(
                            format!(
                                "`{path}[{j}]` is a `{}` block: this model takes text only.",
                                kind.unwrap_or("untyped")
                            ),
                            format!("{path}[{j}]"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(invalid(
            format!("`{path}` must be a string or blocks."),
            path.to_owned(),
        )),
    }
}

/// The turns as chat messages, in order.
pub(crate) fn messages(request: &MessagesRequest) -> Result<Vec<RequestMessage>, ApiError> {
    let turns = request.messages.as_ref().ok_or_else(|| {
        invalid(
            "`messages` is required: an array of {\"role\", \"content\"} turns.",
            "messages",
        )
    })?;
    if turns.is_empty() {
        return Err(invalid(
            "`messages` must contain at least one turn.",
            "messages",
        ));
    }
    let mut out = Vec::new();
    if let Some(system) = &request.system {
        let text = system_text(system)?;
        if !text.is_empty() {
            out.push(message("system", text, Map::new()));
        }
    }
    for (i, turn) in turns.iter().enumerate() {
        let role = turn["role"].as_str().unwrap_or_default();
        if !["user", "assistant", "system"].contains(&role) {
            return Err(invalid(
                format!("`messages[{i}].role` must be `user` or `assistant`, got `{role}`."),
                format!("messages[{i}].role"),
            ));
        }
        let blocks = match &turn["content"] {
            Value::String(text) => {
                out.push(message(role, text.clone(), Map::new()));
                continue;
            }
            Value::Array(blocks) => blocks,
            _ => {
                return Err(invalid(
                    format!("`messages[{i}].content` must be a string or content blocks."),
                    format!("messages[{i}].content"),
                ));
            }
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        for (j, block) in blocks.iter().enumerate() {
            let path = format!("messages[{i}].content[{j}]");
            match block["type"].as_str() {
                Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
                // The model's own reasoning is not read back.
                Some("thinking" | "redacted_thinking") => {}
                Some("tool_use") if role == "assistant" => {
                    let (Some(id), Some(name)) = (block["id"].as_str(), block["name"].as_str())
                    else {
                        return Err(invalid(format!("`{path}` needs `id` and `name`."), path));
                    };
                    let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(json!({
                        "id": id,
                        "type": "function",
                        "function": {"name": name, "arguments": input.to_string()},
                    }));
                }
                Some("tool_result") if role == "user" => {
                    let id = block["tool_use_id"].as_str().ok_or_else(|| {
                        invalid(
                            format!("`{path}.tool_use_id` is required."),
                            format!("{path}.tool_use_id"),
                        )
                    })?;
                    let mut content = result_text(&block["content"], &format!("{path}.content"))?;
                    if block["is_error"] == true {
                        content = format!("Error: {content}");
                    }
                    let mut extra = Map::new();
                    extra.insert("tool_call_id".into(), Value::String(id.to_owned()));
                    results.push(message("tool", content, extra));
                }
                kind => {
                    return Err(invalid(
                        format!(
                            "`{path}` is a `{}` block, which this server cannot serve in a `{role}` turn: it takes text, tool_use, tool_result and thinking blocks.",
                            kind.unwrap_or("untyped")
                        ),
                        path,
                    ));
                }
            }
        }
        // Results answer the previous turn's calls: they come first.
        out.extend(results);
        if !calls.is_empty() {
            let mut extra = Map::new();
            extra.insert("tool_calls".into(), Value::Array(calls));
            out.push(message("assistant", text, extra));
        } else if !text.is_empty() || blocks.is_empty() {
            out.push(message(role, text, Map::new()));
        }
    }
    Ok(out)
}

/// Custom tools in their chat spelling; Anthropic's own tool types
/// (`bash_…`, `web_search_…`, …) are dropped: no backend here runs them.
fn tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        match tool["type"].as_str() {
            None | Some("custom") => {}
            Some(_) => continue,
        }
        let name = tool["name"].as_str().ok_or_else(|| {
            invalid(
                format!("`tools[{i}].name` is required."),
                format!("tools[{i}].name"),
            )
        })?;
        let mut function = Map::new();
        function.insert("name".into(), Value::String(name.to_owned()));
        if let Some(description) = tool.get("description").filter(|d| !d.is_null()) {
            function.insert("description".into(), description.clone());
        }
        let schema = tool
            .get("input_schema")
            .filter(|s| s.is_object())
            .ok_or_else(|| {
                invalid(
                    format!("`tools[{i}].input_schema` is required: a JSON schema object."),
                    format!("tools[{i}].input_schema"),
                )
            })?;
        function.insert("parameters".into(), schema.clone());
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(out)
}

/// `tool_choice` as chat's, and whether calls may come several at once.
fn tool_choice(choice: &Value) -> Result<(Value, bool), ApiError> {
    let parallel = choice["disable_parallel_tool_use"] != true;
    let chat = match choice["type"].as_str() {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice["name"].as_str().ok_or_else(|| {
                invalid(
                    "`tool_choice.name` is required with `type: tool`.",
                    "tool_choice.name",
                )
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(invalid(
                "`tool_choice.type` must be `auto`, `any`, `tool` or `none`.",
                "tool_choice.type",
            ));
        }
    };
    Ok((chat, parallel))
}

/// The chat completion that runs this message, streamed with usage.
pub(crate) fn completion(request: &MessagesRequest) -> Result<CompletionRequest, ApiError> {
    let max_tokens = match request.max_tokens {
        None => return Err(invalid("`max_tokens` is required.", "max_tokens")),
        Some(0) => return Err(invalid("`max_tokens` must be at least 1.", "max_tokens")),
        Some(n) => n,
    };
    let messages = messages(request)?;
    let mut extra = Map::new();
    if let Some(list) = &request.tools {
        let list = tools(list)?;
        if !list.is_empty() {
            extra.insert("tools".into(), Value::Array(list));
            let (choice, parallel) = match &request.tool_choice {
                Some(choice) => tool_choice(choice)?,
                None => (json!("auto"), true),
            };
            extra.insert("tool_choice".into(), choice);
            extra.insert("parallel_tool_calls".into(), Value::Bool(parallel));
        }
    }
    Ok(CompletionRequest {
        model: request.model.clone(),
        messages: Some(messages),
        stream: Some(true),
        stream_options: Some(StreamOptions {
            include_usage: Some(true),
        }),
        max_tokens: Some(max_tokens),
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        stop: request.stop_sequences.clone().map(StopInput::Many),
        extra,
        ..CompletionRequest::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> MessagesRequest {
        serde_json::from_value(body).expect("a request")
    }

    #[test]
    fn turns_become_chat_messages_with_calls_and_results() {
        let r = request(json!({
            "max_tokens": 10,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "let me look"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "thanks"},
                ]},
            ],
        }));
        let m = messages(&r).expect("valid");
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(
            m[2].extra["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(m[3].extra["tool_call_id"], "toolu_1");
    }

    #[test]
    fn what_cannot_be_served_is_named_by_its_path() {
        let cases = [
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "max_tokens",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "t"}]}),
                "tools[0].input_schema",
            ),
        ];
        for (body, path) in cases {
            let err = completion(&request(body)).expect_err("refused");
            assert!(
                matches!(&err, ApiError::InvalidRequest { param: Some(p), .. } if p == path),
                "{err:?} for {path}"
            );
        }
    }

    #[test]
    fn tools_and_choices_take_their_chat_spelling() {
        let r = request(json!({
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [
                {"name": "get", "input_schema": {"type": "object"}},
                {"type": "web_search_20250305", "name": "web_search"},
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"],
        }));
        let chat = completion(&r).expect("valid");
        assert_eq!(chat.extra["tools"].as_array().map(Vec::len), Some(1));
        assert_eq!(chat.extra["tool_choice"], "required");
        assert_eq!(chat.extra["parallel_tool_calls"], false);
        assert!(matches!(chat.stop, Some(StopInput::Many(ref s)) if s == &["END"]));
    }
}
