//! What the local backend does around sampling to serve the OpenAI surface
//! on its own model: the generic tool prompt, grammars for structured
//! output and tool calls (llguidance, over the model's vocabulary), logit
//! bias, log probabilities, and tool-call text turned into `tool_calls`
//! deltas.
//!
//! The generic tool prompt (the bundled model's template has no tool
//! syntax): a system message lists the functions as JSON and asks for
//! `<tool_call>NAME {ARGUMENTS}</tool_call>`; the grammar then allows only
//! that, with each function's arguments constrained by its `parameters`
//! schema. Earlier calls are rendered back the same way in the assistant's
//! turn, and `tool` results as `<tool_response>…</tool_response>` user
//! turns.

use llguidance::JsonCompileOptions;
use llguidance::api::TopLevelGrammar;
use serde_json::{Map, Value, json};

use super::features::{Features, ResponseFormat, ToolChoice};
use super::{ChatMessage, ChoiceDelta};
use crate::model::constrain::{Constraint, Vocabulary};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The prompt's messages with the tools described and earlier calls and
/// results written out, when the request has tools.
pub fn tool_messages(features: &Features, messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = messages.iter().map(render_turn).collect();
    if !features.calls_tools() {
        return out;
    }
    let listed: Vec<Value> = features
        .callable()
        .iter()
        .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
        .collect();
    let how = format!(
        "You can call functions. To call one, answer with {OPEN}NAME {{JSON arguments}}{CLOSE}.\nFunctions: {}",
        Value::Array(listed)
    );
    match out.first_mut() {
        Some(first) if first.role == "system" || first.role == "developer" => {
            first.content = format!("{}\n\n{how}", first.content);
        }
        _ => out.insert(0, ChatMessage::new("system", how)),
    }
    out
}

/// One turn with tool calls and results written as text.
fn render_turn(message: &ChatMessage) -> ChatMessage {
    match message.role.as_str() {
        "tool" | "function" => ChatMessage::new(
            "user",
            format!("<tool_response>\n{}\n</tool_response>", message.content),
        ),
        "assistant" => {
            let mut content = message.content.clone();
            let calls = message.extra.get("tool_calls").and_then(Value::as_array);
            for call in calls.into_iter().flatten() {
                let function = &call["function"];
                content.push_str(&format!(
                    "{OPEN}{} {}{CLOSE}",
                    function["name"].as_str().unwrap_or_default(),
                    function["arguments"].as_str().unwrap_or("{}")
                ));
            }
            ChatMessage::new("assistant", content)
        }
        _ => ChatMessage::new(message.role.clone(), message.content.clone()),
    }
}

/// The grammar a request's answer must follow, if any.
pub fn grammar(features: &Features) -> Option<TopLevelGrammar> {
    if features.calls_tools() {
        return Some(TopLevelGrammar::from_lark(tool_grammar(features)));
    }
    match &features.response_format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(TopLevelGrammar::from_json_schema(compact(
            &json!({"type": "object"}),
        ))),
        ResponseFormat::JsonSchema { schema, .. } => {
            Some(TopLevelGrammar::from_json_schema(compact(schema)))
        }
    }
}

/// The schema with llguidance told to write JSON as `json.dumps` does
/// (`", "` and `": "`, no other whitespace): a small model otherwise
/// wanders into endless newlines and indentation.
fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if schema.is_object() && schema.get("x-guidance").is_none() {
        JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..JsonCompileOptions::default()
        }
        .apply_to(&mut schema);
    }
    schema
}

/// Lark: one call (or several, when allowed) of a callable function, each
/// function's arguments by its schema; with `auto`, plain text instead.
fn tool_grammar(features: &Features) -> String {
    let mut rules = Vec::new();
    let mut alternatives = Vec::new();
    for (i, tool) in features.callable().iter().enumerate() {
        alternatives.push(format!("call_{i}"));
        rules.push(format!(
            "call_{i}: \"{OPEN}{} \" args_{i} \"{CLOSE}\"",
            tool.name
        ));
        rules.push(format!("args_{i}: %json {}", compact(&tool.parameters)));
    }
    // Several calls only when asked for in so many words: a small model
    // otherwise repeats its call until `max_tokens`.
    let parallel = features.parallel_tool_calls == Some(true)
        && !matches!(features.tool_choice, ToolChoice::Named(_));
    let calls = if parallel {
        "calls: call (\"\\n\" call)*"
    } else {
        "calls: call"
    };
    let start = match features.tool_choice {
        ToolChoice::Auto => "start: calls | TEXT\nTEXT: /[^<][\\s\\S]*/",
        _ => "start: calls",
    };
    format!(
        "{start}\n{calls}\ncall: {}\n{}\n",
        alternatives.join(" | "),
        rules.join("\n")
    )
}

