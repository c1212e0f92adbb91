//! The `openai` backend: relays generations to OpenAI-compatible servers
//! (vLLM, llama.cpp, Ollama, any OpenAI API). Each request goes to the
//! upstream with the fewest outstanding requests; one that refuses, times
//! out or fails before the first token is retried on another without the
//! client noticing; a failed upstream is skipped and probed in the
//! background. Whatever an upstream streams, the server re-frames it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_stream::stream;
use async_trait::async_trait;
use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Accepted, Backend, BackendError, Capabilities, FinishReason, GenerateRequest, ModelCard,
    Prompt, TokenEvent, Usage,
};

/// How long the model list is reused before asking the upstreams again.
const MODELS_TTL: Duration = Duration::from_secs(30);
/// How often a down upstream is probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);

pub struct UpstreamConfig {
    /// Base URLs, with or without the trailing `/v1`.
    pub urls: Vec<String>,
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
}

pub struct UpstreamBackend {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: Vec<Upstream>,
    client: reqwest::Client,
    api_key: Option<String>,
    first_byte_timeout: Duration,
    models: Mutex<Option<ModelList>>,
}

/// Every (upstream index, model) pair, and when it was asked.
struct ModelList {
    fetched: Instant,
    models: Vec<(usize, ModelCard)>,
}

struct Upstream {
    /// Ends in `/v1`.
    base: String,
    outstanding: AtomicUsize,
    down: AtomicBool,
}

/// Counts a request as outstanding on its upstream while it lives.
struct Outstanding(Arc<Inner>, usize);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.upstreams[self.1]
            .outstanding
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why an attempt failed, and whether another upstream may be tried.
enum Failure {
    /// Refused, timed out, 5xx: try another upstream.
    Retry(String),
    /// The upstream said no (4xx): the client gets the same answer.
    Final(BackendError),
}

