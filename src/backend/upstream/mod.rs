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
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod redact;
mod scan;
mod sse;
mod wire;

use wire::{Relay, RelayError, RelayStep, upstream_body};

use super::{
    Accepted, Backend, BackendError, Capabilities, GenerateRequest, ModelCard, TokenEvent, Usage,
};

/// How long the model list is reused before asking the upstreams again.
const MODELS_TTL: Duration = Duration::from_secs(30);
/// Longest wait for one upstream's model list.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a down upstream is probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);

pub struct UpstreamConfig {
    /// Base URLs, with or without the trailing `/v1`.
    pub urls: Vec<String>,
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    /// HTTP/2 with prior knowledge to `http://` upstreams.
    pub http2: bool,
}

pub struct UpstreamBackend {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: Vec<Upstream>,
    client: reqwest::Client,
    api_key: Option<String>,
    first_byte_timeout: Duration,
    /// The last list any upstream gave, kept when a refresh finds none:
    /// read without waiting on the upstreams.
    models: std::sync::RwLock<Option<ModelList>>,
    /// One refresh at a time; requests that find the list stale wait for
    /// it only when there is no list at all.
    refreshing: Mutex<()>,
}

/// Every (upstream index, model) pair, and when it was asked.
#[derive(Clone)]
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
        // Idle connections are kept (HTTP/1.1 keep-alive, no cap per
        // upstream), so a stream reuses one instead of connecting, and over
        // TLS never shakes hands again; TCP keep-alive finds dead ones.
        let mut client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(90));
        if config.http2 {
            client = client
                .http2_prior_knowledge()
                .http2_adaptive_window(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_while_idle(true);
        }
        let client = client
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
            models: std::sync::RwLock::new(None),
            refreshing: Mutex::new(()),
        });
        tokio::spawn(probe_loop(Arc::downgrade(&inner)));
        tokio::spawn(refresh_loop(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }
}

