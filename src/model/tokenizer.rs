//! The model's tokenizer, built from the GGUF's own vocabulary, and
//! incremental detokenization that never splits a character.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecodeStream, Tokenizer};

/// GGUF `token_type` of control tokens (`<|im_start|>` and the like).
const CONTROL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("malformed tokenizer data: {0}")]
    Malformed(String),
}

/// What a GGUF says about its tokenizer.
#[derive(Debug, Default, Clone)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: only `gpt2` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer flavour.
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// `"a b"` pairs.
    pub merges: Vec<String>,
}

/// Builds the tokenizer llama.cpp would use for this vocabulary: byte-level
/// BPE with no prefix space, digits split one by one for the pre-tokenizers
/// that do so, and control tokens as special tokens.
pub fn build(spec: &TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
    if spec.model != "gpt2" {
        return Err(TokenizerError::Unsupported(format!(
            "tokenizer model `{}` (only byte-level BPE, `gpt2`, is supported)",
            spec.model
        )));
    }
    // Only splits reproduced exactly: another pre-tokenizer (llama-bpe,
    // qwen2, …) would give ids that differ from llama.cpp's, silently.
    if !(splits_digits(&spec.pre) || matches!(spec.pre.as_str(), "gpt2" | "gpt-2")) {
        return Err(TokenizerError::Unsupported(format!(
            "pre-tokenizer `{}` (supported: smollm, starcoder, refact, command-r and gpt2)",
            spec.pre
        )));
    }
    let vocab: Vocab = spec
        .tokens
        .iter()
        .zip(0u32..)
        .map(|(t, i)| (t.clone(), i))
        .collect();
    let merges = spec
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| TokenizerError::Malformed(format!("merge without a space: {m:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Malformed(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    // add_prefix_space = false, trim_offsets = true, use_regex = true
    let byte_level = ByteLevel::new(false, true, true);
    if splits_digits(&spec.pre) {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            byte_level.into(),
        ])));
    } else {
        tokenizer.with_pre_tokenizer(Some(byte_level));
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = spec
        .tokens
        .iter()
        .zip(&spec.token_types)
        .filter(|(_, kind)| **kind == CONTROL)
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| TokenizerError::Malformed(e.to_string()))?;
    Ok(tokenizer)
}

/// llama.cpp pre-tokenizers that put each digit in its own piece; the rest
/// get GPT-2's byte-level split alone.
fn splits_digits(pre: &str) -> bool {
    matches!(pre, "smollm" | "starcoder" | "refact" | "command-r")
}

/// A copy of `tokenizer` that reads control tokens written in its input as
/// plain text, for what users send.
pub fn text_only(tokenizer: &Tokenizer) -> Tokenizer {
    let mut text = tokenizer.clone();
    text.set_encode_special_tokens(true);
    text
}

/// Token ids for a prompt in pieces: markup with `markup` (control tokens
/// written in it are parsed), text with `text` (see [`text_only`]).
pub fn encode_pieces(
    markup: &Tokenizer,
    text: &Tokenizer,
    pieces: &[crate::model::template::Piece],
) -> Result<Vec<u32>, TokenizerError> {
    use crate::model::template::Piece;
    let mut ids = Vec::new();
    for piece in pieces {
        ids.extend(match piece {
            Piece::Markup(s) => encode(markup, s)?,
            Piece::Text(s) => encode(text, s)?,
        });
    }
    Ok(ids)
}

/// Token ids for `text`; control tokens written in the text are parsed
/// unless `tokenizer` is [`text_only`].
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, TokenizerError> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| TokenizerError::Malformed(e.to_string()))
}

/// Turns token ids into text as they come: a token that completes no
/// character yields nothing, so no client ever sees half an emoji.
pub struct TextStream<'t> {
    inner: DecodeStream<
        't,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        Self {
            inner: tokenizer.decode_stream(false),
        }
    }

    /// The text this token completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.inner
            .step(id)
            .map_err(|e| TokenizerError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary small enough to write by hand: every byte
    /// symbol, a few merges and two control tokens.
    fn tiny() -> Tokenizer {
        let mut tokens = vec!["<|end|>".to_owned(), "<|start|>".to_owned()];
        tokens.extend(gpt2_byte_symbols());
        tokens.extend(["he", "hel", "hell", "hello", "Ġw", "Ġwo"].map(String::from));
        let mut token_types = vec![CONTROL, CONTROL];
        token_types.resize(tokens.len(), 1);
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: "smollm".into(),
            tokens,
            token_types,
            merges: ["h e", "he l", "hel l", "hell o", "Ġ w", "Ġw o"]
                .map(String::from)
                .to_vec(),
        };
        build(&spec).expect("tokenizer")
    }

    #[test]
    fn pre_tokenizers_it_cannot_reproduce_are_refused() {
        for pre in ["llama-bpe", "qwen2", "deepseek-llm"] {
            let spec = TokenizerSpec {
                model: "gpt2".into(),
                pre: pre.into(),
                ..TokenizerSpec::default()
            };
            let err = build(&spec).expect_err("refused").to_string();
            assert!(err.contains(pre), "{err}");
        }
    }

    #[test]
    fn control_markup_is_text_to_the_text_only_copy() {
        let t = tiny();
        let text = text_only(&t);
        assert_eq!(
            encode(&t, "<|start|>he").expect("ids"),
            vec![1, id_of(&t, "he")]
        );
        assert!(encode(&text, "<|start|>he").expect("ids").len() > 2);
    }

    fn id_of(t: &Tokenizer, token: &str) -> u32 {
        t.token_to_id(token).expect("in the vocabulary")
    }

    /// GPT-2's printable stand-ins for the 256 byte values.
    fn gpt2_byte_symbols() -> Vec<String> {
        let printable = |b: u32| {
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
        };
        let mut shifted = 0;
        (0u32..256)
            .map(|b| {
                let code = if printable(b) {
                    b
                } else {
                    shifted += 1;
                    255 + shifted
                };
                char::from_u32(code).expect("valid char").to_string()
            })
            .collect()
    }

    #[test]
    fn merges_apply_with_no_prefix_space_and_digits_split() {
        let t = tiny();
        let id = |s: &str| t.token_to_id(s).expect("in vocab");
        assert_eq!(encode(&t, "hello").expect("ids"), vec![id("hello")]);
        assert_eq!(encode(&t, "hello wo").expect("ids")[1], id("Ġwo"));
        let digits = encode(&t, "12").expect("ids");
        assert_eq!(digits, vec![id("1"), id("2")]);
        assert_eq!(encode(&t, "<|start|>he").expect("ids"), vec![1, id("he")]);
    }

    #[test]
    fn streaming_never_splits_a_character() {
        let t = tiny();
        let text = "é 👩‍👩‍👧 안녕";
        let ids = encode(&t, text).expect("ids");
        let mut stream = TextStream::new(&t);
        let mut out = String::new();
        let mut silent_steps = 0;
        for id in ids {
            match stream.step(id).expect("step") {
                Some(piece) => {
                    assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                    out.push_str(&piece);
                }
                None => silent_steps += 1,
            }
        }
        assert_eq!(out, text);
        assert!(silent_steps > 0, "multi-byte characters span byte tokens");
    }

    #[test]
    fn only_byte_level_bpe_is_accepted() {
        let spec = TokenizerSpec {
            model: "llama".into(),
            ..TokenizerSpec::default()
        };
        assert!(matches!(build(&spec), Err(TokenizerError::Unsupported(_))));
    }
}
