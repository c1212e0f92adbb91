//! OpenAI's Responses API stream, transcoded from the chat chunk events
//! a generation's log holds: one generation, another encoding, as the UI
//! stream does. Pure: whole log events in, `event:`/`data:`/`id:` events
//! out, and at any point the Response object as it stands.
//!
//! Transcoding from the log's first event always produces the same events
//! with the same sequence numbers, so a resume (`starting_after`, or
//! `Last-Event-ID` naming `<id>.<sequence number>`) transcodes from the
//! start and sends only what comes after the position. The shapes are
//! openai-python's `types/responses` (version 3.54.0, the one the client
//! tests pin).

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::api::chunk::{
    Chunk, ChunkUsage, LogEvent, ToolCallDelta, log_events, named_event, put_json,
};

/// One output item under construction.
#[derive(Debug)]
enum Item {
    Message {
        id: String,
        text: String,
        logprobs: Vec<Value>,
        open: bool,
    },
    Reasoning {
        id: String,
        text: String,
        open: bool,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        /// The chat chunk's tool call index it comes from.
        index: usize,
        open: bool,
    },
}

impl Item {
    fn is_open(&self) -> bool {
        match self {
            Self::Message { open, .. } | Self::Reasoning { open, .. } | Self::Call { open, .. } => {
                *open
            }
        }
    }

    /// The item as `output` lists it.
    fn body(&self, status: &str) -> Value {
        match self {
            Self::Message {
                id,
                text,
                logprobs,
                open,
            } => json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "status": if *open { "in_progress" } else { status },
                "content": if text.is_empty() && *open { json!([]) } else { json!([text_part(text, logprobs)]) },
            }),
            Self::Reasoning { id, text, open } => json!({
                "id": id,
                "type": "reasoning",
                "summary": [],
                "content": if text.is_empty() && *open { json!([]) } else { json!([reasoning_part(text)]) },
                "status": if *open { "in_progress" } else { status },
            }),
            Self::Call {
                id,
                call_id,
                name,
                arguments,
                open,
                ..
            } => json!({
                "id": id,
                "type": "function_call",
                "call_id": call_id,
                "name": name,
                "arguments": arguments,
                "status": if *open { "in_progress" } else { status },
            }),
        }
    }
}

fn reasoning_part(text: &str) -> Value {
    json!({"type": "reasoning_text", "text": text})
}