/// A generation's constraint, for the request's features; an error names
/// what the grammar could not take.
pub fn constraint(
    vocabulary: &Vocabulary,
    features: &Features,
) -> Result<Option<Constraint>, String> {
    grammar(features)
        .map(|g| vocabulary.constraint(g))
        .transpose()
}

/// `logprobs.content` for one sampled token: its log probability and the
/// `top` most likely, from the logits it was sampled from.
pub fn logprobs(vocabulary: &Vocabulary, logits: &[f32], token: u32, top: u8) -> Value {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let entry = |id: u32| {
        let bytes = vocabulary
            .token_bytes
            .get(id as usize)
            .cloned()
            .unwrap_or_default();
        let logprob = logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_total);
        let mut item = Map::new();
        item.insert("token".into(), json!(String::from_utf8_lossy(&bytes)));
        // -inf is not JSON: OpenAI's floor for "impossible" is -9999.
        item.insert("logprob".into(), json!(logprob.max(-9999.0)));
        item.insert("bytes".into(), json!(bytes));
        item
    };
    let mut best: Vec<u32> = Vec::new();
    if top > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = (top as usize).min(order.len());
        order.select_nth_unstable_by(k.saturating_sub(1), |a, b| {
            logits[*b as usize].total_cmp(&logits[*a as usize])
        });
        order.truncate(k);
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        best = order;
    }
    let mut chosen = entry(token);
    chosen.insert(
        "top_logprobs".into(),
        Value::Array(
            best.into_iter()
                .map(|id| Value::Object(entry(id)))
                .collect(),
        ),
    );
    json!({"content": [Value::Object(chosen)]})
}

/// What a piece of tool-call text becomes.
#[derive(Debug, PartialEq)]
pub enum Out {
    Text(String),
    /// A call's first fragment or a piece of its arguments.
    Call(ChoiceDelta),
}

/// Reads `<tool_call>NAME {…}</tool_call>` text as it streams and hands
/// out `tool_calls` fragments: the call's id, type and name once the name
/// is complete, then its arguments as they come.
#[derive(Debug)]
pub struct CallReader {
    /// Prefix for call ids.
    id: String,
    buf: String,
    state: State,
    /// Calls begun so far.
    pub calls: u32,
}

#[derive(Debug, PartialEq)]
enum State {
    /// Before anything, or between calls.
    Start,
    Text,
    Name,
    Args,
}

