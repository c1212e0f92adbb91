//! The decode thread's loop: continuous batching with chunked prefill.
//!
//! Each step is one forward pass over every running generation that is
//! not paused: each decoding one's next token, then prompt chunks in
//! admission order up to the step's token budget, so a long prompt
//! shares steps with running streams instead of stalling them (vLLM's
//! chunked prefill, llama.cpp server's `n_batch`). Generations join and
//! leave between steps, and cancellation is checked at every step, also
//! while a prompt is being fed. A generation is admitted while its prompt
//! fits the KV-cache budget beside what the others hold; when answers grow
//! past it, the newest generation (a paused one first) gives its cache
//! back and computes it again once there is room (vLLM's preemption by
//! recomputation), so memory stays bounded without reserving every
//! answer's `max_tokens` up front.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::prefix::PromptCache;
use super::running::Running;
use super::{Job, LocalSettings, Msg};
use crate::backend::{FinishReason, TokenEvent, Usage};
use crate::model::Model;
use crate::model::attention;
use crate::model::llama::Segment;
use crate::telemetry;

/// What the loop has done so far, for tests, benches and metrics.
#[derive(Default)]
pub(super) struct Stats {
    /// Forward passes.
    pub(super) steps: AtomicU64,
    /// Prompt positions computed.
    pub(super) computed: AtomicU64,
    /// Prompt positions taken from a kept cache instead.
    pub(super) reused: AtomicU64,
    /// Generations on the thread: running, paused or waiting for memory.
    pub(super) held: AtomicUsize,
    /// Caches dropped to make room, to be computed again.
    pub(super) evictions: AtomicU64,
    /// Tokens drafted by prompt lookup, and those of them kept.
    pub(super) drafted: AtomicU64,
    pub(super) accepted: AtomicU64,
}

/// Positions a generation should have room for beyond its tokens to be
/// worth starting.
const ROOM: usize = 16;

/// How long the loop sleeps at most while nothing can step: cancellation
/// of a paused or waiting generation is noticed within it.
const IDLE_POLL: Duration = Duration::from_millis(100);

pub(super) fn run(
    model: &Model,
    name: &str,
    settings: LocalSettings,
    queue: &mpsc::Receiver<Msg>,
    stats: &Stats,
) {
    // A bug that panics must not take the model away from every later
    // request: the generations on the thread end (their streams see the
    // backend fail) and the loop starts again with the same queue.
    loop {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve(model, name, settings, queue, stats);
        }));
        if served.is_ok() {
            return;
        }
        tracing::error!("the decode loop panicked; its generations failed, and it starts again");
    }
}

