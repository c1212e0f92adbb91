//! One generation on the decode thread: its KV cache and the tokens in it,
//! and what it does with each step's logits (bias, grammar, sampling, log
//! probabilities, tool calls, stop sequences) until it ends.

use std::cell::RefCell;
use std::rc::Rc;

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
    /// The next step's input when it speculates: the last sampled token,
    /// then tokens drafted from earlier text (prompt lookup). Empty when
    /// the step carries the last sampled token alone.
    pub(super) draft: Vec<u32>,
    /// Most tokens the next draft may hold: doubled while drafts are kept
    /// whole, one past what was kept of a draft kept in part, one after a
    /// draft of which nothing was kept, and 0 after [`MISSES`] such drafts
    /// in a row. At 0 the generation decodes plainly for [`PROBE_EVERY`]
    /// steps, then tries one token again: a text that prompt lookup does
    /// not predict costs few wasted rows.
    draft_room: usize,
    misses: u32,
    plain_steps: u32,
    /// Which choice of its request it is (`n` > 1); 0 alone.
    index: u32,
    /// What the request's choices share, when it has more than one.
    choices: Option<Rc<RefCell<Choices>>>,
    /// The other choices, until its prompt's last position is computed:
    /// they start there, from its cache's blocks and the same logits.
    forks: Vec<Job>,
}

/// The choices of one request: one stream, whose end waits for the last
/// of them, and one usage, the prompt counted once.
#[derive(Default)]
pub(super) struct Choices {
    /// Choices still running.
    left: u32,
    /// Tokens they made.
    completion_tokens: u32,
    /// How the first choice ended: the run's finish.
    first: Option<FinishReason>,
}

/// The longest n-gram, and the shortest, that prompt lookup matches.
const LOOKUP_NGRAM: (usize, usize) = (3, 2);

/// Plain steps between tries, once drafts stopped being kept.
const PROBE_EVERY: u32 = 16;

/// Drafts in a row of which nothing was kept before drafting pauses.
const MISSES: u32 = 3;

