//! Anthropic's Messages stream, transcoded from the chat chunk events a
//! generation's log holds, as the Responses and UI streams are: whole log
//! events in, `event:`/`data:`/`id:` events out, and at any point the
//! Message as it stands.
//!
//! Transcoding from the log's first event always gives the same events
//! with the same numbers, so a resume (`Last-Event-ID: <id>.<n>`)
//! transcodes from the start and sends what comes after `n`. The shapes
//! are the `anthropic` SDKs' (Python 2.17, TypeScript 1.17 and the 0.94
//! that Claude Code bundles): every event named, `content_block_start`
//! with an empty block and all content as deltas, `usage` on
//! `message_start` and `message_delta`.

use std::io::Write as _;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::api::chunk::{
    Chunk, ChunkUsage, LogEvent, ToolCallDelta, log_events, named_event, put_json,
};

/// One content block.
#[derive(Debug)]
enum Block {
    Text(String),
    Thinking(String),
    ToolUse {
        id: String,
        name: String,
        input: String,
        /// The chat chunk's tool call index it comes from.
        index: usize,
    },
}

impl Block {
    /// The block as a finished Message holds it.
    fn body(&self) -> Value {
        match self {
            Self::Text(text) => json!({"type": "text", "text": text, "citations": null}),
            Self::Thinking(thinking) => {
                json!({"type": "thinking", "thinking": thinking, "signature": ""})
            }
            Self::ToolUse {
                id, name, input, ..
            } => {
                // What the model streamed, parsed; an empty input is `{}`.
                let input = serde_json::from_str::<Value>(input)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({}));
                json!({"type": "tool_use", "id": id, "name": name, "input": input})
            }
        }
    }

    /// The block as `content_block_start` announces it: empty.
    fn opening(&self) -> Value {
        match self {
            Self::Text(_) => json!({"type": "text", "text": ""}),
            Self::Thinking(_) => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Self::ToolUse { id, name, .. } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": {}})
            }
        }
    }
}

/// How the message ended.
#[derive(Debug, Clone)]
enum End {
    Stopped(String),
    Failed { kind: &'static str, message: String },
}

/// One connection's transcoding state (and the Message's).
pub(crate) struct Transcoder {
    id: String,
    model: String,
    seq: u64,
    /// Events numbered up to here are not sent (a resume's position).
    after: Option<u64>,
    blocks: Vec<Block>,
    /// The block open for deltas, if any.
    open: Option<usize>,
    finish: Option<String>,
    /// The stop sequence that ended the answer, if one did.
    stop_sequence: Option<String>,
    usage: Option<ChunkUsage>,
    end: Option<End>,
}

impl Transcoder {
    pub(crate) fn new(id: &str, after: Option<u64>) -> Self {
        Self {
            id: id.to_owned(),
            model: String::new(),
            seq: 0,
            after,
            blocks: Vec::new(),
            open: None,
            finish: None,
            stop_sequence: None,
            usage: None,
            end: None,
        }
    }

    /// Events for whole log events; possibly none.
    pub(crate) fn events(&mut self, events: &[u8]) -> Bytes {
        // Each dialect's events are somewhat larger than the chunks.
        let mut out = Vec::with_capacity(events.len() * 3 / 2);
        for event in log_events(events) {
            match event {
                LogEvent::Text(text) => self.text(&text, &[], &mut out),
                LogEvent::Chunk(chunk) => self.chunk(chunk, &mut out),
                LogEvent::Done => self.stop(&mut out),
            }
        }
        Bytes::from(out)
    }

    /// Reads log events without producing output: to build the Message.
    pub(crate) fn absorb(&mut self, log_events: &[u8]) {
        let after = self.after.replace(u64::MAX);
        let _ = self.events(log_events);
        self.after = after;
    }

    /// The end of a stream whose log cannot be read any more.
    pub(crate) fn unreadable(&mut self, message: &str) -> Bytes {
        let mut out = Vec::new();
        if self.end.is_none() {
            self.fail("api_error", message.to_owned(), &mut out);
        }
        Bytes::from(out)
    }

