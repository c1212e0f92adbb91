//! What the dialect transcoders (Responses, Messages) read of the chat
//! chunk events a generation's log holds, borrowed from the log's bytes
//! where no escape stands in the way, and how they write their named
//! events. One per token is the hot path: no JSON tree on the way in or
//! out for plain text.

use std::borrow::Cow;
use std::io::Write as _;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::sse::RETRY;
use crate::session::{LogError, LogReader};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Chunk<'a> {
    #[serde(default, borrow)]
    pub(crate) choices: Vec<Choice<'a>>,
    pub(crate) usage: Option<ChunkUsage>,
    pub(crate) error: Option<Value>,
    /// The opening chunk's fixed part of the dialect's answer object.
    pub(crate) x_skeleton: Option<Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Choice<'a> {
    #[serde(default, borrow)]
    pub(crate) delta: Delta<'a>,
    pub(crate) logprobs: Option<ChoiceLogprobs>,
    #[serde(borrow)]
    pub(crate) finish_reason: Option<Cow<'a, str>>,
    /// The stop sequence that ended the choice.
    pub(crate) stop_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Delta<'a> {
    #[serde(borrow)]
    pub(crate) content: Option<Cow<'a, str>>,
    /// Reasoning as upstreams send it (either name).
    #[serde(borrow)]
    pub(crate) reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) reasoning: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(crate) tool_calls: Vec<ToolCallDelta>,
}

impl<'a> Delta<'a> {
    /// The reasoning text of this delta, if any.
    pub(crate) fn take_reasoning(&mut self) -> Option<Cow<'a, str>> {
        self.reasoning_content
            .take()
            .or_else(|| self.reasoning.take())
            .filter(|r| !r.is_empty())
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ToolCallDelta {
    #[serde(default)]
    pub(crate) index: usize,
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) function: FunctionDelta,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct FunctionDelta {
    pub(crate) name: Option<String>,
    pub(crate) arguments: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ChoiceLogprobs {
    #[serde(default)]
    pub(crate) content: Vec<Value>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(crate) struct ChunkUsage {
    #[serde(default)]
    pub(crate) prompt_tokens: u64,
    #[serde(default)]
    pub(crate) completion_tokens: u64,
}

/// What a data line of the log holds.
pub(crate) enum LogEvent<'a> {
    /// A chunk of first-choice text and nothing else: the one event per
    /// token, recognised without parsing the whole chunk.
    Text(Cow<'a, str>),
    Chunk(Chunk<'a>),
    Done,
}

/// What stands around the text of a plain text chunk as
/// [`super::sse::ChunkEncoder`] writes it.
const TEXT_BEFORE: &[u8] = b"\"choices\":[{\"index\":0,\"delta\":{\"content\":";
const TEXT_AFTER: &[u8] = b"},\"logprobs\":null,\"finish_reason\":null}]}";

/// The text of a chunk that holds nothing but first-choice text; `None`
/// for any other chunk, which then takes the full parse.
fn plain_text(data: &[u8]) -> Option<Cow<'_, str>> {
    let head = data.strip_suffix(TEXT_AFTER)?;
    // The text's opening quote: the last quote before its end that no
    // backslash escapes (the text is short; the chunk's head is not read).
    let body = head.strip_suffix(b"\"")?;
    let mut open = body.len();
    loop {
        open = memchr::memrchr(b'"', &body[..open])?;
        let backslashes = body[..open]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            break;
        }
    }
    if !body[..open].ends_with(TEXT_BEFORE) {
        return None;
    }
    let Text(text) = serde_json::from_slice(&head[open..]).ok()?;
    Some(text)
}

/// A JSON string, borrowed when it has no escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// The events of whole log events (`data:` and `id:` lines, each event
/// ended by a blank line), skipping anything that is not a chat chunk
/// (the log holds only what sluicegate encoded: that would be a bug).
pub(crate) fn log_events(events: &[u8]) -> impl Iterator<Item = LogEvent<'_>> {
    events
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data: "))
        .filter_map(|data| {
            if data == b"[DONE]" {
                return Some(LogEvent::Done);
            }
            if let Some(text) = plain_text(data) {
                return Some(LogEvent::Text(text));
            }
            match serde_json::from_slice(data) {
                Ok(chunk) => Some(LogEvent::Chunk(chunk)),
                Err(_) => {
                    tracing::warn!("an event of the log is not a chat chunk; skipped");
                    None
                }
            }
        })
}

/// Writes one named event, `event: <kind>`, its data as `data` writes it
/// (one line of JSON), and `id: <id>.<seq>`; the stream's first event also
/// carries `retry:`.
pub(crate) fn named_event(
    out: &mut Vec<u8>,
    kind: &str,
    id: &str,
    seq: u64,
    data: impl FnOnce(&mut Vec<u8>),
) {
    if seq == 0 {
        out.extend_from_slice(RETRY);
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    data(out);
    let _ = write!(out, "\nid: {id}.{seq}\n\n");
}

/// Hands `absorb` every event of a log from the reader's position: to its
/// end, or with `wait` false, to what is there now. The error that cut it
/// short, if one did.
pub(crate) async fn read_log(
    reader: &mut LogReader,
    wait: bool,
    mut absorb: impl FnMut(&[u8]),
) -> Result<(), LogError> {
    loop {
        let next = if wait {
            reader.next().await
        } else {
            reader.next_now().await
        };
        match next? {
            Some(events) => absorb(&events),
            None => return Ok(()),
        }
    }
}

/// `value` as JSON into `out`.
pub(crate) fn put_json(out: &mut Vec<u8>, value: &impl serde::Serialize) {
    // Serialising into memory cannot fail.
    let _ = serde_json::to_writer(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sse::{ChunkEncoder, Flavor};
    use crate::backend::FinishReason;
    use crate::session::GenerationId;

    fn kinds(frame: &[u8]) -> Vec<String> {
        log_events(frame)
            .map(|e| match e {
                LogEvent::Text(text) => format!("text {text}"),
                LogEvent::Chunk(_) => "chunk".to_owned(),
                LogEvent::Done => "done".to_owned(),
            })
            .collect()
    }

    #[test]
    fn plain_text_chunks_are_recognised_and_nothing_else_is() {
        let mut e = ChunkEncoder::new(&GenerationId::from("chatcmpl-a"), "m", 1, Flavor::Chat);
        assert_eq!(kinds(&e.opening()), ["chunk"]);
        assert_eq!(
            kinds(&e.text_event("a \"quoted\"\n word")),
            ["text a \"quoted\"\n word"]
        );
        for tricky in ["ends in a backslash \\", "\\\"", "\"", ""] {
            assert_eq!(
                kinds(&e.text_event(tricky)),
                [format!("text {tricky}")],
                "{tricky:?}"
            );
        }
        assert_eq!(kinds(&e.finish(FinishReason::Stop)), ["chunk"]);
        assert_eq!(kinds(&e.done()), ["done"]);
        // A text with anything more (a second choice, logprobs) is parsed.
        let richer = br#"data: {"choices":[{"index":0,"delta":{"content":"x"},"logprobs":{"content":[]},"finish_reason":null}]}"#;
        assert_eq!(kinds(richer), ["chunk"]);
    }
}
