//! One generation on the decode thread: its KV cache and the tokens in it,
//! and what it does with each step's logits (bias, grammar, sampling, log
//! probabilities, tool calls, stop sequences) until it ends.

use tokio_util::sync::CancellationToken;

use super::{CacheKey, EventSender, Job, Shaping};
use crate::backend::shaping::{self, CallReader, Out};
use crate::backend::stop::StopMatcher;
use crate::backend::{BackendError, ChoiceDelta, Demand, FinishReason, TokenEvent, Usage};
use crate::model::Model;
use crate::model::constrain::Constraint;
use crate::model::llama::Cache;
use crate::model::sampling::Sampler;
use crate::model::tokenizer::TextStream;

pub(super) struct Running<'m> {
    pub(super) cache: Cache,
    /// The prompt, then each sampled token: those before
    /// `cache.position` are in the cache, the rest are fed next.
    pub(super) tokens: Vec<u32>,
    /// Its cache was dropped to make room: it waits to be let back in,
    /// then computes its tokens again and goes on where it was.
    pub(super) evicted: bool,
    pub(super) key: Option<CacheKey>,
    sampler: Sampler,
    text: TextStream<'m>,
    stop: StopMatcher,
    usage: Usage,
    max_tokens: u32,
    cancel: CancellationToken,
    events: EventSender,
    demand: Demand,
    shaping: Shaping,
}

impl<'m> Running<'m> {
    /// A generation whose cache already holds `cache.position` positions
    /// of its prompt (a reused prefix, or none).
    pub(super) fn new(model: &'m Model, job: Job, cache: Cache) -> Self {
        let mut sampler = Sampler::new(&job.sampling);
        for &token in &job.prompt {
            sampler.observe_prompt(token);
        }
        Self {
            cache,
            evicted: false,
            key: job.cache_key,
            sampler,
            text: TextStream::new(&model.tokenizer),
            stop: StopMatcher::new(job.stop),
            usage: Usage {
                prompt_tokens: u32::try_from(job.prompt.len()).unwrap_or(u32::MAX),
                completion_tokens: 0,
            },
            tokens: job.prompt,
            max_tokens: job.max_tokens,
            cancel: job.cancel,
            events: job.events,
            demand: job.demand,
            shaping: job.shaping,
        }
    }

    /// Tokens still to feed: the rest of the prompt, or the last sampled.
    pub(super) fn pending(&self) -> &[u32] {
        &self.tokens[self.cache.position..]
    }

    pub(super) fn prompt_len(&self) -> usize {
        self.usage.prompt_tokens as usize
    }

    /// Whether it still has more than one token to feed (its prompt).
    pub(super) fn prefilling(&self) -> bool {
        self.pending().len() > 1
    }

    /// Drops its cache to free the memory; it keeps its tokens, so that
    /// feeding them again (the same arithmetic, the same cache) resumes it.
    pub(super) fn evict(&mut self, model: &Model) {
        self.cache = model.weights.new_cache();
        self.evicted = true;
    }

    /// Whether the next step may carry it.
    pub(super) fn steppable(&self) -> bool {
        !self.evicted && !self.paused()
    }

