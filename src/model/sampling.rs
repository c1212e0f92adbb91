//! Choosing the next token from logits: penalties, then greedy at
//! temperature 0, or temperature, top-k and top-p with a seeded RNG so that
//! the same seed gives the same text.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::types::Sampling;

/// Below this a temperature means greedy.
const GREEDY: f32 = 1e-5;
/// Tokens less likely than this, relative to the best, are never sampled;
/// it keeps top-p's sort to a handful of candidates instead of the vocab.
const NEGLIGIBLE: f32 = 1e-9;

pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    rng: StdRng,
    /// Tokens of the answer so far and how often: what presence and
    /// frequency penalties count (as OpenAI and vLLM do).
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt: the repetition penalty also looks at them
    /// (as Hugging Face and llama.cpp do).
    prompt: HashSet<u32>,
    /// Candidate scratch space, reused between steps.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// OpenAI's defaults where the request is silent: temperature 1,
    /// top-p 1, no penalties; a random seed unless one is given.
    pub fn new(sampling: &Sampling) -> Self {
        let seed = sampling.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            temperature: sampling.temperature.unwrap_or(1.0),
            top_k: sampling.top_k.map_or(0, |k| k as usize),
            top_p: sampling.top_p.unwrap_or(1.0),
            repetition_penalty: sampling.repetition_penalty.unwrap_or(1.0),
            presence_penalty: sampling.presence_penalty.unwrap_or(0.0),
            frequency_penalty: sampling.frequency_penalty.unwrap_or(0.0),
            rng: StdRng::seed_from_u64(seed),
            generated: HashMap::new(),
            prompt: HashSet::new(),
            candidates: Vec::new(),
        }
    }

    /// Records a token of the answer for the penalties.
    pub fn observe(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
    }

    /// Records a token of the prompt, for the repetition penalty only.
    pub fn observe_prompt(&mut self, token: u32) {
        if self.repetition_penalty != 1.0 {
            self.prompt.insert(token);
        }
    }

    /// The next token. `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.penalise(logits);
        if self.temperature < GREEDY || self.top_k == 1 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = max + self.temperature * NEGLIGIBLE.ln();
        self.candidates.clear();
        self.candidates.extend(
            (0u32..)
                .zip(logits.iter())
                .filter(|(_, l)| **l >= floor)
                .map(|(id, l)| (id, ((l - max) / self.temperature).exp())),
        );
        self.candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.top_k > 0 {
            self.candidates.truncate(self.top_k);
        }
        let total: f32 = self.candidates.iter().map(|c| c.1).sum();
        if self.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = self
                .candidates
                .iter()
                .position(|c| {
                    mass += c.1 / total;
                    mass >= self.top_p
                })
                .map_or(self.candidates.len(), |i| i + 1);
            self.candidates.truncate(keep);
        }
        let total: f32 = self.candidates.iter().map(|c| c.1).sum();
        let mut target = self.rng.random::<f32>() * total;
        for &(id, weight) in &self.candidates {
            target -= weight;
            if target <= 0.0 {
                return id;
            }
        }
        self.candidates.first().map_or(0, |c| c.0)
    }

    fn penalise(&self, logits: &mut [f32]) {
        let repetition = self.repetition_penalty != 1.0;
        if !repetition && self.presence_penalty == 0.0 && self.frequency_penalty == 0.0 {
            return;
        }
        if repetition {
            let seen = self.generated.keys().chain(
                self.prompt
                    .iter()
                    .filter(|t| !self.generated.contains_key(t)),
            );
            for &token in seen {
                if let Some(logit) = logits.get_mut(token as usize) {
                    // As in the CTRL paper and Hugging Face: toward zero.
                    *logit = if *logit > 0.0 {
                        *logit / self.repetition_penalty
                    } else {
                        *logit * self.repetition_penalty
                    };
                }
            }
        }
        for (&token, &count) in &self.generated {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= self.presence_penalty + self.frequency_penalty * count as f32;
            }
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (id, &l) in (0u32..).zip(logits) {
        if l > best.1 {
            best = (id, l);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(sampling: Sampling) -> Sampler {
        Sampler::new(&sampling)
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.9, -1.0, 0.5]
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = sampler(Sampling {
            temperature: Some(0.0),
            ..Sampling::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&mut logits()), 1);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_choices_and_another_seed_differs() {
        let run = |seed| {
            let mut s = sampler(Sampling {
                temperature: Some(1.5),
                seed: Some(seed),
                ..Sampling::default()
            });
            (0..64).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_limit_the_candidates() {
        let mut k = sampler(Sampling {
            temperature: Some(5.0),
            top_k: Some(2),
            seed: Some(1),
            ..Sampling::default()
        });
        assert!((0..200).all(|_| matches!(k.sample(&mut logits()), 1 | 2)));
        let mut p = sampler(Sampling {
            temperature: Some(1.0),
            top_p: Some(0.1),
            seed: Some(1),
            ..Sampling::default()
        });
        assert!((0..200).all(|_| p.sample(&mut logits()) == 1));
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let mut s = sampler(Sampling {
            temperature: Some(0.0),
            presence_penalty: Some(0.5),
            ..Sampling::default()
        });
        s.observe(1);
        assert_eq!(s.sample(&mut logits()), 2, "3.0 - 0.5 < 2.9");
        let mut r = sampler(Sampling {
            temperature: Some(0.0),
            repetition_penalty: Some(2.0),
            ..Sampling::default()
        });
        r.observe(1);
        assert_eq!(r.sample(&mut logits()), 2, "3.0 / 2 < 2.9");
    }

    #[test]
    fn presence_and_frequency_count_the_answer_not_the_prompt() {
        let mut s = sampler(Sampling {
            temperature: Some(0.0),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(0.5),
            ..Sampling::default()
        });
        s.observe_prompt(1);
        assert_eq!(
            s.sample(&mut logits()),
            1,
            "a prompt token is not penalised"
        );
        let mut r = sampler(Sampling {
            temperature: Some(0.0),
            repetition_penalty: Some(2.0),
            ..Sampling::default()
        });
        r.observe_prompt(1);
        assert_eq!(r.sample(&mut logits()), 2, "repetition looks at the prompt");
    }
}
