//! A Responses API create request, checked and turned into the chat
//! completion every backend already serves: `input` items become
//! messages, function tools and `text.format` become their chat
//! spellings. What a request may not carry is refused naming its path
//! (`input[2].content[0].type`), as OpenAI does.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::error::ApiError;
use crate::api::wire::{CompletionRequest, MessageContent, RequestMessage, StreamOptions};

/// The fields sluicegate reads; the rest (`user`, `safety_identifier`,
/// `prompt_cache_key`, `stream_options`, unknown ones) are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CreateRequest {
    pub(crate) model: Option<String>,
    pub(crate) input: Option<Value>,
    pub(crate) instructions: Option<String>,
    pub(crate) previous_response_id: Option<String>,
    pub(crate) max_output_tokens: Option<u32>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_logprobs: Option<u32>,
    pub(crate) tools: Option<Vec<Value>>,
    pub(crate) tool_choice: Option<Value>,
    pub(crate) parallel_tool_calls: Option<bool>,
    pub(crate) text: Option<Value>,
    pub(crate) reasoning: Option<Value>,
    pub(crate) store: Option<bool>,
    pub(crate) background: Option<bool>,
    pub(crate) metadata: Option<Map<String, Value>>,
    pub(crate) include: Option<Vec<String>>,
    pub(crate) stream: Option<bool>,
    pub(crate) truncation: Option<String>,
}

/// Tool types only OpenAI's own servers run: dropped on a backend that
/// cannot, as llama.cpp does for Codex.
const HOSTED_TOOLS: [&str; 10] = [
    "web_search",
    "web_search_preview",
    "file_search",
    "computer_use_preview",
    "computer",
    "code_interpreter",
    "image_generation",
    "local_shell",
    "mcp",
    "custom",
];

fn invalid(message: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::invalid(message, Some(param.into()))
}

/// The request's own input as items: a string is one user message.
pub(crate) fn input_items(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    match input {
        None | Some(Value::Null) => Err(invalid(
            "`input` is required: a string or an array of input items.",
            "input",
        )),
        Some(Value::String(text)) => Ok(vec![json!({
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        })]),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(invalid(
            "`input` must be a string or an array of input items.",
            "input",
        )),
    }
}

/// Items as chat messages, in order. `at(i)` names item `i` in errors
/// (items from `previous_response_id` have no path of the request's own).
pub(crate) fn messages(
    instructions: Option<&str>,
    items: &[Value],
    at: impl Fn(usize) -> String,
) -> Result<Vec<RequestMessage>, ApiError> {
    let mut messages = Vec::new();
    if let Some(instructions) = instructions.filter(|i| !i.is_empty()) {
        messages.push(message("system", instructions.to_owned(), Map::new()));
    }
    for (i, item) in items.iter().enumerate() {
        let path = at(i);
        let kind = match item.get("type") {
            None if item.get("role").is_some() => "message",
            Some(Value::String(kind)) => kind.as_str(),
            _ => {
                return Err(invalid(
                    format!("`{path}.type` is required."),
                    format!("{path}.type"),
                ));
            }
        };
        match kind {
            "message" => {
                let role = item["role"].as_str().unwrap_or_default();
                let role = match role {
                    "user" | "assistant" | "system" => role,
                    "developer" => "system",
                    _ => {
                        return Err(invalid(
                            format!(
                                "`{path}.role` must be one of user, assistant, system, developer, got `{role}`."
                            ),
                            format!("{path}.role"),
                        ));
                    }
                };
                let text = content_text(&item["content"], &format!("{path}.content"))?;
                messages.push(message(role, text, Map::new()));
            }
            "function_call" => {
                let field = |name: &str| -> Result<String, ApiError> {
                    item[name].as_str().map(str::to_owned).ok_or_else(|| {
                        invalid(
                            format!("`{path}.{name}` is required and must be a string."),
                            format!("{path}.{name}"),
                        )
                    })
                };
                let call = json!({
                    "id": field("call_id")?,
                    "type": "function",
                    "function": {"name": field("name")?, "arguments": field("arguments")?},
                });
                // Parallel calls are one assistant turn with several calls.
                match messages.last_mut() {
                    Some(last)
                        if last.role == "assistant"
                            && last.extra.contains_key("tool_calls")
                            && matches!(&last.content, Some(MessageContent::Text(t)) if t.is_empty()) =>
                    {
                        if let Some(Value::Array(calls)) = last.extra.get_mut("tool_calls") {
                            calls.push(call);
                        }
                    }
                    _ => {
                        let mut extra = Map::new();
                        extra.insert("tool_calls".into(), Value::Array(vec![call]));
                        messages.push(message("assistant", String::new(), extra));
                    }
                }
            }
            "function_call_output" => {
                let call_id = item["call_id"].as_str().ok_or_else(|| {
                    invalid(
                        format!("`{path}.call_id` is required and must be a string."),
                        format!("{path}.call_id"),
                    )
                })?;
                let output = content_text(&item["output"], &format!("{path}.output"))?;
                let mut extra = Map::new();
                extra.insert("tool_call_id".into(), Value::String(call_id.to_owned()));
                messages.push(message("tool", output, extra));
            }
            // Reasoning is the model's own; it is not read back.
            "reasoning" => {}
            other => {
                return Err(invalid(
                    format!(
                        "`{path}.type` `{other}` is not supported: this server takes message, function_call, function_call_output, item_reference and reasoning items."
                    ),
                    format!("{path}.type"),
                ));
            }
        }
    }
    if messages.iter().all(|m| m.role == "system") {
        return Err(invalid(
            "`input` must contain at least one message or function call output.",
            "input",
        ));
    }
    Ok(messages)
}