/// Keeps the model list fresh in the background: every `MODELS_TTL`, and
/// after a failure again after 1 s, 2 s, 4 s… up to `MODELS_TTL`.
async fn refresh_loop(inner: std::sync::Weak<Inner>) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        wait = if inner.refresh().await {
            MODELS_TTL
        } else {
            (wait * 2).clamp(Duration::from_secs(1), MODELS_TTL)
        };
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
    /// A request to an upstream, in the current span's trace.
    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let mut trace = reqwest::header::HeaderMap::new();
        crate::telemetry::trace_headers(&mut trace);
        let req = self.client.request(method, url).headers(trace);
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    async fn list_models(&self, index: usize) -> Result<Vec<ModelCard>, String> {
        tokio::time::timeout(
            LIST_TIMEOUT.min(self.first_byte_timeout),
            self.ask_models(index),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
    }

    async fn ask_models(&self, index: usize) -> Result<Vec<ModelCard>, String> {
        let upstream = &self.upstreams[index];
        let resp = self
            .request(reqwest::Method::GET, format!("{}/models", upstream.base))
            .send()
            .await
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

    fn cached(&self) -> Option<ModelList> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks every upstream at once (each bounded by `LIST_TIMEOUT`) and
    /// keeps what they answer; returns whether any did. A refresh that
    /// finds none keeps the last list.
    async fn refresh(&self) -> bool {
        let _one = self.refreshing.lock().await;
        let asked = futures_util::future::join_all(
            (0..self.upstreams.len()).map(|i| async move { (i, self.list_models(i).await) }),
        )
        .await;
        let mut all = Vec::new();
        for (i, answer) in asked {
            match answer {
                Ok(models) => all.extend(models.into_iter().map(|m| (i, m))),
                Err(err) => {
                    tracing::warn!(upstream = %self.upstreams[i].base, %err, "listing models failed");
                    self.upstreams[i].down.store(true, Ordering::Release);
                }
            }
        }
        if all.is_empty() {
            return false;
        }
        *self.models.write().unwrap_or_else(|e| e.into_inner()) = Some(ModelList {
            fetched: Instant::now(),
            models: all,
        });
        true
    }

    /// Every model of every reachable upstream: the cached list, refreshed
    /// first only when there is none yet (or it is stale and no refresh
    /// is under way).
    async fn models(&self) -> Vec<(usize, ModelCard)> {
        match self.cached() {
            Some(list) if list.fetched.elapsed() < MODELS_TTL => list.models,
            Some(stale) if self.refreshing.try_lock().is_err() => stale.models,
            _ => {
                self.refresh().await;
                self.cached().map(|l| l.models).unwrap_or_default()
            }
        }
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
            // OpenAI's own bound; the upstream says if it serves fewer.
            max_choices: 128,
            // The upstreams queue and batch; this only bounds what is open.
            default_concurrency: 256,
            relays_fields: true,
            serves: &[],
        }
    }

    fn default_model(&self) -> Option<String> {
        // The first model of the first upstream that listed one.
        self.inner
            .cached()
            .and_then(|list| list.models.first().map(|(_, card)| card.id.clone()))
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

    /// The upstreams' tokenizers are not reachable through the chat API,
    /// so the relay estimates: four characters a token, the rule of thumb
    /// for English text in BPE vocabularies.
    async fn count_tokens(&self, req: GenerateRequest) -> Result<u32, BackendError> {
        let chars: usize = match &req.prompt {
            super::Prompt::Chat(messages) => {
                messages.iter().map(|m| m.content.chars().count()).sum()
            }
            super::Prompt::Text(text) => text.chars().count(),
        };
        Ok(u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX))
    }

    /// A cancellation is not watched here: the run that polls this
    /// stream ends at once on it and drops the stream, and dropping the
    /// response closes the connection, which is how upstream engines learn
    /// to free the slot. Waiting on the token too cost every relayed token
    /// a waiter registered and removed under the token's lock.
    async fn generate(
        &self,
        req: GenerateRequest,
        _cancel: CancellationToken,
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
            // What the last upstream to fail said, for when none is left.
            let mut reported = None;
            loop {
                let Some((resp, _outstanding)) = opened.take() else {
                    yield Err(match reported {
                        Some(message) => BackendError::UpstreamReported(message),
                        None => BackendError::Unavailable("every upstream failed".into()),
                    });
                    return;
                };
                let mut relay = Relay::new(resp, chat, inner.first_byte_timeout);
                let mut relayed = false;
                let failure = loop {
                    match relay.next().await {
                        Ok(RelayStep::Text(text)) => {
                            relayed = true;
                            usage.completion_tokens += 1;
                            yield Ok(TokenEvent::Token { id: None, text });
                        }
                        Ok(RelayStep::Delta(delta)) => {
                            relayed = true;
                            if delta.produces() {
                                usage.completion_tokens += 1;
                            }
                            yield Ok(TokenEvent::Delta(delta));
                        }
                        Ok(RelayStep::Usage(reported)) => usage = reported,
                        Ok(RelayStep::Finished(reason)) => {
                            yield Ok(TokenEvent::Finished { reason, usage });
                            return;
                        }
                        Err(why) => break why,
                    }
                };
                let why = match failure {
                    RelayError::Reported(message) => {
                        let message = redact::redact(&message, inner.api_key.as_deref());
                        let why = format!("the upstream reported: {message}");
                        reported = Some(message);
                        why
                    }
                    RelayError::Broken(why) => why,
                };
                if relayed {
                    yield Err(match reported.take() {
                        Some(message) => BackendError::UpstreamReported(message),
                        None => BackendError::Unavailable(format!("the upstream failed mid-answer: {why}")),
                    });
                    return;
                }
                // Nothing reached the client yet: another upstream may still
                // answer in full.
                if let Some(&last) = tried.last() {
                    inner.mark_down(last, &why);
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
