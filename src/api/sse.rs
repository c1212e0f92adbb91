//! SSE framing as API.md sets it: OpenAI chunks as `data:` events, each
//! with an `id:` line after its data, `[DONE]` last, and `: keep-alive`
//! comments (no blank line after them) while nothing else flows. Written by
//! hand because axum's `Sse` puts a blank line after its keep-alive.

use std::convert::Infallible;
use std::time::Duration;

use async_stream::stream;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use super::error::ApiError;
use super::wire::{ChatChunk, ChunkChoice, Delta, TextChoice, TextChunk, UsageBody};
use crate::backend::{BackendError, ChoiceDelta, FinishReason, Usage};
use crate::session::{EventEncoder, GenerationId, LogError, LogReader};
use crate::telemetry;

pub const KEEP_ALIVE: &[u8] = b": keep-alive\n";

/// Sent on a stream's first event: `EventSource` and fetch-event-source
/// then reconnect after 1 s (not their default 3 s), well within the
/// reattach grace.
pub const RETRY: &[u8] = b"retry: 1000\n";

/// Which OpenAI endpoint a generation answers, and so its chunk shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `/v1/chat/completions`: `chat.completion.chunk` with deltas.
    Chat,
    /// `/v1/completions`: `text_completion` with text choices.
    Legacy,
}

impl Flavor {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Self::Chat => "chatcmpl-",
            Self::Legacy => "cmpl-",
        }
    }
}

/// Turns one generation's steps into numbered SSE events. Event `n` has id
/// `<generation id>.<n>`: opaque to clients, parsed back by
/// [`parse_event_id`].
pub struct ChunkEncoder {
    id: String,
    created: u64,
    model: String,
    flavor: Flavor,
    seq: usize,
    /// Per choice, whether it has had its finish.
    finished: Vec<bool>,
    /// Carried by the opening chunk; see [`ChatChunk::x_skeleton`].
    skeleton: Option<serde_json::Value>,
    /// A text chunk's bytes before and after its text, made once: every
    /// token of a plain answer is then the text written between them.
    text_frame: Option<(Bytes, Bytes)>,
}

/// Stands for the text while a text chunk's frame is cut out.
const TEXT_MARK: &str = "\u{1}sluicegate-text\u{1}";

impl ChunkEncoder {
    pub fn new(id: &GenerationId, model: &str, created: u64, flavor: Flavor) -> Self {
        Self {
            id: id.as_str().to_owned(),
            created,
            model: model.to_owned(),
            flavor,
            seq: 0,
            finished: vec![false],
            skeleton: None,
            text_frame: None,
        }
    }

    /// For a request of `n` choices, each with its own finish.
    pub fn with_choices(mut self, n: u32) -> Self {
        self.finished = vec![false; n.max(1) as usize];
        self
    }

    /// For a Responses API generation: the opening chunk carries the
    /// Response object's fixed part.
    pub fn with_skeleton(mut self, skeleton: Option<serde_json::Value>) -> Self {
        self.skeleton = skeleton;
        self
    }

    fn next_seq(&mut self) -> usize {
        self.seq += 1;
        self.seq - 1
    }

    fn chunk(&mut self, delta: Delta<'_>, text: &str, finish: Option<FinishReason>) -> Bytes {
        self.choice_chunk(0, delta, text, None, finish, None)
    }