fn message(role: &str, text: String, extra: Map<String, Value>) -> RequestMessage {
    RequestMessage {
        role: role.to_owned(),
        content: Some(MessageContent::Text(text)),
        extra,
    }
}

/// A message's or an output's text: a string, or text parts.
fn content_text(content: &Value, path: &str) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                    (Some("refusal"), _) => {
                        text.push_str(part["refusal"].as_str().unwrap_or_default());
                    }
                    (Some(kind @ ("input_image" | "input_file" | "input_audio")), _) => {
                        return Err(invalid(
                            format!("`{path}[{j}].type` `{kind}`: this model takes text only."),
                            format!("{path}[{j}].type"),
                        ));
                    }
                    _ => {
                        return Err(invalid(
                            format!(
                                "`{path}[{j}]` must be an input_text or output_text part with `text`."
                            ),
                            format!("{path}[{j}].type"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(invalid(
            format!("`{path}` must be a string or an array of text parts."),
            path.to_owned(),
        )),
    }
}

/// Function tools in their chat spelling; hosted tools dropped when the
/// backend cannot run them.
fn tools(tools: &[Value], relays: bool) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        match tool["type"].as_str() {
            Some("function") => {
                let name = tool["name"].as_str().ok_or_else(|| {
                    invalid(
                        format!("`tools[{i}].name` is required."),
                        format!("tools[{i}].name"),
                    )
                })?;
                let mut function = Map::new();
                function.insert("name".into(), Value::String(name.to_owned()));
                for key in ["description", "parameters", "strict"] {
                    if let Some(value) = tool.get(key).filter(|v| !v.is_null()) {
                        function.insert(key.into(), value.clone());
                    }
                }
                out.push(json!({"type": "function", "function": function}));
            }
            Some(kind) => {
                if relays {
                    out.push(tool.clone());
                } else if !HOSTED_TOOLS.contains(&kind) {
                    tracing::debug!(kind, "a tool type this backend cannot run is dropped");
                }
            }
            None => {
                return Err(invalid(
                    format!("`tools[{i}].type` is required."),
                    format!("tools[{i}].type"),
                ));
            }
        }
    }
    Ok(out)
}

fn tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(mode) if ["auto", "none", "required"].contains(&mode.as_str()) => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("`tool_choice.name` is required.", "tool_choice.name"))?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(invalid(
            "`tool_choice` must be `auto`, `none`, `required` or {\"type\": \"function\", \"name\": ...}.",
            "tool_choice",
        )),
    }
}

/// `text.format` as a chat `response_format`; `None` for plain text.
fn response_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let format = &text["format"];
    match format["type"].as_str() {
        None if format.is_null() => Ok(None),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(value) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), value.clone());
                }
            }
            if !schema.contains_key("schema") {
                return Err(invalid(
                    "`text.format.schema` is required for `json_schema`.",
                    "text.format.schema",
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid(
            "`text.format.type` must be `text`, `json_object` or `json_schema`.",
            "text.format.type",
        )),
    }
}