fn text_part(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

/// How the response ended, once it has.
#[derive(Debug, Clone)]
enum End {
    Completed,
    Incomplete {
        status: &'static str,
        reason: Option<&'static str>,
    },
    Failed(Value),
}

/// One connection's transcoding state (and the state of the Response).
pub(crate) struct Transcoder {
    id: String,
    /// Item ids are derived from the response id, so a replay names them
    /// the same.
    suffix: String,
    /// The Response object's fixed part, from the opening chunk.
    skeleton: Map<String, Value>,
    seq: u64,
    /// Events numbered up to here are not sent (a resume's position).
    after: Option<u64>,
    items: Vec<Item>,
    finish: Option<String>,
    usage: Option<ChunkUsage>,
    end: Option<End>,
    /// The terminal event went out (or, for a stream of `[DONE]`, is due).
    terminal_sent: bool,
}

impl Transcoder {
    /// `after`: the sequence number a resume starts after.
    pub(crate) fn new(id: &str, after: Option<u64>) -> Self {
        // Eight of the id's random characters: item ids stay unique in a
        // conversation and short in the one event every token sends.
        let suffix = id
            .strip_prefix("resp_")
            .unwrap_or(id)
            .chars()
            .take(8)
            .collect();
        Self {
            id: id.to_owned(),
            suffix,
            skeleton: Map::new(),
            seq: 0,
            after,
            items: Vec::new(),
            finish: None,
            usage: None,
            end: None,
            terminal_sent: false,
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
                LogEvent::Done => self.terminal(&mut out),
            }
        }
        Bytes::from(out)
    }

    /// Reads log events without producing output: to build the Response
    /// object of a retrieve.
    pub(crate) fn absorb(&mut self, log_events: &[u8]) {
        let after = self.after.replace(u64::MAX);
        let _ = self.events(log_events);
        self.after = after;
    }

    /// The end of a stream whose log cannot be read any more.
    pub(crate) fn unreadable(&mut self, code: &str, message: &str) -> Bytes {
        let mut out = Vec::new();
        if !self.terminal_sent {
            self.fail(json!({"code": code, "message": message}), &mut out);
        }
        Bytes::from(out)
    }

    fn chunk(&mut self, chunk: Chunk<'_>, out: &mut Vec<u8>) {
        if let Some(skeleton) = chunk.x_skeleton {
            self.skeleton = skeleton;
            let created = Value::Object(self.object("in_progress"));
            self.emit(out, "response.created", json!({"response": created}));
            self.emit(out, "response.in_progress", json!({"response": created}));
            return;
        }
        if let Some(error) = chunk.error {
            let error = json!({
                "code": error["code"].as_str().unwrap_or("server_error"),
                "message": error["message"].as_str().unwrap_or("The response failed."),
            });
            self.fail(error, out);
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
            let index = self.open_item(
                out,
                "rs",
                |id| Item::Reasoning {
                    id,
                    text: String::new(),
                    open: true,
                },
                |i| matches!(i, Item::Reasoning { .. }),
            );
            if let Item::Reasoning { id, text, .. } = &mut self.items[index] {
                text.push_str(&delta);
                let id = id.clone();
                self.emit(
                    out,
                    "response.reasoning_text.delta",
                    json!({
                        "item_id": id, "output_index": index, "content_index": 0, "delta": &*delta,
                    }),
                );
            }
        }
        if let Some(delta) = choice.delta.content.filter(|t| !t.is_empty()) {
            let logprobs = choice.logprobs.map(|l| l.content).unwrap_or_default();
            self.text(&delta, &logprobs, out);
        }
        for call in choice.delta.tool_calls {
            self.call_delta(call, out);
        }
        if let Some(reason) = choice.finish_reason {
            self.finish = Some(reason.into_owned());
            self.close_all(out);
        }
    }

    /// A piece of the message's text, with its log probabilities.
    fn text(&mut self, delta: &str, logprobs: &[Value], out: &mut Vec<u8>) {
        if delta.is_empty() {
            return;
        }
        let index = self.open_item(
            out,
            "msg",
            |id| Item::Message {
                id,
                text: String::new(),
                logprobs: Vec::new(),
                open: true,
            },
            |i| matches!(i, Item::Message { .. }),
        );
        if let Item::Message {
            text,
            logprobs: all,
            ..
        } = &mut self.items[index]
        {
            text.push_str(delta);
            all.extend(logprobs.iter().cloned());
        }
        self.text_delta(out, index, delta, logprobs);
    }

    /// The open item of a kind, or a new one (closing whatever else is
    /// open); its output index.
    fn open_item(
        &mut self,
        out: &mut Vec<u8>,
        prefix: &str,
        new: impl FnOnce(String) -> Item,
        is: impl Fn(&Item) -> bool,
    ) -> usize {
        if let Some(last) = self.items.last()
            && last.is_open()
            && is(last)
        {
            return self.items.len() - 1;
        }
        self.close_all(out);
        let index = self.items.len();
        let item = new(format!("{prefix}_{}{index}", self.suffix));
        self.items.push(item);
        let body = self.items[index].body("in_progress");
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": body}),
        );
        let part = match &self.items[index] {
            Item::Message { id, .. } => Some((id.clone(), text_part("", &[]))),
            Item::Reasoning { id, .. } => Some((id.clone(), reasoning_part(""))),
            Item::Call { .. } => None,
        };
        if let Some((id, part)) = part {
            self.emit(
                out,
                "response.content_part.added",
                json!({
                    "item_id": id, "output_index": index, "content_index": 0, "part": part,
                }),
            );
        }
        index
    }

    fn call_delta(&mut self, call: ToolCallDelta, out: &mut Vec<u8>) {
        let existing = self.items.iter().position(
            |i| matches!(i, Item::Call { index, open: true, .. } if *index == call.index),
        );
        let index = match existing {
            Some(index) => index,
            None => {
                let call_id = call
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("call_{}{}", self.suffix, call.index));
                let name = call.function.name.clone().unwrap_or_default();
                let chat_index = call.index;
                self.open_item(
                    out,
                    "fc",
                    |id| Item::Call {
                        id,
                        call_id,
                        name,
                        arguments: String::new(),
                        index: chat_index,
                        open: true,
                    },
                    |_| false,
                )
            }
        };
        if let Some(delta) = call.function.arguments.filter(|a| !a.is_empty())
            && let Item::Call { id, arguments, .. } = &mut self.items[index]
        {
            arguments.push_str(&delta);
            let id = id.clone();
            self.emit(
                out,
                "response.function_call_arguments.delta",
                json!({
                    "item_id": id, "output_index": index, "delta": delta,
                }),
            );
        }
    }

    /// Ends every open item with its `.done` events.
    fn close_all(&mut self, out: &mut Vec<u8>) {
        let status = if self.finish.as_deref() == Some("length")
            || self.finish.as_deref() == Some("cancelled")
        {
            "incomplete"
        } else {
            "completed"
        };
        for index in 0..self.items.len() {
            if !self.items[index].is_open() {
                continue;
            }
            match &mut self.items[index] {
                Item::Message { open, .. }
                | Item::Reasoning { open, .. }
                | Item::Call { open, .. } => {
                    *open = false;
                }
            }
            match &self.items[index] {
                Item::Message {
                    id, text, logprobs, ..
                } => {
                    let (id, text, logprobs) = (id.clone(), text.clone(), logprobs.clone());
                    self.emit(
                        out,
                        "response.output_text.done",
                        json!({
                            "item_id": id, "output_index": index, "content_index": 0,
                            "text": text, "logprobs": logprobs,
                        }),
                    );
                    self.emit(
                        out,
                        "response.content_part.done",
                        json!({
                            "item_id": id, "output_index": index, "content_index": 0,
                            "part": text_part(&text, &logprobs),
                        }),
                    );
                }
                Item::Reasoning { id, text, .. } => {
                    let (id, text) = (id.clone(), text.clone());
                    self.emit(
                        out,
                        "response.reasoning_text.done",
                        json!({
                            "item_id": id, "output_index": index, "content_index": 0, "text": text,
                        }),
                    );
                    self.emit(
                        out,
                        "response.content_part.done",
                        json!({
                            "item_id": id, "output_index": index, "content_index": 0,
                            "part": reasoning_part(&text),
                        }),
                    );
                }
                Item::Call {
                    id,
                    name,
                    arguments,
                    ..
                } => {
                    let (id, name, arguments) = (id.clone(), name.clone(), arguments.clone());
                    self.emit(out, "response.function_call_arguments.done", json!({
                        "item_id": id, "output_index": index, "name": name, "arguments": arguments,
                    }));
                }
            }
            let body = self.items[index].body(status);
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": index, "item": body}),
            );
        }
    }

    fn fail(&mut self, error: Value, out: &mut Vec<u8>) {
        self.close_all(out);
        self.end = Some(End::Failed(error));
        let response = self.current();
        self.emit(out, "response.failed", json!({"response": response}));
        self.terminal_sent = true;
    }

    /// The terminal event, at `[DONE]` (after the usage chunk).
    fn terminal(&mut self, out: &mut Vec<u8>) {
        if self.terminal_sent {
            return;
        }
        self.close_all(out);
        let end = match self.finish.as_deref() {
            Some("stop" | "tool_calls" | "function_call") => End::Completed,
            Some("length") => End::Incomplete {
                status: "incomplete",
                reason: Some("max_output_tokens"),
            },
            Some("content_filter") => End::Incomplete {
                status: "incomplete",
                reason: Some("content_filter"),
            },
            Some("cancelled") => End::Incomplete {
                status: "cancelled",
                reason: None,
            },
            _ => End::Failed(
                json!({"code": "server_error", "message": "The response ended without a finish."}),
            ),
        };
        let kind = match &end {
            End::Completed => "response.completed",
            End::Incomplete { .. } => "response.incomplete",
            End::Failed(_) => "response.failed",
        };
        self.end = Some(end);
        let response = self.current();
        self.emit(out, kind, json!({"response": response}));
        self.terminal_sent = true;
    }

    /// The Response object as it stands.
    pub(crate) fn current(&self) -> Value {
        let status = match &self.end {
            None => "in_progress",
            Some(End::Completed) => "completed",
            Some(End::Incomplete { status, .. }) => status,
            Some(End::Failed(_)) => "failed",
        };
        let mut response = self.object(status);
        let item_status = if status == "completed" {
            "completed"
        } else {
            "incomplete"
        };
        response.insert(
            "output".into(),
            Value::Array(self.items.iter().map(|i| i.body(item_status)).collect()),
        );
        if let Some(End::Incomplete {
            reason: Some(reason),
            ..
        }) = &self.end
        {
            response.insert("incomplete_details".into(), json!({"reason": reason}));
        }
        if let Some(End::Failed(error)) = &self.end {
            response.insert("error".into(), error.clone());
        }
        if let Some(usage) = self.usage {
            response.insert(
                "usage".into(),
                json!({
                    "input_tokens": usage.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": usage.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                }),
            );
        }
        Value::Object(response)
    }

    fn object(&self, status: &str) -> Map<String, Value> {
        let mut response = self.skeleton.clone();
        response.insert("id".into(), Value::String(self.id.clone()));
        response.insert("object".into(), Value::String("response".into()));
        response.insert("status".into(), Value::String(status.to_owned()));
        for key in ["error", "incomplete_details", "usage"] {
            response.entry(key).or_insert(Value::Null);
        }
        response.entry("output").or_insert_with(|| json!([]));
        response
    }

    /// Writes one event, numbered, unless a resume has seen it.
    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut data: Value) {
        let Some(seq) = self.next_seq() else {
            return;
        };
        if let Value::Object(fields) = &mut data {
            fields.insert("type".into(), Value::String(kind.to_owned()));
            fields.insert("sequence_number".into(), json!(seq));
        }
        named_event(out, kind, &self.id, seq, |out| put_json(out, &data));
    }

    /// The next event's number; `None` when a resume has seen it.
    fn next_seq(&mut self) -> Option<u64> {
        let seq = self.seq;
        self.seq += 1;
        self.after.is_none_or(|after| seq > after).then_some(seq)
    }

    /// `response.output_text.delta`, the one event per token, written
    /// without a JSON tree (the same fields as [`Self::emit`] writes).
    fn text_delta(&mut self, out: &mut Vec<u8>, index: usize, delta: &str, logprobs: &[Value]) {
        let Some(seq) = self.next_seq() else {
            return;
        };
        let suffix = &self.suffix;
        named_event(out, "response.output_text.delta", &self.id, seq, |out| {
            out.extend_from_slice(b"{\"content_index\":0,\"delta\":");
            put_json(out, &delta);
            out.extend_from_slice(b",\"item_id\":\"msg_");
            out.extend_from_slice(suffix.as_bytes());
            put_json(out, &index);
            out.extend_from_slice(b"\",\"logprobs\":");
            put_json(out, &logprobs);
            out.extend_from_slice(b",\"output_index\":");
            put_json(out, &index);
            out.extend_from_slice(b",\"sequence_number\":");
            put_json(out, &seq);
            out.extend_from_slice(b",\"type\":\"response.output_text.delta\"}");
        });
    }
}