    fn choice_chunk(
        &mut self,
        index: u32,
        delta: Delta<'_>,
        text: &str,
        logprobs: Option<&serde_json::Value>,
        finish: Option<FinishReason>,
        stop_reason: Option<&str>,
    ) -> Bytes {
        let seq = self.next_seq();
        let finish_reason = finish.map(FinishReason::as_str);
        if finish.is_some()
            && let Some(done) = self.finished.get_mut(index as usize)
        {
            *done = true;
        }
        match self.flavor {
            Flavor::Chat => {
                let choices = [ChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason,
                    stop_reason,
                }];
                let chunk = ChatChunk {
                    id: &self.id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: &self.model,
                    choices: &choices,
                    usage: None,
                    x_skeleton: if seq == 0 {
                        self.skeleton.as_ref()
                    } else {
                        None
                    },
                };
                json_frame(&self.id, seq, &chunk)
            }
            Flavor::Legacy => {
                let chunk = TextChunk {
                    id: &self.id,
                    object: "text_completion",
                    created: self.created,
                    model: &self.model,
                    choices: [TextChoice {
                        text,
                        index,
                        logprobs,
                        finish_reason,
                    }],
                    usage: None,
                };
                json_frame(&self.id, seq, &chunk)
            }
        }
    }

    /// The first event, sent before the model's first token; it carries
    /// the `retry:` field.
    pub fn opening(&mut self) -> Bytes {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
            fields: None,
        };
        let event = self.chunk(delta, "", None);
        // `retry:` first: a cut after the id line then loses nothing more
        // than it would on any other event.
        let mut out = BytesMut::with_capacity(RETRY.len() + event.len());
        out.put_slice(RETRY);
        out.put_slice(&event);
        out.freeze()
    }

    /// Appends the text's event to `out`: for all but the first, the
    /// text chunk's frame around the text, with no buffer of its own.
    pub fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        if self.seq == 0 {
            return out.extend_from_slice(&self.slow_text(text));
        }
        if self.text_frame.is_none() {
            self.text_frame = self.cut_text_frame();
        }
        let Some((before, after)) = &self.text_frame else {
            return out.extend_from_slice(&self.slow_text(text));
        };
        out.reserve(before.len() + text.len() + after.len() + self.id.len() + 32);
        out.extend_from_slice(before);
        // Writing a string into memory cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
        out.extend_from_slice(after);
        put_id(out, &self.id, self.seq);
        self.seq += 1;
    }

    /// A text's event alone, for tests.
    #[cfg(test)]
    pub(crate) fn text_event(&mut self, text: &str) -> Bytes {
        let mut out = Vec::new();
        self.text(text, &mut out);
        out.into()
    }

    fn slow_text(&mut self, text: &str) -> Bytes {
        let delta = Delta {
            role: None,
            content: Some(text),
            fields: None,
        };
        self.chunk(delta, text, None)
    }

    /// A text chunk as [`Self::slow_text`] writes it, cut around its text
    /// and before its id line.
    fn cut_text_frame(&mut self) -> Option<(Bytes, Bytes)> {
        let seq = self.seq;
        let whole = self.slow_text(TEXT_MARK);
        self.seq = seq;
        let end = whole.windows(5).rposition(|w| w == b"\nid: ")?;
        let quoted = serde_json::to_string(TEXT_MARK).ok()?;
        let at = whole[..end]
            .windows(quoted.len())
            .rposition(|w| w == quoted.as_bytes())?;
        Some((whole.slice(..at), whole.slice(at + quoted.len()..end)))
    }

    /// A step richer than text: its delta fields, log probabilities, or a
    /// choice other than the first.
    pub fn delta(&mut self, step: &ChoiceDelta) -> Bytes {
        let text = step.content.as_deref().unwrap_or("");
        let delta = Delta {
            role: None,
            content: step.content.as_deref(),
            fields: (!step.fields.is_empty()).then_some(&step.fields),
        };
        self.choice_chunk(
            step.index,
            delta,
            text,
            step.logprobs.as_ref(),
            step.finish,
            step.stop_sequence.as_deref(),
        )
    }

    /// The first choice's last chunk.
    pub fn finish(&mut self, reason: FinishReason) -> Bytes {
        self.chunk(Delta::default(), "", Some(reason))
    }

    /// The last chunk of every choice that has not ended yet.
    pub fn finish_all(&mut self, reason: FinishReason) -> Vec<Bytes> {
        let open: Vec<u32> = (0u32..)
            .zip(&self.finished)
            .filter(|(_, done)| !**done)
            .map(|(i, _)| i)
            .collect();
        open.into_iter()
            .map(|i| self.choice_chunk(i, Delta::default(), "", None, Some(reason), None))
            .collect()
    }

    /// The `stream_options.include_usage` chunk: no choices.
    pub fn usage(&mut self, usage: Usage) -> Bytes {
        let seq = self.next_seq();
        let usage = Some(usage_body(usage));
        let chunk = ChatChunk {
            id: &self.id,
            object: match self.flavor {
                Flavor::Chat => "chat.completion.chunk",
                Flavor::Legacy => "text_completion",
            },
            created: self.created,
            model: &self.model,
            choices: &[],
            usage,
            x_skeleton: None,
        };
        json_frame(&self.id, seq, &chunk)
    }

    /// A failure after the headers went out.
    pub fn error(&mut self, err: &ApiError) -> Bytes {
        let seq = self.next_seq();
        frame(&self.id, seq, &err.body())
    }

    pub fn done(&mut self) -> Bytes {
        let seq = self.next_seq();
        frame(&self.id, seq, b"[DONE]")
    }
}

