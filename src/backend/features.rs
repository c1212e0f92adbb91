//! The OpenAI request fields a backend serves on its own (not by relaying):
//! tools, structured output, log probabilities and logit bias, read from the
//! request's extra fields and validated, each error naming its field.

use serde_json::{Map, Value};

/// The fields this module reads. Each has an "off" value, which every
/// backend accepts.
pub const FIELDS: [&str; 9] = [
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
];

/// Whether `value` leaves the field `key` off.
pub fn is_off(key: &str, value: &Value) -> bool {
    match key {
        "tools" | "functions" => value.as_array().is_some_and(Vec::is_empty),
        "tool_choice" | "function_call" => value == "none",
        "response_format" => value["type"] == "text",
        "logprobs" => value == &Value::Bool(false),
        "top_logprobs" => value.as_u64() == Some(0),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        "parallel_tool_calls" => true,
        _ => false,
    }
}

/// Every field a tool-serving backend reads.
pub const TOOLS: [&str; 5] = [
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
];

/// What a request asks for beyond text. Empty by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features {
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    /// Several calls in one answer; `None` leaves it to the backend
    /// (OpenAI's default: allowed).
    pub parallel_tool_calls: Option<bool>,
    pub response_format: ResponseFormat,
    /// `Some(top)` when `logprobs` is on: each token's log probability and
    /// its `top` most likely alternatives (0 to 20).
    pub logprobs: Option<u8>,
    /// Token id to bias, added to its logit (-100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON Schema (`{"type": "object"}` when absent).
    pub parameters: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text or calls, as the model decides.
    #[default]
    Auto,
    /// Never a call.
    None,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ResponseFormat {
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema`.
    JsonSchema { name: String, schema: Value },
}

/// A field that cannot be served as sent: the field's path and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub param: String,
    pub message: String,
}

fn bad(param: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        param: param.to_owned(),
        message: message.into(),
    }
}

impl Features {
    /// Whether the answer may be a tool call.
    pub fn calls_tools(&self) -> bool {
        !self.tools.is_empty() && self.tool_choice != ToolChoice::None
    }

    /// The tools a call may name under `tool_choice`.
    pub fn callable(&self) -> Vec<&Tool> {
        match &self.tool_choice {
            ToolChoice::None => Vec::new(),
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            ToolChoice::Auto | ToolChoice::Required => self.tools.iter().collect(),
        }
    }

    /// Reads the fields from a request's extra fields.
    pub fn parse(extra: &Map<String, Value>) -> Result<Self, FieldError> {
        let mut features = Self::default();
        let get = |key: &str| extra.get(key).filter(|v| !v.is_null());
        if let Some(tools) = get("tools").or_else(|| get("functions")) {
            features.tools = parse_tools(tools, extra.contains_key("functions"))?;
        }
        if let Some(choice) = get("tool_choice").or_else(|| get("function_call")) {
            features.tool_choice = parse_tool_choice(choice)?;
            if let ToolChoice::Named(name) = &features.tool_choice
                && !features.tools.iter().any(|t| &t.name == name)
            {
                return Err(bad(
                    "tool_choice",
                    format!("`tool_choice` names the function `{name}`, which is not in `tools`."),
                ));
            }
            if features.tool_choice != ToolChoice::None
                && features.tool_choice != ToolChoice::Auto
                && features.tools.is_empty()
            {
                return Err(bad(
                    "tool_choice",
                    "`tool_choice` asks for a call, but `tools` is empty.",
                ));
            }
        }
        if let Some(parallel) = get("parallel_tool_calls") {
            features.parallel_tool_calls = Some(parallel.as_bool().ok_or_else(|| {
                bad(
                    "parallel_tool_calls",
                    "`parallel_tool_calls` must be a boolean.",
                )
            })?);
        }
        if let Some(format) = get("response_format") {
            features.response_format = parse_response_format(format)?;
        }
        let logprobs = match get("logprobs") {
            None => false,
            Some(Value::Bool(on)) => *on,
            Some(_) => return Err(bad("logprobs", "`logprobs` must be a boolean.")),
        };
        let top = match get("top_logprobs") {
            None => 0,
            Some(top) => match top.as_u64() {
                Some(top @ 0..=20) => top as u8,
                _ => {
                    return Err(bad(
                        "top_logprobs",
                        "`top_logprobs` must be an integer from 0 to 20.",
                    ));
                }
            },
        };
        if top > 0 && !logprobs {
            return Err(bad(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true.",
            ));
        }
        features.logprobs = logprobs.then_some(top);
        if let Some(bias) = get("logit_bias") {
            let bias = bias
                .as_object()
                .ok_or_else(|| bad("logit_bias", "`logit_bias` must map token ids to numbers."))?;
            for (token, value) in bias {
                let id = token.parse::<u32>().map_err(|_| {
                    bad(
                        "logit_bias",
                        format!("`logit_bias` keys must be token ids, got `{token}`."),
                    )
                })?;
                let value = value
                    .as_f64()
                    .filter(|v| (-100.0..=100.0).contains(v))
                    .ok_or_else(|| {
                        bad(
                            "logit_bias",
                            format!("`logit_bias[{token}]` must be a number from -100 to 100."),
                        )
                    })?;
                features.logit_bias.push((id, value as f32));
            }
        }
        Ok(features)
    }
}

fn parse_tools(tools: &Value, legacy: bool) -> Result<Vec<Tool>, FieldError> {
    let param = if legacy { "functions" } else { "tools" };
    let list = tools
        .as_array()
        .ok_or_else(|| bad(param, format!("`{param}` must be an array.")))?;
    let mut parsed = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let at = format!("{param}[{i}]");
        let function = if legacy {
            tool
        } else {
            if tool["type"] != "function" {
                return Err(bad(
                    &format!("{at}.type"),
                    format!("`{at}.type` must be \"function\"."),
                ));
            }
            &tool["function"]
        };
        let name = function["name"].as_str().unwrap_or_default();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(bad(
                &format!("{at}.function.name"),
                format!("`{at}.function.name` must be 1 to 64 letters, digits, `_` or `-`."),
            ));
        }
        if parsed.iter().any(|t: &Tool| t.name == name) {
            return Err(bad(
                &format!("{at}.function.name"),
                format!("two tools are named `{name}`."),
            ));
        }
        let parameters = match &function["parameters"] {
            Value::Null => serde_json::json!({"type": "object", "properties": {}}),
            schema @ Value::Object(_) => schema.clone(),
            _ => {
                return Err(bad(
                    &format!("{at}.function.parameters"),
                    format!("`{at}.function.parameters` must be a JSON Schema object."),
                ));
            }
        };
        parsed.push(Tool {
            name: name.to_owned(),
            description: function["description"].as_str().map(str::to_owned),
            parameters,
        });
    }
    Ok(parsed)
}

fn parse_tool_choice(choice: &Value) -> Result<ToolChoice, FieldError> {
    match choice {
        Value::String(mode) => match mode.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" | "any" => Ok(ToolChoice::Required),
            other => Err(bad(
                "tool_choice",
                format!(
                    "`tool_choice` must be auto, none, required or a named function, got `{other}`."
                ),
            )),
        },
        Value::Object(_) => {
            let name = choice["function"]["name"]
                .as_str()
                .or_else(|| choice["name"].as_str())
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "`tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                    )
                })?;
            Ok(ToolChoice::Named(name.to_owned()))
        }
        _ => Err(bad(
            "tool_choice",
            "`tool_choice` must be a string or an object.",
        )),
    }
}

