//! The local model: GGUF weights, the tokenizer and chat template its
//! metadata describes, loaded once and shared by every generation.

pub mod attention;
pub mod constrain;
pub mod llama;
pub mod sampling;
pub mod template;
pub mod tokenizer;

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::Tokenizer;

use template::ChatTemplate;
use tokenizer::TokenizerSpec;

pub struct Model {
    /// The id clients use: the file name up to its first dot.
    pub name: String,
    pub weights: llama::Weights,
    pub tokenizer: Tokenizer,
    /// The same vocabulary reading control tokens as text: for contents.
    pub text_tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Tokens that end an answer: EOS and the end-of-turn markers.
    pub end_tokens: Vec<u32>,
    /// The vocabulary for grammars and log probabilities.
    pub vocabulary: constrain::Vocabulary,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot load the model {path}: {reason}")]
pub struct ModelError {
    pub path: String,
    pub reason: String,
}

/// Loads a llama-family GGUF. `template` picks the chat template: `None`
/// for the file's own (or `chatml` when it has none), a name from
/// `prompts/`, or a path to a Jinja file.
pub fn load(path: &Path, template: Option<&str>) -> Result<Model, ModelError> {
    let fail = |reason: String| ModelError {
        path: path.display().to_string(),
        reason,
    };
    if !path.is_file() {
        let default =
            path.file_name() == Some(std::ffi::OsStr::new(crate::config::DEFAULT_MODEL_FILE));
        return Err(fail(if default {
            "no such file; run scripts/fetch-model (or pass --model PATH to a GGUF file)".into()
        } else {
            "no such file; check the path given with --model".into()
        }));
    }
    let (content, weights) = llama::load(path).map_err(|e| {
        fail(format!(
            "{e}; the file is not a usable llama-family GGUF (delete it and fetch it again if it is the bundled model)"
        ))
    })?;
    let spec = tokenizer_spec(&content).map_err(fail)?;
    let tokenizer = tokenizer::build(&spec).map_err(|e| fail(e.to_string()))?;
    let token_text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_u32().ok())
            .and_then(|id| spec.tokens.get(id as usize))
            .cloned()
            .unwrap_or_default()
    };
    let (bos, eos) = (
        token_text("tokenizer.ggml.bos_token_id"),
        token_text("tokenizer.ggml.eos_token_id"),
    );
    let template = chat_template(&content, template, bos, eos.clone()).map_err(fail)?;
    let mut end_tokens: Vec<u32> = [
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|end|>",
        "</s>",
    ]
    .into_iter()
    .chain([eos.as_str()])
    .filter_map(|t| tokenizer.token_to_id(t))
    .collect();
    end_tokens.sort_unstable();
    end_tokens.dedup();
    let end_of_turn = ["<|im_end|>", "<|eot_id|>", "<|end|>"]
        .into_iter()
        .chain([eos.as_str()])
        .find_map(|t| tokenizer.token_to_id(t))
        .unwrap_or(0);
    let vocabulary = constrain::Vocabulary::new(&tokenizer, weights.config.vocab_size, end_of_turn)
        .map_err(fail)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('.').next())
        .unwrap_or("local")
        .to_owned();
    Ok(Model {
        name,
        weights,
        text_tokenizer: tokenizer::text_only(&tokenizer),
        tokenizer,
        template,
        end_tokens,
        vocabulary,
    })
}

fn tokenizer_spec(content: &gguf_file::Content) -> Result<TokenizerSpec, String> {
    let md = &content.metadata;
    let text = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
    let list = |key: &str| -> Result<&Vec<gguf_file::Value>, String> {
        md.get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| format!("the GGUF has no {key}"))
    };
    let strings = |key: &str| -> Result<Vec<String>, String> {
        list(key)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| e.to_string()))
            .collect()
    };
    Ok(TokenizerSpec {
        model: text("tokenizer.ggml.model").unwrap_or_default(),
        pre: text("tokenizer.ggml.pre").unwrap_or_default(),
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types: list("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
        merges: strings("tokenizer.ggml.merges")?,
    })
}

fn chat_template(
    content: &gguf_file::Content,
    choice: Option<&str>,
    bos: String,
    eos: String,
) -> Result<ChatTemplate, String> {
    let own = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let source = match (choice, own) {
        (None, Some(own)) => own,
        (None, None) => return built_in("chatml", bos, eos),
        (Some(name), _) if template::BUILT_IN.iter().any(|(n, _)| *n == name) => {
            return built_in(name, bos, eos);
        }
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the chat template {path}: {e}"))?,
    };
    ChatTemplate::new(source, bos, eos).map_err(|e| e.to_string())
}

fn built_in(name: &str, bos: String, eos: String) -> Result<ChatTemplate, String> {
    ChatTemplate::built_in(name, bos, eos)
        .ok_or_else(|| format!("no built-in chat template `{name}`"))?
        .map_err(|e| e.to_string())
}
