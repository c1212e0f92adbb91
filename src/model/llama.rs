//! A llama-family decoder shaped for serving: weights loaded once and
//! shared by every generation, each generation with its own KV cache.
//!
//! Differences from candle's stock `quantized_llama`, each for speed:
//! - Projections run on `sluicegate_kernels` over the weights as the file
//!   stores them (Q4_1 and Q8_0; other types are re-quantized to Q8_0 at
//!   load), for one row and for a prompt's many rows alike: decode reads 4
//!   bits per weight, and no f32 copy of a matrix is ever made.
//! - Q, K and V are one matmul, and so are gate and up (their stored rows
//!   concatenated): fewer passes over the activations and fewer dispatches
//!   per token.
//! - The embedding table stays quantized (rows are dequantized on lookup)
//!   and doubles as the output projection when the two are tied.
//! - Attention and RoPE run as plain loops over a KV cache kept per KV
//!   head (see `attention`), instead of a dozen tensor ops per layer.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{D, Device, Tensor};
use sluicegate_kernels::{Format, QMatrix};

use super::attention::{self, Heads, KvStore, Rope};

pub type Result<T> = candle_core::Result<T>;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads the hyper-parameters of a `llama` GGUF.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let get = |key: &str| {
            content
                .metadata
                .get(&format!("llama.{key}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("missing llama.{key}")))
        };
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map_or("", String::as_str);
        if arch != "llama" {
            candle_core::bail!("architecture `{arch}` is not of the llama family");
        }
        let n_embd = get("embedding_length")?.to_u32()? as usize;
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = get("attention.head_count_kv")
            .and_then(|v| v.to_u32())
            .map_or(n_head, |v| v as usize);
        let vocab_size = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(tokens) => tokens.to_vec()?.len(),
            None => get("vocab_size")?.to_u32()? as usize,
        };
        Ok(Self {
            n_layer: get("block_count")?.to_u32()? as usize,
            n_head,
            n_kv_head,
            head_dim: n_embd / n_head,
            n_embd,
            n_ff: get("feed_forward_length")?.to_u32()? as usize,
            context_length: get("context_length")?.to_u32()? as usize,
            rope_base: get("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0),
            rms_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(|v| v.to_f32())
                .unwrap_or(1e-5),
            vocab_size,
        })
    }

    fn heads(&self) -> Heads {
        Heads {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V projections stacked: `n_head + 2 * n_kv_head` heads out.
    qkv: QMatrix,
    wo: QMatrix,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `2 * n_ff` out.
    gate_up: QMatrix,
    down: QMatrix,
}

/// The model's weights, shared by all generations.
pub struct Weights {
    pub config: LlamaConfig,
    /// Shared with `output` when the embeddings are tied.
    embedding: Arc<QMatrix>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Arc<QMatrix>,
    rope: Rope,
    device: Device,
}

/// One generation's attention state.
pub struct Cache {
    layers: Vec<KvStore>,
    /// Positions already in the cache.
    pub position: usize,
}

/// Loads the metadata and weights of a GGUF file.
pub fn load(path: &Path) -> Result<(gguf_file::Content, Weights)> {
    let device = Device::Cpu;
    let mut reader = BufReader::new(File::open(path)?);
    let content = gguf_file::Content::read(&mut reader)?;
    let config = LlamaConfig::from_gguf(&content)?;
    let reader = &mut reader;
    let vector = |reader: &mut BufReader<File>, name: &str| {
        content.tensor(reader, name, &device)?.dequantize(&device)
    };

    let embedding = Arc::new(matrix(&content, reader, "token_embd.weight")?);
    let mut layers = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let name = |part: &str| format!("blk.{i}.{part}.weight");
        let mut get = |part: &str| matrix(&content, reader, &name(part));
        let qkv = stacked(vec![get("attn_q")?, get("attn_k")?, get("attn_v")?])?;
        let wo = get("attn_output")?;
        let gate_up = stacked(vec![get("ffn_gate")?, get("ffn_up")?])?;
        let down = get("ffn_down")?;
        layers.push(Layer {
            attn_norm: vector(reader, &name("attn_norm"))?,
            qkv,
            wo,
            ffn_norm: vector(reader, &name("ffn_norm"))?,
            gate_up,
            down,
        });
    }
    let output = if content.tensor_infos.contains_key("output.weight") {
        Arc::new(matrix(&content, reader, "output.weight")?)
    } else {
        // Tied embeddings: the output projection is the embedding table.
        Arc::clone(&embedding)
    };
    let norm = vector(reader, "output_norm.weight")?;
    let rope = Rope::new(config.head_dim, config.rope_base, config.context_length);
    let weights = Weights {
        config,
        embedding,
        layers,
        norm,
        output,
        rope,
        device,
    };
    Ok((content, weights))
}

/// The kernels' name for a GGUF type they multiply as stored.
fn kernel_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        _ => None,
    }
}

