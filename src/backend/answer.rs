//! A whole answer assembled from its steps, as OpenAI's non-streaming
//! response shows it: per choice the text, tool calls merged from their
//! fragments, reasoning, refusal, log probabilities and finish.

use serde_json::{Map, Value, json};

use super::{ChoiceDelta, FinishReason};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    pub choices: Vec<AnsweredChoice>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnsweredChoice {
    pub content: String,
    /// Tool calls by their `index`, fragments merged.
    pub tool_calls: Vec<Value>,
    /// Other delta fields: strings concatenated, anything else replaced.
    pub fields: Map<String, Value>,
    /// The `logprobs` object, its lists concatenated over the steps.
    pub logprobs: Option<Map<String, Value>>,
    pub finish: Option<FinishReason>,
}

impl Answer {
    pub fn new(choices: u32) -> Self {
        Self {
            choices: vec![AnsweredChoice::default(); choices.max(1) as usize],
        }
    }

    fn choice(&mut self, index: u32) -> &mut AnsweredChoice {
        let index = index as usize;
        if self.choices.len() <= index {
            self.choices.resize_with(index + 1, AnsweredChoice::default);
        }
        &mut self.choices[index]
    }

    /// Text of the first choice.
    pub fn text(&mut self, text: &str) {
        self.choice(0).content.push_str(text);
    }

    pub fn delta(&mut self, delta: &ChoiceDelta) {
        let choice = self.choice(delta.index);
        if let Some(text) = &delta.content {
            choice.content.push_str(text);
        }
        for (key, value) in &delta.fields {
            match (key.as_str(), value) {
                ("tool_calls", Value::Array(fragments)) => {
                    for fragment in fragments {
                        merge_tool_call(&mut choice.tool_calls, fragment);
                    }
                }
                (_, Value::String(piece)) => match choice.fields.get_mut(key) {
                    Some(Value::String(text)) => text.push_str(piece),
                    _ => {
                        choice.fields.insert(key.clone(), value.clone());
                    }
                },
                _ => {
                    choice.fields.insert(key.clone(), value.clone());
                }
            }
        }
        if let Some(Value::Object(logprobs)) = &delta.logprobs {
            let merged = choice.logprobs.get_or_insert_with(Map::new);
            for (key, value) in logprobs {
                match (merged.get_mut(key), value) {
                    (Some(Value::Array(list)), Value::Array(more)) => list.extend(more.clone()),
                    _ => {
                        merged.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        if delta.finish.is_some() {
            choice.finish = delta.finish;
        }
    }

    /// The run ended: every choice without a finish of its own takes it.
    pub fn finish(&mut self, reason: FinishReason) {
        for choice in &mut self.choices {
            choice.finish.get_or_insert(reason);
        }
    }
}

/// Adds a `tool_calls` fragment to the call with its `index`: `id`, `type`
/// and the function's `name` are taken when first seen, `arguments`
/// concatenated.
fn merge_tool_call(calls: &mut Vec<Value>, fragment: &Value) {
    let index = fragment["index"]
        .as_u64()
        .map_or(calls.len().saturating_sub(1), |i| i as usize);
    while calls.len() <= index {
        calls
            .push(json!({"id": "", "type": "function", "function": {"name": "", "arguments": ""}}));
    }
    let call = &mut calls[index];
    for key in ["id", "type"] {
        if let Some(value) = fragment[key].as_str().filter(|v| !v.is_empty()) {
            call[key] = json!(value);
        }
    }
    for key in ["name", "arguments"] {
        if let Some(piece) = fragment["function"][key].as_str() {
            let mut text = call["function"][key]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            text.push_str(piece);
            call["function"][key] = json!(text);
        }
    }
}

impl AnsweredChoice {
    /// The chat `message` object.
    pub fn message(&self) -> Value {
        let mut message = Map::new();
        message.insert("role".into(), json!("assistant"));
        let content = if self.content.is_empty() && !self.tool_calls.is_empty() {
            Value::Null
        } else {
            json!(self.content)
        };
        message.insert("content".into(), content);
        for (key, value) in &self.fields {
            message.insert(key.clone(), value.clone());
        }
        if !self.tool_calls.is_empty() {
            message.insert("tool_calls".into(), json!(self.tool_calls));
        }
        Value::Object(message)
    }

    pub fn logprobs(&self) -> Value {
        self.logprobs.clone().map_or(Value::Null, Value::Object)
    }

    pub fn finish_reason(&self) -> &'static str {
        self.finish.unwrap_or(FinishReason::Stop).as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(fragment: Value) -> ChoiceDelta {
        ChoiceDelta {
            fields: Map::from_iter([("tool_calls".to_owned(), fragment)]),
            ..ChoiceDelta::default()
        }
    }

    #[test]
    fn tool_call_fragments_merge_by_index() {
        let mut answer = Answer::new(1);
        answer.delta(&call(
            json!([{"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}]),
        ));
        answer.delta(&call(
            json!([{"index": 0, "function": {"arguments": "{\"ci"}}]),
        ));
        answer.delta(&call(
            json!([{"index": 1, "id": "call_b", "type": "function",
            "function": {"name": "get_time", "arguments": "{}"}}]),
        ));
        answer.delta(&call(
            json!([{"index": 0, "function": {"arguments": "ty\":\"Paris\"}"}}]),
        ));
        answer.finish(FinishReason::ToolCalls);
        let message = answer.choices[0].message();
        assert_eq!(message["content"], Value::Null);
        assert_eq!(
            message["tool_calls"],
            json!([
                {"id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_b", "type": "function",
                 "function": {"name": "get_time", "arguments": "{}"}},
            ])
        );
        assert_eq!(answer.choices[0].finish_reason(), "tool_calls");
    }

    #[test]
    fn reasoning_concatenates_and_logprobs_lists_extend() {
        let mut answer = Answer::new(2);
        for (piece, lp) in [("think", 1), (" more", 2)] {
            answer.delta(&ChoiceDelta {
                index: 1,
                content: Some("x".into()),
                fields: Map::from_iter([("reasoning_content".to_owned(), json!(piece))]),
                logprobs: Some(json!({"content": [{"token": lp}]})),
                ..ChoiceDelta::default()
            });
        }
        answer.finish(FinishReason::Length);
        let second = &answer.choices[1];
        assert_eq!(second.message()["reasoning_content"], "think more");
        assert_eq!(second.message()["content"], "xx");
        assert_eq!(
            second.logprobs(),
            json!({"content": [{"token": 1}, {"token": 2}]})
        );
        assert_eq!(answer.choices[0].finish_reason(), "length");
    }
}