/// The loop, until the backend is dropped.
fn serve(
    model: &Model,
    name: &str,
    settings: LocalSettings,
    queue: &mpsc::Receiver<Msg>,
    stats: &Stats,
) {
    let mut batch = Batch {
        model,
        name,
        settings,
        stats,
        waiting: VecDeque::new(),
        running: Vec::new(),
        kept: PromptCache::new(settings.prompt_cache_memory),
        pacer: Pacer::default(),
    };
    // KV blocks used and budgeted, as /metrics last showed them.
    let mut shown_blocks = (usize::MAX, 0);
    loop {
        if !batch.can_step() {
            let msg = if batch.waiting.is_empty() && batch.running.is_empty() {
                queue
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            } else {
                queue.recv_timeout(IDLE_POLL)
            };
            match msg {
                Ok(Msg::Job(job)) => batch.waiting.push_back(*job),
                Ok(Msg::Wake) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(msg) = queue.try_recv() {
            if let Msg::Job(job) = msg {
                batch.waiting.push_back(*job);
            }
        }
        batch.drop_abandoned();
        batch.admit();
        batch.step();
        let held = batch.running.len() + batch.waiting.len();
        stats.held.store(held, Ordering::Relaxed);
        let blocks = (batch.blocks_held(), batch.budget());
        if blocks != shown_blocks {
            shown_blocks = blocks;
            telemetry::kv_blocks(name, blocks.0, blocks.1.saturating_sub(blocks.0));
        }
    }
}

struct Batch<'m> {
    model: &'m Model,
    name: &'m str,
    settings: LocalSettings,
    stats: &'m Stats,
    waiting: VecDeque<Job>,
    running: Vec<Running<'m>>,
    kept: PromptCache,
    pacer: Pacer,
}

/// How much prompt a step may carry beside decoding generations: it learns
/// what a step costs (a part for the step, a part per prompt token) and
/// sizes prompt chunks so that a step beside decoding takes about
/// `GAP_FACTOR` times a step of decoding alone. Running streams then see
/// their token gap grow by that much, not stall, while a long prompt is
/// fed; with nobody decoding, prompts take the whole step budget.
#[derive(Default)]
struct Pacer {
    /// Seconds of a step without prompt tokens (moving average).
    base: Option<f64>,
    /// Seconds per prompt token on top of that (moving average).
    per_token: Option<f64>,
}

const GAP_FACTOR: f64 = 3.0;
/// Smallest prompt chunk beside decoding, so a prompt always moves on.
const MIN_CHUNK: usize = 8;

impl Pacer {
    fn prompt_budget(&self, decoding: usize, budget: usize) -> usize {
        if decoding == 0 {
            return budget;
        }
        let chunk = match (self.base, self.per_token) {
            (Some(base), Some(per)) if per > 0.0 => ((GAP_FACTOR - 1.0) * base / per) as usize,
            // Not measured yet: a small chunk.
            _ => 4 * MIN_CHUNK,
        };
        chunk.min(budget).max(MIN_CHUNK)
    }

    fn record(&mut self, prompt_tokens: usize, secs: f64) {
        fn average(old: Option<f64>, new: f64) -> Option<f64> {
            Some(old.map_or(new, |old| 0.8 * old + 0.2 * new))
        }
        if prompt_tokens == 0 {
            self.base = average(self.base, secs);
        } else {
            let extra = (secs - self.base.unwrap_or(0.0)).max(0.0);
            self.per_token = average(self.per_token, extra / prompt_tokens as f64);
        }
    }
}

impl<'m> Batch<'m> {
    fn can_step(&self) -> bool {
        self.running.iter().any(Running::steppable) || self.admissible()
    }

    /// KV-cache blocks the budget holds: a cache takes room a block of
    /// positions at a time, so blocks are what `--kv-cache-memory` bounds.
    fn budget(&self) -> usize {
        let block = self.model.weights.kv_bytes_per_position() * attention::BLOCK_POSITIONS;
        self.settings.kv_cache_memory / block
    }

    /// Blocks the generations holding a cache take now, each shared
    /// block once.
    fn blocks_held(&self) -> usize {
        let mut ids: Vec<usize> = self
            .running
            .iter()
            .filter(|r| !r.evicted)
            .flat_map(|r| r.cache.block_ids())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Generations holding a cache.
    fn holding(&self) -> usize {
        self.running.iter().filter(|r| !r.evicted).count()
    }

    /// Whether `more` positions fit beside what the generations holding a
    /// cache will hold after the next step: the blocks held, and those
    /// each will take for its tokens still to feed (a shared last block
    /// written into is copied first).
    fn fits(&self, more: usize) -> bool {
        let growing: usize = self
            .running
            .iter()
            .filter(|r| !r.evicted)
            .map(|r| {
                let held = attention::blocks(r.cache.position);
                attention::blocks(r.tokens.len() + 1).saturating_sub(held)
                    + usize::from(r.cache.shares_its_tail())
            })
            .sum();
        self.blocks_held() + growing + attention::blocks(more) <= self.budget()
    }

    /// Whether an evicted generation (first) or the first waiting job can
    /// start now; alone, anything can.
    fn admissible(&self) -> bool {
        let next = match self.running.iter().find(|r| r.evicted) {
            Some(r) => r.tokens.len(),
            // Each choice needs room of its own beside the prompt's.
            None => match self.waiting.front() {
                Some(job) => job.prompt.len() + (job.choices as usize).saturating_sub(1) * ROOM,
                None => return false,
            },
        };
        self.holding() == 0 || self.fits(next + ROOM)
    }

    /// Ends what nobody waits for: queued or running, paused or not.
    fn drop_abandoned(&mut self) {
        self.waiting.retain(|job| {
            let gone = job.cancel.is_cancelled() || job.events.is_closed();
            if gone {
                let usage = Usage {
                    prompt_tokens: u32::try_from(job.prompt.len()).unwrap_or(u32::MAX),
                    completion_tokens: 0,
                };
                // Nobody may listen any more: nothing to tell then.
                let _ = job.events.send(Ok(TokenEvent::Finished {
                    reason: FinishReason::Cancelled,
                    usage,
                }));
            }
            !gone
        });
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].abandoned() {
                self.running[i].cancelled();
                self.end(i);
            } else {
                i += 1;
            }
        }
    }

    /// Admits waiting jobs in order while their KV cache fits, each with
    /// the longest cached prefix of its prompt the caller has.
    fn admit(&mut self) {
        while self.admissible() {
            if let Some(r) = self.running.iter_mut().find(|r| r.evicted) {
                r.evicted = false;
                continue;
            }
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            let weights = &self.model.weights;
            let cache = job
                .cache_key
                .as_ref()
                .and_then(|key| self.kept.take(key, &job.prompt))
                .unwrap_or_else(|| weights.new_cache());
            let reused = cache.position as u64;
            self.stats.reused.fetch_add(reused, Ordering::Relaxed);
            telemetry::prompt_tokens(self.name, 0, reused, self.kept.bytes());
            self.running.push(Running::new(self.model, job, cache));
        }
    }

    /// Frees caches until the next step fits the budget: a paused
    /// generation's first, else the newest's. The last one holding a cache
    /// keeps it.
    fn make_room(&mut self) {
        while self.holding() > 1 && !self.fits(0) {
            let victim = self
                .running
                .iter()
                .rposition(|r| !r.evicted && r.paused())
                .or_else(|| self.running.iter().rposition(|r| !r.evicted));
            let Some(victim) = victim else {
                return;
            };
            self.running[victim].evict(self.model);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One forward pass: every decoding generation's next token, then
    /// prompt chunks up to the step budget.
    fn step(&mut self) {
        self.make_room();
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let lookup = self.settings.prompt_lookup;
        let context = self.model.weights.config.context_length;
        for (i, r) in self.running.iter_mut().enumerate() {
            if r.steppable() && !r.prefilling() {
                let room = context.saturating_sub(r.tokens.len());
                let rows = if r.propose(lookup.min(room)) {
                    r.draft.len()
                } else {
                    1
                };
                plan.push((i, rows));
            }
        }
        let decoding = plan.len();
        let decoding_rows: usize = plan.iter().map(|&(_, rows)| rows).sum();
        let budget = self
            .settings
            .step_tokens
            .max(1)
            .saturating_sub(decoding_rows);
        let mut left = self.pacer.prompt_budget(decoding, budget);
        for (i, r) in self.running.iter().enumerate() {
            if r.steppable() && r.prefilling() && left > 0 {
                let take = r.pending().len().min(left);
                plan.push((i, take));
                left -= take;
            }
        }
        if plan.is_empty() {
            return;
        }
        plan.sort_unstable();
        let mut computed = 0;
        let mut segments = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, r) in self.running.iter_mut().enumerate() {
            let Some(&(_, take)) = planned.next_if(|(at, _)| *at == i) else {
                continue;
            };
            let from = r.cache.position;
            let prompt = r.prompt_len();
            computed += (from + take).min(prompt).saturating_sub(from);
            let r = &mut *r;
            let speculating = !r.draft.is_empty();
            segments.push(Segment {
                tokens: if speculating {
                    &r.draft
                } else {
                    &r.tokens[from..from + take]
                },
                logits: speculating || from + take == r.tokens.len(),
                every_row: speculating,
                cache: &mut r.cache,
            });
        }
        let started = Instant::now();
        let result = self.model.weights.forward_batch(&mut segments);
        drop(segments);
        // Rows beyond one per decoding generation (prompt chunks, drafted
        // tokens) cost like prompt rows: the pacer's base stays the time
        // of a plain decode step.
        let extra_rows = plan.iter().map(|&(_, n)| n).sum::<usize>() - decoding;
        self.pacer
            .record(extra_rows, started.elapsed().as_secs_f64());
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .computed
            .fetch_add(computed as u64, Ordering::Relaxed);
        if computed > 0 {
            telemetry::prompt_tokens(self.name, computed as u64, 0, self.kept.bytes());
        }
        let mut ended = Vec::new();
        let mut forked = Vec::new();
        match result {
            Ok(all_logits) => {
                for (&(i, _), logits) in plan.iter().zip(all_logits) {
                    let Some(mut logits) = logits else {
                        continue;
                    };
                    let r = &mut self.running[i];
                    if r.forks_pending() {
                        forked.extend(r.fork(self.model, &logits));
                    }
                    let going = if r.draft.is_empty() {
                        r.next_token(self.model, &mut logits)
                    } else {
                        let drafted = r.draft.len() - 1;
                        let (going, kept) = r.verify(self.model, &mut logits, lookup);
                        self.stats
                            .drafted
                            .fetch_add(drafted as u64, Ordering::Relaxed);
                        self.stats
                            .accepted
                            .fetch_add(kept as u64, Ordering::Relaxed);
                        telemetry::draft_tokens(self.name, drafted, kept);
                        going
                    };
                    if !going {
                        ended.push(i);
                    }
                }
            }
            Err(err) => {
                for &(i, _) in &plan {
                    self.running[i].draft.clear();
                    self.running[i].fail(format!("decode failed: {err}"));
                    ended.push(i);
                }
            }
        }
        for &i in ended.iter().rev() {
            self.end(i);
        }
        self.running.extend(forked);
    }

    /// Removes a generation that ended, keeping its cache for reuse.
    fn end(&mut self, i: usize) {
        let r = self.running.remove(i);
        if let Some(key) = r.key {
            self.kept.put(key, r.tokens, r.cache);
            telemetry::prompt_tokens(self.name, 0, 0, self.kept.bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_chunks_beside_decoding_keep_the_step_near_a_few_decode_steps() {
        let mut pacer = Pacer::default();
        assert_eq!(pacer.prompt_budget(0, 256), 256, "nobody decodes: all");
        assert_eq!(pacer.prompt_budget(4, 252), 32, "unmeasured: small");
        pacer.record(0, 0.020);
        pacer.record(100, 0.420);
        // 4 ms a prompt token beside a 20 ms step: 10 tokens make 60 ms.
        assert_eq!(pacer.prompt_budget(4, 252), 10);
        pacer.record(100, 10.0);
        assert_eq!(pacer.prompt_budget(4, 252), MIN_CHUNK, "never stalls");
        assert_eq!(pacer.prompt_budget(300, 0), MIN_CHUNK, "never starves");
    }
}