/// The error event and `[DONE]` that end a stream at event number `seq`
/// when its generation cannot: its owner died, or its log became
/// unreadable.
pub fn epilogue(id: &GenerationId, seq: usize, err: &ApiError) -> [Bytes; 2] {
    [
        frame(id.as_str(), seq, &err.body()),
        frame(id.as_str(), seq + 1, b"[DONE]"),
    ]
}

/// A stream's encoder as a generation's task drives it.
pub struct StreamEncoder {
    pub chunks: ChunkEncoder,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

impl EventEncoder for StreamEncoder {
    fn opening(&mut self) -> Bytes {
        self.chunks.opening()
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        self.chunks.text(text, out);
    }

    fn delta(&mut self, delta: &ChoiceDelta) -> Bytes {
        self.chunks.delta(delta)
    }

    fn finish(&mut self, reason: FinishReason) -> Vec<Bytes> {
        self.chunks.finish_all(reason)
    }

    fn usage(&mut self, usage: Usage) -> Option<Bytes> {
        self.include_usage.then(|| self.chunks.usage(usage))
    }

    fn error(&mut self, err: BackendError) -> Bytes {
        self.chunks.error(&ApiError::from(err))
    }

    fn done(&mut self) -> Bytes {
        self.chunks.done()
    }
}

/// `data: <data>\nid: <generation>.<seq>\n\n`
fn frame(id: &str, seq: usize, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + id.len() + 24);
    out.put_slice(b"data: ");
    out.put_slice(data);
    write_id(out, id, seq)
}

fn json_frame(id: &str, seq: usize, value: &impl Serialize) -> Bytes {
    let mut out = BytesMut::with_capacity(256).writer();
    out.get_mut().put_slice(b"data: ");
    // Serialising these plain structs into memory cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    write_id(out.into_inner(), id, seq)
}

fn write_id(mut out: BytesMut, id: &str, seq: usize) -> Bytes {
    put_id(&mut out, id, seq);
    out.freeze()
}

/// An event's id line and the blank line that ends it.
fn put_id(out: &mut impl BufMut, id: &str, seq: usize) {
    out.put_slice(b"\nid: ");
    out.put_slice(id.as_bytes());
    out.put_u8(b'.');
    out.put_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.put_slice(b"\n\n");
}

pub fn usage_body(usage: Usage) -> UsageBody {
    UsageBody {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
    }
}

/// The generation and the position an event id names; `None` for anything
/// malformed, which callers treat as unknown.
pub fn parse_event_id(id: &str) -> Option<(GenerationId, usize)> {
    let (generation, seq) = id.trim().rsplit_once('.')?;
    let seq = seq.parse().ok()?;
    let valid = !generation.is_empty()
        && generation
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| (GenerationId::from(generation), seq))
}

