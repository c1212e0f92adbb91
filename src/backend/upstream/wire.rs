//! What goes to an upstream and how its answer is read: the request body,
//! and its SSE stream in whatever dialect the server speaks (a role on every
//! chunk or none, no `[DONE]`, error events, odd finish reasons) turned
//! into plain steps.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use std::borrow::Cow;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::scan;
use super::sse::{SseEvent, SseParser};

use crate::backend::{ChoiceDelta, CompactString, FinishReason, GenerateRequest, Prompt, Usage};

/// The upstream path, body, and whether it is a chat completion.
pub(super) fn upstream_body(req: &GenerateRequest) -> (&'static str, Value, bool) {
    let mut body = json!({
        "model": req.model,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let chat = match &req.prompt {
        Prompt::Chat(messages) => {
            // As the client sent them, content parts flattened to text.
            body["messages"] = messages
                .iter()
                .map(|m| {
                    let mut message = m.extra.clone();
                    message.insert("role".into(), json!(m.role));
                    let empty = m.content.is_empty() && message.contains_key("tool_calls");
                    let content = if empty { Value::Null } else { json!(m.content) };
                    message.insert("content".into(), content);
                    Value::Object(message)
                })
                .collect();
            true
        }
        Prompt::Text(text) => {
            body["prompt"] = json!(text);
            false
        }
    };
    let s = &req.sampling;
    let optional = [
        ("max_tokens", req.max_tokens.map(Value::from)),
        ("temperature", s.temperature.map(Value::from)),
        ("top_p", s.top_p.map(Value::from)),
        ("top_k", s.top_k.map(Value::from)),
        ("seed", s.seed.map(Value::from)),
        ("presence_penalty", s.presence_penalty.map(Value::from)),
        ("frequency_penalty", s.frequency_penalty.map(Value::from)),
        ("repetition_penalty", s.repetition_penalty.map(Value::from)),
        ("stop", (!req.stop.is_empty()).then(|| json!(req.stop))),
        ("n", (req.choices > 1).then(|| Value::from(req.choices))),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    // What sluicegate does not own goes on unchanged; what it set wins.
    if let Value::Object(fields) = &mut body {
        for (key, value) in &req.extra {
            fields.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    let path = if chat {
        "/chat/completions"
    } else {
        "/completions"
    };
    (path, body, chat)
}

/// Why an upstream's stream ended without finishing.
pub(super) enum RelayError {
    /// The upstream said what went wrong, in an error event or an `error`
    /// object; the message is its own, credentials not yet removed.
    Reported(String),
    /// The stream broke: silence, a cut connection, something unreadable.
    Broken(String),
}

#[derive(Debug)]
pub(super) enum RelayStep {
    Text(CompactString),
    Delta(Box<ChoiceDelta>),
    Usage(Usage),
    Finished(FinishReason),
}

/// An upstream's SSE stream read as steps, whatever its dialect.
pub(super) struct Relay {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    events: SseParser,
    chat: bool,
    timeout: Duration,
    /// Seen a `finish_reason`: a missing `[DONE]` after it is no failure.
    finish: Option<FinishReason>,
    /// Steps decoded from one event, handed out one at a time.
    pending: VecDeque<RelayStep>,
    /// Where the scan decodes a text's escapes, kept from chunk to chunk.
    decoded: String,
}

impl Relay {
    pub(super) fn new(resp: reqwest::Response, chat: bool, timeout: Duration) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            events: SseParser::default(),
            chat,
            timeout,
            finish: None,
            pending: VecDeque::new(),
            decoded: String::new(),
        }
    }

    pub(super) async fn next(&mut self) -> Result<RelayStep, RelayError> {
        loop {
            if let Some(step) = self.pending.pop_front() {
                return Ok(step);
            }
            let Some(SseEvent { error, data }) = self.next_event().await? else {
                return match self.finish.take() {
                    // Ended without [DONE] but after the answer was
                    // complete: take it as the end.
                    Some(reason) => Ok(RelayStep::Finished(reason)),
                    None => Err(RelayError::Broken(
                        "the upstream closed the stream before the end".into(),
                    )),
                };
            };
            let data = std::str::from_utf8(&data)
                .map_err(|e| RelayError::Broken(format!("the upstream sent invalid UTF-8: {e}")))?
                .trim();
            if error {
                return Err(RelayError::Reported(error_message(data)));
            }
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                return Ok(RelayStep::Finished(
                    self.finish.take().unwrap_or(FinishReason::Stop),
                ));
            }
            // Nearly every chunk is one choice's text beside fields that
            // sluicegate sets itself: read without a parser.
            if self.scan(data) {
                continue;
            }
            // Most others (usage, escapes outside the text): read without
            // building a tree of values.
            if let Ok(plain) = serde_json::from_str::<PlainChunk<'_>>(data)
                && self.decode_plain(&plain)
            {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).map_err(|e| {
                RelayError::Broken(format!("the upstream sent something other than JSON: {e}"))
            })?;
            if let Some(error) = chunk.get("error") {
                return Err(RelayError::Reported(match error["message"].as_str() {
                    Some(message) => message.to_owned(),
                    None => error.to_string(),
                }));
            }
            self.decode(&chunk);
        }
    }

    /// The next event of the body, within the silence timeout. `None`:
    /// the body ended.
    async fn next_event(&mut self) -> Result<Option<SseEvent>, RelayError> {
        loop {
            if let Some(event) = self.events.next_event() {
                return Ok(Some(event));
            }
            match tokio::time::timeout(self.timeout, self.body.next()).await {
                Err(_) => return Err(RelayError::Broken("the upstream went silent".into())),
                Ok(Some(Ok(chunk))) => self.events.push(&chunk).map_err(RelayError::Broken)?,
                Ok(Some(Err(err))) => return Err(RelayError::Broken(err.to_string())),
                Ok(None) => {
                    self.events.close();
                    return Ok(self.events.next_event());
                }
            }
        }
    }

    /// A chunk whose choices are all the first one's text (and maybe its
    /// finish), with nothing else to carry: its steps, exactly as
    /// [`Self::decode`] would make them. `false`: not such a chunk, nothing
    /// done.
    fn decode_plain(&mut self, chunk: &PlainChunk<'_>) -> bool {
        if chunk.error.is_some()
            || chunk.choices.iter().any(|c| {
                c.index != 0
                    || c.logprobs.is_some()
                    || c.stop_reason.is_some()
                    || c.delta.as_ref().is_some_and(|d| d.extra())
            })
        {
            return false;
        }
        for choice in &chunk.choices {
            let text = if self.chat {
                choice.delta.as_ref().and_then(|d| d.content.as_deref())
            } else {
                choice.text.as_deref()
            };
            self.take(text, choice.finish_reason);
        }
        if let Some(usage) = &chunk.usage {
            self.pending.push_back(RelayStep::Usage(Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            }));
        }
        true
    }

    /// Takes the chunk `data` if the scan reads it; `false`: declined.
    fn scan(&mut self, data: &str) -> bool {
        let mut decoded = std::mem::take(&mut self.decoded);
        let scanned = scan::plain(data, self.chat, &mut decoded)
            .map(|plain| self.take(plain.text, plain.finish_reason));
        self.decoded = decoded;
        scanned.is_some()
    }

    /// The first choice's text and finish reason, from a chunk that
    /// carries nothing else of it.
    fn take(&mut self, text: Option<&str>, finish_reason: Option<&str>) {
        if let Some(reason) = finish_reason {
            self.finish = Some(map_finish(reason));
        }
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            self.pending.push_back(RelayStep::Text(text.into()));
        }
    }

    fn decode(&mut self, chunk: &Value) {
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            self.decode_choice(choice);
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count =
                |key: &str| u32::try_from(usage[key].as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
            self.pending.push_back(RelayStep::Usage(Usage {
                prompt_tokens: count("prompt_tokens"),
                completion_tokens: count("completion_tokens"),
            }));
        }
    }

    /// One choice of a chunk: plain text for the first choice's content
    /// alone (the common case, kept cheap); anything else as a delta with
    /// every field the upstream sent.
    fn decode_choice(&mut self, choice: &Value) {
        let index = choice["index"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0);
        let (text, fields) = if self.chat {
            let delta = &choice["delta"];
            let fields: serde_json::Map<String, Value> = delta
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(key, value)| {
                    !value.is_null() && key.as_str() != "role" && key.as_str() != "content"
                })
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            (delta["content"].as_str(), fields)
        } else {
            (choice["text"].as_str(), serde_json::Map::new())
        };
        let text = text.filter(|t| !t.is_empty());
        let logprobs = Some(&choice["logprobs"]).filter(|l| !l.is_null());
        let finish = choice["finish_reason"].as_str().map(map_finish);
        if index == 0 {
            if let Some(reason) = finish {
                self.finish = Some(reason);
            }
            // vLLM names the stop string that ended the answer.
            if finish == Some(FinishReason::Stop)
                && let Some(stop) = choice["stop_reason"].as_str()
            {
                self.pending
                    .push_back(RelayStep::Delta(Box::new(ChoiceDelta::stopped_at(
                        stop.to_owned(),
                    ))));
            }
            if fields.is_empty() && logprobs.is_none() {
                if let Some(text) = text {
                    self.pending.push_back(RelayStep::Text(text.into()));
                }
                return;
            }
        }
        let delta = ChoiceDelta {
            index,
            content: text.map(str::to_owned),
            fields,
            logprobs: logprobs.cloned(),
            // The first choice ends with the run; others on their own.
            finish: finish.filter(|_| index > 0),
            stop_sequence: None,
        };
        if delta.produces() || delta.logprobs.is_some() || delta.finish.is_some() {
            self.pending.push_back(RelayStep::Delta(Box::new(delta)));
        }
    }
}