    /// A `ping`, with the id of the last event sent so that a resume from
    /// it loses nothing.
    pub(crate) fn ping(&self) -> Bytes {
        let mut out = Vec::new();
        out.extend_from_slice(b"event: ping\ndata: {\"type\": \"ping\"}\n");
        if let Some(last) = self.seq.checked_sub(1) {
            let _ = writeln!(out, "id: {}.{last}", self.id);
        }
        out.extend_from_slice(b"\n");
        Bytes::from(out)
    }

    /// The failure the message ended with, if it did: (error type,
    /// message).
    pub(crate) fn failure(&self) -> Option<(&'static str, &str)> {
        match &self.end {
            Some(End::Failed { kind, message }) => Some((kind, message)),
            _ => None,
        }
    }

    fn chunk(&mut self, chunk: Chunk<'_>, out: &mut Vec<u8>) {
        if let Some(skeleton) = chunk.x_skeleton {
            self.model = skeleton
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let message = self.message(Vec::new(), None);
            self.emit(out, "message_start", json!({"message": message}));
            return;
        }
        if let Some(error) = chunk.error {
            let kind = match error["code"].as_str() {
                Some("backend_unavailable" | "shutting_down" | "queue_full") => "overloaded_error",
                _ => "api_error",
            };
            let message = error["message"].as_str().unwrap_or("The answer failed.");
            self.fail(kind, message.to_owned(), out);
            return;
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        let Some(choice) = chunk.choices.into_iter().next() else {
            return;
        };
        let mut choice = choice;
        if let Some(delta) = choice.delta.take_reasoning() {
            let index = self.open_block(
                out,
                |b| matches!(b, Block::Thinking(_)),
                || Block::Thinking(String::new()),
            );
            if let Block::Thinking(text) = &mut self.blocks[index] {
                text.push_str(&delta);
            }
            self.emit(
                out,
                "content_block_delta",
                json!({
                    "index": index, "delta": {"type": "thinking_delta", "thinking": &*delta},
                }),
            );
        }
        if let Some(delta) = choice.delta.content.filter(|t| !t.is_empty()) {
            self.text(&delta, &[], out);
        }
        for call in choice.delta.tool_calls {
            self.tool_delta(call, out);
        }
        if let Some(reason) = choice.finish_reason {
            self.finish = Some(reason.into_owned());
            self.stop_sequence = choice.stop_reason;
            self.close(out);
        }
    }

    /// A piece of text (Messages carry no log probabilities).
    fn text(&mut self, delta: &str, _: &[Value], out: &mut Vec<u8>) {
        if delta.is_empty() {
            return;
        }
        let index = self.open_block(
            out,
            |b| matches!(b, Block::Text(_)),
            || Block::Text(String::new()),
        );
        if let Block::Text(text) = &mut self.blocks[index] {
            text.push_str(delta);
        }
        self.text_delta(out, index, delta);
    }

    /// The open block if it is of the kind, else a new one (after closing
    /// the open one); its index.
    fn open_block(
        &mut self,
        out: &mut Vec<u8>,
        is: impl Fn(&Block) -> bool,
        new: impl FnOnce() -> Block,
    ) -> usize {
        if let Some(open) = self.open
            && is(&self.blocks[open])
        {
            return open;
        }
        self.start_block(out, new())
    }

    fn start_block(&mut self, out: &mut Vec<u8>, block: Block) -> usize {
        self.close(out);
        let index = self.blocks.len();
        let opening = block.opening();
        self.blocks.push(block);
        self.open = Some(index);
        self.emit(
            out,
            "content_block_start",
            json!({"index": index, "content_block": opening}),
        );
        index
    }

    fn tool_delta(&mut self, call: ToolCallDelta, out: &mut Vec<u8>) {
        let current = self.open.filter(|&open| {
            matches!(&self.blocks[open], Block::ToolUse { index, .. } if *index == call.index)
        });
        let index = match current {
            Some(index) => index,
            None => {
                // Anthropic's ids read `toolu_…`; they come back in
                // `tool_use` and `tool_result` blocks as they were sent.
                let id = match call.id.clone() {
                    Some(id) if id.starts_with("toolu_") => id,
                    Some(id) => format!("toolu_{id}"),
                    None => format!("toolu_{}{}", self.id.trim_start_matches("msg_"), call.index),
                };
                let block = Block::ToolUse {
                    id,
                    name: call.function.name.clone().unwrap_or_default(),
                    input: String::new(),
                    index: call.index,
                };
                self.start_block(out, block)
            }
        };
        if let Some(delta) = call.function.arguments.filter(|a| !a.is_empty()) {
            if let Block::ToolUse { input, .. } = &mut self.blocks[index] {
                input.push_str(&delta);
            }
            self.emit(
                out,
                "content_block_delta",
                json!({
                    "index": index, "delta": {"type": "input_json_delta", "partial_json": delta},
                }),
            );
        }
    }

    /// Ends the open block.
    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(index) = self.open.take() {
            if matches!(self.blocks[index], Block::Thinking(_)) {
                self.emit(
                    out,
                    "content_block_delta",
                    json!({
                        "index": index, "delta": {"type": "signature_delta", "signature": ""},
                    }),
                );
            }
            self.emit(out, "content_block_stop", json!({"index": index}));
        }
    }