/// How a connection turns its log's events into the bytes it sends.
pub trait Framing: Send + 'static {
    /// What to send for a batch of whole events; may be empty.
    fn events(&mut self, batch: Bytes) -> Bytes;
    /// The end of a stream whose log cannot be read, at event `position`.
    fn unreadable(&mut self, id: &GenerationId, position: usize, err: &ApiError) -> Bytes;
    /// What goes out while nothing else flows: a comment, unless the
    /// dialect has an event for it (Anthropic's `ping`).
    fn keep_alive(&mut self) -> Bytes {
        Bytes::from_static(KEEP_ALIVE)
    }
}

/// The OpenAI streams: the log's events as they are.
pub struct Verbatim;

impl Framing for Verbatim {
    fn events(&mut self, batch: Bytes) -> Bytes {
        batch
    }

    fn unreadable(&mut self, id: &GenerationId, position: usize, err: &ApiError) -> Bytes {
        let [error, done] = epilogue(id, position, err);
        let mut end = BytesMut::with_capacity(error.len() + done.len());
        end.put_slice(&error);
        end.put_slice(&done);
        end.freeze()
    }
}

/// A `text/event-stream` response that sends what `reader` reads, to the
/// log's end, with keep-alive comments while idle. `hold` (the
/// connection's attachment to its generation) lives as long as the body.
pub fn event_stream<H: Send + 'static>(
    id: &GenerationId,
    reader: LogReader,
    hold: H,
    keep_alive: Duration,
) -> Response {
    framed_stream(id, reader, hold, keep_alive, Verbatim)
}

/// [`event_stream`] with the log's events framed by `framing`.
pub fn framed_stream<H: Send + 'static>(
    id: &GenerationId,
    mut reader: LogReader,
    hold: H,
    keep_alive: Duration,
    mut framing: impl Framing,
) -> Response {
    let generation = id.clone();
    let body = stream! {
        let _hold = hold;
        let mut left_early = DisconnectCounter(true);
        // One timer per connection, pushed back after each write.
        let idle = tokio::time::sleep(keep_alive);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                biased;
                next = reader.next() => match next {
                    Ok(Some(bytes)) => {
                        let bytes = framing.events(bytes);
                        if !bytes.is_empty() {
                            yield Ok::<_, Infallible>(bytes);
                        }
                    }
                    Ok(None) => {
                        left_early.0 = false;
                        break;
                    }
                    Err(err) => {
                        // The log cannot be read (Redis away for longer
                        // than a lease, or dropped before this reader got
                        // to its end): end this stream properly.
                        tracing::warn!(%err, completion_id = %generation, "stream ended: its log is unreadable");
                        let cause = match err {
                            LogError::Unreachable(_) => ApiError::SharedStateUnavailable,
                            LogError::Dropped => ApiError::LogDropped,
                            LogError::NotWritten(n) => ApiError::EventNotWritten(n),
                        };
                        yield Ok(framing.unreadable(&generation, reader.position(), &cause));
                        left_early.0 = false;
                        break;
                    }
                },
                () = &mut idle => yield Ok(framing.keep_alive()),
            }
            idle.as_mut().reset(tokio::time::Instant::now() + keep_alive);
        }
    };
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        headers.insert("x-completion-id", value);
    }
    response
}

/// Counts a connection dropped before it read its stream to the end.
struct DisconnectCounter(bool);

