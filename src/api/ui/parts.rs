//! The AI SDK's UI message stream, transcoded on the fly from the OpenAI
//! chunk events a generation's log holds: one generation, two encodings.
//! Pure: whole log events in, `data:` parts out.
//!
//! The part shapes are the `uiMessageChunkSchema` of the `ai` npm package
//! (`src/ui-message-stream/ui-message-chunks.ts`, version 6.0.325, the one
//! the client tests pin). Its `finish` part allows `stop`, `length`,
//! `content-filter`, `tool-calls`, `error` and `other`: sluicegate's
//! `cancelled` becomes `other`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::api::sse::RETRY;

/// The end of every UI message stream.
const DONE: &[u8] = b"data: [DONE]\n\n";

/// One part of the UI message stream.
#[derive(Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
enum Part<'a> {
    Start { message_id: &'a str },
    StartStep,
    TextStart { id: &'a str },
    TextDelta { id: &'a str, delta: &'a str },
    TextEnd { id: &'a str },
    ReasoningStart { id: &'a str },
    ReasoningDelta { id: &'a str, delta: &'a str },
    ReasoningEnd { id: &'a str },
    FinishStep,
    Finish { finish_reason: &'static str },
    Error { error_text: &'a str },
}

/// What the transcoder reads of an OpenAI event: a chunk (chat or legacy),
/// a usage chunk (no choices) or an error.
#[derive(Debug, Default, Deserialize)]
struct Event {
    #[serde(default)]
    choices: Vec<Choice>,
    error: Option<ErrorBody>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    /// The legacy `/v1/completions` chunk's text.
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    content: Option<String>,
    /// Reasoning as upstreams send it (either name).
    reasoning_content: Option<String>,
    reasoning: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
}

const TEXT_ID: &str = "text-0";
const REASONING_ID: &str = "reasoning-0";

/// One connection's transcoding state. A stream read from the log's first
/// event always produces the same parts, so a resume that replays from
/// the start reproduces the message exactly.
#[derive(Debug)]
pub(crate) struct Transcoder {
    message_id: String,
    started: bool,
    text_open: bool,
    reasoning_open: bool,
    finished: bool,
}

impl Transcoder {
    /// `message_id` names the assistant message the parts build.
    pub(crate) fn new(message_id: &str) -> Self {
        Self {
            message_id: message_id.to_owned(),
            started: false,
            text_open: false,
            reasoning_open: false,
            finished: false,
        }
    }

    /// The parts for whole log events (`data:` and `id:` lines, each event
    /// ended by a blank line), possibly none.
    pub(crate) fn events(&mut self, events: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        for event in events.split(|&b| b == b'\n').filter_map(data_line) {
            self.event(event, &mut out);
        }
        out.freeze()
    }

    /// The end of a stream whose log cannot be read any more.
    pub(crate) fn unreadable(&mut self, message: &str) -> Bytes {
        let mut out = BytesMut::new();
        self.start(&mut out);
        put(
            &mut out,
            &Part::Error {
                error_text: message,
            },
        );
        out.put_slice(DONE);
        out.freeze()
    }

    fn event(&mut self, data: &[u8], out: &mut BytesMut) {
        self.start(out);
        if data == b"[DONE]" {
            out.put_slice(DONE);
            return;
        }
        // The log holds only what sluicegate encoded; anything else would
        // be a bug, and is skipped rather than sent to the page.
        let Ok(event) = serde_json::from_slice::<Event>(data) else {
            tracing::warn!("an event of the log is not an OpenAI chunk; skipped");
            return;
        };
        if let Some(error) = event.error {
            put(
                out,
                &Part::Error {
                    error_text: &error.message,
                },
            );
            return;
        }
        // Only choice 0: the UI message stream has one message.
        let Some(choice) = event.choices.into_iter().next() else {
            return; // the usage chunk
        };
        let reasoning = choice
            .delta
            .reasoning_content
            .or(choice.delta.reasoning)
            .filter(|r| !r.is_empty());
        if let Some(reasoning) = reasoning {
            self.close_text(out);
            if !self.reasoning_open {
                self.reasoning_open = true;
                put(out, &Part::ReasoningStart { id: REASONING_ID });
            }
            put(
                out,
                &Part::ReasoningDelta {
                    id: REASONING_ID,
                    delta: &reasoning,
                },
            );
        }
        let text = choice
            .delta
            .content
            .or(choice.text)
            .filter(|t| !t.is_empty());
        if let Some(text) = text {
            self.close_reasoning(out);
            if !self.text_open {
                self.text_open = true;
                put(out, &Part::TextStart { id: TEXT_ID });
            }
            put(
                out,
                &Part::TextDelta {
                    id: TEXT_ID,
                    delta: &text,
                },
            );
        }
        if let Some(reason) = choice.finish_reason
            && !self.finished
        {
            self.finished = true;
            self.close_reasoning(out);
            self.close_text(out);
            put(out, &Part::FinishStep);
            put(
                out,
                &Part::Finish {
                    finish_reason: finish_reason(&reason),
                },
            );
        }
    }

    /// `start` and `start-step`, once, before anything else, after the
    /// `retry:` field every stream of this server opens with.
    fn start(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            out.put_slice(RETRY);
            put(
                out,
                &Part::Start {
                    message_id: &self.message_id,
                },
            );
            put(out, &Part::StartStep);
        }
    }

    fn close_text(&mut self, out: &mut BytesMut) {
        if self.text_open {
            self.text_open = false;
            put(out, &Part::TextEnd { id: TEXT_ID });
        }
    }

    fn close_reasoning(&mut self, out: &mut BytesMut) {
        if self.reasoning_open {
            self.reasoning_open = false;
            put(out, &Part::ReasoningEnd { id: REASONING_ID });
        }
    }
}

/// An OpenAI finish reason as the UI message stream's `finish` part names
/// it; `cancelled` (and anything unknown) is `other`.
fn finish_reason(openai: &str) -> &'static str {
    match openai {
        "stop" => "stop",
        "length" => "length",
        "tool_calls" | "function_call" => "tool-calls",
        "content_filter" => "content-filter",
        _ => "other",
    }
}

/// The data of an event's `data:` line; `id:`, `retry:` and blank lines
/// carry nothing the UI stream needs.
fn data_line(line: &[u8]) -> Option<&[u8]> {
    line.strip_prefix(b"data: ")
}

fn put(out: &mut BytesMut, part: &Part<'_>) {
    out.put_slice(b"data: ");
    let mut writer = out.writer();
    // Serialising these plain values into memory cannot fail.
    let _ = serde_json::to_writer(&mut writer, part);
    writer.into_inner().put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;
    use crate::api::sse::{ChunkEncoder, Flavor};
    use crate::backend::FinishReason;
    use crate::session::GenerationId;
    use serde_json::{Value, json};

    fn parts(bytes: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(bytes).expect("UTF-8");
        let text = text
            .strip_prefix(std::str::from_utf8(RETRY).expect("ascii"))
            .unwrap_or(text);
        assert!(!text.contains("retry:"), "retry once, first: {text:?}");
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text:?}");
        text.split_terminator("\n\n")
            .map(|event| {
                let data = event.strip_prefix("data: ").expect("only data lines");
                assert!(!data.contains('\n'), "one line per part: {data:?}");
                if data == "[DONE]" {
                    json!("[DONE]")
                } else {
                    serde_json::from_str(data).expect("JSON")
                }
            })
            .collect()
    }

    fn encoder(flavor: Flavor) -> ChunkEncoder {
        ChunkEncoder::new(&GenerationId::from("chatcmpl-abc"), "echo", 7, flavor)
    }

    #[test]
    fn a_finished_answer_is_one_text_part_between_start_and_finish() {
        let mut e = encoder(Flavor::Chat);
        let log = [
            e.opening(),
            e.text_event("Hello"),
            e.text_event(" \"world\"\n"),
            e.finish(FinishReason::Stop),
            e.done(),
        ];
        let mut t = Transcoder::new("chatcmpl-abc");
        let out: Vec<u8> = log.iter().flat_map(|ev| t.events(ev).to_vec()).collect();
        assert!(out.starts_with(RETRY), "the stream opens with retry:");
        assert_eq!(
            parts(&out),
            [
                json!({"type": "start", "messageId": "chatcmpl-abc"}),
                json!({"type": "start-step"}),
                json!({"type": "text-start", "id": "text-0"}),
                json!({"type": "text-delta", "id": "text-0", "delta": "Hello"}),
                json!({"type": "text-delta", "id": "text-0", "delta": " \"world\"\n"}),
                json!({"type": "text-end", "id": "text-0"}),
                json!({"type": "finish-step"}),
                json!({"type": "finish", "finishReason": "stop"}),
                json!("[DONE]"),
            ]
        );
    }

    #[test]
    fn batches_transcode_like_single_events() {
        let mut e = encoder(Flavor::Chat);
        let log = [
            e.opening(),
            e.text_event("a"),
            e.text_event(" b"),
            e.finish(FinishReason::Length),
            e.usage(crate::backend::Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
            }),
            e.done(),
        ];
        let one_by_one: Vec<u8> = {
            let mut t = Transcoder::new("m");
            log.iter().flat_map(|ev| t.events(ev).to_vec()).collect()
        };
        let batched = Transcoder::new("m").events(&log.concat());
        assert_eq!(&batched[..], &one_by_one[..]);
        let all = parts(&batched);
        assert!(all.contains(&json!({"type": "finish", "finishReason": "length"})));
        assert_eq!(all.len(), 9, "the usage chunk adds nothing: {all:?}");
    }

    #[test]
    fn finish_reasons_are_the_schemas() {
        for (reason, ui) in [
            (FinishReason::Stop, "stop"),
            (FinishReason::Length, "length"),
            (FinishReason::Cancelled, "other"),
        ] {
            let mut e = encoder(Flavor::Chat);
            let mut t = Transcoder::new("m");
            t.events(&e.opening());
            let out = parts(&t.events(&e.finish(reason)));
            assert_eq!(
                out,
                [
                    json!({"type": "finish-step"}),
                    json!({"type": "finish", "finishReason": ui})
                ],
                "no text part was opened, none is closed"
            );
        }
        assert_eq!(finish_reason("tool_calls"), "tool-calls");
        assert_eq!(finish_reason("content_filter"), "content-filter");
        assert_eq!(finish_reason("something new"), "other");
    }

    #[test]
    fn an_error_event_becomes_an_error_part_then_done() {
        let mut e = encoder(Flavor::Chat);
        let mut t = Transcoder::new("m");
        t.events(&e.opening());
        t.events(&e.text_event("partial"));
        let out = parts(&t.events(&[e.error(&ApiError::BackendUnavailable), e.done()].concat()));
        assert_eq!(out[0]["type"], "error");
        assert!(
            out[0]["errorText"]
                .as_str()
                .is_some_and(|m| m.contains("unavailable"))
        );
        assert_eq!(out[1], json!("[DONE]"));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn legacy_chunks_and_reasoning_are_transcoded_too() {
        let mut e = encoder(Flavor::Legacy);
        let mut t = Transcoder::new("m");
        t.events(&e.opening());
        let out = parts(&t.events(&e.text_event("once")));
        assert_eq!(out[0]["type"], "text-start");
        assert_eq!(out[1]["delta"], "once");

        let mut t = Transcoder::new("m");
        let reasoning = br#"data: {"choices":[{"index":0,"delta":{"reasoning_content":"think"}}]}
id: x.1

data: {"choices":[{"index":0,"delta":{"content":"answer"}}]}
id: x.2

data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}
id: x.3

"#;
        let types: Vec<Value> = parts(&t.events(reasoning))
            .iter()
            .map(|p| p["type"].clone())
            .collect();
        assert_eq!(
            types,
            [
                "start",
                "start-step",
                "reasoning-start",
                "reasoning-delta",
                "reasoning-end",
                "text-start",
                "text-delta",
                "text-end",
                "finish-step",
                "finish"
            ]
        );
    }

    #[test]
    fn an_unreadable_log_still_ends_the_stream() {
        let mut t = Transcoder::new("m");
        let out = parts(&t.unreadable("Redis is unreachable"));
        assert_eq!(out[0]["type"], "start");
        assert_eq!(
            out[2],
            json!({"type": "error", "errorText": "Redis is unreachable"})
        );
        assert_eq!(out[3], json!("[DONE]"));
    }
}
