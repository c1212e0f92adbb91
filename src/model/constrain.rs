//! Constrained decoding with llguidance over the model's own vocabulary:
//! a grammar (a JSON Schema, or a Lark grammar for tool calls) decides
//! which tokens may come next, and the sampler only sees those.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;

/// The vocabulary as llguidance sees it, built once at load.
pub struct Vocabulary {
    factory: Arc<ParserFactory>,
    /// Each token's bytes (empty for ids the tokenizer lacks).
    pub token_bytes: Vec<Vec<u8>>,
}

impl Vocabulary {
    /// `size` is the model's logits width; `eos` the token that ends a turn.
    pub fn new(tokenizer: &Tokenizer, size: usize, eos: u32) -> Result<Self, String> {
        let json = serde_json::to_value(tokenizer).map_err(|e| e.to_string())?;
        let mut token_bytes = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("reading the vocabulary for constrained decoding: {e}"))?;
        token_bytes.resize(size.max(token_bytes.len()), Vec::new());
        let info = TokRxInfo::new(
            u32::try_from(token_bytes.len()).map_err(|e| e.to_string())?,
            eos,
        );
        let trie = TokTrie::from(&info, &token_bytes);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            token_bytes,
        })
    }

    /// A fresh matcher for `grammar`; an error says what is wrong with it.
    pub fn constraint(&self, grammar: TopLevelGrammar) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(err) = matcher.get_error() {
            return Err(err);
        }
        Ok(Constraint { matcher })
    }
}

/// One generation's grammar state. A clone goes on independently (the
/// choices of one request), sharing the lexer's caches.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Forbids, in `logits`, every token the grammar does not allow next.
    /// The end-of-turn token is allowed only where the grammar may end.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Moves the grammar past `token`.
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete: nothing but the end may follow.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}