/// The message of an error event's data: its `error.message` or `message`
/// when it is JSON, else the text itself.
fn error_message(data: &str) -> String {
    let json: Option<Value> = serde_json::from_str(data).ok();
    json.as_ref()
        .and_then(|v| v["error"]["message"].as_str().or(v["message"].as_str()))
        .unwrap_or(data)
        .to_owned()
}

/// A chunk read for [`Relay::decode_plain`]: the fields that matter, the
/// others (ids, model, timestamps: sluicegate sets its own) skipped.
#[derive(Deserialize)]
struct PlainChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<PlainChoice<'a>>,
    #[serde(default)]
    usage: Option<PlainUsage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct PlainChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<PlainDelta<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finish_reason: Option<&'a str>,
    #[serde(default)]
    logprobs: Option<IgnoredAny>,
    #[serde(default)]
    stop_reason: Option<IgnoredAny>,
}

/// A delta's role and content. The fields servers send as null beside
/// them are known here; any of them set, or any other field, sends the
/// chunk the long way.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, rename = "role")]
    _role: Option<IgnoredAny>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    function_call: Option<IgnoredAny>,
    #[serde(default)]
    refusal: Option<IgnoredAny>,
    #[serde(default)]
    reasoning_content: Option<IgnoredAny>,
    #[serde(default)]
    reasoning: Option<IgnoredAny>,
}