/// The chat completion that runs this response, streamed with usage.
pub(crate) fn completion(
    request: &CreateRequest,
    messages: Vec<RequestMessage>,
    relays: bool,
) -> Result<CompletionRequest, ApiError> {
    let mut extra = Map::new();
    if let Some(list) = &request.tools {
        let list = tools(list, relays)?;
        if !list.is_empty() {
            extra.insert("tools".into(), Value::Array(list));
        }
    }
    if extra.contains_key("tools") {
        if let Some(choice) = &request.tool_choice {
            extra.insert("tool_choice".into(), tool_choice(choice)?);
        }
        if let Some(parallel) = request.parallel_tool_calls {
            extra.insert("parallel_tool_calls".into(), Value::Bool(parallel));
        }
    }
    if let Some(text) = &request.text
        && let Some(format) = response_format(text)?
    {
        extra.insert("response_format".into(), format);
    }
    let logprobs = request
        .include
        .iter()
        .flatten()
        .any(|i| i == "message.output_text.logprobs")
        || request.top_logprobs.is_some_and(|n| n > 0);
    if logprobs {
        extra.insert("logprobs".into(), Value::Bool(true));
        if let Some(n) = request.top_logprobs {
            if n > 20 {
                return Err(invalid(
                    "`top_logprobs` must be between 0 and 20.",
                    "top_logprobs",
                ));
            }
            extra.insert("top_logprobs".into(), json!(n));
        }
    }
    if relays && let Some(reasoning) = request.reasoning.as_ref().and_then(|r| r.get("effort")) {
        extra.insert("reasoning_effort".into(), reasoning.clone());
    }
    if request.max_output_tokens == Some(0) {
        return Err(invalid(
            "`max_output_tokens` must be at least 1.",
            "max_output_tokens",
        ));
    }
    Ok(CompletionRequest {
        model: request.model.clone(),
        messages: Some(messages),
        stream: Some(true),
        stream_options: Some(StreamOptions {
            include_usage: Some(true),
        }),
        max_completion_tokens: request.max_output_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        extra,
        ..CompletionRequest::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(i: usize) -> String {
        format!("input[{i}]")
    }

    #[test]
    fn items_become_chat_messages_with_tool_calls_and_results() {
        let items: Vec<Value> = serde_json::from_value(json!([
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ]))
        .expect("items");
        let m = messages(Some("sys"), &items, at).expect("valid");
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "system", "user", "assistant", "tool"]);
        assert_eq!(m[3].extra["tool_calls"].as_array().map(Vec::len), Some(2));
        assert_eq!(m[4].extra["tool_call_id"], "c1");
    }

    #[test]
    fn bad_items_are_named_by_their_path() {
        let cases = [
            (
                json!([{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                "input[0].content[0].type",
            ),
            (
                json!([{"role": "user", "content": "a"}, {"type": "mystery"}]),
                "input[1].type",
            ),
            (
                json!([{"type": "function_call_output", "output": "x"}]),
                "input[0].call_id",
            ),
            (
                json!([{"type": "message", "role": "robot", "content": "x"}]),
                "input[0].role",
            ),
        ];
        for (items, path) in cases {
            let items: Vec<Value> = serde_json::from_value(items).expect("items");
            let err = messages(None, &items, at).expect_err("refused");
            assert!(
                matches!(&err, ApiError::InvalidRequest { param: Some(p), .. } if p == path),
                "{err:?} for {path}"
            );
        }
    }

    #[test]
    fn function_tools_and_formats_take_their_chat_spelling() {
        let request = CreateRequest {
            tools: Some(vec![
                json!({"type": "function", "name": "get", "parameters": {"type": "object"}, "strict": true}),
                json!({"type": "web_search"}),
            ]),
            tool_choice: Some(json!({"type": "function", "name": "get"})),
            text: Some(
                json!({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}),
            ),
            max_output_tokens: Some(7),
            ..CreateRequest::default()
        };
        let chat = completion(&request, Vec::new(), false).expect("valid");
        assert_eq!(
            chat.extra["tools"].as_array().map(Vec::len),
            Some(1),
            "hosted tool dropped"
        );
        assert_eq!(chat.extra["tools"][0]["function"]["name"], "get");
        assert_eq!(chat.extra["tool_choice"]["function"]["name"], "get");
        assert_eq!(chat.extra["response_format"]["json_schema"]["name"], "x");
        assert_eq!(chat.max_completion_tokens, Some(7));
        let relayed = completion(&request, Vec::new(), true).expect("valid");
        assert_eq!(relayed.extra["tools"].as_array().map(Vec::len), Some(2));
    }
}