fn parse_response_format(format: &Value) -> Result<ResponseFormat, FieldError> {
    match format["type"].as_str() {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let spec = &format["json_schema"];
            let schema = match &spec["schema"] {
                Value::Null => serde_json::json!({"type": "object"}),
                schema @ (Value::Object(_) | Value::Bool(_)) => schema.clone(),
                _ => {
                    return Err(bad(
                        "response_format.json_schema.schema",
                        "`response_format.json_schema.schema` must be a JSON Schema object.",
                    ));
                }
            };
            Ok(ResponseFormat::JsonSchema {
                name: spec["name"].as_str().unwrap_or("response").to_owned(),
                schema,
            })
        }
        _ => Err(bad(
            "response_format.type",
            "`response_format.type` must be text, json_object or json_schema.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<Features, FieldError> {
        Features::parse(body.as_object().expect("an object"))
    }

    #[test]
    fn tools_and_choices_parse_and_bad_ones_name_their_field() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let f = parse(json!({"tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .expect("valid");
        assert_eq!(f.tool_choice, ToolChoice::Named("get_weather".into()));
        assert_eq!(f.callable().len(), 1);
        let err = parse(json!({"tools": tools, "tool_choice": {"type": "function",
            "function": {"name": "nope"}}}))
        .expect_err("unknown function");
        assert_eq!(err.param, "tool_choice");
        let err = parse(json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}))
            .expect_err("bad name");
        assert_eq!(err.param, "tools[0].function.name");
        assert!(
            !parse(json!({"tools": tools, "tool_choice": "none"}))
                .expect("ok")
                .calls_tools()
        );
    }

    #[test]
    fn logprobs_and_formats_are_checked() {
        assert_eq!(
            parse(json!({"logprobs": true, "top_logprobs": 5}))
                .expect("ok")
                .logprobs,
            Some(5)
        );
        assert_eq!(
            parse(json!({"top_logprobs": 21, "logprobs": true}))
                .expect_err("range")
                .param,
            "top_logprobs"
        );
        assert_eq!(
            parse(json!({"top_logprobs": 2}))
                .expect_err("needs logprobs")
                .param,
            "top_logprobs"
        );
        let f = parse(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}}}}))
        .expect("ok");
        assert!(matches!(
            f.response_format,
            ResponseFormat::JsonSchema { .. }
        ));
        assert_eq!(
            parse(json!({"response_format": {"type": "yaml"}}))
                .expect_err("type")
                .param,
            "response_format.type"
        );
        assert_eq!(
            parse(json!({"logit_bias": {"50256": -101}}))
                .expect_err("range")
                .param,
            "logit_bias"
        );
    }
}