impl<'m> Running<'m> {
    /// A generation whose cache already holds `cache.position` positions
    /// of its prompt (a reused prefix, or none).
    pub(super) fn new(model: &'m Model, mut job: Job, cache: Cache) -> Self {
        let forks: Vec<Job> = (1..job.choices).map(|i| job.choice(i)).collect();
        job.choices = 1;
        let choices = (!forks.is_empty()).then(|| {
            Rc::new(RefCell::new(Choices {
                left: 1,
                ..Choices::default()
            }))
        });
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
            draft: Vec::new(),
            draft_room: usize::MAX,
            misses: 0,
            plain_steps: 0,
            index: 0,
            choices,
            forks,
        }
    }

    /// Starts the request's other choices from its first answer logits
    /// (its prompt computed, nothing sampled yet): each shares the
    /// prompt's cache blocks and samples its first token from the same
    /// logits. Returns those still going. Call before its own
    /// [`Self::next_token`], which changes the logits.
    pub(super) fn fork(&mut self, model: &'m Model, logits: &[f32]) -> Vec<Running<'m>> {
        let mut going = Vec::new();
        for (index, job) in (1..).zip(std::mem::take(&mut self.forks)) {
            let mut choice = Running::new(model, job, self.cache.prefix(self.cache.position));
            choice.index = index;
            choice.choices.clone_from(&self.choices);
            if let Some(choices) = &self.choices {
                choices.borrow_mut().left += 1;
            }
            if choice.next_token(model, &mut logits.to_vec()) {
                going.push(choice);
            }
        }
        going
    }

    /// Whether its other choices still wait for its prompt.
    pub(super) fn forks_pending(&self) -> bool {
        !self.forks.is_empty()
    }

    /// Drafts up to `most` tokens for the next step by prompt lookup: the
    /// tokens that followed the latest earlier occurrence of the text's
    /// last few tokens (its prompt and its answer so far). Fills
    /// [`Self::draft`] and says whether there is any. The step then
    /// verifies them all at once ([`Self::verify`]).
    pub(super) fn propose(&mut self, most: usize) -> bool {
        self.draft.clear();
        if most == 0 || self.prefilling() {
            return false;
        }
        if self.draft_room == 0 {
            self.plain_steps += 1;
            if self.plain_steps < PROBE_EVERY {
                return false;
            }
            (self.draft_room, self.plain_steps) = (1, 0);
        }
        let left = self.max_tokens.saturating_sub(self.usage.completion_tokens) as usize;
        let most = most.min(self.draft_room).min(left.saturating_sub(1));
        if most == 0 {
            return false;
        }
        let tokens = &self.tokens;
        for n in (LOOKUP_NGRAM.1..=LOOKUP_NGRAM.0).rev() {
            let Some(end) = tokens.len().checked_sub(n) else {
                continue;
            };
            let tail = &tokens[end..];
            // The latest earlier occurrence, with something after it.
            let found = (0..end).rev().find(|&at| &tokens[at..at + n] == tail);
            if let Some(at) = found {
                let next = &tokens[at + n..tokens.len().min(at + n + most)];
                self.draft.push(tokens[tokens.len() - 1]);
                self.draft.extend_from_slice(next);
                return true;
            }
        }
        false
    }

    /// Takes a speculative step's logits, a row per token of the draft:
    /// each row as a plain step would, in order, while the token it
    /// samples is the draft's next (so each row's input was the answer's
    /// own text); then forgets the cache's positions past what was kept.
    /// The sampler, the grammar and the stop sequences see exactly the
    /// tokens a plain decode would, so the answer is the same token for
    /// token, and no event goes out for a drafted token that was not.
    /// Returns whether to keep going, and how many drafted tokens were
    /// kept (`most` caps the next draft).
    pub(super) fn verify(
        &mut self,
        model: &Model,
        logits: &mut [f32],
        most: usize,
    ) -> (bool, usize) {
        let draft = std::mem::take(&mut self.draft);
        let drafted = draft.len() - 1;
        let start = self.cache.position - draft.len();
        let vocab = logits.len() / draft.len().max(1);
        let mut kept = 0;
        let mut going = true;
        for (row, logits) in logits.chunks_exact_mut(vocab).enumerate() {
            going = self.next_token(model, logits);
            if !going || draft.get(row + 1) != self.tokens.last() {
                break;
            }
            kept = row + 1;
        }
        // Each kept draft token's row, and the row that sampled past them.
        self.cache.truncate(start + kept + 1);
        self.misses = if kept == 0 { self.misses + 1 } else { 0 };
        self.draft_room = if kept == drafted {
            drafted.saturating_mul(2).min(most)
        } else if self.misses >= MISSES {
            0
        } else {
            kept + 1
        };
        (going, kept)
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
    pub(super) fn next_token(&mut self, model: &Model, logits: &mut [f32]) -> bool {
        for &(id, bias) in &self.shaping.bias {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += bias;
            }
        }
        if let Some(constraint) = &mut self.shaping.constraint
            && let Err(err) = constraint.mask(logits)
        {
            self.fail(format!("the output grammar failed: {err}"));
            return false;
        }
        let token = self.sampler.sample(logits);
        self.sampler.observe(token);
        let logprobs = self
            .shaping
            .logprobs
            .map(|top| shaping::logprobs(&model.vocabulary, logits, token, top));
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
                            text: released.text.into(),
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
                Out::Text(text) => TokenEvent::Token {
                    id: None,
                    text: text.into(),
                },
            };
            if !self.send(Ok(event)) {
                return false;
            }
        }
        if !last_text.is_empty()
            && !self.send(Ok(TokenEvent::Token {
                id: None,
                text: last_text.into(),
            }))
        {
            return false;
        }
        let stopped = stop.is_some();
        if let Some(stop) = stop
            && !self.send(Ok(TokenEvent::Delta(Box::new(ChoiceDelta::stopped_at(
                stop,
            )))))
        {
            return false;
        }
        let Some(choices) = self.choices.take() else {
            self.send(Ok(TokenEvent::Finished {
                reason,
                usage: self.usage,
            }));
            return false;
        };
        // One of several choices: it ends on its own, the run with the last.
        if !stopped {
            self.send(Ok(TokenEvent::Delta(Box::new(ChoiceDelta {
                finish: Some(reason),
                ..ChoiceDelta::default()
            }))));
        }
        let mut choices = choices.borrow_mut();
        choices.left -= 1;
        choices.completion_tokens += self.usage.completion_tokens;
        if self.index == 0 {
            choices.first = Some(reason);
        }
        if choices.left == 0 {
            self.send(Ok(TokenEvent::Finished {
                reason: choices.first.unwrap_or(reason),
                usage: Usage {
                    completion_tokens: choices.completion_tokens,
                    ..self.usage
                },
            }));
        }
        false
    }

    /// False once nobody listens: the generation then stops. A choice
    /// other than the first says which it is in every step.
    fn send(&self, event: Result<TokenEvent, BackendError>) -> bool {
        let event = match event {
            Ok(TokenEvent::Token { text, .. }) if self.index > 0 => {
                if text.is_empty() {
                    return !self.events.is_closed();
                }
                Ok(TokenEvent::Delta(Box::new(ChoiceDelta {
                    index: self.index,
                    content: Some(text.into_string()),
                    ..ChoiceDelta::default()
                })))
            }
            Ok(TokenEvent::Delta(mut delta)) => {
                delta.index = self.index;
                Ok(TokenEvent::Delta(delta))
            }
            event => event,
        };
        self.events.send(event).is_ok()
    }
}