impl PlainDelta<'_> {
    fn extra(&self) -> bool {
        self.tool_calls.is_some()
            || self.function_call.is_some()
            || self.refusal.is_some()
            || self.reasoning_content.is_some()
            || self.reasoning.is_some()
    }
}

#[derive(Deserialize)]
struct PlainUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// Upstream finish reasons in the contract's; an unknown one is logged.
fn map_finish(reason: &str) -> FinishReason {
    match reason {
        "length" | "max_tokens" => FinishReason::Length,
        "cancelled" | "abort" | "aborted" => FinishReason::Cancelled,
        "stop" | "eos" | "end_turn" | "stop_sequence" => FinishReason::Stop,
        "tool_calls" | "function_call" | "tool_use" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        other => {
            tracing::info!(
                upstream_finish_reason = other,
                "unknown finish reason mapped to stop"
            );
            FinishReason::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ChatMessage, Sampling};

    #[test]
    fn the_body_carries_only_what_was_set_and_always_streams() {
        let req = GenerateRequest {
            model: "m".into(),
            prompt: Prompt::Chat(vec![ChatMessage::new("user", "hi")]),
            sampling: Sampling {
                temperature: Some(0.5),
                ..Sampling::default()
            },
            max_tokens: Some(7),
            stop: vec!["x".into()],
            ..GenerateRequest::default()
        };
        let (path, body, chat) = upstream_body(&req);
        assert_eq!((path, chat), ("/chat/completions", true));
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["stop"], json!(["x"]));
        assert!(body.get("top_k").is_none() && body.get("seed").is_none());
    }

    /// Ways a chunk is read, the shortest first.
    #[derive(Clone, Copy)]
    enum Way {
        Scan,
        Plain,
        Long,
    }

    /// A relay with no body, to hand chunks to.
    fn relay(chat: bool) -> Relay {
        Relay {
            body: Box::pin(futures_util::stream::empty()),
            events: SseParser::default(),
            chat,
            timeout: Duration::from_secs(1),
            finish: None,
            pending: VecDeque::new(),
            decoded: String::new(),
        }
    }

    /// The steps of one chunk's data, read one way; `None`: declined (or,
    /// the long way, not JSON).
    fn steps(data: &str, chat: bool, way: Way) -> Option<String> {
        let mut relay = relay(chat);
        match way {
            Way::Scan => relay.scan(data).then_some(())?,
            Way::Plain => {
                let chunk = serde_json::from_str::<PlainChunk<'_>>(data).ok()?;
                relay.decode_plain(&chunk).then_some(())?;
            }
            Way::Long => relay.decode(&serde_json::from_str(data).ok()?),
        }
        Some(format!("{:?} {:?}", relay.pending, relay.finish))
    }

    /// Chunks as servers send them, each one choice's text and nothing
    /// more, in the shapes the scan takes.
    const SCANNED: [&str; 11] = [
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1733400000,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
        r#"{"id":"x","choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}],"usage":null}"#,
        r#"{"choices": [{"finish_reason": null, "index": 0, "delta": {"content": "café ok"}}], "created": 1733400000.5, "system_fingerprint": "b1", "object": "chat.completion.chunk"}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"end","tool_calls":null,"refusal":null},"finish_reason":"length","stop_reason":null}]}"#,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"eos"}],"x":-0.25,"y":true,"z":false}"#,
        r#"{"choices":[],"error":null}"#,
        r#"{"choices":[{"index":0,"text":" legacy","finish_reason":null}]}"#,
        // The text's escapes, decoded as JSON defines them.
        r#"{"choices":[{"index":0,"delta":{"content":"He said \"hi\"\n\\ \/ \t\r\b\f"},"finish_reason":null}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"caf\u00e9 \u00E9 \ud83d\ude00 \u0000"}}]}"#,
        r#"{"choices":[{"index":0,"text":"\n\n```rust\nfn main() {}\n```","finish_reason":"stop"}]}"#,
        // Text that is not ASCII, long enough to be read a word at a time.
        r#"{"choices":[{"index":0,"delta":{"content":"naïve café — 東京の ünïcödé\n"},"finish_reason":null}]}"#,
    ];

    #[test]
    fn the_scan_reads_a_chunk_as_the_parser_does_or_declines() {
        for data in SCANNED {
            let chat = !data.contains(r#""text""#);
            let scanned = steps(data, chat, Way::Scan);
            assert!(scanned.is_some(), "{data}");
            assert_eq!(scanned, steps(data, chat, Way::Long), "{data}");
        }
        let declined = [
            // Escapes outside the text, a lone surrogate or an escape JSON
            // has not, usage, errors and other choices take a parser.
            r#"{"id":"a\u0062","choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a\ud83d b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a\ude00"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a\ud83d\u0041"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a\x41"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a\u00g1"}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}"#,
            r#"{"error":{"message":"no"}}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#,
            // Fields of the choice that are more than text.
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","custom":1}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop","stop_reason":"STOP"}]}"#,
            // What a parser might read otherwise: duplicates, nesting.
            r#"{"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[],"choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            r#"{"meta":{"k":1},"choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            // Not JSON.
            r#"{"choices":[{"index":00,"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}]} x"#,
            r#"{"n":1.,"choices":[]}"#,
            r#"{"n":1e999,"choices":[]}"#,
            r#"{"n":1234567890123456789012,"choices":[]}"#,
            "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\tb\"}}]}",
        ];
        for data in declined {
            assert_eq!(steps(data, true, Way::Scan), None, "{data}");
        }
        // A legacy chunk in a chat stream, and the other way round.
        assert_eq!(steps(SCANNED[6], true, Way::Scan), None);
        assert_eq!(steps(SCANNED[1], false, Way::Scan), None);
    }

    /// One relay reads a stream of chunks, some with escapes and some
    /// without, as the parser reads them: the buffer it decodes into
    /// carries nothing from one chunk to the next.
    #[test]
    fn one_relay_scans_chunk_after_chunk_as_the_parser_reads_them() {
        let chat: Vec<&str> = SCANNED
            .iter()
            .copied()
            .filter(|data| !data.contains(r#""text""#))
            .collect();
        let mut stream = chat.clone();
        stream.extend(chat.iter().rev());
        let (mut scanned, mut parsed) = (relay(true), relay(true));
        for data in stream {
            assert!(scanned.scan(data), "{data}");
            parsed.decode(&serde_json::from_str(data).expect("JSON"));
        }
        assert_eq!(
            format!("{:?}", scanned.pending),
            format!("{:?}", parsed.pending)
        );
    }

    /// Every one-byte change to a chunk the scan takes (a byte replaced,
    /// dropped or added): whatever the scan still takes, the parser reads
    /// as JSON to the same steps.
    #[test]
    fn the_scan_takes_nothing_a_parser_would_read_otherwise() {
        let bytes = b"\"\\{}[],:0-1.eE+ nulltruefalsex\x01";
        let mut checked = 0;
        for data in SCANNED {
            let chat = !data.contains(r#""text""#);
            for (at, _) in data.char_indices() {
                let (head, tail) = data.split_at(at);
                let rest = &tail[tail.chars().next().map_or(0, char::len_utf8)..];
                let mut changed = vec![format!("{head}{rest}")];
                for &byte in bytes {
                    let byte = char::from(byte);
                    changed.push(format!("{head}{byte}{tail}"));
                    changed.push(format!("{head}{byte}{rest}"));
                }
                for data in changed {
                    if let Some(scanned) = steps(&data, chat, Way::Scan) {
                        checked += 1;
                        assert_eq!(Some(scanned), steps(&data, chat, Way::Long), "{data}");
                    }
                }
            }
        }
        assert!(checked > 1_000, "only {checked} changed chunks were taken");
    }

    #[test]
    fn the_short_way_reads_a_chunk_as_the_long_way_does_or_declines() {
        let taken = [
            r#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"He said \"hi\"\n"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"end","tool_calls":null,"refusal":null},"finish_reason":"length","stop_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"eos"}],"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}"#,
            r#"{"choices":[{"index":0,"text":" legacy","finish_reason":null}]}"#,
        ];
        for data in taken {
            for chat in [true, false] {
                let short = steps(data, chat, Way::Plain);
                assert!(short.is_some(), "{data}");
                assert_eq!(short, steps(data, chat, Way::Long), "{data}");
            }
        }
        let declined = [
            r#"{"choices":[{"index":1,"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","reasoning_content":"hm"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","custom":1}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop","stop_reason":"STOP"}]}"#,
            r#"{"error":{"message":"no"}}"#,
        ];
        for data in declined {
            assert_eq!(steps(data, true, Way::Plain), None, "{data}");
        }
    }

    #[test]
    fn finish_reasons_map_into_the_contracts() {
        assert_eq!(map_finish("length"), FinishReason::Length);
        assert_eq!(map_finish("eos"), FinishReason::Stop);
        assert_eq!(map_finish("tool_calls"), FinishReason::ToolCalls);
        assert_eq!(map_finish("content_filter"), FinishReason::ContentFilter);
        assert_eq!(map_finish("abort"), FinishReason::Cancelled);
    }
}