    /// Nobody will read what it makes: the client left or it was cancelled.
    pub(super) fn abandoned(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    /// Paused while nobody reads: no steps, its cache kept.
    pub(super) fn paused(&self) -> bool {
        self.demand.is_paused() && !self.abandoned()
    }

    /// Ends a generation nobody waits for.
    pub(super) fn cancelled(&mut self) {
        self.finish(FinishReason::Cancelled, String::new());
    }

    /// Reports a failure on the stream; always ends the generation, whether
    /// or not anyone still listens.
    pub(super) fn fail(&self, detail: String) {
        self.send(Err(BackendError::Internal(detail)));
    }

    /// Samples from the logits after the last fed token and sends what it
    /// makes. Returns whether to keep going.
    pub(super) fn next_token(&mut self, model: &Model, mut logits: Vec<f32>) -> bool {
        for &(id, bias) in &self.shaping.bias {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += bias;
            }
        }
        if let Some(constraint) = &mut self.shaping.constraint
            && let Err(err) = constraint.mask(&mut logits)
        {
            self.fail(format!("the output grammar failed: {err}"));
            return false;
        }
        let token = self.sampler.sample(&mut logits);
        self.sampler.observe(token);
        let logprobs = self
            .shaping
            .logprobs
            .map(|top| shaping::logprobs(&model.vocabulary, &logits, token, top));
        if let Some(constraint) = &mut self.shaping.constraint
            && !model.end_tokens.contains(&token)
            && let Err(err) = constraint.advance(token)
        {
            self.fail(format!("the output grammar failed: {err}"));
            return false;
        }
        if model.end_tokens.contains(&token) {
            let held = self.stop.finish();
            let reason = self.ending(FinishReason::Stop);
            return self.finish(reason, held);
        }
        self.usage.completion_tokens += 1;
        let piece = match self.text.step(token) {
            Ok(piece) => piece.unwrap_or_default(),
            Err(err) => {
                self.fail(format!("detokenizing failed: {err}"));
                return false;
            }
        };
        let outs = match &mut self.shaping.calls {
            Some(calls) => calls.push(&piece),
            None => vec![Out::Text(piece)],
        };
        let mut logprobs = logprobs;
        for out in outs {
            let event = match out {
                Out::Call(mut delta) => {
                    delta.logprobs = logprobs.take();
                    TokenEvent::Delta(Box::new(delta))
                }
                Out::Text(text) => {
                    let released = self.stop.push(text);
                    if let Some(stop) = released.stopped {
                        return self.finish_at(stop, released.text);
                    }
                    match logprobs.take() {
                        Some(logprobs) => TokenEvent::Delta(Box::new(ChoiceDelta {
                            content: Some(released.text),
                            logprobs: Some(logprobs),
                            ..ChoiceDelta::default()
                        })),
                        // An empty piece still counts the token; the server sends no chunk.
                        None => TokenEvent::Token {
                            id: Some(token),
                            text: released.text,
                        },
                    }
                }
            };
            if !self.send(Ok(event)) {
                return false;
            }
        }
        // A token that completed no output still has its log probability.
        if let Some(logprobs) = logprobs
            && !self.send(Ok(TokenEvent::Delta(Box::new(ChoiceDelta {
                content: Some(String::new()),
                logprobs: Some(logprobs),
                ..ChoiceDelta::default()
            }))))
        {
            return false;
        }
        if self
            .shaping
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_done)
        {
            let held = self.stop.finish();
            let reason = self.ending(FinishReason::Stop);
            return self.finish(reason, held);
        }
        if self.usage.completion_tokens >= self.max_tokens {
            let held = self.stop.finish();
            return self.finish(FinishReason::Length, held);
        }
        self.tokens.push(token);
        true
    }

    /// How an answer that ended by itself ends: `tool_calls` when it
    /// called any.
    fn ending(&self, reason: FinishReason) -> FinishReason {
        match &self.shaping.calls {
            Some(calls) if calls.calls > 0 => FinishReason::ToolCalls,
            _ => reason,
        }
    }

    /// [`Self::finish`] at a stop sequence, which the finish names.
    fn finish_at(&mut self, stop: String, last_text: String) -> bool {
        self.finish_with(FinishReason::Stop, last_text, Some(stop))
    }

    /// Sends any last text and the finish; always ends the generation.
    fn finish(&mut self, reason: FinishReason, last_text: String) -> bool {
        self.finish_with(reason, last_text, None)
    }

    fn finish_with(
        &mut self,
        reason: FinishReason,
        last_text: String,
        stop: Option<String>,
    ) -> bool {
        let held = self
            .shaping
            .calls
            .as_mut()
            .map(CallReader::finish)
            .unwrap_or_default();
        for out in held {
            let event = match out {
                Out::Call(delta) => TokenEvent::Delta(Box::new(delta)),
                Out::Text(text) => TokenEvent::Token { id: None, text },
            };
            if !self.send(Ok(event)) {
                return false;
            }
        }
        if !last_text.is_empty()
            && !self.send(Ok(TokenEvent::Token {
                id: None,
                text: last_text,
            }))
        {
            return false;
        }
        if let Some(stop) = stop
            && !self.send(Ok(TokenEvent::Delta(Box::new(ChoiceDelta::stopped_at(
                stop,
            )))))
        {
            return false;
        }
        self.send(Ok(TokenEvent::Finished {
            reason,
            usage: self.usage,
        }));
        false
    }

    /// False once nobody listens: the generation then stops.
    fn send(&self, event: Result<TokenEvent, BackendError>) -> bool {
        self.events.send(event).is_ok()
    }
}