    fn fail(&mut self, kind: &'static str, message: String, out: &mut Vec<u8>) {
        self.close(out);
        self.emit(
            out,
            "error",
            json!({"error": {"type": kind, "message": message}}),
        );
        self.end = Some(End::Failed { kind, message });
    }

    /// `message_delta` and `message_stop`, at `[DONE]` (after the usage
    /// chunk). A message always has a block: Claude Code falls back to a
    /// second, non-streamed request when a stream has none.
    fn stop(&mut self, out: &mut Vec<u8>) {
        if self.end.is_some() {
            return;
        }
        self.close(out);
        if self.blocks.is_empty() {
            self.start_block(out, Block::Text(String::new()));
            self.close(out);
        }
        let reason = match &self.stop_sequence {
            Some(_) => "stop_sequence",
            None => stop_reason(self.finish.as_deref()),
        };
        self.end = Some(End::Stopped(reason.to_owned()));
        let usage = self.usage_body();
        self.emit(
            out,
            "message_delta",
            json!({
                "delta": {"stop_reason": reason, "stop_sequence": self.stop_sequence},
                "usage": usage,
            }),
        );
        self.emit(out, "message_stop", json!({}));
    }

    fn usage_body(&self) -> Value {
        let usage = self.usage.unwrap_or_default();
        json!({
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        })
    }

    fn message(&self, content: Vec<Value>, stop_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": self.stop_sequence.as_ref().filter(|_| stop_reason.is_some()),
            "usage": self.usage_body(),
        })
    }

    /// The Message as it stands.
    pub(crate) fn current(&self) -> Value {
        let reason = match &self.end {
            Some(End::Stopped(reason)) => Some(reason.as_str()),
            _ => None,
        };
        self.message(self.blocks.iter().map(Block::body).collect(), reason)
    }

    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut data: Value) {
        let Some(seq) = self.next_seq() else {
            return;
        };
        if let Value::Object(fields) = &mut data {
            fields.insert("type".into(), Value::String(kind.to_owned()));
        }
        named_event(out, kind, &self.id, seq, |out| put_json(out, &data));
    }

    /// The next event's number; `None` when a resume has seen it.
    fn next_seq(&mut self) -> Option<u64> {
        let seq = self.seq;
        self.seq += 1;
        self.after.is_none_or(|after| seq > after).then_some(seq)
    }

    /// A `text_delta`, the one event per token, written without a JSON
    /// tree (the same fields as [`Self::emit`] writes).
    fn text_delta(&mut self, out: &mut Vec<u8>, index: usize, text: &str) {
        let Some(seq) = self.next_seq() else {
            return;
        };
        named_event(out, "content_block_delta", &self.id, seq, |out| {
            out.extend_from_slice(b"{\"delta\":{\"text\":");
            put_json(out, &text);
            out.extend_from_slice(b",\"type\":\"text_delta\"},\"index\":");
            put_json(out, &index);
            out.extend_from_slice(b",\"type\":\"content_block_delta\"}");
        });
    }
}

/// A chat finish reason as Anthropic's `stop_reason` names it; a cancelled
/// answer keeps sluicegate's own word.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        Some("cancelled") => "cancelled",
        _ => "end_turn",
    }
}