impl CallReader {
    /// A reader whose calls get ids of their own (`call_` and random hex).
    pub fn fresh() -> Self {
        Self::new(format!("call_{:08x}", rand::random::<u32>()))
    }

    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            buf: String::new(),
            state: State::Start,
            calls: 0,
        }
    }

    pub fn push(&mut self, piece: &str) -> Vec<Out> {
        self.buf.push_str(piece);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Text => {
                    if !self.buf.is_empty() {
                        out.push(Out::Text(std::mem::take(&mut self.buf)));
                    }
                    return out;
                }
                State::Start => {
                    let rest = self.buf.trim_start_matches('\n');
                    if let Some(after) = rest.strip_prefix(OPEN) {
                        self.buf = after.to_owned();
                        self.state = State::Name;
                    } else if OPEN.starts_with(rest) {
                        return out;
                    } else if self.calls == 0 {
                        self.state = State::Text;
                    } else {
                        // Past the last call: nothing more is a call.
                        self.buf.clear();
                        return out;
                    }
                }
                State::Name => {
                    let Some(end) = self.buf.find(' ') else {
                        return out;
                    };
                    let name = self.buf[..end].to_owned();
                    self.buf.drain(..=end);
                    out.push(self.fragment(json!({
                        "index": self.calls,
                        "id": format!("{}_{}", self.id, self.calls),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    })));
                    self.state = State::Args;
                }
                State::Args => {
                    if let Some(end) = self.buf.find(CLOSE) {
                        let args = self.buf[..end].to_owned();
                        self.buf.drain(..end + CLOSE.len());
                        if !args.is_empty() {
                            out.push(self.arguments(args));
                        }
                        self.calls += 1;
                        self.state = State::Start;
                        continue;
                    }
                    // Hold back what may be the start of the closing tag.
                    let keep = (1..CLOSE.len())
                        .rev()
                        .find(|n| self.buf.ends_with(&CLOSE[..*n]))
                        .unwrap_or(0);
                    let send = self.buf.len() - keep;
                    if send > 0 {
                        let args: String = self.buf.drain(..send).collect();
                        out.push(self.arguments(args));
                    }
                    return out;
                }
            }
        }
    }

    /// The end of the answer: anything held back goes out.
    pub fn finish(&mut self) -> Vec<Out> {
        match self.state {
            State::Start if self.calls == 0 && !self.buf.is_empty() => {
                vec![Out::Text(std::mem::take(&mut self.buf))]
            }
            State::Args if !self.buf.is_empty() => {
                let args = std::mem::take(&mut self.buf);
                vec![self.arguments(args)]
            }
            _ => Vec::new(),
        }
    }

    fn arguments(&self, args: String) -> Out {
        self.fragment(json!({"index": self.calls, "function": {"arguments": args}}))
    }

    fn fragment(&self, call: Value) -> Out {
        Out::Call(ChoiceDelta {
            fields: Map::from_iter([("tool_calls".to_owned(), json!([call]))]),
            ..ChoiceDelta::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::answer::Answer;

    fn replay(pieces: &[&str]) -> (Answer, String) {
        let mut reader = CallReader::new("call_x");
        let mut answer = Answer::new(1);
        let mut text = String::new();
        let mut outs: Vec<Out> = pieces.iter().flat_map(|p| reader.push(p)).collect();
        outs.extend(reader.finish());
        for out in outs {
            match out {
                Out::Text(t) => text.push_str(&t),
                Out::Call(delta) => answer.delta(&delta),
            }
        }
        (answer, text)
    }

    #[test]
    fn call_text_in_any_split_becomes_fragments() {
        let whole = "<tool_call>get_weather {\"city\": \"Paris\"}</tool_call>\n<tool_call>get_time {}</tool_call>";
        for size in [1, 2, 3, 7, 100] {
            let chars: Vec<char> = whole.chars().collect();
            let pieces: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (answer, text) = replay(&refs);
            assert_eq!(text, "");
            let calls = &answer.choices[0].message()["tool_calls"];
            assert_eq!(calls[0]["function"]["name"], "get_weather", "split {size}");
            assert_eq!(calls[0]["function"]["arguments"], "{\"city\": \"Paris\"}");
            assert_eq!(calls[0]["id"], "call_x_0");
            assert_eq!(calls[1]["function"]["name"], "get_time");
            assert_eq!(calls[1]["function"]["arguments"], "{}");
        }
    }

    #[test]
    fn plain_text_stays_text() {
        let (answer, text) = replay(&["Hel", "lo <b>"]);
        assert_eq!(text, "Hello <b>");
        assert!(answer.choices[0].tool_calls.is_empty());
        let (_, text) = replay(&["<", "p>"]);
        assert_eq!(text, "<p>");
    }

    #[test]
    fn the_tool_grammar_names_every_callable_function() {
        let features = Features::parse(
            json!({"tools": [
                {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "b"}},
            ], "tool_choice": "required"})
            .as_object()
            .expect("object"),
        )
        .expect("valid");
        let lark = tool_grammar(&features);
        assert!(lark.contains("call: call_0 | call_1"), "{lark}");
        assert!(lark.contains("calls: call\n"), "{lark}");
        assert!(lark.starts_with("start: calls\n"), "{lark}");
    }
}