impl UpstreamBackend {
    pub fn new(config: UpstreamConfig) -> Result<Self, BackendError> {
        // reqwest is built without a bundled TLS provider (ring is already
        // here for the server's own TLS); it reads the process default.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| BackendError::Unavailable(format!("HTTP client: {e}")))?;
        let upstreams = config
            .urls
            .iter()
            .map(|url| {
                let url = url.trim_end_matches('/');
                Upstream {
                    base: if url.ends_with("/v1") {
                        url.to_owned()
                    } else {
                        format!("{url}/v1")
                    },
                    outstanding: AtomicUsize::new(0),
                    down: AtomicBool::new(false),
                }
            })
            .collect();
        let inner = Arc::new(Inner {
            upstreams,
            client,
            api_key: config.api_key,
            first_byte_timeout: config.first_byte_timeout,
            models: Mutex::new(None),
        });
        tokio::spawn(probe_loop(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }
}

/// Marks down upstreams up again once they answer `/models`.
async fn probe_loop(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        for (i, upstream) in inner.upstreams.iter().enumerate() {
            if upstream.down.load(Ordering::Acquire) && inner.list_models(i).await.is_ok() {
                tracing::info!(upstream = %upstream.base, "upstream is back");
                upstream.down.store(false, Ordering::Release);
            }
        }
    }
}

impl Inner {
    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    async fn list_models(&self, index: usize) -> Result<Vec<ModelCard>, String> {
        let upstream = &self.upstreams[index];
        let resp = tokio::time::timeout(
            self.first_byte_timeout,
            self.request(reqwest::Method::GET, format!("{}/models", upstream.base))
                .send(),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        Ok(body["data"]
            .as_array()
            .map(|models| {
                models
                    .iter()
                    .filter_map(|m| {
                        Some(ModelCard {
                            id: m["id"].as_str()?.to_owned(),
                            owned_by: m["owned_by"].as_str().unwrap_or("upstream").to_owned(),
                            context_length: m["context_length"]
                                .as_u64()
                                .or_else(|| m["max_model_len"].as_u64())
                                .and_then(|n| u32::try_from(n).ok()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Every model of every reachable upstream, cached for a while.
    async fn models(&self) -> Vec<(usize, ModelCard)> {
        let mut cached = self.models.lock().await;
        if let Some(list) = cached.as_ref().filter(|l| l.fetched.elapsed() < MODELS_TTL) {
            return list.models.clone();
        }
        let mut all = Vec::new();
        for i in 0..self.upstreams.len() {
            match self.list_models(i).await {
                Ok(models) => all.extend(models.into_iter().map(|m| (i, m))),
                Err(err) => {
                    tracing::warn!(upstream = %self.upstreams[i].base, %err, "listing models failed");
                    self.upstreams[i].down.store(true, Ordering::Release);
                }
            }
        }
        if !all.is_empty() {
            *cached = Some(ModelList {
                fetched: Instant::now(),
                models: all.clone(),
            });
        }
        all
    }

    /// The least busy upstream among `serving` not yet `tried`, preferring
    /// those not marked down (a down one may be back, so it is the fallback).
    fn pick(&self, serving: &[usize], tried: &[usize]) -> Option<usize> {
        let load = |i: &usize| self.upstreams[*i].outstanding.load(Ordering::Acquire);
        let untried = || serving.iter().copied().filter(|i| !tried.contains(i));
        untried()
            .filter(|&i| !self.upstreams[i].down.load(Ordering::Acquire))
            .min_by_key(load)
            .or_else(|| untried().min_by_key(load))
    }

    fn mark_down(&self, index: usize, why: &str) {
        let upstream = &self.upstreams[index];
        if !upstream.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(upstream = %upstream.base, why, "upstream marked down");
        }
    }

    /// Sends the request to one upstream and waits for its headers.
    async fn open(
        self: &Arc<Self>,
        index: usize,
        path: &str,
        body: &Value,
    ) -> Result<(reqwest::Response, Outstanding), Failure> {
        let upstream = &self.upstreams[index];
        upstream.outstanding.fetch_add(1, Ordering::AcqRel);
        let outstanding = Outstanding(Arc::clone(self), index);
        let send = self
            .request(reqwest::Method::POST, format!("{}{path}", upstream.base))
            .json(body)
            .send();
        let resp = match tokio::time::timeout(self.first_byte_timeout, send).await {
            Err(_) => {
                return Err(Failure::Retry(
                    "no answer before the first-byte timeout".into(),
                ));
            }
            Ok(Err(err)) => return Err(Failure::Retry(err.to_string())),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if status.is_server_error() {
            return Err(Failure::Retry(format!("status {status}")));
        }
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let message = resp
                .json::<Value>()
                .await
                .ok()
                .and_then(|b| b["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("the upstream answered {status}"));
            return Err(Failure::Final(BackendError::Upstream {
                status: status.as_u16(),
                message,
                retry_after,
            }));
        }
        Ok((resp, outstanding))
    }
}

#[async_trait]
impl Backend for UpstreamBackend {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_choices: 1,
            // The upstreams queue and batch; this only bounds what is open.
            default_concurrency: 256,
        }
    }

    async fn models(&self) -> Result<Vec<ModelCard>, BackendError> {
        let mut seen = std::collections::BTreeMap::new();
        for (_, card) in self.inner.models().await {
            seen.entry(card.id.clone()).or_insert(card);
        }
        if seen.is_empty() {
            return Err(BackendError::Unavailable("no upstream answered".into()));
        }
        Ok(seen.into_values().collect())
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> Result<Accepted, BackendError> {
        let serving: Vec<usize> = self
            .inner
            .models()
            .await
            .into_iter()
            .filter(|(_, card)| card.id == req.model)
            .map(|(i, _)| i)
            .collect();
        if serving.is_empty() {
            return Err(BackendError::ModelNotFound(req.model));
        }
        let (path, body, chat) = upstream_body(&req);
        let inner = Arc::clone(&self.inner);
        let mut tried = Vec::new();
        // The headers decide the client's status: a 4xx is passed on; a
        // refusal or 5xx moves on to the next upstream at once.
        let first = loop {
            let Some(index) = inner.pick(&serving, &tried) else {
                return Err(BackendError::Unavailable("every upstream failed".into()));
            };
            tried.push(index);
            match inner.open(index, path, &body).await {
                Ok(opened) => break opened,
                Err(Failure::Final(err)) => return Err(err),
                Err(Failure::Retry(why)) => inner.mark_down(index, &why),
            }
        };
        let tokens = stream! {
            let mut opened = Some(first);
            let mut usage = Usage::default();
            loop {
                let Some((resp, _outstanding)) = opened.take() else {
                    yield Err(BackendError::Unavailable("every upstream failed".into()));
                    return;
                };
                let mut relay = Relay::new(resp, chat, inner.first_byte_timeout);
                let mut relayed = false;
                let failure = loop {
                    let step = tokio::select! {
                        biased;
                        // Dropping the response closes the connection, which
                        // is how upstream engines learn to free the slot.
                        () = cancel.cancelled() => {
                            yield Ok(TokenEvent::Finished { reason: FinishReason::Cancelled, usage });
                            return;
                        }
                        step = relay.next() => step,
                    };
                    match step {
                        Ok(RelayStep::Text(text)) => {
                            relayed = true;
                            usage.completion_tokens += 1;
                            yield Ok(TokenEvent::Token { id: None, text });
                        }
                        Ok(RelayStep::Usage(reported)) => usage = reported,
                        Ok(RelayStep::Finished(reason)) => {
                            yield Ok(TokenEvent::Finished { reason, usage });
                            return;
                        }
                        Err(why) => break why,
                    }
                };
                if relayed {
                    yield Err(BackendError::Unavailable(format!("the upstream failed mid-answer: {failure}")));
                    return;
                }
                // Nothing reached the client yet: another upstream may still
                // answer in full.
                if let Some(&last) = tried.last() {
                    inner.mark_down(last, &failure);
                }
                while let Some(index) = inner.pick(&serving, &tried) {
                    tried.push(index);
                    match inner.open(index, path, &body).await {
                        Ok(next) => {
                            opened = Some(next);
                            break;
                        }
                        Err(Failure::Final(err)) => {
                            yield Err(err);
                            return;
                        }
                        Err(Failure::Retry(why)) => inner.mark_down(index, &why),
                    }
                }
            }
        };
        Ok(Accepted {
            prompt_tokens: None,
            tokens: Box::pin(tokens),
        })
    }
}

/// The upstream path, body, and whether it is a chat completion.
fn upstream_body(req: &GenerateRequest) -> (&'static str, Value, bool) {
    let mut body = json!({
        "model": req.model,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let chat = match &req.prompt {
        Prompt::Chat(messages) => {
            body["messages"] = messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
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
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    let path = if chat {
        "/chat/completions"
    } else {
        "/completions"
    };
    (path, body, chat)
}

enum RelayStep {
    Text(String),
    Usage(Usage),
    Finished(FinishReason),
}

/// An upstream's SSE stream read as steps, whatever its dialect.
struct Relay {
    events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>,
    chat: bool,
    timeout: Duration,
    /// Seen a `finish_reason`: a missing `[DONE]` after it is no failure.
    finish: Option<FinishReason>,
    /// Steps decoded from one event, handed out one at a time.
    pending: std::collections::VecDeque<RelayStep>,
}

impl Relay {
    fn new(resp: reqwest::Response, chat: bool, timeout: Duration) -> Self {
        let events = resp
            .bytes_stream()
            .eventsource()
            .map(|e| e.map_err(|err| err.to_string()));
        Self {
            events: Box::pin(events),
            chat,
            timeout,
            finish: None,
            pending: std::collections::VecDeque::new(),
        }
    }

    async fn next(&mut self) -> Result<RelayStep, String> {
        loop {
            if let Some(step) = self.pending.pop_front() {
                return Ok(step);
            }
            let event = match tokio::time::timeout(self.timeout, self.events.next()).await {
                Err(_) => return Err("the upstream went silent".into()),
                Ok(None) => {
                    return match self.finish.take() {
                        // Ended without [DONE] but after the answer was
                        // complete: take it as the end.
                        Some(reason) => Ok(RelayStep::Finished(reason)),
                        None => Err("the upstream closed the stream before the end".into()),
                    };
                }
                Ok(Some(Err(err))) => return Err(err),
                Ok(Some(Ok(event))) => event,
            };
            if event.event == "error" {
                return Err(format!("the upstream sent an error event: {}", event.data));
            }
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                return Ok(RelayStep::Finished(
                    self.finish.take().unwrap_or(FinishReason::Stop),
                ));
            }
            let chunk: Value = serde_json::from_str(data)
                .map_err(|e| format!("the upstream sent something other than JSON: {e}"))?;
            if let Some(error) = chunk.get("error") {
                let message = error["message"]
                    .as_str()
                    .map_or_else(|| error.to_string(), str::to_owned);
                return Err(format!("the upstream reported: {message}"));
            }
            self.decode(&chunk);
        }
    }

    fn decode(&mut self, chunk: &Value) {
        let choice = &chunk["choices"][0];
        let text = if self.chat {
            choice["delta"]["content"].as_str()
        } else {
            choice["text"].as_str()
        };
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            self.pending.push_back(RelayStep::Text(text.to_owned()));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count =
                |key: &str| u32::try_from(usage[key].as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
            self.pending.push_back(RelayStep::Usage(Usage {
                prompt_tokens: count("prompt_tokens"),
                completion_tokens: count("completion_tokens"),
            }));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish = Some(map_finish(reason));
        }
    }
}

/// Upstream finish reasons in the contract's three; the original is logged.
fn map_finish(reason: &str) -> FinishReason {
    match reason {
        "length" | "max_tokens" => FinishReason::Length,
        "cancelled" | "abort" | "aborted" => FinishReason::Cancelled,
        "stop" | "eos" | "end_turn" | "stop_sequence" => FinishReason::Stop,
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
            prompt: Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }]),
            sampling: Sampling {
                temperature: Some(0.5),
                ..Sampling::default()
            },
            max_tokens: Some(7),
            stop: vec!["x".into()],
        };
        let (path, body, chat) = upstream_body(&req);
        assert_eq!((path, chat), ("/chat/completions", true));
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["stop"], json!(["x"]));
        assert!(body.get("top_k").is_none() && body.get("seed").is_none());
    }

    #[test]
    fn finish_reasons_map_into_the_contracts_three() {
        assert_eq!(map_finish("length"), FinishReason::Length);
        assert_eq!(map_finish("eos"), FinishReason::Stop);
        assert_eq!(map_finish("tool_calls"), FinishReason::Stop);
        assert_eq!(map_finish("abort"), FinishReason::Cancelled);
    }
}