impl Drop for DisconnectCounter {
    fn drop(&mut self) {
        if self.0 {
            telemetry::disconnected();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder(flavor: Flavor) -> ChunkEncoder {
        ChunkEncoder::new(&GenerationId::from("chatcmpl-abc"), "echo", 7, flavor)
    }

    #[test]
    fn a_text_chunk_written_into_its_frame_is_the_serialised_one() {
        for flavor in [Flavor::Chat, Flavor::Legacy] {
            let (mut fast, mut slow) = (encoder(flavor), encoder(flavor));
            fast.opening();
            slow.opening();
            // Appended one after another, as into a log's buffer.
            let (mut appended, mut serialised) = (b"before".to_vec(), b"before".to_vec());
            for text in [
                "plain",
                " He said \"hi\"\n\ttab\\",
                "\u{1}ctl\u{7f} é 漢字 🦀",
                "",
                "sluicegate-text",
            ] {
                fast.text(text, &mut appended);
                serialised.extend_from_slice(&slow.slow_text(text));
                assert_eq!(appended, serialised, "{flavor:?} {text:?}");
            }
            assert_eq!(fast.done(), slow.done());
        }
    }

    fn data(frame: &Bytes) -> serde_json::Value {
        let text = std::str::from_utf8(frame).expect("utf-8");
        let json = text
            .strip_prefix(std::str::from_utf8(RETRY).expect("ascii"))
            .unwrap_or(text)
            .strip_prefix("data: ")
            .and_then(|t| t.split_once('\n'))
            .expect("data line")
            .0;
        serde_json::from_str(json).expect("json")
    }

    #[test]
    fn frames_put_the_id_after_the_data_and_number_events() {
        let mut e = encoder(Flavor::Chat);
        let first = e.opening();
        let text = std::str::from_utf8(&first).expect("utf-8");
        assert!(text.starts_with("retry: 1000\ndata: {"));
        assert!(text.ends_with("}\nid: chatcmpl-abc.0\n\n"));
        assert_eq!(text.matches('\n').count(), 4);
        let token = e.text_event("x");
        assert!(
            std::str::from_utf8(&token)
                .expect("utf-8")
                .ends_with("}\nid: chatcmpl-abc.1\n\n")
        );
        let done = e.done();
        assert_eq!(&done[..], b"data: [DONE]\nid: chatcmpl-abc.2\n\n");
    }

    #[test]
    fn chat_chunks_have_the_openai_shape() {
        let mut e = encoder(Flavor::Chat);
        let opening = data(&e.opening());
        assert_eq!(opening["object"], "chat.completion.chunk");
        assert_eq!(opening["choices"][0]["delta"]["role"], "assistant");
        assert!(opening["choices"][0]["finish_reason"].is_null());
        let token = data(&e.text_event("hi \"there\"\n"));
        assert_eq!(token["choices"][0]["delta"]["content"], "hi \"there\"\n");
        assert!(token["choices"][0]["delta"].get("role").is_none());
        let finish = data(&e.finish(FinishReason::Cancelled));
        assert_eq!(finish["choices"][0]["finish_reason"], "cancelled");
        assert_eq!(finish["choices"][0]["delta"], serde_json::json!({}));
        let usage = data(&e.usage(Usage {
            prompt_tokens: 2,
            completion_tokens: 3,
        }));
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
        for chunk in [&opening, &token, &finish, &usage] {
            assert_eq!(chunk["id"], "chatcmpl-abc");
            assert_eq!(chunk["created"], 7);
            assert_eq!(chunk["model"], "echo");
        }
    }

    #[test]
    fn legacy_chunks_carry_text() {
        let mut e = encoder(Flavor::Legacy);
        let token = data(&e.text_event(" word"));
        assert_eq!(token["object"], "text_completion");
        assert_eq!(token["choices"][0]["text"], " word");
    }

    #[test]
    fn event_ids_parse_back_and_forgeries_do_not() {
        let (generation, seq) = parse_event_id("chatcmpl-abc.12").expect("parses");
        assert_eq!(generation.as_str(), "chatcmpl-abc");
        assert_eq!(seq, 12);
        for bad in [
            "",
            "chatcmpl-abc",
            ".3",
            "x.-1",
            "x.1e3",
            "a b.1",
            "x.99999999999999999999999",
        ] {
            assert!(parse_event_id(bad).is_none(), "{bad:?}");
        }
    }
}