/// A weight matrix as the file stores it when the kernels take its type;
/// any other type is re-quantized to Q8_0 (near-lossless from 4 to 6 bits).
fn matrix(
    content: &gguf_file::Content,
    reader: &mut BufReader<File>,
    name: &str,
) -> Result<QMatrix> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))?;
    let (rows, cols) = info.shape.dims2()?;
    let bad = |e: sluicegate_kernels::Error| candle_core::Error::Msg(format!("{name}: {e}"));
    match kernel_format(info.ggml_dtype) {
        Some(format) => {
            reader.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
            QMatrix::read(format, rows, cols, reader).map_err(bad)
        }
        None => {
            let f32s = content
                .tensor(reader, name, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            let q8 = QTensor::quantize(&f32s, GgmlDType::Q8_0)?;
            QMatrix::from_bytes(Format::Q8_0, rows, cols, &q8.data()?).map_err(bad)
        }
    }
}

/// Several projections of the same input as one matrix (rows stacked, as
/// stored).
fn stacked(parts: Vec<QMatrix>) -> Result<QMatrix> {
    QMatrix::stack(parts).map_err(|e| candle_core::Error::Msg(format!("cannot stack: {e}")))
}

/// `x · Wᵀ` for `rows` rows of `x` (`rows × W.cols()`): `rows × W.rows()`.
pub fn project_rows(weights: &QMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    weights.matmul(x, rows)
}

/// [`project_rows`] on a `(1, rows, in)` tensor.
fn project(weights: &QMatrix, x: &Tensor, rows: usize) -> Result<Tensor> {
    let y = project_rows(weights, &x.flatten_all()?.to_vec1::<f32>()?, rows);
    Tensor::from_vec(y, (1, rows, weights.rows()), x.device())
}

impl Weights {
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: (0..self.config.n_layer)
                .map(|_| KvStore::default())
                .collect(),
            position: 0,
        }
    }

    /// Feeds `tokens` (the prompt, or the last sampled token) and returns
    /// the logits for the next position.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let c = &self.config;
        let seq = tokens.len();
        let start = cache.position;
        if seq == 0 || start + seq > c.context_length {
            candle_core::bail!(
                "{} positions do not fit the context of {}",
                start + seq,
                c.context_length
            );
        }
        let mut x = self.embed(tokens)?;
        for (layer, store) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let qkv = project(&layer.qkv, &h, seq)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let attn = attention::attend(&qkv, seq, start, c.heads(), &self.rope, store);
            let attn = Tensor::from_vec(attn, (1, seq, c.n_head * c.head_dim), &self.device)?;
            x = (x + project(&layer.wo, &attn, seq)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate_up = project(&layer.gate_up, &h, seq)?;
            let gate = gate_up.narrow(D::Minus1, 0, c.n_ff)?;
            let up = gate_up.narrow(D::Minus1, c.n_ff, c.n_ff)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + project(&layer.down, &act, seq)?)?;
        }
        cache.position += seq;
        let last = x.narrow(1, seq - 1, 1)?;
        let h = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps)?;
        project(&self.output, &h, 1)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// The tokens' rows of the embedding table: `(1, tokens, n_embd)`.
    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let n = self.config.n_embd;
        let mut x = vec![0.0f32; tokens.len() * n];
        for (&token, row) in tokens.iter().zip(x.chunks_exact_mut(n)) {
            if token as usize >= self.embedding.rows() {
                candle_core::bail!("token {token} is outside the vocabulary");
            }
            self.embedding.dequantize_row(token as usize, row);
        }
        Tensor::from_vec(x, (1, tokens.len(), n), &self.device)
    }
}
